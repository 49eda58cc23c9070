"""Triton kernels against kernels/reference.py, run by Triton's interpreter on CPU tensors."""

import os

import pytest
import torch

import kernels
from kernels import reference as R

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                       reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py) or a GPU"),
]
DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = dict(rtol=1e-5, atol=1e-5) if DEV == "cpu" else dict(rtol=2e-2, atol=2e-2)  # tf32 tensor cores on GPU

# (R, K, N, T): odd sizes, one task, fifty tasks, K and N in {1, 5, 33, 257}
CASES = [(1, 1, 1, 1), (7, 5, 33, 3), (130, 33, 5, 50), (7, 257, 5, 1), (130, 5, 257, 3), (7, 33, 33, 50), (1, 257, 1, 3)]


def _inputs(r, k, n, t, seed, empty_task=True, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(r, 2 * k if noncontig else k, generator=g)[:, ::2] if noncontig else torch.randn(r, k, generator=g)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    m = R.pack_masks(torch.rand(t, n, k, generator=g) > 0.3)
    tid = torch.randint(0, t, (r,), generator=g)
    if empty_task and t > 1:
        tid[tid == t - 1] = 0  # the last task has no rows
    return [v.to(DEV) for v in (x, w, b, m, tid)]


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


@pytest.mark.parametrize("r,k,n,t", CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_masked_linear_forward_and_grads(r, k, n, t, bias, poisoned_empty):
    x, w, b, m, tid = _inputs(r, k, n, t, seed=r * 7 + k + n + t, noncontig=(r == 7))
    b = b if bias else None
    outs = {}
    for name in ("triton", "reference"):
        xx = x.clone().requires_grad_()
        ww = w.clone().requires_grad_()
        bb = None if b is None else b.clone().requires_grad_()
        if name == "triton" and r == 7:
            xx = torch.randn(r, 2 * k, device=DEV)[:, ::2].copy_(x).requires_grad_()  # non-contiguous rows
        tg = torch.zeros(t, n, k, device=DEV)  # the op adds each task's unmasked dY_t^T X_t into it
        y = kernels.masked_linear(xx, ww, bb, m, tid, backend=name, task_grads=tg)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEV)
        y.backward(dy)
        outs[name] = (y.detach(), xx.grad, ww.grad, None if bb is None else bb.grad, tg)
    for a, e in zip(outs["triton"], outs["reference"]):
        if e is not None:
            torch.testing.assert_close(a, e, **TOL)


def test_masked_linear_output_is_written_everywhere(poisoned_empty):
    x, w, b, m, tid = _inputs(33, 40, 9, 4, seed=3)
    y = kernels.masked_linear(x, w, b, m, tid, backend="triton")
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y, R.masked_linear(x, w, b, m, tid), **TOL)


def test_masked_linear_rejects_bad_shapes():
    x, w, b, m, tid = _inputs(5, 40, 9, 2, seed=0)
    with pytest.raises(ValueError, match="masks must be int32"):
        kernels.masked_linear(x, w, b, m[:, :, :1], tid, backend="triton")
    with pytest.raises(ValueError, match="task_ids must lie"):
        kernels.masked_linear(x, w, b, m, tid + 5, backend="triton")
    with pytest.raises(ValueError, match="x has K=40"):
        kernels.masked_linear(x, w[:, :10], b, m, tid, backend="triton")
    with pytest.raises(ValueError, match="share a dtype"):
        kernels.masked_linear(x, w.double(), b, m, tid, backend="triton")


def _select_inputs(t, p, seed, ints):
    g = torch.Generator().manual_seed(seed)
    if ints:  # many exact ties
        f = lambda *s: torch.randint(-2, 3, s, generator=g).float()  # noqa: E731
    else:
        f = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return f(t, p), f(t, p), f(p), R.pack_masks(torch.rand(t, p, generator=g) > 0.3)


@pytest.mark.parametrize("t,p,k", [(1, 33, 5), (3, 257, 7), (50, 65, 3), (3, 301, 200), (2, 40, 0), (3, 33, 1000)])
@pytest.mark.parametrize("importance", ["magnitude", "fisher"])
@pytest.mark.parametrize("ints", [False, True])
def test_harmony_select_matches_reference(t, p, k, importance, ints):
    mg, g, prm, m = _select_inputs(t, p, seed=t * 31 + p + k, ints=ints)
    got = kernels.harmony_select(mg.to(DEV), g.to(DEV), prm.to(DEV), m.to(DEV), k, 0.5, importance, backend="triton").cpu()
    want = R.harmony_select(mg, g, prm, m, k, 0.5, importance)
    assert torch.equal(got, want)
    a, b = R.unpack_masks(m, p), R.unpack_masks(got, p)
    assert torch.equal(a.sum(1), b.sum(1))  # per-task popcount unchanged
    for i in range(t):
        kk = min(k, int(a[i].sum()), int((~a[i]).sum()))
        assert int((a[i] & ~b[i]).sum()) == kk == int((~a[i] & b[i]).sum())  # exactly k_i flipped each way


def test_backend_triton_on_cpu_without_interpreter_fails_loudly(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, b, m, tid = _inputs(3, 8, 4, 2, seed=0)
    if DEV == "cpu":
        with pytest.raises(kernels.BackendUnavailable, match="TRITON_INTERPRET"):
            kernels.masked_linear(x, w, b, m, tid, backend="triton")
