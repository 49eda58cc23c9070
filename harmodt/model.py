"""Prompt-DT / MTDT with per-task masked weight matrices (HarmoDT's harmony subspaces).

Token layout (Eq. 1): ``[R*_1, s*_1, a*_1, ..., R*_K*, s*_K*, a*_K*, R_1, s_1, a_1, ..., R_K, s_K, a_K]``;
the prompt has its own embeddings; every token gets its timestep embedding (no positional
embedding, as in DT). The action of step j is predicted from the hidden state of token s_j.

The weight matrices of the transformer blocks are :class:`MaskedLinear`: the forward pass uses
``W * M_task`` (Eq. 4), so autograd gives the masked gradient ``grad * M_task``. Embeddings, layer
norms, biases and prediction heads are shared by every task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels import reference as kernels_reference

from .config import ModelConfig


@dataclass
class MaskContext:
    """Which masks a forward pass uses.

    bool_masks: param name -> bool ``[T, N, K]`` (all tasks; the plain path indexes it).
    packed: param name -> int32 ``[T, N, ceil(K/32)]`` (the fused path; the single-task training
        path reads them too, 8x less than the bool masks), or None.
    task_ids: ``(B,)`` task index of each sequence in the batch.
    single_task: the task index when every row has the same task (fast path), else None.
    fused: mask through ``kernels`` with ``backend`` (see :class:`MaskedLinear` for which op).
    task_grads: param name -> fp32 ``[T, N, K]`` buffers that receive each task's unmasked
        gradient w.r.t. its effective weight (used by the mask update), or None.
    """

    bool_masks: dict
    task_ids: torch.Tensor
    packed: dict | None = None
    single_task: int | None = None
    fused: bool = False
    backend: str = "auto"
    task_grads: dict | None = None
    effective: dict | None = None  # param name -> W * M for this forward (single-task training; set by the model)
    block_masks: dict | None = None  # param name -> this step's packed mask, applied inside the fused blocks (set by the model)
    block_norms: torch.Tensor | None = None  # float64 [4 * n_layer]: the blocks' masked weight gradients' sums of squares
    task_weights: dict | None = None  # param name -> [T, N, K] every task's W * M (evaluation: expanded once, read by the inference ops)

    @staticmethod
    def for_tasks(bool_masks, task_ids, packed=None, fused=False, backend="auto", task_grads=None, task_weights=None):
        uniq = torch.unique(task_ids)
        single = int(uniq[0]) if uniq.numel() == 1 else None
        return MaskContext(bool_masks, task_ids, packed, single, fused, backend, task_grads, task_weights=task_weights)

    def expanded(self, key: str) -> torch.Tensor | None:
        """The ``[T, N, K]`` W * M of every task for ``key`` when evaluation expanded them (inference
        only: they are a copy, not the parameter), else None."""
        return None if self.task_weights is None or torch.is_grad_enabled() else self.task_weights.get(key)


def _keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """Bernoulli(1 - p) keep mask from the global torch generator, four 15-bit draws per random
    int64 (about 3x cheaper on CPU than ``bernoulli_``; p is resolved to 1/32768)."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_()  # [0, 2^63)
    return (words.view(torch.int16)[:n].view(shape) & 0x7FFF) >= int(round(p * 32768))


def _native_ops() -> bool:
    """Whether the native CPU ops (``kernels.dropout``, ``kernels.attention``) are built (checked
    once)."""
    global _NATIVE
    if _NATIVE is None:
        _NATIVE = "cpu" in kernels.available_backends("cpu")
    return _NATIVE


_NATIVE: bool | None = None
_GEMM_ENGINE = "auto"  # block GEMMs: "auto" = kernels.gemm's engine (the native kernels, or oneDNN) when the native ops are built; "onednn", "native"; "blas" = MKL (F.linear; bench/ compares)
_NATIVE_BLOCK_OPS: bool | None = None  # None: the blocks use the native attention and GEMM epilogues when built (tests set False)


def _native_block_ops(x: torch.Tensor) -> bool:
    """Whether the blocks run ``x`` through the native ops (``kernels.attention``, ``kernels.bias_relu_``,
    ``kernels.bias_dropout_add``): fp32/bf16 CPU tensors with the library built (feature detection)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and (_native_ops() if _NATIVE_BLOCK_OPS is None else _NATIVE_BLOCK_OPS))


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; fp32 CPU GEMMs outside autocast go through ``kernels.linear`` when the native
    ops are built (feature detection): its forward and both backward GEMMs run on ``kernels.gemm``'s
    "auto" engine (this library's AVX-512 kernel, else oneDNN's matmul), 5-30 % faster than MKL's
    sgemm on the Zen 4 CPUs this was measured on. bf16 GEMMs already run on oneDNN inside
    ``F.linear``, which then stays the cheaper call."""
    if (_GEMM_ENGINE != "blas" and x.dtype == torch.float32 and weight.dtype == torch.float32 and _native_block_ops(x)
            and not torch.is_autocast_enabled("cpu")):
        return kernels.linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _layer_norm(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``ln(x)``; fp32 CPU tensors outside autocast go through ``kernels.layer_norm`` when the
    native ops are built (feature detection), the op the whole-block nodes call too, so both block
    paths round alike."""
    if x.dtype == torch.float32 and _native_block_ops(x) and not torch.is_autocast_enabled("cpu"):
        return kernels.layer_norm(x.contiguous(), ln.weight, ln.bias, ln.eps, backend="cpu")
    return ln(x)


def _fused_inference(x: torch.Tensor, ctx, mask_key: str) -> bool:
    """Evaluation with ``--fused`` masks on CPU with the native library (feature detection): the
    blocks then use the inference-only fused ops (``masked_qkv_attention``, ``masked_mlp``)."""
    return (ctx is not None and ctx.fused and ctx.packed is not None and mask_key in ctx.packed
            and not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and ctx.backend in ("auto", "cpu") and ctx.task_grads is None and _native_block_ops(x))


class Dropout(nn.Dropout):
    """``nn.Dropout`` (inverted scaling) with cheaper masks on CPU.

    With the native library built (feature detection), fp32/bf16 CPU tensors go through
    ``kernels.dropout``: the keep mask is a hash of (seed, element index), the seed one draw from
    torch's global generator per call, so nothing is stored for the backward and one vectorized
    pass does the work (~10x the plain path). Without it, a mask from four 15-bit draws per random
    int64 (plain PyTorch); on other devices ``nn.Dropout`` itself. The three draw different masks
    for one seed, each deterministic for a seed.
    """

    def draw(self) -> tuple[float, int]:
        """``(p, seed)`` for one call of a fused op using ``kernels.dropout``'s mask: ``(0.0, 0)``
        in evaluation (nothing drawn), else one seed from torch's global generator, as here."""
        if not self.training or self.p == 0.0:
            return 0.0, 0
        return self.p, int(torch.empty((), dtype=torch.int64).random_())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        if x.dtype in (torch.float32, torch.bfloat16) and _native_ops():
            seed = int(torch.empty((), dtype=torch.int64).random_())
            return kernels.dropout(x, self.p, seed)
        return x * _keep_mask(x.shape, self.p) * (1.0 / (1.0 - self.p))


class GradSqNorms:
    """Sums of squares of the masked weights' gradients, filled by the backward of the forward
    that made it (``PromptDT.grad_sq_norms``): gradient clipping reads them instead of another
    pass over the gradients."""

    def __init__(self, params: list):
        self.params = params
        self.values: torch.Tensor | None = None  # float64 [len(params)] once the backward ran

    def by_param(self) -> dict:
        """{param: sum of squares of its gradient} for those the backward filled in (NaN: not)."""
        return {} if self.values is None else {p: v for p, v in zip(self.params, self.values.tolist()) if v == v}


class _MaskedWeights(torch.autograd.Function):
    """``W_l * M_l`` for every masked matrix of the model in one call (one autograd node and one
    native call instead of one per matrix), written into reused buffers; the backward masks all
    incoming gradients in place in one call (Eq. 4) and records their sums of squares in
    ``norms``. Through ``kernels.apply_masks_`` / ``apply_masks_sq_norms_`` with the given backend
    (native: AVX-512 masked loads from the packed bits; reference: ``torch.where``). Autograd's
    version counters catch a second forward overwriting the buffers before the first one's
    backward."""

    @staticmethod
    def forward(ctx, masks, holders, backend, norms, *weights):
        ctx.masks, ctx.backend, ctx.norms = masks, backend, norms
        ctx.weight_dtype = weights[0].dtype
        return tuple(kernels.apply_masks_(holders, list(weights), masks, backend=backend))

    @staticmethod
    def backward(ctx, *grads):
        idx = [i for i, g in enumerate(grads) if g is not None]
        gs = [grads[i] if grads[i].is_contiguous() else grads[i].contiguous() for i in idx]
        # masked in place, or (holders in autocast's bf16) converted back to the weights' dtype in the same pass
        outs = gs if all(g.dtype == ctx.weight_dtype for g in gs) else [torch.empty(g.shape, dtype=ctx.weight_dtype) for g in gs]
        sq = kernels.apply_masks_sq_norms_(outs, gs, [ctx.masks[i] for i in idx], backend=ctx.backend)
        gs = outs
        if len(idx) == len(grads):
            ctx.norms.values = sq
        out = [None] * len(grads)
        for i, g in zip(idx, gs):
            out[i] = g
        return (None, None, None, None, *out)


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is seen through the current task's binary mask.

    Paths, by what the batch needs:

    * one task, training on CPU (the paper's Algorithm 1): ``PromptDT.forward`` computes every
      ``W * M_i`` at once (``_MaskedWeights``: the native ``kernels.apply_masks_`` on packed bits
      with ``--fused``, ``torch.where`` on bool masks without) and this layer runs one BLAS GEMM;
    * ``--fused`` otherwise (mixed-task batches, evaluation, Triton): ``kernels.masked_linear``,
      which never materializes per-task weight copies;
    * plain, one task: ``torch.where`` then ``F.linear``;
    * plain, several tasks: ``kernels.reference.masked_linear``.
    """

    mask_key: str = ""  # the parameter name used as key in the mask store (set by the model)
    _w_eff: torch.Tensor | None = None  # reused buffer for W * M on the single-task training path

    def gemm_weight(self, ctx: MaskContext | None) -> torch.Tensor | None:
        """The matrix this layer multiplies by when its forward is one plain GEMM (no mask, or
        ``W * M`` computed for the step), else None (then only :meth:`forward` applies it)."""
        if ctx is None or self.mask_key not in ctx.bool_masks:
            return self.weight
        return None if ctx.effective is None else ctx.effective[self.mask_key]

    def forward(self, x: torch.Tensor, ctx: MaskContext | None = None) -> torch.Tensor:  # (B, T, K) -> (B, T, N)
        if ctx is None or self.mask_key not in ctx.bool_masks:
            return _linear(x, self.weight, self.bias)
        if ctx.effective is not None:  # W * M computed for all matrices at once (PromptDT.forward)
            return _linear(x, ctx.effective[self.mask_key], self.bias)
        b, t, k = x.shape
        masks = ctx.bool_masks[self.mask_key]
        if ctx.fused:
            row_ids = ctx.task_ids.repeat_interleave(t)  # (B*T,)
            grads = None if ctx.task_grads is None else ctx.task_grads.get(self.mask_key)
            y = kernels.masked_linear(x.reshape(b * t, k), self.weight, self.bias, ctx.packed[self.mask_key], row_ids, backend=ctx.backend,
                                      task_grads=grads, task_weights=ctx.expanded(self.mask_key))
            return y.view(b, t, -1)
        if ctx.single_task is not None and ctx.task_grads is None:
            w_eff = torch.where(masks[ctx.single_task], self.weight, self.weight.new_zeros(()))  # (N, K)
            return F.linear(x, w_eff, self.bias)
        row_ids = ctx.task_ids.repeat_interleave(t)
        grads = None if ctx.task_grads is None else ctx.task_grads.get(self.mask_key)
        y = kernels_reference.masked_linear(x.reshape(b * t, k), self.weight, self.bias, masks, row_ids, task_grads=grads)
        return y.view(b, t, -1)


@dataclass
class Attention:
    """Who sees whom in a forward pass: ``key_valid (B, Tk)`` bool over ``[prefix | own]`` keys
    and ``query_pos (Tq,)`` the key position of each query (an own token). Key j is visible to
    query i iff ``(j <= query_pos[i] and key_valid[b, j]) or j == query_pos[i]``
    (:func:`kernels.reference.attention_mask`); the native op reads these two directly, the plain
    path the bool mask."""

    key_valid: torch.Tensor
    query_pos: torch.Tensor
    _mask: torch.Tensor | None = None

    @staticmethod
    def causal(key_valid: torch.Tensor, n_query: int) -> "Attention":
        """The last ``n_query`` keys are the queries' own tokens, in order."""
        tk = key_valid.shape[1]
        return Attention(key_valid, torch.arange(tk - n_query, tk, device=key_valid.device))

    @property
    def mask(self) -> torch.Tensor:  # bool (B, 1, Tq, Tk)
        if self._mask is None:
            self._mask = kernels_reference.attention_mask(self.key_valid, self.query_pos)
        return self._mask

    def select(self, query) -> "Attention":
        """The same keys for a subset (slice) of the queries."""
        return Attention(self.key_valid, self.query_pos[query], None if self._mask is None else self._mask[:, :, query])


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = MaskedLinear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = MaskedLinear(cfg.n_embd, cfg.n_embd)
        self.attn_drop = Dropout(cfg.dropout)
        self.resid_drop = Dropout(cfg.dropout)

    def _project(self, y, ctx, residual):  # residual + dropout(proj(y)): (B, Tq, C)
        w = self.proj.gemm_weight(ctx)
        if w is not None and _native_block_ops(y):  # bias, dropout and residual in one pass after the GEMM
            b, t, c = y.shape
            p, seed = self.resid_drop.draw()
            return kernels.bias_dropout_add(_linear(y.reshape(b * t, c), w).view(b, t, -1), self.proj.bias, residual, p, seed)
        return residual + self.resid_drop(self.proj(y, ctx))

    def forward(self, x, attn: Attention, ctx, residual, prefix=None, return_kv=False, query=None, qkv=None):
        # x (B, T, C); residual (B, Tq, C) the block's stream at the query tokens, added to the
        # output; prefix (k, v) each (B, nh, Tp, hd) before the own keys; query: a slice of the T
        # tokens whose outputs are wanted (None = all); keys and values always come from every token;
        # qkv: the projection (B, T, 3, nh, hd) when already known (evaluation's layer-0 cache; x is
        # then not read). Returns residual + attention output (B, Tq, C) [and the own (k, v), each
        # (B, nh, T, hd)].
        if qkv is None and not return_kv and _fused_inference(x, ctx, self.qkv.mask_key):
            # evaluation with fused masks: projection and attention per run of one task's rows, the
            # projection staying in cache (kernels.masked_qkv_attention)
            b, t, c = x.shape
            sel = attn if query is None else attn.select(query)
            y = kernels.masked_qkv_attention(x.reshape(b * t, c), self.qkv.weight, self.qkv.bias, ctx.packed[self.qkv.mask_key],
                                             ctx.task_ids, self.n_head, sel.key_valid, sel.query_pos, prefix, backend=ctx.backend,
                                             task_weights=ctx.expanded(self.qkv.mask_key))
            return self._project(y, ctx, residual)
        qkv_bias = None
        if qkv is None:
            b, t, c = x.shape
            w = self.qkv.gemm_weight(ctx)
            if w is not None and not return_kv and _native_block_ops(x):
                # the native attention adds the bias as it reads q/k/v (as the fused block node does):
                # the GEMM need not write it
                qkv, qkv_bias = _linear(x, w), self.qkv.bias
            else:
                qkv = self.qkv(x, ctx)
            qkv = qkv.view(b, t, 3, self.n_head, c // self.n_head)  # (B, T, 3, nh, hd)
        else:
            b, t = qkv.shape[:2]
            c = qkv.shape[3] * qkv.shape[4]
        kv = (qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)) if return_kv else None
        if query is not None:
            attn = attn.select(query)
        p = self.attn_drop.p if self.training else 0.0
        if _native_block_ops(qkv):
            # fast path: one fused pass from the packed projection (kernels/csrc/attention.cpp)
            seed = int(torch.empty((), dtype=torch.int64).random_()) if p > 0 else 0
            y = kernels.attention(qkv, attn.key_valid, attn.query_pos, prefix, p, seed, qkv_bias=qkv_bias)  # (B, Tq, C)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, nh, T, hd)
            if query is not None:
                q = q[:, :, query]  # (B, nh, Tq, hd)
            if prefix is not None:
                k = torch.cat([prefix[0], k], dim=2)
                v = torch.cat([prefix[1], v], dim=2)
            if p > 0:  # explicit attention so dropout uses the cheap mask
                att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, Tq, Tk)
                att = att.masked_fill_(~attn.mask, float("-inf")).softmax(-1)  # att is fresh: fill in place
                y = self.attn_drop(att) @ v
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn.mask)
            y = y.transpose(1, 2).reshape(b, q.shape[2], c)  # (B, Tq, C)
        y = self._project(y, ctx, residual)
        return (y, kv) if return_kv else y


def _fused_block(*args) -> torch.Tensor:
    """A whole block's fp32 training step on CPU as ONE autograd node: the op
    ``harmodt_kernels::fused_block`` (``kernels/csrc/block.cpp``), a C++ autograd function that calls
    the same ops as :class:`Block`'s native path (``kernels.linear``'s GEMMs, the fused attention,
    the GEMM epilogues, ``kernels.layer_norm``) with the backward written out. It replaces ~15
    autograd nodes and ~30 op calls from Python per block and step with one call; the dropout seeds
    are drawn in the same order, so the result equals the per-op path's bit for bit. Arguments:
    ``(x, ln1_w, ln1_b, w_qkv, b_qkv, w_proj, b_proj, ln2_w, ln2_b, w_fc, b_fc, w_mlp, b_mlp,
    key_valid, query_pos, n_head, eps, p_attn, seed_attn, p_proj, seed_proj, p_mlp, seed_mlp,
    query, engine, masks, grad_sq_norms)``; ``query``: None or ``[start, stop, step]`` of the tokens
    whose outputs are wanted; ``engine``: kernels.gemm's (``"auto"``: oneDNN, ``"blas"``: MKL);
    ``masks``: ``[]`` or the 4 matrices' packed masks of the step's task (None where unmasked), which
    the node then applies to W before each GEMM and to each weight gradient right after its GEMM
    (Eq. 4), writing the gradients' sums of squares into ``grad_sq_norms`` (float64 (4,))."""
    return torch.ops.harmodt_kernels.fused_block(*args)


def _block_gemm_dtype() -> torch.dtype | None:
    """The fused block nodes' GEMM dtype: float32, or bfloat16 under CPU bf16 autocast (the node
    then gives its GEMMs bf16 operands itself, as autocast would); None under any other autocast."""
    if not torch.is_autocast_enabled("cpu"):
        return torch.float32
    return torch.bfloat16 if torch.get_autocast_dtype("cpu") == torch.bfloat16 else None


_FUSED_BLOCK: bool | None = None  # None: whole-block autograd nodes where they apply (tests and bench/ set False to compare)
_MASKS_IN_BLOCKS: bool | None = None  # None: fused block nodes mask W and dW themselves where they apply (bench/ sets False to compare)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.fc = MaskedLinear(cfg.n_embd, 4 * cfg.n_embd)
        self.mlp_proj = MaskedLinear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = Dropout(cfg.dropout)

    def gemm_linears(self) -> tuple:
        """The block's four GEMM layers in the fused node's order (qkv, proj, fc, mlp_proj)."""
        return self.attn.qkv, self.attn.proj, self.fc, self.mlp_proj

    def _fused_weights(self, x, ctx, prefix, return_kv, query, qkv):
        """``(matrices, masks, norms)`` when this call can run as one :func:`_fused_block` node: fp32
        training forward on CPU with the native ops, no prefix or cache; the four GEMM matrices
        either plain (no mask, or ``W * M`` computed for the step) or, with ``ctx.block_masks``, the
        weights with their packed masks (the node masks W and the gradients itself) and the slice of
        ``ctx.block_norms`` it writes their gradients' sums of squares to. Else None."""
        if (_FUSED_BLOCK is False or qkv is not None or prefix is not None or return_kv
                or not torch.is_grad_enabled() or x.dtype != torch.float32 or not _native_block_ops(x)
                or _block_gemm_dtype() is None):
            return None
        mods = self.gemm_linears()
        if ctx is not None and ctx.block_masks is not None and mods[0].mask_key in ctx.block_masks:
            i = self.norm_slot
            return [m.weight for m in mods], [ctx.block_masks.get(m.mask_key) for m in mods], ctx.block_norms[i : i + 4]
        ws = [m.gemm_weight(ctx) for m in mods]
        if any(w is None or w.dtype != torch.float32 for w in ws):
            return None
        return ws, [], None

    def forward(self, x, attn: Attention, ctx, prefix=None, return_kv=False, query=None, qkv=None):  # (B, T, C) -> (B, Tq, C)
        fused = self._fused_weights(x, ctx, prefix, return_kv, query, qkv)
        if fused is not None:
            ws, masks, norms = fused
            a = self.attn
            p_attn = a.attn_drop.p if self.training else 0.0
            seed_attn = int(torch.empty((), dtype=torch.int64).random_()) if p_attn > 0 else 0  # same draws, same order as below
            p_proj, seed_proj = a.resid_drop.draw()
            p_mlp, seed_mlp = self.drop.draw()
            sel = attn if query is None else attn.select(query)
            span = None if query is None else list(query.indices(x.shape[1]))
            return _fused_block(x.contiguous(), self.ln1.weight, self.ln1.bias, ws[0], a.qkv.bias, ws[1], a.proj.bias,
                                self.ln2.weight, self.ln2.bias, ws[2], self.fc.bias, ws[3], self.mlp_proj.bias,
                                sel.key_valid.contiguous(), sel.query_pos.contiguous(), a.n_head, self.ln1.eps,
                                float(p_attn), seed_attn, float(p_proj), seed_proj, float(p_mlp), seed_mlp, span, _GEMM_ENGINE,
                                masks, norms, _block_gemm_dtype())
        x = self.attn(_layer_norm(self.ln1, x) if qkv is None else None, attn, ctx, x if query is None else x[:, query], prefix, return_kv, query, qkv)
        if return_kv:
            x, kv = x
        w1, w2 = self.fc.gemm_weight(ctx), self.mlp_proj.gemm_weight(ctx)
        if w1 is not None and w2 is not None and _native_block_ops(x):
            # fc and projection as plain GEMMs, each followed by one native pass: bias + ReLU in place,
            # then bias + dropout + residual
            b, t, c = x.shape
            h = kernels.bias_relu_(_linear(_layer_norm(self.ln2, x).reshape(b * t, c), w1), self.fc.bias)  # (B*T, 4C)
            p, seed = self.drop.draw()
            x = kernels.bias_dropout_add(_linear(h, w2).view(b, t, c), self.mlp_proj.bias, x, p, seed)
        elif _fused_inference(x, ctx, self.fc.mask_key):  # fc, ReLU and projection per task while the hidden is in cache
            b, t, c = x.shape
            fc, pr = self.fc, self.mlp_proj
            y = kernels.masked_mlp(_layer_norm(self.ln2, x).reshape(b * t, c), fc.weight, fc.bias, ctx.packed[fc.mask_key], pr.weight, pr.bias,
                                   ctx.packed[pr.mask_key], ctx.task_ids.repeat_interleave(t), backend=ctx.backend,
                                   task_w1=ctx.expanded(fc.mask_key), task_w2=ctx.expanded(pr.mask_key))
            x = x + y.view(b, t, c)
        else:
            h = F.relu(self.fc(_layer_norm(self.ln2, x), ctx), inplace=not torch.is_grad_enabled())  # (B, T, 4C); in place when nothing saves it
            x = x + self.drop(self.mlp_proj(h, ctx))
        return (x, kv) if return_kv else x


def _full_precision(x: torch.Tensor):
    """The model's input embeddings (K = 1, 4, 39) and action head (N = 4) run in fp32 even under
    CPU autocast: bf16 buys nothing for GEMMs that small, and under autocast each costs casts and a
    bf16 GEMM call of 60-90 us (an embedding's forward and backward measured ~0.2 ms slower, about
    0.5 ms per paper-size training step in all). Their outputs go to fp32 layer norms and the fp32
    loss anyway."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return torch.autocast("cpu", enabled=False)
    return contextlib.nullcontext()


class TokenEmbedding(nn.Module):
    """Embeds (R, s, a, timestep) into interleaved tokens ``(B, 3T, C)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.timestep = nn.Embedding(cfg.max_ep_len, cfg.n_embd)
        self.ret = nn.Linear(1, cfg.n_embd)
        self.state = nn.Linear(cfg.state_dim, cfg.n_embd)
        self.action = nn.Linear(cfg.act_dim, cfg.n_embd)

    def forward(self, states, actions, rtg, timesteps):
        # states (B, T, S), actions (B, T, A), rtg (B, T, 1), timesteps (B, T) -> (B, 3T, C)
        with _full_precision(states):
            te = self.timestep(timesteps)
            toks = torch.stack([self.ret(rtg) + te, self.state(states) + te, self.action(actions) + te], dim=2)  # (B, T, 3, C)
        return toks.flatten(1, 2)


class PromptDT(nn.Module):
    """Prompt-DT (``use_prompt``) or MTDT (a learned task embedding instead of a prompt)."""

    def __init__(self, cfg: ModelConfig, n_tasks: int, use_prompt: bool = True):
        super().__init__()
        self.cfg = cfg
        self.use_prompt = use_prompt
        self.embed = TokenEmbedding(cfg)
        self.prompt_embed = TokenEmbedding(cfg) if use_prompt else None
        self.task_embed = None if use_prompt else nn.Embedding(n_tasks, cfg.n_embd)
        self.embed_ln = nn.LayerNorm(cfg.n_embd)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        for i, blk in enumerate(self.blocks):
            blk.norm_slot = 4 * i  # its matrices' place in the step's gradient norms (see _masks_in_blocks)
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.predict_action = nn.Linear(cfg.n_embd, cfg.act_dim)
        self.apply(self._init_weights)
        for name, mod in self.named_modules():
            if isinstance(mod, MaskedLinear):
                mod.mask_key = name + ".weight"
        self._masked_linears = [m for m in self.modules() if isinstance(m, MaskedLinear)]  # walked once
        self.grad_sq_norms: GradSqNorms | None = None  # the last training forward's (see GradSqNorms)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def _action_head(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., A), in fp32 (see _full_precision)
        with _full_precision(x):
            return torch.tanh(self.predict_action(self.ln_f(x.float())))

    def masked_weights(self) -> dict[str, nn.Parameter]:
        """The weight matrices that carry task masks, by parameter name."""
        return {m.mask_key: m.weight for m in self._masked_linears}

    def _tokens(self, states, actions, rtg, timesteps, task_ids, embed):
        x = embed(states, actions, rtg, timesteps)  # (B, 3T, C)
        if self.task_embed is not None:
            x = x + self.task_embed(task_ids).unsqueeze(1)
        return x

    def _masks_in_blocks(self, ctx: MaskContext, mods: list) -> bool:
        """Whether this single-task training forward leaves the masking to the fused block nodes:
        ``--fused`` packed masks, fp32 weights on CPU (outside autocast or under bf16 autocast), the native ops built, the fused
        blocks on, and the masked matrices exactly the blocks' GEMM matrices."""
        w = mods[0].weight
        return (_MASKS_IN_BLOCKS is not False and ctx.fused and ctx.backend in ("auto", "cpu") and ctx.packed is not None
                and _FUSED_BLOCK is not False
                and w.dtype == torch.float32 and _block_gemm_dtype() is not None and _native_block_ops(w)
                and {id(m) for m in mods} == {id(m) for blk in self.blocks for m in blk.gemm_linears()})

    def _with_effective_weights(self, ctx: MaskContext | None) -> MaskContext | None:
        """Single-task training on CPU: every ``W * M_i`` in one autograd node (``_MaskedWeights``)
        before the blocks run. ``--fused`` masks from the packed bits natively, the plain path with
        ``torch.where`` on the bool masks."""
        if (ctx is None or ctx.single_task is None or ctx.task_grads is not None or ctx.effective is not None
                or not torch.is_grad_enabled() or (ctx.fused and ctx.backend not in ("auto", "cpu", "reference"))):
            return ctx
        mods = [m for m in self._masked_linears if m.mask_key in ctx.bool_masks]
        if not mods or mods[0].weight.device.type != "cpu" or not all(m.weight.requires_grad for m in mods):
            return ctx
        if self._masks_in_blocks(ctx, mods):
            # --fused fp32: each fused block node masks its 4 matrices and their gradients while they
            # are in cache (kernels/csrc/block.cpp) instead of two passes over all of them here
            params = [m.weight for blk in self.blocks for m in blk.gemm_linears()]
            self.grad_sq_norms = GradSqNorms(params)
            self.grad_sq_norms.values = torch.full((len(params),), float("nan"), dtype=torch.float64)  # NaN until the backward
            return dataclasses.replace(ctx, block_masks={m.mask_key: ctx.packed[m.mask_key][ctx.single_task] for m in mods},
                                       block_norms=self.grad_sq_norms.values)
        # under CPU bf16 autocast W * M is written in bf16 directly (the GEMMs would cast it anyway)
        dtype = torch.bfloat16 if (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
                                   and mods[0].weight.dtype == torch.float32) else mods[0].weight.dtype
        for m in mods:
            if m._w_eff is None or m._w_eff.shape != m.weight.shape or m._w_eff.dtype != dtype:
                m._w_eff = torch.empty(m.weight.shape, dtype=dtype)
        if ctx.fused:
            masks, backend = [ctx.packed[m.mask_key][ctx.single_task] for m in mods], ctx.backend  # packed bits
        else:
            masks, backend = [ctx.bool_masks[m.mask_key][ctx.single_task] for m in mods], "reference"  # bool, torch.where
        self.grad_sq_norms = GradSqNorms([m.weight for m in mods])
        eff = _MaskedWeights.apply(masks, [m._w_eff for m in mods], backend, self.grad_sq_norms, *[m.weight for m in mods])
        return dataclasses.replace(ctx, effective={m.mask_key: w for m, w in zip(mods, eff)})

    def forward(self, batch: dict, ctx: MaskContext | None = None) -> torch.Tensor:
        """Training forward over ``[prompt | history]``; returns predicted actions (B, K, A)."""
        self.grad_sq_norms = None  # set by the single-task masked path, filled by its backward
        ctx = self._with_effective_weights(ctx)
        # The history's last action token a_K: no state token attends to it (causal) and the loss
        # reads only state tokens, so it is not fed at all (exact; the tests compare the full forward).
        x = self._tokens(batch["states"], batch["actions"], batch["rtg"], batch["timesteps"], batch["task_ids"], self.embed)[:, :-1]
        valid = batch["mask"].repeat_interleave(3, dim=1)[:, :-1]  # (B, 3K - 1)
        if self.use_prompt:
            p = self.prompt_embed(batch["prompt_states"], batch["prompt_actions"], batch["prompt_rtg"], batch["prompt_timesteps"])
            x = torch.cat([p, x], dim=1)
            valid = torch.cat([batch["prompt_mask"].repeat_interleave(3, dim=1), valid], dim=1)
        x = self.drop(self.embed_ln(x))  # (B, L, C)
        attn = Attention.causal(valid, x.shape[1])
        k = batch["states"].shape[1]
        states = slice(x.shape[1] - (3 * k - 1) + 1, None, 3)  # the history's state tokens: the only outputs the loss reads
        for i, blk in enumerate(self.blocks):
            # the last block computes queries, MLP and output only at those K tokens (keys and values at all)
            x = blk(x, attn, ctx, query=states if i == len(self.blocks) - 1 else None)
        return self._action_head(x)  # (B, K, A)

    @torch.no_grad()
    def encode_prompt(self, prompt: dict, ctx: MaskContext | None = None) -> list:
        """Per-layer keys/values of the prompt tokens: they never depend on later tokens, so
        evaluation computes them once per task. Returns [(k, v) (B, nh, 3K*, hd), ...] and the
        prompt's token validity (B, 3K*)."""
        x = self.drop(self.embed_ln(self.prompt_embed(prompt["prompt_states"], prompt["prompt_actions"], prompt["prompt_rtg"], prompt["prompt_timesteps"])))
        valid = prompt["prompt_mask"].repeat_interleave(3, dim=1)
        attn = Attention.causal(valid, x.shape[1])
        kvs = []
        for blk in self.blocks:
            x, kv = blk(x, attn, ctx, return_kv=True)
            kvs.append(kv)
        return kvs, valid

    @torch.no_grad()
    def act(self, states, actions, rtg, timesteps, task_ids, ctx=None, prompt_kv=None, prompt_valid=None,
            cache: dict | None = None) -> torch.Tensor:
        """Action for the last history step of every row (B, A), reusing cached prompt keys/values.

        states (B, L, S), actions (B, L, A) (last one ignored), rtg (B, L, 1), timesteps (B, L);
        all rows share the same history length L (evaluation episodes run in lockstep).

        ``cache``: a dict kept across the steps of one set of episodes (start with ``{}``). The
        first block's q/k/v of a token depend on that token alone (no positional embedding), so
        they are computed once, when the token appears, and kept for the window; set
        ``cache["drop"]`` to the number of tokens the window lost at its start since the last
        call (3 when it slid by one step, else 0).
        """
        # The last action token is a placeholder that no earlier token attends to (causal): drop it.
        x = self.drop(self.embed_ln(self._tokens(states, actions, rtg, timesteps, task_ids, self.embed)[:, :-1]))  # (B, 3L-1, C)
        b, t, c = x.shape
        own = torch.ones(b, t, dtype=torch.bool, device=x.device)
        valid = own if prompt_valid is None else torch.cat([prompt_valid, own], dim=1)
        attn = Attention.causal(valid, t)
        qkv0 = None
        if cache is not None:
            kept = cache.get("qkv")
            kept = None if kept is None else kept[:, cache.get("drop", 0):]  # (B, T_kept, 3, nh, hd)
            n_new = t - (0 if kept is None else kept.shape[1])
            if not 0 < n_new <= t:
                raise ValueError(f"act: the layer-0 cache holds {t - n_new} tokens but the window has {t}: set cache['drop']")
            blk0 = self.blocks[0]
            new = blk0.attn.qkv(_layer_norm(blk0.ln1, x[:, t - n_new :]), ctx).view(b, n_new, 3, self.cfg.n_head, c // self.cfg.n_head)
            qkv0 = new if kept is None else torch.cat([kept, new], dim=1)  # (B, T, 3, nh, hd)
            cache["qkv"], cache["drop"] = qkv0, 0
        last = slice(t - 1, None)  # the current state token: the last block computes only its output
        for i, blk in enumerate(self.blocks):
            x = blk(x, attn, ctx, prefix=None if prompt_kv is None else prompt_kv[i], query=last if i == len(self.blocks) - 1 else None,
                    qkv=qkv0 if i == 0 else None)
        return self._action_head(x[:, -1])


def build_model(cfg: ModelConfig, n_tasks: int, method: str) -> PromptDT:
    return PromptDT(cfg, n_tasks, use_prompt=(method != "mtdt"))
