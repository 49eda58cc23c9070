"""One CUDA graph per training step (``--cuda-graph``): Algorithm 1's step captured once, replayed.

A GPU step of the paper's model is bound by the host (hundreds of small kernel launches and the
Python between them), not by the GPU's arithmetic. :class:`GraphedStep` runs the step of
``Trainer.train_step`` (forward, loss, backward, clipping, masked AdamW) over fixed device
buffers, so that on CUDA it can be captured once as a ``torch.cuda.CUDAGraph`` after a few eager
warm-up steps and then replayed, one launch per step.

Nothing step-specific is baked into the graph as a Python constant. Per step, outside the graph:

* the batch is drawn into the static input buffers (``PromptDTBatcher.sample_into``: one copy of
  its row indices to the device, then a gather per field there), the batch's task ids among them:
  the masked layers and the optimizer's masks read them on the device;
* the step count is written into an int64 device tensor (``fill_``) from which the graph derives
  every counter-based dropout seed (:func:`kernels.reference.site_seed` on tensors: the bits of
  the eager step's host arithmetic);
* each parameter group's learning rate (the scheduler's) is written into a float64 device tensor,
  which the masked AdamW reads on the device;
* when the task masks changed (a mask update, a resume), they are copied into the graph's own
  copy; the optimizer's masks of the step (the task's, or the union of a mixed-task batch's)
  are selected from it on the device by the batch's task ids.

Mask updates, evaluation, logging and checkpointing stay outside the graph, in the training loop;
they read and write the same parameters and optimizer state, which the graph updates in place.

The arithmetic is the eager step's, op for op, so a graphed run gives the eager run's losses and
weights bit for bit (tests/test_graphed_step.py on the CPU, tests/gpu/test_graphed_step_cuda.py on a
GPU). Under ``--compile`` the eager and the graphed step are traced as two graphs (this one reads
its dropout seeds from a tensor): bit for bit without dropout, under Inductor's deterministic mode
(``torch.use_deterministic_algorithms(True)``, ``torch._inductor.config.deterministic``), without
which Inductor's backward differs run to run in the last bits; with dropout Inductor rounds counter
dropout and draws torch's dropout differently in each. On a CPU nothing is captured: every step
runs the same body on the static buffers (what the CPU tests check). Needs: no per-task gradients (PCGrad/CAGrad), one process, ``--clip-scope
masked``, and ``--fused`` or one task per batch (the reference splits a mixed-task batch on the
host).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import harmodt_kernels as kernels

from .config import ConfigError
from .data.batches import batch_segments
from .model import CounterDropout, MaskContext, action_loss
from .optim import clip_coefficient

__all__ = ["DeviceSeedDropout", "GraphedStep", "StepValues", "check_graphable"]

WARMUP_STEPS = 3  # eager steps before the capture (CUDA): lazy state, autotuning, allocator pools


def check_graphable(trainer) -> None:
    """Raises :class:`ConfigError` (one line naming the flag) when ``trainer``'s step cannot be
    captured."""
    cfg = trainer.cfg
    if trainer.method.per_task_gradients:
        raise ConfigError(f"--cuda-graph: --method {cfg.method} computes per-task gradients on the host's task split; run it without")
    if trainer.dist.active:
        raise ConfigError("--cuda-graph runs in one process (not under torchrun)")
    if cfg.tasks_per_batch > 1 and trainer.task_masks is not None and trainer.backends.masked_linear.backend.name == "reference":
        raise ConfigError("--cuda-graph: a mixed-task batch on the reference splits its rows on the host; use --backend triton or cpu")
    if trainer.task_masks is not None and cfg.clip_scope != "masked":
        raise ConfigError("--cuda-graph needs --clip-scope masked (the unmasked norm renumbers the batch's tasks on the host)")


@dataclass(frozen=True)
class DeviceSeedDropout(CounterDropout):
    """:class:`harmodt.model.CounterDropout` whose per-site seeds were computed on the device at
    once (``seeds[site]``, int64), from a step count held in a tensor: the kernels read them there."""

    seeds: torch.Tensor | None = None

    def site_seed(self, site: int):
        return self.seeds[site]


class StepValues:
    """The per-step values a captured step reads, each in a device tensor of fixed address:
    ``step`` (int64, the step count the dropout seeds derive from) and ``lrs`` (float64, one per
    optimizer parameter group). :meth:`set` writes them outside the graph, without reading
    anything back from the device."""

    def __init__(self, device: torch.device, n_groups: int):
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.lrs = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(n_groups)]

    def set(self, step: int, lrs: list[float]) -> None:
        self.step.fill_(step)
        for t, lr in zip(self.lrs, lrs):
            t.fill_(lr)


class GraphedStep:
    """``Trainer.train_step`` over static buffers; on CUDA captured after :data:`WARMUP_STEPS`
    eager steps and replayed. Call it with the step's task ids as ``train_step`` is called; it
    advances the scheduler and ``trainer.step`` and returns the loss (a device tensor of its own)."""

    def __init__(self, trainer, warmup: int = WARMUP_STEPS):
        check_graphable(trainer)
        self.tr = trainer
        self.capture = trainer.device.type == "cuda"
        self.warmup = warmup
        self.values = StepValues(trainer.device, len(trainer.opt.param_groups))
        self.params = [p for p in trainer.params if p.requires_grad]
        self.batch: dict | None = None  # static input buffers, made from the first batch
        self.heads: torch.Tensor | None = None  # the first row of each task's run of the batch (static layout)
        self.masks: dict | None = None  # the graph's copy of every task's masks (the masked-linear op's layout)
        self._mask_source: list = []  # the tensors that copy was made from, and their versions
        self._selected: dict | None = None  # per weight: the batch's tasks' masks (static buffers)
        self._unions: dict = {}  # per weight: their union, for a mixed-task batch (static buffers)
        self.grads: list | None = None  # each parameter's gradient buffer (None: it gets no gradient)
        self.graph = None
        self.loss: torch.Tensor | None = None  # the captured step's loss (static output)
        self.calls = 0
        self._held: list = []  # what the captured graph reads that no one else keeps alive
        cfg = trainer.cfg
        self.counter = cfg.dropout_rng == "counter" and cfg.model.dropout > 0.0
        self.base_seed = kernels.reference.site_seed(cfg.seed, trainer.dist.rank)
        self.n_sites = 1 + 3 * cfg.model.n_layer  # the model's counter-dropout sites (harmodt.model.CounterDropout)

    # ---- outside the graph ---------------------------------------------------------------------
    def __call__(self, task_ids: list[int]) -> torch.Tensor:
        tr = self.tr
        if not tr.model.training:
            tr.model.train()
        if self.batch is None:
            self._load_batch(tr.batcher.sample(task_ids, tr.cfg.batch_size), len(task_ids))
        else:
            tr.batcher.sample_into(task_ids, self.batch)  # drawn straight into the static buffers
        self._load_masks()
        self.values.set(tr.step, [g["lr"] for g in tr.opt.param_groups])
        if not self.capture:
            loss = self.body()
        elif self.graph is None and self.calls < self.warmup:
            loss = self._on_side_stream(self.body)
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            loss = self.loss
        self.calls += 1
        for p, g in zip(self.params, self.grads):  # the gradients as eager code sees them after a step
            p.grad = g
        tr.sched.step()
        tr.step += 1
        return loss.detach().clone()  # (the static loss is overwritten by the next replay)

    def _load_batch(self, batch: dict, n_tasks: int) -> None:
        if self.batch is None:
            self.batch = {k: v.clone() for k, v in batch.items()}
            counts = [c for _, c in batch_segments(list(range(n_tasks)), batch["task_ids"].shape[0])]  # the batch's runs, in task order
            self.heads = torch.tensor([sum(counts[:i]) for i in range(len(counts))], device=self.tr.device)
            return
        for k, v in batch.items():
            dst = self.batch[k]
            if dst.shape != v.shape or dst.dtype != v.dtype:
                raise RuntimeError(f"cuda graph: batch[{k!r}] changed from {list(dst.shape)} {dst.dtype} to {list(v.shape)} {v.dtype}")
            dst.copy_(v, non_blocking=True)

    def _load_masks(self) -> None:
        """Copies the trainer's task masks into the graph's copy when they are not the tensors (or
        versions) it was made from: after a mask update or a resume."""
        tm = self.tr.task_masks
        if tm is None:
            return
        src = tm.for_op(self.tr.backends.masked_linear)
        now = [(m, m._version) for m in src.values()]
        if len(now) == len(self._mask_source) and all(a is b and u == v for (a, u), (b, v) in zip(now, self._mask_source)):
            return
        if self.masks is None:
            self.masks = {n: m.clone() for n, m in src.items()}
        else:
            for n, m in src.items():
                self.masks[n].copy_(m)
        self._mask_source = now  # (holding them: their ids cannot be reused by new tensors)

    def _on_side_stream(self, fn):
        """A warm-up step on a side stream, as capture will run (CUDA's recommended warm-up)."""
        s = torch.cuda.Stream(self.tr.device)
        s.wait_stream(torch.cuda.current_stream(self.tr.device))
        with torch.cuda.stream(s):
            out = fn()
        torch.cuda.current_stream(self.tr.device).wait_stream(s)
        return out

    def _capture(self) -> None:
        torch.cuda.synchronize(self.tr.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.loss = self.body()
        self.graph = graph
        # the Triton AdamW's launch tables live in the optimizer's workspace (an LRU): keep the ones
        # the graph reads alive whatever that cache drops later
        self._held = list(self.tr.opt.kernel_workspace.get("triton_adamw_tables", {}).values())

    # ---- the step (captured) -----------------------------------------------------------------
    def body(self) -> torch.Tensor:
        """Forward, loss, backward, clipping and masked AdamW over the static buffers, reading
        every per-step value from device tensors; returns the loss."""
        tr, b = self.tr, self.batch
        ids = b["task_ids"]
        single = self.heads.shape[0] == 1
        dropout = None
        if self.counter:
            sites = torch.arange(self.n_sites, device=tr.device)
            seeds = kernels.reference.site_seed(kernels.reference.site_seed(self.base_seed, self.values.step), sites)
            dropout = DeviceSeedDropout(tr.cfg.model.dropout, 0, tr.backends.dropout, seeds=seeds)
        ctx = None
        if self.masks is not None:
            ctx = MaskContext(self.masks, ids[:1] if single else ids, tr.backends.masked_linear, dropout=dropout)
        elif dropout is not None:
            ctx = MaskContext({}, ids, tr.backends.masked_linear, dropout=dropout)
        with tr.autocast():
            pred = tr.forward(b, ctx)
        loss = action_loss(pred, b)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        if self.grads is None:  # the first (eager) step: the buffers the gradients live in from now on
            self.grads = [None if g is None else torch.empty_like(g) for g in grads]
        torch._foreach_copy_([s for s in self.grads if s is not None], [g for g in grads if g is not None])
        for p, g in zip(self.params, self.grads):
            p.grad = g
        coef = clip_coefficient(self.params, tr.cfg.grad_clip)
        tr.opt.masked_step(self._keep(), grad_scale=coef, op=tr.backends.masked_adamw, lrs=self.values.lrs)
        return loss.detach()

    def _keep(self) -> dict | None:
        """{weight: what this step may change}: the batch's task's mask, or the union of its tasks'
        (Eq. 11), selected on the device by the task ids in the static batch, into buffers made on
        the first (eager) step: their addresses stay, so the Triton AdamW's launch table made then
        serves the captured step too (nothing is uploaded during the capture)."""
        if self.masks is None:
            return None
        tasks = self.batch["task_ids"].index_select(0, self.heads)  # (n,) the batch's tasks in order
        n = self.heads.shape[0]
        if self._selected is None:
            self._selected = {name: m.new_empty((n, *m.shape[1:])) for name, m in self.masks.items()}
            self._unions = {name: m.new_empty(m.shape[1:]) for name, m in self.masks.items()} if n > 1 else {}
        keep = {}
        for name, m in self.masks.items():
            sel = torch.index_select(m, 0, tasks, out=self._selected[name])
            if n == 1:
                keep[self.tr.weights[name]] = sel[0]
                continue
            union = torch.bitwise_or(sel[0], sel[1], out=self._unions[name])  # bool masks or packed words: the union either way
            for j in range(2, n):
                union.bitwise_or_(sel[j])
            keep[self.tr.weights[name]] = union
        return keep
