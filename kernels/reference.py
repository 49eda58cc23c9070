"""Plain-PyTorch reference of every kernel: the single source of truth.

The model (non-fused path), the tests and the benchmarks all import these. Every backend
(`kernels/triton_masked_linear.py`, `kernels/triton_harmony_select.py` in Triton, the native CPU op) must match
them; ties are broken by lowest index here and everywhere.

Packed masks: a boolean mask ``[..., K]`` packs into int32 words ``[..., ceil(K/32)]``; bit
``j % 32`` of word ``j // 32`` is column ``j``. Padding bits beyond K are zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["apply_mask_", "apply_masks_", "apply_masks_sq_norms_", "attention", "attention_mask", "bias_dropout_add", "bias_relu_", "dropout_apply", "dropout_keep_mask", "pack_masks", "unpack_masks", "masked_linear", "masked_mlp", "masked_qkv_attention", "harmony_select", "layer_norm", "num_words"]

_SHIFTS = torch.arange(32, dtype=torch.int64)


def num_words(k: int) -> int:
    """Number of int32 words that hold k mask bits."""
    return (k + 31) // 32


def pack_masks(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[..., K]`` -> int32 ``[..., ceil(K/32)]``."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_masks expects a bool mask, got {mask.dtype}")
    k = mask.shape[-1]
    w = num_words(k)
    bits = F.pad(mask.to(torch.int64), (0, w * 32 - k)).view(*mask.shape[:-1], w, 32)
    words = (bits << _SHIFTS.to(mask.device)).sum(-1)  # [..., W] in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_masks(words: torch.Tensor, k: int) -> torch.Tensor:
    """int32 ``[..., ceil(K/32)]`` -> bool ``[..., K]``."""
    if words.dtype != torch.int32:
        raise TypeError(f"unpack_masks expects int32 words, got {words.dtype}")
    if words.shape[-1] != num_words(k):
        raise ValueError(f"unpack_masks: {words.shape[-1]} words cannot hold K={k} bits (need {num_words(k)})")
    bits = (words.to(torch.int64).unsqueeze(-1) >> _SHIFTS.to(words.device)) & 1  # [..., W, 32]
    return bits.reshape(*words.shape[:-1], -1)[..., :k].bool()


def apply_mask_(out: torch.Tensor, src: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``out = where(mask, src, 0)`` (``out`` may be ``src``; in ``out``'s dtype); returns ``out``.
    ``mask``: bool of ``src``'s shape, or its packed int32 words ``[..., ceil(K/32)]``. The masked
    weight ``W * M`` of Eq. 4 and its gradient ``grad * M`` (zeros, not ``0 * x``, outside the mask)."""
    if mask.dtype == torch.int32:
        mask = unpack_masks(mask, src.shape[-1])
    if mask.dtype != torch.bool:
        raise TypeError(f"apply_mask_ expects a bool or packed int32 mask, got {mask.dtype}")
    if src.shape != mask.shape or out.shape != mask.shape:
        raise ValueError(f"apply_mask_: src {tuple(src.shape)}, mask {tuple(mask.shape)} and out {tuple(out.shape)} must have one shape")
    if out.dtype != src.dtype:  # e.g. W * M straight into autocast's bf16, or a bf16 gradient back to fp32
        return out.copy_(torch.where(mask, src, src.new_zeros(())))
    return torch.where(mask, src, src.new_zeros(()), out=out)


_U64 = 2**64


def apply_masks_(outs: list, srcs: list, masks: list) -> list:
    """:func:`apply_mask_` for each (out, src, mask) triple; returns ``outs``."""
    if not len(outs) == len(srcs) == len(masks):
        raise ValueError(f"apply_masks_: got {len(outs)} outputs, {len(srcs)} sources and {len(masks)} masks")
    for o, s_, m in zip(outs, srcs, masks):
        apply_mask_(o, s_, m)
    return outs


def apply_masks_sq_norms_(outs: list, srcs: list, masks: list) -> torch.Tensor:
    """:func:`apply_masks_`, then each output's sum of squares as float64 ``[len(outs)]`` (the
    squared norms gradient clipping needs of masked gradients)."""
    apply_masks_(outs, srcs, masks)
    return torch.tensor([float(o.double().square().sum()) for o in outs], dtype=torch.float64)


def _u64(c: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return c - _U64 if c >= 2**63 else c


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def dropout_keep_mask(n: int, seed: int, p: float) -> torch.Tensor:
    """bool ``(n,)``: element i is kept iff 16-bit field ``i % 4`` of the SplitMix64 output
    ``mix(seed + (i // 4 + 1) * golden)`` is >= ``round(p * 65536)`` (int64 arithmetic wraps like
    uint64). Keep probability ``1 - round(p * 65536) / 65536``; nothing is stored: the backward
    recomputes it from the seed."""
    j = torch.arange((n + 3) // 4, dtype=torch.int64) + 1
    z = seed + j * _u64(0x9E3779B97F4A7C15)
    z = (z ^ _srl(z, 30)) * _u64(0xBF58476D1CE4E5B9)
    z = (z ^ _srl(z, 27)) * _u64(0x94D049BB133111EB)
    z = z ^ _srl(z, 31)
    fields = torch.stack([_srl(z, 16 * q) & 0xFFFF for q in range(4)], dim=1).reshape(-1)[:n]  # (n,)
    return fields >= round(p * 65536)


def dropout_apply(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """``x * keep / (1 - p)`` with the keep mask of :func:`dropout_keep_mask` over ``x``'s
    elements in row-major order (the same call on the gradient is the backward)."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"dropout_apply expects float32 or bfloat16, got {x.dtype}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_apply: p must be in [0, 1), got {p}")
    keep = dropout_keep_mask(x.numel(), int(seed), p).view(x.shape)
    return torch.where(keep, x.float() * (1.0 / (1.0 - p)), 0.0).to(x.dtype)


def bias_relu_(z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``z <- relu(z + bias)`` in place (``bias`` over the last dimension, rounded to z's dtype);
    returns ``z``. Differentiable when ``z`` is not a leaf (a GEMM output)."""
    return torch.relu_(z.add_(bias))


def bias_dropout_add(y: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """``residual + dropout_apply(y + bias, seed, p)`` in fp32 (the keep mask indexes ``y``'s
    elements in row-major order), rounded to ``residual``'s dtype; ``bias`` over the last
    dimension, ``residual`` of ``y``'s shape."""
    if y.shape != residual.shape:
        raise ValueError(f"bias_dropout_add: y {tuple(y.shape)} and residual {tuple(residual.shape)} must have one shape")
    return (residual.float() + dropout_apply(y.float() + bias.float(), seed, p)).to(residual.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` over the last dimension of ``x``: ``F.linear``."""
    return F.linear(x, weight, bias)


def attention_mask(key_valid: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
    """bool ``(B, 1, Tq, Tk)``: key j is visible to the query at key position ``query_pos[i]`` iff
    ``(j <= query_pos[i] and key_valid[b, j]) or j == query_pos[i]`` (causal, padding hidden, and a
    query always sees itself so no row is empty)."""
    k_pos = torch.arange(key_valid.shape[1], device=key_valid.device).unsqueeze(0)  # (1, Tk)
    q_pos = query_pos.unsqueeze(1)  # (Tq, 1)
    mask = (k_pos <= q_pos).unsqueeze(0) & key_valid.unsqueeze(1)  # (B, Tq, Tk)
    return (mask | (k_pos == q_pos).unsqueeze(0)).unsqueeze(1)


def attention(qkv: torch.Tensor, key_valid: torch.Tensor, query_pos: torch.Tensor, prefix=None, p: float = 0.0,
              seed: int = 0, qkv_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention read from the packed projection ``qkv (B, T, 3, H, D)``.

    Keys/values: the optional ``prefix = (k, v)``, each ``(B, H, Tp, D)``, then the T own tokens;
    ``key_valid (B, Tp + T)`` bool; ``query_pos (Tq,)`` int64: the key position of each query (an
    own token, ``>= Tp``). Visibility: :func:`attention_mask`. Dropout with probability ``p`` on
    the attention probabilities uses :func:`dropout_apply`'s keep mask over the ``(B, H, Tq, Tk)``
    tensor with ``seed``. ``qkv_bias`` (``(3 H D,)``, optional) is added to the own tokens' q, k
    and v in fp32. Computed in fp32; returns ``(B, Tq, H * D)`` in ``qkv``'s dtype.
    """
    b, t, three, h, d = qkv.shape
    if three != 3:
        raise ValueError(f"attention: qkv must be (B, T, 3, H, D), got {tuple(qkv.shape)}")
    tp = 0 if prefix is None else prefix[0].shape[2]
    dtype = qkv.dtype
    qkv = qkv.float() if qkv_bias is None else qkv.float() + qkv_bias.float().view(3, h, d)
    q = qkv[:, query_pos - tp, 0].transpose(1, 2)  # (B, H, Tq, D)
    k = qkv[:, :, 1].transpose(1, 2)  # (B, H, T, D)
    v = qkv[:, :, 2].transpose(1, 2)
    if prefix is not None:
        k = torch.cat([prefix[0].float(), k], dim=2)  # (B, H, Tk, D)
        v = torch.cat([prefix[1].float(), v], dim=2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / d**0.5)  # (B, H, Tq, Tk)
    att = att.masked_fill(~attention_mask(key_valid, query_pos), float("-inf")).softmax(-1)
    if p > 0.0:
        att = dropout_apply(att, seed, p)
    return (att @ v).transpose(1, 2).reshape(b, len(query_pos), h * d).to(dtype)


def _as_bool_masks(masks: torch.Tensor, k: int) -> torch.Tensor:
    """Accept packed int32 ``[T, N, W]`` or already-unpacked bool ``[T, N, K]`` masks."""
    if masks.dtype == torch.bool:
        if masks.shape[-1] != k:
            raise ValueError(f"bool masks have {masks.shape[-1]} columns, weight has {k}")
        return masks
    return unpack_masks(masks, k)


def masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    masks: torch.Tensor,
    task_ids: torch.Tensor,
    task_grads: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[r] = x[r] @ (weight * M[task_ids[r]]).T + bias``, differentiable in x, weight, bias.

    x ``[R, K]``, weight ``[N, K]``, bias ``[N]`` or None, masks ``[T, N, ceil(K/32)]`` int32
    (packed) or ``[T, N, K]`` bool, task_ids ``[R]`` int64 in ``[0, T)``.

    The masked weight copies of the tasks present in ``task_ids`` are materialized, one per task
    (that is what the fused kernels avoid); autograd then gives ``dX[r] = dY[r] @ (W*M_t)``,
    ``dW = sum_t M_t * (dY_t^T X_t)`` and ``db = sum_r dY[r]``.

    ``task_grads``: optional fp32 ``[T, N, K]`` buffer; on backward the per-task *unmasked*
    ``dY_t^T X_t`` is added into it (the gradient w.r.t. each task's effective weight).
    """
    r, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"masked_linear: x has {k} features, weight is {tuple(weight.shape)}")
    if task_ids.shape != (r,):
        raise ValueError(f"masked_linear: task_ids must be [{r}], got {tuple(task_ids.shape)}")
    bmask = _as_bool_masks(masks, k)
    if bmask.shape[:2] != (bmask.shape[0], n):
        raise ValueError(f"masked_linear: masks {tuple(masks.shape)} do not match weight {tuple(weight.shape)}")
    counts = torch.bincount(task_ids, minlength=bmask.shape[0])
    present = counts.nonzero().flatten().tolist()
    if len(present) == 1 and task_grads is None:
        w_eff = torch.where(bmask[present[0]], weight, weight.new_zeros(()))  # (N, K)
        return F.linear(x, w_eff, bias)
    order = torch.argsort(task_ids, stable=True)  # rows grouped by task
    xs = x.index_select(0, order)
    parts, start = [], 0
    for t, c in zip(present, counts[present].tolist()):
        w_eff = torch.where(bmask[t], weight, weight.new_zeros(()))  # (N, K): one masked copy per task present
        if task_grads is not None and w_eff.requires_grad:
            w_eff.register_hook(_accumulate_into(task_grads, t))
        parts.append(F.linear(xs[start : start + c], w_eff, bias))
        start += c
    ys = torch.cat(parts) if parts else x.new_empty(0, n)
    return ys.index_select(0, torch.argsort(order))  # back to the callers' row order


def masked_mlp(x, w1, b1, m1, w2, b2, m2, task_ids):
    """A block's MLP through each row's task masks: ``relu(x W1_t^T + b1) W2_t^T + b2`` with
    ``W_t = W * M[task_ids[r]]`` (two :func:`masked_linear` calls and a ReLU)."""
    return masked_linear(F.relu(masked_linear(x, w1, b1, m1, task_ids)), w2, b2, m2, task_ids)


def masked_qkv_attention(x, weight, bias, masks, row_tasks, n_head, key_valid, query_pos, prefix=None):
    """A block's attention input and attention, per batch row's task mask: ``qkv = x W_t^T + b``
    (:func:`masked_linear`, ``x`` is ``[B * T, C]``), then :func:`attention` without dropout;
    returns ``(B, Tq, C)``."""
    b = row_tasks.shape[0]
    t, c = x.shape[0] // b, x.shape[1]
    qkv = masked_linear(x, weight, bias, masks, row_tasks.repeat_interleave(t))
    return attention(qkv.view(b, t, 3, n_head, c // n_head), key_valid, query_pos, prefix)


def _accumulate_into(buf: torch.Tensor, t: int):
    def hook(grad):
        buf[t] += grad.to(buf.dtype)
        return grad

    return hook


def harmony_select(
    masked_grads: torch.Tensor,
    grads: torch.Tensor,
    params: torch.Tensor,
    masks: torch.Tensor,
    k: int,
    lam: float,
    importance: str = "magnitude",
) -> torch.Tensor:
    """Algorithm 2's selection for every task at once; returns the new packed masks ``[T, W]``.

    masked_grads (``gbar_i``) and grads (``g_i``) ``[T, P]``, params ``[P]``, masks packed
    ``[T, ceil(P/32)]``. With ``ghat = mean_i gbar_i``:

    * H_i = gbar_i * ghat + lam * I_i on active weights (I = |theta| for "magnitude", gbar_i^2 for
      "fisher"), +inf on masked ones (Eq. 8);
    * the k_i active weights with the lowest H_i are masked (Eq. 9);
    * the k_i weights masked *before* this update with the highest g_i * ghat are recovered (Eq. 10);

    with ``k_i = min(k, #active_i, #masked_i)`` so per-task density stays exactly constant.
    Ties go to the lowest index.
    """
    if importance not in ("magnitude", "fisher"):
        raise ValueError(f"importance must be 'magnitude' or 'fisher', got {importance!r}")
    t_count, p = masked_grads.shape
    if grads.shape != (t_count, p) or params.shape != (p,):
        raise ValueError(
            f"harmony_select: masked_grads {tuple(masked_grads.shape)}, grads {tuple(grads.shape)} "
            f"and params {tuple(params.shape)} must be [T, P], [T, P], [P]"
        )
    if masks.shape != (t_count, num_words(p)):
        raise ValueError(f"harmony_select: masks must be [{t_count}, {num_words(p)}], got {tuple(masks.shape)}")
    gbar = masked_grads.float()
    g = grads.float()
    ghat = gbar.mean(0)  # (P,)
    active = unpack_masks(masks, p)  # (T, P)
    imp = params.float().abs().expand(t_count, p) if importance == "magnitude" else gbar * gbar
    harmony = torch.where(active, gbar * ghat + lam * imp, torch.full((), float("inf")))
    recover = torch.where(active, torch.full((), float("-inf")), g * ghat)
    new = active.clone()
    n_active = active.sum(1).tolist()
    for i in range(t_count):
        kk = min(int(k), n_active[i], p - n_active[i])
        if kk <= 0:
            continue
        drop = torch.sort(harmony[i], stable=True).indices[:kk]
        add = torch.sort(recover[i], descending=True, stable=True).indices[:kk]
        new[i, drop] = False
        new[i, add] = True
    return pack_masks(new)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Layer norm over the last dimension (``nn.LayerNorm``'s biased variance)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
