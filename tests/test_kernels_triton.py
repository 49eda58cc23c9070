"""Triton masked_linear against harmodt_kernels/reference.py, run by Triton's interpreter on CPU
tensors, and its torch.library registration (masked AdamW and harmony_select:
tests/test_kernels_triton_ops.py).

On a CUDA machine TRITON_INTERPRET is not set and this module is skipped: tests/gpu/ runs the
same kernels compiled for the GPU. The interpreter has no bfloat16; float16 stands in for the
16-bit paths here.
"""

import os

import pytest
import torch

import harmodt_kernels
import harmodt_kernels.triton_masked_linear as tml
from harmodt_kernels import reference as R

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)"),
]
TOL = dict(rtol=1e-5, atol=1e-5)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _linear_inputs(r, k, n, t, ids, seed, dtype=torch.float32):
    """x, w, b, packed masks, task ids. ids: "one" ([1]), "mixed" ([R], the last task absent when
    T > 1), "same" ([R], every row task T-1)."""
    g = _gen(seed)
    x = torch.randn(r, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    m = R.pack_masks(torch.rand(t, n, k, generator=g) > 0.3)
    if ids == "one":
        tid = torch.tensor([t - 1])
    elif ids == "same":
        tid = torch.full((r,), t - 1)
    else:
        tid = torch.randint(0, t, (r,), generator=g)
        if t > 1:
            tid[tid == t - 1] = 0  # the last task has no rows
    return x, w, b, m, tid


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every torch.empty / empty_like inside the op comes back full of NaN: an output element the
    kernels fail to write shows up as NaN in the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*a, **kw):
        t = real_empty(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty_like(*a, **kw):
        t = real_empty_like(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)


def _run_linear(backend, x, w, b, m, tid, dy, need=(True, True, True), x_noncontig=False):
    """y and the gradients of x, w, b and the task_grads buffer after y.backward(dy)."""
    xx = x.clone()
    if x_noncontig:  # every other column of a wider buffer: row stride 2K, column stride 2
        xx = torch.empty(x.shape[0], 2 * x.shape[1], dtype=x.dtype)[:, ::2].copy_(x)
    xx.requires_grad_(need[0])
    ww = w.clone().requires_grad_(need[1])
    bb = None if b is None else b.clone().requires_grad_(need[2])
    tg = torch.zeros(m.shape[0], *w.shape)
    y = harmodt_kernels.masked_linear(xx, ww, bb, m, tid, backend=backend, task_grads=tg)
    y.backward(dy)
    return y.detach(), xx.grad, ww.grad, None if bb is None else bb.grad, tg


# (R, K, N, T, ids, bias): R=1, odd R, K < 32, K not a multiple of 32, N=1, twenty tasks with
# most absent, task_ids [1], mixed tasks, every row one task given as [R].
LINEAR_CASES = [
    (1, 1, 1, 1, "one", True),
    (1, 40, 3, 4, "mixed", False),
    (7, 5, 33, 3, "mixed", True),
    (70, 33, 5, 20, "mixed", True),
    (7, 257, 5, 1, "one", True),
    (65, 5, 257, 3, "one", False),
    (70, 64, 1, 5, "mixed", True),
    (40, 31, 17, 6, "same", True),
]


@pytest.mark.parametrize("r,k,n,t,ids,bias", LINEAR_CASES)
def test_masked_linear_forward_and_every_gradient(r, k, n, t, ids, bias, poisoned_empty):
    x, w, b, m, tid = _linear_inputs(r, k, n, t, ids, seed=r * 7 + k + n + t)
    b = b if bias else None
    dy = torch.randn(r, n, generator=_gen(1))
    got = _run_linear("triton", x, w, b, m, tid, dy, x_noncontig=r % 2 == 1)
    want = _run_linear("reference", x, w, b, m, tid, dy)
    for name, a, e in zip(("y", "dx", "dw", "db", "task_grads"), got, want):
        if e is None:
            assert a is None, name
            continue
        assert not torch.isnan(a).any(), name
        torch.testing.assert_close(a, e, **TOL, msg=name)
    if r > 1:  # the gradient reaches only unmasked weights of the tasks present
        present = torch.zeros(t, dtype=torch.bool)
        present[tid] = True
        used = R.unpack_masks(m, k)[present].any(0)
        assert torch.all(got[2][~used] == 0)


def test_one_task_ids_equal_mixed_ids_of_that_task():
    """task_ids [1] (no grouping) and [R] all equal to that task give the same bits."""
    x, w, b, m, _ = _linear_inputs(77, 45, 20, 3, "one", seed=5)
    dy = torch.randn(77, 20, generator=_gen(2))
    one = _run_linear("triton", x, w, b, m, torch.tensor([1]), dy)
    mixed = _run_linear("triton", x, w, b, m, torch.full((77,), 1), dy)
    for a, e in zip(one, mixed):
        assert torch.equal(a, e)


def test_masked_linear_float16():
    """The 16-bit path: fp16 operands, fp32 accumulation, outputs and gradients in fp16."""
    x, w, b, m, tid = _linear_inputs(45, 70, 40, 3, "mixed", seed=9, dtype=torch.float16)
    dy = torch.randn(45, 40, generator=_gen(3)).half()
    got = _run_linear("triton", x, w, b, m, tid, dy)
    want = _run_linear("reference", x.float(), w.float(), b.float(), m, tid, dy.float())
    for name, a, e in zip(("y", "dx", "dw", "db", "task_grads"), got, want):
        assert a.dtype == (torch.float32 if name == "task_grads" else torch.float16), name
        torch.testing.assert_close(a.float(), e, rtol=1e-2, atol=3e-2, msg=name)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, True)])
def test_masked_linear_partial_gradients(need):
    """Only the gradients asked for; task_grads fill with the weight's gradient, as the reference's."""
    x, w, b, m, tid = _linear_inputs(20, 40, 9, 3, "mixed", seed=4)
    dy = torch.randn(20, 9, generator=_gen(5))
    got = _run_linear("triton", x, w, b, m, tid, dy, need=need)
    want = _run_linear("reference", x, w, b, m, tid, dy, need=need)
    for a, e in zip(got, want):
        assert (a is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(a, e, **TOL)
    assert bool(got[4].any()) == need[1]


def test_masked_linear_under_autocast_matches_reference():
    """harmodt_kernels.masked_linear casts for autocast before the op (fp16 here: the interpreter has no bf16)."""
    x, w, b, m, tid = _linear_inputs(30, 40, 9, 3, "mixed", seed=6)
    with torch.autocast("cpu", dtype=torch.float16):
        y = harmodt_kernels.masked_linear(x, w, b, m, tid, backend="triton")
        ref = harmodt_kernels.masked_linear(x, w, b, m, tid, backend="reference")
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=3e-2)


def _tri():
    return harmodt_kernels.backend_ops("triton")  # (TRITON_INTERPRET=1: the CPU interpreter)


def test_masked_linear_rejects_bad_arguments():
    x, w, b, m, tid = _linear_inputs(5, 40, 9, 2, "mixed", seed=0)
    ml = _tri().masked_linear
    bad = harmodt_kernels.KernelArgumentError
    with pytest.raises(bad, match=r"x must be \[R, K\]"):
        ml(x[None], w, b, m, tid)
    with pytest.raises(bad, match=r"weight must be \[N, 40\] to match x \[5, 40\], got \[9, 10\]"):
        ml(x, w[:, :10], b, m, tid)
    with pytest.raises(bad, match="x must be float32 or bfloat16 or float16, got float64"):
        ml(x.double(), w.double(), b.double(), m, tid)
    with pytest.raises(bad, match="weight must be float32, got float16"):
        ml(x, w.half(), b, m, tid)
    with pytest.raises(bad, match=r"bias must be \[9\]"):
        ml(x, w, b[:3], m, tid)
    with pytest.raises(bad, match=r"masks must be packed \[T, 9, 2\]"):
        ml(x, w, b, m[:, :, :1], tid)
    with pytest.raises(bad, match="masks must be int32, got bool"):
        ml(x, w, b, R.unpack_masks(m, 40), tid)
    with pytest.raises(bad, match=r"task_ids must be \[5\] .* or \[1\] .*got \[2\]"):
        ml(x, w, b, m, tid[:2])
    with pytest.raises(bad, match="task_ids must be int64, got int32"):
        ml(x, w, b, m, tid.int())
    with pytest.raises(bad, match=r"task_grads must be \[2, 9, 40\]"):
        ml(x, w, b, m, tid, task_grads=torch.zeros(2, 9, 41))
    with pytest.raises(bad, match="task_ids must be a CUDA or CPU tensor for this backend, got one on meta"):
        ml(x, w, b, m, tid.to("meta"))
    with pytest.raises(bad, match=r"task_ids must lie in \[0, 2\)"):
        ml(x, w, b, m, tid + 5)
    with pytest.raises(bad, match=r"task_ids must lie in \[0, 2\)"):
        ml(x, w, b, m, torch.tensor([-1]))


# ---- torch.library registration and torch.compile ----------------------------------------------


def test_ops_are_registered_with_fake_impls():
    """Every Triton op is a torch.library op whose fake impl gives the real op's shapes and dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.harmodt_triton
    with FakeTensorMode():
        x, w, b = torch.empty(10, 40, dtype=torch.float16), torch.empty(9, 40, dtype=torch.float16), torch.empty(9, dtype=torch.float16)
        m, tid = torch.empty(3, 9, 2, dtype=torch.int32), torch.empty(10, dtype=torch.int64)
        y = ops.masked_linear(x, w, b, m, tid, None, False, 0.0, 0)
        dx = ops.masked_linear_dx(y, w, m, tid)
        dw = ops.masked_linear_dw(y, x, m, tid)
        dw_tg = ops.masked_linear_dw_task_grads(y, x, m, tid, torch.empty(3, 9, 40))
        sel = ops.harmony_select(torch.empty(3, 70), torch.empty(3, 70), torch.empty(3, 3, dtype=torch.int32), 5)
    assert (tuple(y.shape), y.dtype) == ((10, 9), torch.float16)
    assert (tuple(dx.shape), dx.dtype) == ((10, 40), torch.float16)
    assert (tuple(dw.shape), dw.dtype) == (tuple(dw_tg.shape), dw_tg.dtype) == ((9, 40), torch.float16)
    assert (tuple(sel.shape), sel.dtype) == ((3, 3), torch.int32)
    assert hasattr(ops, "masked_adamw_")
    # the task-gradient pass runs outside CUDA graphs (it writes into the caller's buffer)
    assert torch.Tag.cudagraph_unsafe in ops.masked_linear_dw_task_grads.default.tags
    assert torch.Tag.cudagraph_unsafe not in ops.masked_linear_dw.default.tags


def test_opcheck_every_op():
    """torch.library.opcheck: schema (declared mutations), autograd registration, fake tensors and
    AOT dispatch, on the real kernels (masked AdamW's and harmony_select's: tests/test_kernels_triton_ops.py)."""
    x, w, b, m, tid = _linear_inputs(12, 40, 9, 3, "mixed", seed=8)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    ops = torch.ops.harmodt_triton
    torch.library.opcheck(ops.masked_linear.default, (x, w, b, m, tid, torch.zeros(3, 9, 40), False, 0.0, 0))
    dy = torch.randn(12, 9, generator=_gen(0))
    torch.library.opcheck(ops.masked_linear_dx.default, (dy, w.detach(), m, tid))
    torch.library.opcheck(ops.masked_linear_dw.default, (dy, x.detach(), m, tid))
    torch.library.opcheck(ops.masked_linear_dw_task_grads.default, (dy, x.detach(), m, tid, torch.zeros(3, 9, 40)))


TRITON_LINEAR = harmodt_kernels.backend_ops("triton").masked_linear if harmodt_kernels.triton_interpreted() else None


def _masked_mlp(x, w1, b1, w2, m1, m2, tid, tg1):
    """Two masked layers around a ReLU, as a block's MLP calls them (through the op value, as the
    model holds it)."""
    h = torch.relu(TRITON_LINEAR(x, w1, b1, m1, tid, task_grads=tg1))
    return TRITON_LINEAR(h, w2, None, m2, tid).square().mean()


def test_torch_compile_sees_the_op_without_graph_breaks():
    x, w1, b1, m1, tid = _linear_inputs(12, 40, 24, 3, "mixed", seed=10)
    _, w2, _, m2, _ = _linear_inputs(12, 24, 7, 3, "mixed", seed=11)
    for ids in (tid, tid[:1]):
        torch._dynamo.reset()
        ex = torch._dynamo.explain(_masked_mlp)(x, w1, b1, w2, m1, m2, ids, torch.zeros(3, 24, 40))
        assert ex.graph_break_count == 0, ex.break_reasons
        assert ex.graph_count == 1
        code = ex.graphs[0].code
        assert code.count("torch.ops.harmodt_triton.masked_linear") == 2, code


# aot_eager runs the traced ATen ops eagerly: the same kernels (measured: the same bits with AVX-512 and
# AVX2 ATen), so 1e-6 (~8 fp32 ulps of values ~1) admits a re-associated backward. Inductor (the
# default backend, which --compile uses) fuses the ReLU, square and mean around the ops: reordered sums.
@pytest.mark.parametrize("backend,tol", [("aot_eager", 1e-6), ("inductor", 1e-5)])
def test_torch_compile_forward_backward_and_task_grads_match_eager(backend, tol):
    """The compiled function (AOTAutograd: the registered autograd, the backward ops and the
    declared task_grads mutation; Inductor lowers them too) gives eager's loss, gradients and
    task_grads. The first layer's dW also fills task_grads, the second layer's has none."""
    x, w1, b1, m1, tid = _linear_inputs(12, 40, 24, 3, "mixed", seed=12)
    _, w2, _, m2, _ = _linear_inputs(12, 24, 7, 3, "mixed", seed=13)
    torch._dynamo.reset()
    compiled = torch.compile(_masked_mlp, backend=backend, fullgraph=True)
    outs = []
    for fn in (compiled, _masked_mlp):
        params = [v.clone().requires_grad_() for v in (x, w1, b1, w2)]
        tg = torch.zeros(3, 24, 40)
        loss = fn(params[0], params[1], params[2], params[3], m1, m2, tid, tg)
        loss.backward()
        outs.append([loss.detach()] + [p.grad for p in params] + [tg])
    assert outs[0][-1].abs().sum() > 0
    for a, e in zip(*outs):
        torch.testing.assert_close(a, e, rtol=tol, atol=1e-6)


def test_backend_triton_on_cpu_without_interpreter_fails_loudly(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, b, m, tid = _linear_inputs(3, 8, 4, 2, "mixed", seed=0)
    with pytest.raises(harmodt_kernels.BackendUnavailable, match="TRITON_INTERPRET"):
        harmodt_kernels.masked_linear(x, w, b, m, tid, backend="triton")
