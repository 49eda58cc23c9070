"""The dispatch of harmodt_kernels: select_backends gives op values bound to one backend, an op
calls its backend's implementation by name, the public functions take an explicit backend, and
the cached masked_linear of an evaluation equals the op it wraps."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import harmodt_kernels
from harmodt_kernels import reference as ref


def test_select_backends_gives_op_values_of_one_backend():
    ops = harmodt_kernels.select_backends("cpu", fused=False, backend="auto")
    assert ops is harmodt_kernels.REFERENCE_OPS and ops.fallback is None
    assert ops.describe() == "masked_linear=reference masked_adamw=reference harmony_select=reference"
    assert ops.masked_linear.takes_bool_masks and ops.masked_adamw.takes_bool_masks
    with pytest.raises(ValueError, match="unknown kernel backend 'fast'"):
        harmodt_kernels.select_backends("cpu", fused=True, backend="fast")
    fused = harmodt_kernels.select_backends("cpu", fused=True)
    name = fused.masked_linear.backend.name
    assert name == harmodt_kernels.resolve_backend("auto", "cpu") and fused.describe().count(f"={name}") == 3
    assert (fused.fallback is None) == (name != "reference")


def _inputs(seed, r_per_task=6, t=3, k=40, n=9):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(r_per_task * t, k, generator=g)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    masks = harmodt_kernels.pack_masks(torch.rand(t, n, k, generator=g) < 0.5)
    return x, w, b, masks


def test_each_op_calls_the_implementation_its_backend_maps_its_name_to():
    calls = []

    def recording(name, impl):
        def call(*args, **kwargs):
            calls.append(name)
            return impl(*args, **kwargs)
        return call

    ref_backend = harmodt_kernels.REFERENCE_OPS.masked_linear.backend
    toy = dataclasses.replace(ref_backend, name="toy", impls={n: recording(n, f) for n, f in ref_backend.impls.items()})
    ops = harmodt_kernels.KernelOps.on(toy)
    x, w, b, masks = _inputs(0)
    ids = torch.arange(3).repeat_interleave(6)
    assert torch.equal(ops.masked_linear(x, w, b, masks, ids), ref.masked_linear(x, w, b, masks, ids))
    assert torch.equal(ops.dropout(x, 0.5, 7), ref.dropout(x, 0.5, 7))
    h, r = torch.rand(2, 70), torch.rand(2, 70)
    m = harmodt_kernels.pack_masks(torch.rand(2, 70) < 0.5)
    assert torch.equal(ops.harmony_select(h, r, m, 3), ref.harmony_select(h, r, m, 3))
    p, g = torch.randn(9, 40), torch.randn(9, 40)
    ops.masked_adamw([p], [g], [torch.zeros_like(p)], [torch.zeros_like(p)], [None], [torch.zeros(())], lr=0.1, beta1=0.9,
                     beta2=0.99, eps=1e-8, weight_decay=0.0)
    assert calls == ["masked_linear", "dropout", "harmony_select", "masked_adamw"]
    assert ops.describe() == "masked_linear=toy masked_adamw=toy harmony_select=toy"
    for name in harmodt_kernels.available_backends("cpu"):  # every backend maps every op
        impls = harmodt_kernels.backend_ops(name).dropout.backend.impls
        assert {"masked_linear", "masked_adamw", "harmony_select", "dropout"} <= set(impls), name

@pytest.mark.parametrize("layout", ["every task in order", "runs"])
def test_cached_masked_linear_equals_the_op_and_follows_weight_changes(layout):
    x, w, b, masks = _inputs(0)
    segments = ((0, 6), (1, 6), (2, 6)) if layout == "every task in order" else ((2, 4), (0, 10), (2, 4))
    ids = torch.tensor([t for t, c in segments for _ in range(c)])
    op = harmodt_kernels.REFERENCE_OPS.masked_linear
    workspace = {}
    cached = op.cached(workspace)
    with torch.no_grad():
        torch.testing.assert_close(cached(x, w, b, masks, ids, segments=segments), op(x, w, b, masks, ids), rtol=1e-5, atol=1e-5)
        assert len(workspace) == 1
        cached(x, w, b, masks, ids, segments=segments)
        assert len(workspace) == 1  # made once
        w.mul_(2.0)  # an in-place change: a new version, a new masked weight
        torch.testing.assert_close(cached(x, w, b, masks, ids, segments=segments), op(x, w, b, masks, ids), rtol=1e-5, atol=1e-5)
        assert len(workspace) == 2


def test_cached_masked_linear_passes_calls_with_gradients_to_the_op():
    x, w, b, masks = _inputs(1)
    w.requires_grad_()
    ids = torch.arange(3).repeat_interleave(6)
    workspace = {}
    y = harmodt_kernels.REFERENCE_OPS.masked_linear.cached(workspace)(x, w, b, masks, ids, segments=((0, 6), (1, 6), (2, 6)))
    y.sum().backward()
    assert workspace == {} and w.grad is not None
    torch.testing.assert_close(w.grad, ref.unpack_masks(masks, 40).float().mul(
        torch.stack([x[6 * t : 6 * t + 6].sum(0) for t in range(3)]).unsqueeze(1)).sum(0))


def test_cached_masked_linear_checks_its_arguments():
    x, w, b, masks = _inputs(2)
    cached = harmodt_kernels.REFERENCE_OPS.masked_linear.cached({})
    with torch.no_grad(), pytest.raises(harmodt_kernels.KernelArgumentError, match=r"segments .* cover 17 rows, x has 18"):
        cached(x, w, b, masks, torch.zeros(18, dtype=torch.int64), segments=((0, 17),))
