"""The reference's masking on the floats' bits (``mask_weight``, ``select_``) is ``torch.where``
bit for bit: every float dtype, signed zeros, infinities and NaNs on both sides of the mask, and
the gradient of ``mask_weight`` as autograd's gradient of ``torch.where``."""

import pytest
import torch

from harmodt_kernels import reference as ref

SAME_WIDTH = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16, torch.float16: torch.int16}
SPECIALS = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -1.5, 3.0]


def _with_specials(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype)
    idx = torch.randint(0, t.numel(), (40,), generator=g)
    t.view(-1)[idx] = torch.tensor(SPECIALS, dtype=dtype).repeat(6)[:40]
    return t


def _bits(t):
    return t.contiguous().view(SAME_WIDTH[t.dtype])


@pytest.mark.parametrize("dtype", list(SAME_WIDTH))
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (64, 257)])
def test_mask_weight_is_where_forward_and_backward(dtype, shape):
    w = _with_specials(shape, dtype, 0)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.6
    n = min(4, mask.numel())
    mask.view(-1)[:n] = torch.tensor([True, False, True, False])[:n]
    grad = _with_specials(shape, dtype, 2)
    w_where = w.clone().requires_grad_()
    w_bits = w.clone().requires_grad_()
    y_where = torch.where(mask, w_where, w_where.new_zeros(()))
    y_bits = ref.mask_weight(w_bits, mask)
    assert torch.equal(_bits(y_bits.detach()), _bits(y_where.detach()))
    y_where.backward(grad)
    y_bits.backward(grad)
    assert torch.equal(_bits(w_bits.grad), _bits(w_where.grad))


def test_mask_weight_backward_takes_a_non_contiguous_gradient():
    w = torch.randn(6, 10, requires_grad=True)
    mask = torch.rand(6, 10, generator=torch.Generator().manual_seed(3)) < 0.5
    grad = torch.randn(10, 6).t()  # (6, 10), transposed strides
    ref.mask_weight(w, mask).backward(grad)
    assert torch.equal(_bits(w.grad), _bits(torch.where(mask, grad, 0.0)))


@pytest.mark.parametrize("dtype", list(SAME_WIDTH))
def test_select_writes_new_only_inside_the_mask(dtype):
    out = _with_specials((31, 40), dtype, 4)
    new = _with_specials((31, 40), dtype, 5)
    mask = torch.rand(31, 40, generator=torch.Generator().manual_seed(6)) < 0.5
    expected = torch.where(mask, new, out)
    ref.select_(ref.mask_bits(mask, dtype), new, out)
    assert torch.equal(_bits(out), _bits(expected))


def test_masked_adamw_keeps_weights_outside_the_mask_bit_for_bit():
    p = _with_specials((12, 70), torch.float32, 7)
    p[torch.isnan(p) | torch.isinf(p)] = 0.5
    before = p.clone()
    mask = torch.rand(12, 70, generator=torch.Generator().manual_seed(8)) < 0.5
    grad = torch.randn(12, 70, generator=torch.Generator().manual_seed(9))
    m, v, step = torch.zeros_like(p), torch.zeros_like(p), torch.zeros(())
    ref.masked_adamw_([p], [grad], [m], [v], [ref.pack_masks(mask)], [step], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                      weight_decay=0.1)
    assert torch.equal(_bits(p[~mask]), _bits(before[~mask]))
    assert (p[mask] != before[mask]).all()
