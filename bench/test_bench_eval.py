"""Evaluation throughput at the paper's model size (Table 6; random weights, ERK masks at S=0.2):
MT10 x 10 episodes in one batch vs a batch-1 episode-by-episode loop over the same model,
measured in the same run. Targets: batched >= 250 env-steps/s in fp32 (simulator included) and
>= 2.5x the batch-1 loop.

Both paths run a shortened horizon (HARMODT_BENCH_EVAL_STEPS, default 100 steps; the history
window is full from step 20 on, so the per-step cost is the steady-state one); env-steps/s is
reported as measured on that horizon.
"""

from __future__ import annotations

import os

import numpy as np
import torch

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harmodt.config import ModelConfig
from harmodt.evaluate import evaluate
from harmodt.masks import TaskMasks
from harmodt.model import build_model
from harmodt.tasks import MT10

STEPS = int(os.environ.get("HARMODT_BENCH_EVAL_STEPS", "100"))


def _setup():
    torch.manual_seed(0)
    cfg = ModelConfig()
    model = build_model(cfg, len(MT10), "harmodt-f")
    shapes = {n: tuple(w.shape) for n, w in model.masked_weights().items()}
    masks = TaskMasks.erk(shapes, len(MT10), 0.2, torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    prompt = lambda: {"observations": rng.normal(size=(500, 39)).astype(np.float32),  # noqa: E731
                      "actions": rng.uniform(-1, 1, (500, 4)).astype(np.float32), "rewards": rng.uniform(0, 10, 500).astype(np.float32)}
    info = {"tasks": list(MT10), "state_mean": {t: np.zeros(39, np.float32) for t in MT10},
            "state_std": {t: np.ones(39, np.float32) for t in MT10}, "prompts": {t: [prompt(), prompt()] for t in MT10},
            "rtg_scale": 1000.0, "target_return": 4500.0}
    return model, masks, info


def test_eval_batched_vs_batch1(benchmark):
    model, masks, info = _setup()
    from test_bench_train import ANCHOR_GFLOPS, ANCHOR_RATES, anchor_gflops, gemm_gflops

    def batch1():  # batch-1 loop: 2 episodes (of 2 tasks), one at a time
        return evaluate(model, masks, info, MT10[:2], 1, seed=0, batch_size=1, max_steps=STEPS, progress=False)["env_steps_per_s"]

    res = {}

    def batched():
        res.update(evaluate(model, masks, info, MT10, 10, seed=0, max_steps=STEPS, progress=False))

    # The batch-1 loop runs right before and right after the batched run and the ratio is taken
    # to their mean, so a drift of the machine's speed during the run hits both sides alike.
    probe, anchor = [gemm_gflops()], [anchor_gflops("fp32")]
    seq = [batch1()]
    benchmark.pedantic(batched, rounds=1, iterations=1)
    seq.append(batch1())
    probe.append(gemm_gflops())
    anchor.append(anchor_gflops("fp32"))
    gflops = sum(probe) / len(probe)
    at_anchor_rate = res["env_steps_per_s"] * ANCHOR_RATES["fp32"] / (sum(anchor) / len(anchor))
    seq_mean = sum(seq) / len(seq)
    ratio = res["env_steps_per_s"] / seq_mean
    benchmark.extra_info.update({
        "gemm_gflops": round(gflops, 1),
        "batched_env_steps_per_s": round(res["env_steps_per_s"], 1),
        "batch1_env_steps_per_s": round(seq_mean, 1),
        "batch1_before_after": [round(x, 1) for x in seq],
        "ratio_batched_over_batch1": round(ratio, 2),
        # as the training benchmarks scale step times: the model's share of a step is GEMM-bound
        "batched_env_steps_per_s_at_anchor_speed": round(res["env_steps_per_s"] * ANCHOR_GFLOPS / gflops, 1),
        "anchor_gflops_fp32": round(sum(anchor) / len(anchor), 1),  # a 2048^3 fp32 matmul, the anchor's own measurement
        "batched_env_steps_per_s_at_anchor_rate": round(at_anchor_rate, 1),
        "horizon_steps": STEPS,
        "rows": 100,
        "targets": ">= 250 env-steps/s batched, >= 2.5x batch-1",
    })
    print(f"\nbatched {res['env_steps_per_s']:.0f} env-steps/s, batch-1 {seq_mean:.0f} env-steps/s (before {seq[0]:.0f}, after {seq[1]:.0f}), "
          f"ratio {ratio:.2f} (horizon {STEPS} steps; GEMM probe {gflops:.0f} GFLOP/s, anchor {ANCHOR_GFLOPS:.0f}: "
          f"batched {res['env_steps_per_s'] * ANCHOR_GFLOPS / gflops:.0f} env-steps/s at the anchor's speed; at the anchor's 2048^3 "
          f"fp32 rate (probe {sum(anchor) / len(anchor):.0f}, anchor {ANCHOR_RATES['fp32']:.0f}): {at_anchor_rate:.0f} env-steps/s)")
    assert res["env_steps"] == 100 * STEPS
