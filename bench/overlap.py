"""Does overlapping the simulator and the policy pay on this machine? Evaluation's vector step at
the studies' setting (MT10 x 20 episodes = 200 environments, the studies' 3 x 128 model with
random weights and ERK masks, a full 20-step history and the prompt's cached keys and values, fp32
or bf16), timed four ways, ms per vector step:

- ``simulator``: the 200 environments alone, split over two worker processes, random actions;
- ``policy``: ``PromptDT.act`` alone on the 200 rows;
- ``serial``: what ``harmodt.evaluate`` does: the policy on all rows, then the simulator (its two
  shards step concurrently);
- ``pipelined``: the rows in two halves, each half's environments in its own worker process; the
  policy of one half computes while the other half's simulator steps.

    python -m bench.overlap                      # fp32, MT10 x 20 episodes, 50 vector steps per way, 3 rounds
    python -m bench.overlap --precision bf16 --steps 100 --rounds 5

The policy's inputs stay fixed (a timing of the pipeline, not an evaluation); every way runs in
every round, in rotating order, and the figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import numpy as np
import torch

import harmodt_kernels


class Half:
    """The environments of some rows in a worker process (``harmodt.envs``' shard worker)."""

    def __init__(self, tasks, seeds):
        from harmodt.envs import _shard_worker

        self.parent, child = mp.get_context("spawn").Pipe()
        self.proc = mp.get_context("spawn").Process(target=_shard_worker, args=(child, tasks, seeds), daemon=True)
        self.proc.start()
        assert self.parent.recv()[0] == "ready"
        self.parent.send(("reset", None))
        self.parent.recv()

    def send(self, actions):
        self.parent.send(("step", actions))

    def recv(self):
        return self.parent.recv()[1]

    def close(self):
        self.parent.send(("close", None))
        self.parent.recv()
        self.proc.join()


def policy(rows: torch.Tensor, n_tasks: int, precision: str):
    """A callable running ``act`` for ``rows`` (task indices of ``n_tasks``) on fixed inputs: the studies' model."""
    from bench.common import model_and_masks
    from harmodt.config import ModelConfig
    from harmodt.model import MaskContext

    k, kp = 20, 5
    model, masks = model_and_masks(n_tasks, "cpu", ModelConfig(n_layer=3, n_head=4, n_embd=128))
    op = harmodt_kernels.select_backends(torch.device("cpu"), True).masked_linear.cached({})
    g = torch.Generator().manual_seed(0)
    packed = masks.packed()
    prompt = {"prompt_states": torch.randn(n_tasks, kp, 39, generator=g),
              "prompt_actions": torch.rand(n_tasks, kp, 4, generator=g) * 2 - 1,
              "prompt_rtg": torch.rand(n_tasks, kp, 1, generator=g),
              "prompt_timesteps": torch.arange(kp).expand(n_tasks, kp).clone(),
              "prompt_mask": torch.ones(n_tasks, kp, dtype=torch.bool)}
    bf16 = dict(device_type="cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def segments(r):  # ((task, rows), ...) of task-major rows
        tasks, counts = torch.unique_consecutive(r, return_counts=True)
        return tuple(zip(tasks.tolist(), counts.tolist()))

    with torch.inference_mode(), torch.autocast(**bf16):
        kv, valid = model.encode_prompt(
            prompt, MaskContext(packed, torch.arange(n_tasks), op, segments=segments(torch.arange(n_tasks))))
    b = len(rows)
    states, actions = torch.randn(b, k, 39, generator=g), torch.rand(b, k, 4, generator=g) * 2 - 1
    rtg, steps = torch.rand(b, k, 1, generator=g), (torch.arange(k) + 100).expand(b, k)
    kv, valid = [(a[rows], c[rows]) for a, c in kv], valid[rows]
    ctx = MaskContext(packed, rows, op, segments=segments(rows))

    def run():
        with torch.inference_mode(), torch.autocast(**bf16):
            return model.act(states, actions, rtg, steps, rows, ctx, kv, valid).float().numpy().astype(np.float64)
    return run


def main(argv=None) -> int:
    from harmodt.envs import ShardedVectorEnv
    from harmodt.tasks import MT10

    p = argparse.ArgumentParser(prog="python -m bench.overlap", description=__doc__.split("\n\n")[0])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=50, help="vector steps per way and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--episodes", type=int, default=20, help="episodes per MT10 task (environments: 10 x this)")
    args = p.parse_args(argv)
    tasks = [t for t in MT10 for _ in range(args.episodes)]
    n = len(tasks)
    rows = torch.arange(len(MT10)).repeat_interleave(args.episodes)
    halves_rows = [np.arange(0, n // 2), np.arange(n // 2, n)]  # task-major halves: five tasks each (even --episodes)
    full = policy(rows, len(MT10), args.precision)
    half_policies = [policy(rows[h], len(MT10), args.precision) for h in halves_rows]
    rng = np.random.default_rng(0)

    def simulator():
        envs = ShardedVectorEnv(tasks, list(range(n)), 2)
        envs.reset()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            envs.step(rng.uniform(-1, 1, (n, 4)))
        dt = time.perf_counter() - t0
        envs.close()
        return dt

    def policy_alone():
        t0 = time.perf_counter()
        for _ in range(args.steps):
            full()
        return time.perf_counter() - t0

    def serial():
        envs = ShardedVectorEnv(tasks, list(range(n)), 2)
        envs.reset()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            envs.step(full())
        dt = time.perf_counter() - t0
        envs.close()
        return dt

    def pipelined():
        halves = [Half([tasks[i] for i in h], [int(i) for i in h]) for h in halves_rows]
        t0 = time.perf_counter()
        halves[0].send(half_policies[0]())
        for s in range(args.steps):
            halves[1].send(half_policies[1]())  # half 1's policy ran while half 0 stepped
            halves[0].recv()
            if s + 1 < args.steps:
                halves[0].send(half_policies[0]())  # half 0's policy runs while half 1 steps
            halves[1].recv()
        dt = time.perf_counter() - t0
        for h in halves:
            h.close()
        return dt

    ways = {"simulator": simulator, "policy": policy_alone, "serial": serial, "pipelined": pipelined}
    times = {k: [] for k in ways}
    names = list(ways)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(ways[name]() / args.steps * 1e3)
    print(f"ms per vector step of {n} environments, {args.precision}, "
          f"median of {args.rounds} rounds x {args.steps} steps "
          f"(torch threads {torch.get_num_threads()}):")
    for k, v in times.items():
        print(f"  {k:<10} {statistics.median(v):8.1f} ms   (min {min(v):.1f}, max {max(v):.1f})")
    ratio = statistics.median([p / s for p, s in zip(times["pipelined"], times["serial"])])
    print(f"  pipelined / serial: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
