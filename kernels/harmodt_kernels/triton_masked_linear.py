"""Masked linear in Triton: ``y[r] = x[r] @ (W * M[task[r]]).T + b`` without masked weight copies.

Each program owns one row tile of a single task and one output tile; it loads W tiles and the task's packed
mask words once per tile and expands the bits in registers, accumulating in fp32 with ``tl.dot`` (tensor cores
on a GPU: bf16/fp16 natively, fp32 as tf32 when ``torch.get_float32_matmul_precision()`` allows it, as
``F.linear`` does; exact fp32 under ``TRITON_INTERPRET=1``).

Two row layouts, chosen by the shape of ``task_ids``:

* ``[1]``: every row belongs to one task (a training batch). Row tiles are plain ranges of rows; the task is
  read from device memory, so nothing is sorted and nothing waits for the GPU.
* ``[R]``: a mixed-task batch (evaluation). Rows are put in task order by a stable ``argsort`` and counted
  per task on the device; each program finds its (task, row range) from the counts with a cumulative sum in
  registers. The grid is sized for the worst case (``R // BM + min(T, R)`` row tiles), so the host never
  reads the counts: programs past the last tile do no work.

The weight gradient ``dW = sum_t M_t * (dY_t^T X_t)`` is accumulated task by task inside one program per (N,
K) tile: deterministic, no atomics, one mask expansion per task; the same loop adds each task's unmasked
``dY_t^T X_t`` into ``task_grads`` when given.

Epilogue (fwd kernel): ReLU and counter-based dropout (``harmodt_kernels/triton_dropout.py``'s ``_keep``, the
bits of ``harmodt_kernels.reference.counter_keep`` over the ``[R, N]`` output's row-major index) on the tile
before it is stored; the backward first maps dY back through them (the bits recomputed from the seed, ReLU
from the saved output), then runs the dX and dW kernels.

The op is registered with ``torch.library`` (``harmodt_triton::masked_linear`` and its backward ops
``masked_linear_dx``, ``masked_linear_dw`` and ``masked_linear_dw_task_grads``, the last mutating
``task_grads``), with fake implementations, so ``torch.compile`` sees one opaque op per call and no graph
break.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .backends import triton_interpreted
from .checks import KernelArgumentError
from .triton_dropout import _keep_seeded, epilogue_args, epilogue_grad, seed_pointer, split_seed
from .triton_tiles import autotune_tiles

__all__ = ["triton_masked_linear"]


# ---- kernels ----------------------------------------------------------------------------------
@triton.jit
def _mask_tile(m_ptr, task, offs_n, k0, N, K, W, stride_mt, stride_mn, BN: tl.constexpr, BK: tl.constexpr):
    """The task's mask bits for rows ``offs_n`` and columns ``k0 .. k0 + BK`` as a [BN, BK] 0/1
    tile: BK / 32 words per row are loaded once and expanded in registers (k0 % 32 == 0)."""
    offs_k = k0 + tl.arange(0, BK)
    w_idx = k0 // 32 + tl.arange(0, BK // 32)  # (BK/32,)
    wp = m_ptr + task * stride_mt + offs_n[:, None] * stride_mn + w_idx[None, :]
    words = tl.load(wp, mask=(offs_n[:, None] < N) & (w_idx[None, :] < W), other=0)  # (BN, BK/32) int32
    bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1  # (BN, BK/32, 32)
    bits = tl.reshape(bits, (BN, BK))
    return tl.where((offs_n[:, None] < N) & (offs_k[None, :] < K), bits, 0)


@triton.jit
def _row_tile(tile, task_ptr, counts_ptr, order_ptr, R, T, SINGLE: tl.constexpr, TP: tl.constexpr, BM: tl.constexpr):
    """Row tile number ``tile``: (task, original row indices [BM] as int64, which of them are real,
    whether the tile holds any row). One task: rows ``tile*BM ..``. Mixed tasks: the tile's task is
    the first whose cumulative tile count exceeds ``tile``; its rows come from ``order``."""
    if SINGLE:
        task = tl.load(task_ptr).to(tl.int32)
        offs = tile * BM + tl.arange(0, BM)
        row_ok = offs < R
        rows = offs.to(tl.int64)
        n_rows = R - tile * BM
    else:
        t_idx = tl.arange(0, TP)
        cnt = tl.load(counts_ptr + t_idx, mask=t_idx < T, other=0)  # rows per task
        n_tiles = (cnt + BM - 1) // BM
        tiles_incl = tl.cumsum(n_tiles, 0)
        task = tl.sum((tiles_incl <= tile).to(tl.int32), 0)  # == T past the last tile
        sel = t_idx == task
        first_tile = tl.sum(tl.where(sel, tiles_incl - n_tiles, 0), 0)
        seg_start = tl.sum(tl.where(sel, tl.cumsum(cnt, 0) - cnt, 0), 0)
        seg_rows = tl.sum(tl.where(sel, cnt, 0), 0)  # 0 past the last tile
        r0 = (tile - first_tile) * BM
        n_rows = seg_rows - r0
        offs = tl.arange(0, BM)
        row_ok = offs < n_rows
        rows = tl.load(order_ptr + seg_start + r0 + offs, mask=row_ok, other=0).to(tl.int64)
        task = tl.minimum(task, T - 1)  # keeps the (unused) mask loads of an empty tile in bounds
    return task, rows, row_ok, n_rows > 0


@autotune_tiles("fwd", "x_ptr")
@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, m_ptr, y_ptr, task_ptr, counts_ptr, order_ptr, seed_ptr, R, N, K, W, T,
                stride_xm, stride_xk, stride_wn, stride_wk, stride_mt, stride_mn, stride_ym, stride_yn, seed_lo,
                seed_hi, thr, scale,
                SINGLE: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr, DROP: tl.constexpr,
                SEED_PTR: tl.constexpr, PRECISION: tl.constexpr,
                TP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    task, rows, row_ok, has_rows = _row_tile(tl.program_id(0), task_ptr, counts_ptr, order_ptr, R, T, SINGLE, TP, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_end = tl.where(has_rows, K, 0)  # an empty tile skips the reduction
    for k0 in range(0, k_end, BK):
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
    y = acc.to(y_ptr.dtype.element_ty)  # rounded as F.linear's output, before the epilogue
    if RELU:
        y = tl.where((y > 0) | (y != y), y, tl.zeros_like(y))
    if DROP:  # the element's row-major index in the [R, N] output picks its bits
        keep = _keep_seeded(rows[:, None] * N + offs_n[None, :], seed_ptr, seed_lo, seed_hi, thr, SEED_PTR)
        y = tl.where(keep, (y.to(tl.float32) * scale).to(y_ptr.dtype.element_ty), tl.zeros_like(y))
    tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn, y,
             mask=row_ok[:, None] & (offs_n[None, :] < N))


@autotune_tiles("dx", "dy_ptr")
@triton.jit
def _dx_kernel(dy_ptr, w_ptr, m_ptr, dx_ptr, task_ptr, counts_ptr, order_ptr, R, N, K, W, T,
               stride_dym, stride_dyn, stride_wn, stride_wk, stride_mt, stride_mn, stride_dxm, stride_dxk,
               SINGLE: tl.constexpr, PRECISION: tl.constexpr, TP: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    task, rows, row_ok, has_rows = _row_tile(tl.program_id(0), task_ptr, counts_ptr, order_ptr, R, T, SINGLE, TP, BM)
    offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    n_end = tl.where(has_rows, N, 0)
    for n0 in range(0, n_end, BN):
        offs_n = n0 + tl.arange(0, BN)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=row_ok[:, None] & (offs_n[None, :] < N), other=0.0)  # (BM, BN)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)  # (BN, BK)
        m = _mask_tile(m_ptr, task, offs_n, tl.program_id(1) * BK, N, K, W, stride_mt, stride_mn, BN, BK)
        w = tl.where(m != 0, w, tl.zeros_like(w))
        acc = tl.dot(dy, w, acc, input_precision=PRECISION)
    tl.store(dx_ptr + rows[:, None] * stride_dxm + offs_k[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_k[None, :] < K))


@autotune_tiles("dw", "x_ptr", restore=("tg_ptr",))
@triton.jit
def _dw_kernel(dy_ptr, x_ptr, m_ptr, dw_ptr, tg_ptr, task_ptr, counts_ptr, order_ptr, R, N, K, W, T,
               stride_dym, stride_dyn, stride_xm, stride_xk, stride_mt, stride_mn, stride_dwn, stride_dwk,
               stride_tgt, stride_tgn, stride_tgk,
               SINGLE: tl.constexpr, HAS_TG: tl.constexpr, PRECISION: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    offs_k = k0 + tl.arange(0, BK)
    nk_ok = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    if SINGLE:
        n_seg = 1
    else:
        n_seg = T
    seg_start = tl.full((), 0, tl.int32)
    for s in range(0, n_seg):  # each task's rows in turn, in task order: deterministic
        if SINGLE:
            task = tl.load(task_ptr).to(tl.int32)
            seg_rows = R + tl.full((), 0, tl.int32)
        else:
            task = s
            seg_rows = tl.load(counts_ptr + s)
        if seg_rows > 0:
            part = tl.zeros((BN, BK), dtype=tl.float32)  # this task's unmasked dY_t^T X_t
            for r0 in range(0, seg_rows, BM):
                offs = r0 + tl.arange(0, BM)
                row_ok = offs < seg_rows
                if SINGLE:
                    rows = offs.to(tl.int64)
                else:
                    rows = tl.load(order_ptr + seg_start + offs, mask=row_ok, other=0).to(tl.int64)
                dy = tl.load(dy_ptr + rows[None, :] * stride_dym + offs_n[:, None] * stride_dyn,
                             mask=row_ok[None, :] & (offs_n[:, None] < N), other=0.0)  # (BN, BM) = dY_t^T
                x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                            mask=row_ok[:, None] & (offs_k[None, :] < K), other=0.0)  # (BM, BK)
                part = tl.dot(dy, x, part, input_precision=PRECISION)
            m = _mask_tile(m_ptr, task, offs_n, k0, N, K, W, stride_mt, stride_mn, BN, BK)
            acc += tl.where(m != 0, part, 0.0)
            if HAS_TG:
                tp = tg_ptr + task * stride_tgt + offs_n[:, None] * stride_tgn + offs_k[None, :] * stride_tgk
                tl.store(tp, tl.load(tp, mask=nk_ok, other=0.0) + part, mask=nk_ok)
        seg_start += seg_rows
    tl.store(dw_ptr + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk, acc.to(dw_ptr.dtype.element_ty),
             mask=nk_ok)


# ---- launchers --------------------------------------------------------------------------------
def _precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: fp32 products as tf32 only where torch's own fp32 matmuls may
    use it (``torch.get_float32_matmul_precision() != "highest"``), never under the interpreter."""
    if triton_interpreted() or dtype != torch.float32:
        return "ieee"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _row_tiles(single: bool, r: int, n_tasks: int, bm: int) -> int:
    """Row tiles in the grid: every tile of one task's rows, or the mixed layout's worst case."""
    return triton.cdiv(r, bm) if single else min(r, r // bm + min(n_tasks, r))


def _rows(task_ids: torch.Tensor, n_tasks: int, r: int):
    """(single, task tensor, per-task row counts int32 [T], stable task order int64 [R]). One task needs neither counts
    nor order; mixed tasks get them from device ops only (no host synchronisation: ``bincount`` would read the largest
    id back)."""
    if task_ids.shape[0] == 1:
        return True, task_ids, task_ids, task_ids
    order = torch.argsort(task_ids, stable=True)
    counts = torch.zeros(n_tasks, dtype=torch.int32, device=task_ids.device)
    counts.index_add_(0, task_ids, torch.ones((), dtype=torch.int32, device=task_ids.device).expand(r))
    return False, task_ids, counts, order


def _check_task_values(task_ids: torch.Tensor, n_tasks: int) -> None:
    """Task ids in range. Only on CPU tensors: on a GPU this check would make the host wait for
    the device, so there the ids are trusted (out-of-range ids read other memory as mask bits)."""
    if (task_ids.device.type == "cpu" and task_ids.numel()
            and (int(task_ids.min()) < 0 or int(task_ids.max()) >= n_tasks)):
        raise KernelArgumentError(f"masked_linear: task_ids must lie in [0, {n_tasks}), got values in "
                         f"[{int(task_ids.min())}, {int(task_ids.max())}]")


def _forward(x, weight, bias, masks, task_ids, relu=False, dropout_p=0.0, seed=0):
    r, k = x.shape
    n = weight.shape[0]
    t = masks.shape[0]
    _check_task_values(task_ids, t)
    masks = masks if masks.stride(-1) == 1 else masks.contiguous()
    y = torch.empty(r, n, device=x.device, dtype=x.dtype)
    if r == 0 or n == 0:
        return y
    single, tids, counts, order = _rows(task_ids, t, r)
    seed_arg, seed_in_tensor = seed_pointer(seed, y)
    _fwd_kernel[lambda c: (_row_tiles(single, r, t, c["BM"]), triton.cdiv(n, c["BN"]))](
        x, weight, bias if bias is not None else weight, masks, y, tids, counts, order, seed_arg, r, n, k,
        masks.shape[2], t,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), masks.stride(0), masks.stride(1), y.stride(0),
        y.stride(1),
        *epilogue_args(dropout_p, seed), SINGLE=single, HAS_BIAS=bias is not None, RELU=relu, DROP=dropout_p > 0.0,
        SEED_PTR=seed_in_tensor,
        PRECISION=_precision(x.dtype), TP=max(2, triton.next_power_of_2(t)), enable_fp_fusion=True)
    return y


def _backward_dx(dy, weight, masks, task_ids):
    r = dy.shape[0]
    n, k = weight.shape
    t = masks.shape[0]
    masks = masks if masks.stride(-1) == 1 else masks.contiguous()
    if n == 0:
        return torch.zeros(r, k, device=dy.device, dtype=dy.dtype)
    dx = torch.empty(r, k, device=dy.device, dtype=dy.dtype)
    if r == 0 or k == 0:
        return dx
    single, tids, counts, order = _rows(task_ids, t, r)
    _dx_kernel[lambda c: (_row_tiles(single, r, t, c["BM"]), triton.cdiv(k, c["BK"]))](
        dy, weight, masks, dx, tids, counts, order, r, n, k, masks.shape[2], t,
        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), masks.stride(0), masks.stride(1), dx.stride(0),
        dx.stride(1),
        SINGLE=single, PRECISION=_precision(dy.dtype), TP=max(2, triton.next_power_of_2(t)), enable_fp_fusion=True)
    return dx


def _refuse_task_grads_in_capture(task_grads: Optional[torch.Tensor]) -> None:
    """Raises :class:`KernelArgumentError` when ``task_grads`` would be filled inside a CUDA graph
    capture: a replay adds into the graph's copy of the buffer, never the caller's."""
    if task_grads is not None and task_grads.is_cuda and torch.cuda.is_current_stream_capturing():
        raise KernelArgumentError("masked_linear: task_grads cannot be filled inside a CUDA graph (torch.cuda.graph, "
                                  "torch.compile mode='reduce-overhead'): the replays would add into a copy of it; "
                                  "run this call outside the graph")


def _backward_dw(dy, x, masks, task_ids, task_grads):
    r, k = x.shape
    n = dy.shape[1]
    t = masks.shape[0]
    masks = masks if masks.stride(-1) == 1 else masks.contiguous()
    dw = torch.empty(n, k, device=x.device, dtype=x.dtype)
    if n == 0 or k == 0:
        return dw
    tg = task_grads
    _refuse_task_grads_in_capture(tg)
    single, tids, counts, order = _rows(task_ids, t, r)
    _dw_kernel[lambda c: (triton.cdiv(n, c["BN"]), triton.cdiv(k, c["BK"]))](
        dy, x, masks, dw, tg if tg is not None else dw, tids, counts, order, r, n, k, masks.shape[2], t,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), masks.stride(0), masks.stride(1), dw.stride(0),
        dw.stride(1), *(tg.stride() if tg is not None else (0, 0, 0)),
        SINGLE=single, HAS_TG=tg is not None, PRECISION=_precision(x.dtype), enable_fp_fusion=True)
    return dw


# ---- torch.library registration and autograd -------------------------------------------------
@torch.library.custom_op("harmodt_triton::masked_linear", mutates_args=())
def _masked_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], masks: torch.Tensor,
                      task_ids: torch.Tensor, task_grads: Optional[torch.Tensor], relu: bool, dropout_p: float,
                      seed: int, seed_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = epilogue(x @ (W * M[task_ids]).T + b)`` (ReLU, counter-based dropout); ``task_grads``
    is only carried to the backward. Refused inside a CUDA graph capture when ``task_grads`` is given:
    under ``mode="reduce-overhead"`` the recorded forward saves the graph's static copy of it, which
    the backward (graphed or not) then fills instead of the caller's buffer."""
    _refuse_task_grads_in_capture(task_grads)
    return _forward(x, weight, bias, masks, task_ids, relu, dropout_p, seed if seed_t is None else seed_t)


@_masked_linear_op.register_fake
def _(x, weight, bias, masks, task_ids, task_grads, relu, dropout_p, seed, seed_t=None):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("harmodt_triton::masked_linear_dx", mutates_args=())
def _masked_linear_dx_op(dy: torch.Tensor, weight: torch.Tensor, masks: torch.Tensor,
                         task_ids: torch.Tensor) -> torch.Tensor:
    """``dX[r] = dY[r] @ (W * M[task_ids[r]])``."""
    return _backward_dx(dy, weight, masks, task_ids)


@_masked_linear_dx_op.register_fake
def _(dy, weight, masks, task_ids):
    return dy.new_empty(dy.shape[0], weight.shape[1])


@torch.library.custom_op("harmodt_triton::masked_linear_dw", mutates_args=())
def _masked_linear_dw_op(dy: torch.Tensor, x: torch.Tensor, masks: torch.Tensor,
                         task_ids: torch.Tensor) -> torch.Tensor:
    """``dW = sum_t M_t * (dY_t^T X_t)``."""
    return _backward_dw(dy, x, masks, task_ids, None)


# A separate op for the task-gradient pass: a mutable argument that may be None makes Inductor's
# re-inplacing of the functionalized call emit an index into a single tensor. Tagged
# cudagraph_unsafe, so that Inductor keeps it out of its CUDA graphs (mode="reduce-overhead"). On
# torch 2.11 the tag does not keep it out: the replayed graph adds into a static copy of task_grads
# and the caller's buffer stays unchanged. The forward and this op refuse to run with task_grads
# under a capture instead (_refuse_task_grads_in_capture), so that such a run fails in one line
# rather than clipping with zero gradients.
@torch.library.custom_op("harmodt_triton::masked_linear_dw_task_grads", mutates_args=("task_grads",),
                         tags=(torch.Tag.cudagraph_unsafe,))
def _masked_linear_dw_task_grads_op(dy: torch.Tensor, x: torch.Tensor, masks: torch.Tensor, task_ids: torch.Tensor,
                                    task_grads: torch.Tensor) -> torch.Tensor:
    """``dW`` as ``masked_linear_dw``; adds each task's unmasked ``dY_t^T X_t`` into ``task_grads``."""
    return _backward_dw(dy, x, masks, task_ids, task_grads)


def _dw_fake(dy, x, masks, task_ids, task_grads=None):
    return x.new_empty(dy.shape[1], x.shape[1])


_masked_linear_dw_op.register_fake(_dw_fake)
_masked_linear_dw_task_grads_op.register_fake(_dw_fake)


def _setup_context(ctx, inputs, output):
    x, weight, bias, masks, task_ids, task_grads, relu, dropout_p, seed, seed_t = inputs
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ctx.save_for_backward(x if need_w else None, weight if need_x else None, masks, task_ids,
                          task_grads if need_w else None, output if relu else None, seed_t)
    ctx.has_bias = bias is not None
    ctx.epilogue = (relu, dropout_p, seed)


def _backward(ctx, dy):
    x, weight, masks, task_ids, task_grads, out, seed_t = ctx.saved_tensors
    relu, dropout_p, seed = ctx.epilogue
    # dropout's bits recomputed from the seed
    dy = epilogue_grad(dy, out, relu, dropout_p, seed if seed_t is None else seed_t)
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = _masked_linear_dx_op(dy, weight, masks, task_ids)
    if ctx.needs_input_grad[1]:  # task_grads fill only with the weight's gradient, as the reference's
        dw = (_masked_linear_dw_op(dy, x, masks, task_ids) if task_grads is None
              else _masked_linear_dw_task_grads_op(dy, x, masks, task_ids, task_grads))
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = dy.sum(0)
    return dx, dw, db, None, None, None, None, None, None, None


_masked_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public entry -----------------------------------------------------------------------------
def triton_masked_linear(x, weight, bias, masks, task_ids, task_grads=None, segments=None, relu=False, dropout_p=0.0,
                         seed=0):
    """``y[r] = x[r] @ (weight * M[task_ids[r]]).T + bias`` on the Triton kernels, then ReLU and
    counter-based dropout in the same kernel's epilogue when asked; see
    :func:`harmodt_kernels.masked_linear`, which checks the arguments (masks packed int32, task_ids ``[R]``
    or ``[1]``; ``segments`` is not needed: rows are grouped on the device; ``seed``: an int or an
    int64 0-dim tensor read on the device). Calls the registered op
    ``torch.ops.harmodt_triton.masked_linear``."""
    return torch.ops.harmodt_triton.masked_linear(x, weight, bias, masks, task_ids, task_grads, relu, dropout_p,
                                                  *split_seed(seed))
