"""`python -m bench.surgery_step`: the training step of PCGrad and CAGrad against Prompt-DT's.

At the paper's model size (6 layers, 8 heads, width 256, K 20, K* 5, batch 8) on 5 synthetic
tasks, in one process, interleaved: every round runs one step of each variant in a rotating
order, so a shared machine's drift hits them alike. Figures are medians over rounds (after
warm-up steps), ratios the medians of the per-round ratios to Prompt-DT with one task per batch.

Variants: Prompt-DT with 1 task per batch (Algorithm 1) and with all 5 (like for like); PCGrad
and CAGrad with all 5 (one forward and backward per task on its own rows, as the trainer does);
and "pcgrad, one forward": PCGrad's task gradients taken instead from one forward over the whole
batch with one ``autograd.grad(retain_graph=True)`` per task loss. Also timed alone: the
combination rules on a ``[5, P]`` gradient matrix.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from harmodt.methods import METHODS
from harmodt.model import action_loss
from harmodt.optim import clip_coefficient

from .common import TASKS, make_trainer


def one_forward_step(tr, task_ids: list[int]) -> torch.Tensor:
    """A PCGrad step whose task gradients come from one forward over the spread batch and one
    ``autograd.grad`` per task loss through the shared graph (the alternative to the trainer's
    one forward per task)."""
    batch = tr.batcher.sample(task_ids, tr.cfg.batch_size)
    n = len(task_ids)
    rows = [tr.cfg.batch_size // n + (1 if i < tr.cfg.batch_size % n else 0) for i in range(n)]
    params = [p for p in tr.params if p.requires_grad]
    with tr.autocast():
        pred = tr.forward(batch, None)  # (B, K, A)
    grads = torch.empty(n, sum(p.numel() for p in params), device=tr.device)
    losses, start = [], 0
    for i, k in enumerate(rows):
        part = {key: v[start : start + k] for key, v in batch.items()}
        loss = action_loss(pred[start : start + k], part)
        g = torch.autograd.grad(loss, params, retain_graph=i < n - 1)
        torch.cat([x.reshape(-1) for x in g], out=grads[i])
        losses.append(loss.detach())
        start += k
    combined = METHODS["pcgrad"].combine(grads, None, tr.batcher.generator)
    for p, chunk in zip(params, combined.split([p.numel() for p in params])):
        p.grad = chunk.view_as(p)
    tr.opt.masked_step(None, grad_scale=clip_coefficient(params, tr.cfg.grad_clip), op=tr.backends.masked_adamw)
    tr.sched.step()
    tr.step += 1
    return torch.stack(losses).mean()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.surgery_step", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20, help="timed steps per variant (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first (default 5)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--out", default="", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    t = len(TASKS)
    trainers = {
        "prompt-dt, 1 task": make_trainer("prompt-dt", device=args.device, tasks_per_batch=1),
        f"prompt-dt, {t} tasks": make_trainer("prompt-dt", device=args.device, tasks_per_batch=t),
        f"pcgrad, {t} tasks": make_trainer("pcgrad", device=args.device),
        f"cagrad, {t} tasks": make_trainer("cagrad", device=args.device),
        f"pcgrad, {t} tasks, one forward": make_trainer("pcgrad", device=args.device),
    }
    steps = {name: (lambda tr=tr: tr.train_step(tr.sample_tasks())) for name, tr in trainers.items()}
    one = trainers[f"pcgrad, {t} tasks, one forward"]
    steps[f"pcgrad, {t} tasks, one forward"] = lambda: one_forward_step(one, one.sample_tasks())
    names = list(steps)
    for _ in range(args.warmup):
        for name in names:
            steps[name]()
    times = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # a rotating order
            sync()
            t0 = time.perf_counter()
            steps[name]()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
        print(f"\rround {r + 1}/{args.rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    base = names[0]
    rows = {name: {"median_ms": statistics.median(v), "min_ms": min(v),
                   "ratio": statistics.median(a / b for a, b in zip(v, times[base]))} for name, v in times.items()}
    # the combination rules alone, on a [T, P] gradient matrix of the model's size
    n_params = sum(p.numel() for p in trainers[base].params)
    grads = torch.randn(t, n_params, device=dev)
    gen = torch.Generator().manual_seed(0)
    for rule in ("pcgrad", "cagrad"):
        v = []
        for _ in range(args.rounds):
            sync()
            t0 = time.perf_counter()
            # cagrad: its --cagrad-c
            METHODS[rule].combine(grads, trainers[f"{rule}, {t} tasks"].step_rule.options, gen)
            sync()
            v.append((time.perf_counter() - t0) * 1e3)
        rows[f"{rule} rule alone, [{t}, {n_params}]"] = {"median_ms": statistics.median(v), "min_ms": min(v),
                                                         "ratio": None}
    print(f"{'variant':<42} {'median ms':>10} {'min ms':>8} {'x prompt-dt':>12}")
    for name, row in rows.items():
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}"
        print(f"{name:<42} {row['median_ms']:>10.1f} {row['min_ms']:>8.1f} {ratio:>12}")
    print(f"(threads {args.threads}, device {args.device}, {args.rounds} rounds after {args.warmup} warm-up steps; "
          f"absolute times depend on the machine's load, the ratios less)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"threads": args.threads, "device": args.device, "rounds": args.rounds, "warmup": args.warmup,
                       "torch": torch.__version__, "variants": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
