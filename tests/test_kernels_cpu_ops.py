"""The native CPU ops other than masked_linear (kernels/csrc via harmodt_kernels/cpu.py) against
harmodt_kernels.reference: the masked AdamW step; harmony_select on Algorithm 2's scores of
awkward gradients (bit for bit); every op's schema and fake implementation (opcheck); the
argument errors; loading the library and HARMODT_SKIP_NATIVE=1. The ops are called as every
caller gets them (tests/_native_ops.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import harmodt_kernels
from harmodt_kernels import KernelArgumentError
from harmodt_kernels import reference as ref
from _native_ops import native_ops

from harmodt.masks import IMPORTANCE

ROOT = Path(__file__).resolve().parents[1]
CPU = native_ops()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _opcheck_cases():
    g = _gen(9)
    x, w, b, gy = torch.randn(13, 40, generator=g), torch.randn(9, 40, generator=g), torch.randn(9, generator=g), torch.randn(13, 9, generator=g)
    masks, ids = ref.pack_masks(torch.rand(3, 9, 40, generator=g) < 0.6), torch.randint(0, 3, (13,), generator=g)
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
    for name, fn, packed in (("cpu", CPU.masked_adamw, True), ("reference", harmodt_kernels.REFERENCE_OPS.masked_adamw, False)):
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
        harmodt_kernels.masked_adamw_(ps, grads, m, v, masks, steps, grad_scale=grad_scale, backend="cpu", **HP)
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
    assert torch.equal(harmodt_kernels.harmony_select(ht, r, masks, 10, backend="cpu"), ref.harmony_select(ht, r, masks, 10))
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
    code = ("import harmodt_kernels; print(harmodt_kernels.available_backends('cpu')); print(harmodt_kernels.backend_reason('cpu', 'cpu')); "
            "print(harmodt_kernels.resolve_backend('auto', 'cpu')); print('libharmodt_kernels' in open('/proc/self/maps').read())")
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
    code = "import harmodt_kernels, harmodt_kernels.cpu; print('libharmodt_kernels' in open('/proc/self/maps').read())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "False", out.stderr  # loaded by the dispatch that asks for it, not at import


def test_missing_library_is_a_one_line_reason(tmp_path):
    lines = _probe({"HARMODT_SKIP_NATIVE": None, "TRITON_INTERPRET": "0", "HARMODT_KERNELS_LIB": str(tmp_path / "missing.so")})
    assert lines[0] == "['reference']" and lines[2] == "reference" and lines[3] == "False"
    assert lines[1].startswith(f"the native library {tmp_path / 'missing.so'} is not built")


def test_skip_native_at_run_time(monkeypatch):
    monkeypatch.setenv("HARMODT_SKIP_NATIVE", "1")
    assert harmodt_kernels.backend_reason("cpu", "cpu") == "HARMODT_SKIP_NATIVE=1 is set"
    assert "cpu" not in harmodt_kernels.available_backends("cpu")
    with pytest.raises(harmodt_kernels.BackendUnavailable, match="HARMODT_SKIP_NATIVE=1 is set"):
        harmodt_kernels.select_backends("cpu", fused=True, backend="cpu")
    with pytest.raises(harmodt_kernels.BackendUnavailable, match="HARMODT_SKIP_NATIVE=1 is set"):
        harmodt_kernels.harmony_select(*_hs_args(2, 40, seed=1), 3, backend="cpu")
    assert harmodt_kernels.select_backends("cpu", fused=True).describe() == (
        "masked_linear=reference masked_adamw=reference harmony_select=reference")  # auto falls back
    monkeypatch.delenv("HARMODT_SKIP_NATIVE")
    assert harmodt_kernels.backend_reason("cpu", "cpu") is None


def test_explicit_backend_and_unknown_name_fail_loudly():
    with pytest.raises(ValueError, match="unknown kernel backend 'fast'"):
        harmodt_kernels.masked_linear(torch.zeros(2, 3), torch.zeros(4, 3), None, torch.zeros(1, 4, 1, dtype=torch.int32),
                              torch.zeros(1, dtype=torch.int64), backend="fast")
    with pytest.raises(harmodt_kernels.BackendUnavailable, match="backend 'cpu' cannot run on meta"):
        harmodt_kernels.harmony_select(*[t.to("meta") for t in _hs_args(2, 40, seed=1)], 3, backend="cpu")
    with pytest.raises(KernelArgumentError, match=r"pack_masks: mask must be a bool tensor"):
        harmodt_kernels.pack_masks(torch.zeros(3, 4))
    with pytest.raises(KernelArgumentError, match=r"unpack_masks: words \[3, 1\] cannot hold K=40 bits"):
        harmodt_kernels.unpack_masks(torch.zeros(3, 1, dtype=torch.int32), 40)
