"""`python -m harmodt.train`: train HarmoDT (R/M/F), Prompt-DT, MTDT, or Prompt-DT with PCGrad or
CAGrad gradient surgery, on offline Meta-World data.

Algorithm 1: every step samples one task (``--tasks-per-batch 1``), a batch of its data, and
updates theta with ``grad L_i(theta * M_i) * M_i``; every ``t_m`` steps Algorithm 2 updates the
masks (HarmoDT-M/F; HarmoDT-R keeps its random ERK masks). What a step and a mask update do is the
method's (its step rule and mask updater, built by its entry in harmodt.methods); the
:class:`Trainer` holds the model, optimizer and data, and :func:`train_loop` calls them. Model, masks, optimizer state
and batches live on ``--device``; the kernels of each op are chosen once (``harmodt_kernels.select_backends``).
The harness around the algorithms (flags, output files, RNG state, checkpoints, signals, torchrun
ranks, the data cache) is in harmodt/run/. Writes into ``--out``: config.json, metrics.jsonl,
TensorBoard events, checkpoint.pt (atomic, safe to load; resumable), results.json, curves.png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import harmodt_kernels

from . import graphed_step, plots
from .config import ConfigError, TrainConfig, goal_seeds, resolve_device
from .data.batches import PromptDTBatcher
from .methods import METHODS
from .optim import MaskedAdamW, param_groups
from .run import distributed, resume, rng, session, signals
from .run.cli import parse_args
from .run.data_cache import check_data, load_training_data
from .run.outputs import MetricsLog, NoLog
from .runtime import float32_matmuls
from .tasks import parse_tasks
from .training_state import TrainingState


class Trainer(TrainingState):
    """The model, masks, optimizer and data on one device (the fields of its
    :class:`~harmodt.training_state.TrainingState`), and what the method (harmodt.methods) builds on
    them: its step rule (Algorithm 1's step, harmodt.steps) and its mask updater (Algorithm 2,
    harmodt.mask_update). ``dist``: this process's rank (harmodt.run.distributed), which makes every
    collective."""

    def __init__(self, cfg: TrainConfig, datasets: dict | None = None, dist: distributed.Single | None = None):
        method = METHODS[cfg.method]
        tasks = parse_tasks(cfg.tasks)
        dist = dist or distributed.Single()  # the ranks of a torchrun run, or one process
        device = dist.device(resolve_device(cfg.device))
        try:
            backends = harmodt_kernels.select_backends(device, cfg.fused, cfg.backend)
        except harmodt_kernels.BackendUnavailable as exc:
            raise ConfigError(str(exc)) from None
        rng.seed_all(cfg.seed)
        self.method = method
        self.datasets = datasets if datasets is not None else load_training_data(cfg, tasks,
                                                                                 may_generate=dist.may_generate_data)
        # the data fit the config; a checkpoint records this fingerprint
        self.data_sha256 = check_data(cfg, self.datasets)
        mc = cfg.model
        prompt_len = mc.prompt_len if method.draws_prompts(cfg.conditioning) else 0
        batcher = PromptDTBatcher(self.datasets, tasks, mc.context_len, prompt_len, cfg.rtg_scale, mc.max_ep_len,
                                  seed=cfg.seed + dist.rank, device=device, prompt_segment=cfg.prompt_segment,
                                  state_norm=cfg.state_norm)
        model = method.build_model(mc, len(tasks), cfg.conditioning).to(device)
        weights = model.masked_weights()  # name -> Parameter
        task_masks = method.build_masks(weights, len(tasks), cfg.masks, cfg.seed, device)
        masks = [] if task_masks is None else task_masks.tensors()
        dist.share_initial_state(list(model.state_dict().values()) + masks, cfg.seed)  # several ranks: rank 0's
        opt = MaskedAdamW(param_groups(model, cfg.weight_decay, cfg.weight_decay_scope), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / max(cfg.warmup_steps, 1), 1.0))
        super().__init__(cfg, tasks, device, dist, backends, batcher, model,
                         forward=torch.compile(model) if cfg.compile else model,  # training forwards go through this
                         params=list(model.parameters()), weights=weights, task_masks=task_masks, opt=opt, sched=sched,
                         stop=dist.stop_request())  # SIGINT/SIGTERM: the loop saves and stops
        try:
            self.step_rule = method.build_step_rule(self)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.mask_updater = method.build_mask_updater(self)
        # --cuda-graph: the step rule's step captured once (harmodt/graphed_step.py), or None: eager; and the start
        # line's words for it
        self.graphed, self.step_kind = graphed_step.choose(self)

    def sample_tasks(self) -> list[int]:
        """This step's task ids (``--tasks-per-batch``, ``--task-order``; with several ranks this
        rank's share of the step's, harmodt.run.distributed)."""
        return self.dist.tasks_of_step(self.step, len(self.tasks), self.cfg.tasks_per_batch, self.cfg.task_order,
                                       self.batcher.generator)

    def train_step(self, task_ids: list[int]) -> torch.Tensor:
        """One step of Algorithm 1 on a batch of ``task_ids`` by the method's step rule; returns the
        loss (a 0-dim tensor on the device: reading it is the caller's choice, so a GPU step need not wait)."""
        if self.graphed is not None:  # the graphed step (harmodt/graphed_step.py)
            return self.graphed(task_ids)
        if not self.model.training:  # (train() walks every module: skip it when already set)
            self.model.train()
        loss = self.step_rule(task_ids)
        self.sched.step()
        self.step += 1
        return loss

    # ---- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What training continues from besides the RNG streams (tensors and plain types):
        weights, masks, optimizer, scheduler, step and the last harmony score."""
        return {
            "model": self.model.state_dict(),
            "masks": None if self.task_masks is None else self.task_masks.state(self.tasks),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "step": self.step,
            "last_harmony": self.mask_updater.last_harmony,
        }

    def load_state(self, state: dict) -> None:
        """Continue from ``state`` (:meth:`state_dict`'s entries, as a checkpoint holds them);
        raises when it does not fit this model."""
        self.model.load_state_dict(state["model"])
        if state["masks"] is not None:
            self.task_masks = self.method.mask_kind.from_state(state["masks"], self.tasks, self.device, self.weights)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.mask_updater.last_harmony = state.get("last_harmony")

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
                "rtg_scale": self.cfg.rtg_scale, "target_return": self.cfg.target_return,
                "prompt_segment": self.cfg.prompt_segment,
                "state_norm": self.cfg.state_norm}

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
                           precision=self.cfg.precision, stop_at_success=self.cfg.stop_at_success) if mine else {
                               "tasks": {}, "env_steps": 0, "seconds": 0.0}
            return self.dist.gather_evaluation(res, self.tasks)


def run(cfg: TrainConfig, datasets: dict | None = None) -> dict:
    """Train as ``cfg`` says (on ``datasets`` when given, else ``cfg.data`` or generated data) and
    write the run's files into ``cfg.out``; returns the results (also in results.json).

    ``cfg.resume`` continues ``OUT/checkpoint.pt`` (harmodt.run.resume); a resumed run ends as
    the uninterrupted one would, whenever the earlier process stopped (even SIGKILL). Per step the
    order is: mask update (when due), training step, metric line, evaluation, checkpoint.
    """
    dist = session.start(cfg)  # under torchrun: this rank; else one process
    # rank 0 alone prints and writes files, one writer per --out; fp32 matmuls as --precision says
    with (distributed.rank_output(dist), session.lock_out(cfg, dist),
          float32_matmuls(cfg.precision, dist.device(resolve_device(cfg.device)))):
        ck = session.open_run(cfg, dist)  # checked before any file is written
        trainer = Trainer(cfg, datasets, dist)
        log, run_state = session.continue_run(trainer, ck)
        del ck
        results = train_loop(trainer, log, run_state)
        if dist.is_main:
            plots.draw_curves(cfg.out)
        return results


def train_loop(trainer: Trainer, log: MetricsLog | NoLog, run_state: dict) -> dict:
    """Algorithm 1 from ``trainer.step`` to ``cfg.steps`` with Algorithm 2 when the mask updater is due,
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
                if trainer.mask_updater.due(trainer.step):
                    with meter.excluded() as took:  # seconds so far
                        info = trainer.mask_updater()
                        log.log({**info, "step": trainer.step, "mask_update_s": took()})
                meter.add(trainer.train_step(trainer.sample_tasks()))
                if trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps:
                    log.log(meter.line(trainer.step, trainer.sched.get_last_lr()[0]))
                if (cfg.eval_every and trainer.step % cfg.eval_every == 0 and trainer.step < cfg.steps
                        and cfg.eval_episodes):
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
