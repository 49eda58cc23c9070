"""The three kernel ops (``harmodt_kernels.masked_linear``, ``masked_adamw_``, ``harmony_select``) on the
device's fused backend (native ``cpu`` on a CPU, ``triton`` on CUDA) against ``reference``, at
the paper model's shapes: masked matrices qkv 256->768, attention projection 256->256, fc
256->1024, MLP projection 1024->256 (P = 4.72 M over six layers), ERK-like random masks at S = 0.2.

Each benchmark times both backends interleaved round by round (bench/common.py) and records the
fused backend's speed-up; the masked linear also against a dense ``F.linear`` of the same shapes.
Beside wall time, the masked-linear and harmony_select benchmarks report GPU time (CUDA events
around each round's calls) and kernel time (``torch.profiler``'s kernel durations); on a CPU those
columns are wall time. The Triton interpreter (``TRITON_INTERPRET=1`` on a CPU) is not
benchmarked: it checks correctness, not speed.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import harmodt_kernels
from harmodt.masks import IMPORTANCE

from .common import (ETA_MAX, EVAL_TOKENS, LAMBDA, LAYERS, P_MODEL, SPARSITY, TRAIN_ROWS, Timed, devices, figure,
                     gpu_figures, gpu_times, interleave, kernel_time, paired_ratio, record, rounds, stats, time_figure)

EVAL_TASKS, EVAL_EPISODES = 50, 10


def fused_backend(device: str) -> str:
    """The backend ``--fused`` picks on ``device``; skips the benchmark when it cannot run."""
    want = "triton" if device == "cuda" else "cpu"
    why = harmodt_kernels.backend_reason(want, device)
    if why is not None:
        pytest.skip(f"the {want} backend cannot run: {why}")
    return want


def _layer(k: int, n: int, t: int, device, dtype, g: torch.Generator, grad: bool):
    w = (torch.randn(n, k, generator=g) * 0.05).to(device, dtype).requires_grad_(grad)
    b = torch.randn(n, generator=g).to(device, dtype).requires_grad_(grad)
    masks = harmodt_kernels.pack_masks(torch.rand(t, n, k, generator=g) >= SPARSITY).to(device)
    return w, b, masks


@contextlib.contextmanager
def matmul_precision(precision: str, device: str):
    """fp32 on CUDA runs with tf32 products ("high"), as F.linear and the kernels then both do."""
    before = torch.get_float32_matmul_precision()
    if precision == "fp32" and device == "cuda":
        torch.set_float32_matmul_precision("high")
    try:
        yield "tf32" if precision == "fp32" and device == "cuda" else precision
    finally:
        torch.set_float32_matmul_precision(before)


def _masked_vs_dense(benchmark, device, what: str, layers, ids, train: bool, n_rounds: int, calls: int,
                     warmup: int) -> tuple:
    """Interleaved rounds of the fused backend, the reference and a dense ``F.linear`` (no mask)
    over ``layers`` [(x, w, b, masks, dy)], forward + backward when ``train``; then each one's
    kernel time. Returns (wall times, Timed variants, kernel times)."""
    backend = fused_backend(device)

    def masked(be):
        def run():
            with torch.set_grad_enabled(train):
                for x, w, b, masks, gy in layers:
                    x.grad = w.grad = b.grad = None
                    y = harmodt_kernels.masked_linear(x, w, b, masks, ids, backend=be)
                    if train:
                        y.backward(gy)
        return run

    def dense():
        with torch.set_grad_enabled(train):
            for x, w, b, _, gy in layers:
                x.grad = w.grad = b.grad = None
                y = F.linear(x, w, b)
                if train:
                    y.backward(gy)

    variants = {"fused": Timed(masked(backend), device), "reference": Timed(masked("reference"), device),
                "dense": Timed(dense, device)}
    times = interleave(benchmark, variants, n_rounds, calls=calls, warmup=warmup)
    kern = {k: kernel_time(v.fn, device, calls=calls) for k, v in variants.items()} if device == "cuda" else {}
    return backend, times, variants, kern


def _masked_linear_report(benchmark, device, what: str, backend, times, variants, kern, info: dict,
                          ref_target=(">=", 1.0)) -> None:
    """Rows: wall times, GPU and kernel times, and the ratios: fused over dense (goal <= 1.1x on a
    GPU, by GPU time) and fused speed-up over the reference (wall and GPU time)."""
    gpu = gpu_times(variants)
    derived = {"fused_over_dense_wall": paired_ratio(times, "fused", "dense"),
               "fused_over_dense_gpu": paired_ratio(gpu, "fused", "dense"),
               "fused_speedup_over_reference_wall": 1.0 / paired_ratio(times, "fused", "reference"),
               "fused_speedup_over_reference_gpu": 1.0 / paired_ratio(gpu, "fused", "reference")}
    if kern:
        derived["fused_over_dense_kernel"] = kern["fused"]["ms"] / kern["dense"]["ms"]
    cuda = device == "cuda"
    figs = [time_figure(f"{what}, {k} ({backend if k == 'fused' else k}), wall", times, k) for k in times]
    figs += gpu_figures(what, variants, kern)
    figs.append(figure(f"{what}: fused over dense F.linear, GPU time", derived["fused_over_dense_gpu"], "x",
                       target=("<=", 1.1) if cuda else None))
    if kern:
        figs.append(figure(f"{what}: fused over dense F.linear, kernel time", derived["fused_over_dense_kernel"], "x",
                           target=("<=", 1.1)))
    figs.append(figure(f"{what}: fused over dense F.linear, wall", derived["fused_over_dense_wall"], "x"))
    figs.append(figure(f"{what}: {backend} speed-up over reference, wall", derived["fused_speedup_over_reference_wall"],
                       "x", target=ref_target))
    figs.append(figure(f"{what}: {backend} speed-up over reference, GPU time",
                       derived["fused_speedup_over_reference_gpu"], "x"))
    record(benchmark, what, device, times, figs, derived,
           {"backend": backend, "gpu_ms": {k: stats(v) for k, v in gpu.items()}, "kernel": kern,
            "clock": variants["fused"].clock, **info})


# tasks in a training batch: Algorithm 1's one task, or 16 tasks mixed (--tasks-per-batch 16)
TRAIN_MIX = {"one": 1, "mixed16": 16}


@pytest.mark.parametrize("mix", list(TRAIN_MIX))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("device", devices())
def test_masked_linear_train(benchmark, device, precision, mix):
    """ms for the forward and backward (dX, dW, db) of one block's four masked matrices at a
    training batch's shape: 8 sequences (600 rows) of one task (``task_ids`` [1]), or 16
    sequences (1,200 rows) of 16 tasks (``task_ids`` [R]); fused backend, reference and a dense
    ``F.linear`` of the same shapes, interleaved; wall time, GPU time (CUDA events) and kernel
    time (profiler). fp32 runs with tf32 products on CUDA. Targets: fused <= 1.1x dense by GPU
    time (CUDA); fused >= 1.0x the reference."""
    n_tasks = TRAIN_MIX[mix]
    rows = TRAIN_ROWS * (2 if n_tasks > 1 else 1)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    layers = []
    for k, n in LAYERS.values():
        x = torch.randn(rows, k, generator=g).to(device, dtype).requires_grad_(True)
        w, b, masks = _layer(k, n, max(5, n_tasks), device, dtype, g, True)
        layers.append((x, w, b, masks, torch.randn(rows, n, generator=g).to(device, dtype)))
    ids = (torch.tensor([3]) if n_tasks == 1 else torch.arange(n_tasks).repeat_interleave(rows // n_tasks)).to(device)
    with matmul_precision(precision, device) as prec:
        what = f"masked_linear fwd+bwd, one block, {rows} rows of {n_tasks} task{'s' if n_tasks > 1 else ''}, {prec}"
        res = _masked_vs_dense(benchmark, device, what, layers, ids, True, rounds(10 if device == "cpu" else 20),
                               calls=1 if device == "cpu" else 20, warmup=3)
    _masked_linear_report(benchmark, device, what, *res, {"rows": rows, "tasks": n_tasks, "precision": prec})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("device", devices())
def test_masked_linear_eval(benchmark, device, precision):
    """ms for the mixed-task forward of one block's four masked matrices at evaluation's shape,
    MT50 x 10 episodes x 59 history tokens = 29,500 rows of 50 tasks in task order (no grad),
    fused backend against the reference (which materializes ``W * M`` for each of the 50 tasks)
    and a dense ``F.linear``; wall, GPU and kernel time. bf16 on CUDA only. Targets: fused >=
    1.5x the reference and <= 1.1x dense by GPU time (CUDA)."""
    if device == "cpu" and precision == "bf16":
        pytest.skip("the evaluation forward in bf16 is measured on CUDA only")
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    g = torch.Generator().manual_seed(1)
    ids = torch.arange(EVAL_TASKS).repeat_interleave(EVAL_EPISODES * EVAL_TOKENS).to(device)
    layers = []
    for k, n in LAYERS.values():
        x = torch.randn(ids.shape[0], k, generator=g).to(device, dtype)
        w, b, masks = _layer(k, n, EVAL_TASKS, device, dtype, g, False)
        layers.append((x, w, b, masks, None))
    with matmul_precision(precision, device) as prec:
        what = f"masked_linear eval forward, one block, 29,500 rows x 50 tasks, {prec}"
        backend, times, variants, kern = _masked_vs_dense(benchmark, device, what, layers, ids, False,
                                                          rounds(3 if device == "cpu" else 20),
                                                          calls=1 if device == "cpu" else 10, warmup=1)
    _masked_linear_report(benchmark, device, what, backend, times, variants, kern,
                          {"rows": int(ids.shape[0]), "precision": prec},
                          ref_target=(">=", 1.5) if device == "cuda" else None)


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
    masks = [harmodt_kernels.pack_masks(torch.rand(p.shape, generator=g) >= SPARSITY).to(device)
             if q in masked else None
             for p, q in zip(params, model.parameters())]

    def opt(be):
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        steps = [torch.zeros((), device=device) for _ in params]
        coef = torch.tensor(0.5, device=device)

        def run():
            harmodt_kernels.masked_adamw_(params, grads, m, v, masks, steps, lr=1e-4, beta1=0.9, beta2=0.999,
                                          eps=1e-8, weight_decay=1e-4, grad_scale=coef, backend=be)
        return run

    variants = {"fused": Timed(opt(backend), device), "reference": Timed(opt("reference"), device)}
    times = interleave(benchmark, variants, rounds(20), calls=1 if device == "cpu" else 20, warmup=3)
    speedup = 1.0 / paired_ratio(times, "fused", "reference")
    n = sum(p.numel() for p in params)
    figs = [time_figure(f"masked AdamW, {n / 1e6:.2f} M parameters, {backend}", times, "fused"),
            time_figure(f"masked AdamW, {n / 1e6:.2f} M parameters, reference", times, "reference"),
            figure(f"masked AdamW: {backend} speed-up over reference", speedup, "x", target=(">=", 1.0))]
    figs += gpu_figures(f"masked AdamW, {n / 1e6:.2f} M parameters", variants)
    record(benchmark, "masked AdamW step", device, times, figs, {"fused_speedup_over_reference": speedup},
           {"backend": backend, "parameters": n})


def harmony_inputs(t: int, device, g: torch.Generator):
    """Algorithm 2's [T, P] harmony and recovery scores (Fisher importance, lambda = 10) of random
    masked and dense gradients, and packed masks of density 0.8 (row by row: no [T, P] bool
    temporaries)."""
    masks = torch.empty(t, harmodt_kernels.num_words(P_MODEL), dtype=torch.int32)
    masked_grads = torch.empty(t, P_MODEL)
    for i in range(t):
        active = torch.rand(P_MODEL, generator=g) >= SPARSITY
        masks[i] = harmodt_kernels.pack_masks(active)
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
    names = [backend] + [b for b in harmodt_kernels.available_backends(device) if b not in (backend, "triton")]
    if "reference" not in names:
        names.append("reference")
    args = harmony_inputs(tasks, device, torch.Generator().manual_seed(tasks))
    peak = {}

    def sel(be):
        def run():
            return harmodt_kernels.harmony_select(*args, ETA_MAX, backend=be)
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
    variants = {be: Timed(sel(be), device) for be in names}
    times = interleave(benchmark, variants, n_rounds, calls=1, warmup=0 if device == "cpu" else 1)
    gpu = gpu_times(variants)
    kern = {be: kernel_time(v.fn, device, calls=3) for be, v in variants.items()} if device == "cuda" else {}
    speedup = 1.0 / paired_ratio(times, backend, "reference")
    speedup_gpu = 1.0 / paired_ratio(gpu, backend, "reference")
    what = f"harmony_select, {tasks} tasks x 4.72 M"
    target = (">=", 5.0) if tasks == 50 else None
    figs = [time_figure(f"{what}, {be}, wall", times, be) for be in names]
    figs += gpu_figures(what, variants, kern)
    figs.append(figure(f"harmony_select {tasks} tasks: {backend} speed-up over reference, wall", speedup, "x",
                       target=target))
    figs.append(figure(f"harmony_select {tasks} tasks: {backend} speed-up over reference, GPU time", speedup_gpu, "x",
                       target=target if device == "cuda" else None))
    derived = {"fused_speedup_over_reference": speedup, "fused_speedup_over_reference_gpu": speedup_gpu}
    if kern:
        derived["fused_speedup_over_reference_kernel"] = kern["reference"]["ms"] / kern[backend]["ms"]
        figs.append(figure(f"harmony_select {tasks} tasks: {backend} speed-up over reference, kernel time",
                           derived["fused_speedup_over_reference_kernel"], "x", target=target))
    figs += [figure(f"harmony_select {tasks} tasks: peak extra memory, {be}", mib, "MiB") for be, mib in peak.items()]
    record(benchmark, f"harmony_select at {tasks} tasks", device, times, figs, derived,
           {"backends": names, "peak_extra_MiB": peak, "P": P_MODEL, "gpu_ms": {k: stats(v) for k, v in gpu.items()},
            "kernel": kern, "clock": variants[backend].clock})
