"""The gradient of one PCGrad/CAGrad training step: :func:`surgery_gradients` computes the task
gradients on the Prompt-DT backbone (one forward and backward per task on that task's own rows of
the batch) and hands their combination (the method's rule, harmodt.methods) to the parameters.
The step rule (harmodt.steps.SurgeryStep) then clips and takes the AdamW step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .data.batches import batch_segments
from .model import action_loss


def surgery_gradients(combine: Callable, params: list[torch.Tensor], task_ids: list[int], batch_size: int,
                      sample: Callable,
                      forward: Callable, autocast: Callable, options, generator: torch.Generator) -> torch.Tensor:
    """Set ``p.grad`` of every parameter in ``params`` to ``combine(grads [T, P], options, generator)``,
    the combination of the task gradients, and return the mean task loss (detached).

    The ``batch_size`` rows are spread over ``task_ids`` as one batch of them would be
    (:func:`batch_segments`); task i's gradient is that of the action loss of ``forward(batch,
    None)`` (under ``autocast()``, no masks) on ``sample([task_i], rows_i)``. Parameters off the
    graph keep no gradient (AdamW skips them). ``options``: the method's hyper-parameters (CAGrad's
    radius); ``generator``: PCGrad's projection orders, drawn after the batches.
    """
    segments = batch_segments(task_ids, batch_size)
    grads = torch.empty(len(segments), sum(p.numel() for p in params), device=params[0].device)  # (T, P)
    losses = []
    for i, (tid, rows) in enumerate(segments):
        batch = sample([tid], rows)
        with autocast():
            pred = forward(batch, None)
        loss = action_loss(pred, batch)
        g = torch.autograd.grad(loss, params, allow_unused=True)
        torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1) for x, p in zip(g, params)], out=grads[i])
        losses.append(loss.detach())
    used = [x is not None for x in g]
    combined = combine(grads, options, generator)  # (P,)
    for p, chunk, on in zip(params, combined.split([p.numel() for p in params]), used):
        p.grad = chunk.view_as(p) if on else None
    return torch.stack(losses).mean()
