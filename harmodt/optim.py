"""AdamW that leaves weights outside the current task's mask bit-for-bit unchanged.

Eq. 11 updates theta with ``grad * M_i``; with AdamW a zero gradient still moves a weight through
decoupled weight decay and stale momentum. :class:`MaskedAdamW` therefore keeps every weight
outside ``M_i`` as it was, while its moments decay as with a zero gradient (what a plain AdamW
step does to them). The step runs on the run's ``masked_adamw`` kernel op. (The
official code gets a similar effect by deep-copying the whole state dict twice per step.)
"""

from __future__ import annotations

import torch

import harmodt_kernels


def clip_coefficient(params: list, max_norm: float, norm_grads: dict | None = None) -> torch.Tensor:
    """The factor ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` multiplies every gradient
    by, ``min(1, max_norm / (norm + 1e-6))`` with ``norm`` the 2-norm over all gradients, as a
    0-dim float32 tensor on the gradients' device (no host synchronisation);
    :meth:`MaskedAdamW.masked_step` applies it. ``norm_grads``: {param: gradient} the norm reads
    in place of ``p.grad`` (``--clip-scope unmasked``: the masked matrices' gradient before masking)."""
    if norm_grads is None:
        return clip_factor([p.grad for p in params if p.grad is not None], max_norm)
    return clip_factor([norm_grads.get(p, p.grad) for p in params if p.grad is not None], max_norm)


def clip_factor(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The clip factor of :func:`clip_coefficient` for gradients held apart from their parameters."""
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def param_groups(model: torch.nn.Module, weight_decay: float, scope: str = "matrices") -> list[dict]:
    """The optimizer's two groups. ``scope`` "matrices": weight matrices with ``weight_decay``;
    biases, norms and the embedding layers without. "all" (the official code's): every parameter
    with ``weight_decay`` (the second group empty)."""
    if scope not in ("matrices", "all"):
        raise ValueError(f"scope must be matrices or all, got {scope!r}")
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if scope == "all" or (p.dim() >= 2 and "embed" not in n.split(".")[0]) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class MaskedAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` with :meth:`masked_step`; its state (``step``, ``exp_avg``,
    ``exp_avg_sq``) has AdamW's layout, so ``state_dict`` round-trips as AdamW's does. The kernel
    op's launch data (the Triton backend's parameter tables) is kept in ``kernel_workspace``,
    owned by this optimizer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kernel_workspace: dict = {}

    @torch.no_grad()
    def masked_step(self, keep: dict | None = None, grad_scale: float | torch.Tensor = 1.0,
                    op: harmodt_kernels.MaskedAdamWOp = harmodt_kernels.REFERENCE_OPS.masked_adamw,
                    lrs: list | None = None) -> None:
        """One step. ``keep``: {param: mask of the weights the step may change, bool of the
        parameter's shape or its packed int32 words} (see ``harmodt_kernels.masked_adamw_``); parameters
        not in it change everywhere. ``grad_scale``: every gradient is multiplied by it first
        (:func:`clip_coefficient`). ``op``: the run's ``masked_adamw`` (``harmodt_kernels.select_backends``).
        ``lrs``: each group's learning rate as a float64 0-dim device tensor, in place of its
        ``lr`` (a captured step's, harmodt.graphed_step)."""
        keep = keep or {}
        for gi, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state_for(p) for p in params]
            beta1, beta2 = group["betas"]
            op(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
               [keep.get(p) for p in params], [s["step"] for s in states], lr=group["lr"] if lrs is None else lrs[gi],
               beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], grad_scale=grad_scale,
               workspace=self.kernel_workspace)
        self._opt_called = True  # what Optimizer.step marks for LR schedulers (their step-order warning)

    def _state_for(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if not st:  # what torch.optim.AdamW creates on a first step, with the step on p's device
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif st["step"].device != p.device:  # loaded from a CPU checkpoint
            st["step"] = st["step"].to(p.device)
        return st
