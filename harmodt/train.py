"""`python -m harmodt.train`: train HarmoDT (R/M/F), Prompt-DT, MTDT, or Prompt-DT with PCGrad or
CAGrad gradient surgery, on offline Meta-World data.

Algorithm 1: every step samples one task (``--tasks-per-batch 1``), a batch of its data, and
updates theta with ``grad L_i(theta * M_i) * M_i``; every ``t_m`` steps Algorithm 2 updates the
masks (HarmoDT-M/F; HarmoDT-R keeps its random ERK masks). Model, masks, optimizer state and
batches live on ``--device``; the kernels of each op are chosen once (``kernels.select_backends``).
The harness around the algorithms (flags, output files, RNG state, checkpoints, signals, torchrun
ranks, the data cache) is in harmodt/run/. Writes into ``--out``: config.json, metrics.jsonl,
TensorBoard events, checkpoint.pt (atomic, safe to load; resumable), results.json, curves.png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import kernels

from . import plots
from .config import ConfigError, TrainConfig, goal_seeds, resolve_device
from .data.batches import PromptDTBatcher, batch_segments
from .mask_grads import task_gradients
from .masks import TaskMasks, alpha_schedule, harmony_score
from .methods import METHODS
from .model import CounterDropout, MaskContext, action_loss, build_model
from .optim import MaskedAdamW, clip_coefficient, param_groups
from .run import distributed, resume, rng, session, signals
from .run.cli import parse_args
from .run.data_cache import check_data, load_training_data
from .run.outputs import MetricsLog, NoLog
from .surgery import surgery_gradients
from .tasks import parse_tasks


class Trainer:
    """The model, masks, optimizer and data on one device; the training step (Algorithm 1) and the
    mask update (Algorithm 2)."""

    def __init__(self, cfg: TrainConfig, datasets: dict | None = None, dist: distributed.Single | None = None):
        self.cfg = cfg
        self.method = METHODS[cfg.method]
        self.tasks = parse_tasks(cfg.tasks)
        self.dist = dist or distributed.Single()  # the ranks of a torchrun run (harmodt.run.distributed), or one process
        self.device = self.dist.device(resolve_device(cfg.device))
        if self.dist.active and self.method.per_task_gradients:
            raise ConfigError(f"--method {cfg.method} runs in one process (its per-task gradients are not split over torchrun ranks)")
        try:
            self.backends = kernels.select_backends(self.device, cfg.fused, cfg.backend)
        except kernels.BackendUnavailable as exc:
            raise ConfigError(str(exc)) from None
        rng.seed_all(cfg.seed)
        self.datasets = datasets if datasets is not None else load_training_data(cfg, self.tasks, may_generate=not self.dist.active)
        self.data_sha256 = check_data(cfg, self.datasets)  # the data fit the config; a checkpoint records this fingerprint
        mc = cfg.model
        # a prompted method's data stream draws prompts whatever --conditioning says
        prompted = "prompt" in (self.method.conditioning, self.method.resolve_conditioning(cfg.conditioning))
        self.batcher = PromptDTBatcher(self.datasets, self.tasks, mc.context_len, mc.prompt_len if prompted else 0, cfg.rtg_scale,
                                       mc.max_ep_len, seed=cfg.seed + self.dist.rank, device=self.device, prompt_segment=cfg.prompt_segment)
        self.model = build_model(mc, len(self.tasks), cfg.method, cfg.conditioning).to(self.device)
        self.forward = torch.compile(self.model) if cfg.compile else self.model  # training forwards go through this
        self.params = list(self.model.parameters())
        self.weights = self.model.masked_weights()  # name -> Parameter
        shapes = {n: tuple(w.shape) for n, w in self.weights.items()}
        self.task_masks = None
        if self.method.masked:
            self.task_masks = TaskMasks.erk(shapes, len(self.tasks), cfg.masks.sparsity, torch.Generator().manual_seed(cfg.seed + 1),
                                            device=self.device, draw=cfg.masks.erk_draw)
        self.task_stream = None  # with several ranks: the task draws every rank shares (harmodt.run.distributed)
        self.step_tasks: list[int] = []  # with several ranks: every rank's tasks of the current step
        if self.dist.active:
            self.dist.broadcast_tensors_(list(self.model.state_dict().values())
                                         + (list(self.task_masks.masks.values()) if self.task_masks is not None else []))
            self.task_stream = torch.Generator().manual_seed(cfg.seed + distributed.TASK_STREAM_OFFSET)
            torch.manual_seed(cfg.seed + self.dist.rank)  # this rank's dropout stream
        self.initial_masks = None if self.task_masks is None else self.task_masks.snapshot()  # ERK draw (seeded): the reference for mask_changed_fraction
        self.opt = MaskedAdamW(param_groups(self.model, cfg.weight_decay, cfg.weight_decay_scope), lr=cfg.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min((s + 1) / max(cfg.warmup_steps, 1), 1.0))
        self.step = 0
        self.last_harmony = None
        self.stop = signals.StopRequest(agreed_by_ranks=self.dist.active)  # SIGINT/SIGTERM: the loop saves and stops

    # ---- one step -------------------------------------------------------------------------
    def context(self, task_ids: torch.Tensor, single_task: bool = False, segments: tuple | None = None,
                dropout: CounterDropout | None = None) -> MaskContext | None:
        """The masks a forward on rows of ``task_ids`` runs through (None without masks and
        without ``dropout``); ``single_task``: every row is ``task_ids[0]`` (one mask, no grouping
        of rows); ``segments``: the batch's ``((task, sequences), ...)`` layout when known on the
        host; ``dropout``: the forward's counter-based dropout (:meth:`counter_dropout`)."""
        op = self.backends.masked_linear
        if self.task_masks is None:
            return None if dropout is None else MaskContext({}, task_ids, op, dropout=dropout)
        return MaskContext(self.task_masks.for_op(op), task_ids[:1] if single_task else task_ids, op, segments=segments,
                           dropout=dropout)

    def counter_dropout(self) -> CounterDropout | None:
        """The training step's counter-based dropout (``--dropout-rng counter``, with dropout on):
        its seed is a hash of the run's seed, this rank and the step, all of which a checkpoint
        keeps, so a resumed run draws the same bits. None otherwise (torch's RNG)."""
        if self.cfg.dropout_rng != "counter" or self.cfg.model.dropout == 0.0:
            return None
        base = kernels.reference.site_seed(self.cfg.seed, self.dist.rank)
        return CounterDropout(self.cfg.model.dropout, kernels.reference.site_seed(base, self.step), self.backends.dropout)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    def sample_tasks(self) -> list[int]:
        """This step's task ids (one process: from the data stream; several ranks: this rank's
        ``tasks_per_batch`` of the ``world_size * tasks_per_batch`` drawn from the shared task
        stream, all of which are kept in ``step_tasks``). ``--task-order round-robin``: the
        ``n`` tasks ``step * n, ..., step * n + n - 1`` mod T, with ``n`` as drawn (one process)
        or shared by the ranks (several), so step t of one task per step trains task t mod T."""
        if self.dist.active:
            k = self.cfg.tasks_per_batch
            if self.cfg.task_order == "round-robin":
                self.step_tasks = round_robin(self.step, len(self.tasks), k * self.dist.world_size)
            else:
                self.step_tasks = distributed.draw_tasks(self.task_stream, len(self.tasks), k * self.dist.world_size)
            return self.step_tasks[self.dist.rank * k : (self.dist.rank + 1) * k]
        if self.cfg.task_order == "round-robin":
            return round_robin(self.step, len(self.tasks), min(self.cfg.tasks_per_batch, len(self.tasks)))
        g = self.batcher.generator
        if self.cfg.tasks_per_batch == 1:
            return torch.randint(len(self.tasks), (1,), generator=g).tolist()  # (a host generator: nothing to wait for)
        n = min(self.cfg.tasks_per_batch, len(self.tasks))
        return torch.randperm(len(self.tasks), generator=g)[:n].tolist()

    def keep_masks(self, task_ids: list[int]) -> dict | None:
        """{weight: mask of what this step may change}: the task's mask, or for a batch of several
        tasks the union of theirs (Eq. 11)."""
        if self.task_masks is None:
            return None
        keep = self.task_masks.keep(task_ids, self.backends.masked_adamw)
        return {w: keep[n] for n, w in self.weights.items()}

    def train_step(self, task_ids: list[int]) -> torch.Tensor:
        """One step of Algorithm 1 on a batch of ``task_ids``; returns the loss (a 0-dim tensor on
        the device: reading it is the caller's choice, so a GPU step need not wait)."""
        if not self.model.training:  # (train() walks every module: skip it when already set)
            self.model.train()
        if self.method.per_task_gradients:
            return self.surgery_step(task_ids)
        batch = self.batcher.sample(task_ids, self.cfg.batch_size)
        ctx = self.context(batch["task_ids"], single_task=len(task_ids) == 1, segments=batch_segments(task_ids, self.cfg.batch_size),
                           dropout=self.counter_dropout())
        unmasked_clip = self.task_masks is not None and self.cfg.clip_scope == "unmasked"
        if unmasked_clip:
            ctx = self.capturing_context(ctx, task_ids)
        count = self.dist.loss_count(batch["mask"], self.stop)  # several ranks: all ranks' real steps (the loss's divisor)
        with self.autocast():
            pred = self.forward(batch, ctx)
        loss = action_loss(pred, batch, count)
        for p in self.params:  # zero_grad(set_to_none=True) without Optimizer.zero_grad's per-call overhead
            p.grad = None
        loss.backward()
        loss = self.dist.reduce_gradients(self.params, loss)  # several ranks: summed gradients and the global loss
        coef = clip_coefficient(self.params, self.cfg.grad_clip, self.unmasked_gradients(ctx) if unmasked_clip else None)
        keep = self.keep_masks(self.step_tasks if self.dist.active else task_ids)  # several ranks: the union of all ranks' tasks
        self.opt.masked_step(keep, grad_scale=coef, op=self.backends.masked_adamw)
        self.sched.step()
        self.step += 1
        return loss.detach()

    def capturing_context(self, ctx: MaskContext, task_ids: list[int]) -> MaskContext:
        """``ctx`` of a training batch (``--clip-scope unmasked``) over the masks of its distinct
        tasks alone, its rows renumbered to them, with a float32 ``[k, N, K]`` buffer per masked
        matrix into which the backward adds each task's gradient before masking (the
        ``task_grads`` of ``kernels.masked_linear``, on every backend)."""
        present = sorted(set(task_ids))
        idx = torch.tensor(present, device=self.device)
        local = torch.zeros(len(self.tasks), dtype=torch.int64, device=self.device).index_copy_(
            0, idx, torch.arange(len(present), device=self.device))
        segments = None if ctx.segments is None else tuple((present.index(t), c) for t, c in ctx.segments)
        return MaskContext({n: m.index_select(0, idx) for n, m in ctx.masks.items()}, local[ctx.task_ids], ctx.masked_linear,
                           {n: torch.zeros(len(present), *w.shape, device=self.device) for n, w in self.weights.items()}, segments,
                           dropout=ctx.dropout)

    def unmasked_gradients(self, ctx: MaskContext) -> dict:
        """{masked matrix: its gradient before masking}, from a backward through
        :meth:`capturing_context`'s ``ctx``: the sum over the batch's tasks (with several ranks,
        over every rank's), i.e. the gradient of W were the masks not applied to it in the backward."""
        grads = [ctx.task_grads[n].sum(0) for n in self.weights]
        if self.dist.active:
            flat = self.dist.all_reduce_sum_(torch.cat([g.reshape(-1) for g in grads]))
            grads = [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]
        return dict(zip(self.weights.values(), grads))

    def surgery_step(self, task_ids: list[int]) -> torch.Tensor:
        """One PCGrad/CAGrad step (dense Prompt-DT, no masks): each task's gradient on its own rows
        of the batch, combined by the method's rule (harmodt.surgery.surgery_gradients; PCGrad's
        orders from the data stream), then the clip and AdamW step. Returns the mean task loss."""
        params = [p for p in self.params if p.requires_grad]
        loss = surgery_gradients(self.method.combine, params, task_ids, self.cfg.batch_size, self.batcher.sample, self.forward,
                                           self.autocast, self.cfg.cagrad_c, self.batcher.generator)
        coef = clip_coefficient(params, self.cfg.grad_clip)
        self.opt.masked_step(None, grad_scale=coef, op=self.backends.masked_adamw)
        self.sched.step()
        self.step += 1
        return loss

    # ---- Algorithm 2 ----------------------------------------------------------------------
    def task_gradients(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[T, P]`` gradients of every task on one fresh batch each: gbar_i = grad L_i(theta*M_i) * M_i
        (Eq. 4) and g_i (Alg. 2: grad L_i(theta) by default; None without masks), in ``self.weights``
        order, as ``--mask-grads`` and ``--recovery-grad`` say (harmodt.mask_grads). With several
        ranks, task i is computed on rank i mod W (on a batch of its data stream) and the zero-filled
        rows are summed over the ranks."""
        m, b = self.cfg.masks, self.cfg.batch_size
        batches = ((i, self.batcher.sample([i], b)) for i in self.dist.shard(range(len(self.tasks))))
        masked, dense = task_gradients(self.model, self.weights, self.task_masks, self.backends.masked_linear, batches, len(self.tasks),
                                       mask_grads=m.mask_grads, recovery_grad=m.recovery_grad, grad_clip=self.cfg.grad_clip)
        self.dist.all_reduce_sum_(masked)
        if dense is not None:
            self.dist.all_reduce_sum_(dense)
        return masked, dense

    def mask_update(self) -> dict:
        """Algorithm 2 at this step: every task's gradients (:meth:`task_gradients`), their harmony
        score (Definition 3.2, logged for every method) and, for learned masks, the update of Eqs.
        8-10 (``TaskMasks.update``) of alpha_t weights (Eq. 12) per task. Returns the metric line."""
        masked, dense = self.task_gradients()
        info = {"harmony_score": harmony_score(masked)}
        self.last_harmony = info["harmony_score"]
        m = self.cfg.masks
        if self.method.learns_masks:
            k = alpha_schedule(self.step, self.cfg.steps, m.eta_min, m.eta_max)
            params = torch.cat([w.detach().reshape(-1) for w in self.weights.values()])
            changed = self.task_masks.update(masked, dense, params, k, m.lam, self.method.importance, m.lam_on,
                                             select=self.backends.harmony_select)
            info.update({"alpha": k, "masked_per_task": changed["masked"], "density": self.task_masks.density(),
                         "mask_changed_fraction": self.task_masks.changed_fraction(self.initial_masks)})
        self.dist.check_identical({"masks": [] if self.task_masks is None else [self.task_masks.snapshot()],
                                   "weights": list(self.model.state_dict().values())})
        return info

    # ---- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What training continues from besides the RNG streams (tensors and plain types):
        weights, masks, optimizer, scheduler, step and the last harmony score."""
        return {
            "model": self.model.state_dict(),
            "masks": None if self.task_masks is None else self.task_masks.per_task(self.tasks),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "step": self.step,
            "last_harmony": self.last_harmony,
        }

    def load_state(self, state: dict) -> None:
        """Continue from ``state`` (:meth:`state_dict`'s entries, as a checkpoint holds them);
        raises when it does not fit this model."""
        self.model.load_state_dict(state["model"])
        if state["masks"] is not None:
            self.task_masks = TaskMasks.from_per_task(state["masks"], self.tasks, self.device, self.weights)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.last_harmony = state.get("last_harmony")

    # ---- evaluation -----------------------------------------------------------------------
    def eval_info(self) -> dict:
        """What evaluation needs besides the weights: task names, state normalization, prompt
        trajectories and how prompts are cut from them, return scaling (tensors and plain types only)."""
        b = self.batcher
        prompts = {
            name: [{"observations": torch.as_tensor(tr.observations), "actions": torch.as_tensor(tr.actions),
                    "rewards": torch.as_tensor(tr.rewards)} for tr in self.datasets[name].prompts]
            for name in self.tasks
        }
        return {"tasks": list(self.tasks), "state_mean": {t: torch.as_tensor(v) for t, v in b.state_mean.items()},
                "state_std": {t: torch.as_tensor(v) for t, v in b.state_std.items()}, "prompts": prompts,
                "rtg_scale": self.cfg.rtg_scale, "target_return": self.cfg.target_return, "prompt_segment": self.cfg.prompt_segment}

    def evaluate(self, goals_seed: int | None = None) -> dict:
        """Evaluate on every training task (harmodt.evaluate), on the goals of ``goals_seed`` (default:
        the test goals, ``config.goal_seeds``). The training RNG streams (torch,
        CUDA, numpy, python) are left as they were, so evaluating or not never changes training.
        With several ranks, rank r evaluates tasks r, r+W, ... and the results are gathered (a
        task's episodes then depend on W, as their environment seeds follow its place in the list)."""
        from .evaluate import evaluate

        with rng.preserved(self.device):
            mine = self.dist.shard(self.tasks)
            res = evaluate(self.model, self.task_masks, self.eval_info(), mine, self.cfg.eval_episodes,
                           goal_seeds(self.cfg.seed)["test"] if goals_seed is None else goals_seed,
                           backend=self.backends.masked_linear, progress=self.cfg.progress and self.dist.is_main,
                           precision=self.cfg.precision) if mine else {"tasks": {}, "env_steps": 0, "seconds": 0.0}
            return distributed.merge_evaluations(self.dist.all_gather_object(res), self.tasks) if self.dist.active else res


def round_robin(step: int, n_tasks: int, count: int) -> list[int]:
    """``--task-order round-robin``: the ``count`` task ids of ``step``, ``step * count, ...,
    step * count + count - 1`` mod ``n_tasks`` (count 1: task ``step mod n_tasks``)."""
    return [(step * count + j) % n_tasks for j in range(count)]


def run(cfg: TrainConfig, datasets: dict | None = None) -> dict:
    """Train as ``cfg`` says (on ``datasets`` when given, else ``cfg.data`` or generated data) and
    write the run's files into ``cfg.out``; returns the results (also in results.json).

    ``cfg.resume`` continues ``OUT/checkpoint.pt`` (harmodt.run.resume); a resumed run ends as
    the uninterrupted one would, whenever the earlier process stopped (even SIGKILL). Per step the
    order is: mask update (when due), training step, metric line, evaluation, checkpoint.
    """
    dist = session.start(cfg)  # under torchrun: this rank; else one process
    with distributed.rank_output(dist):  # rank 0 alone prints (and writes files); the others keep stderr
        ck = session.open_run(cfg, dist)  # checked before any file is written
        trainer = Trainer(cfg, datasets, dist)
        log, run_state = session.continue_run(trainer, ck)
        del ck
        results = train_loop(trainer, log, run_state)
        if dist.is_main:
            plots.draw_curves(cfg.out)
        return results


def train_loop(trainer: Trainer, log: MetricsLog | NoLog, run_state: dict) -> dict:
    """Algorithm 1 from ``trainer.step`` to ``cfg.steps`` with Algorithm 2 every ``t_m`` steps,
    metric lines, evaluations and checkpoints; then the final evaluation (:func:`session.finish`)."""
    cfg, ck_path = trainer.cfg, Path(trainer.cfg.out) / "checkpoint.pt"
    meter = session.Meter(trainer, run_state.get("losses", torch.zeros(0)))  # progress bar, losses, steps/s
    evals = session.Evaluations(run_state)  # the best evaluation so far and how many were made

    def save() -> None:
        log.flush()  # the TensorBoard events up to the checkpoint are on disk with it
        resume.save(trainer, ck_path, {"metrics_bytes": log.tell(), "losses": meter.unlogged_losses(), **evals.state()})

    saved_at = None  # the step of the last checkpoint this process wrote
    try:  # Ctrl-C / SIGTERM: finish the current step, save a consistent checkpoint, then stop
        with signals.stop_requests(trainer.stop.ask):
            while trainer.step < cfg.steps:
                if trainer.stop:
                    save()
                    signals.stopped(trainer.step)
                if trainer.step > 0 and trainer.step % cfg.masks.update_every == 0:
                    with meter.excluded() as took:  # seconds so far
                        info = trainer.mask_update()
                        log.log({**info, "step": trainer.step, "mask_update_s": took()})
                meter.add(trainer.train_step(trainer.sample_tasks()))
                if trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps:
                    log.log(meter.line(trainer.step, trainer.sched.get_last_lr()[0]))
                if cfg.eval_every and trainer.step % cfg.eval_every == 0 and trainer.step < cfg.steps and cfg.eval_episodes:
                    with meter.excluded():
                        session.evaluate_in_training(trainer, evals, log)
                if trainer.step % cfg.checkpoint_every == 0:
                    save()
                    saved_at = trainer.step
    finally:
        meter.close()
    if saved_at != trainer.step:
        save()
    return session.finish(trainer, log, evals)


def main(argv: list[str] | None = None) -> int:
    """``python -m harmodt.train``: parse the flags and run them; the exit code (0, or
    :func:`session.exit_code` of what stopped the run)."""
    try:
        cfg = parse_args(argv)
        t = time.perf_counter()
        run(cfg)
        print(f"[harmodt] done in {time.perf_counter() - t:.0f} s; outputs in {cfg.out}")
        distributed.shutdown()
        return 0
    except session.STOPPING_ERRORS as exc:
        return session.exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
