"""Masked AdamW in Triton: one launch updates every parameter of a call, a second increments the steps.

Semantics: :func:`harmodt_kernels.reference.masked_adamw_`. Weights outside a parameter's mask are never
stored to (a masked store), so they stay bit-for-bit unchanged; moments move everywhere.

Launches. A GPU training step is bound by kernel launches, so the parameters of a call are not
launched one by one: a table of int64 rows, one per parameter (addresses of p, grad, exp_avg,
exp_avg_sq, mask words (0 for none) and step, then numel, K = the last dimension, and words per
mask row), followed by one (parameter, first element) pair per program, lets a single launch cover
all of them. The table is built on the host and uploaded only when its content changes: it is
kept by content (the addresses and sizes are the table) in the ``workspace`` dict the caller owns
(the optimizer's, :class:`harmodt.optim.MaskedAdamW`), so a steady training loop uploads nothing;
without a workspace every call builds its table. The step and the gradient scale are read from device memory inside the
kernel and the bias corrections computed there: no host synchronisation. A second one-program launch increments
every step tensor; it cannot be folded into the first, because every program of a parameter must
read the step before any of them could write it, and programs of one launch are not ordered.
Parameters of different dtypes go in separate (pairs of) launches.

Registered with ``torch.library`` as ``harmodt_triton::masked_adamw_`` (mutating params,
exp_avgs, exp_avg_sqs and steps), so ``torch.compile`` sees the whole update as one op.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import List, Optional

import torch
import triton
import triton.language as tl

from .backends import triton_interpreted
from .reference import num_words

__all__ = ["BLOCK", "triton_masked_adamw_"]

BLOCK = 1024  # elements per program on a GPU: 8 per thread keeps registers (and occupancy) moderate
NUM_WARPS = 4
INTERPRET_BLOCK = 4096  # the interpreter runs programs one after another: fewer, larger ones are faster
ROW = 9  # int64 slots per parameter in the table
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _adamw_kernel(table_ptr, blocks_ptr, scale_ptr, lr_ptr, scale, lr, w1, beta2, w2, log2_beta1, log2_beta2, eps,
                  decay,
                  SCALE_IS_PTR: tl.constexpr, LR_IS_PTR: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                  BLOCK: tl.constexpr):
    """One program: BLOCK elements of one parameter. ``w1 = 1 - beta1``, ``w2 = 1 - beta2``,
    ``decay = 1 - lr * weight_decay``, ``log2_beta* = log2(beta*)`` (for ``beta^t = 2^(t log2 beta)``).
    LR_IS_PTR: lr and decay are read as float64 from ``lr_ptr[0:2]`` (values that change between
    replays of a captured graph) and rounded to fp32 as the host rounds the by-value ones."""
    j = tl.program_id(0)
    i = tl.load(blocks_ptr + 2 * j)
    start = tl.load(blocks_ptr + 2 * j + 1).to(tl.int32)  # element offsets are int32 (checked on the host)
    row = table_ptr + i * 9
    p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(P_DTYPE))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(P_DTYPE))
    mask_addr = tl.load(row + 4)
    step_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    numel = tl.load(row + 6).to(tl.int32)
    k = tl.load(row + 7).to(tl.int32)
    n_words = tl.load(row + 8).to(tl.int32)

    if LR_IS_PTR:
        lr = tl.load(lr_ptr).to(tl.float32)
        decay = tl.load(lr_ptr + 1).to(tl.float32)
    if SCALE_IS_PTR:
        s = tl.load(scale_ptr).to(tl.float32)
    else:
        s = scale
    t = tl.load(step_ptr) + 1.0  # this step's count; the step tensor itself is written by _step_kernel
    bc1 = 1.0 - tl.exp2(t * log2_beta1)
    bc2_sqrt = tl.sqrt_rn(1.0 - tl.exp2(t * log2_beta2))
    step_size = lr / bc1

    offs = start + tl.arange(0, BLOCK)
    ok = offs < numel
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32) * s
    m = tl.load(m_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    m = tl.where(w1 < 0.5, m + w1 * (g - m), g - (g - m) * (1.0 - w1))  # torch.lerp's two forms
    v = v * beta2 + w2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    new = p * decay - step_size * tl.div_rn(m, denom)

    col = offs % k
    load_words = ok & ((offs * 0 + mask_addr) != 0)  # (a block-shaped condition: the interpreter wants one)
    words = tl.load(mask_addr.to(tl.pointer_type(tl.int32)) + (offs // k) * n_words + col // 32, mask=load_words,
                    other=-1)
    keep = ((words >> (col % 32)) & 1) != 0  # no mask: all ones
    tl.store(p_ptr + offs, new.to(P_DTYPE), mask=ok & keep)
    tl.store(m_ptr + offs, m.to(P_DTYPE), mask=ok)
    tl.store(v_ptr + offs, v.to(P_DTYPE), mask=ok)


@triton.jit
def _step_kernel(table_ptr, n_params, NP: tl.constexpr):
    """``step += 1`` for every parameter of the table, in one program."""
    i = tl.arange(0, NP)
    ok = i < n_params
    addr = tl.load(table_ptr + i * 9 + 5, mask=ok, other=0)
    ptrs = addr.to(tl.pointer_type(tl.float32))
    tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) + 1.0, mask=ok)


# ---- host side --------------------------------------------------------------------------------

MAX_TABLES = 16  # launch tables kept per workspace


def _rows(params, grads, exp_avgs, exp_avg_sqs, masks, steps) -> list:
    """The parameter rows of a launch table (addresses and sizes, 9 int64 each)."""
    rows = []
    for p, g, m, v, mask, step in zip(params, grads, exp_avgs, exp_avg_sqs, masks, steps):
        k = p.shape[-1] if p.dim() else 1
        rows += (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), 0 if mask is None else mask.data_ptr(),
                 step.data_ptr(), p.numel(), max(k, 1), 0 if mask is None else num_words(k))
    return rows


def _block() -> int:
    return INTERPRET_BLOCK if triton_interpreted() else BLOCK


def _table(device: torch.device, rows: list, block: int) -> tuple[torch.Tensor, int]:
    """The device table for ``rows`` followed by one (parameter, first element) pair per
    program (``block`` elements each), and the number of programs."""
    numels = rows[6::ROW]
    blocks = [v for i, n in enumerate(numels) for s in range(0, n, block) for v in (i, s)]
    host = torch.tensor(rows + blocks, dtype=torch.int64)
    if device.type == "cuda":
        table = host.pin_memory().to(device, non_blocking=True)  # the host does not wait for the device
    else:
        table = host.to(device)
    return table, len(blocks) // 2


def _cached_table(workspace: dict | None, key: tuple, device: torch.device, rows: list,
                  block: int) -> tuple[torch.Tensor, int]:
    """:func:`_table`, kept in ``workspace["triton_adamw_tables"]`` (least recently used dropped
    beyond :data:`MAX_TABLES`) when a workspace is given."""
    if workspace is None:
        return _table(device, rows, block)
    tables = workspace.setdefault("triton_adamw_tables", OrderedDict())
    hit = tables.get(key)
    if hit is None:
        hit = tables[key] = _table(device, rows, block)
        if len(tables) > MAX_TABLES:
            tables.popitem(last=False)
    else:
        tables.move_to_end(key)
    return hit


def _update(params, grads, exp_avgs, exp_avg_sqs, masks, steps, lr, beta1, beta2, eps, weight_decay, scale_t, scale,
            workspace=None, lr_t=None) -> None:
    """The update, parameters grouped by (device, parameter dtype, gradient dtype): two launches
    per group. ``lr_t``: a float64 0-dim tensor holding the learning rate (then ``lr`` is unused)."""
    # float64 (lr, decay), read in the kernel
    lr_decay = None if lr_t is None else torch.stack([lr_t, 1 - lr_t * weight_decay])
    groups: dict = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        groups.setdefault((p.device, p.dtype, g.dtype), []).append(i)
    for (device, p_dtype, g_dtype), idx in groups.items():
        lists = (params, grads, exp_avgs, exp_avg_sqs, masks, steps)
        if len(idx) != len(params):
            lists = tuple([xs[i] for i in idx] for xs in lists)
        rows = _rows(*lists)
        block = _block()
        key = (str(device), p_dtype, g_dtype, block, tuple(rows))
        table, n_programs = _cached_table(workspace, key, device, rows, block)
        n = len(idx)
        if n_programs:
            _adamw_kernel[(n_programs,)](
                table, table[ROW * n:], scale_t if scale_t is not None else table,
                lr_decay if lr_decay is not None else table, float(scale), float(lr),
                float(1 - beta1), float(beta2), float(1 - beta2), math.log2(beta1) if beta1 > 0 else -math.inf,
                math.log2(beta2) if beta2 > 0 else -math.inf, float(eps), float(1 - lr * weight_decay),
                SCALE_IS_PTR=scale_t is not None, LR_IS_PTR=lr_decay is not None, P_DTYPE=_TL_DTYPES[p_dtype],
                G_DTYPE=_TL_DTYPES[g_dtype],
                # no FMA: rounds as the reference's separate ops
                BLOCK=block, num_warps=NUM_WARPS, enable_fp_fusion=False)
        _step_kernel[(1,)](table, n, NP=max(2, triton.next_power_of_2(n)))


@torch.library.custom_op("harmodt_triton::masked_adamw_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "steps"))
def _masked_adamw_op(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
                     exp_avg_sqs: List[torch.Tensor], masks: List[Optional[torch.Tensor]], steps: List[torch.Tensor],
                     lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                     grad_scale_tensor: Optional[torch.Tensor], grad_scale: float,
                     lr_t: Optional[torch.Tensor] = None) -> None:
    """Masked AdamW over the lists in place; ``grad_scale_tensor`` (0-dim, on the device) when
    given, else the float ``grad_scale``, multiplies every gradient; ``lr_t`` (float64 0-dim, on
    the device) when given is the learning rate, else ``lr``."""
    _update(params, grads, exp_avgs, exp_avg_sqs, masks, steps, lr, beta1, beta2, eps, weight_decay, grad_scale_tensor,
            grad_scale, lr_t=lr_t)


@_masked_adamw_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, masks, steps, lr, beta1, beta2, eps, weight_decay, grad_scale_tensor,
      grad_scale, lr_t=None):
    return None


def triton_masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, masks, steps, lr, beta1, beta2, eps, weight_decay,
                         grad_scale=1.0, workspace: dict | None = None) -> None:
    """See :func:`harmodt_kernels.masked_adamw_`, which checks the arguments (masks None or packed int32
    words ``[*p.shape[:-1], ceil(K/32)]``, steps float32 0-dim tensors each its own, grad_scale a
    float or a one-element float tensor on the device). Calls the registered op
    ``torch.ops.harmodt_triton.masked_adamw_`` under ``torch.compile`` (without a workspace);
    eager calls go to the launcher directly (the custom-op wrappers would cost Python time per
    listed tensor). Two launches per parameter dtype."""
    if not params:
        return
    scale_t = grad_scale if isinstance(grad_scale, torch.Tensor) else None
    scale = 1.0 if scale_t is not None else float(grad_scale)
    lr_t = lr if isinstance(lr, torch.Tensor) else None
    args = (0.0 if lr_t is not None else float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
            scale_t, scale)
    if torch.compiler.is_compiling():
        torch.ops.harmodt_triton.masked_adamw_(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
                                               list(masks), list(steps), *args, lr_t)
        return
    with torch.no_grad():  # an optimizer update: parameters change in place outside autograd
        _update(params, grads, exp_avgs, exp_avg_sqs, masks, steps, *args, workspace=workspace, lr_t=lr_t)
