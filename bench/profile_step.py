"""Where a training step's time goes: harmodt's HarmoDT-F ``--fused`` step, its reference step
and the plain-PyTorch peer step (bench/peer.py), timed interleaved and profiled op by op.

    python -m bench.profile_step                       # fp32: interleaved times, then the per-op profile of each step
    python -m bench.profile_step --precision bf16 --rounds 3 --steps 10 --top 15
    python -m bench.profile_step --no-profile          # only the interleaved times and ratios
    python -m bench.profile_step --kernels --out k.json   # CUDA: a graphed step's top kernels by GPU time

Timing: every round runs each step ``--steps`` times in turn (the order rotates); the figures
are medians over rounds, the ratios medians of per-round ratios. Profile: ``torch.profiler``
over ``--steps`` steps of each, the operators by self CPU time, as a share of the step.

``--kernels`` (a CUDA GPU): the paper-size HarmoDT-F ``--fused`` step as one CUDA graph (fp32
with tf32 matmuls, or ``--precision bf16``), profiled with CUDA activity over ``--steps`` steps:
its GPU time per step (the kernels' summed durations), the kernels and the host's launch calls
per step, and the ``--top`` kernels by GPU time (:func:`kernel_table`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from .common import make_trainer
from .peer import PeerStep


def steps(precision: str) -> dict:
    """name -> a callable doing one training step: the fused, reference and peer steps."""
    from harmodt.runtime import keep_freed_memory

    keep_freed_memory()
    fused = make_trainer("harmodt-f", "cpu", True, precision)
    ref = make_trainer("harmodt-f", "cpu", False, precision)
    peer = PeerStep(precision=precision)
    return {"fused": lambda: fused.train_step(fused.sample_tasks()),
            "reference": lambda: ref.train_step(ref.sample_tasks()),
            "peer": peer.step}


def interleaved(fns: dict, rounds: int, n: int, warmup: int = 3) -> dict[str, list[float]]:
    """ms per step of every callable, one entry per round."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    names, times = list(fns), {k: [] for k in fns}
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            t = time.perf_counter()
            for _ in range(n):
                fns[k]()
            times[k].append((time.perf_counter() - t) / n * 1e3)
    return times


def ratio(times: dict, num: str, den: str) -> float:
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def op_shares(fn, n: int) -> list[tuple[str, float, float, int]]:
    """(operator, self CPU ms per step, share of the step, calls per step) by self CPU time."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            fn()
    rows = [(e.key, e.self_cpu_time_total / 1e3 / n, e.count / n) for e in prof.key_averages()]
    total = sum(r[1] for r in rows)
    return sorted(((k, ms, ms / total, c) for k, ms, c in rows), key=lambda r: -r[1])


LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch",
                "cudaMemcpyAsync", "cudaMemsetAsync")  # the host's calls that put work on the GPU


def kernel_table(kernels: list[tuple[str, float, int]], launches: int, steps: int, top: int = 20) -> dict:
    """A step's GPU time by kernel, from the profiler's rows over ``steps`` steps: ``kernels``
    (name, summed GPU microseconds, executions), ``launches`` the host's launch calls. Returns
    ``gpu_ms_per_step``, ``kernels_per_step`` (kernel executions), ``launches_per_step`` (host
    calls: one per graph replay plus what runs outside it) and ``top``: the ``top`` kernels by GPU
    time, each ``{"kernel", "ms_per_step", "share", "calls_per_step"}`` (ties by name)."""
    total_us = sum(us for _, us, _ in kernels)
    rows = sorted(kernels, key=lambda r: (-r[1], r[0]))[:top]
    return {"gpu_ms_per_step": total_us / 1e3 / steps, "kernels_per_step": sum(c for *_, c in kernels) / steps,
            "launches_per_step": launches / steps, "steps": steps,
            "top": [{"kernel": name, "ms_per_step": us / 1e3 / steps, "share": us / total_us if total_us else 0.0,
                     "calls_per_step": count / steps} for name, us, count in rows]}


def profile_kernels(fn, steps: int, top: int = 20) -> dict:
    """:func:`kernel_table` of ``steps`` calls of ``fn`` (one training step each) under
    ``torch.profiler`` with CPU and CUDA activity (needs CUDA)."""
    from torch.autograd import DeviceType

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = prof.key_averages()
    kernels = [(e.key, e.self_device_time_total, e.count) for e in rows
               if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    launches = sum(e.count for e in rows if e.device_type == DeviceType.CPU and e.key in LAUNCH_CALLS)
    return kernel_table(kernels, launches, steps, top)


def print_kernel_table(table: dict, what: str) -> None:
    print(f"{what}: {table['gpu_ms_per_step']:.3f} ms of GPU time per step, {table['kernels_per_step']:.0f} kernels, "
          f"{table['launches_per_step']:.1f} host launch calls per step ({table['steps']} steps)")
    for r in table["top"]:
        print(f"  {r['share'] * 100:5.1f} %  {r['ms_per_step'] * 1e3:8.1f} us  {r['calls_per_step']:6.1f} calls  "
              f"{r['kernel'][:110]}")


def graphed_kernels(method: str, precision: str, steps: int, top: int) -> dict:
    """:func:`profile_kernels` of the paper-size ``method`` ``--fused --cuda-graph`` step on CUDA,
    fp32 with tf32 matmuls (or bf16), after 10 steps of warm-up and capture."""
    from .common import make_trainer

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        tr = make_trainer(method, "cuda", True, precision, cuda_graph="on")
        for _ in range(10):
            tr.train_step(tr.sample_tasks())
        return profile_kernels(lambda: tr.train_step(tr.sample_tasks()), steps, top)
    finally:
        torch.set_float32_matmul_precision(before)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.splitlines()[0])
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--steps", type=int, default=10, help="steps per round and per profile (default 10)")
    p.add_argument("--top", type=int, default=None,
                   help="operators shown per step (default 12; kernels with --kernels: 20)")
    p.add_argument("--no-profile", action="store_true", help="only the interleaved timing")
    p.add_argument("--only", default="fused,reference,peer", help="comma-separated steps to run (default all three)")
    p.add_argument("--kernels", action="store_true",
                   help="CUDA: a graphed step's GPU time by kernel (the --top kernels, default 20)")
    p.add_argument("--method", default="harmodt-f", help="with --kernels: the method (default harmodt-f)")
    p.add_argument("--out", default=None, help="with --kernels: also write the table as JSON to this file")
    a = p.parse_args(argv)
    top = a.top or (20 if a.kernels else 12)
    if a.kernels:
        if not torch.cuda.is_available():
            print("--kernels: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
            return 2
        table = graphed_kernels(a.method, a.precision, a.steps, top)
        table.update(method=a.method, precision=a.precision + (" (tf32 matmuls)" if a.precision == "fp32" else ""),
                     device=torch.cuda.get_device_name(0), torch=torch.__version__)
        print_kernel_table(table, f"graphed {a.method} --fused step, {table['precision']}, {table['device']}, "
                                  f"torch {torch.__version__}")
        if a.out:
            import json

            with open(a.out, "w") as fh:
                json.dump(table, fh, indent=1)
        return 0
    torch.set_num_threads(torch.get_num_threads())
    fns = {k: v for k, v in steps(a.precision).items() if k in a.only.split(",")}
    times = interleaved(fns, a.rounds, a.steps)
    print(f"{a.precision}, {torch.get_num_threads()} threads, {a.rounds} rounds x {a.steps} steps")
    for k, v in times.items():
        print(f"  {k:9s} median {statistics.median(v):7.1f} ms  (min {min(v):.1f}, max {max(v):.1f})")
    if "peer" in times:
        for k in times:
            if k != "peer":
                print(f"  {k} / peer: {ratio(times, k, 'peer'):.3f}x")
    if a.no_profile:
        return 0
    for k, f in fns.items():
        rows = op_shares(f, a.steps)
        total = sum(r[1] for r in rows)
        print(f"\n{k}: {total:.1f} ms self CPU per step")
        for name, ms, share, calls in rows[:top]:
            print(f"  {share * 100:5.1f} %  {ms:7.2f} ms  {calls:6.1f} calls  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
