"""Masked linear in Triton: ``y[r] = x[r] @ (W * M[task[r]]).T + b`` without masked weight copies.

Rows are grouped by task (a stable sort into segments, cut into row tiles of one task each); a
program owns one row tile and one output tile, loads W tiles and the task's packed mask words once
per tile and expands the bits in registers, accumulating in fp32 with ``tl.dot`` (tensor cores on
GPU: tf32 for fp32 inputs, bf16/fp16 natively; exact ieee fp32 under ``TRITON_INTERPRET=1``).
The weight gradient ``dW = sum_t M_t * (dY_t^T X_t)`` is accumulated over all task segments inside
one program per (N, K) tile: deterministic, no atomics, no per-task weight copies; the same loop
can add each task's unmasked ``dY_t^T X_t`` into ``task_grads``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import num_words

BLOCK_M, BLOCK_N, BLOCK_K = 32, 32, 32  # interpreter tiles: row tile (one task), output tile, reduction tile


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def block_config(n: int, k: int) -> tuple[int, int, int]:
    """(BM, BN, BK) keyed on the layer's size: small tiles under the interpreter; on GPU 64-row
    task tiles, wider output tiles for wide layers (qkv 768, fc 1024) and deeper reduction tiles
    for long ones (K >= 256). BK is a multiple of 32 (one packed mask word per 32 columns)."""
    if _interpreting():
        return BLOCK_M, BLOCK_N, BLOCK_K
    return 64, (128 if n >= 512 else 64), (64 if k >= 256 else 32)


@triton.jit
def _mask_tile(words_ptr, task, offs_n, k0, N, K, W, stride_mt, stride_mn, BN: tl.constexpr, BK: tl.constexpr):
    """The task's mask bits for rows ``offs_n`` and columns ``k0 .. k0 + BK`` as a [BN, BK] 0/1
    tile: BK / 32 words per row are loaded once and expanded in registers (k0 % 32 == 0)."""
    offs_k = k0 + tl.arange(0, BK)
    w_idx = k0 // 32 + tl.arange(0, BK // 32)  # (BK/32,)
    wp = words_ptr + task * stride_mt + offs_n[:, None] * stride_mn + w_idx[None, :]
    words = tl.load(wp, mask=(offs_n[:, None] < N) & (w_idx[None, :] < W), other=0)  # (BN, BK/32) int32
    bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1  # (BN, BK/32, 32)
    bits = tl.reshape(bits, (BN, BK))
    return tl.where((offs_n[:, None] < N) & (offs_k[None, :] < K), bits, 0)


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, m_ptr, y_ptr, order_ptr, tiles_ptr, N, K, W,
                stride_xm, stride_xk, stride_wn, stride_wk, stride_mt, stride_mn, stride_ym, stride_yn,
                HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    task = tl.load(tiles_ptr + tile * 3)
    r0 = tl.load(tiles_ptr + tile * 3 + 1)
    r1 = tl.load(tiles_ptr + tile * 3 + 2)
    offs_r = r0 + tl.arange(0, BM)
    row_ok = offs_r < r1
    rows = tl.load(order_ptr + offs_r, mask=row_ok, other=0)  # original row indices
    offs_n = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=row_ok[:, None] & (offs_k[None, :] < K), other=0.0)  # (BM, BK)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)  # (BN, BK)
        m = _mask_tile(m_ptr, task, offs_n, k0, N, K, W, stride_mt, stride_mn, BN, BK)
        w = tl.where(m != 0, w, tl.zeros_like(w))
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_n[None, :] < N))


@triton.jit
def _dx_kernel(dy_ptr, w_ptr, m_ptr, dx_ptr, order_ptr, tiles_ptr, N, K, W,
               stride_dym, stride_dyn, stride_wn, stride_wk, stride_mt, stride_mn, stride_dxm, stride_dxk,
               PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    tile = tl.program_id(0)
    pid_k = tl.program_id(1)
    task = tl.load(tiles_ptr + tile * 3)
    r0 = tl.load(tiles_ptr + tile * 3 + 1)
    r1 = tl.load(tiles_ptr + tile * 3 + 2)
    offs_r = r0 + tl.arange(0, BM)
    row_ok = offs_r < r1
    rows = tl.load(order_ptr + offs_r, mask=row_ok, other=0)
    offs_k = pid_k * BK + tl.arange(0, BK)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=row_ok[:, None] & (offs_n[None, :] < N), other=0.0)  # (BM, BN)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)  # (BN, BK)
        m = _mask_tile(m_ptr, task, offs_n, pid_k * BK, N, K, W, stride_mt, stride_mn, BN, BK)
        w = tl.where(m != 0, w, tl.zeros_like(w))
        acc = tl.dot(dy, w, acc, input_precision=PRECISION)
    tl.store(dx_ptr + rows[:, None] * stride_dxm + offs_k[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_k[None, :] < K))


@triton.jit
def _dw_kernel(dy_ptr, x_ptr, m_ptr, dw_ptr, tg_ptr, order_ptr, tiles_ptr, n_tiles, N, K, W,
               stride_dym, stride_dyn, stride_xm, stride_xk, stride_mt, stride_mn, stride_dwn, stride_dwk,
               stride_tgt, stride_tgn, stride_tgk,
               HAS_TG: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = pid_k * BK + tl.arange(0, BK)
    nk_ok = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for tile in range(0, n_tiles):  # every task segment, in order: deterministic
        task = tl.load(tiles_ptr + tile * 3)
        r0 = tl.load(tiles_ptr + tile * 3 + 1)
        r1 = tl.load(tiles_ptr + tile * 3 + 2)
        offs_r = r0 + tl.arange(0, BM)
        row_ok = offs_r < r1
        rows = tl.load(order_ptr + offs_r, mask=row_ok, other=0)
        dy = tl.load(dy_ptr + rows[None, :] * stride_dym + offs_n[:, None] * stride_dyn,
                     mask=row_ok[None, :] & (offs_n[:, None] < N), other=0.0)  # (BN, BM) = dY_t^T
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=row_ok[:, None] & (offs_k[None, :] < K), other=0.0)  # (BM, BK)
        part = tl.dot(dy, x, input_precision=PRECISION)  # (BN, BK) unmasked dY_t^T X_t for this tile
        m = _mask_tile(m_ptr, task, offs_n, pid_k * BK, N, K, W, stride_mt, stride_mn, BN, BK)
        acc += tl.where(m != 0, part, 0.0)
        if HAS_TG:
            tp = tg_ptr + task * stride_tgt + offs_n[:, None] * stride_tgn + offs_k[None, :] * stride_tgk
            tl.store(tp, tl.load(tp, mask=nk_ok, other=0.0) + part, mask=nk_ok)
    tl.store(dw_ptr + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk, acc.to(dw_ptr.dtype.element_ty), mask=nk_ok)


def _segments(task_ids: torch.Tensor, n_tasks: int, bm: int):
    """Stable order of rows by task and a [n_tiles, 3] int32 table of (task, start, end) row tiles."""
    order = torch.argsort(task_ids, stable=True)
    counts = torch.bincount(task_ids, minlength=n_tasks).tolist()
    tiles, start = [], 0
    for t, c in enumerate(counts):
        for s in range(start, start + c, bm):
            tiles.append((t, s, min(s + bm, start + c)))
        start += c
    table = torch.tensor(tiles, dtype=torch.int32, device=task_ids.device).reshape(-1, 3)
    return order.to(torch.int32), table


def _check(x, weight, bias, masks, task_ids, task_grads):
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"masked_linear: x must be [R, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    r, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"masked_linear: x has K={k} columns but weight is {tuple(weight.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"masked_linear: bias must be [{n}], got {tuple(bias.shape)}")
    if masks.dtype != torch.int32 or masks.dim() != 3 or masks.shape[1:] != (n, num_words(k)):
        raise ValueError(f"masked_linear: masks must be int32 [T, {n}, {num_words(k)}], got {masks.dtype} {tuple(masks.shape)}")
    if task_ids.shape != (r,) or task_ids.dtype != torch.int64:
        raise ValueError(f"masked_linear: task_ids must be int64 [{r}], got {task_ids.dtype} {tuple(task_ids.shape)}")
    if r and (int(task_ids.min()) < 0 or int(task_ids.max()) >= masks.shape[0]):
        raise ValueError(f"masked_linear: task_ids must lie in [0, {masks.shape[0]})")
    if task_grads is not None and (task_grads.shape != (masks.shape[0], n, k) or task_grads.dtype != torch.float32):
        raise ValueError(f"masked_linear: task_grads must be float32 [{masks.shape[0]}, {n}, {k}], got {task_grads.dtype} {tuple(task_grads.shape)}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"masked_linear: x, weight and bias must share a dtype, got {x.dtype}, {weight.dtype}, "
                         f"{None if bias is None else bias.dtype}")
    devs = {t.device for t in (x, weight, bias, masks, task_ids, task_grads) if t is not None}
    if len(devs) != 1:
        raise ValueError(f"masked_linear: all tensors must be on one device, got {sorted(map(str, devs))}")


def _precision(dtype: torch.dtype) -> str:
    if _interpreting():
        return "ieee"
    return "tf32" if dtype == torch.float32 else "ieee"


class _MaskedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, masks, task_ids, task_grads):
        masks = masks.contiguous()
        r, k = x.shape
        n = weight.shape[0]
        bm, bn, bk = block_config(n, k)
        order, tiles = _segments(task_ids, masks.shape[0], bm)
        y = torch.empty(r, n, device=x.device, dtype=x.dtype)
        if len(tiles):
            grid = (len(tiles), triton.cdiv(n, bn))
            _fwd_kernel[grid](x, weight, bias if bias is not None else weight, masks, y, order, tiles, n, k, masks.shape[2],
                              x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), masks.stride(0), masks.stride(1),
                              y.stride(0), y.stride(1), HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype),
                              BM=bm, BN=bn, BK=bk)
        ctx.save_for_backward(x, weight, masks, order, tiles)
        ctx.has_bias = bias is not None
        ctx.blocks = (bm, bn, bk)
        ctx.task_grads = task_grads
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, masks, order, tiles = ctx.saved_tensors
        r, k = x.shape
        n = weight.shape[0]
        dx = dw = db = None
        prec = _precision(x.dtype)
        bm, bn, bk = ctx.blocks
        if ctx.needs_input_grad[0]:
            dx = torch.zeros_like(x) if not len(tiles) else torch.empty_like(x)
            if len(tiles):
                _dx_kernel[(len(tiles), triton.cdiv(k, bk))](
                    dy, weight, masks, dx, order, tiles, n, k, masks.shape[2], dy.stride(0), dy.stride(1),
                    weight.stride(0), weight.stride(1), masks.stride(0), masks.stride(1), dx.stride(0), dx.stride(1),
                    PRECISION=prec, BM=bm, BN=bn, BK=bk)
        if ctx.needs_input_grad[1] or ctx.task_grads is not None:
            dw = torch.empty_like(weight)
            tg = ctx.task_grads
            _dw_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
                dy, x, masks, dw, tg if tg is not None else dw, order, tiles, len(tiles), n, k, masks.shape[2],
                dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), masks.stride(0), masks.stride(1), dw.stride(0), dw.stride(1),
                *(tg.stride() if tg is not None else (0, 0, 0)),
                HAS_TG=tg is not None, PRECISION=prec, BM=bm, BN=bn, BK=bk)
            if not ctx.needs_input_grad[1]:
                dw = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(0, dtype=torch.float32).to(dy.dtype)
        return dx, dw, db, None, None, None


def triton_masked_linear(x, weight, bias, masks, task_ids, task_grads=None):
    """See :func:`kernels.reference.masked_linear`; masks must be packed int32."""
    _check(x, weight, bias, masks, task_ids, task_grads)
    return _MaskedLinear.apply(x, weight, bias, masks, task_ids, task_grads)
