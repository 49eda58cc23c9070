"""The ops, one module each (checks, dispatch to the backend's implementation, autograd), and
:class:`KernelOps`, a run's four ops on one backend (:func:`harmodt_kernels.select_backends`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..backends import Backend
from .dropout import DropoutOp
from .harmony_select import HarmonySelectOp
from .masked_adamw import MaskedAdamWOp
from .masked_linear import CachedMaskedLinearOp, MaskedLinearOp

__all__ = ["CachedMaskedLinearOp", "DropoutOp", "HarmonySelectOp", "KernelOps", "MaskedAdamWOp", "MaskedLinearOp"]


@dataclass(frozen=True)
class KernelOps:
    """The op functions of one run (made by :func:`select_backends`), handed down as values:
    ``masked_linear``, ``masked_adamw``, ``harmony_select`` and the counter-based ``dropout``,
    each a callable bound to its backend (``op.backend.name``)."""

    masked_linear: MaskedLinearOp
    masked_adamw: MaskedAdamWOp
    harmony_select: HarmonySelectOp
    dropout: DropoutOp
    fallback: str | None = None  # why "auto" fell back to the reference, when it did

    @classmethod
    def on(cls, backend: Backend, fallback: str | None = None) -> "KernelOps":
        return cls(MaskedLinearOp(backend), MaskedAdamWOp(backend), HarmonySelectOp(backend), DropoutOp(backend),
                   fallback)

    def describe(self) -> str:
        return (f"masked_linear={self.masked_linear.backend.name} masked_adamw={self.masked_adamw.backend.name} "
                f"harmony_select={self.harmony_select.backend.name}")
