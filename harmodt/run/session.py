"""One training run as a process: process settings and this process's torchrun rank, what must
hold before any file is written, continuing from a checkpoint, the console lines, and the exit
codes of ``python -m harmodt.train``."""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

import harmodt_kernels

from ..config import ConfigError, TrainConfig, resolve_device, to_dict
from ..data import DataError
from ..evaluate import print_table, result_entry
from ..files import FolderLock, OutputError, is_temp_of, writable_folder
from ..ownership import RUN_FILES, check_run_folder
from ..runtime import bf16_matmul_note, keep_freed_memory
from . import distributed, resume, signals
from .outputs import MetricsLog, NoLog, finite_json, write_atomic


def start(cfg: TrainConfig) -> distributed.Single:
    """Process settings (reuse of freed memory, ``--threads``, the bf16 note on a CPU) and this
    process's rank: under torchrun one of the process group, else the only one."""
    keep_freed_memory()
    if cfg.precision == "bf16" and resolve_device(cfg.device).type == "cpu" and (note := bf16_matmul_note()):
        print(note, file=sys.stderr, flush=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return distributed.init(cfg.device, cfg.dist_timeout)


def lock_out(cfg: TrainConfig, dist: distributed.Single):
    """``--out`` made, found writable, and locked for this run (rank 0; :class:`harmodt.files.FolderLock`:
    one writer per run folder, released when the run ends); the other ranks write no file. The device
    and kernel backend are checked first, so a run that cannot start makes no folder."""
    try:
        harmodt_kernels.select_backends(resolve_device(cfg.device), cfg.fused, cfg.backend)
    except harmodt_kernels.BackendUnavailable as exc:
        raise ConfigError(str(exc)) from None
    if not dist.is_main:
        return nullcontext()
    try:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {cfg.out}: cannot make the folder ({exc.strerror or exc})") from None
    if not writable_folder(cfg.out):
        raise ConfigError(f"--out {cfg.out}: the folder is not writable")
    return FolderLock(cfg.out, "--out")


def open_run(cfg: TrainConfig, dist: distributed.Single) -> dict | None:
    """What must hold before any file is written besides the lock (``--out`` holds no data set or
    study, the checkpoint to continue fits ``cfg``: :func:`resume.open_checkpoint`). Returns that
    checkpoint (None: the run starts at step 0)."""
    if dist.is_main:
        check_run_folder(cfg.out)
    return resume.open_checkpoint(cfg, dist)


def continue_run(tr, ck: dict | None) -> tuple[MetricsLog | NoLog, dict]:
    """Announce trainer ``tr``, put it where checkpoint ``ck`` left it (when there is one), write
    config.json and open the metrics log, cut back to the checkpoint. Returns the log and the
    checkpoint's run state ({} from step 0)."""
    cfg, dist, out = tr.cfg, tr.dist, Path(tr.cfg.out)
    ck_path = out / "checkpoint.pt"
    if dist.active:
        print(dist.describe(), flush=True)
    print(describe(tr), flush=True)
    run_state = {}
    if ck is not None:
        run_state = resume.restore(tr, ck, ck_path)
        print(f"[harmodt] resumed from {ck_path} at step {tr.step}", flush=True)
    elif cfg.resume:
        print(f"[harmodt] --resume: no checkpoint in {out} yet; starting at step 0", flush=True)
    if not dist.is_main:
        return NoLog(), run_state
    for p in out.iterdir():  # left by writes that were killed (this process holds the folder's lock)
        if any(is_temp_of(p.name, name) for name in RUN_FILES):
            p.unlink(missing_ok=True)
    write_atomic(out / "config.json", json.dumps(to_dict(cfg), indent=2))
    # a run from step 0 starts its metric lines afresh; a resumed one keeps those before its checkpoint
    return MetricsLog(out, tr.step, run_state.get("metrics_bytes", None if tr.step else 0)), run_state


class Meter:
    """The progress bar and the training-loss metric line: the losses since the last line (device
    tensors, read once per line) and the steps per second, not counting mask updates and
    evaluations."""

    def __init__(self, tr, losses: torch.Tensor):
        from tqdm import tqdm

        cfg = tr.cfg
        self.bar = tqdm(total=cfg.steps, initial=tr.step, disable=not cfg.progress or not tr.dist.is_main,
                        desc=f"train {cfg.method}", dynamic_ncols=True)
        self.losses = [x.to(tr.device) for x in losses]  # a checkpoint keeps those not yet in a metric line
        self.t0, self.s0 = time.perf_counter(), tr.step
        self.out = Path(cfg.out)

    def add(self, loss: torch.Tensor) -> None:
        """One training step done, with this loss."""
        self.losses.append(loss)
        self.bar.update(1)

    @contextmanager
    def excluded(self):
        """Time inside is not training time (a mask update, an evaluation); yields a function that
        gives the seconds since entering."""
        t = time.perf_counter()
        try:
            yield lambda: time.perf_counter() - t
        finally:
            self.t0 += time.perf_counter() - t

    def line(self, step: int, lr: float) -> dict:
        """The metric line of ``step``: mean loss since the last line, learning rate, steps per second.
        A mean loss that is NaN or infinite raises :class:`resume.Diverged` (the run stops there)."""
        sps = (step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)
        rec = {"step": step, "loss": float(torch.stack(self.losses).float().mean()), "lr": lr, "steps_per_s": sps}
        if not math.isfinite(rec["loss"]):
            raise resume.diverged(self.out, step, f"the training loss is {rec['loss']} (mean of "
                                                  f"steps {self.s0 + 1}-{step})")
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}", sps=f"{sps:.1f}")
        self.losses, self.t0, self.s0 = [], time.perf_counter(), step
        return rec

    def unlogged_losses(self) -> torch.Tensor:
        return torch.stack(self.losses) if self.losses else torch.zeros(0)

    def close(self) -> None:
        self.bar.close()


class Evaluations:
    """The evaluations of a run during training so far: how many, and the best (the highest mean
    success, ties: the earliest) as ``{"step", "mean_success", "tasks"}``. Kept in the checkpoint's run
    state, so that a resumed run reports the same best."""

    def __init__(self, run_state: dict):
        self.best, self.count = run_state.get("best"), int(run_state.get("evaluations", 0))

    def add(self, step: int, res: dict) -> bool:
        """Count evaluation ``res`` (harmodt.evaluate's results) made at ``step``; whether it is the new best."""
        entry = evaluation_entry(step, res)
        self.count += 1
        if self.best is None or entry["mean_success"] > self.best["mean_success"]:
            self.best = entry
            return True
        return False

    def state(self) -> dict:
        return {"best": self.best, "evaluations": self.count}


def evaluation_entry(step: int, res: dict) -> dict:
    return {"step": step, "mean_success": res["mean_success"],
            "tasks": {n: result_entry(r) for n, r in res["tasks"].items()}}


def evaluate_in_training(tr, evals: Evaluations, log: MetricsLog | NoLog) -> None:
    """An evaluation during training (``--eval-every``), counted in ``evals``. With ``--validation-seed``
    it runs on the validation goals, logs ``validation_mean_success`` and saves a new best as
    OUT/best.pt (a full checkpoint of this step, which ``python -m harmodt.evaluate`` reads); else it
    runs on the test goals and logs ``eval_mean_success``."""
    validating = tr.cfg.validation_seed >= 0
    res = tr.evaluate(tr.cfg.validation_seed) if validating else tr.evaluate()
    if evals.add(tr.step, res) and validating:
        resume.save(tr, Path(tr.cfg.out) / BEST_CHECKPOINT)
    log.log({"step": tr.step, ("validation_mean_success" if validating else "eval_mean_success"): res["mean_success"]})


BEST_CHECKPOINT = "best.pt"


def finish(tr, log: MetricsLog | NoLog, evals: Evaluations) -> dict:
    """The end of a run: the final evaluation on the test goals (with ``--eval-episodes``), its table
    and metric line and results.json. Returns the results: at the top level (tasks, mean_success)
    the final evaluation, repeated as ``final``; ``best``: the evaluation with the highest mean success
    during training. Without ``--validation-seed`` those are the periodic evaluations (``--eval-every``)
    and the final one, all on the test goals (so ``best`` is biased upward); with it, the evaluations on
    the validation goals, the last step's included, whose weights are OUT/best.pt (``goals``:
    "validation"; its success on the test goals is ``python -m harmodt.evaluate OUT/best.pt``)."""
    cfg, dist, out = tr.cfg, tr.dist, Path(tr.cfg.out)
    results = {"method": cfg.method, "tasks": {}, "mean_success": float("nan"), "steps": tr.step, "final": None,
               "best": None,
               "mask_movement": tr.mask_updater.movement()}
    if cfg.eval_episodes:
        validating = cfg.validation_seed >= 0
        if validating:
            evaluate_in_training(tr, evals, log)
        res = tr.evaluate()
        final = evaluation_entry(tr.step, res)
        if not validating:
            evals.add(tr.step, res)
        best = {**evals.best, "evaluations": evals.count, "goals": "validation" if validating else "test"}
        if validating:
            best.update(validation_seed=cfg.validation_seed, checkpoint=BEST_CHECKPOINT)
        results.update(tasks=final["tasks"], mean_success=res["mean_success"], final=final, best=best,
                       returns_truncated=cfg.stop_at_success)
        log.log({"step": tr.step, "eval_mean_success": res["mean_success"],
                 "eval_env_steps_per_s": res.get("env_steps_per_s", 0.0)})
        print_table(results)
        if evals.count > 1 or validating:
            goals = "on the validation goals" if validating else ""
            print(f"best of {evals.count} evaluations{' ' + goals if goals else ''}: mean success "
                  f"{evals.best['mean_success']:.2f} at step {evals.best['step']} (final on the test "
                  f"goals: {res['mean_success']:.2f})"
                  + (f"; its weights: {out / BEST_CHECKPOINT}" if validating else ""))
    log.close()
    if not dist.is_main:
        return results
    write_atomic(out / "results.json", finite_json(results, indent=2))  # (mean_success without an evaluation: null)
    return results


def describe(tr) -> str:
    """One line: device, precision, compile, the backend of each kernel op of trainer ``tr``, how
    the mask update computes its task gradients (``--mask-grads-passes``), and whether its step is
    graphed (``--cuda-graph``) or eager and why."""
    cfg, device, backends = tr.cfg, tr.device, tr.backends
    dev = str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    precision = cfg.precision + (" (exact fp32 on a CPU)" if cfg.precision == "tf32" and device.type != "cuda" else "")
    passes = getattr(tr.mask_updater, "passes", None)  # (a method's own updater may take no task gradients)
    if passes is not None:
        passes = f"mask-grads-passes={passes}" + (" (auto) " if cfg.masks.mask_grads_passes == "auto" else " ")
    line = (f"[harmodt] device={dev} precision={precision} compile={cfg.compile} "
            f"fused={cfg.fused} kernels: {backends.describe()} {passes or ''}{tr.step_kind}")
    if cfg.fused and backends.fallback is not None:
        line += f"\n[harmodt] note: --fused runs on the plain-PyTorch reference here: {backends.fallback}"
    return line


STOPPING_ERRORS = (ConfigError, DataError, OutputError, resume.Diverged, distributed.DistributedError,
                   KeyboardInterrupt)  # what ends a run with an exit code


def exit_code(exc: BaseException) -> int:
    """The exit code of ``python -m harmodt.train`` stopped by ``exc`` (one of STOPPING_ERRORS),
    its line printed on stderr: 2 a bad flag, file or dataset, or a loss gone NaN; 3 a torchrun rank failed; 130
    stopped by Ctrl-C."""
    if isinstance(exc, KeyboardInterrupt):
        if not isinstance(exc, signals.Stopped):  # (a stop in the loop printed its own line)
            print("\n[harmodt] interrupted: the last checkpoint (if any) is kept; continue with --resume",
                  file=sys.stderr)
        return 130
    if isinstance(exc, distributed.DistributedError):
        if not exc.reported:  # a failed collective printed its line where it failed
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return distributed.EXIT_CODE
    print(f"error: {exc}", file=sys.stderr)  # a bad flag, file or dataset: one clear line
    return 2
