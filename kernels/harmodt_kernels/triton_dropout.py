"""Counter-based dropout in Triton: element i (row-major) of a tensor is kept iff a 32-bit hash of
(i, seed) is >= ``floor(p * 2^32)``; a kept element is multiplied by ``1 / (1 - p)``. The bits are
those of :func:`harmodt_kernels.reference.counter_keep` (two rounds of MurmurHash3's finalizer), so
nothing is stored between forward and backward: the backward recomputes them.

``_keep`` is shared with the masked-linear kernels (their fused epilogue,
``harmodt_kernels/triton_masked_linear.py``); ``_epilogue_grad_kernel`` maps a gradient back through the
epilogue (dropout's bits, then ReLU's where the saved output is > 0) for the masked linear's
backward and for this op's own. Registered as ``torch.ops.harmodt_triton.dropout`` (a fake impl
and autograd), so ``torch.compile`` sees one op.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .reference import dropout_scale, dropout_threshold

__all__ = ["epilogue_args", "epilogue_grad", "seed_pointer", "split_seed", "triton_dropout"]

BLOCK = 1024


def _signed32(v: int) -> int:
    """A uint32 value as the int32 with the same bits (kernel arguments stay int32)."""
    return v - (1 << 32) if v >= 1 << 31 else v


def epilogue_args(p: float, seed) -> tuple[int, int, int, float]:
    """(k0, k1, threshold, scale) of a dropout: the seed's low and high words and the threshold as
    int32 bit patterns, and the scale of kept elements. A seed held in a tensor (read by the
    kernel, :func:`seed_pointer`) gives words 0 here."""
    if isinstance(seed, torch.Tensor):
        seed = 0
    return (_signed32(seed & 0xFFFFFFFF), _signed32((seed >> 32) & 0xFFFFFFFF), _signed32(dropout_threshold(p)),
            dropout_scale(p) if p > 0 else 1.0)


def seed_pointer(seed, fallback: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(pointer argument, SEED_PTR) of a kernel: a seed held in an int64 0-dim tensor is read by the
    kernel on the device (what a captured CUDA graph needs: the value changes between replays);
    an int is passed by value (``fallback`` fills the unused pointer)."""
    return (seed, True) if isinstance(seed, torch.Tensor) else (fallback, False)


@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _keep(index, k0, k1, thr):
    """Whether the elements at int64 ``index`` are kept: the hash of (index mod 2^32, seed words
    k0, k1) against the threshold (k0, k1, thr: int32 bit patterns of uint32 values)."""
    i = index.to(tl.uint32)
    h = _fmix32((i * 0x9E3779B1) ^ tl.cast(tl.cast(k0, tl.int32), tl.uint32, bitcast=True))
    h = _fmix32(h ^ tl.cast(tl.cast(k1, tl.int32), tl.uint32, bitcast=True))
    return h >= tl.cast(tl.cast(thr, tl.int32), tl.uint32, bitcast=True)


@triton.jit
def _keep_seeded(index, seed_ptr, k0, k1, thr, SEED_PTR: tl.constexpr):
    """:func:`_keep` with the seed's words k0, k1, or (SEED_PTR) those of the int64 at ``seed_ptr``."""
    if SEED_PTR:
        s = tl.load(seed_ptr)
        return _keep(index, s & 0xFFFFFFFF, s >> 32, thr)
    return _keep(index, k0, k1, thr)


@triton.jit
def _epilogue_grad_kernel(g_ptr, out_ptr, gin_ptr, seed_ptr, n, k0, k1, thr, scale, DROP: tl.constexpr,
                          RELU: tl.constexpr, SEED_PTR: tl.constexpr, BLOCK: tl.constexpr):
    """gin = keep ? g * scale : 0 (DROP), then 0 where !(out > 0) (RELU): the gradient before the
    epilogue. The forward of the standalone dropout is the same map of x (DROP, no RELU)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(g_ptr + offs, mask=ok, other=0.0)
    if DROP:
        g = tl.where(_keep_seeded(offs, seed_ptr, k0, k1, thr, SEED_PTR), (g.to(tl.float32) * scale).to(g.dtype),
                     tl.zeros_like(g))
    if RELU:
        o = tl.load(out_ptr + offs, mask=ok, other=0.0)
        g = tl.where(o > 0, g, tl.zeros_like(g))
    tl.store(gin_ptr + offs, g, mask=ok)


def epilogue_grad(g: torch.Tensor, out: torch.Tensor | None, relu: bool, p: float, seed) -> torch.Tensor:
    """The gradient before a ReLU/dropout epilogue from ``g``, the gradient after it (``out``: the
    epilogue's output, read for ReLU). A new contiguous tensor of g's dtype and shape."""
    g = g.contiguous()
    if not relu and p == 0.0:
        return g
    gin = torch.empty_like(g)
    n = g.numel()
    if n == 0:
        return gin
    k0, k1, thr, scale = epilogue_args(p, seed)
    o = out.contiguous() if relu else g
    seed_arg, seed_in_tensor = seed_pointer(seed, g)
    _epilogue_grad_kernel[(triton.cdiv(n, BLOCK),)](g, o, gin, seed_arg, n, k0, k1, thr, scale, DROP=p > 0.0, RELU=relu,
                                                    SEED_PTR=seed_in_tensor, BLOCK=BLOCK)
    return gin


@torch.library.custom_op("harmodt_triton::dropout", mutates_args=())
def _dropout_op(x: torch.Tensor, p: float, seed: int, seed_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Counter-based dropout of x (a new contiguous tensor); the seed is ``seed_t`` (an int64 0-dim
    tensor read on the device) when given, else ``seed``."""
    return epilogue_grad(x, None, False, p, seed if seed_t is None else seed_t) if p > 0.0 else x.contiguous().clone()


@_dropout_op.register_fake
def _(x, p, seed, seed_t=None):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.p, ctx.seed = inputs[1], inputs[2]
    ctx.save_for_backward(inputs[3])


def _backward(ctx, grad):
    (seed_t,) = ctx.saved_tensors
    return _dropout_op(grad, ctx.p, ctx.seed, seed_t), None, None, None


_dropout_op.register_autograd(_backward, setup_context=_setup_context)


def split_seed(seed) -> tuple[int, torch.Tensor | None]:
    """(int seed, seed tensor) of a registered op's arguments: an int64 tensor seed goes as the
    tensor (0 as the int), an int as the int."""
    return (0, seed) if isinstance(seed, torch.Tensor) else (seed, None)


def triton_dropout(x: torch.Tensor, p: float, seed) -> torch.Tensor:
    """See :func:`harmodt_kernels.dropout` (checked there); ``torch.ops.harmodt_triton.dropout``. ``seed``:
    an int, or an int64 0-dim tensor on x's device."""
    return x if p == 0.0 else torch.ops.harmodt_triton.dropout(x, p, *split_seed(seed))
