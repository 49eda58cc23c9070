"""Gradient-surgery baselines: combine per-task gradients into one update direction.

Each rule is a pure function of a ``[T, P]`` matrix of task gradients (one row per task, the
shared parameters flattened) that returns one ``[P]`` gradient; nothing here knows the model.
:func:`combine` is what the trainer calls: it returns the direction at the scale of the mean task
gradient, the scale of Prompt-DT's batch-mean loss.
"""

from __future__ import annotations

import torch

from .cagrad import cagrad, cagrad_weights
from .pcgrad import pcgrad, random_orders

__all__ = ["cagrad", "cagrad_weights", "combine", "pcgrad", "random_orders"]


def combine(method: str, grads: torch.Tensor, c: float, generator: torch.Generator) -> torch.Tensor:
    """The update direction ``[P]`` of ``method`` from task gradients ``grads`` ``[T, P]``.

    pcgrad: the sum of the projected gradients divided by T (without conflicts: the mean gradient),
    the projection orders drawn from ``generator``. cagrad: :func:`cagrad` with ``c`` (already at
    the mean gradient's scale; ``generator`` is not used).
    """
    if method == "pcgrad":
        return pcgrad(grads, random_orders(grads.shape[0], generator)) / grads.shape[0]
    if method == "cagrad":
        return cagrad(grads, c)
    raise ValueError(f"unknown gradient-surgery method {method!r} (choose from pcgrad, cagrad)")
