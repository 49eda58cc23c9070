"""AdamW that leaves weights outside the current task's mask bit-for-bit unchanged.

Eq. 11 updates theta with ``grad * M_i``; with AdamW a zero gradient still moves a weight through
decoupled weight decay and stale momentum. :class:`MaskedAdamW` runs the ordinary (fused when
available) AdamW step and then puts the weights outside the mask back, so the step on task i only
touches ``M_i``. (The official code gets a similar effect with two state-dict deep copies per step.)
"""

from __future__ import annotations

import torch


def _fused_supported() -> bool:
    try:
        p = torch.nn.Parameter(torch.zeros(1))
        torch.optim.AdamW([p], fused=True)
        return True
    except (RuntimeError, TypeError):  # pragma: no cover - old torch
        return False


class MaskedAdamW(torch.optim.AdamW):
    """``step(keep)`` with ``keep``: {param: bool mask of the weights the step may change}."""

    def __init__(self, params, **kw):
        kw.setdefault("fused", _fused_supported())
        super().__init__(params, **kw)

    @torch.no_grad()
    def masked_step(self, keep: dict | None = None) -> None:
        saved = {} if not keep else {p: p.detach().clone() for p in keep}
        self.step()
        for p, m in (keep or {}).items():
            torch.where(m, p, saved[p], out=p.data)
