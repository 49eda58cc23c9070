"""Plain-PyTorch reference of every kernel: the single source of truth.

The model (without ``--fused``), the tests and the benchmarks all import these. They trust their
arguments (the public ops in :mod:`kernels` check them). Every backend
(the Triton kernels in `kernels/triton_*.py`, the native CPU ops in `kernels/csrc/`) must match
them; ties are broken by lowest index here and everywhere.

Packed masks: a boolean mask ``[..., K]`` packs into int32 words ``[..., ceil(K/32)]``; bit
``j % 32`` of word ``j // 32`` is column ``j``. Padding bits beyond K are zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["counter_bits", "counter_keep", "dropout", "harmony_select", "masked_adamw_", "masked_linear", "num_words",
           "pack_masks",
           "site_seed", "unpack_masks"]

_SHIFTS = torch.arange(32, dtype=torch.int64)
_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


# ---- selecting by a mask ------------------------------------------------------------------------
#
# ``torch.where(mask, a, b)`` on a bool mask is a scalar loop on the CPU, several times slower than a
# vectorized element-wise op (1.05 M weights: about 8x a multiply). The masking here is the same
# selection done on the floats' bits: an integer of the float's width holding all ones where the mask
# is set and 0 elsewhere, ANDed with the bits. That is ``where`` bit for bit, +0.0 wherever the mask
# is clear whatever the float holds (-0.0, inf, NaN), which a float multiply by 0/1 is not.

_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
                   torch.float16: torch.int16}


def mask_bits(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as integers of ``dtype``'s width: all bits set where ``mask``, 0 elsewhere."""
    return mask.to(_SAME_WIDTH_INT[dtype]).neg_()


def keep_where(bits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``torch.where(mask, x, 0)`` given ``bits = mask_bits(mask, x.dtype)`` (not differentiable)."""
    return torch.bitwise_and(x.contiguous().view(bits.dtype), bits).view(x.dtype)


def select_(bits: torch.Tensor, new: torch.Tensor, out: torch.Tensor) -> None:
    """``out.copy_(torch.where(mask, new, out))`` in place, given ``bits = mask_bits(mask, out.dtype)``."""
    o = out.view(bits.dtype)
    o.bitwise_xor_(torch.bitwise_xor(o, new.view(bits.dtype)).bitwise_and_(bits))


class _MaskWeight(torch.autograd.Function):
    """``torch.where(mask, w, 0)`` forward and ``torch.where(mask, grad, 0)`` backward, as :func:`keep_where`."""

    @staticmethod
    def forward(ctx, w, mask):
        bits = mask_bits(mask, w.dtype)
        ctx.save_for_backward(bits)
        return keep_where(bits, w)

    @staticmethod
    def backward(ctx, grad):
        (bits,) = ctx.saved_tensors  # autograd hands grad in w's dtype, so the bits' width fits it
        return keep_where(bits, grad), None


def mask_weight(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``torch.where(mask, w, 0)`` (bool ``mask`` of w's shape), differentiable in w, bit for bit."""
    if w.dtype not in _SAME_WIDTH_INT:
        return torch.where(mask, w, w.new_zeros(()))
    return _MaskWeight.apply(w, mask)


# ---- counter-based dropout ----------------------------------------------------------------------
#
# Element i of a tensor (its row-major index, modulo 2^32) is kept iff ``counter_bits(i, seed) >=
# threshold(p)``, with ``counter_bits`` a hash of (i, seed): two rounds of MurmurHash3's 32-bit
# finalizer over ``i * 0x9E3779B1`` mixed with the seed's low and high words. Nothing is stored
# between a forward and its backward: the backward recomputes the bits. The native op
# (kernels/csrc/dropout.cpp) and the Triton kernels (harmodt_kernels/triton_dropout.py) compute the same
# bits; these plain-PyTorch functions define them (int64 tensors holding 32-bit values, products
# split in 16-bit halves so nothing overflows).


def site_seed(seed, site):
    """The 63-bit seed of dropout site ``site`` of a forward whose seed is ``seed`` (SplitMix64 of
    ``seed + (site + 1) * golden``): host arithmetic on Python ints, or, when either is an int64
    tensor (a step count on the device, as a captured training step keeps it), the same bits
    computed on its device (an int64 tensor)."""
    if isinstance(seed, torch.Tensor) or isinstance(site, torch.Tensor):
        return _site_seed_tensor(seed, site)
    z = (seed + (site + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) >> 1


def _signed64(v: int) -> int:
    v &= _M64
    return v - (1 << 64) if v >= 1 << 63 else v


def _shr(z: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 ``z`` read as uint64."""
    return (z >> n) & ((1 << (64 - n)) - 1)


def _site_seed_tensor(seed, site) -> torch.Tensor:
    """:func:`site_seed` on int64 tensors (sums and products wrap modulo 2^64 as uint64's do)."""
    g = _signed64(0x9E3779B97F4A7C15)
    if isinstance(site, torch.Tensor):
        z = (site.to(torch.int64) + 1) * g + (seed if isinstance(seed, torch.Tensor) else _signed64(seed))
    else:
        z = seed.to(torch.int64) + _signed64((site + 1) * 0x9E3779B97F4A7C15)
    z = (z ^ _shr(z, 30)) * _signed64(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _signed64(0x94D049BB133111EB)
    return _shr(z ^ _shr(z, 31), 1)


def dropout_threshold(p: float) -> int:
    """An element is kept iff its 32-bit hash is >= this: ``floor(p * 2^32)``."""
    return min(int(p * 4294967296.0), _M32)


def dropout_scale(p: float) -> float:
    """What a kept element is multiplied by: ``1 / (1 - p)`` (as the tensor's dtype rounds it)."""
    return 1.0 / (1.0 - p)


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """``(h * c) mod 2^32`` for h holding uint32 values in int64, without overflow."""
    return ((h & 0xFFFF) * c + ((((h >> 16) * c) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def counter_bits(index: torch.Tensor, seed) -> torch.Tensor:
    """The 32-bit hash (in int64) of every element index in ``index`` (int64) under ``seed`` (an
    int, or a 0-dim int64 tensor on index's device)."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    h = _fmix32(_mul32(index & _M32, 0x9E3779B1) ^ k0)
    return _fmix32(h ^ k1)


def counter_keep(shape, p: float, seed: int, device=None) -> torch.Tensor:
    """bool ``shape``: which elements of a contiguous tensor of ``shape`` dropout keeps."""
    n = 1
    for d in shape:
        n *= d
    index = torch.arange(n, dtype=torch.int64, device=device)
    return (counter_bits(index, seed) >= dropout_threshold(p)).view(shape)


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``where(keep, x * (1 / (1 - p)), 0)`` with ``keep = counter_keep(x.shape, p, seed)``;
    differentiable (the gradient is the same map of the output's gradient). ``p == 0``: x."""
    if p == 0.0:
        return x
    return torch.where(counter_keep(x.shape, p, seed, x.device), x * dropout_scale(p), x.new_zeros(()))


def num_words(k: int) -> int:
    """Number of int32 words that hold k mask bits."""
    return (k + 31) // 32


def pack_masks(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[..., K]`` -> int32 ``[..., ceil(K/32)]``."""
    k = mask.shape[-1]
    w = num_words(k)
    bits = F.pad(mask.to(torch.int64), (0, w * 32 - k)).view(*mask.shape[:-1], w, 32)
    words = (bits << _SHIFTS.to(mask.device)).sum(-1)  # [..., W] in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_masks(words: torch.Tensor, k: int) -> torch.Tensor:
    """int32 ``[..., ceil(K/32)]`` -> bool ``[..., K]``."""
    bits = (words.to(torch.int64).unsqueeze(-1) >> _SHIFTS.to(words.device)) & 1  # [..., W, 32]
    return bits.reshape(*words.shape[:-1], words.shape[-1] * 32)[..., :k].bool()


def masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    masks: torch.Tensor,
    task_ids: torch.Tensor,
    task_grads: torch.Tensor | None = None,
    segments: tuple | None = None,
    relu: bool = False,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """``y[r] = x[r] @ (weight * M[task_ids[r]]).T + bias``, differentiable in x, weight, bias;
    then the epilogue: ``relu`` when asked, then :func:`dropout` ``(y, dropout_p, seed)`` over
    the ``[R, N]`` output when ``dropout_p > 0``.

    x ``[R, K]``, weight ``[N, K]``, bias ``[N]`` or None, masks ``[T, N, ceil(K/32)]`` int32
    (packed) or ``[T, N, K]`` bool, task_ids int64 ``[R]`` in ``[0, T)``, or ``[1]``: every row
    belongs to that one task (no data-dependent control flow, so ``torch.compile`` traces it whole).

    The masked weight of each task present is materialized (that is what the fused kernels avoid);
    autograd then gives ``dX[r] = dY[r] @ (W*M_t)``, ``dW = sum_t M_t * (dY_t^T X_t)`` and
    ``db = sum_r dY[r]``.

    ``task_grads``: optional fp32 ``[T, N, K]`` buffer; on backward the per-task *unmasked*
    ``dY_t^T X_t`` is added into it (the gradient w.r.t. each task's effective weight).

    ``segments``: optional ``((task, rows), ...)`` runs in row order, for rows grouped by task
    whose layout the caller knows on the host (a training batch); the rows are then split by it
    instead of by reading ``task_ids`` back (which a mixed-task batch otherwise needs: the count
    of rows per task sets the shapes).
    """
    y = _masked_linear(x, weight, bias, masks, task_ids, task_grads, segments)
    if relu:
        y = F.relu(y)
    return dropout(y, dropout_p, seed)


def _masked_linear(x, weight, bias, masks, task_ids, task_grads, segments):
    r, k = x.shape
    if task_ids.shape == (1,) and r != 1:  # one task: one masked copy, one GEMM
        m = masks.index_select(0, task_ids)[0]
        m = m if m.dtype == torch.bool else unpack_masks(m, k)
        w_eff = mask_weight(weight, m)  # (N, K)
        if task_grads is not None and w_eff.requires_grad:
            w_eff.register_hook(_accumulate_into(task_grads, task_ids))
        return F.linear(x, w_eff, bias)
    if segments is not None:
        return _segment_linear(x, weight, bias, masks, list(segments), task_grads)
    counts = torch.bincount(task_ids, minlength=masks.shape[0])
    present = counts.nonzero().flatten().tolist()
    order = torch.argsort(task_ids, stable=True)  # rows grouped by task
    ys = _segment_linear(x.index_select(0, order), weight, bias, masks, list(zip(present, counts[present].tolist())),
                         task_grads)
    return ys.index_select(0, torch.argsort(order))  # back to the callers' row order


def _segment_linear(x, weight, bias, masks, segments, task_grads):
    """Rows grouped by task, ``segments`` ``[(task, rows), ...]`` in row order: one masked copy
    of the weight and one GEMM per segment."""
    k = x.shape[1]
    parts, start = [], 0
    for t, c in segments:
        m = masks[t] if masks.dtype == torch.bool else unpack_masks(masks[t], k)
        w_eff = mask_weight(weight, m)  # (N, K)
        if task_grads is not None and w_eff.requires_grad:
            w_eff.register_hook(_accumulate_into(task_grads, torch.tensor([t], device=x.device)))
        parts.append(F.linear(x[start : start + c], w_eff, bias))
        start += c
    return torch.cat(parts) if parts else x.new_empty(0, weight.shape[0])


def _accumulate_into(buf: torch.Tensor, t: torch.Tensor):
    def hook(grad):
        buf.index_add_(0, t, grad.to(buf.dtype).unsqueeze(0))
        return grad

    return hook


def masked_adamw_(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, masks: list, steps: list, *, lr: float,
                  beta1: float, beta2: float, eps: float, weight_decay: float, grad_scale=1.0) -> None:
    """AdamW (``torch.optim.AdamW``'s arithmetic, decoupled weight decay) in place on each
    parameter, where weights outside ``masks[i]`` keep their value bit for bit.

    For each i, with ``g = grads[i] * grad_scale`` and ``steps[i] += 1`` (a float 0-dim tensor)::

        exp_avg    = lerp(exp_avg, g, 1 - beta1)
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
        new        = p * (1 - lr * weight_decay)
                     - lr / (1 - beta1^step) * exp_avg / (sqrt(exp_avg_sq) / sqrt(1 - beta2^step) + eps)
        p          = where(mask, new, p)

    ``masks[i]``: None (all of p may change), a bool tensor of p's shape, or its packed int32
    words ``[..., ceil(K/32)]``. Outside the mask the moments still move as above (with the
    masked gradient, i.e. zero there, they decay), as a plain AdamW step would move them.
    ``grad_scale``: a float or a 0-dim tensor (the gradient-clipping factor). The step count and
    the bias corrections stay tensors (in float64): no value is read back to the host.
    """
    if not params:
        return
    with torch.no_grad():
        g = torch._foreach_mul(list(grads), grad_scale)
        torch._foreach_add_(steps, 1)
        torch._foreach_lerp_(exp_avgs, g, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, g, g, value=1 - beta2)
        for p, m, v, mask, step in zip(params, exp_avgs, exp_avg_sqs, masks, steps):
            t = step.double()
            step_size = (lr / (1 - beta1**t)).float()  # 0-dim tensors
            bc2_sqrt = (1 - beta2**t).sqrt().float()
            new = p.detach() * (1 - lr * weight_decay)
            new.sub_((m / (v.sqrt() / bc2_sqrt).add_(eps)).mul_(step_size))
            if mask is None:
                p.detach().copy_(new)
                continue
            keep = mask if mask.dtype == torch.bool else unpack_masks(mask, p.shape[-1])
            if p.dtype in _SAME_WIDTH_INT and p.is_contiguous():
                select_(mask_bits(keep, p.dtype), new, p.detach())
            else:
                p.detach().copy_(torch.where(keep, new, p.detach()))


def harmony_select(harmony: torch.Tensor, recovery: torch.Tensor, masks: torch.Tensor, k: int) -> torch.Tensor:
    """Algorithm 2's selection for every task at once, given its scores; returns the new packed
    masks ``[T, W]``.

    harmony and recovery: float32 ``[T, P]`` scores of every weight (Eqs. 8 and 10: the caller
    computes them), masks packed ``[T, ceil(P/32)]``. Per task i, with
    ``k_i = min(k, #active_i, #masked_i)`` (so per-task density stays exactly constant):

    * the k_i lowest ``harmony`` among the active weights are masked (masked weights count as
      +inf, Eq. 9);
    * the k_i highest ``recovery`` among the weights masked *before* this update are recovered
      (active weights count as -inf, Eq. 10).

    Ties go to the lowest index.
    """
    t_count, p = harmony.shape
    active = unpack_masks(masks, p)  # (T, P)
    drop_key = torch.where(active, harmony, torch.full((), float("inf")))
    recover_key = torch.where(active, torch.full((), float("-inf")), recovery)
    new = active.clone()
    n_active = active.sum(1).tolist()
    for i in range(t_count):
        kk = min(int(k), n_active[i], p - n_active[i])
        if kk <= 0:
            continue
        drop = torch.sort(drop_key[i], stable=True).indices[:kk]
        add = torch.sort(recover_key[i], descending=True, stable=True).indices[:kk]
        new[i, drop] = False
        new[i, add] = True
    return pack_masks(new)
