"""Prompt-DT / MTDT whose transformer weight matrices are seen through per-task masks (HarmoDT).

Token layout (Eq. 1): ``[R*_1, s*_1, a*_1, ..., R*_K*, s*_K*, a*_K*, R_1, s_1, a_1, ..., R_K, s_K, a_K]``;
the prompt has its own embeddings; every token gets its timestep embedding (no positional
embedding, as in DT). The action of step j is predicted from the hidden state of token s_j. A
model without a prompt (MTDT) is told its task by the task ID instead (see :class:`PromptDT`).

The four weight matrices of every block are :class:`MaskedLinear`. Masks enter the model there and
nowhere else: its forward calls the run's ``masked_linear`` op (x, W, b, masks, task_ids), which computes
``x @ (W * M_task).T + b`` (Eq. 4), so the gradient reaching W is ``grad * M_task``. Embeddings,
layer norms, biases and prediction heads are shared by every task. Everything else is plain
PyTorch.

Dropout: the ``nn.Dropout`` modules and SDPA's ``dropout_p`` (torch's RNG), unless the forward's
context carries a :class:`CounterDropout` (``--dropout-rng counter``, what ``--fused`` selects):
then every dropout is counter-based, fused into the masked linears' epilogue (with the MLP's ReLU)
where it follows one, and attention is written out (SDPA cannot take the bits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import harmodt_kernels



@dataclass(frozen=True)
class CounterDropout:
    """Counter-based dropout for one training forward (``--dropout-rng counter``): every dropout
    site (the embeddings' 0, then three per block: attention probabilities, the attention output
    after ``proj``, the MLP output after ``mlp_proj``) keeps element i of its output iff a hash of
    (i, the site's seed) clears ``p`` (``harmodt_kernels.dropout``), so no bits are stored and the backward
    recomputes them. The masked linears apply it in their epilogue; the other sites call ``op``.

    p: the dropout rate; seed: this forward's seed (from the run's seed and step, see
    ``harmodt.steps.PlainStep.counter_dropout``); op: the run's ``harmodt_kernels.dropout`` op."""

    p: float
    seed: int
    op: harmodt_kernels.DropoutOp

    def site_seed(self, site: int) -> int:
        return harmodt_kernels.reference.site_seed(self.seed, site)

    def __call__(self, x: torch.Tensor, site: int) -> torch.Tensor:
        return self.op(x, self.p, self.site_seed(site))


def dropout_sites(n_layer: int) -> int:
    """The counter-dropout sites of a model of ``n_layer`` blocks (:class:`CounterDropout`)."""
    return 1 + 3 * n_layer


@dataclass(frozen=True)
class DeviceSeedDropout(CounterDropout):
    """:class:`CounterDropout` whose forward seed is an int64 0-dim device tensor (a captured step's,
    harmodt.graphed_step) and whose per-site seeds were computed from it on the device at once
    (``seeds[site]``, the host arithmetic's bits): the kernels read them there."""

    seeds: torch.Tensor | None = None

    @staticmethod
    def of(p: float, seed: torch.Tensor, op: harmodt_kernels.DropoutOp, n_layer: int) -> "DeviceSeedDropout":
        sites = torch.arange(dropout_sites(n_layer), device=seed.device)
        return DeviceSeedDropout(p, seed, op, seeds=harmodt_kernels.reference.site_seed(seed, sites))

    def site_seed(self, site: int):
        return self.seeds[site]


@dataclass
class MaskContext:
    """The task masks one forward pass runs through.

    masks: parameter name -> packed int32 masks ``[T, N, ceil(K/32)]`` of every task (the
        reference backend also takes them unpacked, bool ``[T, N, K]``).
    task_ids: ``(B,)`` each sequence's row in ``masks``, or ``(1,)`` when the whole batch is one
        task (Algorithm 1's training step).
    masked_linear: the ``harmodt_kernels.masked_linear`` op the masked layers run on (a field of the
        run's ``harmodt_kernels.select_backends(...)``; the reference's by default).
    task_grads: parameter name -> float32 ``[T, N, K]`` buffers that receive each task's unmasked
        gradient on backward (Algorithm 2's recovery gradient), or None.
    segments: ``((task, sequences), ...)`` when the batch's sequences are grouped by task and the
        layout is known on the host (a training batch), else None; see ``harmodt_kernels.masked_linear``.
    dropout: the forward's :class:`CounterDropout` (``--dropout-rng counter``), or None: the
        model's ``nn.Dropout`` modules draw from torch's RNG.
    """

    masks: dict
    task_ids: torch.Tensor
    masked_linear: harmodt_kernels.MaskedLinearOp = harmodt_kernels.REFERENCE_OPS.masked_linear
    task_grads: dict | None = None
    segments: tuple | None = None
    dropout: CounterDropout | None = None

    def row_ids(self, t: int) -> torch.Tensor:
        """The mask row of each of the ``B * t`` rows a ``(B, t, C)`` input flattens to."""
        return self.task_ids if self.task_ids.shape[0] == 1 else self.task_ids.repeat_interleave(t)

    def row_segments(self, t: int) -> tuple | None:
        """``segments`` in rows of a ``(B, t, C)`` input flattened to ``(B * t, C)``."""
        return None if self.segments is None else tuple((task, n * t) for task, n in self.segments)


class MaskedLinear(nn.Linear):
    """``nn.Linear`` whose weight is seen through each row's task mask: the one seam of the model
    where masks enter. Without a context (or for a layer the context holds no mask for) it is
    ``F.linear``."""

    mask_key: str = ""  # the parameter name that keys this layer's masks (set by the model)

    def forward(self, x: torch.Tensor, ctx: MaskContext | None = None, relu: bool = False,
                site: int | None = None) -> torch.Tensor:  # (B, T, K) -> (B, T, N)
        """``relu``: ReLU on the output; ``site``: then the context's counter-based dropout of that
        site (both in the masked-linear op's epilogue when the layer has masks)."""
        drop = ctx.dropout if ctx is not None and site is not None else None
        if ctx is None or self.mask_key not in ctx.masks:
            y = F.linear(x, self.weight, self.bias)
            y = F.relu(y) if relu else y
            return y if drop is None else drop(y, site)
        b, t, k = x.shape
        grads = None if ctx.task_grads is None else ctx.task_grads.get(self.mask_key)
        epilogue = {} if not relu and drop is None else {"relu": relu, "dropout_p": 0.0 if drop is None else drop.p,
                                                         "seed": 0 if drop is None else drop.site_seed(site)}
        y = ctx.masked_linear(x.reshape(b * t, k), self.weight, self.bias, ctx.masks[self.mask_key], ctx.row_ids(t),
                              task_grads=grads, segments=ctx.row_segments(t), **epilogue)
        return y.view(b, t, -1)


def causal_mask(key_valid: torch.Tensor, n_query: int) -> torch.Tensor:
    """bool ``(B, 1, Tq, Tk)`` for queries that are the last ``n_query`` of ``Tk`` keys: key j is
    visible to the query at position i iff ``(j <= i and key_valid[b, j]) or j == i`` (causal,
    padding hidden, and a query always sees itself so no row is empty)."""
    tk = key_valid.shape[1]
    k_pos = torch.arange(tk, device=key_valid.device)  # (Tk,)
    q_pos = torch.arange(tk - n_query, tk, device=key_valid.device).unsqueeze(1)  # (Tq, 1)
    visible = (k_pos <= q_pos).unsqueeze(0) & key_valid.unsqueeze(1)  # (B, Tq, Tk)
    return (visible | (k_pos == q_pos).unsqueeze(0)).unsqueeze(1)


class _HeadLayouts(torch.autograd.Function):
    """The written-out attention's operands from the ``qkv`` output (B, T, 3C): q (B, nh, T, hd),
    kᵀ (B, nh, hd, T) and v (B, nh, T, hd), each contiguous, which is how the batched matmuls read
    them (one copy each, as the matmuls' own reshapes would make). The backward writes the three
    gradients straight into one (B, T, 3C) gradient: one strided pass instead of stacking them and
    copying the stack into the ``qkv`` layout."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, n_head: int):
        b, t, c3 = qkv.shape
        h = qkv.view(b, t, 3, n_head, c3 // (3 * n_head))  # (B, T, 3, nh, hd)
        return (h[:, :, 0].transpose(1, 2).contiguous(), h[:, :, 1].permute(0, 2, 3, 1).contiguous(),
                h[:, :, 2].transpose(1, 2).contiguous())

    @staticmethod
    def backward(ctx, dq, dkt, dv):  # (B, nh, T, hd), (B, nh, hd, T), (B, nh, T, hd) -> (B, T, 3C)
        like = next(g for g in (dq, dkt, dv) if g is not None)
        b, nh = like.shape[:2]
        t, hd = (like.shape[3], like.shape[2]) if like is dkt else like.shape[2:]
        g = like.new_empty(b, t, 3, nh, hd)
        for i, (d, dims) in enumerate(((dq, (0, 2, 1, 3)), (dkt, (0, 3, 1, 2)), (dv, (0, 2, 1, 3)))):
            if d is None:
                g[:, :, i].zero_()
            else:
                g[:, :, i].copy_(d.permute(*dims))
        return g.view(b, t, 3 * nh * hd), None


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = MaskedLinear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = MaskedLinear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, attn_mask, ctx=None, prefix=None, site=0, last_only=False):
        # x (B, T, C); attn_mask bool (B, 1, T, Tp + T); prefix: cached (k, v) of Tp earlier tokens,
        # each (B, nh, Tp, hd). Returns the output (B, T, C) and this call's own (k, v). site: the
        # first of this layer's two counter-dropout sites (attention probabilities, output).
        # last_only: keys and values of every token, the output of the last token only (B, 1, C).
        b, t, c = x.shape
        drop = None if ctx is None else ctx.dropout
        if drop is None:
            # each (B, nh, T, hd)
            q, k, v = self.qkv(x, ctx).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        else:  # written out below: the layouts its matmuls read
            q, kt, v = _HeadLayouts.apply(self.qkv(x, ctx), self.n_head)
            k = kt.transpose(-2, -1)
        own = (k, v)
        if last_only:
            q, attn_mask, t = q[:, :, -1:], attn_mask[:, :, -1:], 1
        if prefix is not None:
            k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)  # (B, nh, Tp + T, hd)
        if drop is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                               dropout_p=self.dropout if self.training else 0.0)
            return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c), ctx)), own
        if prefix is not None:
            kt = k.transpose(-2, -1)  # (B, nh, hd, Tp + T)
        att = (q @ kt) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, T, Tp + T)
        att = drop(att.masked_fill_(~attn_mask, float("-inf")).softmax(-1), site)
        y = (att @ v).transpose(1, 2).reshape(b, t, c)  # (B, T, C)
        return self.proj(y, ctx, site=site + 1), own


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.fc = MaskedLinear(cfg.n_embd, 4 * cfg.n_embd)
        self.mlp_proj = MaskedLinear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    # (B, T, C) -> (B, T, C), own (k, v)
    def forward(self, x, attn_mask, ctx=None, prefix=None, layer=0, last_only=False):
        """``last_only``: the output of the last token only, (B, 1, C) (what acting reads of the last
        block); the keys and values are still every token's."""
        site = 1 + 3 * layer  # this block's counter-dropout sites: site, site + 1, site + 2
        a, kv = self.attn(self.ln1(x), attn_mask, ctx, prefix, site, last_only)
        x = (x[:, -1:] if last_only else x) + a
        if ctx is None or ctx.dropout is None:
            return x + self.drop(self.mlp_proj(F.relu(self.fc(self.ln2(x), ctx)), ctx)), kv
        return x + self.mlp_proj(self.fc(self.ln2(x), ctx, relu=True), ctx, site=site + 2), kv


class TokenEmbedding(nn.Module):
    """Embeds (R, s, a, timestep) into interleaved tokens ``(B, 3T, C)``."""

    def __init__(self, cfg, state_in: int | None = None):
        super().__init__()
        self.timestep = nn.Embedding(cfg.max_ep_len, cfg.n_embd)
        self.ret = nn.Linear(1, cfg.n_embd)
        # state_in: what a state token carries (S, or S + T)
        self.state = nn.Linear(state_in or cfg.state_dim, cfg.n_embd)
        self.action = nn.Linear(cfg.act_dim, cfg.n_embd)

    def forward(self, states, actions, rtg, timesteps):
        # states (B, T, S), actions (B, T, A), rtg (B, T, 1), timesteps (B, T) -> (B, 3T, C)
        te = self.timestep(timesteps)
        # (B, T, 3, C)
        toks = torch.stack([self.ret(rtg) + te, self.state(states) + te, self.action(actions) + te], dim=2)
        return toks.flatten(1, 2)


CONDITIONINGS = ("prompt", "task-state", "task-embedding", "prompt-task-state")
PROMPTED = ("prompt", "prompt-task-state")  # the conditionings that read a trajectory prompt


class PromptDT(nn.Module):
    """A decision transformer told which task it acts on by ``conditioning``:

    - "prompt": a K*-step trajectory prompt of the task before the history (Prompt-DT);
    - "task-state": the task ID as a one-hot vector concatenated with every state, no prompt (MTDT
      as the paper's Appendix D describes it: the state embedding reads S + T inputs);
    - "task-embedding": a learned task embedding added to every R, s and a token, no prompt;
    - "prompt-task-state": both the prompt and the one-hot task ID beside every history state
      (identity without masks: the ablation of what a per-task mask tells the model).

    ``cfg``: its shape (a :class:`harmodt.config.ModelConfig`; each block reads the fields it needs).
    The model of a ``--method`` is built by its entry (:func:`harmodt.methods.build_model`).
    """

    def __init__(self, cfg, n_tasks: int, conditioning: str = "prompt"):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {', '.join(CONDITIONINGS)}, got {conditioning!r}")
        self.cfg = cfg
        self.n_tasks = n_tasks
        self.conditioning = conditioning
        self.use_prompt = conditioning in PROMPTED
        self.onehot_state = conditioning in ("task-state", "prompt-task-state")
        self.embed = TokenEmbedding(cfg, cfg.state_dim + n_tasks if self.onehot_state else cfg.state_dim)
        self.prompt_embed = TokenEmbedding(cfg) if self.use_prompt else None
        self.task_embed = nn.Embedding(n_tasks, cfg.n_embd) if conditioning == "task-embedding" else None
        self.embed_ln = nn.LayerNorm(cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.predict_action = nn.Linear(cfg.n_embd, cfg.act_dim)
        # ours: every module; reference (the official code's GPT-2 init): the blocks and ln_f only,
        # the embeddings, embed_ln and the head keep PyTorch's default
        for m in (self.blocks, self.ln_f) if cfg.init == "reference" else (self,):
            m.apply(self._init_weights)
        for name, mod in self.named_modules():
            if isinstance(mod, MaskedLinear):
                mod.mask_key = name + ".weight"

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def reads_task_id(self) -> bool:
        """It is told its task's index, so it can act only on the tasks it was trained on."""
        return self.conditioning != "prompt"

    def masked_weights(self) -> dict[str, nn.Parameter]:
        """The weight matrices that carry task masks, by parameter name."""
        return {m.mask_key: m.weight for m in self.modules() if isinstance(m, MaskedLinear)}

    def _history(self, states, actions, rtg, timesteps, task_ids):
        # The history's last action token a_K: no state token attends to it (causal) and the loss
        # reads only state tokens, so it is not fed at all. task_ids (B,).
        if self.onehot_state:
            onehot = F.one_hot(task_ids, self.n_tasks).to(states.dtype)  # (B, T)
            states = torch.cat([states, onehot.unsqueeze(1).expand(-1, states.shape[1], -1)], dim=-1)  # (B, K, S + T)
        x = self.embed(states, actions, rtg, timesteps)[:, :-1]  # (B, 3K - 1, C)
        if self.task_embed is not None:
            x = x + self.task_embed(task_ids).unsqueeze(1)
        return x

    def _head(self, x):  # (..., C) -> (..., A)
        return torch.tanh(self.predict_action(self.ln_f(x)))

    def forward(self, batch: dict, ctx: MaskContext | None = None) -> torch.Tensor:
        """Training forward over ``[prompt | history]``; returns predicted actions (B, K, A)."""
        k = batch["states"].shape[1]
        x = self._history(batch["states"], batch["actions"], batch["rtg"], batch["timesteps"], batch["task_ids"])
        valid = batch["mask"].repeat_interleave(3, dim=1)[:, :-1]  # (B, 3K - 1)
        if self.use_prompt:
            p = self.prompt_embed(batch["prompt_states"], batch["prompt_actions"], batch["prompt_rtg"],
                                  batch["prompt_timesteps"])
            x = torch.cat([p, x], dim=1)  # (B, L, C)
            valid = torch.cat([batch["prompt_mask"].repeat_interleave(3, dim=1), valid], dim=1)
        x = self.embed_ln(x)
        x = self.drop(x) if ctx is None or ctx.dropout is None else ctx.dropout(x, 0)
        attn_mask = causal_mask(valid, x.shape[1])  # (B, 1, L, L)
        for i, blk in enumerate(self.blocks):
            x, _ = blk(x, attn_mask, ctx, layer=i)
        states = x[:, x.shape[1] - (3 * k - 1) + 1 :: 3]  # (B, K, C): the history's state tokens s_1 .. s_K
        return self._head(states)

    @torch.no_grad()
    def encode_prompt(self, prompt: dict, ctx: MaskContext | None = None):
        """Per-layer keys/values of the prompt tokens: they never depend on later tokens, so
        evaluation computes them once per task. Returns ``[(k, v) each (B, nh, 3K*, hd), ...]``
        and the prompt's token validity ``(B, 3K*)``."""
        x = self.prompt_embed(prompt["prompt_states"], prompt["prompt_actions"], prompt["prompt_rtg"],
                              prompt["prompt_timesteps"])
        x = self.drop(self.embed_ln(x))
        valid = prompt["prompt_mask"].repeat_interleave(3, dim=1)
        attn_mask = causal_mask(valid, x.shape[1])
        kvs = []
        for blk in self.blocks:
            x, kv = blk(x, attn_mask, ctx)
            kvs.append(kv)
        return kvs, valid

    @torch.no_grad()
    def act(self, states, actions, rtg, timesteps, task_ids, ctx=None, prompt_kv=None, prompt_valid=None,
            history_valid=None) -> torch.Tensor:
        """The action for the last history step of every row (B, A), attending to the prompt's
        cached keys/values. states (B, L, S), actions (B, L, A) (the last one is not read), rtg
        (B, L, 1), timesteps (B, L). ``history_valid`` (B, L) bool marks left padding (False) of
        rows with shorter histories; None = every step of every row is real.

        Only the last state token's action is read, so the last block computes its queries,
        attention output and MLP for that token alone (its keys and values for all): the result
        equals ``forward``'s last action up to the GEMMs' rounding."""
        x = self.drop(self.embed_ln(self._history(states, actions, rtg, timesteps, task_ids)))  # (B, 3L - 1, C)
        b, t, _ = x.shape
        if history_valid is None:
            valid = torch.ones(b, t, dtype=torch.bool, device=x.device)
        else:
            valid = history_valid.repeat_interleave(3, dim=1)[:, :-1]  # (B, 3L - 1)
        if prompt_valid is not None:
            valid = torch.cat([prompt_valid, valid], dim=1)
        attn_mask = causal_mask(valid, t)  # (B, 1, T, Tp + T)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            x, _ = blk(x, attn_mask, ctx, None if prompt_kv is None else prompt_kv[i], last_only=i == last)
        return self._head(x[:, -1])


def action_loss(pred: torch.Tensor, batch: dict, count: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 2: mean squared error over the real (non-padding) history steps. ``count``: the real
    steps to divide by instead of the batch's own (all ranks' steps in a distributed run)."""
    m = batch["mask"].unsqueeze(-1).to(pred.dtype)  # (B, K, 1)
    return ((pred.float() - batch["actions"]) ** 2 * m).sum() / ((m.sum() if count is None else count) * pred.shape[-1])
