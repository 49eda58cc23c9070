"""``harmony_select``: its argument checks and its op on one backend (:class:`HarmonySelectOp`:
the checks, then the backend's ``"harmony_select"`` ``(harmony, recovery, masks, k)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends import Backend
from ..checks import KernelArgumentError, same_device, shape, shape_list, tensor
from ..reference import num_words


def check(harmony, recovery, masks, *, devices: tuple | None, max_numel: int | None) -> None:
    """The arguments of ``harmony_select`` (see :func:`harmodt_kernels.harmony_select`)."""
    op = "harmony_select"
    tensor(op, "harmony", harmony, (torch.float32,), devices)
    if harmony.dim() != 2:
        raise KernelArgumentError(f"{op}: harmony must be [T, P], got {shape_list(harmony)}")
    t, p = harmony.shape
    tensor(op, "recovery", recovery, (torch.float32,), devices)
    shape(op, "recovery", recovery, (t, p), " like harmony")
    tensor(op, "masks", masks, (torch.int32,), devices)
    shape(op, "masks", masks, (t, num_words(p)), " (packed)")
    same_device(op, {"harmony": harmony, "recovery": recovery, "masks": masks})
    if max_numel is not None and p > max_numel:
        raise KernelArgumentError(f"{op}: P={p} weights are more than this backend's {max_numel}")


@dataclass(frozen=True)
class HarmonySelectOp:
    """Algorithm 2's selection on one backend, given the scores; see :func:`harmony_select`."""

    backend: Backend

    def __call__(self, harmony, recovery, masks, k) -> torch.Tensor:
        b = self.backend
        check(harmony, recovery, masks, devices=b.devices, max_numel=b.max_numel)
        return b.impls["harmony_select"](harmony, recovery, masks, int(k))
