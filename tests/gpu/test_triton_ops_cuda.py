"""Every Triton op compiled for the GPU against kernels/reference.py on the same CUDA device.

fp32 runs twice: with ``torch.get_float32_matmul_precision()`` "highest" (the kernels use exact
fp32 products, as cuBLAS does then) and "high" (tf32 tensor cores on both sides). bf16 is
compared with the reference computed in fp32 from the same bf16-rounded inputs. Tolerances are on
the error relative to the largest reference value, which is how a low-precision GEMM's error scales.
"""

import os

import pytest
import torch

import harmodt_kernels
from harmodt_kernels import reference as R
from harmodt.masks import IMPORTANCE

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = "cuda"
REL = {"highest": 1e-5, "high": 5e-3, "bf16": 1.5e-2}  # max |got - want| / max |want|


@pytest.fixture
def matmul_precision():
    """Sets torch's fp32 matmul precision for one test and restores it after."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


def _close(got, want, rel, name=""):
    assert got.shape == want.shape, name
    got, want = got.float(), want.float()
    scale = want.abs().max().clamp_min(1e-30)
    err = float((got - want).abs().max() / scale) if want.numel() else 0.0
    assert err <= rel, f"{name}: max error {err:.3g} of the largest value (allowed {rel})"


def test_triton_interpreter_is_off_on_cuda():
    """tests/conftest.py must not force the interpreter where CUDA is present."""
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    assert harmodt_kernels.resolve_backend("auto", DEV) == "triton"


def _linear_inputs(r, k, n, t, ids, seed):
    g = torch.Generator().manual_seed(seed)
    x, w, b = torch.randn(r, k, generator=g), torch.randn(n, k, generator=g) / k**0.5, torch.randn(n, generator=g)
    m = R.pack_masks(torch.rand(t, n, k, generator=g) > 0.3)
    if ids == "one":
        tid = torch.tensor([t - 1])
    else:
        tid = torch.randint(0, t, (r,), generator=g)
        if t > 1:
            tid[tid == t - 1] = 0  # the last task has no rows
    dy = torch.randn(r, n, generator=g)
    return [v.to(DEV) for v in (x, w, b, m, tid, dy)]


def _run(backend, x, w, b, m, tid, dy, dtype):
    xx, ww, bb = (v.to(dtype).clone().requires_grad_() for v in (x, w, b))
    tg = torch.zeros(m.shape[0], *w.shape, device=DEV)
    y = harmodt_kernels.masked_linear(xx, ww, bb, m, tid, backend=backend, task_grads=tg)
    y.backward(dy.to(dtype))
    return {"y": y.detach(), "dx": xx.grad, "dw": ww.grad, "db": bb.grad, "task_grads": tg}


# (R, K, N, T, ids): the paper's layers at 8 x 75 rows (qkv, fc, mlp_proj; one task and MT50 mixed),
# and odd shapes (R = 1, K < 32, K and N not multiples of 32, absent tasks).
LINEAR_CASES = [
    (600, 256, 768, 5, "one"), (600, 1024, 256, 5, "one"), (600, 256, 1024, 50, "mixed"), (1, 5, 1, 2, "one"),
    (1, 40, 3, 4, "mixed"), (7, 33, 5, 3, "mixed"), (130, 257, 65, 50, "mixed"),
]


@pytest.mark.parametrize("r,k,n,t,ids", LINEAR_CASES)
@pytest.mark.parametrize("mode", ["highest", "high", "bf16"])
def test_masked_linear_matches_reference(r, k, n, t, ids, mode, matmul_precision):
    matmul_precision("high" if mode == "high" else "highest")
    x, w, b, m, tid, dy = _linear_inputs(r, k, n, t, ids, seed=r + k + n + t)
    if mode == "bf16":
        x, w, b, dy = (v.bfloat16().float() for v in (x, w, b, dy))  # the reference sees the same rounded inputs
        got = _run("triton", x, w, b, m, tid, dy, torch.bfloat16)
        want = _run("reference", x, w, b, m, tid, dy, torch.float32)
        for name in ("y", "dx", "dw", "db"):
            assert got[name].dtype == torch.bfloat16, name
    else:
        got = _run("triton", x, w, b, m, tid, dy, torch.float32)
        want = _run("reference", x, w, b, m, tid, dy, torch.float32)
    for name in want:
        _close(got[name], want[name], REL[mode], name)


def test_masked_linear_under_bf16_autocast(matmul_precision):
    """fp32 weights under autocast: bf16 products, fp32 weight gradients, as the reference path."""
    matmul_precision("highest")
    x, w, b, m, tid, dy = _linear_inputs(600, 256, 768, 5, "mixed", seed=1)
    outs = {}
    for backend in ("triton", "reference"):
        ww, bb = w.clone().requires_grad_(), b.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = harmodt_kernels.masked_linear(x, ww, bb, m, tid, backend=backend)
        y.backward(dy.bfloat16())
        outs[backend] = (y.detach(), ww.grad, bb.grad)
        assert y.dtype == torch.bfloat16 and ww.grad.dtype == torch.float32
    for name, a, e in zip(("y", "dw", "db"), outs["triton"], outs["reference"]):
        _close(a, e, REL["bf16"], name)


@pytest.mark.parametrize("ids", ["one", "mixed"])
def test_masked_linear_needs_no_host_synchronisation(ids):
    """Forward and backward, one-task and mixed batches, never make the host wait for the GPU."""
    x, w, b, m, tid, dy = _linear_inputs(600, 256, 768, 50, ids, seed=2)
    _run("triton", x, w, b, m, tid, dy, torch.float32)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run("triton", x, w, b, m, tid, dy, torch.float32)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_masked_linear_compiled_matches_eager(matmul_precision):
    """torch.compile (inductor, and CUDA graphs through reduce-overhead) around the registered op,
    with and without task_grads; under reduce-overhead task_grads are filled as eager fills them
    or the call is refused in one line (never left unfilled)."""
    matmul_precision("highest")
    x, w, b, m, tid, dy = _linear_inputs(600, 256, 768, 5, "one", seed=3)
    m2 = R.pack_masks(torch.rand(5, 256, 768, generator=torch.Generator().manual_seed(4)) > 0.3).to(DEV)
    w2 = torch.randn(256, 768, device=DEV) / 768**0.5

    def mlp(x, w, b, w2, tg):
        h = torch.relu(harmodt_kernels.masked_linear(x, w, b, m, tid, backend="triton", task_grads=tg))
        return harmodt_kernels.masked_linear(h, w2, None, m2, tid, backend="triton").square().mean()

    def run(fn, with_task_grads=True):
        params = [v.clone().requires_grad_() for v in (x, w, b, w2)]
        tg = torch.zeros(5, 768, 256, device=DEV) if with_task_grads else None
        loss = fn(*params, tg)
        loss.backward()
        return [loss.detach()] + [p.grad for p in params] + ([tg] if with_task_grads else [])

    for with_tg in (False, True):
        want = run(mlp, with_tg)
        torch._dynamo.reset()
        for mode in ("default", "reduce-overhead"):
            compiled = torch.compile(mlp, mode=mode, fullgraph=True)
            try:
                for _ in range(3):  # reduce-overhead records on a later call
                    got = run(compiled, with_tg)
            except harmodt_kernels.KernelArgumentError as exc:  # task_grads under a CUDA graph: refused in one line, never left unfilled
                assert with_tg and mode == "reduce-overhead" and "inside a CUDA graph" in str(exc), exc
                continue
            for i, (a, e) in enumerate(zip(got, want)):
                _close(a, e, 1e-5, f"{mode} output {i}{' (with task_grads)' if with_tg else ''}")


# ---- masked AdamW ------------------------------------------------------------------------------


def _paper_params(seed):
    """The paper model's parameter shapes (width 256, 6 blocks; masked: qkv, proj, fc, mlp_proj)."""
    shapes, masked = [], []
    for _ in range(6):
        for n, k in ((768, 256), (256, 256), (1024, 256), (256, 1024)):
            shapes += [(n, k), (n,)]
            masked += [True, False]
        shapes += [(256,)] * 4  # two layer norms
        masked += [False] * 4
    shapes += [(256, 39), (256,), (256, 4), (256,), (256, 1), (256,), (1000, 256), (256,), (256,), (4, 256), (4,)]
    masked += [False] * 11
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g).to(DEV) for s in shapes]
    grads = [torch.randn(s, generator=g).to(DEV) for s in shapes]
    m = [torch.randn(s, generator=g).mul(0.1).to(DEV) for s in shapes]
    v = [torch.rand(s, generator=g).mul(0.01).to(DEV) for s in shapes]
    masks = [R.pack_masks(torch.rand(s, generator=g) > 0.2).to(DEV) if mk else None for s, mk in zip(shapes, masked)]
    steps = [torch.tensor(float(i % 4), device=DEV) for i in range(len(shapes))]
    return ps, grads, m, v, masks, steps


def _adamw(backend, state, grads, scale, workspace=None):
    ps, _, m, v, masks, steps = state
    harmodt_kernels.masked_adamw_(ps, grads, m, v, masks, steps, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                          grad_scale=scale, backend=backend, workspace=workspace)


@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
def test_masked_adamw_matches_reference_bit_for_bit_outside_the_mask(scale_kind):
    tri, ref = _paper_params(0), _paper_params(0)
    before = [p.clone() for p in tri[0]]
    g = torch.Generator(device=DEV).manual_seed(1)
    for it in range(3):
        grads = [torch.randn(p.shape, generator=g, device=DEV) for p in tri[0]]
        scale = 0.5 + 0.25 * it
        scale = scale if scale_kind == "float" else torch.tensor(scale, device=DEV)
        _adamw("triton", tri, grads, scale)
        _adamw("reference", ref, grads, scale)
    for i, (p, p_ref, p0, mask) in enumerate(zip(tri[0], ref[0], before, tri[4])):
        if mask is not None:
            keep = R.unpack_masks(mask, p.shape[-1])
            assert torch.equal(p[~keep], p0[~keep]), i
        torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6)
    for xs, ys in ((tri[2], ref[2]), (tri[3], ref[3])):
        for a, e in zip(xs, ys):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)
    for a, e in zip(tri[5], ref[5]):
        assert torch.equal(a, e)


def test_masked_adamw_bf16_grads():
    tri, ref = _paper_params(2), _paper_params(2)
    grads = [g.bfloat16() for g in tri[1]]
    _adamw("triton", tri, grads, 1.0)
    _adamw("reference", ref, [g.float() for g in grads], 1.0)
    for a, e in zip(tri[0], ref[0]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_masked_adamw_two_launches_no_sync_no_upload():
    """One step of the paper model's 83 parameters: two kernels, no host synchronisation, and,
    once the table is on the device (kept in the caller's workspace, as the optimizer keeps it), no
    host-to-device copy."""
    from torch.profiler import ProfilerActivity, profile

    state = _paper_params(3)
    scale = torch.tensor(0.7, device=DEV)
    workspace = {}
    _adamw("triton", state, state[1], scale, workspace)  # compiles, uploads the table into the workspace
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda.set_sync_debug_mode("error")
        try:
            _adamw("triton", state, state[1], scale, workspace)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels_run = [n for n in names if "memcpy" not in n.lower() and "memset" not in n.lower()]
    assert len(kernels_run) == 2, names
    assert any("_adamw_kernel" in n for n in kernels_run) and any("_step_kernel" in n for n in kernels_run), names
    assert not any("memcpy" in n.lower() for n in names), names


# ---- harmony_select ----------------------------------------------------------------------------


@pytest.mark.parametrize("t,p,k", [(5, 100_003, 20), (50, 70_001, 100), (50, 40_000, 1000), (3, 33, 1000)])
@pytest.mark.parametrize("importance", ["magnitude", "fisher"])
def test_harmony_select_equals_reference(t, p, k, importance):
    g = torch.Generator().manual_seed(t + p + k)
    mg, gr, prm = torch.randn(t, p, generator=g), torch.randn(t, p, generator=g), torch.randn(p, generator=g)
    masks = R.pack_masks(torch.rand(t, p, generator=g) > 0.3)
    mg, gr, prm, masks = [v.to(DEV) for v in (mg, gr, prm, masks)]
    ghat = mg.mean(0)  # Algorithm 2's scores, as harmodt.masks.TaskMasks.update computes them
    args = (mg * ghat + 0.5 * IMPORTANCE[importance](mg, prm), gr * ghat, masks)
    got = harmodt_kernels.harmony_select(*args, k, backend="triton")
    want = harmodt_kernels.harmony_select(*args, k, backend="reference")
    assert torch.equal(got, want)
