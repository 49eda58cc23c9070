"""One CUDA graph per training step (``--cuda-graph``): the method's step captured once, replayed.

A GPU step of the paper's model is bound by the host (hundreds of small kernel launches and the
Python between them), not by the GPU's arithmetic. :class:`GraphedStep` runs the method's own step
rule (harmodt.steps: its :meth:`~harmodt.steps.PlainStep.step`, the one copy of the step's
arithmetic) on inputs held in fixed device buffers, so that on CUDA it can be captured once as a
``torch.cuda.CUDAGraph`` after a few eager warm-up steps and then replayed, one launch per step.
This module keeps only those buffers, the per-step values and the capture.

Nothing step-specific is baked into the graph as a Python constant. Per step, outside the graph:

* the batch is drawn into the static input buffers (``PromptDTBatcher.sample_into``: one copy of
  its row indices to the device, then a gather per field there), the batch's task ids among them:
  the masked layers and the optimizer's masks read them on the device;
* the step count is written into an int64 device tensor (``fill_``) from which the step rule
  derives every counter-based dropout seed (:meth:`harmodt.steps.PlainStep.counter_dropout` on a
  tensor: the bits of the eager step's host arithmetic);
* each parameter group's learning rate (the scheduler's) is written into a float64 device tensor,
  which the masked AdamW reads on the device;
* when the task masks changed (a mask update, a resume), they are copied into the graph's own
  copy; the step rule selects the optimizer's masks of the step (the task's, or the union of a
  mixed-task batch's) from it on the device by the batch's task ids
  (:meth:`harmodt.steps.MaskedStep.keep`), into buffers kept here.

Mask updates, evaluation, logging and checkpointing stay outside the graph, in the training loop;
they read and write the same parameters and optimizer state, which the graph updates in place.

The arithmetic is the eager step's, op for op, so a graphed run gives the eager run's losses and
weights bit for bit (tests/test_graphed_step.py on the CPU, tests/gpu/test_graphed_step_cuda.py on a
GPU). Under ``--compile`` the eager and the graphed step are traced as two graphs (this one reads
its dropout seeds from a tensor): bit for bit without dropout, under Inductor's deterministic mode
(``torch.use_deterministic_algorithms(True)``, ``torch._inductor.config.deterministic``), without
which Inductor's backward differs run to run in the last bits; with dropout Inductor rounds counter
dropout and draws torch's dropout differently in each. On a CPU nothing is captured: every step
runs the same body on the static buffers (what the CPU tests check).

Which runs are graphed (:func:`choose`): ``--cuda-graph on`` graphs the run or refuses it in one
line (:func:`graph_problem`: per-task gradients (PCGrad/CAGrad), torchrun, ``--clip-scope
unmasked``, a mixed-task batch on the reference ops, a step rule that cannot be captured);
``auto`` (the default) graphs a run on CUDA that can be captured and whose graphed bits are the
eager step's (:func:`auto_problem`), and else trains eager, the start line saying why; ``off``
trains eager.
"""

from __future__ import annotations

import torch

from .config import ConfigError
from .data.batches import batch_segments
from .steps import StepInputs
from .training_state import TrainingState

__all__ = ["GraphedStep", "StepValues", "auto_problem", "choose", "graph_problem"]

WARMUP_STEPS = 3  # eager steps before the capture (CUDA): lazy state, autotuning, allocator pools


def graph_problem(state: TrainingState) -> str | None:
    """Why ``state``'s step rule cannot be captured (one clause naming the flag), None when it can."""
    cfg, rule = state.cfg, state.step_rule
    if state.dist.active:
        return "a torchrun run (the graph runs in one process)"
    if cfg.tasks_per_batch > 1 and state.backends.masked_linear.backend.name == "reference" and (
            state.task_masks is not None or not cfg.fused):
        how = "--fused" if not cfg.fused else "--backend triton or cpu"
        return f"a mixed-task batch on the reference ops splits its rows on the host ({how}, or --tasks-per-batch 1)"
    problem = getattr(rule, "graph_problem", None)
    if problem is None:
        name = getattr(rule, "__qualname__", None) or type(rule).__name__
        return (f"--method {cfg.method}'s step rule {name} has no step() a graph can run "
                "(a harmodt.steps.PlainStep subclass has)")
    return problem()


def auto_problem(cfg, device: torch.device) -> str | None:
    """Why ``--cuda-graph auto`` trains a run of ``cfg`` on ``device`` eager before asking whether it
    can be captured: no CUDA device, or a dropout whose captured bits are not the eager step's
    (checked for counter dropout without ``--compile``, and for no dropout)."""
    if device.type != "cuda":
        return f"no CUDA graph on {device.type}"
    if cfg.model.dropout == 0.0:
        return None
    if cfg.compile:
        return ("--compile with dropout (Inductor draws it differently in a captured step; "
                "--dropout 0 or --cuda-graph on)")
    if cfg.dropout_rng != "counter":
        return "dropout from torch's RNG (--dropout-rng counter, what --fused picks, is captured with the eager bits)"
    return None


def choose(state: TrainingState) -> tuple["GraphedStep | None", str]:
    """``--cuda-graph``'s step for ``state``: a :class:`GraphedStep`, or None (the step rule runs
    eager), and the start line's words for it. ``on`` that cannot be honoured raises
    :class:`ConfigError` (one line)."""
    mode, device = state.cfg.cuda_graph, state.device
    if mode == "on":
        if (why := graph_problem(state)) is not None:
            raise ConfigError(f"--cuda-graph on: {why}; run it with --cuda-graph off")
        captured = "one CUDA graph per step" if device.type == "cuda" else f"uncaptured on {device.type}"
        return GraphedStep(state), f"step=graphed ({captured})"
    if mode == "off":
        return None, "step=eager (--cuda-graph off)"
    why = auto_problem(state.cfg, device) or graph_problem(state)
    if why is not None:
        return None, f"step=eager (--cuda-graph auto: {why})"
    return GraphedStep(state), "step=graphed (one CUDA graph per step; --cuda-graph off for eager)"


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
    """The state's step rule over static buffers; on CUDA captured after :data:`WARMUP_STEPS` eager
    steps and replayed. Call it with the step's task ids as ``train_step`` is called; it advances
    the scheduler and ``state.step`` and returns the loss (a device tensor of its own). Build it
    with :func:`choose`."""

    def __init__(self, state: TrainingState, warmup: int = WARMUP_STEPS):
        self.tr, self.rule = state, state.step_rule
        self.capture = state.device.type == "cuda"
        self.warmup = warmup
        self.values = StepValues(state.device, len(state.opt.param_groups))
        self.params = [p for p in state.params if p.requires_grad]
        self.batch: dict | None = None  # static input buffers, made from the first batch
        self.heads: torch.Tensor | None = None  # the first row of each task's run of the batch (static layout)
        self.masks: dict | None = None  # the graph's copy of every task's masks (the mask kind's for_op)
        self._mask_source: list = []  # the tensors that copy was made from, and their versions
        self.keep: dict | None = None  # per weight: what the step may change (static buffers)
        # each trainable parameter's gradient buffer (None: it gets no gradient), made by the first step
        self.grads: list = []
        self.graph = None
        self.loss: torch.Tensor | None = None  # the captured step's loss (static output)
        self.calls = 0
        self._held: list = []  # what the captured graph reads that no one else keeps alive

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
            self.batch = batch  # sample's new tensors, in the layout sample_into writes into
            # the batch's runs, in task order
            counts = [c for _, c in batch_segments(list(range(n_tasks)), batch["task_ids"].shape[0])]
            self.heads = torch.tensor([sum(counts[:i]) for i in range(len(counts))], device=self.tr.device)
            return
        for k, v in batch.items():
            dst = self.batch[k]
            if dst.shape != v.shape or dst.dtype != v.dtype:
                raise RuntimeError(f"cuda graph: batch[{k!r}] changed from {list(dst.shape)} {dst.dtype} "
                                   f"to {list(v.shape)} {v.dtype}")
            dst.copy_(v, non_blocking=True)

    def _load_masks(self) -> None:
        """Copies the state's task masks (its mask kind's ``for_op``) into the graph's copy when they
        are not the tensors (or versions) it was made from: after a mask update or a resume."""
        tm = self.tr.task_masks
        if tm is None:
            return
        src = tm.for_op(self.tr.backends.masked_linear)
        now = [(m, m._version) for m in src.values()]
        if len(now) == len(self._mask_source) and all(a is b and u == v
                                                      for (a, u), (b, v) in zip(now, self._mask_source)):
            return
        if self.masks is None:
            self.masks = {n: m.clone() for n, m in src.items()}
            self.keep = {n: m.new_empty(m.shape[1:]) for n, m in src.items()}
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
        """The step rule's step on the static buffers, every per-step value read from device
        tensors; returns the loss."""
        rule, b = self.rule, self.batch
        tasks = b["task_ids"].index_select(0, self.heads)  # (n,) the batch's tasks in order, on the device
        ctx = rule.context(b["task_ids"], single_task=self.heads.shape[0] == 1,
                           dropout=rule.counter_dropout(self.values.step), masks=self.masks)
        keep = rule.keep(tasks, masks=self.masks, out=self.keep)
        return rule.step(StepInputs(b, ctx, keep, lrs=self.values.lrs, grads=self.grads))
