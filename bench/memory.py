"""`python -m bench.memory [--tasks 2,4,8] [--at 50] [--device cpu] [--fused]`: the memory of HarmoDT-F
at the paper's size (6 x 256, 8 heads) by number of tasks T: what it holds all along (weights,
AdamW state, masks) and what a mask update (Algorithm 2) adds for a moment (the ``[T, P]`` task
gradients and scores).

For each T in ``--tasks`` a fresh process builds the trainer the CLI builds (synthetic data of T
tasks), runs two steps and one mask update, and reports the bytes of each held tensor and the
peak the update adds (on a CPU: the growth of the process's peak resident set; on CUDA: the
allocator's peak). Every figure is also computed from the model's sizes for T = ``--at`` (MT50),
so the table shows where the memory scales with T and by how much.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

MIB = 2**20


def held_bytes(tr) -> dict:
    """Bytes of what a trainer holds between steps: weights, AdamW state, the bool masks, their
    packed copy and the packed ERK draw kept for ``mask_changed_fraction``."""
    tm = tr.task_masks
    opt = sum(t.numel() * t.element_size() for s in tr.opt.state.values() for t in s.values() if hasattr(t, "numel"))
    return {"weights": sum(p.numel() * p.element_size() for p in tr.model.parameters()), "adamw_state": opt,
            "masks_bool": sum(m.numel() * m.element_size() for m in tm.masks.values()),
            "masks_packed": sum(m.numel() * m.element_size() for m in tm.packed().values()),
            "masks_initial_packed": tr.initial_masks.numel() * tr.initial_masks.element_size()}


def computed(t: int, p_masked: int, n_params: int) -> dict:
    """The same figures from the sizes: P masked weights, n_params parameters, T tasks. A mask
    update holds the masked and dense task gradients ``[T, P]`` fp32 and, while it scores them
    (``TaskMasks.update``), up to four more ``[T, P]`` fp32 temporaries (agreement, importance,
    lambda * importance, harmony; then recovery), and two ``[T, P]`` bool unpacked masks."""
    tp4 = t * p_masked * 4
    return {"weights": n_params * 4, "adamw_state": 2 * n_params * 4 + 0, "masks_bool": t * p_masked,
            "masks_packed": t * p_masked // 8, "masks_initial_packed": t * p_masked // 8,
            "task_gradients": 2 * tp4, "mask_update_peak": 6 * tp4}


def measure(t: int, device: str, fused: bool) -> dict:
    """Run in a fresh process: held bytes and the mask update's peak for ``t`` tasks."""
    import torch

    from harmodt.tasks import MT50

    from .common import make_trainer

    tr = make_trainer("harmodt-f", device, fused, tasks=MT50[:t])
    for _ in range(2):
        tr.train_step(tr.sample_tasks())
    tr.step = 1  # past step 0 of the alpha schedule: the selection moves weights
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tr.mask_updater()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    p_masked = sum(w.numel() for w in tr.weights.values())
    return {"tasks": t, "held": held_bytes(tr), "mask_update_peak": peak, "p_masked": p_masked,
            "n_params": sum(p.numel() for p in tr.model.parameters()),
            "clock": "cuda allocator" if cuda else "peak RSS growth"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="2,4,8", help="task counts to measure, each in a fresh process")
    p.add_argument("--at", type=int, default=50, help="the task count to compute the figures for (default 50: MT50)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fused", action="store_true", help="the --fused trainer (the kernels' harmony_select)")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the worker process: measure one task count, print JSON
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.device, args.fused)))
        return 0
    rows = []
    for t in [int(x) for x in args.tasks.split(",")]:
        cmd = ([sys.executable, "-m", "bench.memory", "--one", str(t), "--device", args.device]
               + (["--fused"] if args.fused else []))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 2
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    p_masked, n_params = rows[0]["p_masked"], rows[0]["n_params"]
    keys = ["weights", "adamw_state", "masks_bool", "masks_packed", "masks_initial_packed"]
    head = (f"{'MiB':<34}" + "".join(f"{'T=' + str(r['tasks']) + ' meas.':>12}{'comp.':>9}" for r in rows)
            + f"{'T=' + str(args.at) + ' comp.':>14}")
    print(f"HarmoDT-F 6 x 256, {n_params / 1e6:.2f} M parameters, P = {p_masked:,} masked weights; device {args.device}"
          f"{' --fused' if args.fused else ''}; mask update peak measured as {rows[0]['clock']}")
    print(head)
    for k in keys + ["task_gradients", "mask_update_peak"]:
        line = f"{k:<34}"
        for r in rows:
            meas = r["held"].get(k, r["mask_update_peak"] if k == "mask_update_peak" else None)
            comp = computed(r["tasks"], p_masked, n_params)[k]
            line += (f"{meas / MIB:>12.1f}" if meas is not None else f"{'':>12}") + f"{comp / MIB:>9.1f}"
        print(line + f"{computed(args.at, p_masked, n_params)[k] / MIB:>14.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
