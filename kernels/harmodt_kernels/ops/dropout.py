"""``dropout``: counter-based dropout on one backend (:class:`DropoutOp`, checks once per
configuration, then the backend's ``"dropout"`` ``(x, p, seed)``) and the native backend's
autograd function. Its checks of ``p`` and the seed (:func:`check`) are also the masked linear's
epilogue's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..backends import Backend
from ..checks import KernelArgumentError, dtype_name, shape_list, tensor
from .common import remember, seed_arg


def check(op: str, p, seed) -> None:
    """A counter-based dropout's rate and seed (see :func:`harmodt_kernels.dropout`): an int in
    ``[0, 2^63)``, or an int64 0-dim tensor holding one (its value is not read)."""
    if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise KernelArgumentError(f"{op}: dropout p must be a float in [0, 1), got {p!r}")
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.dim() != 0:
            raise KernelArgumentError(f"{op}: a seed tensor must be int64 0-dim, got "
                                      f"{dtype_name(seed.dtype)} {shape_list(seed)}")
    elif not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise KernelArgumentError(f"{op}: seed must be an int in [0, 2**63) or an int64 0-dim tensor, got {seed!r}")


@dataclass(frozen=True)
class DropoutOp:
    """Counter-based dropout on one backend (see :func:`harmodt_kernels.dropout`): element i is kept iff
    the hash of (i, seed) clears the threshold of ``p`` (:func:`harmodt_kernels.reference.counter_keep`),
    so the backward recomputes the bits and nothing is stored."""

    backend: Backend
    checked: set = field(default_factory=set, compare=False, repr=False)  # configurations whose checks passed

    def __call__(self, x, p: float, seed: int) -> torch.Tensor:
        b = self.backend
        uncached = torch.compiler.is_compiling() or not isinstance(x, torch.Tensor) or type(p) is not float
        key = None if uncached else (x.dtype, x.device, p)
        if key is None or key not in self.checked:
            tensor("dropout", "x", x, b.linear_dtypes, b.devices)
            check("dropout", p, seed)
            if key is not None:
                remember(self.checked, key)
        elif type(seed) is not int or not 0 <= seed < 2**63:  # (per call: the seed changes every step)
            check("dropout", 0.0, seed)
        return b.impls["dropout"](x, float(p), seed_arg(seed))


class NativeCounterDropout(torch.autograd.Function):
    """The C++ counter-based dropout; its backward is the same map (the same seed) of the gradient."""

    @staticmethod
    def forward(ctx, x, p, seed):
        ctx.p, ctx.seed = p, seed
        return torch.ops.harmodt_kernels.counter_dropout(x, p, seed)

    @staticmethod
    def backward(ctx, grad):
        return torch.ops.harmodt_kernels.counter_dropout(grad, ctx.p, ctx.seed), None, None
