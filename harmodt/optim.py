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
    def masked_step(self, keep: dict | None = None) -> None:
        if not keep:
            self.step()
            return
        usable = self._native is not None and all(
            p.device.type == "cpu" and p.dtype == torch.float32 and p.grad is not None for p in keep)
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
                             float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"], int(st["step"]))
