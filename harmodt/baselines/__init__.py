"""Gradient-surgery baselines: combine per-task gradients into one update direction.

Each rule (pcgrad.py, cagrad.py) is a pure function of a ``[T, P]`` matrix of task gradients (one
row per task, the shared parameters flattened) that returns one ``[P]`` gradient and knows nothing
of the model. :func:`combine` returns a method's direction at the scale of the mean task gradient,
the scale of Prompt-DT's batch-mean loss; :func:`surgery_gradients` is what the trainer calls: the
task gradients of one training step on the model, combined (surgery.py).
"""

from __future__ import annotations

from .cagrad import cagrad, cagrad_weights
from .pcgrad import pcgrad, random_orders
from .surgery import combine, surgery_gradients

__all__ = ["cagrad", "cagrad_weights", "combine", "pcgrad", "random_orders", "surgery_gradients"]
