"""One task's gradients for the mask update (Algorithm 2): gbar_i = grad L_i(theta * M_i) * M_i
(Eq. 4) and the recovery gradient g_i, on one batch of the task's data, as ``--mask-grads`` says.

``paper``: the model in eval mode (dropout off), unclipped. ``official``: as the official code
takes them, the model in train mode (dropout on) and each task's gradient clipped to
``--grad-clip`` before it is stored (and masked after clipping, as the official code does), so ghat
averages task gradients of equal norm only where every task's norm exceeds the clip before masking.

Each function takes the trainer (harmodt.train.Trainer), the task and its batch, and returns the
``[P]`` gradients (gbar_i, g_i) of the masked matrices in ``tr.weights`` order; g_i is None
without masks (Prompt-DT, MTDT), where gbar_i is the plain gradient.
"""

from __future__ import annotations

import torch

from .model import MaskContext, action_loss
from .optim import clip_factor
from .run.rng import dropout_state, set_dropout_state


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])  # [P]


def paper_task_gradient(tr, task: int, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """gbar_i and g_i as the paper defines them (the model is in eval mode): g_i is grad L_i(theta)
    (``--recovery-grad dense``) or the unmasked gradient at theta * M_i from the same backward
    (``masked``)."""
    params = list(tr.weights.values())
    if tr.task_masks is None:
        return _flat(torch.autograd.grad(action_loss(tr.model(batch), batch), params)), None
    ctx = tr.context(batch["task_ids"], single_task=True)
    recover_masked = tr.cfg.masks.recovery_grad == "masked"
    if recover_masked:  # the backward also writes each task's unmasked gradient
        ctx.task_grads = {n: torch.zeros(len(tr.tasks), *w.shape, device=tr.device) for n, w in tr.weights.items()}
    gbar = _flat(torch.autograd.grad(action_loss(tr.model(batch, ctx), batch), params))
    if recover_masked:
        return gbar, _flat(ctx.task_grads[n][task] for n in tr.weights)
    return gbar, _flat(torch.autograd.grad(action_loss(tr.model(batch), batch), params))


def official_task_gradient(tr, task: int, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """gbar_i and g_i as the official code's mask update takes them (the model is in train mode, so
    dropout draws from the run's torch RNG, which the checkpoint keeps), each clipped as
    ``clip_grad_norm_(model.parameters(), --grad-clip)`` would clip it.

    The clip norm is the official code's: over every parameter of the model (embeddings, layer
    norms, biases, head and the masked matrices), with the masked matrices' gradient taken before
    the mask is applied, i.e. the full gradient w.r.t. the effective weight theta * M_i (captured
    from the same backward). gbar_i is that gradient times M_i, times the clip factor. g_i:
    ``--recovery-grad masked``: the captured unmasked gradient with the same factor; ``dense``:
    grad L_i(theta) on the same batch with the same dropout draw (the RNG is rewound for it),
    clipped by its own norm over every parameter.
    """
    if tr.task_masks is None:
        return clipped_gradient(tr, batch, None)[0], None
    before = dropout_state(tr.device)
    gbar, unmasked = clipped_gradient(tr, batch, task)
    if tr.cfg.masks.recovery_grad == "masked":
        return gbar, unmasked
    after = dropout_state(tr.device)
    set_dropout_state(before, tr.device)  # the dense forward draws the same dropout as the masked one
    g, _ = clipped_gradient(tr, batch, None)
    set_dropout_state(after, tr.device)
    return gbar, g


def clipped_gradient(tr, batch: dict, task: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward and backward on ``batch`` through task ``task``'s masks (None: unmasked);
    returns the masked matrices' gradients ``[P]`` and, with a task, their unmasked gradients
    w.r.t. theta * M_task ``[P]``, both times the clip factor of :func:`official_task_gradient`."""
    names = list(tr.weights)
    ctx = None
    if task is not None:  # a one-task context whose backward also captures the unmasked gradients
        packed = tr.task_masks.packed()
        ctx = MaskContext({n: packed[n][task : task + 1] for n in names}, torch.zeros(1, dtype=torch.int64, device=tr.device),
                          tr.backends.masked_linear, {n: torch.zeros(1, *w.shape, device=tr.device) for n, w in tr.weights.items()})
    grads = torch.autograd.grad(action_loss(tr.model(batch, ctx), batch), tr.params, allow_unused=True)
    by_param = {id(p): g for p, g in zip(tr.params, grads)}
    mats = [by_param[id(tr.weights[n])] for n in names]  # grad * M_task (or the plain gradient)
    full = mats if ctx is None else [ctx.task_grads[n][0] for n in names]  # what the clip norm sees
    matrix_ids = {id(w) for w in tr.weights.values()}
    others = [g for p, g in zip(tr.params, grads) if id(p) not in matrix_ids and g is not None]
    coef = clip_factor(full + others, tr.cfg.grad_clip)
    return _flat(mats) * coef, None if ctx is None else _flat(full) * coef
