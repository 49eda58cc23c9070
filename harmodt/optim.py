"""AdamW that leaves weights outside the current task's mask bit-for-bit unchanged.

Eq. 11 updates theta with ``grad * M_i``; with AdamW a zero gradient still moves a weight through
decoupled weight decay and stale momentum. :class:`MaskedAdamW` therefore keeps every weight outside
``M_i`` as it was, while its moments decay as with a zero gradient (what a plain AdamW step does to
them). Two implementations with the same result:

* native (chosen when the CPU library in ``kernels/`` is built and the tensors are fp32 CPU): the
  whole step of a parameter group, masked matrices and unmasked parameters alike, in one call and
  one parallel pass (``harmodt_kernels::adamw_group_``), with the same arithmetic as
  ``torch.optim.AdamW`` (up to float rounding order);
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


def native_adamw_group():
    """The native op (``harmodt_kernels::adamw_group_``), or None when the kernels library is not
    built/loadable."""
    try:
        from kernels import cpu

        if cpu.unavailable_reason() is None:
            return torch.ops.harmodt_kernels.adamw_group_
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
        native = _native_sum_squares()
        if native is not None and all(g.device.type == "cpu" and g.dtype == torch.float32 and g.is_contiguous() for g in others):
            sq += native(others)  # one call (harmodt_kernels::sum_squares)
        else:
            sq += float(torch.stack(torch._foreach_norm(others)).double().square().sum())
    return min(1.0, max_norm / (math.sqrt(sq) + 1e-6))


def _native_sum_squares():
    """``harmodt_kernels::sum_squares`` (in the optimizer's library), or None when it is not built."""
    op = native_adamw_group()
    return None if op is None else torch.ops.harmodt_kernels.sum_squares


class MaskedAdamW(torch.optim.AdamW):
    """``masked_step(keep)`` with ``keep``: {param: mask of the weights the step may change}, bool
    of the param's shape or its bit-packed int32 words (``kernels.pack_masks``; 8x less to read).

    ``native``: None = use the native op when available, False = always the plain path,
    True = require the native op (fails loudly when it is not built).
    """

    def __init__(self, params, native: bool | None = None, **kw):
        kw.setdefault("fused", _fused_supported())
        super().__init__(params, **kw)
        self._native = native_adamw_group() if native is not False else None
        if native is True and self._native is None:
            raise RuntimeError("MaskedAdamW(native=True): the kernels CPU library is not built (pip install --no-build-isolation -e .)")

    @torch.no_grad()
    def masked_step(self, keep: dict | None = None, grad_scale: float = 1.0) -> None:
        """One step; parameters in ``keep`` change only inside their masks. ``grad_scale``: every
        gradient is multiplied by it first (gradient clipping's :func:`clip_coefficient`); the
        native op reads the gradients scaled instead of rewriting them."""
        usable = self._native is not None and self._plain_options() and all(
            p.device.type == "cpu" and p.dtype == torch.float32 for g in self.param_groups for p in g["params"] if p.grad is not None)
        if usable:
            self._native_step(keep or {}, grad_scale)
            return
        if grad_scale != 1.0:
            torch._foreach_mul_([p.grad for g in self.param_groups for p in g["params"] if p.grad is not None], grad_scale)
        if not keep:
            self.step()
            return
        import kernels

        keep = {p: (kernels.unpack_masks(m, p.shape[-1]) if m.dtype == torch.int32 else m) for p, m in keep.items()}
        saved = {p: p.detach().clone() for p in keep}
        self.step()
        for p, m in keep.items():
            torch.where(m, p, saved[p], out=p.data)

    def _plain_options(self) -> bool:
        """No AdamW option the native op does not implement (amsgrad, maximize, ...)."""
        return all(not g.get(k) for g in self.param_groups for k in ("amsgrad", "maximize", "capturable", "differentiable"))

    def _native_step(self, keep: dict, grad_scale: float) -> None:
        # Groups and params in reverse order: each update is independent, and the step streams
        # ~28 bytes per weight through the caches (weight, gradient, both moments), so only what it
        # touches last is still cached when the next forward starts. Parameters are registered in
        # forward order, so reversed the first blocks' weights come last and the next forward finds
        # them in cache (0.3-1.9 % of a paper-size bf16 step in interleaved A/B runs).
        for group in reversed(self.param_groups):
            params = [p for p in reversed(group["params"]) if p.grad is not None]
            if not params:
                continue
            states = []
            for p in params:
                st = self.state[p]
                if not st:  # what torch.optim.AdamW creates on a first step
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                states.append(st)
            beta1, beta2 = group["betas"]
            self._native(params, [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in params],
                         [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                         [keep[p].contiguous() if p in keep else None for p in params], [st["step"] for st in states],
                         float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"], float(grad_scale))
        self._opt_called = True  # what Optimizer.step marks for LR schedulers (their step-order warning)
