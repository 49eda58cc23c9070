"""The training step as one CUDA graph (``--cuda-graph``, harmodt/graphed_step.py, on by default on CUDA)
against the eager step, on a GPU (marker ``cuda``; skipped without one), at the paper's size.

* ``test_graphed_step[*]``: wall ms per step of the eager ``--fused`` step and of the graphed
  one, interleaved (20 steps per timed call), for HarmoDT-F and dense Prompt-DT, in fp32 (tf32
  matmuls, ``torch.set_float32_matmul_precision("high")``) and bf16; the GPU time of each (the
  sum of its kernels' durations in ``torch.profiler`` with CUDA activity, per step), its kernels
  and host launch calls per step, the graphed step's top 20 kernels by GPU time, and wall / GPU time.
  Targets: graphed wall <= 3.6 ms (MT50 x 1e6 steps in under an hour on one H100), wall <= 1.3x
  the GPU kernel time.
* ``test_mt50_projection``: one HarmoDT-F mask update at MT50 on the GPU, and the projection of an
  MT50 x 1e6-step run: 1e6 graphed steps plus 1e6 / t_m mask updates (t_m = 5000, Table 6), fp32
  with tf32 matmuls as above; the MT10 graphed step is timed interleaved with the MT50 one, so their
  ratio comes from one moment of one machine. Target: <= 1 hour.
"""

from __future__ import annotations

import time

import pytest
import torch

from harmodt.runtime import float32_matmuls

from .common import (H100_STEP_GOAL_MS, figure, interleave, make_trainer, paired_ratio, record, rounds, step_runner,
                     time_figure)

STEPS = 1_000_000
pytestmark = pytest.mark.cuda


def step_kernels(tr, steps: int = 10) -> dict:
    """The GPU time of ``steps`` training steps by kernel, per step (:func:`bench.profile_step.profile_kernels`:
    the kernels' summed durations, kernels and host launch calls per step, the top 20 kernels)."""
    from .profile_step import profile_kernels

    return profile_kernels(lambda: tr.train_step(tr.sample_tasks()), steps)


def tf32_matmuls():
    """fp32 matmuls on tf32 tensor cores, as ``--precision tf32`` runs them (``F.linear`` and the
    Triton masked linear follow this)."""
    return float32_matmuls("tf32", torch.device("cuda"))


@pytest.mark.parametrize("method", ["harmodt-f", "prompt-dt"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_step(benchmark, method, precision):
    with tf32_matmuls():
        trainers = {"graphed": make_trainer(method, "cuda", True, precision, cuda_graph="on"),
                    "eager": make_trainer(method, "cuda", True, precision)}
        times = interleave(benchmark, {k: step_runner(tr) for k, tr in trainers.items()}, rounds(10), calls=20,
                           warmup=5)
        kernels = {k: step_kernels(tr) for k, tr in trainers.items()}
    gpu = {k: t["gpu_ms_per_step"] for k, t in kernels.items()}
    wall = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    speedup = 1.0 / paired_ratio(times, "graphed", "eager")
    what = f"{method} --fused, {precision}{' (tf32)' if precision == 'fp32' else ''}"
    figs = [time_figure(f"step, graphed, {what}", times, "graphed", target=("<=", H100_STEP_GOAL_MS)),
            time_figure(f"step, eager, {what}", times, "eager"),
            figure(f"GPU kernel time per step, graphed, {what}", gpu["graphed"], "ms"),
            figure(f"GPU kernel time per step, eager, {what}", gpu["eager"], "ms"),
            figure(f"graphed wall / GPU kernel time, {what}", wall["graphed"] / gpu["graphed"], "x",
                   target=("<=", 1.3)),
            figure(f"graphed speed-up over eager, {what}", speedup, "x")]
    record(benchmark, f"one CUDA graph per step, {what}", "cuda", times, figs,
           {"speedup_over_eager": speedup, "wall_over_gpu": wall["graphed"] / gpu["graphed"], "gpu_ms": gpu,
            "kernels_per_step": {k: t["kernels_per_step"] for k, t in kernels.items()},
            "launches_per_step": {k: t["launches_per_step"] for k, t in kernels.items()},
            "top_kernels_graphed": kernels["graphed"]["top"]},
           {"method": method, "precision": precision, "float32_matmul_precision": "high"})


def test_mt50_projection(benchmark):
    with tf32_matmuls():
        _mt50_projection(benchmark)


def _mt50_projection(benchmark):
    from harmodt.tasks import MT10, MT50

    tr = make_trainer("harmodt-f", "cuda", True, "fp32", tasks=MT50, cuda_graph="on")
    run = step_runner(tr)
    run(10)  # warm-up and capture
    run_mt10 = step_runner(make_trainer("harmodt-f", "cuda", True, "fp32", tasks=MT10, cuda_graph="on"))
    run_mt10(10)

    def update() -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        tr.mask_updater()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1e3

    update()  # first-call work (kernel compilation)
    times = interleave(benchmark, {"step": run, "step_mt10": run_mt10}, rounds(5), calls=20, warmup=5)
    times["mask_update"] = [update() for _ in range(rounds(3))]
    step_ms = sorted(times["step"])[len(times["step"]) // 2]
    update_ms = sorted(times["mask_update"])[len(times["mask_update"]) // 2]
    every = tr.cfg.masks.update_every
    hours = (STEPS * step_ms + STEPS // every * update_ms) / 3.6e6
    figs = [time_figure("graphed HarmoDT-F step, MT50, fp32 (tf32)", times, "step", target=("<=", H100_STEP_GOAL_MS)),
            time_figure("graphed HarmoDT-F step, MT10, fp32 (tf32), interleaved", times, "step_mt10"),
            figure("MT50 step / MT10 step", paired_ratio(times, "step", "step_mt10"), "x"),
            time_figure("mask update, MT50", times, "mask_update"),
            figure(f"MT50 x 1e6 steps, mask updates every {every} included", hours, "h", target=("<=", 1.0))]
    record(benchmark, "MT50 x 1e6 steps on one GPU, projected", "cuda", times, figs, {"hours": hours},
           {"update_every": every, "steps": STEPS})
