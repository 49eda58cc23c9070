"""The three kernel ops (``kernels.masked_linear``, ``masked_adamw_``, ``harmony_select``) on the
device's fused backend (native ``cpu`` on a CPU, ``triton`` on CUDA) against ``reference``, at
the paper model's shapes: masked matrices qkv 256->768, attention projection 256->256, fc
256->1024, MLP projection 1024->256 (P = 4.72 M over six layers), ERK-like random masks at S = 0.2.

Each benchmark times both backends interleaved round by round (bench/common.py) and records the
fused backend's speed-up. The Triton interpreter (``TRITON_INTERPRET=1`` on a CPU) is not
benchmarked: it checks correctness, not speed.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from harmodt.masks import IMPORTANCE

from .common import (ETA_MAX, LAMBDA, LAYERS, P_MODEL, SPARSITY, TRAIN_ROWS, EVAL_TOKENS, call_runner, devices, figure, interleave,
                     paired_ratio, record, rounds, time_figure)

EVAL_TASKS, EVAL_EPISODES = 50, 10


def fused_backend(device: str) -> str:
    """The backend ``--fused`` picks on ``device``; skips the benchmark when it cannot run."""
    want = "triton" if device == "cuda" else "cpu"
    why = kernels.backend_reason(want, device)
    if why is not None:
        pytest.skip(f"the {want} backend cannot run: {why}")
    return want


def _layer(k: int, n: int, t: int, device, dtype, g: torch.Generator, grad: bool):
    w = (torch.randn(n, k, generator=g) * 0.05).to(device, dtype).requires_grad_(grad)
    b = torch.randn(n, generator=g).to(device, dtype).requires_grad_(grad)
    masks = kernels.pack_masks(torch.rand(t, n, k, generator=g) >= SPARSITY).to(device)
    return w, b, masks


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("device", devices())
def test_masked_linear_train(benchmark, device, precision):
    """ms for the forward and backward (dX, dW, db) of one block's four masked matrices at a
    training batch's shape (600 rows of one task, ``task_ids`` of shape [1]), fused backend
    against the reference. Target: fused >= 1.0x the reference."""
    backend = fused_backend(device)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    layers = []
    for k, n in LAYERS.values():
        x = torch.randn(TRAIN_ROWS, k, generator=g).to(device, dtype).requires_grad_(True)
        w, b, masks = _layer(k, n, 5, device, dtype, g, True)
        layers.append((x, w, b, masks, torch.randn(TRAIN_ROWS, n, generator=g).to(device, dtype)))
    ids = torch.tensor([3], device=device)

    def step(be):
        def run():
            for x, w, b, masks, gy in layers:
                x.grad = w.grad = b.grad = None
                kernels.masked_linear(x, w, b, masks, ids, backend=be).backward(gy)
        return run

    times = interleave(benchmark, {"fused": call_runner(step(backend), device), "reference": call_runner(step("reference"), device)},
                       rounds(20), calls=1 if device == "cpu" else 20, warmup=3)
    speedup = 1.0 / paired_ratio(times, "fused", "reference")
    figs = [time_figure(f"masked_linear fwd+bwd, one block, 600 rows, {precision}, {backend}", times, "fused"),
            time_figure(f"masked_linear fwd+bwd, one block, 600 rows, {precision}, reference", times, "reference"),
            figure(f"masked_linear fwd+bwd {precision}: {backend} speed-up over reference", speedup, "x", target=(">=", 1.0))]
    record(benchmark, f"masked_linear training shapes, {precision}", device, times, figs, {"fused_speedup_over_reference": speedup},
           {"backend": backend})


@pytest.mark.parametrize("device", devices())
def test_masked_linear_eval(benchmark, device):
    """ms for the mixed-task forward of one block's four masked matrices at evaluation's shape,
    MT50 x 10 episodes x 59 history tokens = 29,500 rows of 50 tasks in task order (fp32, no
    grad), fused backend against the reference (which materializes ``W * M`` for each of the 50
    tasks). Target: fused >= 1.5x the reference on a GPU."""
    backend = fused_backend(device)
    g = torch.Generator().manual_seed(1)
    ids = torch.arange(EVAL_TASKS).repeat_interleave(EVAL_EPISODES * EVAL_TOKENS).to(device)
    layers = []
    for k, n in LAYERS.values():
        x = torch.randn(ids.shape[0], k, generator=g).to(device)
        w, b, masks = _layer(k, n, EVAL_TASKS, device, torch.float32, g, False)
        layers.append((x, w, b, masks))

    def fwd(be):
        def run():
            with torch.no_grad():
                for x, w, b, masks in layers:
                    kernels.masked_linear(x, w, b, masks, ids, backend=be)
        return run

    times = interleave(benchmark, {"fused": call_runner(fwd(backend), device), "reference": call_runner(fwd("reference"), device)},
                       rounds(3 if device == "cpu" else 20), calls=1 if device == "cpu" else 10, warmup=1)
    speedup = 1.0 / paired_ratio(times, "fused", "reference")
    figs = [time_figure(f"masked_linear eval forward, one block, 29,500 rows x 50 tasks, {backend}", times, "fused"),
            time_figure("masked_linear eval forward, one block, 29,500 rows x 50 tasks, reference", times, "reference"),
            figure(f"masked_linear eval forward: {backend} speed-up over reference", speedup, "x",
                   target=(">=", 1.5) if device == "cuda" else None)]
    record(benchmark, "masked_linear mixed-task evaluation forward", device, times, figs, {"fused_speedup_over_reference": speedup},
           {"backend": backend, "rows": int(ids.shape[0])})


@pytest.mark.parametrize("device", devices())
def test_masked_adamw(benchmark, device):
    """ms for one masked AdamW step over every parameter of the paper's model (5.29 M, the 24
    masked matrices through one task's packed mask), fused backend against the reference (a loop
    of per-parameter ops). Target: fused >= 1.0x the reference."""
    from harmodt.config import ModelConfig
    from harmodt.methods import build_model

    backend = fused_backend(device)
    model = build_model(ModelConfig(), 5, "harmodt-f").to(device)
    masked = set(model.masked_weights().values())
    g = torch.Generator().manual_seed(2)
    params = [p.detach().clone() for p in model.parameters()]
    grads = [torch.randn(p.shape, generator=g).to(device) * 1e-3 for p in params]
    masks = [kernels.pack_masks(torch.rand(p.shape, generator=g) >= SPARSITY).to(device) if q in masked else None
             for p, q in zip(params, model.parameters())]

    def opt(be):
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        steps = [torch.zeros((), device=device) for _ in params]
        coef = torch.tensor(0.5, device=device)

        def run():
            kernels.masked_adamw_(params, grads, m, v, masks, steps, lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-4,
                                  grad_scale=coef, backend=be)
        return run

    times = interleave(benchmark, {"fused": call_runner(opt(backend), device), "reference": call_runner(opt("reference"), device)},
                       rounds(20), calls=1 if device == "cpu" else 20, warmup=3)
    speedup = 1.0 / paired_ratio(times, "fused", "reference")
    n = sum(p.numel() for p in params)
    figs = [time_figure(f"masked AdamW, {n / 1e6:.2f} M parameters, {backend}", times, "fused"),
            time_figure(f"masked AdamW, {n / 1e6:.2f} M parameters, reference", times, "reference"),
            figure(f"masked AdamW: {backend} speed-up over reference", speedup, "x", target=(">=", 1.0))]
    record(benchmark, "masked AdamW step", device, times, figs, {"fused_speedup_over_reference": speedup},
           {"backend": backend, "parameters": n})


def harmony_inputs(t: int, device, g: torch.Generator):
    """Algorithm 2's [T, P] harmony and recovery scores (Fisher importance, lambda = 10) of random
    masked and dense gradients, and packed masks of density 0.8 (row by row: no [T, P] bool
    temporaries)."""
    masks = torch.empty(t, kernels.num_words(P_MODEL), dtype=torch.int32)
    masked_grads = torch.empty(t, P_MODEL)
    for i in range(t):
        active = torch.rand(P_MODEL, generator=g) >= SPARSITY
        masks[i] = kernels.pack_masks(active)
        masked_grads[i] = torch.randn(P_MODEL, generator=g) * active
    grads = torch.randn(t, P_MODEL, generator=g)
    masked_grads, grads = masked_grads.to(device), grads.to(device)
    ghat = masked_grads.mean(0)  # the scores as harmodt.masks.TaskMasks.update computes them
    return masked_grads * ghat + LAMBDA * IMPORTANCE["fisher"](masked_grads, None), grads * ghat, masks.to(device)


@pytest.mark.parametrize("tasks", [10, 50], ids=["MT10", "MT50"])
@pytest.mark.parametrize("device", devices())
def test_harmony_select(benchmark, device, tasks):
    """ms for one mask update's selection (``harmony_select``: Algorithm 2's mask and recover
    choice for every task given its scores, eta_max = 100 weights) over P = 4.72 M
    weights at MT10 and MT50, on every backend that runs on the device (the fused one timed by
    pytest-benchmark); on CUDA also each backend's peak extra memory. Target: fused >= 5x the
    reference at MT50."""
    backend = fused_backend(device)
    names = [backend] + [b for b in kernels.available_backends(device) if b not in (backend, "triton")]
    if "reference" not in names:
        names.append("reference")
    args = harmony_inputs(tasks, device, torch.Generator().manual_seed(tasks))
    peak = {}

    def sel(be):
        def run():
            return kernels.harmony_select(*args, ETA_MAX, backend=be)
        return run

    if device == "cuda":
        for be in names:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            sel(be)()
            torch.cuda.synchronize()
            peak[be] = (torch.cuda.max_memory_allocated() - base) / 2**20
    n_rounds = rounds(3 if tasks == 10 else 1) if device == "cpu" else rounds(10)
    times = interleave(benchmark, {be: call_runner(sel(be), device) for be in names}, n_rounds, calls=1, warmup=0 if device == "cpu" else 1)
    speedup = 1.0 / paired_ratio(times, backend, "reference")
    figs = [time_figure(f"harmony_select, {tasks} tasks x 4.72 M, {be}", times, be) for be in names]
    figs.append(figure(f"harmony_select {tasks} tasks: {backend} speed-up over reference", speedup, "x",
                       target=(">=", 5.0) if tasks == 50 else None))
    figs += [figure(f"harmony_select {tasks} tasks: peak extra memory, {be}", mib, "MiB") for be, mib in peak.items()]
    record(benchmark, f"harmony_select at {tasks} tasks", device, times, figs, {"fused_speedup_over_reference": speedup},
           {"backends": names, "peak_extra_MiB": peak, "P": P_MODEL})
