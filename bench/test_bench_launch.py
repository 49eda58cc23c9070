"""The host cost of launching each kernel op against the ATen op it replaces, at tiny shapes.

At R = 8 rows and K = N = 32 the arithmetic is nothing, so a call's time is its launch path:
argument checks, dispatch, the autograd wrapper. Each op is timed in the same rounds as its ATen
counterpart (bench.common.interleave) and the figure is the median of the per-round ratios:

* ``masked_linear`` forward (autograd recording, as in training) against ``F.linear``;
* ``masked_linear`` forward + backward (``y.backward(dy)``) against ``F.linear``'s;
* ``dropout`` (counter-based, training) against ``F.dropout``;
* ``masked_adamw_`` over the paper-size model's parameter list (one task's packed masks on the
  masked matrices) against ``torch.optim.AdamW(foreach=True)``'s step over the same list.

Target (reported, not asserted): each ratio <= 2. CPU: the native ``cpu`` backend (and the
``reference`` for comparison), timed as the calling thread's CPU time (``time.thread_time``) with
one intra-op thread, so that what is measured is the host's work, not the share of a busy
machine's cores the process got; CUDA: the ``triton`` backend, wall time, synchronised per round.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import harmodt_kernels

from .common import SPARSITY, call_runner, devices, figure, interleave, paired_ratio, record, rounds, time_figure

R, K, N = 8, 32, 32
TARGET = ("<=", 2.0)


def host_runner(fn, device: str):
    """A variant for :func:`interleave`: ``run(n)`` calls ``fn`` n times, returns ms per call: CPU
    time of this thread on a CPU, synchronised wall time on CUDA (bench.common.call_runner)."""
    if device == "cuda":
        return call_runner(fn, device)

    def run(n: int) -> float:
        t = time.thread_time()
        for _ in range(n):
            fn()
        return (time.thread_time() - t) / n * 1e3

    return run


def launch_backends(device: str) -> list[str]:
    if device == "cuda":
        return ["triton"]
    return [b for b in ("cpu", "reference") if harmodt_kernels.backend_reason(b, "cpu") is None]


def tiny_inputs(device: str, g: torch.Generator):
    x = torch.randn(R, K, generator=g).to(device)
    w = torch.randn(N, K, generator=g).to(device).requires_grad_()
    b = torch.randn(N, generator=g).to(device).requires_grad_()
    masks = harmodt_kernels.pack_masks(torch.rand(1, N, K, generator=g) >= SPARSITY).to(device)
    return x, w, b, masks, torch.zeros(1, dtype=torch.int64, device=device), torch.randn(R, N, generator=g).to(device)


@pytest.mark.parametrize("device", devices())
def test_launch_cost(benchmark, device):
    """µs per call of each kernel op and its ATen counterpart at R=8, K=N=32 (per backend), and
    µs per masked AdamW step over the paper-size parameter list against foreach AdamW."""
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # the host's work on one thread, thread CPU time (see the module's docstring)
    try:
        _launch_cost(benchmark, device)
    finally:
        torch.set_num_threads(threads)


def _launch_cost(benchmark, device):
    from harmodt.config import ModelConfig
    from harmodt.methods import build_model

    g = torch.Generator().manual_seed(0)
    x, w, b, masks, task, dy = tiny_inputs(device, g)
    xg = x.clone().requires_grad_()
    variants = {
        "F.linear fwd": host_runner(lambda: F.linear(x, w, b), device),
        "F.linear fwd+bwd": host_runner(lambda: F.linear(xg, w, b).backward(dy), device),
        "F.dropout": host_runner(lambda: F.dropout(x, 0.1, True), device),
    }
    backends = launch_backends(device)
    for be in backends:
        op = harmodt_kernels.backend_ops(be, device)
        variants[f"{be} masked_linear fwd"] = host_runner(lambda op=op: op.masked_linear(x, w, b, masks, task), device)
        variants[f"{be} masked_linear fwd+bwd"] = host_runner(
            lambda op=op: op.masked_linear(xg, w, b, masks, task).backward(dy), device)
        variants[f"{be} dropout"] = host_runner(lambda op=op: op.dropout(x, 0.1, 12345), device)

    # masked AdamW over the paper-size model's parameters, against AdamW(foreach=True) on a copy
    model = build_model(ModelConfig(), 5, "harmodt-f").to(device)
    masked = set(model.masked_weights().values())
    params = [p.detach().clone() for p in model.parameters()]
    grads = [torch.randn(p.shape, generator=g).to(device) * 1e-3 for p in params]
    pmasks = [harmodt_kernels.pack_masks(torch.rand(p.shape, generator=g) >= SPARSITY).to(device)
              if q in masked else None
              for p, q in zip(params, model.parameters())]
    ref_params = [torch.nn.Parameter(p.clone()) for p in params]
    for p, gr in zip(ref_params, grads):
        p.grad = gr
    aten_opt = torch.optim.AdamW(ref_params, lr=1e-4, weight_decay=1e-4, foreach=True)
    variants["AdamW foreach"] = host_runner(aten_opt.step, device)
    for be in backends:
        m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        steps = [torch.zeros((), device=device) for _ in params]
        workspace: dict = {}

        def adamw(be=be, m=m, v=v, steps=steps, workspace=workspace):
            harmodt_kernels.masked_adamw_(params, grads, m, v, pmasks, steps, lr=1e-4, beta1=0.9, beta2=0.999,
                                          eps=1e-8, weight_decay=1e-4, backend=be, workspace=workspace)

        variants[f"{be} masked_adamw_"] = host_runner(adamw, device)

    tiny_calls = 200
    times = interleave(benchmark, {k: v for k, v in variants.items() if "adamw" not in k.lower()}, rounds(20),
                       calls=tiny_calls, warmup=20)
    adam = interleave(_Untimed(), {k: v for k, v in variants.items() if "adamw" in k.lower()}, rounds(20), calls=1,
                      warmup=2)
    us = {k: [t * 1e3 for t in ts] for k, ts in {**times, **adam}.items()}
    figs, derived = [], {}
    for be in backends:
        for what, aten in (("masked_linear fwd", "F.linear fwd"), ("masked_linear fwd+bwd", "F.linear fwd+bwd"),
                           ("dropout", "F.dropout")):
            ratio = paired_ratio(us, f"{be} {what}", aten)
            derived[f"{be} {what} / {aten}"] = ratio
            figs.append(time_figure(f"{be} {what}, R={R} K={K} N={N}", us, f"{be} {what}", unit="µs"))
            figs.append(figure(f"{be} {what} / {aten}", ratio, "x", target=TARGET))
        ratio = paired_ratio(us, f"{be} masked_adamw_", "AdamW foreach")
        derived[f"{be} masked_adamw_ / AdamW foreach"] = ratio
        figs.append(time_figure(f"{be} masked_adamw_, paper-size parameter list", us, f"{be} masked_adamw_",
                                unit="µs"))
        figs.append(figure(f"{be} masked_adamw_ / AdamW(foreach=True)", ratio, "x", target=TARGET))
    for aten in ("F.linear fwd", "F.linear fwd+bwd", "F.dropout"):
        figs.append(time_figure(f"{aten}, R={R} K={K} N={N}", us, aten, unit="µs"))
    figs.append(time_figure("AdamW(foreach=True), paper-size parameter list", us, "AdamW foreach", unit="µs"))
    record(benchmark, "launch cost of the kernel ops against ATen at tiny shapes", device, us, figs, derived,
           {"backends": backends, "shape": [R, K, N], "calls_per_round": tiny_calls, "threads": torch.get_num_threads(),
            "clock": "thread CPU time" if device == "cpu" else "wall"}, unit="µs")


class _Untimed:
    """A stand-in for pytest-benchmark's fixture where a second interleaved group runs in the same
    test (the fixture times one group only): runs setup and target once per round."""

    def pedantic(self, target, setup, rounds, warmup_rounds=0, iterations=1):
        for _ in range(rounds):
            setup()
            target()
