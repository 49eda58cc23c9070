"""The native CPU ops (kernels/csrc via kernels/cpu.py) against kernels.reference.

The library must exist: it is built by `pip install --no-build-isolation -e .`; if it is missing
this module tries a CMake build once and otherwise fails the session loudly (never skips).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

import kernels
from kernels import cpu
from kernels.cpu import KernelArgumentError, KernelDTypeError
from kernels import reference as ref

if cpu.unavailable_reason() is not None:
    _first_reason = cpu.unavailable_reason()
    try:
        cpu.build()
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"native CPU kernels are not built ({_first_reason}) and building them failed: {exc}") from exc
    if cpu.unavailable_reason() is not None:
        raise RuntimeError(f"native CPU kernels unavailable after building: {cpu.unavailable_reason()}")

TOL = dict(rtol=1e-5, atol=1e-5)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _poison_heap(*shapes):
    """Leave NaN-filled freed blocks of the output sizes behind, so that an op that forgets to
    write part of a freshly allocated output most likely returns NaNs there."""
    bufs = [torch.full(s, float("nan")) for s in shapes]
    del bufs


# ------------------------------------------------------------------------------------------------
# pack / unpack


@pytest.mark.parametrize("shape", [(1,), (5,), (3, 33), (2, 3, 257), (7, 32), (4, 64), (2, 1, 1)])
def test_pack_unpack_match_reference(shape):
    g = _gen(sum(shape))
    mask = torch.rand(shape, generator=g) < 0.5
    words = cpu.pack_masks(mask)
    assert words.dtype == torch.int32
    assert torch.equal(words, ref.pack_masks(mask))
    assert torch.equal(cpu.unpack_masks(words, shape[-1]), mask)
    # arbitrary words, padding bits set: unpack ignores them like the reference
    rnd = torch.randint(-(2**31), 2**31 - 1, words.shape, generator=g, dtype=torch.int64).to(torch.int32)
    assert torch.equal(cpu.unpack_masks(rnd, shape[-1]), ref.unpack_masks(rnd, shape[-1]))


def test_pack_non_contiguous_and_dispatch():
    mask = torch.rand(40, 70, generator=_gen(1)) < 0.3
    nc = mask.t()
    assert not nc.is_contiguous()
    assert torch.equal(cpu.pack_masks(nc), ref.pack_masks(nc))
    assert torch.equal(kernels.pack_masks(nc, backend="cpu"), ref.pack_masks(nc))
    words = ref.pack_masks(mask)
    assert torch.equal(kernels.unpack_masks(words, 70, backend="cpu"), mask)


@pytest.mark.parametrize("shape", [(1,), (15,), (16,), (17,), (7, 33), (1024, 256), (3, 5, 100)])
@pytest.mark.parametrize("in_place", [False, True])
def test_apply_mask_matches_reference(shape, in_place):
    g = _gen(sum(shape))
    src = torch.randn(shape, generator=g)
    src.view(-1)[::7] = float("inf")  # outside the mask these become 0, not 0 * inf
    src.view(-1)[3::11] = float("nan")
    mask = torch.rand(shape, generator=g) > 0.4
    expect = ref.apply_mask_(torch.empty(shape), src, mask)
    assert torch.equal(torch.isnan(expect), torch.isnan(src) & mask)
    packed = kernels.pack_masks(mask)
    torch.testing.assert_close(ref.apply_mask_(torch.empty(shape), src, packed), expect, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(cpu.apply_mask_(torch.empty(shape), src, packed), expect, equal_nan=True, rtol=0, atol=0)
    if in_place:
        got = cpu.apply_mask_(src, src, mask)
    else:
        out = torch.full(shape, float("nan"))
        got = cpu.apply_mask_(out, src, mask)
        assert got is out
    torch.testing.assert_close(got, expect, equal_nan=True, rtol=0, atol=0)
    assert not torch.signbit(got[~mask]).any()  # +0 outside the mask, as torch.where gives


def test_apply_mask_dispatch_and_errors():
    src, mask = torch.randn(4, 8), torch.rand(4, 8) > 0.5
    out = torch.empty(4, 8)
    assert kernels.apply_mask_(out, src, mask) is out  # auto: native for fp32 contiguous CPU
    half = src.bfloat16()
    torch.testing.assert_close(kernels.apply_mask_(torch.empty_like(half), half, mask), torch.where(mask, half, 0.0))  # auto: reference
    with pytest.raises(TypeError, match="out must be float32"):
        cpu.apply_mask_(torch.empty_like(half), half, mask)
    with pytest.raises(TypeError, match="src must be float32"):
        cpu.apply_mask_(out, half, mask)
    with pytest.raises(TypeError, match="mask must be bool"):
        cpu.apply_mask_(out, src, mask.float())
    with pytest.raises(ValueError, match="one shape"):
        cpu.apply_mask_(torch.empty(4, 7), src, mask)
    with pytest.raises(ValueError, match=r"bool mask \(4, 7\) does not fit src \(4, 8\)"):
        cpu.apply_mask_(out, src, mask[:, :7].contiguous())
    with pytest.raises(ValueError, match=r"packed mask \(4, 2\) does not fit src \(4, 8\) \(needs \(4, 1\)\)"):
        cpu.apply_mask_(out, src, torch.zeros(4, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="src must be contiguous"):
        cpu.apply_mask_(torch.empty(8, 4), src.t(), mask.t().contiguous())
    with pytest.raises(kernels.BackendUnavailable, match="no Triton kernel"):
        kernels.apply_mask_(out, src, mask, backend="triton")


def test_apply_masks_over_lists_matches_reference():
    """The list op (one call for all of a model's matrices): each entry as apply_mask_ alone, bool
    and packed masks mixed, in place; errors name the bad entry's shapes."""
    g = _gen(5)
    shapes = [(768, 256), (7, 33), (1,), (256, 1024)]
    srcs = [torch.randn(s, generator=g) for s in shapes]
    masks = [torch.rand(s, generator=g) > 0.3 for s in shapes]
    masks[1] = kernels.pack_masks(masks[1])
    want = [ref.apply_mask_(torch.empty(s.shape), s, m) for s, m in zip(srcs, masks)]
    outs = [torch.full(s, float("nan")) for s in shapes]
    assert kernels.apply_masks_(outs, srcs, masks, backend="cpu") is outs
    for o, w in zip(outs, want):
        assert torch.equal(o, w)
    kernels.apply_masks_(srcs, srcs, masks)  # in place, auto
    for s_, w in zip(srcs, want):
        assert torch.equal(s_, w)
    with pytest.raises(ValueError, match="2 outputs, 1 sources"):
        kernels.apply_masks_(outs[:2], srcs[:1], masks[:1], backend="cpu")
    with pytest.raises(ValueError, match=r"mask \[7, 32\] and src \[7, 33\]"):
        cpu.apply_masks_([torch.empty(7, 33)], [torch.randn(7, 33)], [torch.ones(7, 32, dtype=torch.bool)])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_apply_masks_sq_norms_returns_each_outputs_sum_of_squares(backend):
    """The backward's list op: the masking of apply_masks_ plus each output's sum of squares
    (gradient clipping's squared norms), bool and packed masks, odd sizes, an empty matrix."""
    g = _gen(6)
    shapes = [(768, 256), (7, 33), (1,), (0, 4), (5, 1000)]
    srcs = [torch.randn(s, generator=g) * 3 for s in shapes]
    masks = [torch.rand(s, generator=g) > 0.4 for s in shapes]
    masks[1], masks[4] = kernels.pack_masks(masks[1]), kernels.pack_masks(masks[4])
    want = [ref.apply_mask_(torch.empty(s.shape), s, m) for s, m in zip(srcs, masks)]
    outs = [torch.full(s, float("nan")) for s in shapes]
    sq = kernels.apply_masks_sq_norms_(outs, srcs, masks, backend=backend)
    assert sq.dtype == torch.float64 and sq.shape == (len(shapes),)
    for o, w, q in zip(outs, want, sq):
        assert torch.equal(o, w)
        torch.testing.assert_close(q, w.double().square().sum(), rtol=1e-6, atol=0)
    assert sq[3] == 0
    with pytest.raises(ValueError, match="2 outputs, 1 sources"):
        kernels.apply_masks_sq_norms_(outs[:2], srcs[:1], masks[:1], backend=backend if backend == "cpu" else "cpu")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_apply_masks_converting_fp32_bf16_with_packed_masks(backend):
    """Packed masks also convert: fp32 weights -> bf16 W * M (autocast's dtype) and bf16
    gradients -> masked fp32 (with their sums of squares); bool masks refuse mixed dtypes natively."""
    g = _gen(7)
    shapes = [(768, 256), (7, 33), (3, 17)]
    srcs = [torch.randn(s, generator=g) for s in shapes]
    bits = [torch.rand(s, generator=g) > 0.4 for s in shapes]
    packed = [kernels.pack_masks(b) for b in bits]
    outs = [torch.full(s, float("nan"), dtype=torch.bfloat16) for s in shapes]
    kernels.apply_masks_(outs, srcs, packed, backend=backend)
    for o, s_, b in zip(outs, srcs, bits):
        assert torch.equal(o, torch.where(b, s_, 0.0).bfloat16())  # one rounding, zeros outside
    grads = [torch.randn(s, generator=g).bfloat16() for s in shapes]
    back = [torch.full(s, float("nan")) for s in shapes]
    sq = kernels.apply_masks_sq_norms_(back, grads, packed, backend=backend)
    for o, s_, b, q in zip(back, grads, bits, sq):
        assert o.dtype == torch.float32 and torch.equal(o, torch.where(b, s_.float(), 0.0))
        torch.testing.assert_close(q, o.double().square().sum(), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="with a packed mask, one of them bfloat16"):
        cpu.apply_masks_([torch.empty(3, 17, dtype=torch.bfloat16)], [srcs[2]], [bits[2]])


def test_pack_unpack_errors():
    with pytest.raises(TypeError, match="mask"):
        cpu.pack_masks(torch.zeros(3, 4))
    with pytest.raises(TypeError, match="words"):
        cpu.unpack_masks(torch.zeros(3, 1), 4)
    with pytest.raises(ValueError, match="K=40 needs 2"):
        cpu.unpack_masks(torch.zeros(3, 1, dtype=torch.int32), 40)


# ------------------------------------------------------------------------------------------------
# masked_linear


def _ml_case(k, n, r, t, seed, bias=True, noncontig=False, dtype=torch.float32, drop_task=True, ids=None):
    g = _gen(seed)
    if noncontig:
        x = torch.randn(k, r, generator=g).t()  # [R, K] with strides (1, R)
    else:
        x = torch.randn(r, k, generator=g)
    x = x.to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    bmask = torch.rand(t, n, k, generator=g) < 0.6
    masks = ref.pack_masks(bmask)
    if ids is None:
        choices = torch.arange(t)
        if drop_task and t > 1:  # one task gets no rows
            choices = choices[choices != (seed % t)]
        ids = choices[torch.randint(0, len(choices), (r,), generator=g)]
    gy = torch.randn(r, n, generator=g).to(dtype)
    tg0 = torch.randn(t, n, k, generator=g)  # task_grads accumulate: start from random values
    return x, w, b, masks, ids, gy, tg0


def _run(fn, x, w, b, masks, ids, gy, tg0):
    xs = x.detach().clone().requires_grad_(True) if x.is_contiguous() else x.detach().clone().t().contiguous().t().requires_grad_(True)
    ws = w.detach().clone().requires_grad_(True)
    bs = b.detach().clone().requires_grad_(True) if b is not None else None
    tg = tg0.clone()
    _poison_heap((x.shape[0], w.shape[0]), tuple(x.shape), tuple(w.shape))
    y = fn(xs, ws, bs, masks, ids, task_grads=tg)
    inputs = [xs, ws] + ([bs] if bs is not None else [])
    grads = torch.autograd.grad(y, inputs, gy)
    return y.detach(), grads, tg


KN = list(itertools.product([1, 5, 33, 257], [1, 5, 33, 257]))


@pytest.mark.parametrize("k,n", KN)
@pytest.mark.parametrize("r,t", [(1, 1), (7, 3), (130, 50), (130, 3), (7, 50), (130, 1)])
def test_masked_linear_matches_reference(k, n, r, t):
    seed = k * 1000 + n * 10 + r + t
    case = _ml_case(k, n, r, t, seed, bias=(seed % 2 == 0), noncontig=(seed % 3 == 0))
    y1, g1, tg1 = _run(cpu.masked_linear, *case)
    y2, g2, tg2 = _run(ref.masked_linear, *case)
    assert not torch.isnan(y1).any()
    torch.testing.assert_close(y1, y2, **TOL)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, **TOL)
    torch.testing.assert_close(tg1, tg2, **TOL)


@pytest.mark.parametrize(
    "name,ids",
    [
        ("one task, all rows", torch.full((300,), 2)),
        ("sorted long runs", torch.repeat_interleave(torch.tensor([2, 0, 1]), torch.tensor([100, 70, 130]))),
        ("runs and scattered rows", torch.cat([torch.full((90,), 1), torch.tensor([0, 2] * 300), torch.full((65,), 0)])),
        ("interleaved, many chunks", torch.arange(700) % 3),
    ],
)
def test_masked_linear_row_layouts(name, ids):
    case = _ml_case(33, 40, ids.numel(), 3, 7, ids=ids)
    y1, g1, tg1 = _run(cpu.masked_linear, *case)
    y2, g2, tg2 = _run(ref.masked_linear, *case)
    torch.testing.assert_close(y1, y2, **TOL)
    # dW, db and task_grads sum up to 700 rows in another order than the reference
    sums = dict(rtol=1e-5, atol=1e-4)
    for a, c, tol in zip(g1, g2, (TOL, sums, sums)):
        torch.testing.assert_close(a, c, **tol)
    torch.testing.assert_close(tg1, tg2, **sums)


@pytest.mark.parametrize("ids", [torch.arange(130) % 3, torch.full((130,), 1)])
def test_masked_linear_large_matrix(ids):
    # N*K above the kernel's threshold for parallel element-wise passes (expand, mask, accumulate)
    case = _ml_case(1024, 600, 130, 3, 17, ids=ids)
    y1, g1, tg1 = _run(cpu.masked_linear, *case)
    y2, g2, tg2 = _run(ref.masked_linear, *case)
    tol = dict(rtol=1e-5, atol=1e-4)  # sums over K=1024 products
    torch.testing.assert_close(y1, y2, **tol)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, **tol)
    torch.testing.assert_close(tg1, tg2, **tol)


def test_masked_linear_no_task_grads_and_partial_grads():
    x, w, b, masks, ids, gy, _ = _ml_case(33, 5, 130, 3, 11)
    for need in ([True, False, False], [False, True, False], [False, False, True], [True, True, True]):
        outs = []
        for fn in (cpu.masked_linear, ref.masked_linear):
            xs, ws, bs = (t.detach().clone().requires_grad_(f) for t, f in zip((x, w, b), need))
            y = fn(xs, ws, bs, masks, ids)
            inputs = [t for t, f in zip((xs, ws, bs), need) if f]
            outs.append((y.detach(), torch.autograd.grad(y, inputs, gy)))
        torch.testing.assert_close(outs[0][0], outs[1][0], **TOL)
        for a, c in zip(outs[0][1], outs[1][1]):
            torch.testing.assert_close(a, c, **TOL)


def test_masked_linear_task_grads_untouched_without_weight_grad():
    x, w, b, masks, ids, gy, tg0 = _ml_case(5, 33, 7, 3, 12)
    tg = tg0.clone()
    xs = x.clone().requires_grad_(True)
    y = cpu.masked_linear(xs, w, b, masks, ids, task_grads=tg)
    y.backward(gy)
    assert torch.equal(tg, tg0)  # the reference only accumulates through weight's graph


def test_masked_linear_bool_masks_masked_inf_weights_and_nograd():
    x, w, b, masks, ids, _, _ = _ml_case(33, 33, 130, 3, 13)
    bmask = ref.unpack_masks(masks, 33)
    w = w.clone()
    w[~bmask.any(0)] = float("inf")  # masked-out weights never leak in (a select, not a multiply)
    assert torch.isinf(w).any()
    with torch.no_grad():
        y1 = cpu.masked_linear(x, w, b, bmask, ids)
        y2 = ref.masked_linear(x, w, b, masks, ids)
    torch.testing.assert_close(y1, y2, **TOL)


def test_masked_linear_zero_rows():
    x, w, b, masks, _, _, _ = _ml_case(33, 5, 1, 3, 14)
    x0 = torch.zeros(0, 33, requires_grad=True)
    ws = w.clone().requires_grad_(True)
    y = cpu.masked_linear(x0, ws, b, masks, torch.zeros(0, dtype=torch.int64))
    assert y.shape == (0, 5)
    y.sum().backward()
    assert torch.equal(ws.grad, torch.zeros_like(w))


def test_masked_linear_bf16_close_to_reference():
    x, w, b, masks, ids, gy, tg0 = _ml_case(257, 33, 130, 3, 15, dtype=torch.bfloat16)
    y1, g1, tg1 = _run(cpu.masked_linear, x, w, b, masks, ids, gy, tg0)
    y2, g2, tg2 = _run(ref.masked_linear, x, w, b, masks, ids, gy, tg0)
    assert y1.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in g1)
    bf = dict(rtol=2e-2, atol=1e-1)
    torch.testing.assert_close(y1.float(), y2.float(), **bf)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a.float(), c.float(), **bf)
    torch.testing.assert_close(tg1, tg2, **bf)


def test_masked_linear_argument_errors():
    x, w, b, masks, ids, _, _ = _ml_case(33, 5, 7, 3, 16)
    with pytest.raises(ValueError, match="weight"):
        cpu.masked_linear(x, w[:, :4], b, masks, ids)
    with pytest.raises(ValueError, match="bias"):
        cpu.masked_linear(x, w, b[:3], masks, ids)
    with pytest.raises(ValueError, match="masks"):
        cpu.masked_linear(x, w, b, masks[:, :, :1], ids)
    with pytest.raises(ValueError, match="task_ids"):
        cpu.masked_linear(x, w, b, masks, ids[:3])
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 3\)"):
        cpu.masked_linear(x, w, b, masks, torch.full((7,), 3))
    with pytest.raises(TypeError, match="x must be"):
        cpu.masked_linear(x.double(), w.double(), None, masks, ids)
    with pytest.raises(ValueError, match="task_grads"):
        cpu.masked_linear(x, w, b, masks, ids, task_grads=torch.zeros(3, 5, 32))
    with pytest.raises(TypeError, match="task_grads"):
        cpu.masked_linear(x, w, b, masks, ids, task_grads=torch.zeros(3, 5, 33, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# harmony_select


def _hs_inputs(t, p, seed, integer=False, density=0.6):
    g = _gen(seed)
    if integer:  # small integers: many exact ties, and -0.0 / +0.0 products
        mk = lambda *s: torch.randint(-2, 3, s, generator=g).float()  # noqa: E731
    else:
        mk = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    active = torch.rand(t, p, generator=g) < density
    return mk(t, p), mk(t, p), mk(p), ref.pack_masks(active)


def _check_select(mg, g, prm, masks, k, lam, imp):
    out = cpu.harmony_select(mg, g, prm, masks, k, lam, imp)
    expect = ref.harmony_select(mg, g, prm, masks, k, lam, imp)
    assert out.dtype == torch.int32 and out.shape == masks.shape
    assert torch.equal(out, expect)
    p = mg.shape[1]
    old, new = ref.unpack_masks(masks, p), ref.unpack_masks(out, p)
    n_act = old.sum(1)
    assert torch.equal(new.sum(1), n_act)  # density unchanged
    kk = torch.clamp(torch.minimum(n_act, p - n_act), max=max(k, 0))
    assert torch.equal((old & ~new).sum(1), kk)  # exactly k_i masked
    assert torch.equal((~old & new).sum(1), kk)  # exactly k_i recovered
    return out


@pytest.mark.parametrize("importance", ["magnitude", "fisher"])
@pytest.mark.parametrize("t", [1, 3, 50])
@pytest.mark.parametrize("p", [1, 33, 1001])
@pytest.mark.parametrize("integer", [False, True])
def test_harmony_select_matches_reference(importance, t, p, integer):
    mg, g, prm, masks = _hs_inputs(t, p, seed=t * 7 + p, integer=integer)
    for k in (0, 1, 7, p // 3, p):  # p > #masked for every task
        _check_select(mg, g, prm, masks, k, 0.1 if not integer else 1.0, importance)


@pytest.mark.parametrize("integer", [False, True])
def test_harmony_select_large_k_threshold_pass(integer):
    # k_i (or the ties at the threshold) beyond max(1024, P/8) candidates: the kernel switches from
    # applying the candidates by index to a third pass against an exact (key, index) threshold.
    mg, g, prm, masks = _hs_inputs(3, 20001, seed=21, integer=integer, density=0.5)
    for k in (7, 3000, 9000):
        for imp in ("magnitude", "fisher"):
            _check_select(mg, g, prm, masks, k, 0.1, imp)


def test_harmony_select_signed_zeros_and_lambda_zero():
    mg, g, prm, masks = _hs_inputs(3, 257, seed=5, integer=True)
    mg[:, ::4] = -0.0
    g[:, 1::4] = 0.0
    for lam in (0.0, 0.5, 1.0 / 3.0):
        for imp in ("magnitude", "fisher"):
            _check_select(mg, g, prm, masks, 40, lam, imp)


def test_harmony_select_nonfinite_padding_and_layout():
    mg, g, prm, masks = _hs_inputs(4, 77, seed=9)
    mg[0, 3] = float("nan")
    mg[1, 5] = float("inf")
    g[2, 7] = float("-inf")
    prm[11] = float("inf")
    for imp in ("magnitude", "fisher"):
        for k in (5, 30):
            out = cpu.harmony_select(mg, g, prm, masks, k, 0.3, imp)
            assert torch.equal(out, ref.harmony_select(mg, g, prm, masks, k, 0.3, imp))
    # padding bits set in the input are ignored and cleared, like the reference's unpack/pack
    padded = masks.clone()
    padded[:, -1] |= torch.tensor(-(2**31), dtype=torch.int32)  # bit 31 of the last word: column 95 > P
    _check_select(mg, g, prm, padded, 0, 0.3, "magnitude")
    assert torch.equal(cpu.harmony_select(mg, g, prm, padded, 9, 0.3, "fisher"), ref.harmony_select(mg, g, prm, masks, 9, 0.3, "fisher"))
    # non-contiguous gradients and bf16 inputs take the same values as the reference
    mgt = mg.t().contiguous().t()
    _check_select(mgt, g, prm, masks, 10, 0.3, "magnitude")
    _check_select(mg.bfloat16(), g.bfloat16(), prm.bfloat16(), masks, 10, 0.3, "fisher")


def test_harmony_select_errors():
    mg, g, prm, masks = _hs_inputs(3, 40, seed=1)
    with pytest.raises(ValueError, match="importance"):
        cpu.harmony_select(mg, g, prm, masks, 3, 0.1, "entropy")
    with pytest.raises(ValueError, match="grads"):
        cpu.harmony_select(mg, g[:2], prm, masks, 3, 0.1)
    with pytest.raises(ValueError, match="params"):
        cpu.harmony_select(mg, g, prm[:5], masks, 3, 0.1)
    with pytest.raises(ValueError, match="masks"):
        cpu.harmony_select(mg, g, prm, masks[:, :1], 3, 0.1)
    with pytest.raises(TypeError, match="masks"):
        cpu.harmony_select(mg, g, prm, masks.long(), 3, 0.1)


# ------------------------------------------------------------------------------------------------
# dispatch


def test_auto_backend_resolves_to_native_op():
    dev = torch.device("cpu")
    assert cpu.unavailable_reason() is None
    assert "cpu" in kernels.available_backends(dev)
    for op, choice in kernels.CPU_DISPATCH.items():
        expect = "cpu" if choice == "cpu" else "reference"
        assert kernels.resolve_backend("auto", dev, op) == expect, op
    assert kernels.resolve_backend("cpu", dev, "masked_linear") == "cpu"


def test_auto_masked_linear_calls_native(monkeypatch):
    if kernels.CPU_DISPATCH.get("masked_linear") != "cpu":
        pytest.fail("CPU_DISPATCH must route masked_linear to the native op (it measured faster)")
    calls = []
    real = cpu.masked_linear
    monkeypatch.setattr(cpu, "masked_linear", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x, w, b, masks, ids, _, _ = _ml_case(5, 5, 7, 3, 2)
    kernels.masked_linear(x, w, b, masks, ids)
    assert calls == [1]


def test_forced_cpu_backend_without_library_fails_clearly(monkeypatch, tmp_path):
    dev = torch.device("cpu")
    monkeypatch.setattr(kernels, "_CPU_READY", False)  # forget that the real library loaded
    monkeypatch.setattr(cpu, "_state", {"tried": False, "reason": None})
    monkeypatch.setattr(cpu, "_has_ops", lambda: False)
    monkeypatch.setenv("HARMODT_KERNELS_LIB", str(tmp_path / "missing.so"))
    assert "not built" in cpu.unavailable_reason()
    with pytest.raises(kernels.BackendUnavailable, match="backend='cpu' cannot run: .*missing.so is not built"):
        kernels.masked_linear(torch.zeros(2, 3), torch.zeros(4, 3), None, torch.zeros(1, 4, 1, dtype=torch.int32),
                              torch.zeros(2, dtype=torch.int64), backend="cpu")
    with pytest.raises(RuntimeError, match="not built"):
        cpu.harmony_select(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(3), torch.zeros(1, 1, dtype=torch.int32), 1, 0.1)
    assert kernels.resolve_backend("auto", dev, "masked_linear") == "reference"
    # a file that is not a loadable library
    bad = tmp_path / "bad.so"
    bad.write_text("not an ELF file")
    monkeypatch.setattr(kernels, "_CPU_READY", False)
    monkeypatch.setattr(cpu, "_state", {"tried": False, "reason": None})
    monkeypatch.setenv("HARMODT_KERNELS_LIB", str(bad))
    assert "failed to load" in cpu.unavailable_reason()
    with pytest.raises(kernels.BackendUnavailable, match="failed to load"):
        kernels.harmony_select(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(3), torch.zeros(1, 1, dtype=torch.int32),
                               1, 0.1, backend="cpu")


# ----------------------------------------------------------------------------------------------
# dropout (counter-based keep mask)


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 31, 32, 33, 127, 4096 * 4 + 7, 153600])
@pytest.mark.parametrize("seed", [0, 1, 2**62 + 12345, 2**63 - 1])
def test_dropout_matches_reference(n, seed):
    x = torch.randn(n, generator=_gen(n))
    for p in (0.1, 0.5):
        torch.testing.assert_close(cpu.dropout_apply(x, seed, p), ref.dropout_apply(x, seed, p), rtol=0, atol=0)
    got = cpu.dropout_apply(x.bfloat16(), seed, 0.1)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref.dropout_apply(x.bfloat16(), seed, 0.1), rtol=0, atol=0)


def test_dropout_rate_seed_and_gradient():
    x = torch.randn(8, 8, 75, 75, generator=_gen(3), requires_grad=True)  # an attention map of the paper model
    y = kernels.dropout(x, 0.1, seed=42)
    keep = y != 0
    assert abs(keep.float().mean().item() - 0.9) < 0.005
    torch.testing.assert_close(y[keep], x[keep] / 0.9)
    assert torch.equal(kernels.dropout(x, 0.1, seed=42), y)  # a function of the seed
    assert not torch.equal(kernels.dropout(x, 0.1, seed=43) != 0, keep)
    g = torch.randn(x.shape, generator=_gen(4))
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, torch.where(keep, g / 0.9, 0.0))  # same mask, recomputed from the seed
    torch.testing.assert_close(kernels.dropout(x, 0.0, seed=5), x)
    xr = x.detach().clone().requires_grad_()
    yr = kernels.dropout(xr, 0.1, seed=42, backend="reference")
    torch.testing.assert_close(yr, y, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(yr, xr, g)[0], gx, rtol=0, atol=0)


def test_dropout_errors():
    with pytest.raises(TypeError, match="x must be float32, bfloat16, got float64"):
        cpu.dropout_apply(torch.zeros(3, dtype=torch.float64), 0, 0.1)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        cpu.dropout_apply(torch.zeros(3), 0, 1.0)
    with pytest.raises(kernels.BackendUnavailable, match="no Triton kernel"):
        kernels.dropout(torch.zeros(3), 0.1, 0, backend="triton")


# ----------------------------------------------------------------------------------------------
# dense GEMMs (oneDNN for fp32) and the linear layer built on them

GEMM_SHAPES = [(1, 1, 1), (7, 33, 5), (592, 256, 768), (160, 1024, 256), (0, 4, 3), (5, 0, 3), (3, 4, 0), (65, 17, 129)]
ENGINES = ["auto", "blas"] + (["onednn"] if cpu.onednn_gemm_available() else []) + (
    ["native"] if cpu.bf16_gemm_available() or cpu.f32_gemm_available() else [])


def _native_available(dtype) -> bool:
    return cpu.bf16_gemm_available() if dtype == torch.bfloat16 else cpu.f32_gemm_available()


def _tol(dtype, k):
    # fp32: summation order differs between engines (errors grow ~ sqrt(K)); bf16: one rounding of the output
    return dict(rtol=1e-5, atol=1e-5 * max(k, 1) ** 0.5 * 4) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2 * max(k, 1) ** 0.5)


@pytest.mark.parametrize("m,k,n", GEMM_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("layout", ["plain", "a_t", "b_t", "both_t"])
def test_gemm_matches_torch_mm(m, k, n, dtype, engine, layout):
    if engine == "onednn" and dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bf16 matmul on this CPU (auto never asks it for one)")
    a = torch.randn(m, k, generator=_gen(1)).to(dtype)
    b = torch.randn(k, n, generator=_gen(2)).to(dtype)
    if engine == "native" and not _native_available(dtype):  # this build or CPU has the other native kernel only, and says so
        with pytest.raises(KernelArgumentError, match="engine 'native' for"):
            cpu.gemm(a, b, engine=engine)
        return
    if layout in ("a_t", "both_t"):
        a = a.t().contiguous().t()  # a transposed view
    if layout in ("b_t", "both_t"):
        b = b.t().contiguous().t()
    bias = torch.randn(n, generator=_gen(3)).to(dtype)
    want = (a.double() @ b.double()).to(dtype)
    torch.testing.assert_close(cpu.gemm(a, b, engine=engine), want, **_tol(dtype, k))
    torch.testing.assert_close(cpu.gemm(a, b, bias, engine=engine), (a.double() @ b.double() + bias.double()).to(dtype), **_tol(dtype, k))


# The AVX512-BF16 kernel's tilings: row tiles of 12 and column panels of 32 with tails, both loop
# orders (b shared across row tiles, or panels split across threads), a read in place or packed
# (transposed, odd K, a row start that is not 4-byte aligned), one row, one column.
NATIVE_SHAPES = [(592, 256, 768), (200, 37, 40), (300, 64, 96), (13, 600, 33), (1, 9, 70), (25, 1, 1), (49, 130, 1), (12, 2, 32)]


@pytest.mark.skipif(not cpu.bf16_gemm_available(), reason="no AVX512-BF16 in this build or CPU: the native bf16 GEMM is not built")
@pytest.mark.parametrize("m,k,n", NATIVE_SHAPES)
@pytest.mark.parametrize("layout", ["plain", "a_t", "b_t", "both_t", "a_offset"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_native_bf16_gemm_is_exact_on_integer_operands(m, k, n, layout, with_bias):
    """Small integers make every product and partial sum exact in fp32, so any packing or tiling
    slip shows as a wrong value, and the one rounding (bias included) must equal float64's."""
    g = _gen(m * 7 + k * 3 + n)
    a = torch.randint(-3, 4, (m, k + 1), generator=g).to(torch.bfloat16)
    a = a[:, 1:] if layout == "a_offset" else a[:, :k]  # a_offset: rows start 2 bytes past a 4-byte boundary
    b = torch.randint(-3, 4, (k, n), generator=g).to(torch.bfloat16)
    if layout in ("a_t", "both_t"):
        a = a.t().contiguous().t()
    if layout in ("b_t", "both_t"):
        b = b.t().contiguous().t()
    bias = torch.randint(-300, 300, (n,), generator=g).to(torch.bfloat16) * 0.5 if with_bias else None
    want = a.double() @ b.double() + (bias.double() if with_bias else 0.0)
    got = cpu.gemm(a, b, bias, engine="native")
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert torch.equal(got, want.to(torch.bfloat16))
    assert torch.equal(cpu.gemm(a, b, bias), got)  # auto is the native kernel for bf16


# The native fp32 kernels' tilings (AVX-512: row tiles of 12 and column panels of 32, K in blocks of
# at most 512; AVX2: 6 and 16, K blocks of at most 320) with tails, K split into blocks (600, 1000,
# 1030), a read in place or packed (transposed, or any strides; AVX-512: tile by tile), the b-shared
# and panel-outer orders, rows split when there are fewer panels than threads, one row, one column.
F32_SHAPES = [(592, 256, 768), (200, 37, 40), (300, 64, 96), (13, 600, 33), (1, 9, 70), (25, 1, 1), (49, 130, 1), (12, 2, 16),
              (7, 1000, 23), (768, 600, 256), (250, 1030, 70)]


@pytest.mark.skipif(not cpu.f32_gemm_available(), reason="no native fp32 GEMM in this build or CPU (AVX-512, or AVX2 + FMA)")
@pytest.mark.parametrize("m,k,n", F32_SHAPES)
@pytest.mark.parametrize("layout", ["plain", "a_t", "b_t", "both_t", "a_strided"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_native_f32_gemm_is_exact_on_integer_operands(m, k, n, layout, with_bias):
    """Small integers make every product and partial sum exact in fp32, so any packing, tiling or
    K-blocking slip shows as a wrong value."""
    g = _gen(m * 5 + k * 3 + n)
    a = torch.randint(-3, 4, (m, 2 * k), generator=g).float()
    a = a[:, ::2] if layout == "a_strided" else a[:, :k].contiguous()  # a_strided: neither stride 1 (packed from a copy)
    b = torch.randint(-3, 4, (k, n), generator=g).float()
    if layout in ("a_t", "both_t"):
        a = a.t().contiguous().t()
    if layout in ("b_t", "both_t"):
        b = b.t().contiguous().t()
    bias = torch.randint(-300, 300, (n,), generator=g).float() * 0.5 if with_bias else None
    want = a.double() @ b.double() + (bias.double() if with_bias else 0.0)
    got = cpu.gemm(a, b, bias, engine="native")
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert torch.equal(got, want.float())
    if cpu.f32_native_by_default():
        assert torch.equal(cpu.gemm(a, b, bias), got)  # auto is the native kernel for fp32 there


@pytest.mark.skipif(not cpu.f32_gemm_available(), reason="no native fp32 GEMM in this build or CPU (AVX-512, or AVX2 + FMA)")
@pytest.mark.parametrize("m,k,stride,n", [(37, 1024, 1024, 50), (13, 1000, 1024, 33), (7, 3072, 3072, 20), (592, 1024, 1024, 256)])
def test_native_f32_gemm_reads_rows_at_4kb_strides(m, k, stride, n):
    """Row-major a whose rows lie a multiple of 4 KB apart (K = 1024: the fc layer's dx and the
    mlp projection's forward): the AVX2 kernel reads it in place like any other (packing it measured
    12 % slower), the AVX-512 one packs it tile by tile (12 rows at that stride share one L1 set):
    exact on integer operands (k tails and K blocks included), and the same bits at another stride."""
    g = _gen(m + k + n)
    a = torch.randint(-3, 4, (m, stride), generator=g).float()[:, :k]
    b = torch.randint(-3, 4, (k, n), generator=g).float()
    got = cpu.gemm(a, b, engine="native")
    assert torch.equal(got, (a.double() @ b.double()).float())
    padded = torch.zeros(m, stride + 8)
    padded[:, :k] = a
    assert torch.equal(cpu.gemm(padded[:, :k], b, engine="native"), got)


@pytest.mark.skipif(not cpu.f32_gemm_available(), reason="no native fp32 GEMM in this build or CPU (AVX-512, or AVX2 + FMA)")
@pytest.mark.parametrize("m,k,n", [(592, 256, 768), (37, 600, 50), (5, 33, 17), (64, 1024, 256), (9, 40, 1)])
@pytest.mark.parametrize("transposed", [False, True])
def test_native_f32_gemm_masked_weight_equals_the_product_with_w_times_m(m, k, n, transposed):
    """b = W (K, N) or W^T of W (N, K) through W's packed mask: bit-for-bit a @ (W * M) on the same
    kernel, and one fp32 sum per output in k order: rows computed alone give the same bits."""
    g = _gen(m + k + n)
    a = torch.randn(m, k, generator=g)
    w = torch.randn((n, k) if transposed else (k, n), generator=g)
    mask = torch.rand(w.shape, generator=g) < 0.6
    words = cpu.pack_masks(mask)
    b, b_eff = (w.t(), (w * mask).t()) if transposed else (w, w * mask)
    got = cpu.gemm(a, b, engine="native", b_mask=words)
    assert torch.equal(got, cpu.gemm(a, b_eff, engine="native"))
    torch.testing.assert_close(got, (a.double() @ b_eff.double()).float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cpu.gemm(a, b, engine="blas", b_mask=words), got, rtol=1e-5, atol=1e-4)  # masked by a pass first
    assert torch.equal(cpu.gemm(a[3:4], b, engine="native", b_mask=words), got[3:4])  # independent of M and the split


EPILOGUE_SHAPES = [(592, 256, 1024), (37, 64, 96), (5, 7, 33), (1, 16, 40), (0, 8, 32), (13, 0, 20)]


def _epilogue_reference(a, b, epilogue, bias, residual, mask_bool, seed, p, z=None):
    """float64 reference of gemm_epilogue from a product computed in float64."""
    y = a.double() @ b.double()
    if epilogue == "relu_grad":
        out = y * (z > 0)
        return out, out.sum(0)
    if epilogue == "bias_relu":
        return (y + bias.double()).clamp_min(0), None
    if epilogue == "bias_dropout_add":
        keep = cpu.dropout_apply(torch.ones(y.shape), seed, p).double()  # the keep mask, scaled by 1 / (1 - p)
        return residual.double() + (y + bias.double()) * keep, None
    out = y * mask_bool
    return out, out.square().sum()


@pytest.mark.parametrize("m,k,n", EPILOGUE_SHAPES)
@pytest.mark.parametrize("epilogue", ["bias_relu", "bias_dropout_add", "masked_grad", "relu_grad"])
@pytest.mark.parametrize("dtype,engine", [(torch.float32, "auto"), (torch.bfloat16, "blas")]
                         + ([(torch.bfloat16, "native")] if cpu.bf16_gemm_available() else []))
@pytest.mark.parametrize("layout", ["plain", "a_t"])
def test_gemm_epilogue_matches_float64(m, k, n, epilogue, dtype, engine, layout):
    """Each epilogue on every engine against float64: fp32 and the native bf16 kernel (unrounded
    sums) to fp32 accuracy, the bf16 GEMM-then-op path to its one bf16 rounding of the product."""
    g = _gen(m + 3 * k + 7 * n)
    a = torch.randn(m, k, generator=g).to(dtype)
    if layout == "a_t":  # the weight gradient's dy^T
        a = a.t().contiguous().t()
    b = torch.randn(k, n, generator=g).to(dtype)
    bias, residual = torch.randn(n, generator=g), torch.randn(m, n, generator=g)
    mask_bool = torch.rand(m, n, generator=g) < 0.7
    z = torch.randn(m, n, generator=g).clamp_min(0).to(dtype)  # a ReLU's output: about half zeros
    p = 0.25 if epilogue == "bias_dropout_add" else 0.0
    out, sq = cpu.gemm_epilogue(a, b, epilogue, bias=bias, residual=z if epilogue == "relu_grad" else residual,
                                mask=cpu.pack_masks(mask_bool), seed=11, p=p, engine=engine)
    want, want_sq = _epilogue_reference(a, b, epilogue, bias, residual, mask_bool, 11, p, z=z.double())
    assert out.shape == (m, n) and out.dtype == (dtype if epilogue in ("bias_relu", "relu_grad") else torch.float32)
    scale = max(k, 1) ** 0.5
    if dtype == torch.float32 or engine == "native":
        tol = dict(rtol=1.6e-2, atol=1e-2) if out.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5 * scale)
    else:  # the product rounded to bf16 before the epilogue
        tol = dict(rtol=1.6e-2, atol=1e-2 * scale)
    torch.testing.assert_close(out.double(), want, **tol)
    if epilogue == "masked_grad":
        assert sq.dtype == torch.float64 and sq.dim() == 0
        assert abs(sq.item() - want_sq.item()) <= 2e-2 * want_sq.item() + 1e-6
        assert not out[~mask_bool].any()
    elif epilogue == "relu_grad":  # the bias gradient: column sums (from the rounded product on the GEMM-then-op path)
        assert sq.dtype == torch.float32 and sq.shape == (n,)
        torch.testing.assert_close(sq.double(), want_sq, rtol=2e-2, atol=2e-2 * max(m, 1) ** 0.5 * scale)
        assert not out[z == 0].any()
    else:
        assert sq is None


@pytest.mark.parametrize("n", [100, 37])  # (37: rows start at flat indices of every residue mod 4 and 16)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemm_epilogue_native_keeps_the_dropout_mask_and_drops_masked_columns_exactly(n, dtype):
    """Integer operands: every sum exact in fp32, so the fused epilogues must equal the float64
    composition exactly (the bias-ReLU output after its one rounding), dropout's kept entries and
    the mask's cleared entries included."""
    if dtype == torch.bfloat16 and not cpu.bf16_gemm_available():
        pytest.skip("no AVX512-BF16 in this build or CPU: the native bf16 GEMM is not built")
    if dtype == torch.float32 and not cpu.f32_gemm_available():
        pytest.skip("no native fp32 GEMM in this build or CPU (AVX-512, or AVX2 + FMA)")
    g = _gen(21)
    a = torch.randint(-3, 4, (50, 70), generator=g).to(dtype)
    b = torch.randint(-3, 4, (70, n), generator=g).to(dtype)
    bias, residual = torch.randint(-8, 8, (n,), generator=g).float() * 0.5, torch.randint(-8, 8, (50, n), generator=g).float()
    mask_bool = torch.rand(50, n, generator=g) < 0.5
    z = torch.randint(-2, 3, (50, n), generator=g).clamp_min(0).to(dtype)
    for epilogue in ("bias_relu", "bias_dropout_add", "masked_grad", "relu_grad"):
        out, sq = cpu.gemm_epilogue(a, b, epilogue, bias, z if epilogue == "relu_grad" else residual, cpu.pack_masks(mask_bool), seed=3,
                                    p=0.5, engine="native")
        want, want_sq = _epilogue_reference(a, b, epilogue, bias, residual, mask_bool, 3, 0.5, z=z.double())
        assert torch.equal(out, want.to(out.dtype)), epilogue
        if sq is not None:
            assert torch.equal(sq.double(), want_sq.reshape(sq.shape)), epilogue


@pytest.mark.skipif(not cpu.f32_gemm_available(), reason="no native fp32 GEMM in this build or CPU (AVX-512, or AVX2 + FMA)")
@pytest.mark.parametrize("m,k,n", [(600, 256, 768), (37, 1030, 50), (1, 9, 17), (160, 33, 1024)])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_f32_epilogue_sums_equal_the_separate_ops_bit_for_bit(m, k, n, threads):
    """The fused block's fp32 backward on the native kernel masks each weight gradient and sums its
    squares (masked_grad), and takes ReLU's backward with the fc bias gradient (relu_grad), inside
    the GEMM; the per-op blocks run the GEMM and then apply_masks_sq_norms_ / bias_relu_backward.
    Both add in common.h's kSumRows-row blocks, so on random operands the outputs and the sums are
    the same bits, whatever the thread count."""
    g = _gen(m + 5 * k + n)
    a = torch.randn(k, m, generator=g).t()  # dy^T, as the weight gradient reads it
    b = torch.randn(k, n, generator=g)
    mask_bool = torch.rand(m, n, generator=g) < 0.7
    z = torch.randn(m, n, generator=g).clamp_min(0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        y = cpu.gemm(a, b, engine="native")
        out, sq = cpu.gemm_epilogue(a, b, "masked_grad", mask=cpu.pack_masks(mask_bool), engine="native")
        sep = torch.empty_like(y)
        want_sq = kernels.apply_masks_sq_norms_([sep], [y], [cpu.pack_masks(mask_bool)], backend="cpu")
        assert torch.equal(out, sep) and sq.item() == want_sq[0].item()
        dz, db = cpu.gemm_epilogue(a, b, "relu_grad", residual=z, engine="native")
        want_dz, want_db = cpu._ops().bias_relu_backward(y, z, True)
        assert torch.equal(dz, want_dz) and torch.equal(db, want_db)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("engine", ["auto", "blas"] + (["native"] if cpu.bf16_gemm_available() else []))
@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("rows,cols", [(96, 64), (37, 70), (1, 33)])
@pytest.mark.parametrize("m", [13, 200])
def test_bf16_gemm_reads_an_fp32_weight_through_its_mask(engine, transposed, masked, rows, cols, m):
    """A bf16 a with an fp32 weight b (W.t() for the forward, W for dx) and W's packed mask: exactly
    the GEMM of a with bf16(W * M) (rounded as it is packed, or by one pass first), on every engine
    and through gemm_epilogue too. m = 13: the native kernel's panel-outer order; m = 200 (17 row
    tiles, a read in place): b-shared, W's packing split by its rows between the threads."""
    g = _gen(rows * 3 + cols)
    w = torch.randn(rows, cols, generator=g)
    mask_bool = torch.rand(rows, cols, generator=g) < 0.8
    w_eff = (w * mask_bool if masked else w).to(torch.bfloat16)
    b_mask = cpu.pack_masks(mask_bool) if masked else None
    b, b_ref = (w.t(), w_eff.t()) if transposed else (w, w_eff)
    a = torch.randn(m, b.shape[0], generator=g).to(torch.bfloat16)
    assert torch.equal(cpu.gemm(a, b, engine=engine, b_mask=b_mask), cpu.gemm(a, b_ref, engine=engine))
    bias = torch.randn(b.shape[1], generator=g)
    got, _ = cpu.gemm_epilogue(a, b, "bias_relu", bias=bias, engine=engine, b_mask=b_mask)
    want, _ = cpu.gemm_epilogue(a, b_ref, "bias_relu", bias=bias, engine=engine)
    assert torch.equal(got, want)


def test_bf16_gemm_weight_operand_errors():
    a, w = torch.zeros(3, 40, dtype=torch.bfloat16), torch.zeros(8, 40)
    with pytest.raises(KernelArgumentError, match=r"b_mask must be W's packed mask, int32 \(8, 2\)"):
        cpu.gemm(a, w.t(), b_mask=torch.zeros(40, 1, dtype=torch.int32))
    with pytest.raises(KernelArgumentError, match="contiguous W or W.t()"):
        cpu.gemm(a, torch.zeros(40, 16)[:, ::2])
    with pytest.raises(KernelArgumentError, match="b_mask goes with an fp32 b only"):
        cpu.gemm(a, w.t().to(torch.bfloat16), b_mask=torch.zeros(8, 2, dtype=torch.int32))
    with pytest.raises(KernelArgumentError, match="contiguous W or W.t()"):  # fp32 a with a mask: the same rule
        cpu.gemm(torch.zeros(3, 8), torch.zeros(8, 16)[:, ::2], b_mask=torch.zeros(8, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="b_mask must be W's packed mask"):  # the raw op checks too
        cpu._ops().gemm(a, w.t(), None, "auto", torch.zeros(3, 3, dtype=torch.int32))


def test_gemm_epilogue_errors_name_the_argument():
    a, b = torch.zeros(3, 4), torch.zeros(4, 40)
    with pytest.raises(KernelArgumentError, match="epilogue must be one of"):
        cpu.gemm_epilogue(a, b, "gelu", bias=torch.zeros(40))
    with pytest.raises(KernelArgumentError, match=r"'bias_relu' needs bias, float32 \(40,\), got \(39,\)"):
        cpu.gemm_epilogue(a, b, "bias_relu", bias=torch.zeros(39))
    with pytest.raises(KernelArgumentError, match=r"needs residual, float32 \(3, 40\), got None"):
        cpu.gemm_epilogue(a, b, "bias_dropout_add", bias=torch.zeros(40))
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        cpu.gemm_epilogue(a, b, "bias_dropout_add", bias=torch.zeros(40), residual=torch.zeros(3, 40), p=1.0)
    with pytest.raises(KernelArgumentError, match=r"'relu_grad' needs residual = the ReLU's output, torch.float32 \(3, 40\)"):
        cpu.gemm_epilogue(a, b, "relu_grad", residual=torch.zeros(3, 40, dtype=torch.bfloat16))
    with pytest.raises(KernelArgumentError, match=r"needs mask, packed int32 \(3, 2\)"):
        cpu.gemm_epilogue(a, b, "masked_grad", mask=torch.zeros(3, 1, dtype=torch.int32))
    if not cpu.f32_gemm_available():
        with pytest.raises(KernelArgumentError, match="engine 'native' for fp32 is the AVX-512 kernel"):
            cpu.gemm_epilogue(a, b, "bias_relu", bias=torch.zeros(40), engine="native")
    if not cpu.bf16_gemm_available():
        with pytest.raises(KernelArgumentError, match="engine 'native' for bf16 is the AVX512-BF16 kernel"):
            cpu.gemm_epilogue(a.to(torch.bfloat16), b.to(torch.bfloat16), "bias_relu", bias=torch.zeros(40), engine="native")
    with pytest.raises(ValueError, match="epilogue must be .bias_relu."):  # the raw op checks too
        cpu._ops().gemm_epilogue(a, b, "gelu", None, None, None, 0, 0.0, "auto")


def test_gemm_reads_strided_operands_and_auto_picks_the_fp32_engine():
    big = torch.randn(40, 70, generator=_gen(4))
    a, b = big[::2, :33], big[5:38, ::3]  # neither contiguous nor transposed: copied first
    torch.testing.assert_close(cpu.gemm(a, b), a @ b, rtol=1e-5, atol=1e-4)
    x, w = torch.randn(592, 256, generator=_gen(5)), torch.randn(1024, 256, generator=_gen(6))
    if cpu.f32_native_by_default():  # auto runs the native kernel: bit-identical
        assert torch.equal(cpu.gemm(x, w.t(), engine="auto"), cpu.gemm(x, w.t(), engine="native"))
    elif cpu.onednn_gemm_available():  # auto and onednn run the same kernels: bit-identical
        assert torch.equal(cpu.gemm(x, w.t(), engine="auto"), cpu.gemm(x, w.t(), engine="onednn"))
    if cpu.f32_gemm_available() and cpu.onednn_gemm_available():  # two engines, one answer to fp32 accuracy
        torch.testing.assert_close(cpu.gemm(x, w.t(), engine="native"), cpu.gemm(x, w.t(), engine="onednn"), rtol=1e-5, atol=1e-4)


def test_gemm_errors_name_the_argument():
    with pytest.raises(KernelArgumentError, match=r"gemm: a \(3, 4\) must be \(M, K\) and b \(5, 2\)"):
        cpu.gemm(torch.zeros(3, 4), torch.zeros(5, 2))
    with pytest.raises(KernelDTypeError, match="one dtype"):
        cpu.gemm(torch.zeros(3, 4), torch.zeros(4, 2, dtype=torch.bfloat16))
    with pytest.raises(KernelDTypeError, match="a must be float32, bfloat16"):
        cpu.gemm(torch.zeros(3, 4, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(KernelArgumentError, match=r"bias \(3,\)"):
        cpu.gemm(torch.zeros(3, 4), torch.zeros(4, 2), torch.zeros(3))
    with pytest.raises(KernelArgumentError, match="engine must be one of"):
        cpu.gemm(torch.zeros(3, 4), torch.zeros(4, 2), engine="mkl")


@pytest.mark.parametrize("m,k,n", GEMM_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_f_linear_with_every_gradient(m, k, n, dtype, with_bias):
    x = torch.randn(m, k, generator=_gen(1)).to(dtype).requires_grad_()
    w = torch.randn(n, k, generator=_gen(2)).to(dtype).requires_grad_()
    b = torch.randn(n, generator=_gen(3)).to(dtype).requires_grad_() if with_bias else None
    g = torch.randn(m, n, generator=_gen(4)).to(dtype)
    inputs = [x, w] + ([b] if with_bias else [])
    y = cpu.linear(x, w, b)
    y_ref = torch.nn.functional.linear(*(t.double() for t in inputs))
    torch.testing.assert_close(y, y_ref.to(dtype), **_tol(dtype, k))
    got = torch.autograd.grad(y, inputs, g)
    xd, wd = x.detach().double(), w.detach().double()
    gd = g.double()
    want = [gd @ wd, gd.t() @ xd] + ([gd.sum(0)] if with_bias else [])
    for name, a, e, kk in zip(("dx", "dweight", "dbias"), got, want, (n, m, m)):
        assert a.dtype == dtype and a.shape == e.shape, name
        torch.testing.assert_close(a, e.to(dtype), **_tol(dtype, kk), msg=lambda s, name=name: f"{name}: {s}")


def test_linear_partial_gradients_and_dispatch():
    x = torch.randn(9, 6, generator=_gen(1))
    w = torch.randn(4, 6, generator=_gen(2), requires_grad=True)
    (gw,) = torch.autograd.grad(cpu.linear(x, w).sum(), [w])  # x needs no gradient
    torch.testing.assert_close(gw, torch.ones(9, 4).t() @ x, rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, 3, 6, generator=_gen(3))  # kernels.linear takes (..., K) like F.linear
    torch.testing.assert_close(kernels.linear(x3, w, backend="cpu"), torch.nn.functional.linear(x3, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernels.linear(x3, w, backend="reference"), torch.nn.functional.linear(x3, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # operands cast as F.linear does under autocast
        y = kernels.linear(x3, w, backend="cpu")
        y_ref = torch.nn.functional.linear(x3, w)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=1.6e-2, atol=2e-2)
    with pytest.raises(kernels.BackendUnavailable, match="linear has no Triton kernel"):
        kernels.linear(x3, w, backend="triton")
    with pytest.raises(KernelArgumentError, match=r"linear: x \(9, 5\) must be \(M, K\) and weight \(4, 6\)"):
        cpu.linear(torch.zeros(9, 5), w)
    with pytest.raises(KernelArgumentError, match=r"bias \(5,\)"):
        cpu.linear(x, w, torch.zeros(5))


# ----------------------------------------------------------------------------------------------
# GEMM epilogues (bias + ReLU in place; bias + dropout + residual)

EPILOGUE_SHAPES = [(1, 1), (3, 5), (7, 16), (5, 37), (33, 257), (592, 1024), (0, 8), (2, 3, 48)]


def _grads(out, inputs, g):
    return torch.autograd.grad(out, [t for t in inputs if t.requires_grad], g)


@pytest.mark.parametrize("shape", EPILOGUE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_relu_matches_reference(shape, dtype):
    z0 = torch.randn(shape, generator=_gen(1)).to(dtype).requires_grad_()
    bias = torch.randn(shape[-1], generator=_gen(2), requires_grad=True)
    g = torch.randn(shape, generator=_gen(3)).to(dtype)
    runs = []
    for backend in ("cpu", "reference"):
        z = z0 * 1  # a fresh non-leaf, as a GEMM output
        out = kernels.bias_relu_(z, bias, backend=backend)
        assert out is z and out.dtype == dtype  # in place
        runs.append((out.detach(), *_grads(out, (z0, bias), g)))
    tol = TOL if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)  # one rounding of z + b either way
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=0)  # the gradient only gates
    torch.testing.assert_close(runs[0][2], runs[1][2], **(dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else tol))


def test_bias_relu_without_bias_gradient_and_errors():
    z0 = torch.randn(6, 20, generator=_gen(4), requires_grad=True)
    bias = torch.randn(20, generator=_gen(5))  # no gradient wanted
    z = z0 * 1
    (gz,) = torch.autograd.grad(kernels.bias_relu_(z, bias, backend="cpu"), z0, torch.ones(6, 20))
    torch.testing.assert_close(gz, ((z0 + bias) > 0).float())
    with pytest.raises(ValueError, match=r"bias \(7,\) must be the last dimension of \(6, 20\)"):
        cpu.bias_relu_(torch.zeros(6, 20), torch.zeros(7))
    with pytest.raises(TypeError, match="z must be float32, bfloat16, got float64"):
        cpu.bias_relu_(torch.zeros(6, 20, dtype=torch.float64), torch.zeros(20))
    with pytest.raises(ValueError, match="z must be contiguous"):
        cpu.bias_relu_(torch.zeros(20, 6).t(), torch.zeros(20))
    with pytest.raises(kernels.BackendUnavailable, match="no Triton kernel"):
        kernels.bias_relu_(torch.zeros(3, 2), torch.zeros(2), backend="triton")


@pytest.mark.parametrize("shape", EPILOGUE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_sums_match_float64_sums(shape, dtype):
    """column_sums (the bf16 block node's qkv bias gradient) against float64 row sums of the same
    values: fp32 accumulation, one partial row per thread."""
    g = torch.randn(shape, generator=_gen(36)).to(dtype)
    got = torch.ops.harmodt_kernels.column_sums(g)
    want = g.double().reshape(-1, shape[-1]).sum(0)
    assert got.dtype == torch.float32 and got.shape == (shape[-1],)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="column_sums: grad must be float32 or bfloat16"):
        torch.ops.harmodt_kernels.column_sums(g.double())


@pytest.mark.parametrize("shape", EPILOGUE_SHAPES)
def test_in_place_epilogues_equal_their_out_of_place_ops(shape):
    """bias_relu_backward_ / bias_dropout_add_ (the fused block's: written over a fresh GEMM output)
    give bit for bit what bias_relu_backward / bias_dropout_add return."""
    ops = torch.ops.harmodt_kernels
    g, z = torch.randn(shape, generator=_gen(31)), torch.relu(torch.randn(shape, generator=_gen(32)))
    y, res, bias = torch.randn(shape, generator=_gen(33)), torch.randn(shape, generator=_gen(34)), torch.randn(shape[-1], generator=_gen(35))
    dz, db = ops.bias_relu_backward(g, z, True)
    g2 = g.clone()
    db2 = ops.bias_relu_backward_(g2, z, True)
    assert torch.equal(g2, dz) and torch.equal(db2, db)
    want = ops.bias_dropout_add(y, bias, res, 7, 0.3)
    y2 = y.clone()
    got = ops.bias_dropout_add_(y2, bias, res, 7, 0.3)
    assert torch.equal(got, want) and torch.equal(y2, want)
    with pytest.raises(ValueError, match="y is BFloat16, residual is Float"):
        ops.bias_dropout_add_(y.bfloat16(), bias, res, 7, 0.3)
    with pytest.raises(ValueError, match="grad has shape"):
        ops.bias_relu_backward_(torch.zeros(*shape[:-1], shape[-1] + 1), z, True)


@pytest.mark.parametrize("shape", [(592, 256), (1, 1), (7, 5), (3, 4, 17), (0, 16), (33, 1000), (2, 16), (5, 0)])
def test_layer_norm_matches_float64_layer_norm(shape):
    x0 = (torch.randn(shape, generator=_gen(21)) * 3 + 1).requires_grad_()
    w0 = torch.randn(shape[-1], generator=_gen(22), requires_grad=True)
    b0 = torch.randn(shape[-1], generator=_gen(23), requires_grad=True)
    g = torch.randn(shape, generator=_gen(24))
    got = kernels.layer_norm(x0, w0, b0, 1e-5, backend="cpu")
    got_grads = _grads(got, (x0, w0, b0), g)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x0, w0, b0))
    want = torch.nn.functional.layer_norm(xd, (shape[-1],), wd, bd, 1e-5)
    want_grads = _grads(want, (xd, wd, bd), g.double())
    torch.testing.assert_close(got, want.float(), **TOL)
    for a, b in zip(got_grads, want_grads):  # dx, dw, db (dw, db: sums over up to 592 rows)
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-4)


def test_layer_norm_backward_adds_the_extra_gradient_and_errors():
    x = torch.randn(9, 40, generator=_gen(25))
    w, b = torch.randn(40, generator=_gen(26)), torch.randn(40, generator=_gen(27))
    gy, extra = torch.randn(9, 40, generator=_gen(28)), torch.randn(9, 40, generator=_gen(29))
    ops = torch.ops.harmodt_kernels
    y, mean, rstd = ops.layer_norm_forward(x, w, b, 1e-5)
    torch.testing.assert_close(mean, x.mean(-1), **TOL)
    torch.testing.assert_close(rstd, (x.var(-1, unbiased=False) + 1e-5).rsqrt(), **TOL)
    dx, dw, db = ops.layer_norm_backward(gy, x, mean, rstd, w, None)
    dx2, dw2, db2 = ops.layer_norm_backward(gy, x, mean, rstd, w, extra)
    torch.testing.assert_close(dx2, dx + extra, rtol=0, atol=1e-6)
    assert torch.equal(dw, dw2) and torch.equal(db, db2)
    with pytest.raises(ValueError, match=r"weight \(7,\) and bias \(40,\) must be the last dimension of x \(9, 40\)"):
        cpu.layer_norm(x, torch.zeros(7), b)
    with pytest.raises(TypeError, match="x must be float32, got float64"):
        cpu.layer_norm(x.double(), w, b)
    with pytest.raises(ValueError, match="x must be contiguous"):
        cpu.layer_norm(torch.zeros(40, 9).t(), w, b)
    with pytest.raises(ValueError, match="grad_extra has shape"):
        ops.layer_norm_backward(gy, x, mean, rstd, w, extra[:, :3].contiguous())
    with pytest.raises(kernels.BackendUnavailable, match="no Triton kernel"):
        kernels.layer_norm(x, w, b, backend="triton")
    torch.testing.assert_close(kernels.layer_norm(x.double(), w.double(), b.double()),  # auto: other dtypes take the reference
                               torch.nn.functional.layer_norm(x.double(), (40,), w.double(), b.double()))


@pytest.mark.parametrize("shape", [(592, 256), (3, 5, 17), (1, 1), (7, 300), (0, 8)])
def test_layer_norm_bf16_output_and_bf16_gradient(shape):
    """The bf16 GEMMs' side of the norm: out_dtype=bfloat16 writes exactly the fp32 output rounded
    to bf16 (same mean/rstd), and a bf16 dy gives exactly the fp32 backward of that dy widened."""
    ops = torch.ops.harmodt_kernels
    x = torch.randn(shape, generator=_gen(31)) * 2 + 0.5
    w, b = torch.randn(shape[-1], generator=_gen(32)), torch.randn(shape[-1], generator=_gen(33))
    y, mean, rstd = ops.layer_norm_forward(x, w, b, 1e-5)
    y16, mean16, rstd16 = ops.layer_norm_forward(x, w, b, 1e-5, torch.bfloat16)
    assert y16.dtype == torch.bfloat16 and mean16.dtype == rstd16.dtype == torch.float32
    assert torch.equal(y16, y.bfloat16()) and torch.equal(mean16, mean) and torch.equal(rstd16, rstd)
    gy = (torch.randn(shape, generator=_gen(34)) * 3).bfloat16()
    extra = torch.randn(shape, generator=_gen(35))
    for e in (None, extra):
        got = ops.layer_norm_backward(gy, x, mean, rstd, w, e)
        want = ops.layer_norm_backward(gy.float(), x, mean, rstd, w, e)
        for a, bb in zip(got, want):
            assert a.dtype == torch.float32
            assert torch.equal(a, bb)
    with pytest.raises(ValueError, match="out_dtype must be float32 or bfloat16, got Half"):
        ops.layer_norm_forward(x, w, b, 1e-5, torch.float16)
    with pytest.raises(ValueError, match="grad_y must be float32 or bfloat16, got Half"):
        ops.layer_norm_backward(gy.half(), x, mean, rstd, w, None)


@pytest.mark.parametrize("shape", EPILOGUE_SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("y_dtype,res_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float32)])  # (the last: bf16 autocast)
def test_bias_dropout_add_matches_reference(shape, p, y_dtype, res_dtype):
    y = torch.randn(shape, generator=_gen(6)).to(y_dtype).requires_grad_()
    bias = torch.randn(shape[-1], generator=_gen(7), requires_grad=True)
    res = torch.randn(shape, generator=_gen(8)).to(res_dtype).requires_grad_()
    g = torch.randn(shape, generator=_gen(9)).to(res_dtype)
    seed = 2**62 + 99
    runs = []
    for backend in ("cpu", "reference"):
        out = kernels.bias_dropout_add(y, bias, res, p, seed, backend=backend)
        assert out.dtype == res_dtype
        runs.append((out.detach(), *_grads(out, (y, bias, res), g)))
    exact = y_dtype == res_dtype == torch.float32
    for a, b in zip(*runs):
        if a.dtype == torch.bfloat16:
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5 if exact else 1e-3, atol=1e-4 if a.dim() == 1 else 1e-5)
    # the keep mask is kernels.dropout's for the same seed over y's elements
    if p > 0 and y_dtype == torch.float32:
        with torch.no_grad():
            want = res + kernels.dropout(y + bias, p, seed)
            torch.testing.assert_close(runs[0][0], want.to(res_dtype), **TOL)


def test_bias_dropout_add_rate_and_errors():
    y = torch.randn(64, 256, generator=_gen(10))
    out = kernels.bias_dropout_add(y, torch.zeros(256), torch.zeros(64, 256), 0.1, 3, backend="cpu")
    assert abs((out != 0).float().mean().item() - 0.9) < 0.01
    with pytest.raises(ValueError, match=r"y \(4, 8\) and residual \(4, 9\) must have one shape"):
        cpu.bias_dropout_add(torch.zeros(4, 8), torch.zeros(8), torch.zeros(4, 9), 0, 0.1)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        cpu.bias_dropout_add(torch.zeros(4, 8), torch.zeros(8), torch.zeros(4, 8), 0, 1.0)
    with pytest.raises(TypeError, match="residual must be float32, bfloat16, got float64"):
        cpu.bias_dropout_add(torch.zeros(4, 8), torch.zeros(8), torch.zeros(4, 8, dtype=torch.float64), 0, 0.1)
    with pytest.raises(ValueError, match=r"bias \(4,\) must be the last dimension of \(4, 8\)"):
        cpu.bias_dropout_add(torch.zeros(4, 8), torch.zeros(4), torch.zeros(4, 8), 0, 0.1)


# ----------------------------------------------------------------------------------------------
# attention (fused causal attention from the packed qkv projection)


def _attention_case(b, t, h, d, tp, query, p, dtype=torch.float32, seed=0):
    g = _gen(seed)
    qkv = torch.randn(b, t, 3, h, d, generator=g).to(dtype)
    prefix = None
    if tp:
        prefix = (torch.randn(b, h, tp, d, generator=g).to(dtype), torch.randn(b, h, tp, d, generator=g).to(dtype))
    valid = torch.rand(b, tp + t, generator=g) > 0.2  # random padding, queries see themselves anyway
    if b > 1:
        valid[-1] = False  # a row with nothing valid but each query itself
    query_pos = torch.arange(tp, tp + t)[query]
    return qkv, prefix, valid, query_pos


@pytest.mark.parametrize(
    "b,t,h,d,tp,query,p",
    [
        (8, 75, 8, 32, 0, slice(None), 0.1),  # the paper model's training shape
        (8, 75, 8, 32, 0, slice(1, None, 3), 0.1),  # last block: the state tokens only
        (5, 59, 8, 32, 15, slice(None), 0.0),  # evaluation with the cached prompt
        (5, 59, 8, 32, 15, slice(58, None), 0.0),  # evaluation's last block: the current token
        (1, 1, 1, 1, 0, slice(None), 0.0),  # one token, one head, D = 1
        (3, 7, 2, 5, 0, slice(None), 0.3),  # odd sizes
        (2, 33, 3, 17, 4, slice(None), 0.5),  # D not a multiple of 16, a short prefix
        (2, 20, 1, 48, 0, slice(None), 0.0),  # D between 32 and 64
        (2, 40, 2, 64, 3, slice(0, 40, 7), 0.2),
        (4, 9, 2, 8, 0, slice(0, 0), 0.1),  # no queries at all
        (2, 12, 2, 16, 2, torch.tensor([7, 3, 11, 0, 5]), 0.2),  # queries out of order
    ],
)
def test_attention_matches_reference(b, t, h, d, tp, query, p):
    qkv, prefix, valid, qpos = _attention_case(b, t, h, d, tp, query, p)
    a, r = qkv.clone().requires_grad_(), qkv.clone().requires_grad_()
    got = kernels.attention(a, valid, qpos, prefix, p, seed=11, backend="cpu")
    want = ref.attention(r, valid, qpos, prefix, p, seed=11)
    assert got.shape == (b, len(qpos), h * d)
    torch.testing.assert_close(got, want, **TOL)
    grad = torch.randn(got.shape, generator=_gen(1))
    got.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(a.grad, r.grad, **TOL)
    if len(qpos) < t:  # tokens that are no query get no query gradient
        not_q = torch.ones(t, dtype=torch.bool)
        not_q[qpos - tp] = False
        assert torch.all(a.grad[:, not_q, 0] == 0)


@pytest.mark.parametrize(
    "b,t,h,d,tp,query,p",
    [
        (4, 30, 4, 32, 5, slice(None), 0.1),
        (8, 74, 8, 32, 0, slice(None), 0.1),  # the paper model's training shape (bf16 dot products: D = 32)
        (8, 74, 8, 32, 0, slice(1, None, 3), 0.1),  # last block: the state tokens only
        (3, 75, 2, 64, 0, slice(None), 0.2),  # odd T: an odd number of query rows to pair
        (5, 59, 8, 32, 15, slice(58, None), 0.0),  # evaluation's last block: one query, a cached prompt
        (2, 12, 2, 32, 2, torch.tensor([7, 3, 11, 0, 5]), 0.2),  # queries out of order
        (4, 9, 2, 32, 0, slice(0, 0), 0.1),  # no queries at all
        (2, 33, 3, 16, 4, slice(None), 0.3),  # D = 16: the fp32 products
        (1, 1, 1, 32, 0, slice(None), 0.0),  # one token
    ],
)
def test_attention_bf16_matches_reference(b, t, h, d, tp, query, p):
    """bf16 q/k/v (with D a multiple of 32 and AVX512-BF16: the products on bf16 dot products, P
    and dS rounded to bf16) against the fp32 reference on the same bf16 inputs."""
    qkv, prefix, valid, qpos = _attention_case(b, t, h, d, tp, query, p, torch.bfloat16)
    a, r = qkv.clone().requires_grad_(), qkv.clone().requires_grad_()
    got = kernels.attention(a, valid, qpos, prefix, p, seed=3, backend="cpu")
    want = ref.attention(r, valid, qpos, prefix, p, seed=3)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    grad = torch.randn(got.shape, generator=_gen(2)).bfloat16()
    got.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(a.grad.float(), r.grad.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "b,t,h,d,tp,query,p,dtype",
    [
        (8, 74, 8, 32, 0, slice(None), 0.1, torch.float32),  # the training step's blocks
        (8, 74, 8, 32, 0, slice(1, None, 3), 0.1, torch.float32),  # last block: the state tokens only
        (3, 7, 2, 5, 4, slice(None), 0.3, torch.float32),  # odd sizes with a prefix (which gets no bias)
        (2, 12, 2, 16, 2, torch.tensor([7, 3, 11, 0, 5]), 0.2, torch.float32),  # queries out of order
        (4, 9, 2, 8, 0, slice(0, 0), 0.1, torch.float32),  # no queries: zero gradients
        (4, 30, 4, 32, 5, slice(None), 0.1, torch.bfloat16),  # bf16 projection, fp32 bias
    ],
)
def test_attention_qkv_bias_matches_reference(b, t, h, d, tp, query, p, dtype):
    """The projection's bias added inside the attention: output, the qkv gradient and the bias
    gradient (column sums) against the reference on qkv + bias."""
    qkv, prefix, valid, qpos = _attention_case(b, t, h, d, tp, query, p, dtype)
    bias = torch.randn(3 * h * d, generator=_gen(5))
    a, r = qkv.clone().requires_grad_(), qkv.clone().requires_grad_()
    ba, br = bias.clone().requires_grad_(), bias.clone().requires_grad_()
    got = kernels.attention(a, valid, qpos, prefix, p, seed=11, backend="cpu", qkv_bias=ba)
    want = ref.attention(r, valid, qpos, prefix, p, seed=11, qkv_bias=br)
    assert got.dtype == dtype and got.shape == (b, len(qpos), h * d)
    tol = TOL if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    grad = torch.randn(got.shape, generator=_gen(1)).to(dtype)
    got.backward(grad)
    want.backward(grad)
    gtol = TOL if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(a.grad.float(), r.grad.float(), **gtol)
    assert ba.grad.dtype == torch.float32
    # a sum over B * T rows: the summation order alone moves it by ~1e-5
    torch.testing.assert_close(ba.grad, br.grad, **(dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)))
    torch.testing.assert_close(ba.grad.double(), a.grad.double().reshape(-1, 3 * h * d).sum(0), rtol=1e-5, atol=1e-5)
    if len(qpos) == 0:
        assert torch.all(ba.grad == 0)
    # the same as adding the bias to the projection first (what the GEMM used to write)
    if dtype == torch.float32:
        torch.testing.assert_close(got, kernels.attention(qkv + bias.view(3, h, d), valid, qpos, prefix, p, seed=11, backend="cpu"), **TOL)


def test_attention_qkv_bias_errors_name_the_argument():
    qkv, prefix, valid, qpos = _attention_case(2, 6, 2, 4, 3, slice(None), 0.0)
    with pytest.raises(cpu.KernelArgumentError, match=r"qkv_bias must be \(24,\)"):
        kernels.attention(qkv, valid, qpos, prefix, backend="cpu", qkv_bias=torch.zeros(23))
    with pytest.raises(TypeError, match="qkv_bias must be float32"):
        kernels.attention(qkv, valid, qpos, prefix, backend="cpu", qkv_bias=torch.zeros(24, dtype=torch.float64))
    op = torch.ops.harmodt_kernels.attention_forward
    with pytest.raises(ValueError, match="qkv_bias must be a contiguous float32 CPU tensor of shape"):
        op(qkv, prefix[0], prefix[1], valid, qpos, 0.0, 0, False, torch.zeros(24, dtype=torch.bfloat16))


def test_attention_dropout_is_kernels_dropout_on_the_probabilities():
    """The keep mask equals kernels.dropout's on the (B, H, Tq, Tk) probabilities (same seed), and
    a new seed draws a new mask."""
    qkv, _, valid, qpos = _attention_case(2, 12, 2, 8, 0, slice(None), 0.5)
    y0 = kernels.attention(qkv, valid, qpos, None, 0.5, seed=7, backend="cpu")
    assert torch.equal(y0, kernels.attention(qkv, valid, qpos, None, 0.5, seed=7, backend="cpu"))
    assert not torch.allclose(y0, kernels.attention(qkv, valid, qpos, None, 0.5, seed=8, backend="cpu"))
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    att = ((q @ k.transpose(-2, -1)) / 8**0.5).masked_fill(~ref.attention_mask(valid, qpos), float("-inf")).softmax(-1)
    want = (kernels.dropout(att, 0.5, seed=7) @ v).transpose(1, 2).reshape(2, 12, 16)
    torch.testing.assert_close(y0, want, **TOL)


def test_attention_errors_name_the_argument():
    qkv, prefix, valid, qpos = _attention_case(2, 6, 2, 4, 3, slice(None), 0.0)
    with pytest.raises(cpu.KernelArgumentError, match="qkv must be"):
        kernels.attention(qkv[:, :, 0], valid, qpos, prefix, backend="cpu")
    with pytest.raises(ValueError, match="query_pos"):
        kernels.attention(qkv, valid, qpos - 3, prefix, backend="cpu")  # prefix positions are no queries
    with pytest.raises(ValueError, match="key_valid"):
        kernels.attention(qkv, valid[:, 1:], qpos, prefix, backend="cpu")
    with pytest.raises(cpu.KernelArgumentError, match="p must be"):
        kernels.attention(qkv, valid, qpos, prefix, 1.0, backend="cpu")
    with pytest.raises(cpu.KernelArgumentError, match="prefix"):
        kernels.attention(qkv, valid, qpos, (prefix[0].clone().requires_grad_(), prefix[1]), backend="cpu")
    with pytest.raises(kernels.BackendUnavailable, match="Triton"):
        kernels.attention(qkv, valid, qpos, prefix, backend="triton")


# ----------------------------------------------------------------------------------------------
# masked_mlp (inference MLP of a block through per-row task masks)


@pytest.mark.parametrize(
    "r,k,hd,n,t_count,layout",
    [(590 * 3, 32, 128, 32, 3, "task-major"), (37, 13, 29, 11, 4, "shuffled"), (1, 5, 7, 3, 1, "task-major"),
     (300, 16, 64, 16, 50, "shuffled"), (64, 8, 16, 8, 3, "empty-task")],
)
def test_masked_mlp_matches_reference(r, k, hd, n, t_count, layout):
    g = _gen(r + k)
    x = torch.randn(r, k, generator=g)
    w1, b1 = torch.randn(hd, k, generator=g), torch.randn(hd, generator=g)
    w2, b2 = torch.randn(n, hd, generator=g), torch.randn(n, generator=g)
    m1 = ref.pack_masks(torch.rand(t_count, hd, k, generator=g) > 0.3)
    m2 = ref.pack_masks(torch.rand(t_count, n, hd, generator=g) > 0.3)
    if layout == "task-major":
        ids = torch.arange(t_count).repeat_interleave(r // t_count + 1)[:r]
    elif layout == "empty-task":
        ids = torch.randint(0, t_count - 1, (r,), generator=g)  # the last task has no row
    else:
        ids = torch.randint(0, t_count, (r,), generator=g)
    with torch.no_grad():
        got = kernels.masked_mlp(x, w1, b1, m1, w2, b2, m2, ids, backend="cpu")
        torch.testing.assert_close(got, ref.masked_mlp(x, w1, b1, m1, w2, b2, m2, ids), **TOL)
        torch.testing.assert_close(kernels.masked_mlp(x, w1, None, m1, w2, None, m2, ids, backend="cpu"),
                                   ref.masked_mlp(x, w1, None, m1, w2, None, m2, ids), **TOL)


def test_masked_mlp_refuses_gradients_and_names_shapes():
    x, w1, w2 = torch.randn(4, 8, requires_grad=True), torch.randn(16, 8), torch.randn(8, 16)
    m1, m2 = ref.pack_masks(torch.ones(2, 16, 8, dtype=torch.bool)), ref.pack_masks(torch.ones(2, 8, 16, dtype=torch.bool))
    ids = torch.tensor([0, 1, 1, 0])
    with pytest.raises(cpu.KernelArgumentError, match="inference-only"):
        kernels.masked_mlp(x, w1, None, m1, w2, None, m2, ids, backend="cpu")
    y = kernels.masked_mlp(x, w1, None, m1, w2, None, m2, ids)  # auto: differentiable composition
    y.sum().backward()
    assert x.grad is not None
    with torch.no_grad(), pytest.raises(ValueError, match="w2 must be"):
        kernels.masked_mlp(x, w1, None, m1, w2[:, :5], None, m2, ids, backend="cpu")


@pytest.mark.parametrize(
    "b,t,h,d,tp,tasks,query",
    [(12, 59, 8, 4, 15, "runs", slice(None)), (7, 9, 2, 8, 0, "shuffled", slice(None)), (40, 5, 2, 4, 3, "runs", slice(4, None)),
     (3, 1, 1, 4, 0, "one", slice(None)), (20, 6, 2, 4, 2, "one", slice(1, None, 2))],
)
def test_masked_qkv_attention_matches_reference(b, t, h, d, tp, tasks, query):
    """Projection and attention fused per run of one task's batch rows (runs longer than 16 are
    split) against masked_linear then attention."""
    g = _gen(b * t)
    c = h * d
    x, w, bias = torch.randn(b * t, c, generator=g), torch.randn(3 * c, c, generator=g) * 0.3, torch.randn(3 * c, generator=g)
    masks = ref.pack_masks(torch.rand(5, 3 * c, c, generator=g) > 0.3)
    if tasks == "runs":
        row_tasks = torch.arange(5).repeat_interleave(b // 5 + 1)[:b]
    elif tasks == "one":
        row_tasks = torch.full((b,), 2)
    else:
        row_tasks = torch.randint(0, 5, (b,), generator=g)
    prefix = None
    if tp:
        prefix = (torch.randn(b, h, tp, d, generator=g), torch.randn(b, h, tp, d, generator=g))
    valid = torch.rand(b, tp + t, generator=g) > 0.2
    qpos = torch.arange(tp, tp + t)[query]
    with torch.no_grad():
        got = kernels.masked_qkv_attention(x, w, bias, masks, row_tasks, h, valid, qpos, prefix, backend="cpu")
        want = ref.masked_qkv_attention(x, w, bias, masks, row_tasks, h, valid, qpos, prefix)
    torch.testing.assert_close(got, want, **TOL)
    with pytest.raises(cpu.KernelArgumentError, match="inference-only"):
        kernels.masked_qkv_attention(x.requires_grad_(), w, bias, masks, row_tasks, h, valid, qpos, prefix, backend="cpu")


@pytest.mark.parametrize("t_count,layout", [(1, "one"), (3, "task-major"), (4, "empty-task"), (50, "shuffled")])
def test_inference_ops_read_task_weights_exactly_like_the_bits(t_count, layout):
    """kernels.task_weights (every task's W * M, as evaluation expands them once) against
    torch.where on the unpacked bits, and masked_linear / masked_mlp / masked_qkv_attention reading
    them give bit for bit what they give expanding the bits per call; odd sizes, one task, fifty,
    a task with no rows. Wrong shapes and dtypes are named, and gradients are refused."""
    g = _gen(t_count + 91)
    c, h, r_per = 24, 3, 5
    b = t_count * 2
    if layout == "empty-task":
        row_tasks = torch.randint(0, t_count - 1, (b,), generator=g)
    elif layout == "shuffled":
        row_tasks = torch.randint(0, t_count, (b,), generator=g)
    else:
        row_tasks = torch.arange(t_count).repeat_interleave(2)
    x = torch.randn(b * r_per, c, generator=g)
    ids = row_tasks.repeat_interleave(r_per)
    mats = {"qkv": torch.randn(3 * c, c, generator=g), "proj": torch.randn(c - 5, c, generator=g),
            "fc": torch.randn(4 * c + 3, c, generator=g), "mlp": torch.randn(c, 4 * c + 3, generator=g)}
    bools = {k: torch.rand(t_count, *w.shape, generator=g) > 0.3 for k, w in mats.items()}
    packed = {k: ref.pack_masks(m) for k, m in bools.items()}
    tw = {k: kernels.task_weights(mats[k], packed[k], backend="cpu") for k in mats}
    for k in mats:
        assert torch.equal(tw[k], torch.where(bools[k], mats[k], 0.0))
        assert torch.equal(kernels.task_weights(mats[k], bools[k], backend="reference"), tw[k])
    bias = {k: torch.randn(w.shape[0], generator=g) for k, w in mats.items()}
    valid, qpos = torch.rand(b, r_per, generator=g) > 0.2, torch.arange(r_per)
    with torch.no_grad():
        lin = lambda **kw: kernels.masked_linear(x, mats["proj"], bias["proj"], packed["proj"], ids, backend="cpu", **kw)  # noqa: E731
        assert torch.equal(lin(task_weights=tw["proj"]), lin())
        mlp = lambda **kw: kernels.masked_mlp(x, mats["fc"], bias["fc"], packed["fc"], mats["mlp"], bias["mlp"], packed["mlp"], ids,  # noqa: E731
                                              backend="cpu", **kw)
        assert torch.equal(mlp(task_w1=tw["fc"], task_w2=tw["mlp"]), mlp())
        assert torch.equal(mlp(task_w2=tw["mlp"]), mlp())
        att = lambda **kw: kernels.masked_qkv_attention(x, mats["qkv"], bias["qkv"], packed["qkv"], row_tasks, h, valid, qpos,  # noqa: E731
                                                        backend="cpu", **kw)
        assert torch.equal(att(task_weights=tw["qkv"]), att())
        with pytest.raises(cpu.KernelArgumentError, match=r"task_weights must be \[%d, %d, %d\]" % (t_count, c - 5, c)):
            lin(task_weights=tw["proj"][:, :-1])
        with pytest.raises(cpu.KernelDTypeError, match="task_w1 dtype torch.float64"):
            mlp(task_w1=tw["fc"].double())
        with pytest.raises(cpu.KernelArgumentError, match=r"task_weights must be \[%d, %d, %d\]" % (t_count, 3 * c, c)):
            att(task_weights=tw["qkv"][:1].expand(t_count + 1, -1, -1))
    with pytest.raises(cpu.KernelArgumentError, match="task_weights is inference-only"):
        kernels.masked_linear(x.requires_grad_(), mats["proj"], bias["proj"], packed["proj"], ids, backend="cpu", task_weights=tw["proj"])


def test_fused_block_argument_errors():
    """The fused block op names the bad argument: the mask list, the norms buffer, the input, the GEMM dtype."""
    g = _gen(41)
    c, h = 8, 2
    x = torch.randn(1, 3, c, generator=g)
    ln = [torch.ones(c), torch.zeros(c)]
    mats = [torch.randn(3 * c, c, generator=g), torch.zeros(3 * c), torch.randn(c, c, generator=g), torch.zeros(c), *ln,
            torch.randn(4 * c, c, generator=g), torch.zeros(4 * c), torch.randn(c, 4 * c, generator=g), torch.zeros(c)]
    rest = [torch.ones(1, 3, dtype=torch.bool), torch.arange(3), h, 1e-5, 0.0, 0, 0.0, 0, 0.0, 0, None, "auto"]
    op = torch.ops.harmodt_kernels.fused_block
    want = op(x, *ln, *mats, *rest, [], None)
    assert want.shape == (1, 3, c)
    packed = [cpu.pack_masks(torch.ones(m.shape, dtype=torch.bool)) for m in (mats[0], mats[2], mats[6], mats[8])]
    norms = torch.full((4,), float("nan"), dtype=torch.float64)
    assert torch.equal(op(x, *ln, *mats, *rest, packed, norms), want)  # all-ones masks: the same block
    with pytest.raises(ValueError, match="masks must be empty or list the 4 matrices"):
        op(x, *ln, *mats, *rest, packed[:3], None)
    with pytest.raises(ValueError, match="grad_sq_norms must be a contiguous float64 tensor of 4 values"):
        op(x, *ln, *mats, *rest, packed, torch.zeros(4))
    with pytest.raises(ValueError, match="x must be a contiguous float32"):
        op(x.double(), *ln, *mats, *rest, [], None)
    with pytest.raises(ValueError, match="n_head 3 must divide the width 8"):
        op(x, *ln, *mats, *(rest[:2] + [3] + rest[3:]), [], None)
    with pytest.raises(ValueError, match="gemm_dtype must be float32 or bfloat16, got Half"):
        op(x, *ln, *mats, *rest, [], None, torch.float16)
    # bf16 GEMMs: the same block to bf16 rounding, in the residual stream's fp32
    low = op(x, *ln, *mats, *rest, packed, None, torch.bfloat16)
    assert low.dtype == torch.float32
    assert 0 < (low - want).abs().max() <= 0.03 * want.abs().max()  # (unit-variance weights: outputs of ~5)


@pytest.mark.skipif(cpu.onednn_gemm_available() or cpu.bf16_gemm_available(),
                    reason="oneDNN (or the AVX512-BF16 kernel) runs bf16 GEMMs here: no widened fp32 path")
def test_bf16_gemm_without_onednn_runs_fp32_products_even_under_autocast():
    """Where oneDNN does not run (AVX2-only CPUs), a bf16 gemm is the fp32 product of the widened
    operands rounded once -- also when called under CPU autocast (the bf16 block nodes), which
    would otherwise cast the fp32 operands back to bf16 for torch.mm's slow bf16 fallback."""
    g = torch.Generator().manual_seed(3)
    a, w = torch.randn(37, 29, generator=g).bfloat16(), torch.randn(41, 29, generator=g)
    mask = torch.rand(41, 29, generator=g) > 0.3
    bias = torch.randn(41, generator=g).bfloat16()
    wm = (w * mask).bfloat16()
    want = a.double() @ wm.double().t()
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.profiler.profile(record_shapes=True) as prof:
            got = cpu.gemm(a, w.t(), b_mask=cpu.pack_masks(mask))
            got_bias = cpu.gemm(a, wm.t(), bias)
        dtypes = [e.input_dtypes for e in prof.events() if e.name in ("aten::mm", "aten::addmm")]
        if cpu.f32_gemm_available():  # the widened product runs on the native fp32 kernel: no torch.mm at all
            assert dtypes == [], dtypes
        else:  # on torch.mm, in fp32
            assert dtypes and all(set(d) - {"", "Scalar"} == {"float"} for d in dtypes), dtypes
        assert got.dtype == got_bias.dtype == torch.bfloat16
        torch.testing.assert_close(got, want.bfloat16(), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(got_bias, (want + bias.double()).bfloat16(), rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------------------------
# core_round_trip_ns (the benchmarks' probe of where the two threads sit)


def test_core_round_trip_is_a_time_with_two_threads_and_nan_with_one():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        ns = cpu.core_round_trip_ns(200)
        # a cache line's trip between two cores: ~60-1500 ns on our machines; with more runnable threads
        # than cores (another job beside the tests) a spinning partner waits for its time slice, ~8 ms
        assert ns == ns and 1.0 < ns < 1e8
        torch.set_num_threads(1)
        assert cpu.core_round_trip_ns(10) != cpu.core_round_trip_ns(10)  # NaN: no second thread to bounce with
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(KernelArgumentError, match="rounds must be >= 1, got 0"):
        cpu.core_round_trip_ns(0)


@pytest.mark.skipif(not cpu.bf16_gemm_available(), reason="no AVX512-BF16 in this build or CPU: the native bf16 GEMM is not built")
def test_bf16_gemm_drops_shared_lines_without_changing_results():
    """With the threads taken to sit on two CCDs (HARMODT_THREADS_APART=1, read once per process),
    each bf16 GEMM drops the other thread's packed lines from the caches after use: the products
    (small integers: exact) stay those of float64 in every order the kernel takes (b-shared with
    b row-major and transposed, a packed, panel-outer)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from kernels import cpu\n"
        "torch.set_num_threads(2)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for m, k, n, at, bt in [(592, 256, 1024, 0, 0), (592, 256, 768, 0, 1), (1024, 592, 256, 1, 0), (256, 592, 1024, 1, 0), (200, 37, 40, 0, 0), (13, 600, 33, 1, 1)]:\n"
        "    a = torch.randint(-3, 4, (k, m) if at else (m, k), generator=g).to(torch.bfloat16)\n"
        "    b = torch.randint(-3, 4, (n, k) if bt else (k, n), generator=g).to(torch.bfloat16)\n"
        "    a, b = (a.t() if at else a), (b.t() if bt else b)\n"
        "    want = (a.double() @ b.double()).to(torch.bfloat16)\n"
        "    for _ in range(3):\n"
        "        assert torch.equal(cpu.gemm(a, b, engine='native'), want), (m, k, n, at, bt)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, HARMODT_THREADS_APART="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
