"""The native CPU ops (kernels/csrc via harmodt_kernels/cpu.py) against kernels.reference.

masked_linear's output and every gradient (x, weight, bias, task_grads) over awkward shapes and
task layouts in fp32 and bf16; the masked AdamW step; harmony_select on Algorithm 2's scores of
awkward gradients (bit for bit); the argument
errors; torch.compile without graph breaks; HARMODT_SKIP_NATIVE=1.

The library must exist: `pip install --no-build-isolation -e .` (or the cmake commands in
harmodt_kernels/cpu.py) builds it; if it is missing this module fails loudly. Only a run that sets
HARMODT_SKIP_NATIVE=1 on purpose (the install path without the native build) skips the module.
The ops are called as every caller gets them, through ``kernels.backend_ops("cpu")`` (the
argument checks of :mod:`kernels.checks`, then the native library).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import harmodt_kernels as kernels
from harmodt_kernels import KernelArgumentError
from harmodt_kernels import reference as ref

from harmodt.masks import IMPORTANCE

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("HARMODT_SKIP_NATIVE") == "1":
    pytest.skip("HARMODT_SKIP_NATIVE=1: this run checks the install without the native library", allow_module_level=True)
if kernels.backend_reason("cpu", "cpu") is not None:
    raise RuntimeError(f"native CPU kernels unavailable: {kernels.backend_reason('cpu', 'cpu')}; build them with "
                       "`pip install --no-build-isolation -e .`")
CPU = kernels.backend_ops("cpu")


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
            y = kernels.masked_linear(x, w, b, masks, ids, backend=backend)
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
    return torch.relu(kernels.masked_linear(x, w, b, masks, ids, backend="cpu")).square().mean()


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
import torch, harmodt_kernels as kernels
from harmodt_kernels import reference as ref
x, w = torch.randn(6, 40), torch.randn(9, 40)
masks, ids = ref.pack_masks(torch.rand(2, 9, 40) < 0.5), torch.tensor([0, 1, 0, 1, 1, 0])
f = torch.compile(lambda x: kernels.masked_linear(x, w, None, masks, ids, backend="cpu").sum(), fullgraph=True)
try:
    f(x)
except Exception as exc:
    print("RAISED", exc)
print("EAGER", torch.compile(lambda x: kernels.masked_linear(x, w, None, masks, ids, backend="cpu").sum())(x).item())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "backend 'cpu' on cpu is first used inside torch.compile: call harmodt_kernels.backend_ops('cpu', 'cpu') once" in out.stdout
    assert "EAGER" in out.stdout  # without fullgraph the call falls back to eager and makes the ops


def _opcheck_cases():
    x, w, b, masks, ids, gy = _ml_inputs(13, 40, 9, 3, "mixed", torch.float32, seed=9)
    x, w, b = x.detach(), w.detach(), b.detach()
    params = [torch.randn(5, 40), torch.randn(7)]
    adamw = ([p.clone() for p in params], [torch.randn_like(p) for p in params], [torch.zeros_like(p) for p in params],
             [torch.zeros_like(p) for p in params], [ref.pack_masks(torch.rand(5, 40) < 0.5), None], [torch.zeros(()), torch.zeros(())],
             1e-3, 0.9, 0.999, 1e-8, 0.1, torch.tensor(0.5))
    h, r, hs_masks = _hs_args(3, 100, seed=2)
    return [
        ("masked_linear_forward", (x, w, b, masks, ids, False, 0.0, 0)),
        ("masked_linear_forward", (x, w, None, masks, torch.tensor([1]), True, 0.1, 12345)),
        ("masked_linear_backward", (gy, x, w, masks, ids, True, True, True, torch.zeros(3, 9, 40), None, False, 0.1, 7)),
        ("masked_linear_backward", (gy, x, w, masks, ids, False, True, False, None, gy.relu(), True, 0.0, 0)),
        ("adamw_group_", adamw),
        ("harmony_select", (h, r, hs_masks, 5)),
        ("counter_dropout", (gy, 0.1, 99)),
    ]


@pytest.mark.parametrize("case", range(7), ids=["fwd", "fwd one task", "bwd", "bwd dw only", "adamw", "harmony_select", "dropout"])
def test_ops_pass_torch_library_opcheck(case):
    """Schemas (mutations declared), fake implementations and AOT dispatch agree with the C++ ops."""
    name, args = _opcheck_cases()[case]
    result = torch.library.opcheck(getattr(torch.ops.harmodt_kernels, name), args)
    assert set(result.values()) == {"SUCCESS"}, result


# ------------------------------------------------------------------------------------------------
# masked AdamW


def _adamw_group(seed):
    g = _gen(seed)
    shapes = [(37, 70), (300, 256), (70,), (3, 5, 40)]  # K not a multiple of 32; > 32 K elements (split between threads); unmasked 1-D; 3-D
    params = [torch.randn(s, generator=g) for s in shapes]
    bool_masks = [torch.rand(s, generator=g) < 0.5 for s in shapes]
    bool_masks[2] = None
    return params, bool_masks


def _adamw_state(params):
    return [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params], [torch.zeros((), dtype=torch.float32) for _ in params]


HP = dict(lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


@pytest.mark.parametrize("scale", ["one", "float", "tensor"])
def test_masked_adamw_matches_reference_and_keeps_masked_weights_bit_for_bit(scale):
    params, bool_masks = _adamw_group(1)
    grad_scale = {"one": 1.0, "float": 0.37, "tensor": torch.tensor(0.37)}[scale]
    runs = {}
    for name, fn, packed in (("cpu", CPU.masked_adamw, True), ("reference", kernels.REFERENCE_OPS.masked_adamw, False)):
        ps = [p.clone() for p in params]
        m, v, steps = _adamw_state(ps)
        for it in range(3):  # a different mask at each step, so the moments are non-zero outside it
            g = _gen(100 + it)
            grads = [torch.randn(p.shape, generator=g) for p in ps]
            masks = [None if bm is None else (bm if it % 2 == 0 else ~bm) for bm in bool_masks]
            before = [p.clone() for p in ps]
            fn(ps, grads, m, v, [None if mk is None else (ref.pack_masks(mk) if packed else mk) for mk in masks], steps,
               grad_scale=grad_scale, **HP)
            for p, p0, mk in zip(ps, before, masks):
                if mk is not None:
                    assert torch.equal(p[~mk], p0[~mk])  # outside the mask: the very same bits
                    assert not torch.equal(p[mk], p0[mk])
        runs[name] = (ps, m, v, steps)
    for got, want in zip(runs["cpu"], runs["reference"]):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert [float(s) for s in runs["cpu"][3]] == [3.0] * 4


def test_masked_adamw_float_and_tensor_scale_bool_and_packed_masks_agree_exactly():
    params, bool_masks = _adamw_group(2)
    grads = [torch.randn(p.shape, generator=_gen(7)) for p in params]
    outs = []
    for grad_scale, packed in ((0.37, True), (torch.tensor(0.37), True), (0.37, False)):
        ps = [p.clone() for p in params]
        m, v, steps = _adamw_state(ps)
        masks = [None if bm is None else (ref.pack_masks(bm) if packed else bm) for bm in bool_masks]
        kernels.masked_adamw_(ps, grads, m, v, masks, steps, grad_scale=grad_scale, backend="cpu", **HP)
        outs.append(ps + m + v)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


def test_masked_adamw_argument_errors_name_the_argument():
    params, bool_masks = _adamw_group(3)
    masks = [None if bm is None else ref.pack_masks(bm) for bm in bool_masks]
    grads = [torch.zeros_like(p) for p in params]

    def call(**change):
        m, v, steps = _adamw_state(params)
        args = dict(params=params, grads=grads, exp_avgs=m, exp_avg_sqs=v, masks=masks, steps=steps)
        args.update(change)
        CPU.masked_adamw(args["params"], args["grads"], args["exp_avgs"], args["exp_avg_sqs"], args["masks"], args["steps"],
                          grad_scale=change.pop("grad_scale", 1.0), **HP)

    with pytest.raises(KernelArgumentError, match="must have one length, got params: 4, grads: 3"):
        call(grads=grads[:3])
    with pytest.raises(KernelArgumentError, match=r"grads\[1\] must be float32, got float64"):
        call(grads=[g.double() if i == 1 else g for i, g in enumerate(grads)])
    with pytest.raises(KernelArgumentError, match=r"exp_avgs\[0\] must be \[37, 70\]"):
        call(exp_avgs=[torch.zeros(37, 71)] + [torch.zeros_like(p) for p in params[1:]])
    with pytest.raises(KernelArgumentError, match=r"params\[1\] must be contiguous"):
        call(params=[p.t() if i == 1 else p for i, p in enumerate(params)],
             grads=[g.t() if i == 1 else g for i, g in enumerate(grads)],
             exp_avgs=[torch.zeros_like(p.t()) if i == 1 else torch.zeros_like(p) for i, p in enumerate(params)],
             exp_avg_sqs=[torch.zeros_like(p.t()) if i == 1 else torch.zeros_like(p) for i, p in enumerate(params)])
    with pytest.raises(KernelArgumentError, match=r"masks\[0\] must be \[37, 3\]"):
        call(masks=[masks[0][:, :2]] + masks[1:])
    with pytest.raises(KernelArgumentError, match=r"masks\[0\] must be int32 or bool, got int64"):
        call(masks=[masks[0].long()] + masks[1:])
    with pytest.raises(KernelArgumentError, match=r"steps\[2\] must be float32, got int64"):
        call(steps=[torch.zeros(()), torch.zeros(()), torch.zeros((), dtype=torch.int64), torch.zeros(())])
    with pytest.raises(KernelArgumentError, match=r"steps\[0\] must be \[\]"):
        call(steps=[torch.zeros(1)] + [torch.zeros(()) for _ in range(3)])
    with pytest.raises(KernelArgumentError, match="grad_scale must be a float or a one-element float tensor"):
        call(grad_scale=torch.ones(2))


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


def _scores(mg, g, prm, lam, imp):
    """Algorithm 2's harmony and recovery scores of these gradients (as harmodt.masks.TaskMasks.update computes them)."""
    gbar = mg.float()
    ghat = gbar.mean(0)
    return gbar * ghat + lam * IMPORTANCE[imp](gbar, prm), g.float() * ghat


def _hs_args(t, p, seed):
    """harmony_select's harmony, recovery and masks."""
    mg, g, prm, masks = _hs_inputs(t, p, seed)
    return (*_scores(mg, g, prm, 0.1, "fisher"), masks)


def _check_select(mg, g, prm, masks, k, lam, imp):
    out = CPU.harmony_select(*_scores(mg, g, prm, lam, imp), masks, k)
    expect = ref.harmony_select(*_scores(mg, g, prm, lam, imp), masks, k)
    assert out.dtype == torch.int32 and out.shape == masks.shape
    assert torch.equal(out, expect)
    p = mg.shape[1]
    old, new = ref.unpack_masks(masks, p), ref.unpack_masks(out, p)
    n_act = old.sum(1)
    assert torch.equal(new.sum(1), n_act)  # density unchanged
    kk = torch.clamp(torch.minimum(n_act, p - n_act), max=max(k, 0))
    assert torch.equal((old & ~new).sum(1), kk)  # exactly k_i masked
    assert torch.equal((~old & new).sum(1), kk)  # exactly k_i recovered


@pytest.mark.parametrize("importance", ["magnitude", "fisher"])
@pytest.mark.parametrize("t", [1, 3, 50])
@pytest.mark.parametrize("p", [1, 33, 1001])
@pytest.mark.parametrize("integer", [False, True], ids=["randn", "ties"])
def test_harmony_select_equals_reference(importance, t, p, integer):
    mg, g, prm, masks = _hs_inputs(t, p, seed=t * 7 + p, integer=integer)
    for k in (0, 1, 7, p // 3, p):  # k = p exceeds every task's number of masked weights
        _check_select(mg, g, prm, masks, k, 0.1 if not integer else 1.0, importance)


@pytest.mark.parametrize("integer", [False, True], ids=["randn", "ties"])
def test_harmony_select_large_k_threshold_pass(integer):
    # k_i (or the ties at the threshold) beyond max(1024, P/8) candidates: the kernel switches from
    # applying the candidates by index to a third pass against an exact (key, index) threshold.
    mg, g, prm, masks = _hs_inputs(3, 20001, seed=21, integer=integer, density=0.5)
    for k in (7, 3000, 9000):
        for imp in ("magnitude", "fisher"):
            _check_select(mg, g, prm, masks, k, 0.1, imp)


def test_harmony_select_signed_zeros_nonfinite_padding_and_dtypes():
    mg, g, prm, masks = _hs_inputs(3, 257, seed=5, integer=True)
    mg[:, ::4] = -0.0
    g[:, 1::4] = 0.0
    for lam in (0.0, 0.5, 1.0 / 3.0):
        for imp in ("magnitude", "fisher"):
            _check_select(mg, g, prm, masks, 40, lam, imp)
    mg, g, prm, masks = _hs_inputs(4, 77, seed=9)
    mg[0, 3], mg[1, 5], g[2, 7], prm[11] = float("nan"), float("inf"), float("-inf"), float("inf")
    for imp in ("magnitude", "fisher"):
        for k in (5, 30):
            _check_select(mg, g, prm, masks, k, 0.3, imp)
    # padding bits set in the input are ignored and cleared, like the reference's unpack/pack
    padded = masks.clone()
    padded[:, -1] |= torch.tensor(-(2**31), dtype=torch.int32)  # bit 31 of the last word: column 95 > P
    h, r = _scores(mg, g, prm, 0.3, "fisher")
    assert torch.equal(CPU.harmony_select(h, r, padded, 9), ref.harmony_select(h, r, masks, 9))
    # non-contiguous scores and scores of bf16 gradients, through the public API
    h, r = _scores(mg, g, prm, 0.3, "magnitude")
    ht = h.t().contiguous().t()
    assert torch.equal(kernels.harmony_select(ht, r, masks, 10, backend="cpu"), ref.harmony_select(ht, r, masks, 10))
    _check_select(mg.bfloat16(), g.bfloat16(), prm.bfloat16(), masks, 10, 0.3, "fisher")


def test_harmony_select_errors_name_the_argument():
    h, r, masks = _hs_args(3, 40, seed=1)
    with pytest.raises(KernelArgumentError, match=r"recovery must be \[3, 40\] like harmony, got \[2, 40\]"):
        CPU.harmony_select(h, r[:2], masks, 3)
    with pytest.raises(KernelArgumentError, match=r"harmony must be \[T, P\], got \[120\]"):
        CPU.harmony_select(h.reshape(-1), r, masks, 3)
    with pytest.raises(KernelArgumentError, match=r"masks must be \[3, 2\] \(packed\), got \[3, 1\]"):
        CPU.harmony_select(h, r, masks[:, :1], 3)
    with pytest.raises(KernelArgumentError, match="masks must be int32, got int64"):
        CPU.harmony_select(h, r, masks.long(), 3)
    with pytest.raises(KernelArgumentError, match="harmony must be float32, got int64"):
        CPU.harmony_select(h.long(), r, masks, 3)
    with pytest.raises(KernelArgumentError, match="recovery must be float32, got bfloat16"):
        CPU.harmony_select(h, r.bfloat16(), masks, 3)
    with pytest.raises(KernelArgumentError, match="recovery must be a CPU tensor for this backend, got one on meta"):
        CPU.harmony_select(h, r.to("meta"), masks, 3)


# ------------------------------------------------------------------------------------------------
# loading: HARMODT_SKIP_NATIVE, HARMODT_KERNELS_LIB


def _probe(env_changes: dict) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in env_changes}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    code = ("import harmodt_kernels as kernels; print(kernels.available_backends('cpu')); print(kernels.backend_reason('cpu', 'cpu')); "
            "print(kernels.resolve_backend('auto', 'cpu')); print('libharmodt_kernels' in open('/proc/self/maps').read())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()


def test_skip_native_leaves_only_the_reference_and_loads_nothing():
    # TRITON_INTERPRET=0: Triton then needs CUDA tensors, so on a CPU nothing but the reference runs
    assert _probe({"HARMODT_SKIP_NATIVE": "1", "TRITON_INTERPRET": "0"}) == [
        "['reference']", "HARMODT_SKIP_NATIVE=1 is set", "reference", "False"]
    # the same process without it: the native backend, loaded from kernels/harmodt_kernels/_lib
    assert _probe({"HARMODT_SKIP_NATIVE": None, "TRITON_INTERPRET": "0"}) == ["['cpu', 'reference']", "None", "cpu", "True"]


def test_importing_kernels_loads_no_library():
    env = {k: v for k, v in os.environ.items() if k != "HARMODT_SKIP_NATIVE"}
    code = "import harmodt_kernels as kernels, harmodt_kernels.cpu; print('libharmodt_kernels' in open('/proc/self/maps').read())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "False", out.stderr  # loaded by the dispatch that asks for it, not at import


def test_missing_library_is_a_one_line_reason(tmp_path):
    lines = _probe({"HARMODT_SKIP_NATIVE": None, "TRITON_INTERPRET": "0", "HARMODT_KERNELS_LIB": str(tmp_path / "missing.so")})
    assert lines[0] == "['reference']" and lines[2] == "reference" and lines[3] == "False"
    assert lines[1].startswith(f"the native library {tmp_path / 'missing.so'} is not built")


def test_skip_native_at_run_time(monkeypatch):
    monkeypatch.setenv("HARMODT_SKIP_NATIVE", "1")
    assert kernels.backend_reason("cpu", "cpu") == "HARMODT_SKIP_NATIVE=1 is set"
    assert "cpu" not in kernels.available_backends("cpu")
    with pytest.raises(kernels.BackendUnavailable, match="HARMODT_SKIP_NATIVE=1 is set"):
        kernels.select_backends("cpu", fused=True, backend="cpu")
    with pytest.raises(kernels.BackendUnavailable, match="HARMODT_SKIP_NATIVE=1 is set"):
        kernels.harmony_select(*_hs_args(2, 40, seed=1), 3, backend="cpu")
    assert kernels.select_backends("cpu", fused=True).describe() == (
        "masked_linear=reference masked_adamw=reference harmony_select=reference")  # auto falls back
    monkeypatch.delenv("HARMODT_SKIP_NATIVE")
    assert kernels.backend_reason("cpu", "cpu") is None


def test_explicit_backend_and_unknown_name_fail_loudly():
    with pytest.raises(ValueError, match="unknown kernel backend 'fast'"):
        kernels.masked_linear(torch.zeros(2, 3), torch.zeros(4, 3), None, torch.zeros(1, 4, 1, dtype=torch.int32),
                              torch.zeros(1, dtype=torch.int64), backend="fast")
    with pytest.raises(kernels.BackendUnavailable, match="backend 'cpu' cannot run on meta"):
        kernels.harmony_select(*[t.to("meta") for t in _hs_args(2, 40, seed=1)], 3, backend="cpu")
    with pytest.raises(KernelArgumentError, match=r"pack_masks: mask must be a bool tensor"):
        kernels.pack_masks(torch.zeros(3, 4))
    with pytest.raises(KernelArgumentError, match=r"unpack_masks: words \[3, 1\] cannot hold K=40 bits"):
        kernels.unpack_masks(torch.zeros(3, 1, dtype=torch.int32), 40)
