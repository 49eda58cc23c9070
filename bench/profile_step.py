"""Where a training step's time goes: harmodt's HarmoDT-F ``--fused`` step, its reference step
and the plain-PyTorch peer step (bench/peer.py), timed interleaved and profiled op by op.

    python -m bench.profile_step                       # fp32: interleaved times, then the per-op profile of each step
    python -m bench.profile_step --precision bf16 --rounds 3 --steps 10 --top 15
    python -m bench.profile_step --no-profile          # only the interleaved times and ratios

Timing: every round runs each step ``--steps`` times in turn (the order rotates); the figures
are medians over rounds, the ratios medians of per-round ratios. Profile: ``torch.profiler``
over ``--steps`` steps of each, the operators by self CPU time, as a share of the step.
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
    return {"fused": lambda: fused.train_step(fused.sample_tasks()), "reference": lambda: ref.train_step(ref.sample_tasks()),
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.splitlines()[0])
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--steps", type=int, default=10, help="steps per round and per profile (default 10)")
    p.add_argument("--top", type=int, default=12, help="operators shown per step (default 12)")
    p.add_argument("--no-profile", action="store_true", help="only the interleaved timing")
    p.add_argument("--only", default="fused,reference,peer", help="comma-separated steps to run (default all three)")
    a = p.parse_args(argv)
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
        for name, ms, share, calls in rows[: a.top]:
            print(f"  {share * 100:5.1f} %  {ms:7.2f} ms  {calls:6.1f} calls  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
