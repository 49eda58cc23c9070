"""Gradient-surgery baselines: combine per-task gradients into one update direction.

Each rule (pcgrad.py, cagrad.py) is a pure function of a ``[T, P]`` matrix of task gradients (one
row per task, the shared parameters flattened) that returns one ``[P]`` gradient and knows nothing
of the model; ``*_direction`` is a method's direction at the scale of the mean task gradient, the
scale of Prompt-DT's batch-mean loss, and is the method's ``combine`` (harmodt.methods).
harmodt.surgery is what the trainer calls: the task gradients of one training
step on the model, combined.
"""

from __future__ import annotations

from .cagrad import CAGradOptions, cagrad, cagrad_direction, cagrad_weights
from .pcgrad import pcgrad, pcgrad_direction, random_orders

__all__ = ["CAGradOptions", "cagrad", "cagrad_direction", "cagrad_weights", "pcgrad", "pcgrad_direction",
           "random_orders"]
