"""Evaluation benchmarks at the paper's model size (random weights, ERK masks at S = 0.2): the
batched evaluation of ``harmodt.evaluate.evaluate`` with Meta-World v3 environments, and the
mixed-task forward it runs at every environment step, alone.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import kernels

from .common import call_runner, devices, figure, interleave, paired_ratio, record, rounds, time_figure

EVAL_STEPS = int(os.environ.get("HARMODT_BENCH_EVAL_STEPS", "100"))


def _model_and_masks(n_tasks: int, device, model_cfg=None):
    """A random HarmoDT-F model (the paper's size unless ``model_cfg``) and ERK masks at S = 0.2."""
    from harmodt.config import ModelConfig
    from harmodt.masks import TaskMasks
    from harmodt.methods import build_model

    torch.manual_seed(0)
    model = build_model(model_cfg or ModelConfig(), n_tasks, "harmodt-f").to(device).eval()
    shapes = {n: tuple(w.shape) for n, w in model.masked_weights().items()}
    masks = TaskMasks.erk(shapes, n_tasks, 0.2, torch.Generator().manual_seed(0), device=device)
    return model, masks


def _eval_info(tasks) -> dict:
    """What ``evaluate()`` needs besides the weights, for synthetic tasks: unit state statistics and
    two random prompt trajectories per task."""
    rng = np.random.default_rng(0)

    def prompt():
        return {"observations": rng.normal(size=(500, 39)).astype(np.float32), "actions": rng.uniform(-1, 1, (500, 4)).astype(np.float32),
                "rewards": rng.uniform(0, 10, 500).astype(np.float32)}

    return {"tasks": list(tasks), "state_mean": {t: np.zeros(39, np.float32) for t in tasks},
            "state_std": {t: np.ones(39, np.float32) for t in tasks}, "prompts": {t: [prompt(), prompt()] for t in tasks},
            "rtg_scale": 1000.0, "target_return": 4500.0}


@pytest.mark.parametrize("device", devices())
def test_eval_mt10(benchmark, device):
    """Env-steps/s of ``evaluate()`` on MT10 x 10 episodes (100 environments stepping together,
    one batched forward per step through each row's task mask on the ``--fused`` backend, fp32),
    simulator included, over a horizon of ``HARMODT_BENCH_EVAL_STEPS`` steps (default 100; the
    history window is full from step 20 on; 0 skips this benchmark). Target: >= 250 env-steps/s
    on the CPU."""
    if EVAL_STEPS <= 0:
        pytest.skip("HARMODT_BENCH_EVAL_STEPS=0")
    from harmodt.evaluate import evaluate
    from harmodt.tasks import MT10

    model, masks = _model_and_masks(len(MT10), device)
    op = kernels.select_backends(device, True).masked_linear
    backend = op.backend.name
    info = _eval_info(MT10)
    runs = []

    def run():
        runs.append(evaluate(model, masks, info, MT10, 10, seed=0, backend=op, max_steps=EVAL_STEPS, progress=False))

    benchmark.pedantic(run, rounds=rounds(1), iterations=1)
    sps = [r["env_steps_per_s"] for r in runs]
    med = float(np.median(sps))
    figs = [figure(f"evaluation MT10 x 10 episodes, env-steps/s ({backend})", med, "env-steps/s", lo=min(sps), hi=max(sps),
                   target=(">=", 250.0) if device == "cpu" else None)]
    record(benchmark, "batched evaluation, MT10 x 10 episodes", device, None, figs, {"env_steps_per_s": med},
           {"backend": backend, "horizon": EVAL_STEPS, "rows": 100, "setup_seconds": [r["setup_seconds"] for r in runs],
            "seconds": [r["seconds"] for r in runs]}, unit="env-steps/s")


@pytest.mark.parametrize("device", devices())
def test_eval_forward_mt50(benchmark, device):
    """ms per evaluation forward (``PromptDT.act``: 500 rows = MT50 x 10 episodes, a full 20-step
    history, the prompt's cached keys and values, each row through its task's mask; fp32, no
    grad), ``--fused`` backend against the reference. Target: fused >= 1.5x the reference on a
    GPU."""
    from harmodt.model import MaskContext

    n_tasks, episodes, k, kp = 50, 10, 20, 5
    model, masks = _model_and_masks(n_tasks, device)
    fused_op = kernels.select_backends(device, True).masked_linear
    fused = fused_op.backend.name
    g = torch.Generator().manual_seed(0)
    packed = masks.packed()
    task_rows = torch.arange(n_tasks)
    prompt = {"prompt_states": torch.randn(n_tasks, kp, 39, generator=g), "prompt_actions": torch.rand(n_tasks, kp, 4, generator=g) * 2 - 1,
              "prompt_rtg": torch.rand(n_tasks, kp, 1, generator=g), "prompt_timesteps": torch.arange(kp).expand(n_tasks, kp).clone(),
              "prompt_mask": torch.ones(n_tasks, kp, dtype=torch.bool)}
    prompt = {key: v.to(device) for key, v in prompt.items()}
    rows = task_rows.repeat_interleave(episodes).to(device)  # task-major, as evaluate() orders episodes
    b = rows.shape[0]
    states, actions = torch.randn(b, k, 39, generator=g).to(device), (torch.rand(b, k, 4, generator=g) * 2 - 1).to(device)
    rtg, steps = torch.rand(b, k, 1, generator=g).to(device), (torch.arange(k) + 100).expand(b, k).to(device)

    def forward(op):
        with torch.inference_mode():
            kv, valid = model.encode_prompt(prompt, MaskContext(packed, task_rows.to(device), op))
        kv = [(a[rows], c[rows]) for a, c in kv]
        valid = valid[rows]
        ctx = MaskContext(packed, rows, op)

        def run():
            with torch.inference_mode():
                return model.act(states, actions, rtg, steps, rows, ctx, kv, valid)
        return run

    times = interleave(benchmark, {"fused": call_runner(forward(fused_op), device),
                                   "reference": call_runner(forward(kernels.REFERENCE_OPS.masked_linear), device)},
                       rounds(2 if device == "cpu" else 20), calls=1 if device == "cpu" else 10, warmup=0 if device == "cpu" else 2)
    speedup = 1.0 / paired_ratio(times, "fused", "reference")
    figs = [time_figure(f"evaluation forward, MT50 x 10 episodes, {fused}", times, "fused"),
            time_figure("evaluation forward, MT50 x 10 episodes, reference", times, "reference"),
            figure(f"evaluation forward: {fused} speed-up over reference", speedup, "x", target=(">=", 1.5) if device == "cuda" else None)]
    record(benchmark, "mixed-task evaluation forward, MT50 x 10 episodes", device, times, figs, {"fused_speedup_over_reference": speedup},
           {"backend": fused, "rows": b})


FLOOR_EPISODES = 20  # the studies' final evaluation: MT10 x 20 episodes
FLOOR_TARGET = 1.5  # evaluate()'s time over the simulator's alone


@pytest.mark.parametrize("device", devices())
def test_eval_floor_mt10(benchmark, device):
    """The evaluation floor at the studies' setting, MT10 x 20 episodes (200 environments): the
    simulator alone (the vector of Meta-World envs ``evaluate()`` builds, sharded over the cores
    as it shards them, stepped with uniform random actions) against ``evaluate()`` itself with the
    studies' model (3 layers, 4 heads, width 128, random weights and ERK masks, fp32) on the same
    tasks, episodes and environment seeds, over ``HARMODT_BENCH_EVAL_STEPS`` steps; rounds
    interleaved. Target: evaluate() within 1.5x of the simulator's time."""
    if EVAL_STEPS <= 0:
        pytest.skip("HARMODT_BENCH_EVAL_STEPS=0")
    import time

    from harmodt.config import ModelConfig
    from harmodt.envs import ShardedVectorEnv, make_vector_env
    from harmodt.evaluate import evaluate
    from harmodt.tasks import MT10

    model, masks = _model_and_masks(len(MT10), device, ModelConfig(n_layer=3, n_head=4, n_embd=128))
    op = kernels.select_backends(device, True).masked_linear
    info = _eval_info(MT10)
    b = len(MT10) * FLOOR_EPISODES
    env_tasks = [t for t in MT10 for _ in range(FLOOR_EPISODES)]
    env_seeds = list(range(b))  # evaluate(seed=0)'s: seed * 100_003 + row
    shards = 2 if (os.cpu_count() or 1) >= 2 else 1

    def simulator(n: int) -> float:  # seconds per env step of the whole vector, building excluded as evaluate() excludes it
        total = 0.0
        for _ in range(n):
            envs = ShardedVectorEnv(env_tasks, env_seeds, shards) if shards > 1 else make_vector_env(env_tasks, env_seeds)
            envs.reset(seed=None)
            act = np.random.default_rng(1).uniform(-1, 1, (EVAL_STEPS, b, 4))
            t = time.perf_counter()
            for s in range(EVAL_STEPS):
                envs.step(act[s])
            total += time.perf_counter() - t
            envs.close()
        return total / n / (EVAL_STEPS * b) * 1e3

    def policy(n: int) -> float:
        total = 0.0
        for _ in range(n):
            r = evaluate(model, masks, info, MT10, FLOOR_EPISODES, seed=0, backend=op, max_steps=EVAL_STEPS, progress=False)
            total += r["seconds"]
        return total / n / (EVAL_STEPS * b) * 1e3

    times = interleave(benchmark, {"evaluate": policy, "simulator": simulator}, rounds(2), calls=1, warmup=0)
    times = {k: [1.0 / v * 1e3 for v in vs] for k, vs in times.items()}  # env-steps/s
    ratio = float(np.median([s / e for e, s in zip(times["evaluate"], times["simulator"])]))  # evaluate's time over the simulator's
    figs = [time_figure(f"simulator alone, MT10 x {FLOOR_EPISODES} episodes, random actions, env-steps/s", times, "simulator",
                        unit="env-steps/s"),
            time_figure(f"evaluate(), MT10 x {FLOOR_EPISODES} episodes, 3 x 128 model ({op.backend.name}), env-steps/s", times, "evaluate",
                        unit="env-steps/s"),
            figure("evaluate() time over the simulator's", ratio, "x", target=("<=", FLOOR_TARGET))]
    record(benchmark, f"evaluation floor, MT10 x {FLOOR_EPISODES} episodes", device, times, figs, {"evaluate_over_simulator": ratio},
           {"backend": op.backend.name, "horizon": EVAL_STEPS, "rows": b, "shards": shards}, unit="env-steps/s")
