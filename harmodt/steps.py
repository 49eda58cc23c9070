"""Step rules: one training step of a method (Algorithm 1's update of theta), built by the method's
entry (harmodt.methods) on the run's :class:`harmodt.training_state.TrainingState` (the fields it reads).

A step rule is called with the step's task ids and returns the loss (a 0-dim tensor on the device);
it draws the batch, runs forward and backward, clips and steps the optimizer. The trainer then
steps the learning-rate schedule and counts the step. Every collective of a torchrun run (the loss
divisor, the gradient sum, the tasks of every rank) is a call on ``state.dist``
(harmodt.run.distributed), which is the identity in one process.

- :class:`PlainStep`: the dense model's step on the batch's loss (Prompt-DT, MTDT);
- :class:`MaskedStep`: each row through its task's mask, ``grad L_i(theta * M_i) * M_i``, and the
  optimizer steps only the weights in the union of the batch's masks (Eq. 4, Eq. 11; HarmoDT);
- :class:`SurgeryStep`: one gradient per task on its own rows, combined by the method's rule
  (PCGrad, CAGrad; harmodt.baselines).

A :class:`PlainStep` (and a subclass) is split in two: :meth:`PlainStep.__call__` gathers the
step's inputs on the host (the batch, the masks and dropout of its forward, what the optimizer may
change: :class:`StepInputs`) and :meth:`PlainStep.step` does the arithmetic on them. The graphed
step (harmodt.graphed_step, ``--cuda-graph``) gathers the same inputs from device tensors of fixed
address and captures the same :meth:`PlainStep.step`: a method's own step rule changes its step
under the graph as without it (its :meth:`~PlainStep.loss`, :meth:`~PlainStep.backward`,
:meth:`~PlainStep.step`, :meth:`~PlainStep.context`, :meth:`~PlainStep.keep`). A rule the graph
cannot run says why in :meth:`~PlainStep.graph_problem`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import harmodt_kernels

from .data.batches import batch_segments
from .model import CounterDropout, DeviceSeedDropout, MaskContext, action_loss
from .optim import clip_coefficient
from .surgery import surgery_gradients
from .training_state import TrainingState


@dataclass
class StepInputs:
    """What the arithmetic of one step (:meth:`PlainStep.step`) reads besides the weights and the
    optimizer state. ``batch``: the batch (harmodt.data.batches); ``ctx``: what its forward runs
    through (:meth:`PlainStep.context`); ``keep``: {weight: what the optimizer may change}
    (:meth:`PlainStep.keep`), None: every weight; ``lrs``: each parameter group's learning rate as a
    float64 0-dim device tensor (a captured step's), None: the groups' ``lr``; ``grads``: None, the
    gradients land in fresh ``.grad`` tensors; else a list of buffers, one per trainable parameter
    (None: it gets no gradient), that they are copied into and that become the ``.grad`` (a captured
    step's: their addresses stay), made by the first step when empty."""

    batch: dict
    ctx: MaskContext | None
    keep: dict | None
    lrs: list | None = None
    grads: list | None = None


class PlainStep:
    """The step on the batch's loss of the dense model (no masks)."""

    def __init__(self, state: TrainingState):
        self.tr = state

    def context(self, task_ids: torch.Tensor, single_task: bool = False, segments: tuple | None = None,
                dropout: CounterDropout | None = None, masks: dict | None = None) -> MaskContext | None:
        """What a forward on rows of ``task_ids`` runs through: None, or with ``dropout`` (the
        forward's counter-based dropout, :meth:`counter_dropout`) a context carrying it alone."""
        return None if dropout is None else MaskContext({}, task_ids, self.tr.backends.masked_linear, dropout=dropout)

    def counter_dropout(self, step: int | torch.Tensor | None = None) -> CounterDropout | None:
        """The counter-based dropout of step ``step`` (default: the state's; ``--dropout-rng
        counter``, with dropout on): its seed is a hash of the run's seed, this rank and the step,
        all of which a checkpoint keeps, so a resumed run draws the same bits. ``step`` in an int64
        0-dim device tensor (a captured step's): the same seeds, computed on the device. None
        without counter dropout (torch's RNG)."""
        tr = self.tr
        if tr.cfg.dropout_rng != "counter" or tr.cfg.model.dropout == 0.0:
            return None
        base = harmodt_kernels.reference.site_seed(tr.cfg.seed, tr.dist.rank)
        seed = harmodt_kernels.reference.site_seed(base, tr.step if step is None else step)
        if isinstance(seed, torch.Tensor):
            return DeviceSeedDropout.of(tr.cfg.model.dropout, seed, tr.backends.dropout, tr.cfg.model.n_layer)
        return CounterDropout(tr.cfg.model.dropout, seed, tr.backends.dropout)

    def capture(self, ctx: MaskContext | None, task_ids: list[int]) -> MaskContext | None:
        """The context the step's forward runs through (:class:`MaskedStep`: one that also captures
        the gradients before masking, for ``--clip-scope unmasked``)."""
        return ctx

    def clip_gradients(self, ctx: MaskContext | None) -> dict | None:
        """{masked matrix: the gradient the clip norm sees instead of ``.grad``}, or None."""
        return None

    def keep(self, task_ids: list[int] | torch.Tensor, masks: dict | None = None,
             out: dict | None = None) -> dict | None:
        """{weight: mask of what this step may change}, None: every weight."""
        return None

    def graph_problem(self) -> str | None:
        """Why a graph cannot capture this step rule (harmodt.graphed_step), None when it can. The
        graph runs :meth:`step` on inputs it gathers itself, so a rule with its own host-side
        methods (:meth:`__call__`, :meth:`capture`: not those of :class:`PlainStep` or
        :class:`MaskedStep`) cannot be captured."""
        for name in ("__call__", "capture"):
            if getattr(type(self), name) not in (getattr(PlainStep, name), getattr(MaskedStep, name)):
                return (f"its step rule {type(self).__name__} has its own {name}, which a graph does not run (a graph "
                        "runs its step(); put the arithmetic there, or in loss() or backward())")
        return None

    def __call__(self, task_ids: list[int]) -> torch.Tensor:
        """One step on a batch of ``task_ids`` drawn now: its inputs gathered on the host, then :meth:`step`."""
        tr, cfg = self.tr, self.tr.cfg
        batch = tr.batcher.sample(task_ids, cfg.batch_size)
        ctx = self.capture(self.context(batch["task_ids"], single_task=len(task_ids) == 1,
                                        segments=batch_segments(task_ids, cfg.batch_size),
                                        dropout=self.counter_dropout()), task_ids)
        return self.step(StepInputs(batch, ctx, self.keep(tr.dist.step_tasks_of_all(task_ids))))

    def step(self, inputs: StepInputs) -> torch.Tensor:
        """The arithmetic of one step: forward through ``inputs.ctx``, :meth:`loss`, :meth:`backward`,
        the gradient clip and the masked AdamW step; returns the loss (detached)."""
        tr, batch = self.tr, inputs.batch
        count = tr.dist.loss_count(batch["mask"], tr.stop)  # several ranks: all ranks' real steps (the loss's divisor)
        with tr.autocast():
            pred = tr.forward(batch, inputs.ctx)
        loss = self.loss(pred, batch, count)
        self.backward(loss, inputs.grads)
        loss = tr.dist.reduce_gradients(tr.params, loss)  # several ranks: summed gradients and the global loss
        coef = clip_coefficient(tr.params, tr.cfg.grad_clip, self.clip_gradients(inputs.ctx))
        tr.opt.masked_step(inputs.keep, grad_scale=coef, op=tr.backends.masked_adamw, lrs=inputs.lrs)
        return loss.detach()

    def loss(self, pred: torch.Tensor, batch: dict, count: torch.Tensor | None) -> torch.Tensor:
        """The loss the step descends: the action loss of the batch (``count``: its divisor, None:
        the batch's own count of real steps)."""
        return action_loss(pred, batch, count)

    def backward(self, loss: torch.Tensor, grads: list | None = None) -> None:
        """Every parameter's gradient of ``loss`` into its ``.grad``: fresh tensors, or with
        ``grads`` copied into those buffers (see :class:`StepInputs`)."""
        params = self.tr.params
        if grads is None:
            for p in params:  # zero_grad(set_to_none=True) without Optimizer.zero_grad's per-call overhead
                p.grad = None
            loss.backward()
            return
        trainable = [p for p in params if p.requires_grad]
        new = torch.autograd.grad(loss, trainable, allow_unused=True)
        if not grads:  # the first step: the buffers the gradients live in from now on
            grads.extend(None if g is None else torch.empty_like(g) for g in new)
        torch._foreach_copy_([b for b in grads if b is not None], [g for g in new if g is not None])
        for p, b in zip(trainable, grads):
            p.grad = b


class MaskedStep(PlainStep):
    """The step of Algorithm 1 through the task masks: each row of the batch through its task's
    mask (Eq. 4), the optimizer stepping the weights of the union of the step's tasks' masks, over
    every rank's tasks (Eq. 11). ``--clip-scope unmasked``: the clip norm sees the masked matrices'
    gradients before masking, captured by the same backward."""

    def __init__(self, state: TrainingState):
        super().__init__(state)
        self.unmasked_clip = state.cfg.clip_scope == "unmasked"

    def context(self, task_ids: torch.Tensor, single_task: bool = False, segments: tuple | None = None,
                dropout: CounterDropout | None = None, masks: dict | None = None) -> MaskContext:
        """The masks a forward on rows of ``task_ids`` runs through; ``single_task``: every row is
        ``task_ids[0]`` (one mask, no grouping of rows); ``segments``: the batch's ``((task,
        sequences), ...)`` layout when known on the host; ``dropout``: the counter-based dropout;
        ``masks``: every task's masks in the masked linear's layout (default: the run's, by its
        mask kind: harmodt.mask_kinds.MaskKind, which also names the op they run on)."""
        kind, op = self.tr.task_masks, self.tr.backends.masked_linear
        return MaskContext(kind.for_op(op) if masks is None else masks, task_ids[:1] if single_task else task_ids,
                           kind.linear_op(op), segments=segments, dropout=dropout)

    def capture(self, ctx: MaskContext, task_ids: list[int]) -> MaskContext:
        """``--clip-scope unmasked``: ``ctx`` over the masks of the batch's distinct tasks alone, its
        rows renumbered to them, with a float32 ``[k, N, K]`` buffer per masked matrix into which the
        backward adds each task's gradient before masking (the ``task_grads`` of
        ``harmodt_kernels.masked_linear``, on every backend); else ``ctx``."""
        if not self.unmasked_clip:
            return ctx
        device, present = self.tr.device, sorted(set(task_ids))
        idx = torch.tensor(present, device=device)
        local = torch.zeros(len(self.tr.tasks), dtype=torch.int64, device=device).index_copy_(
            0, idx, torch.arange(len(present), device=device))
        segments = None if ctx.segments is None else tuple((present.index(t), c) for t, c in ctx.segments)
        return MaskContext({n: m.index_select(0, idx) for n, m in ctx.masks.items()}, local[ctx.task_ids],
                           ctx.masked_linear,
                           {n: torch.zeros(len(present), *w.shape, device=device) for n, w in self.tr.weights.items()},
                           segments, dropout=ctx.dropout)

    def clip_gradients(self, ctx: MaskContext) -> dict | None:
        """``--clip-scope unmasked``: {masked matrix: its gradient before masking} from a backward
        through :meth:`capture`'s ``ctx``, summed over the batch's tasks and the ranks."""
        if not self.unmasked_clip:
            return None
        weights = self.tr.weights
        return dict(zip(weights.values(), self.tr.dist.sum_tensors([ctx.task_grads[n].sum(0) for n in weights])))

    def keep(self, task_ids: list[int] | torch.Tensor, masks: dict | None = None,
             out: dict | None = None) -> dict | None:
        """The task's mask, or for several tasks the union of theirs (Eq. 11), as the run's mask kind
        says (None: every weight). ``task_ids``: the step's tasks, a list on the host (every rank's);
        or an int64 device tensor ``(n,)`` (a captured step's) whose masks are selected on the device
        from ``masks`` (every task's) into ``out`` ({name: a fixed buffer})."""
        kind = self.tr.task_masks
        if isinstance(task_ids, torch.Tensor):
            keep = kind.keep_on_device(masks, task_ids, out)
        else:
            keep = kind.keep(task_ids, self.tr.backends.masked_adamw)
        return None if keep is None else {w: keep[n] for n, w in self.tr.weights.items()}

    def graph_problem(self) -> str | None:
        if self.unmasked_clip:
            return ("--clip-scope unmasked (its clip norm renumbers the batch's tasks on the host; "
                    "--clip-scope masked can be captured)")
        return super().graph_problem()


class SurgeryStep:
    """A gradient-surgery step (dense Prompt-DT, no masks): each task's gradient on its own rows of
    the batch, combined by ``combine(grads [T, P], options, generator)`` (harmodt.surgery; the
    method's ``options``, the data stream's generator), then the clip and AdamW step. Returns the
    mean task loss. One process only: its per-task gradients are not split over torchrun ranks."""

    def __init__(self, state: TrainingState, combine: Callable, options=None):
        if state.dist.world_size > 1:
            raise ValueError(f"--method {state.cfg.method} runs in one process (its per-task gradients are not split "
                             "over torchrun ranks)")
        self.tr, self.combine, self.options = state, combine, options

    def graph_problem(self) -> str | None:
        return f"--method {self.tr.cfg.method} computes per-task gradients on the host's task split"

    def __call__(self, task_ids: list[int]) -> torch.Tensor:
        tr = self.tr
        params = [p for p in tr.params if p.requires_grad]
        loss = surgery_gradients(self.combine, params, task_ids, tr.cfg.batch_size, tr.batcher.sample, tr.forward,
                                 tr.autocast, self.options, tr.batcher.generator)
        coef = clip_coefficient(params, tr.cfg.grad_clip)
        tr.opt.masked_step(None, grad_scale=coef, op=tr.backends.masked_adamw)
        return loss
