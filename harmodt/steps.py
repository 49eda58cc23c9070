"""Step rules: one training step of a method (Algorithm 1's update of theta), built by the method's
entry (harmodt.methods) on a :class:`harmodt.train.Trainer`.

A step rule is called with the step's task ids and returns the loss (a 0-dim tensor on the device);
it draws the batch, runs forward and backward, clips and steps the optimizer. The trainer then
steps the learning-rate schedule and counts the step. Every collective of a torchrun run (the loss
divisor, the gradient sum, the tasks of every rank) is a call on ``trainer.dist``
(harmodt.run.distributed), which is the identity in one process.

- :class:`PlainStep`: the dense model's step on the batch's loss (Prompt-DT, MTDT);
- :class:`MaskedStep`: each row through its task's mask, ``grad L_i(theta * M_i) * M_i``, and the
  optimizer steps only the weights in the union of the batch's masks (Eq. 4, Eq. 11; HarmoDT);
- :class:`SurgeryStep`: one gradient per task on its own rows, combined by the method's rule
  (PCGrad, CAGrad; harmodt.baselines).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import harmodt_kernels as kernels

from .data.batches import batch_segments
from .model import CounterDropout, MaskContext, action_loss
from .optim import clip_coefficient
from .surgery import surgery_gradients


class PlainStep:
    """The step on the batch's loss of the dense model (no masks)."""

    def __init__(self, trainer):
        self.tr = trainer

    def context(self, task_ids: torch.Tensor, single_task: bool = False, segments: tuple | None = None,
                dropout: CounterDropout | None = None) -> MaskContext | None:
        """What a forward on rows of ``task_ids`` runs through: None, or with ``dropout`` (the
        forward's counter-based dropout, :meth:`counter_dropout`) a context carrying it alone."""
        return None if dropout is None else MaskContext({}, task_ids, self.tr.backends.masked_linear, dropout=dropout)

    def counter_dropout(self) -> CounterDropout | None:
        """The step's counter-based dropout (``--dropout-rng counter``, with dropout on): its seed is
        a hash of the run's seed, this rank and the step, all of which a checkpoint keeps, so a
        resumed run draws the same bits. None otherwise (torch's RNG)."""
        tr = self.tr
        if tr.cfg.dropout_rng != "counter" or tr.cfg.model.dropout == 0.0:
            return None
        base = kernels.reference.site_seed(tr.cfg.seed, tr.dist.rank)
        return CounterDropout(tr.cfg.model.dropout, kernels.reference.site_seed(base, tr.step), tr.backends.dropout)

    def capture(self, ctx: MaskContext | None, task_ids: list[int]) -> MaskContext | None:
        """The context the step's forward runs through (:class:`MaskedStep`: one that also captures
        the gradients before masking, for ``--clip-scope unmasked``)."""
        return ctx

    def clip_gradients(self, ctx: MaskContext | None) -> dict | None:
        """{masked matrix: the gradient the clip norm sees instead of ``.grad``}, or None."""
        return None

    def keep(self, task_ids: list[int]) -> dict | None:
        """{weight: mask of what this step may change}, None: every weight."""
        return None

    def __call__(self, task_ids: list[int]) -> torch.Tensor:
        tr, cfg = self.tr, self.tr.cfg
        batch = tr.batcher.sample(task_ids, cfg.batch_size)
        ctx = self.capture(self.context(batch["task_ids"], single_task=len(task_ids) == 1,
                                        segments=batch_segments(task_ids, cfg.batch_size), dropout=self.counter_dropout()), task_ids)
        count = tr.dist.loss_count(batch["mask"], tr.stop)  # several ranks: all ranks' real steps (the loss's divisor)
        with tr.autocast():
            pred = tr.forward(batch, ctx)
        loss = action_loss(pred, batch, count)
        for p in tr.params:  # zero_grad(set_to_none=True) without Optimizer.zero_grad's per-call overhead
            p.grad = None
        loss.backward()
        loss = tr.dist.reduce_gradients(tr.params, loss)  # several ranks: summed gradients and the global loss
        coef = clip_coefficient(tr.params, cfg.grad_clip, self.clip_gradients(ctx))
        tr.opt.masked_step(self.keep(tr.dist.step_tasks_of_all(task_ids)), grad_scale=coef, op=tr.backends.masked_adamw)
        return loss.detach()


class MaskedStep(PlainStep):
    """The step of Algorithm 1 through the task masks: each row of the batch through its task's
    mask (Eq. 4), the optimizer stepping the weights of the union of the step's tasks' masks, over
    every rank's tasks (Eq. 11). ``--clip-scope unmasked``: the clip norm sees the masked matrices'
    gradients before masking, captured by the same backward."""

    def __init__(self, trainer):
        super().__init__(trainer)
        self.unmasked_clip = trainer.cfg.clip_scope == "unmasked"

    def context(self, task_ids: torch.Tensor, single_task: bool = False, segments: tuple | None = None,
                dropout: CounterDropout | None = None) -> MaskContext:
        """The masks a forward on rows of ``task_ids`` runs through; ``single_task``: every row is
        ``task_ids[0]`` (one mask, no grouping of rows); ``segments``: the batch's ``((task,
        sequences), ...)`` layout when known on the host; ``dropout``: the counter-based dropout."""
        op = self.tr.backends.masked_linear
        return MaskContext(self.tr.task_masks.for_op(op), task_ids[:1] if single_task else task_ids, op, segments=segments,
                           dropout=dropout)

    def capture(self, ctx: MaskContext, task_ids: list[int]) -> MaskContext:
        """``--clip-scope unmasked``: ``ctx`` over the masks of the batch's distinct tasks alone, its
        rows renumbered to them, with a float32 ``[k, N, K]`` buffer per masked matrix into which the
        backward adds each task's gradient before masking (the ``task_grads`` of
        ``kernels.masked_linear``, on every backend); else ``ctx``."""
        if not self.unmasked_clip:
            return ctx
        device, present = self.tr.device, sorted(set(task_ids))
        idx = torch.tensor(present, device=device)
        local = torch.zeros(len(self.tr.tasks), dtype=torch.int64, device=device).index_copy_(
            0, idx, torch.arange(len(present), device=device))
        segments = None if ctx.segments is None else tuple((present.index(t), c) for t, c in ctx.segments)
        return MaskContext({n: m.index_select(0, idx) for n, m in ctx.masks.items()}, local[ctx.task_ids], ctx.masked_linear,
                           {n: torch.zeros(len(present), *w.shape, device=device) for n, w in self.tr.weights.items()}, segments,
                           dropout=ctx.dropout)

    def clip_gradients(self, ctx: MaskContext) -> dict | None:
        """``--clip-scope unmasked``: {masked matrix: its gradient before masking} from a backward
        through :meth:`capture`'s ``ctx``, summed over the batch's tasks and the ranks."""
        if not self.unmasked_clip:
            return None
        weights = self.tr.weights
        return dict(zip(weights.values(), self.tr.dist.sum_tensors([ctx.task_grads[n].sum(0) for n in weights])))

    def keep(self, task_ids: list[int]) -> dict:
        """The task's mask, or for several tasks the union of theirs (Eq. 11)."""
        keep = self.tr.task_masks.keep(task_ids, self.tr.backends.masked_adamw)
        return {w: keep[n] for n, w in self.tr.weights.items()}


class SurgeryStep:
    """A gradient-surgery step (dense Prompt-DT, no masks): each task's gradient on its own rows of
    the batch, combined by ``combine(grads [T, P], options, generator)`` (harmodt.surgery; the
    method's ``options``, the data stream's generator), then the clip and AdamW step. Returns the
    mean task loss. One process only: its per-task gradients are not split over torchrun ranks."""

    def __init__(self, trainer, combine: Callable, options=None):
        if trainer.dist.world_size > 1:
            raise ValueError(f"--method {trainer.cfg.method} runs in one process (its per-task gradients are not split over "
                             "torchrun ranks)")
        self.tr, self.combine, self.options = trainer, combine, options

    def __call__(self, task_ids: list[int]) -> torch.Tensor:
        tr = self.tr
        params = [p for p in tr.params if p.requires_grad]
        loss = surgery_gradients(self.combine, params, task_ids, tr.cfg.batch_size, tr.batcher.sample, tr.forward, tr.autocast,
                                 self.options, tr.batcher.generator)
        coef = clip_coefficient(params, tr.cfg.grad_clip)
        tr.opt.masked_step(None, grad_scale=coef, op=tr.backends.masked_adamw)
        return loss
