"""Evaluation benchmarks at the paper's model size (random weights, ERK masks at S = 0.2): the
batched evaluation of ``harmodt.evaluate.evaluate`` with Meta-World v3 environments, and the
mixed-task forward it runs at every environment step, alone.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import harmodt_kernels

from .common import call_runner, devices, figure, interleave, model_and_masks, paired_ratio, record, rounds, time_figure

EVAL_STEPS = int(os.environ.get("HARMODT_BENCH_EVAL_STEPS", "100"))


def _eval_info(tasks) -> dict:
    """What ``evaluate()`` needs besides the weights, for synthetic tasks: unit state statistics and
    two random prompt trajectories per task."""
    rng = np.random.default_rng(0)

    def prompt():
        return {"observations": rng.normal(size=(500, 39)).astype(np.float32),
                "actions": rng.uniform(-1, 1, (500, 4)).astype(np.float32),
                "rewards": rng.uniform(0, 10, 500).astype(np.float32)}

    return {"tasks": list(tasks), "state_mean": {t: np.zeros(39, np.float32) for t in tasks},
            "state_std": {t: np.ones(39, np.float32) for t in tasks},
            "prompts": {t: [prompt(), prompt()] for t in tasks},
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

    model, masks = model_and_masks(len(MT10), device)
    op = harmodt_kernels.select_backends(device, True).masked_linear
    backend = op.backend.name
    info = _eval_info(MT10)
    runs = []

    def run():
        runs.append(evaluate(model, masks, info, MT10, 10, seed=0, backend=op, max_steps=EVAL_STEPS, progress=False))

    benchmark.pedantic(run, rounds=rounds(1), iterations=1)
    sps = [r["env_steps_per_s"] for r in runs]
    med = float(np.median(sps))
    figs = [figure(f"evaluation MT10 x 10 episodes, env-steps/s ({backend})", med, "env-steps/s",
                   lo=min(sps), hi=max(sps), target=(">=", 250.0) if device == "cpu" else None)]
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
    model, masks = model_and_masks(n_tasks, device)
    fused_op = harmodt_kernels.select_backends(device, True).masked_linear
    fused = fused_op.backend.name
    g = torch.Generator().manual_seed(0)
    packed = masks.packed()
    task_rows = torch.arange(n_tasks)
    prompt = {"prompt_states": torch.randn(n_tasks, kp, 39, generator=g),
              "prompt_actions": torch.rand(n_tasks, kp, 4, generator=g) * 2 - 1,
              "prompt_rtg": torch.rand(n_tasks, kp, 1, generator=g),
              "prompt_timesteps": torch.arange(kp).expand(n_tasks, kp).clone(),
              "prompt_mask": torch.ones(n_tasks, kp, dtype=torch.bool)}
    prompt = {key: v.to(device) for key, v in prompt.items()}
    rows = task_rows.repeat_interleave(episodes).to(device)  # task-major, as evaluate() orders episodes
    b = rows.shape[0]
    states, actions = (torch.randn(b, k, 39, generator=g).to(device),
                       (torch.rand(b, k, 4, generator=g) * 2 - 1).to(device))
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
                                   "reference": call_runner(forward(harmodt_kernels.REFERENCE_OPS.masked_linear),
                                                            device)},
                       rounds(2 if device == "cpu" else 20), calls=1 if device == "cpu" else 10,
                       warmup=0 if device == "cpu" else 2)
    speedup = 1.0 / paired_ratio(times, "fused", "reference")
    figs = [time_figure(f"evaluation forward, MT50 x 10 episodes, {fused}", times, "fused"),
            time_figure("evaluation forward, MT50 x 10 episodes, reference", times, "reference"),
            figure(f"evaluation forward: {fused} speed-up over reference", speedup, "x",
                   target=(">=", 1.5) if device == "cuda" else None)]
    record(benchmark, "mixed-task evaluation forward, MT50 x 10 episodes", device, times, figs,
           {"fused_speedup_over_reference": speedup}, {"backend": fused, "rows": b})


FLOOR_EPISODES = 20  # the studies' final evaluation: MT10 x 20 episodes
FLOOR_TARGET = 2.0  # evaluate()'s time over the simulator's alone


def native_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX)."""
    from harmodt.runtime import bf16_matmul_note

    return bf16_matmul_note() is None


@pytest.mark.parametrize("device", devices())
def test_eval_floor_mt10(benchmark, device):
    """The evaluation floor at the studies' setting, MT10 x 20 episodes (200 environments): the
    simulator alone (the vector of Meta-World envs ``evaluate()`` builds, sharded over the cores
    as it shards them, stepped with uniform random actions) against ``evaluate()`` itself with the
    studies' model (3 layers, 4 heads, width 128, random weights and ERK masks, fp32) on the same
    tasks, episodes and environment seeds, over ``HARMODT_BENCH_EVAL_STEPS`` steps; rounds
    interleaved; with ``--precision bf16`` too where the CPU has bf16 instructions. Target:
    evaluate() (fp32) within 2.0x of the simulator's time (full episodes:
    ``HARMODT_BENCH_EVAL_STEPS=500``)."""
    if EVAL_STEPS <= 0:
        pytest.skip("HARMODT_BENCH_EVAL_STEPS=0")
    import time

    from harmodt.config import ModelConfig
    from harmodt.envs import ShardedVectorEnv, make_vector_env
    from harmodt.evaluate import evaluate
    from harmodt.tasks import MT10

    model, masks = model_and_masks(len(MT10), device, ModelConfig(n_layer=3, n_head=4, n_embd=128))
    op = harmodt_kernels.select_backends(device, True).masked_linear
    info = _eval_info(MT10)
    b = len(MT10) * FLOOR_EPISODES
    env_tasks = [t for t in MT10 for _ in range(FLOOR_EPISODES)]
    env_seeds = list(range(b))  # evaluate(seed=0)'s: seed * 100_003 + row
    shards = 2 if (os.cpu_count() or 1) >= 2 else 1

    # seconds per env step of the whole vector, building excluded as evaluate() excludes it
    def simulator(n: int) -> float:
        total = 0.0
        for _ in range(n):
            envs = (ShardedVectorEnv(env_tasks, env_seeds, shards) if shards > 1
                    else make_vector_env(env_tasks, env_seeds))
            envs.reset(seed=None)
            act = np.random.default_rng(1).uniform(-1, 1, (EVAL_STEPS, b, 4))
            t = time.perf_counter()
            for s in range(EVAL_STEPS):
                envs.step(act[s])
            total += time.perf_counter() - t
            envs.close()
        return total / n / (EVAL_STEPS * b) * 1e3

    def policy(precision: str):
        def run(n: int) -> float:
            total = 0.0
            for _ in range(n):
                r = evaluate(model, masks, info, MT10, FLOOR_EPISODES, seed=0, backend=op, max_steps=EVAL_STEPS,
                             progress=False, precision=precision)
                total += r["seconds"]
            return total / n / (EVAL_STEPS * b) * 1e3
        return run

    ways = {"evaluate": policy("fp32"), "simulator": simulator}
    if device == "cpu" and native_bf16():
        ways["evaluate_bf16"] = policy("bf16")
    times = interleave(benchmark, ways, rounds(2), calls=1, warmup=0)
    times = {k: [1.0 / v * 1e3 for v in vs] for k, vs in times.items()}  # env-steps/s
    # evaluate's time over the simulator's
    ratio = float(np.median([s / e for e, s in zip(times["evaluate"], times["simulator"])]))
    figs = [time_figure(f"simulator alone, MT10 x {FLOOR_EPISODES} episodes, random actions, env-steps/s", times,
                        "simulator", unit="env-steps/s"),
            time_figure(f"evaluate(), MT10 x {FLOOR_EPISODES} episodes, 3 x 128 model ({op.backend.name}), env-steps/s",
                        times, "evaluate", unit="env-steps/s"),
            figure("evaluate() time over the simulator's", ratio, "x", target=("<=", FLOOR_TARGET))]
    if "evaluate_bf16" in times:
        ratio16 = float(np.median([s / e for e, s in zip(times["evaluate_bf16"], times["simulator"])]))
        figs += [time_figure(f"evaluate(), bf16, MT10 x {FLOOR_EPISODES} episodes, env-steps/s", times, "evaluate_bf16",
                             unit="env-steps/s"),
                 figure("evaluate() bf16 time over the simulator's", ratio16, "x", target=("<=", FLOOR_TARGET))]
    record(benchmark, f"evaluation floor, MT10 x {FLOOR_EPISODES} episodes", device, times, figs,
           {"evaluate_over_simulator": ratio},
           {"backend": op.backend.name, "horizon": EVAL_STEPS, "rows": b, "shards": shards}, unit="env-steps/s")


CHECKPOINT = os.environ.get("HARMODT_BENCH_CHECKPOINT", "")


def test_eval_trained_checkpoint(benchmark):
    """On a trained checkpoint (``HARMODT_BENCH_CHECKPOINT``; skipped without), its tasks x 20
    episodes, full 500-step episodes, seed 12345 (the studies' final evaluation), on the CPU:
    the wall time of ``evaluate(stop_at_success=True)`` against today's full episodes on the same
    seeds (their success rates must agree: checked and recorded), and the success rate of
    ``--precision bf16`` against fp32 on the same goals where the CPU has bf16 instructions, with
    the binomial standard error of the difference as its noise. One round each."""
    if not CHECKPOINT:
        pytest.skip("HARMODT_BENCH_CHECKPOINT unset (a trained checkpoint.pt)")
    from harmodt.evaluate import evaluate, load_checkpoint

    model, masks, info, cfg, _ = load_checkpoint(CHECKPOINT, "cpu")
    op = harmodt_kernels.select_backends(torch.device("cpu"), True).masked_linear
    tasks = list(info["tasks"])
    kw = dict(backend=op, vote_threshold=cfg["masks"]["vote_threshold"], progress=False)
    runs = {}

    def run(name, **extra):
        def go(n: int) -> float:
            r = evaluate(model, masks, info, tasks, FLOOR_EPISODES, 12345, **kw, **extra)
            runs[name] = r
            return r["seconds"] * 1e3
        return go

    ways = {"full": run("full"), "stop_at_success": run("stop_at_success", stop_at_success=True)}
    if native_bf16():
        ways["bf16"] = run("bf16", precision="bf16")
    times = interleave(benchmark, ways, 1, calls=1, warmup=0)
    times = {k: [v / 1e3 for v in vs] for k, vs in times.items()}  # seconds
    full, stop = runs["full"], runs["stop_at_success"]
    same = {t: r["success"] for t, r in full["tasks"].items()} == {t: r["success"] for t, r in stop["tasks"].items()}
    figs = [time_figure(f"evaluate(), {len(tasks)} tasks x {FLOOR_EPISODES} episodes, full episodes, s", times, "full",
                        unit="s"),
            time_figure("the same with stop_at_success, s", times, "stop_at_success", unit="s"),
            figure("stop_at_success wall time over full episodes", times["stop_at_success"][0] / times["full"][0], "x"),
            figure("mean success, full episodes", full["mean_success"], ""),
            figure("mean success, stop_at_success (must equal full)", stop["mean_success"], "")]
    derived = {"stop_over_full": times["stop_at_success"][0] / times["full"][0], "same_success": same,
               "env_steps": {"full": full["env_steps"], "stop_at_success": stop["env_steps"]}}
    if "bf16" in runs:
        n = len(tasks) * FLOOR_EPISODES
        p32, p16 = full["mean_success"], runs["bf16"]["mean_success"]
        noise = float(np.sqrt((p32 * (1 - p32) + p16 * (1 - p16)) / n))
        figs += [figure("mean success, bf16 policy", p16, ""), figure("bf16 - fp32 mean success", p16 - p32, ""),
                 figure("standard error of that difference (independent binomial episodes)", noise, ""),
                 time_figure("evaluate() bf16, full episodes, s", times, "bf16", unit="s")]
        derived.update(bf16_minus_fp32=p16 - p32, noise=noise,
                       per_task={t: {"fp32": full["tasks"][t]["success"], "bf16": runs["bf16"]["tasks"][t]["success"]}
                                 for t in tasks})
    record(benchmark, f"trained checkpoint, {len(tasks)} tasks x {FLOOR_EPISODES} episodes", "cpu", times, figs,
           derived, {"checkpoint": CHECKPOINT, "tasks": tasks}, unit="s")
