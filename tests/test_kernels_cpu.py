"""The native CPU masked_linear (kernels/csrc via harmodt_kernels/cpu.py) against harmodt_kernels.reference.

Its output and every gradient (x, weight, bias, task_grads) over awkward shapes and task layouts
in fp32 and bf16; the argument errors; torch.compile without graph breaks. The other native ops:
tests/test_kernels_cpu_ops.py. The ops are called as every caller gets them
(tests/_native_ops.py).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import harmodt_kernels
from harmodt_kernels import KernelArgumentError
from harmodt_kernels import reference as ref

from _native_ops import native_ops

CPU = native_ops()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """fp32: within fp32 rounding of a different summation order; bf16: within a few bf16 ulps of
    the largest value (the products are rounded to bf16, and the sums over tasks differ in order)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    scale = max(expected.float().abs().max().item(), 1.0) if expected.numel() else 1.0
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=what)
    else:
        torch.testing.assert_close(actual.float(), expected.float(), rtol=2e-2, atol=2e-2 * scale, msg=what)


# ------------------------------------------------------------------------------------------------
# masked_linear


def _task_ids(layout: str, r: int, t: int, g: torch.Generator) -> torch.Tensor:
    if layout == "mixed":  # random tasks, rows not grouped
        return torch.randint(0, t, (r,), generator=g)
    if layout == "absent":  # only the even tasks occur
        return torch.randint(0, (t + 1) // 2, (r,), generator=g) * 2
    if layout == "sorted":  # already grouped by task: no gather
        return torch.sort(torch.randint(0, t, (r,), generator=g)).values
    if layout == "same":  # [R], every row the same task
        return torch.full((r,), t - 1, dtype=torch.int64)
    if layout == "one":  # [1]: one task for every row
        return torch.tensor([t // 2])
    raise ValueError(layout)


def _ml_inputs(r, k, n, t, layout, dtype, seed, bias=True):
    g = _gen(seed)
    x = torch.randn(r, k, generator=g).to(dtype).requires_grad_()
    w = torch.randn(n, k, generator=g).to(dtype).requires_grad_()
    b = torch.randn(n, generator=g).to(dtype).requires_grad_() if bias else None
    density = torch.linspace(0.0, 1.0, t) if t > 2 else torch.full((t,), 0.6)  # an empty and a full mask among them
    masks = ref.pack_masks(torch.rand(t, n, k, generator=g) < density[:, None, None])
    return x, w, b, masks, _task_ids(layout, r, t, g), torch.randn(r, n, generator=g).to(dtype)


def _run(fn, x, w, b, masks, ids, gy, task_grads):
    for p in (x, w, b):
        if p is not None:
            p.grad = None
    y = fn(x, w, b, masks, ids, task_grads=task_grads)
    y.backward(gy)
    return y.detach(), [None if p is None else p.grad for p in (x, w, b)]


# (R, K, N, T, task layout): R = 1, R prime, K = 1, N = 1, K and N not multiples of 32 or 16,
# tasks absent from the batch, task_ids [1], all rows one task, rows already grouped.
CASES = [
    (1, 70, 33, 3, "mixed"),
    (37, 70, 33, 5, "mixed"),
    (37, 1, 33, 4, "mixed"),
    (37, 64, 1, 4, "mixed"),
    (45, 96, 40, 6, "absent"),
    (45, 33, 17, 3, "one"),
    (1, 33, 17, 3, "one"),
    (45, 33, 17, 3, "same"),
    (45, 40, 24, 4, "sorted"),
    (97, 257, 130, 8, "mixed"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("r,k,n,t,layout", CASES)
def test_masked_linear_output_and_every_gradient_match_reference(r, k, n, t, layout, bias, dtype):
    x, w, b, masks, ids, gy = _ml_inputs(r, k, n, t, layout, dtype, seed=r * 31 + k * 7 + n + t, bias=bias)
    start = torch.randn(t, n, k, generator=_gen(3))  # task_grads are added into, not overwritten
    tg_cpu, tg_ref = start.clone(), start.clone()
    y, grads = _run(CPU.masked_linear, x, w, b, masks, ids, gy, tg_cpu)
    y_ref, grads_ref = _run(ref.masked_linear, x, w, b, masks, ids, gy, tg_ref)
    _assert_close(y, y_ref, dtype, "y")
    for name, got, want in zip(("dx", "dw", "db"), grads, grads_ref):
        if want is None:
            assert got is None, name
        else:
            _assert_close(got, want, dtype, name)
    _assert_close(tg_cpu, tg_ref, dtype, "task_grads")
    # dW is exactly zero wherever no task present in the batch keeps the weight
    present = ids.unique() if ids.numel() > 1 else ids
    kept = ref.unpack_masks(masks, k)[present].any(0)
    assert torch.all(grads[1][~kept] == 0)


def test_masked_linear_ignores_masked_inf_and_nan_weights():
    x, w, b, masks, ids, gy = _ml_inputs(29, 50, 21, 4, "mixed", torch.float32, seed=1)
    with torch.no_grad():
        bits = ref.unpack_masks(masks, 50)
        never = ~bits.any(0)
        w[never & (torch.arange(50) % 2 == 0)] = float("inf")
        w[never & (torch.arange(50) % 2 == 1)] = float("nan")
    y, grads = _run(CPU.masked_linear, x, w, b, masks, ids, gy, None)
    y_ref, grads_ref = _run(ref.masked_linear, x, w, b, masks, ids, gy, None)
    assert torch.isfinite(y).all() and torch.isfinite(grads[0]).all()
    _assert_close(y, y_ref, torch.float32, "y")
    _assert_close(grads[0], grads_ref[0], torch.float32, "dx")


@pytest.mark.parametrize("which", ["x", "weight", "bias", "none"])
def test_masked_linear_partial_gradients(which):
    x, w, b, masks, ids, gy = _ml_inputs(40, 48, 20, 3, "mixed", torch.float32, seed=2)
    x, w, b = (t.detach().requires_grad_(name == which) for t, name in ((x, "x"), (w, "weight"), (b, "bias")))
    tg = torch.zeros(3, 20, 48)
    y = CPU.masked_linear(x, w, b, masks, ids, task_grads=tg)
    _assert_close(y.detach(), ref.masked_linear(x, w, b, masks, ids).detach(), torch.float32, "y")
    if which == "none":
        assert not y.requires_grad
        return
    y.backward(gy)
    for t, name in ((x, "x"), (w, "weight"), (b, "bias")):
        assert (t.grad is not None) == (name == which), name
    x2, w2, b2 = (t.detach().requires_grad_(t.requires_grad) for t in (x, w, b))
    tg2 = torch.zeros(3, 20, 48)
    ref.masked_linear(x2, w2, b2, masks, ids, task_grads=tg2).backward(gy)
    got, want = {"x": (x.grad, x2.grad), "weight": (w.grad, w2.grad), "bias": (b.grad, b2.grad)}[which]
    _assert_close(got, want, torch.float32, which)
    if which == "weight":
        _assert_close(tg, tg2, torch.float32, "task_grads")
    else:
        assert not tg.any()  # task_grads receive nothing without a weight gradient


def test_masked_linear_non_contiguous_inputs_and_zero_rows():
    x, w, b, masks, ids, gy = _ml_inputs(33, 40, 24, 3, "mixed", torch.float32, seed=4)
    xt = x.detach().t().contiguous().t().requires_grad_()  # column-major view of the same values
    y, grads = _run(CPU.masked_linear, xt, w, b, masks, ids, gy, None)
    y_ref, grads_ref = _run(ref.masked_linear, x, w, b, masks, ids, gy, None)
    _assert_close(y, y_ref, torch.float32, "y")
    _assert_close(grads[1], grads_ref[1], torch.float32, "dw")
    x0 = torch.zeros(0, 40, requires_grad=True)
    w.grad = None
    y0 = CPU.masked_linear(x0, w, b, masks, torch.zeros(0, dtype=torch.int64))
    assert y0.shape == (0, 24)
    y0.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and x0.grad.shape == (0, 40)


def test_masked_linear_through_the_public_api_under_autocast():
    x, w, b, masks, ids, gy = _ml_inputs(50, 64, 40, 4, "mixed", torch.float32, seed=5)
    outs = {}
    for backend in ("cpu", "reference"):
        for p in (x, w, b):
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = harmodt_kernels.masked_linear(x, w, b, masks, ids, backend=backend)
        y.float().backward(gy)
        outs[backend] = (y, w.grad.clone(), x.grad.clone())
    assert outs["cpu"][0].dtype == torch.bfloat16 and outs["cpu"][1].dtype == torch.float32
    for got, want, what in zip(outs["cpu"], outs["reference"], ("y", "dw", "dx")):
        _assert_close(got, want, torch.bfloat16, what)


def test_masked_linear_task_id_out_of_range_is_a_clear_error():
    x, w, b, masks, ids, _ = _ml_inputs(10, 40, 24, 3, "mixed", torch.float32, seed=6)
    ids = ids.clone()
    ids[7] = 3
    with pytest.raises(ValueError, match=r"task_ids\[7\] = 3 is out of range \[0, 3\)"):
        CPU.masked_linear(x, w, b, masks, ids)
    with pytest.raises(ValueError, match=r"task_ids\[0\] = -1 is out of range"):
        CPU.masked_linear(x, w, b, masks, torch.tensor([-1]))


def _bad_ml_args():
    x, w, b, masks, ids, _ = _ml_inputs(10, 40, 24, 3, "mixed", torch.float32, seed=7)
    x, w, b = x.detach(), w.detach(), b.detach()
    tg = torch.zeros(3, 24, 40)
    ok = dict(x=x, weight=w, bias=b, masks=masks, task_ids=ids, task_grads=tg)
    return ok, [
        ("x", dict(x=x[0]), KernelArgumentError, r"x must be \[R, K\], got \[40\]"),
        ("x dtype", dict(x=x.double()), KernelArgumentError, "x must be float32 or bfloat16, got float64"),
        ("x device", dict(x=x.to("meta")), KernelArgumentError, "x must be a CPU tensor for this backend, got one on meta"),
        ("weight shape", dict(weight=w[:, :39]), KernelArgumentError, r"weight must be \[N, 40\] to match x \[10, 40\], got \[24, 39\]"),
        ("weight dtype", dict(weight=w.bfloat16()), KernelArgumentError, "weight must be float32, got bfloat16"),
        ("bias shape", dict(bias=b[:5]), KernelArgumentError, r"bias must be \[24\], got \[5\]"),
        ("bias dtype", dict(bias=b.double()), KernelArgumentError, "bias must be float32, got float64"),
        ("masks bool", dict(masks=ref.unpack_masks(masks, 40)), KernelArgumentError, "masks must be int32, got bool"),
        ("masks words", dict(masks=masks[:, :, :1]), KernelArgumentError, r"masks must be packed \[T, 24, 2\] .* got int32 \[3, 24, 1\]"),
        ("task_ids dtype", dict(task_ids=ids.int()), KernelArgumentError, "task_ids must be int64, got int32"),
        ("task_ids shape", dict(task_ids=ids[:9]), KernelArgumentError, r"task_ids must be \[10\] .* or \[1\] .* got \[9\]"),
        ("task_grads shape", dict(task_grads=tg[:2]), KernelArgumentError, r"task_grads must be \[3, 24, 40\]"),
        ("task_grads dtype", dict(task_grads=tg.bfloat16()), KernelArgumentError, "task_grads must be float32, got bfloat16"),
        ("task_grads layout", dict(task_grads=tg.transpose(1, 2).contiguous().transpose(1, 2)), KernelArgumentError, "task_grads must be contiguous"),
        # without task_grads the call goes straight to the C++ op, which checks its arguments itself; what it refuses is named
        ("bias shape, straight", dict(bias=b[:5], task_grads=None), KernelArgumentError, r"bias must be \[24\], got \[5\]"),
        ("bias device, straight", dict(bias=b.to("meta"), task_grads=None), KernelArgumentError, "bias must be a CPU tensor"),
        ("masks words, straight", dict(masks=masks[:, :, :1], task_grads=None), KernelArgumentError, r"masks must be packed"),
        ("no tasks, straight", dict(masks=masks[:0], task_grads=None), KernelArgumentError, r"\(T >= 1\)"),
        ("dropout p, straight", dict(dropout_p=1.5, task_grads=None), KernelArgumentError, r"dropout p must be a float in \[0, 1\)"),
        ("seed, straight", dict(dropout_p=0.1, seed=-1, task_grads=None), KernelArgumentError, r"seed must be an int in \[0, 2\*\*63\)"),
        ("seed range, straight", dict(dropout_p=0.1, seed=2**64, task_grads=None), KernelArgumentError, r"seed must be an int"),
        ("segments, straight", dict(segments=((0, 3),), task_grads=None), KernelArgumentError, r"segments \(\(0, 3\),\) cover 3 rows, x has 10"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_ml_args()[1])), ids=[c[0] for c in _bad_ml_args()[1]])
def test_masked_linear_argument_errors_name_the_argument(case):
    ok, cases = _bad_ml_args()
    _, change, exc, match = cases[case]
    CPU.masked_linear(**{**ok, "task_grads": None})  # the good configuration first: a known one takes the straight path
    with pytest.raises(exc, match=match):
        CPU.masked_linear(**{**ok, **change})


# ------------------------------------------------------------------------------------------------
# torch.compile


def _compile_case():
    x, w, b, masks, ids, gy = _ml_inputs(37, 70, 33, 5, "mixed", torch.float32, seed=8)
    return x, w, b, masks, ids, gy


def _layer(x, w, b, masks, ids, task_grads=None):
    return torch.relu(CPU.masked_linear(x, w, b, masks, ids, task_grads=task_grads)) * 2.0


def test_masked_linear_traces_without_graph_breaks():
    torch._dynamo.reset()
    x, w, b, masks, ids, _ = _compile_case()
    for tg in (None, torch.zeros(5, 33, 70)):
        explained = torch._dynamo.explain(_layer)(x, w, b, masks, ids, tg)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
        # the forward and backward as one node: the op whose autograd is C++, or (filling task_grads) Python's
        node = "harmodt_kernels.masked_linear.default" if tg is None else "autograd_function_apply"
        assert node in explained.graphs[0].code


@pytest.mark.parametrize("with_task_grads", [False, True], ids=["op", "task-grads"])
def test_compiled_masked_linear_equals_eager(with_task_grads):
    torch._dynamo.reset()
    x, w, b, masks, ids, gy = _compile_case()
    compiled = torch.compile(_layer, fullgraph=True)
    results = {}
    for name, fn in (("eager", _layer), ("compiled", compiled)):
        tg = torch.zeros(5, 33, 70) if with_task_grads else None
        y, grads = _run(lambda *a, task_grads: fn(*a, task_grads=task_grads), x, w, b, masks, ids, gy, tg)
        results[name] = (y, *grads, tg)
    # Exact: both run the same native op, and what Inductor generates around it (relu, * 2 and their
    # backward) is exact in any vectorization.
    for what, got, want in zip(("y", "dx", "dw", "db", "task_grads"), results["compiled"], results["eager"]):
        assert (got is None and want is None) or torch.equal(got, want), what


def _public_layer(x, w, b, masks, ids):
    return torch.relu(harmodt_kernels.masked_linear(x, w, b, masks, ids, backend="cpu")).square().mean()


def test_public_masked_linear_compiles_fullgraph_after_an_eager_call():
    """The functional API under torch.compile(fullgraph=True): the backend's ops, made by an eager
    call, are read from their cache; Dynamo does not trace their construction."""
    torch._dynamo.reset()
    x, w, b, masks, ids, _ = _compile_case()
    want = _public_layer(x, w, b, masks, ids)
    got = torch.compile(_public_layer, fullgraph=True)(x, w, b, masks, ids)
    assert torch.equal(got, want)


def test_public_masked_linear_first_used_inside_compile_fails_in_one_line():
    code = """
import torch, harmodt_kernels
from harmodt_kernels import reference as ref
x, w = torch.randn(6, 40), torch.randn(9, 40)
masks, ids = ref.pack_masks(torch.rand(2, 9, 40) < 0.5), torch.tensor([0, 1, 0, 1, 1, 0])
f = torch.compile(lambda x: harmodt_kernels.masked_linear(x, w, None, masks, ids, backend="cpu").sum(), fullgraph=True)
try:
    f(x)
except Exception as exc:
    print("RAISED", exc)
print("EAGER", torch.compile(lambda x: harmodt_kernels.masked_linear(x, w, None, masks, ids, backend="cpu").sum())(x).item())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "backend 'cpu' on cpu is first used inside torch.compile: call harmodt_kernels.backend_ops('cpu', 'cpu') once" in out.stdout
    assert "EAGER" in out.stdout  # without fullgraph the call falls back to eager and makes the ops
