"""Triton masked AdamW and harmony_select against harmodt_kernels/reference.py, run by Triton's
interpreter on CPU tensors, with their torch.library registration.

On a CUDA machine TRITON_INTERPRET is not set and this module is skipped: tests/gpu/ runs the
same kernels compiled for the GPU.
"""

import os

import pytest
import torch

import harmodt_kernels
import harmodt_kernels.triton_harmony_select as ths
import harmodt_kernels.triton_masked_adamw as tma
from harmodt_kernels import reference as R

from harmodt.masks import IMPORTANCE

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)"),
]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _tri():
    return harmodt_kernels.backend_ops("triton")  # (TRITON_INTERPRET=1: the CPU interpreter)


# ---- masked AdamW ------------------------------------------------------------------------------

ADAMW_SHAPES = [(33, 70), (4, 31), (1, 1), (3, 5, 40), (6,), (9000,), (0, 5), ()]
ADAMW_MASKED = [True, True, False, True, True, False, False, False]


def _adamw_state(shapes, seed, masked=None):
    g = _gen(seed)
    masked = masked if masked is not None else [len(s) > 0 and 0 not in s for s in shapes]
    ps = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    m = [torch.randn(s, generator=g) * 0.1 for s in shapes]
    v = [torch.rand(s, generator=g) * 0.01 for s in shapes]
    masks = [R.pack_masks(torch.rand(s, generator=g) > 0.4) if mk else None for s, mk in zip(shapes, masked)]
    steps = [torch.tensor(float(i % 3)) for i in range(len(shapes))]
    return ps, grads, m, v, masks, steps


@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
def test_masked_adamw_matches_reference_and_keeps_masked_weights(scale_kind):
    tri = _adamw_state(ADAMW_SHAPES, seed=1, masked=ADAMW_MASKED)
    ref = _adamw_state(ADAMW_SHAPES, seed=1, masked=ADAMW_MASKED)
    before = [p.clone() for p in tri[0]]
    g = _gen(7)
    for it in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in tri[0]]
        scale = 0.25 * (it + 1) if scale_kind == "float" else torch.tensor(0.25 * (it + 1))
        for backend, (ps, _, m, v, masks, steps) in (("triton", tri), ("reference", ref)):
            harmodt_kernels.masked_adamw_(ps, grads, m, v, masks, steps, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                                  weight_decay=0.1, grad_scale=scale, backend=backend)
    for i, (p, p_ref, p0, mask) in enumerate(zip(tri[0], ref[0], before, tri[4])):
        if mask is not None:
            keep = R.unpack_masks(mask, p.shape[-1])
            assert torch.equal(p[~keep], p0[~keep]), i  # bit for bit, after three steps
            assert p.numel() == 0 or not torch.equal(p[keep], p0[keep]), i
        torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6, msg=f"param {i}")
    for xs, ys in ((tri[2], ref[2]), (tri[3], ref[3])):
        for a, e in zip(xs, ys):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)
    for a, e in zip(tri[5], ref[5]):
        assert torch.equal(a, e) and float(a) >= 3


def test_masked_adamw_lerp_branch_and_no_weight_decay():
    """beta1 < 0.5 takes torch.lerp's other form; weight_decay 0 leaves the decay factor at 1."""
    tri, ref = _adamw_state([(10, 40)], seed=2), _adamw_state([(10, 40)], seed=2)
    for backend, (ps, grads, m, v, masks, steps) in (("triton", tri), ("reference", ref)):
        harmodt_kernels.masked_adamw_(ps, grads, m, v, masks, steps, lr=3e-3, beta1=0.3, beta2=0.99, eps=1e-6, weight_decay=0.0,
                              backend=backend)
    for xs, ys in zip(tri[:4], ref[:4]):
        torch.testing.assert_close(xs[0], ys[0], rtol=1e-5, atol=1e-7)


class _CountingKernel:
    """Stands in for a @triton.jit kernel: counts launches and forwards them."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_masked_adamw_launches_per_step(monkeypatch):
    """Two launches per call whatever the number of parameters (one update, one step increment);
    a second parameter dtype adds two; the launch table is uploaded once for the same tensors
    when the caller keeps a workspace (as the optimizer does), at every call without one."""
    upd, stp = _CountingKernel(tma._adamw_kernel), _CountingKernel(tma._step_kernel)
    monkeypatch.setattr(tma, "_adamw_kernel", upd)
    monkeypatch.setattr(tma, "_step_kernel", stp)
    builds = []
    real_table = tma._table
    monkeypatch.setattr(tma, "_table", lambda *a: builds.append(1) or real_table(*a))
    shapes = [(24, 40), (24,), (8, 24), (8,)] * 6  # 24 parameters, 12 of them masked
    ps, grads, m, v, masks, steps = _adamw_state(shapes, seed=4)
    start = [float(s) for s in steps]
    workspace = {}
    for _ in range(2):
        harmodt_kernels.masked_adamw_(ps, grads, m, v, masks, steps, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                              grad_scale=torch.tensor(1.0), backend="triton", workspace=workspace)
    assert (upd.launches, stp.launches, len(builds)) == (2, 2, 1)
    half = [g.half() if i % 2 else g for i, g in enumerate(grads)]
    harmodt_kernels.masked_adamw_(ps, half, m, v, masks, steps, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, backend="triton")
    assert (upd.launches, stp.launches, len(builds)) == (4, 4, 3)  # no workspace: both tables built
    assert [float(s) for s in steps] == [s0 + 3 for s0 in start]


def test_masked_adamw_float16_grads_with_float32_params():
    tri, ref = _adamw_state([(10, 40), (5,)], seed=5), _adamw_state([(10, 40), (5,)], seed=5)
    half = [g.half() for g in tri[1]]
    harmodt_kernels.masked_adamw_(tri[0], half, *tri[2:], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, backend="triton")
    harmodt_kernels.masked_adamw_(ref[0], [h.float() for h in half], *ref[2:], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    for a, e in zip(tri[0], ref[0]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)


def test_masked_adamw_rejects_bad_arguments():
    def call(ps, grads, m, v, masks, steps, scale=1.0):
        _tri().masked_adamw(ps, grads, m, v, masks, steps, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                            grad_scale=scale)

    bad = harmodt_kernels.KernelArgumentError
    ps, grads, m, v, masks, steps = _adamw_state([(6, 40), (6,)], seed=6)
    with pytest.raises(bad, match="must have one length, got params: 2, grads: 1"):
        call(ps, grads[:1], m, v, masks, steps)
    with pytest.raises(bad, match=r"masks\[0\] must be int32 or bool, got int64"):
        call(ps, grads, m, v, [masks[0].long(), None], steps)
    with pytest.raises(bad, match=r"masks\[0\] must be \[6, 2\]"):
        call(ps, grads, m, v, [masks[0][:, :1], None], steps)
    with pytest.raises(bad, match=r"steps\[1\] must be float32, got int64"):
        call(ps, grads, m, v, masks, [steps[0], torch.tensor(0, dtype=torch.int64)])
    with pytest.raises(bad, match=r"steps\[1\] shares its storage with steps\[0\]"):
        call(ps, grads, m, v, masks, [steps[0], steps[0]])
    with pytest.raises(bad, match=r"grads\[0\] must be \[6, 40\]"):
        call(ps, [grads[0][:, :39], grads[1]], m, v, masks, steps)
    with pytest.raises(bad, match=r"params\[0\] must be contiguous"):
        call([torch.randn(40, 6).t(), ps[1]], grads, m, v, masks, steps)
    with pytest.raises(bad, match=r"exp_avgs\[1\] must be float32, got float64"):
        call(ps, grads, m[:1] + [m[1].double()], v, masks, steps)
    with pytest.raises(bad, match="grad_scale must be a float or a one-element float tensor"):
        call(ps, grads, m, v, masks, steps, scale=torch.ones(2))
    assert all(float(s) in (0.0, 1.0) for s in steps)  # nothing ran


# ---- harmony_select ----------------------------------------------------------------------------


def _select_inputs(t, p, seed, ints):
    g = _gen(seed)
    if ints:  # many exact ties
        f = lambda *s: torch.randint(-2, 3, s, generator=g).float()  # noqa: E731
    else:
        f = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return f(t, p), f(t, p), f(p), R.pack_masks(torch.rand(t, p, generator=g) > 0.3)


def _scores(mg, g, prm, importance, lam=0.5):
    """Algorithm 2's harmony and recovery scores of these gradients (as harmodt.masks.TaskMasks.update computes them)."""
    ghat = mg.mean(0)
    return mg * ghat + lam * IMPORTANCE[importance](mg, prm), g * ghat


@pytest.mark.parametrize("t,p,k,importance,ints", [
    (1, 33, 5, "magnitude", False), (3, 257, 7, "fisher", True), (3, 257, 7, "magnitude", True), pytest.param(50, 40, 2, "fisher", False, marks=pytest.mark.long),
    (3, 301, 200, "magnitude", False), (3, 301, 200, "fisher", True), (2, 40, 0, "magnitude", False), (3, 33, 1000, "fisher", True),
])
def test_harmony_select_equals_reference(t, p, k, importance, ints):
    mg, g, prm, m = _select_inputs(t, p, seed=t * 31 + p + k, ints=ints)
    got = harmodt_kernels.harmony_select(*_scores(mg, g, prm, importance), m, k, backend="triton")
    want = R.harmony_select(*_scores(mg, g, prm, importance), m, k)
    assert torch.equal(got, want)
    a, b = R.unpack_masks(m, p), R.unpack_masks(got, p)
    for i in range(t):
        kk = min(k, int(a[i].sum()), int((~a[i]).sum()))
        assert int((a[i] & ~b[i]).sum()) == kk == int((~a[i] & b[i]).sum())  # exactly k_i flipped each way


def test_harmony_popcount_rows_equals_unpacked_count():
    """The packed-word popcount (used above P = 2^22) counts as unpacking does, sign bit included."""
    m = torch.randint(-2**31, 2**31, (4, 300), generator=_gen(3), dtype=torch.int64).to(torch.int32)
    m[0, :4] = torch.tensor([-1, -2**31, 0, 2**31 - 1], dtype=torch.int32)
    assert torch.equal(ths._popcount_rows(m), R.unpack_masks(m, 300 * 32).sum(1))


@pytest.mark.parametrize("k,block,kc", [(5, 1024, 32), (100, 1024, 128), (129, 1024, 1024), (5, 128, 16), (17, 128, 128)])
def test_harmony_candidates_per_block(k, block, kc):
    """Few compiled variants (at least 32 candidates on a GPU block), every key once k passes an
    eighth of the block; the interpreter's 128-weight blocks take both paths in the test above."""
    assert ths.candidates_per_block(k, block) == kc


def test_harmony_select_rejects_bad_arguments():
    mg, g, prm, m = _select_inputs(3, 40, seed=0, ints=False)
    h, r = _scores(mg, g, prm, "fisher")
    hs, bad = _tri().harmony_select, harmodt_kernels.KernelArgumentError
    with pytest.raises(bad, match=r"recovery must be \[3, 40\] like harmony, got \[2, 40\]"):
        hs(h, r[:2], m, 3)
    with pytest.raises(bad, match=r"masks must be \[3, 2\] \(packed\), got \[3, 1\]"):
        hs(h, r, m[:, :1], 3)
    with pytest.raises(bad, match="harmony must be float32, got int64"):
        hs(h.long(), r, m, 3)


def test_opcheck_masked_adamw_and_harmony_select():
    """torch.library.opcheck: schema (declared mutations), fake tensors and AOT dispatch, on the real kernels."""
    ops = torch.ops.harmodt_triton
    ps = [torch.randn(5, 40, generator=_gen(1)), torch.randn(3, generator=_gen(2))]
    torch.library.opcheck(ops.masked_adamw_.default, (
        ps, [torch.randn_like(p) for p in ps], [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
        [R.pack_masks(torch.rand(5, 40, generator=_gen(3)) > 0.5), None], [torch.tensor(0.0), torch.tensor(4.0)],
        1e-3, 0.9, 0.999, 1e-8, 0.1, torch.tensor(0.5), 1.0))
    mg, g, p, masks = _select_inputs(3, 70, seed=1, ints=False)
    torch.library.opcheck(ops.harmony_select.default, (*_scores(mg, g, p, "fisher"), masks, 5))


def test_torch_compile_masked_adamw_is_one_op():
    ps, grads, m, v, masks, steps = _adamw_state([(20, 40), (7,)], seed=3)

    def step(ps, grads, m, v, masks, steps, scale):
        TRITON_ADAMW(ps, grads, m, v, masks, steps, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, grad_scale=scale)

    TRITON_ADAMW = _tri().masked_adamw

    torch._dynamo.reset()
    ex = torch._dynamo.explain(step)(ps, grads, m, v, masks, steps, torch.tensor(0.5))
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graphs[0].code.count("torch.ops.harmodt_triton.masked_adamw_") == 1
    a, b = _adamw_state([(20, 40), (7,)], seed=3), _adamw_state([(20, 40), (7,)], seed=3)
    torch.compile(step, backend="aot_eager", fullgraph=True)(*a, torch.tensor(0.5))
    step(*b, torch.tensor(0.5))
    for xs, ys in zip(a, b):
        for x_, y_ in zip(xs, ys):
            assert (x_ is None and y_ is None) or torch.equal(x_, y_)
