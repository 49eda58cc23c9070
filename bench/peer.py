"""A plain-PyTorch peer of harmodt's training step: masked Prompt-DT written the obvious way.

Not harmodt's model: its own small Prompt-DT at the paper's size (6 layers, 8 heads, width 256,
K 20, K* 5, batch 8, 5 tasks), with every transformer weight matrix seen through one task's float
mask as ``F.linear(x, W * M)``, ``scaled_dot_product_attention`` with a boolean causal/padding
mask, ``nn.LayerNorm``, dropout 0.1, and after ``backward()``: ``grad *= M``, ``clip_grad_norm_``
and ``torch.optim.AdamW``. It is what the custom kernels have to beat (bench/test_bench_train.py
``test_step_peer``). It keeps no masked weight bit-for-bit (AdamW's weight decay and momentum
still move them): a speed peer, not a HarmoDT implementation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class PeerConfig:
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 256
    context_len: int = 20  # K
    prompt_len: int = 5  # K*
    batch_size: int = 8
    n_tasks: int = 5
    state_dim: int = 39
    act_dim: int = 4
    max_ep_len: int = 500
    dropout: float = 0.1
    density: float = 0.8  # each task's mask keeps this fraction of every matrix
    lr: float = 1e-4
    weight_decay: float = 1e-4
    grad_clip: float = 0.25


class Embed(nn.Module):
    def __init__(self, c: PeerConfig):
        super().__init__()
        self.t = nn.Embedding(c.max_ep_len, c.n_embd)
        self.r, self.s, self.a = (nn.Linear(1, c.n_embd), nn.Linear(c.state_dim, c.n_embd),
                                  nn.Linear(c.act_dim, c.n_embd))

    def forward(self, s, a, r, t):  # (B, T, S), (B, T, A), (B, T, 1), (B, T) -> (B, 3T, C)
        te = self.t(t)
        return torch.stack([self.r(r) + te, self.s(s) + te, self.a(a) + te], dim=2).flatten(1, 2)


class Block(nn.Module):
    def __init__(self, c: PeerConfig):
        super().__init__()
        self.nh, self.p = c.n_head, c.dropout
        self.ln1, self.ln2 = nn.LayerNorm(c.n_embd), nn.LayerNorm(c.n_embd)
        self.qkv, self.proj = nn.Linear(c.n_embd, 3 * c.n_embd), nn.Linear(c.n_embd, c.n_embd)
        self.fc, self.mlp_proj = nn.Linear(c.n_embd, 4 * c.n_embd), nn.Linear(4 * c.n_embd, c.n_embd)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x, attn_mask, m):  # x (B, T, C); m: this block's four masks
        b, t, c = x.shape
        h = F.linear(self.ln1(x), self.qkv.weight * m[0], self.qkv.bias)
        q, k, v = h.view(b, t, 3, self.nh, c // self.nh).permute(2, 0, 3, 1, 4)  # each (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.p if self.training else 0.0)
        y = y.transpose(1, 2).reshape(b, t, c)
        x = x + self.drop(F.linear(y, self.proj.weight * m[1], self.proj.bias))
        h = F.relu(F.linear(self.ln2(x), self.fc.weight * m[2], self.fc.bias))
        return x + self.drop(F.linear(h, self.mlp_proj.weight * m[3], self.mlp_proj.bias))


class PeerPromptDT(nn.Module):
    def __init__(self, c: PeerConfig):
        super().__init__()
        self.embed, self.prompt_embed = Embed(c), Embed(c)
        self.ln = nn.LayerNorm(c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.head = nn.Linear(c.n_embd, c.act_dim)

    def masked(self) -> list[nn.Parameter]:
        return [w for b in self.blocks for w in (b.qkv.weight, b.proj.weight, b.fc.weight, b.mlp_proj.weight)]

    def forward(self, batch: dict, masks: list) -> torch.Tensor:  # -> (B, K, A)
        k = batch["states"].shape[1]
        # (B, L, C)
        x = torch.cat([self.prompt_embed(batch["p_states"], batch["p_actions"], batch["p_rtg"], batch["p_timesteps"]),
                       self.embed(batch["states"], batch["actions"], batch["rtg"], batch["timesteps"])], dim=1)
        x = self.drop(self.ln(x))
        valid = torch.cat([batch["p_mask"], batch["mask"]], dim=1).repeat_interleave(3, dim=1)  # (B, L)
        l = x.shape[1]
        causal = torch.ones(l, l, dtype=torch.bool, device=x.device).tril()
        # (B, 1, L, L)
        attn_mask = (causal & valid[:, None, :] | torch.eye(l, dtype=torch.bool, device=x.device)).unsqueeze(1)
        for i, blk in enumerate(self.blocks):
            x = blk(x, attn_mask, masks[4 * i : 4 * i + 4])
        return torch.tanh(self.head(self.ln_f(x[:, l - 3 * k + 1 :: 3])))  # the history's state tokens


def random_batch(c: PeerConfig, g: torch.Generator, device="cpu") -> dict:
    """One batch of Meta-World's shapes, with left padding on some rows."""
    def part(t):
        mask = torch.ones(c.batch_size, t, dtype=torch.bool)
        mask[: c.batch_size // 4, : t // 4] = False
        return {"states": torch.randn(c.batch_size, t, c.state_dim, generator=g),
                "actions": torch.rand(c.batch_size, t, c.act_dim, generator=g) * 2 - 1,
                "rtg": torch.rand(c.batch_size, t, 1, generator=g),
                "timesteps": torch.randint(c.max_ep_len, (c.batch_size, t), generator=g),
                "mask": mask}

    out = part(c.context_len)
    out.update({"p_" + k: v for k, v in part(c.prompt_len).items()})
    return {k: v.to(device) for k, v in out.items()}


class PeerStep:
    """The peer's training step, ``step()``: one random task's masks, forward, MSE over real
    steps, backward, ``grad *= M``, ``clip_grad_norm_``, ``AdamW.step()``; bf16 autocast when
    ``precision="bf16"``."""

    def __init__(self, c: PeerConfig = PeerConfig(), precision: str = "fp32", device="cpu", seed: int = 0):
        torch.manual_seed(seed)
        self.c, self.device, self.bf16 = c, torch.device(device), precision == "bf16"
        self.model = PeerPromptDT(c).to(device).train()
        g = torch.Generator().manual_seed(seed)
        self.masks = [[(torch.rand(w.shape, generator=g) < c.density).float().to(device) for w in self.model.masked()]
                      for _ in range(c.n_tasks)]
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        self.batches = [random_batch(c, g, device) for _ in range(4)]
        self.rng = random.Random(seed)

    def step(self) -> torch.Tensor:
        masks = self.masks[self.rng.randrange(self.c.n_tasks)]
        batch = self.batches[self.rng.randrange(len(self.batches))]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            pred = self.model(batch, masks)
        m = batch["mask"].unsqueeze(-1).float()
        loss = ((pred.float() - batch["actions"]) ** 2 * m).sum() / (m.sum() * pred.shape[-1])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        for w, mk in zip(self.model.masked(), masks):
            w.grad *= mk
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.c.grad_clip)
        self.opt.step()
        return loss.detach()
