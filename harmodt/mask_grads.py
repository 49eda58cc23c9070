"""The task gradients the mask update (Algorithm 2) is given: gbar_i = grad L_i(theta * M_i) * M_i
(Eq. 4) and the recovery gradient g_i, on one batch of each task's data, as ``--mask-grads`` says.

``paper``: the model in eval mode (dropout off), unclipped. ``official``: as the official code
takes them, the model in train mode (dropout on) and each task's gradient clipped to
``--grad-clip`` before it is stored (and masked after clipping, as the official code does), so ghat
averages task gradients of equal norm only where every task's norm exceeds the clip before masking.

The gradients are those of the masked matrices (``weights``, name -> parameter), flattened and
concatenated in ``weights`` order; g_i is None without masks (Prompt-DT, MTDT), where gbar_i is
the plain gradient.

Two ways to compute them (``passes``): "per-task", the reference, one or two forward and backward
passes per task; "batched" (``paper`` only), the tasks' batches in a few mixed-task forward and
backward passes: the rows of task i run through mask M_i, and, for ``--recovery-grad dense``, a second
copy of the rows through an all-ones mask of its own per task (theta itself), so the masked linear
writes each mask row's unmasked ``dY^T X`` into ``task_grads`` (:func:`batched_task_gradients`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

import harmodt_kernels

from .masks import TaskMasks
from .model import MaskContext, action_loss
from .optim import clip_factor


PASSES = ("per-task", "batched")


def task_gradients(model: torch.nn.Module, weights: dict, task_masks: TaskMasks | None, masked_linear,
                   batches: Iterable, n_tasks: int, *, mask_grads: str, recovery_grad: str, grad_clip: float,
                   passes: str = "per-task") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[T, P]`` gbar and g (None without masks) of every ``(task, batch)`` in ``batches`` (the
    rows of other tasks stay zero). ``masked_linear``: the run's op; ``mask_grads``: "paper" or
    "official"; ``recovery_grad``: "dense" (g_i = grad L_i(theta)) or "masked" (the unmasked
    gradient at theta * M_i, from the same backward); ``grad_clip``: the official variant's clip;
    ``passes``: "per-task" (the reference) or "batched" (``paper`` only, see
    :func:`batched_task_gradients`). The model's train/eval mode is restored."""
    if passes not in PASSES:
        raise ValueError(f"passes must be one of {', '.join(PASSES)}, got {passes!r}")
    if passes == "batched":
        if mask_grads != "paper":
            raise ValueError("batched task gradients need mask_grads 'paper' (the official variant draws each task's "
                             "dropout and clips each task's gradient over every parameter: one pass per task)")
        return batched_task_gradients(model, weights, task_masks, masked_linear, batches, n_tasks,
                                      recovery_grad=recovery_grad)
    device = next(iter(weights.values())).device
    p_total = sum(w.numel() for w in weights.values())
    masked = torch.zeros(n_tasks, p_total, device=device)
    dense = torch.zeros(n_tasks, p_total, device=device) if task_masks is not None else None
    official = mask_grads == "official"
    grads = _Gradients(model, weights, task_masks, masked_linear, n_tasks, recovery_grad == "masked", grad_clip)
    was_training = model.training
    model.train(official)
    for i, batch in batches:
        masked[i], g = grads.official(i, batch) if official else grads.paper(i, batch)
        if dense is not None:
            dense[i] = g
    model.train(was_training)
    return masked, dense


TASKS_PER_PASS = 16  # tasks of one batched pass: their activations and [2 x tasks, N, K] task_grads are held at once


def batched_task_gradients(model: torch.nn.Module, weights: dict, task_masks: TaskMasks | None, masked_linear,
                           batches: Iterable, n_tasks: int, *, recovery_grad: str, tasks_per_pass: int = TASKS_PER_PASS
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`task_gradients` of ``mask_grads="paper"`` (eval mode, unclipped) in one forward and
    backward of a mixed-task batch per ``tasks_per_pass`` tasks (one pass at MT10, four at MT50):
    every task's batch (each of the same size), once through its masks and, for
    ``recovery_grad="dense"`` or without masks, once more through an all-ones mask row of its own
    (theta). The loss is the sum of the tasks' losses, so each row's output gradient is the one of
    its task's loss alone (the tasks' rows never meet: attention stays within a sequence), and the
    masked linear's ``task_grads`` receive each mask row's unmasked ``dY^T X``: g_i (``masked``:
    from M_i's row; ``dense``: from the ones row) and gbar_i = that of M_i's row times M_i.

    The same arithmetic as the per-task passes row for row, except where an op's result depends
    on the batch it runs in (a GEMM over a different number of rows) and g_i of ``dense``, which
    runs through the masked linear with a ones mask instead of ``F.linear``. On the CPU with one
    thread the kernels (reference and native) run each task's rows as a GEMM of their own, as the
    loop does: the gradients are the loop's bit for bit, and so are the masks Algorithm 2 selects
    from them (tests/test_mask_grads_batched.py); with more threads ATen may split a GEMM over the
    pass's rows otherwise. Where the summation order differs (threads, a GPU's kernels) the
    bound is each task's gradient within 1e-5 of its largest entry (checked under the Triton
    interpreter), and a mask can then differ only where two scores at Algorithm 2's top-k cut
    differ by less than what that bound allows them to move."""
    work = list(batches)
    sizes = [b["actions"].shape[0] for _, b in work]
    if len(set(sizes)) > 1:
        raise ValueError(f"batched task gradients need every task's batch of one size, got {sizes}")
    p = sum(w.numel() for w in weights.values())
    # rows of absent tasks stay zero
    new = torch.empty if sorted(i for i, _ in work) == list(range(n_tasks)) else torch.zeros
    device = next(iter(weights.values())).device
    gbar = new(n_tasks, p, device=device)
    g = new(n_tasks, p, device=device) if task_masks is not None else None
    layouts = _mask_rows(weights, task_masks, masked_linear, n_tasks, task_masks is None or recovery_grad == "dense")
    was_training = model.training
    model.eval()
    for start in range(0, len(work), tasks_per_pass):
        _one_pass(model, weights, task_masks, masked_linear, layouts, work[start : start + tasks_per_pass], gbar, g)
    model.train(was_training)
    return gbar, g


def _one_pass(model, weights: dict, task_masks: TaskMasks | None, masked_linear, layouts: dict, work: list,
              gbar: torch.Tensor, g: torch.Tensor | None) -> None:
    """One mixed-task forward and backward of :func:`batched_task_gradients` over ``work``
    (``[(task, batch), ...]``), its tasks' rows written into ``gbar`` and ``g`` ``[T, P]``.
    ``layouts``: name -> ``[T, R, ...]``, R mask rows per task (:func:`_mask_rows`); the pass's
    mask rows are task-major (task j's rows R * j .. R * j + R - 1), and so are its batch rows."""
    tasks, parts = zip(*work)
    n, rows = len(tasks), parts[0]["actions"].shape[0]
    device = gbar.device
    r = next(iter(layouts.values())).shape[1]
    groups = n * r
    batch = {k: torch.cat([p[k] for p in parts for _ in range(r)]) for k in parts[0]}  # (G * rows, ...)
    # each its own tensor: the Triton op saves its task_grads for the backward, and views of one buffer would share a
    # version counter
    task_grads = {name: torch.zeros(groups, *w.shape, device=device) for name, w in weights.items()}
    ctx = MaskContext({name: _task_rows(m, tasks).flatten(0, 1) for name, m in layouts.items()},
                      torch.arange(groups, device=device).repeat_interleave(rows), masked_linear, task_grads,
                      tuple((grp, rows) for grp in range(groups)))
    pred = model(batch, ctx)  # (G * rows, K, A)
    torch.autograd.grad(_sum_of_task_losses(pred, batch, groups), list(weights.values()))  # fills ctx.task_grads
    off = 0
    for name, grads in task_grads.items():
        cols = slice(off, off + grads[0].numel())
        off = cols.stop
        grads = grads.view(n, r, -1)  # (n, R, N * K): task j's mask rows
        if task_masks is None:
            _write(gbar, tasks, cols, grads[:, 0])
            continue
        _write(gbar, tasks, cols, grads[:, 0], _task_rows(task_masks.masks[name], tasks).flatten(1))
        _write(g, tasks, cols, grads[:, r - 1])


def _task_rows(t: torch.Tensor, tasks: tuple) -> torch.Tensor:
    """``t[tasks]``: a view where the tasks are consecutive."""
    if list(tasks) == list(range(tasks[0], tasks[0] + len(tasks))):
        return t[tasks[0] : tasks[0] + len(tasks)]
    return t.index_select(0, torch.tensor(tasks, device=t.device))


def _write(out: torch.Tensor, tasks: tuple, cols: slice, values: torch.Tensor,
           mask: torch.Tensor | None = None) -> None:
    """``out[tasks, cols] = values`` (``[n, N * K]``), times ``mask`` (bool ``[n, N * K]``) when given."""
    if list(tasks) == list(range(tasks[0], tasks[0] + len(tasks))):
        dest = out[tasks[0] : tasks[0] + len(tasks), cols]
        dest.copy_(values) if mask is None else torch.mul(values, mask, out=dest)
    else:
        out[:, cols].index_copy_(0, torch.tensor(tasks, device=out.device), values if mask is None else values * mask)


def _mask_rows(weights: dict, task_masks: TaskMasks | None, masked_linear, n_tasks: int, ones: bool) -> dict:
    """name -> ``[T, R, ...]`` mask rows of every task in ``masked_linear``'s layout: its masks
    (with masks), then with ``ones`` an all-ones row (theta unmasked); made once per update."""
    out, ones_of = {}, {}
    for name, w in weights.items():
        if ones and w.shape not in ones_of:
            one = torch.ones(1, *w.shape, dtype=torch.bool, device=w.device)
            ones_of[w.shape] = one if masked_linear.takes_bool_masks else harmodt_kernels.pack_masks(one)
        if task_masks is None:
            out[name] = ones_of[w.shape].expand(n_tasks, -1, -1).unsqueeze(1).contiguous()
            continue
        masks = task_masks.for_op(masked_linear)[name]
        out[name] = torch.stack([masks, ones_of[w.shape].expand_as(masks)], 1) if ones else masks.unsqueeze(1)
    return out


def _sum_of_task_losses(pred: torch.Tensor, batch: dict, groups: int) -> torch.Tensor:
    """The sum over ``groups`` equal runs of rows of each run's :func:`action_loss`: each
    prediction's gradient is the one of its own run's loss, bit for bit."""
    m = batch["mask"].unsqueeze(-1).to(pred.dtype)  # (G * rows, K, 1)
    sq = ((pred.float() - batch["actions"]) ** 2 * m).view(groups, -1)  # (G, rows * K * A)
    return (sq.sum(1) / (m.view(groups, -1).sum(1) * pred.shape[-1])).sum()


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])  # [P]


class _Gradients:
    """One task's (gbar_i, g_i) on one batch, by either variant."""

    def __init__(self, model, weights: dict, task_masks: TaskMasks | None, masked_linear, n_tasks: int,
                 recover_masked: bool, grad_clip: float):
        self.model, self.weights, self.task_masks, self.masked_linear = model, weights, task_masks, masked_linear
        self.n_tasks, self.recover_masked, self.grad_clip = n_tasks, recover_masked, grad_clip
        self.params = list(model.parameters())
        self.device = next(iter(weights.values())).device

    def paper(self, task: int, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """gbar_i and g_i as the paper defines them (the model is in eval mode): g_i is
        grad L_i(theta) (``--recovery-grad dense``) or the unmasked gradient at theta * M_i from
        the same backward (``masked``)."""
        model, params = self.model, list(self.weights.values())
        if self.task_masks is None:
            return _flat(torch.autograd.grad(action_loss(model(batch), batch), params)), None
        ctx = MaskContext(self.task_masks.for_op(self.masked_linear), batch["task_ids"][:1], self.masked_linear)
        if self.recover_masked:  # the backward also writes each task's unmasked gradient
            ctx.task_grads = {n: torch.zeros(self.n_tasks, *w.shape, device=self.device)
                              for n, w in self.weights.items()}
        gbar = _flat(torch.autograd.grad(action_loss(model(batch, ctx), batch), params))
        if self.recover_masked:
            return gbar, _flat(ctx.task_grads[n][task] for n in self.weights)
        return gbar, _flat(torch.autograd.grad(action_loss(model(batch), batch), params))

    def official(self, task: int, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """gbar_i and g_i as the official code's mask update takes them (the model is in train
        mode, so dropout draws from the run's torch RNG, which the checkpoint keeps), each clipped
        as ``clip_grad_norm_(model.parameters(), --grad-clip)`` would clip it.

        The clip norm is the official code's: over every parameter of the model (embeddings, layer
        norms, biases, head and the masked matrices), with the masked matrices' gradient taken
        before the mask is applied, i.e. the full gradient w.r.t. the effective weight theta * M_i
        (captured from the same backward). gbar_i is that gradient times M_i, times the clip
        factor. g_i: ``--recovery-grad masked``: the captured unmasked gradient with the same
        factor; ``dense``: grad L_i(theta) on the same batch with the same dropout draw (the RNG
        is rewound for it), clipped by its own norm over every parameter.
        """
        if self.task_masks is None:
            return self.clipped(batch, None)[0], None
        before = dropout_state(self.device)
        gbar, unmasked = self.clipped(batch, task)
        if self.recover_masked:
            return gbar, unmasked
        after = dropout_state(self.device)
        set_dropout_state(before, self.device)  # the dense forward draws the same dropout as the masked one
        g, _ = self.clipped(batch, None)
        set_dropout_state(after, self.device)
        return gbar, g

    def clipped(self, batch: dict, task: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward and backward on ``batch`` through task ``task``'s masks (None: unmasked);
        returns the masked matrices' gradients ``[P]`` and, with a task, their unmasked gradients
        w.r.t. theta * M_task ``[P]``, both times the clip factor of :meth:`official`."""
        names, weights = list(self.weights), self.weights
        ctx = None
        if task is not None:  # a one-task context whose backward also captures the unmasked gradients
            layers = self.task_masks.for_op(self.masked_linear)
            ctx = MaskContext({n: layers[n][task : task + 1] for n in names},
                              torch.zeros(1, dtype=torch.int64, device=self.device), self.masked_linear,
                              {n: torch.zeros(1, *w.shape, device=self.device) for n, w in weights.items()})
        grads = torch.autograd.grad(action_loss(self.model(batch, ctx), batch), self.params, allow_unused=True)
        by_param = {id(p): g for p, g in zip(self.params, grads)}
        mats = [by_param[id(weights[n])] for n in names]  # grad * M_task (or the plain gradient)
        full = mats if ctx is None else [ctx.task_grads[n][0] for n in names]  # what the clip norm sees
        matrix_ids = {id(w) for w in weights.values()}
        others = [g for p, g in zip(self.params, grads) if id(p) not in matrix_ids and g is not None]
        coef = clip_factor(full + others, self.grad_clip)
        return _flat(mats) * coef, None if ctx is None else _flat(full) * coef


def dropout_state(device: torch.device) -> tuple:
    """The streams dropout draws from: torch's CPU generator and, on a CUDA device, its generator."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_dropout_state(state: tuple, device: torch.device) -> None:
    """Set the streams of :func:`dropout_state`."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
