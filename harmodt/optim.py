"""AdamW that leaves weights outside the current task's mask bit-for-bit unchanged.

Eq. 11 updates theta with ``grad * M_i``; with AdamW a zero gradient still moves a weight through
decoupled weight decay and stale momentum. :class:`MaskedAdamW` therefore keeps every weight outside
``M_i`` as it was, while its moments decay as with a zero gradient (what a plain AdamW step does to
them). Two implementations with the same result:

* native (chosen when the CPU library in ``kernels/`` is built and the tensors are fp32 CPU): one
  fused pass per masked weight matrix (``harmodt_kernels::masked_adamw_``);
* plain PyTorch (beside it, always available): the ordinary AdamW step, then the masked-out
  weights are put back from a copy.

(The official code gets a similar effect by deep-copying the whole state dict twice per step.)
"""

from __future__ import annotations

import math

import torch


def _fused_supported() -> bool:
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)
        return True
    except (RuntimeError, TypeError):  # pragma: no cover - old torch
        return False


def native_masked_adamw():
    """The native op, or None when the kernels library is not built/loadable."""
    try:
        from kernels import cpu

        if cpu.unavailable_reason() is None:
            return torch.ops.harmodt_kernels.masked_adamw_
    except (ImportError, AttributeError, RuntimeError):
        pass
    return None


def clip_coefficient(params: list, max_norm: float, known_sq_norms: dict | None = None) -> float:
    """The factor ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` multiplies every gradient by,
    ``min(1, max_norm / (norm + 1e-6))`` with ``norm`` the 2-norm over all gradients, without
    multiplying (:meth:`MaskedAdamW.masked_step` applies it). ``known_sq_norms``: {param: sum of
    squares of its gradient} already computed (the masked weights' backward does), not read again."""
    known = known_sq_norms or {}
    others = [p.grad for p in params if p.grad is not None and p not in known]
    sq = math.fsum(known.values())
    if others:
        sq += float(torch.stack(torch._foreach_norm(others)).double().square().sum())
    return min(1.0, max_norm / (math.sqrt(sq) + 1e-6))


class MaskedAdamW(torch.optim.AdamW):
    """``masked_step(keep)`` with ``keep``: {param: mask of the weights the step may change}, bool
    of the param's shape or its bit-packed int32 words (``kernels.pack_masks``; 8x less to read).

    ``native``: None = use the native op when available, False = always the plain path,
    True = require the native op (fails loudly when it is not built).
    """

    def __init__(self, params, native: bool | None = None, **kw):
        kw.setdefault("fused", _fused_supported())
        super().__init__(params, **kw)
        self._native = native_masked_adamw() if native is not False else None
        if native is True and self._native is None:
            raise RuntimeError("MaskedAdamW(native=True): the kernels CPU library is not built (pip install --no-build-isolation -e .)")

    @torch.no_grad()
    def masked_step(self, keep: dict | None = None, grad_scale: float = 1.0) -> None:
        """One step; parameters in ``keep`` change only inside their masks. ``grad_scale``: every
        gradient is multiplied by it first (gradient clipping's :func:`clip_coefficient`); the
        native op reads the masked weights' gradients scaled instead of rewriting them."""
        usable = bool(keep) and self._native is not None and all(
            p.device.type == "cpu" and p.dtype == torch.float32 and p.grad is not None for p in keep)
        if grad_scale != 1.0:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None and not (usable and p in keep)]
            if grads:
                torch._foreach_mul_(grads, grad_scale)
        if not keep:
            self.step()
            return
        if not usable:
            import kernels

            keep = {p: (kernels.unpack_masks(m, p.shape[-1]) if m.dtype == torch.int32 else m) for p, m in keep.items()}
            saved = {p: p.detach().clone() for p in keep}
            self.step()
            for p, m in keep.items():
                torch.where(m, p, saved[p], out=p.data)
            return
        grads = {p: p.grad for p in keep}
        for p in keep:  # the ordinary step handles every other parameter
            p.grad = None
        self.step()
        for p, g in grads.items():
            p.grad = g
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p not in keep:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1
                self._native(p.data, p.grad.contiguous(), st["exp_avg"], st["exp_avg_sq"], keep[p].contiguous(),
                             float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"], int(st["step"]), float(grad_scale))
