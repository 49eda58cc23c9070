"""Counter-based dropout (``--dropout-rng counter``): the bits kernels/reference.py defines, their
rate and independence checked statistically, and every backend against them: the standalone
dropout op bit for bit, and the masked linear's fused epilogue (ReLU, dropout) in its output and
every gradient, over awkward shapes, dropout on and off, fp32 and bf16 (float16 under Triton's
interpreter, which has no bfloat16). Then the model and trainer: ``--fused`` selects the counter
stream, a run without ``--fused`` keeps torch's, and a counter run is a function of (seed, step).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from scipy import stats

import harmodt_kernels
from harmodt_kernels import reference as R

HAS_CPU = "cpu" in harmodt_kernels.available_backends("cpu")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FUSED = [pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CPU, reason="native library not built")),
         pytest.param("triton", marks=[pytest.mark.interpreter, pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")])]


def _half(backend):
    return torch.bfloat16 if backend == "cpu" else torch.float16


# ---- the bits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_the_keep_rate_is_one_minus_p(p):
    keep = R.counter_keep((1_000_003,), p, R.site_seed(0, 7))
    res = stats.binomtest(int(keep.sum()), keep.numel(), 1 - p)
    assert res.pvalue > 1e-3, (keep.float().mean().item(), res.pvalue)


@pytest.mark.parametrize("lag", [1, 2, 32, 256])
def test_neighbouring_bits_are_independent(lag):
    """Chi-square of the 2x2 table of (keep[i], keep[i + lag]): neighbours in a row (1), across
    words and rows of the model's widths (32, 256)."""
    keep = R.counter_keep((2_000_000,), 0.1, R.site_seed(3, 1)).numpy()
    table = np.histogram2d(keep[:-lag], keep[lag:], bins=2)[0]
    assert stats.chi2_contingency(table).pvalue > 1e-3


def test_sites_and_seeds_draw_independent_bits():
    """The same elements under two sites of one forward, and under the same site of two steps."""
    n = 1_000_000
    for a, b in [(R.site_seed(5, 1), R.site_seed(5, 2)), (R.site_seed(R.site_seed(0, 10), 3), R.site_seed(R.site_seed(0, 11), 3))]:
        ka, kb = R.counter_keep((n,), 0.1, a).numpy(), R.counter_keep((n,), 0.1, b).numpy()
        assert stats.chi2_contingency(np.histogram2d(ka, kb, bins=2)[0]).pvalue > 1e-3


def test_uniform_hash_values():
    """The 32-bit hashes spread evenly over 16 bins (chi-square goodness of fit)."""
    h = R.counter_bits(torch.arange(500_000), R.site_seed(9, 0))
    counts = torch.bincount(h >> 28, minlength=16).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3


def test_reference_dropout_scales_kept_and_zeroes_the_rest():
    x = torch.randn(33, 70)
    y = R.dropout(x, 0.25, 11)
    keep = R.counter_keep(x.shape, 0.25, 11)
    assert torch.equal(y, torch.where(keep, x * (1 / 0.75), 0.0))
    assert R.dropout(x, 0.0, 11) is x


# ---- the backends against the reference ---------------------------------------------------------


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", [(1,), (31, 33), (2, 3, 7, 9), (600, 256)])
@pytest.mark.parametrize("half", [False, True])
def test_dropout_op_matches_the_reference_bit_for_bit(backend, shape, half):
    dtype = _half(backend) if half else torch.float32
    x = torch.randn(shape).to(dtype).requires_grad_()
    seed = R.site_seed(42, 3)
    y = harmodt_kernels.dropout(x, 0.1, seed, backend=backend)
    x0 = x.detach().clone().requires_grad_()
    y0 = R.dropout(x0, 0.1, seed)
    assert torch.equal(y, y0)
    g = torch.randn(shape).to(dtype)
    y.backward(g)
    y0.backward(g)
    assert torch.equal(x.grad, x0.grad)


def _linear_case(r, k, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(r, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * 0.3).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    masks = harmodt_kernels.pack_masks(torch.rand(3, n, k, generator=g) < 0.8)
    gy = torch.randn(r, n, generator=g).to(dtype)
    return x, w, b, masks, gy


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("r,k,n", [(37, 45, 70), (75, 64, 96), (5, 33, 1)])
@pytest.mark.parametrize("relu,p", [(False, 0.1), (True, 0.0), (True, 0.3), (False, 0.0)])
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("ids", ["one", "mixed"])
def test_masked_linear_epilogue_matches_the_reference(backend, r, k, n, relu, p, half, ids):
    """Output and every gradient (x, weight, bias) of ReLU and dropout fused into the masked
    linear: the dropped elements are exactly the reference's; values agree to the GEMMs' rounding
    (one task on the cpu backend: its GEMMs are the reference's own, bit for bit)."""
    dtype = _half(backend) if half else torch.float32
    x, w, b, masks, gy = _linear_case(r, k, n, dtype)
    task_ids = torch.tensor([1]) if ids == "one" else torch.arange(r) % 3
    seed = R.site_seed(7, 2)
    out = {}
    for be in ("reference", backend):
        xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
        y = harmodt_kernels.masked_linear(xx, ww, bb, masks, task_ids, backend=be, relu=relu, dropout_p=p, seed=seed)
        y.backward(gy)
        out[be] = (y.detach(), xx.grad, ww.grad, bb.grad)
    ref, got = out["reference"], out[backend]
    assert torch.equal(ref[0] == 0, got[0] == 0)
    exact = backend == "cpu" and ids == "one"  # a mixed batch's dW sums the tasks in another order
    for name, a, c in zip(("y", "dx", "dw", "db"), ref, got):
        scale = a.float().abs().max().item() + 1.0
        tol = dict(rtol=0, atol=0) if exact else dict(rtol=2e-2, atol=2e-2 * scale) if half else dict(rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(c.float(), a.float(), **tol, msg=name)


@pytest.mark.parametrize("backend", FUSED)
def test_dropout_arguments_are_checked(backend):
    x, w, b, masks, _ = _linear_case(4, 8, 5, torch.float32)
    with pytest.raises(harmodt_kernels.KernelArgumentError, match="dropout p"):
        harmodt_kernels.masked_linear(x, w, b, masks, torch.tensor([0]), backend=backend, dropout_p=1.0)
    with pytest.raises(harmodt_kernels.KernelArgumentError, match="seed"):
        harmodt_kernels.dropout(x, 0.1, -1, backend=backend)


# ---- the model and trainer ----------------------------------------------------------------------


def _trainer(fused: bool, **kw):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _synthetic import datasets

    from harmodt.config import ModelConfig, TrainConfig, validate
    from harmodt.train import Trainer

    tasks = ("reach-v3", "push-v3")
    cfg = validate(TrainConfig(tasks=",".join(tasks), steps=10, batch_size=4, eval_episodes=0, device="cpu", fused=fused, progress=False,
                               model=ModelConfig(n_layer=2, n_embd=32, n_head=2, context_len=5, prompt_len=2), **kw))
    return Trainer(cfg, datasets(tasks, episodes=3, length=30))


def test_fused_selects_the_counter_stream_and_the_reference_keeps_torch():
    assert _trainer(False).cfg.dropout_rng == "torch"
    if HAS_CPU:
        assert _trainer(True).cfg.dropout_rng == "counter"
    assert _trainer(False, dropout_rng="counter").step_rule.counter_dropout() is not None
    assert _trainer(False).step_rule.counter_dropout() is None


def test_counter_run_does_not_read_torch_rng_and_depends_on_the_step():
    """A counter-dropout step draws nothing from torch's RNG for dropout: the same trainer state
    and step give the same loss whatever torch's RNG holds; another step draws other bits."""
    tr = _trainer(False, dropout_rng="counter")
    batch = tr.batcher.sample([0], 4)
    tr.model.train()

    def loss():
        ctx = tr.step_rule.context(batch["task_ids"], single_task=True, dropout=tr.step_rule.counter_dropout())
        from harmodt.model import action_loss

        return action_loss(tr.model(batch, ctx), batch)

    torch.manual_seed(1)
    a = loss()
    torch.manual_seed(2)
    b = loss()
    assert torch.equal(a, b)
    tr.step += 1
    assert not torch.equal(a, loss())


@pytest.mark.skipif(not HAS_CPU, reason="native library not built")
def test_counter_forward_equals_on_the_cpu_backend_and_the_reference():
    """The whole model's counter-dropout forward and backward: --fused's cpu ops against the
    reference ops with the same weights, masks and seed."""
    a, b = _trainer(True), _trainer(False, dropout_rng="counter")
    b.model.load_state_dict(a.model.state_dict())
    batch = a.batcher.sample([1], 4)
    grads = []
    for tr in (a, b):
        tr.model.train()
        ctx = tr.step_rule.context(batch["task_ids"], single_task=True, dropout=tr.step_rule.counter_dropout())
        from harmodt.model import action_loss

        loss = action_loss(tr.model(batch, ctx), batch)
        grads.append([loss] + list(torch.autograd.grad(loss, list(tr.model.parameters()))))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_written_out_attention_equals_the_plain_formula(dtype):
    """The attention a counter-dropout forward writes out (its operands laid out for the matmuls,
    the masking in place) gives the plain formula's output, keys, values and every gradient bit
    for bit: permuted views of ``qkv``'s output, ``q @ kᵀ``, masked softmax, dropout, ``@ v``."""
    import math

    import torch.nn.functional as F

    from harmodt.config import ModelConfig
    from harmodt.model import CounterDropout, MaskContext, SelfAttention, causal_mask

    torch.manual_seed(0)
    b, t, c, nh = 3, 7, 24, 3
    attn = SelfAttention(ModelConfig(n_layer=1, n_head=nh, n_embd=c)).to(dtype)
    x = torch.randn(b, t, c, dtype=dtype, requires_grad=True)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[0, :3] = False  # left padding
    mask = causal_mask(valid, t)
    drop = CounterDropout(0.3, 1234, R.dropout)
    y, (k, v) = attn(x, mask, MaskContext({}, torch.zeros(1, dtype=torch.long), dropout=drop), site=4)

    q2, k2, v2 = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(b, t, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
    att = (q2 @ k2.transpose(-2, -1)) * (1.0 / math.sqrt(c // nh))
    att = drop(att.masked_fill(~mask, float("-inf")).softmax(-1), 4)
    ref = drop(F.linear((att @ v2).transpose(1, 2).reshape(b, t, c), attn.proj.weight, attn.proj.bias), 5)
    assert torch.equal(y, ref) and torch.equal(k, k2) and torch.equal(v, v2)
    g = torch.randn_like(y)
    params = [x, *attn.parameters()]
    for got, want in zip(torch.autograd.grad(y, params, g, retain_graph=True),
                         torch.autograd.grad(ref, params, g, retain_graph=True)):
        assert torch.equal(got, want)
    # only some operands reach the loss (keys and values as the prompt cache returns them)
    got = torch.autograd.grad((k * 2).sum() + v.sum(), x)[0]
    want = torch.autograd.grad((k2 * 2).sum() + v2.sum(), x)[0]
    assert torch.equal(got, want)
