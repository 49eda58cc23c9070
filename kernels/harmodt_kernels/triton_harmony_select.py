"""Algorithm 2's selection for all tasks in Triton, given the scores, without a [T, P] key array
when k is small.

One launch keys every (task, block of weights) pair: the harmony score H on active weights and
the recovery score on masked weights (the caller's ``[T, P]`` scores), as packed sortable int64 keys (order-preserving
float bits in the high 33-bit field, the weight index in the low 31 bits, so ties go to the lowest index exactly as the
reference's stable sort). Each block keeps its ``KC`` best candidates of each kind with ``tl.topk`` on the negated keys
(KC the power of two at or above k, at least 32), and a final pass over the candidates only (``[T, n_blocks * KC]``)
picks ``k_i = min(k, #active_i, #masked_i)`` per task and flips the bits. When k is larger than an
eighth of a block the per-block selection would keep most keys anyway: the kernel then stores
every key and the final pass selects among all of them.

Blocks are 1024 weights on a GPU: the compiled top-k network grows with the block, and at 4096
ptxas needs over a minute for sm_80 (KC=128); at 1024 it is a few seconds.

Registered with ``torch.library`` as ``harmodt_triton::harmony_select`` (with a fake
implementation), so a compiled caller sees one op; the final pass reads k_i back to the host,
which is fine for an update that runs once every many training steps.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .backends import triton_interpreted
from .reference import num_words, unpack_masks

BLOCK = 1024  # weights per program on GPU (candidates: T * P * KC / BLOCK keys)
INTERPRET_BLOCK = 128  # smaller blocks keep the CPU interpreter fast


@triton.jit
def _sortable(f):
    """fp32 -> int64 in [0, 2^32) with the same order (-0.0 and +0.0 made equal first)."""
    f = f + 0.0  # -0.0 -> +0.0, as the reference's comparisons treat them
    bits = f.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    return tl.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits + 0x80000000)


@triton.jit
def _candidates_kernel(h_ptr, r_ptr, m_ptr, hkey_ptr, rkey_ptr, P, W, stride_h, stride_r, stride_m, n_blocks,
                       BLOCK: tl.constexpr, KC: tl.constexpr):
    task = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < P
    h = tl.load(h_ptr + task * stride_h + offs, mask=ok, other=0.0)
    rec = -tl.load(r_ptr + task * stride_r + offs, mask=ok, other=0.0)  # ascending key = descending recovery score
    word = tl.load(m_ptr + task * stride_m + offs // 32, mask=ok, other=0)
    active = ((word >> (offs % 32)) & 1) != 0
    idx = offs.to(tl.int64)
    hkey = tl.where(active & ok, (_sortable(h) << 31) | idx, 0x7FFFFFFFFFFFFFFF)
    rkey = tl.where((~active) & ok, (_sortable(rec) << 31) | idx, 0x7FFFFFFFFFFFFFFF)
    out = (task * n_blocks + blk) * KC + tl.arange(0, KC)
    if KC == BLOCK:  # every key is a candidate: no selection in the block
        tl.store(hkey_ptr + out, hkey)
        tl.store(rkey_ptr + out, rkey)
    else:
        # the KC smallest keys, as the negated KC largest of the negated keys (keys lie in [0, 2^63), so negation is
        # exact): tl.topk takes the largest in every Triton release, and Triton 3.6's takes no ``descending``
        tl.store(hkey_ptr + out, -tl.topk(-hkey, KC))
        tl.store(rkey_ptr + out, -tl.topk(-rkey, KC))


def candidates_per_block(k: int, block: int) -> int:
    """KC: the power of two at or above k, at least min(32, block / 8) (so a run whose k anneals
    compiles few variants); ``block`` itself (keep every key) when that exceeds block / 8."""
    kc = max(triton.next_power_of_2(min(k, block)), min(32, block // 8))
    return block if kc > block // 8 else kc


def triton_harmony_select(harmony, recovery, masks, k):
    """See :func:`harmodt_kernels.harmony_select`, which checks the arguments. Calls the registered op
    ``torch.ops.harmodt_triton.harmony_select``."""
    return torch.ops.harmodt_triton.harmony_select(harmony, recovery, masks, int(k))


@torch.library.custom_op("harmodt_triton::harmony_select", mutates_args=())
def _harmony_select_op(harmony: torch.Tensor, recovery: torch.Tensor, masks: torch.Tensor, k: int) -> torch.Tensor:
    """The new packed masks ``[T, ceil(P/32)]``."""
    return _select(harmony, recovery, masks, k)


@_harmony_select_op.register_fake
def _(harmony, recovery, masks, k):
    return torch.empty_like(masks, memory_format=torch.contiguous_format)


def _select(harmony, recovery, masks, k):
    t, p = harmony.shape
    masks = masks.contiguous()
    if k <= 0 or p == 0:
        return masks.clone()
    h_scores, r_scores = harmony.contiguous(), recovery.contiguous()
    block = INTERPRET_BLOCK if triton_interpreted() else BLOCK
    n_blocks = triton.cdiv(p, block)
    kc = candidates_per_block(k, block)
    hkeys = torch.empty(t, n_blocks * kc, dtype=torch.int64, device=h_scores.device)
    rkeys = torch.empty_like(hkeys)
    _candidates_kernel[(t, n_blocks)](h_scores, r_scores, masks, hkeys, rkeys, p, masks.shape[1], h_scores.stride(0),
                                      r_scores.stride(0), masks.stride(0),
                                      n_blocks, BLOCK=block, KC=kc)
    # final pass over the candidates only: the k_i smallest keys per task
    n_active = unpack_masks(masks, p).sum(1) if p <= 1 << 22 else _popcount_rows(masks)
    kk = torch.clamp(torch.minimum(n_active, p - n_active), max=k)  # (T,)
    kmax = int(kk.max())
    new = masks.clone()
    if kmax == 0:
        return new
    take = min(kmax, hkeys.shape[1])
    hsel = torch.topk(hkeys, take, dim=1, largest=False, sorted=True).values
    rsel = torch.topk(rkeys, take, dim=1, largest=False, sorted=True).values
    keep = torch.arange(take, device=h_scores.device).unsqueeze(0) < kk.unsqueeze(1)  # (T, take)
    rows = torch.arange(t, device=h_scores.device).unsqueeze(1).expand(-1, take)
    for keys, turn_on in ((hsel, False), (rsel, True)):
        idx = (keys & 0x7FFFFFFF)[keep]
        r = rows[keep]
        bit = torch.ones_like(idx) << (idx % 32)
        bit = torch.where(bit >= 2**31, bit - 2**32, bit).to(torch.int32)
        w = (idx // 32)
        flat = new.view(-1)
        pos = r * new.shape[1] + w
        # several flips can hit one word: combine them per word first
        uniq, inv = torch.unique(pos, return_inverse=True)
        acc = torch.zeros(len(uniq), dtype=torch.int64, device=h_scores.device)
        acc = acc.index_add_(0, inv, (bit.to(torch.int64) & 0xFFFFFFFF))
        acc = torch.where(acc >= 2**31, acc - 2**32, acc).to(torch.int32)
        flat[uniq] = (flat[uniq] | acc) if turn_on else (flat[uniq] & ~acc)
    return new


def _popcount_rows(masks: torch.Tensor) -> torch.Tensor:
    """Active weights per task from packed int32 words: a bitwise popcount of each word (the
    arithmetic right shifts are safe: every shifted value is masked to bits the shift filled
    from the word itself), about ten elementwise passes over the words, nothing unpacked."""
    x = masks
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F  # byte counts; bit 31 is now 0, so later shifts are logical
    x = x + (x >> 8)
    x = (x + (x >> 16)) & 0x3F
    return x.sum(1, dtype=torch.int64)
