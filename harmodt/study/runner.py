"""The study's runs: the checks before any run starts, the shared dataset, and each run's training,
evaluation and held-out evaluations as child processes; Ctrl-C / SIGTERM handling (see the package
docstring); the collection of every run into the study dict."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .figures import draw_figures
from ..files import loads_json, move_atomic, tail_lines, writable_folder
from ..run.outputs import write_atomic
from .plan import Run, StudyError, code_revision, machine_name, failed_jobs, method_arm, parse_sweep, parse_variant
from .learned_masks import compare_learned_masks
from .checks import check_study
from .comparisons import along_training, family, pairwise
from .report import aggregate, run_entry, summary_markdown
from .stats import BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED
from .unseen import aggregate_unseen, collect_unseen, evaluation_keys, unseen_mode


class Study:
    def __init__(self, args: argparse.Namespace, passthrough: list[str], command: str):
        self.args = args
        # --eval-stop-at-success: the runs' evaluations in training stop at success too (best.pt is chosen on the
        # same success)
        self.passthrough = ([*passthrough, "--stop-at-success"]
                            if args.eval_stop_at_success and "--stop-at-success" not in passthrough else passthrough)
        self.command = command
        self.out = Path(args.out)
        self.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        self.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        self.arms = [method_arm(m) for m in self.methods] + [parse_variant(v) for v in args.variant]
        self.sweep = parse_sweep(args.sweep)
        self.sweep_arms = [m.strip() for m in (args.sweep_methods or "").split(",")
                           if m.strip()] or [a.key for a in self.arms]
        sweeps = [None] if self.sweep is None else [(self.sweep[0], v) for v in self.sweep[1]]
        # seed by seed (a study cut short has the same seeds of every variant): every arm at the first swept
        # value, then the swept arms at the other values
        self.runs = [Run(self.out, a, s, sw if a.key in self.sweep_arms else None) for s in self.seeds
                     for i, sw in enumerate(sweeps) for a in self.arms if i == 0 or a.key in self.sweep_arms]
        self.data = args.data or str(self.out / "data")
        self.eval_tasks: list[str] = []  # held-out tasks (--eval-tasks), parsed by check()
        self.thresholds: list[int] = []
        self.print_lock = threading.Lock()
        self.curve_episodes = args.curve_episodes if "--eval-every" in passthrough else 0
        self.threads = args.threads_per_run or max(1, (os.cpu_count() or 1) // max(1, args.workers))
        self.stopping = threading.Event()  # set on Ctrl-C / SIGTERM: no new run or evaluation starts
        self.children: set[subprocess.Popen] = set()
        # guards `children` and the start of a child against `stopping`: a child is either in the set when
        # stop_children looks, or it is never started (re-entrant: the signal handler runs on the main thread)
        self.children_lock = threading.RLock()
        self.wait_tick_s = 60.0  # how often a running trainer's time so far is written to its study_run.json

    def say(self, msg: str) -> None:
        with self.print_lock:
            print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # -- checks -----------------------------------------------------------------------------
    def out_writable(self) -> bool:
        """Whether the study folder can be made and written in (checked before any work)."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
        return writable_folder(self.out)

    def check(self) -> None:
        """Every flag, run and the folder checked before any run starts (:func:`.checks.check_study`)."""
        check_study(self)

    # -- data -------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.args.data:
            if not Path(self.args.data).exists():
                raise StudyError(f"--data {self.args.data} does not exist")
            return
        from ..run.data_cache import current_cache

        if current_cache(Path(self.data)):
            return
        cmd = [sys.executable, "-m", "harmodt.data", "generate", "--tasks", self.args.tasks,
               "--episodes", str(self.args.gen_episodes), "--out", self.data, "--seed", str(self.args.data_seed),
               "--workers", str(max(1, self.args.workers * self.threads)),
               "--no-progress", "--overwrite"]  # (the study's own folder: one of an older generator is made again)
        self.say(f"generating the shared dataset: {shlex.join(cmd[1:])}")
        t = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "data_generate.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise StudyError(f"data generation failed (exit {rc}):\n{tail_lines(self.out / 'data_generate.log', 25)}")
        self.say(f"dataset ready in {time.perf_counter() - t:.0f} s")

    # -- one run ----------------------------------------------------------------------------
    def execute(self, run: Run, index: int) -> bool:
        """Train (or resume) a run, evaluate its final checkpoint, then evaluate it on the held-out tasks."""
        total = len(self.runs)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        if run.finished():
            self.say(f"skip  {run.name} ({index}/{total}): already evaluated")
            return self.evaluate_unseen(run, env)
        if self.stopping.is_set():
            return False
        rec = run.record()
        train_args = run.train_args(self.args.tasks, self.data, self.passthrough, self.threads, self.curve_episodes)
        rec.setdefault("train_seconds", 0.0)
        rec.setdefault("eval_seconds", 0.0)
        rec.update(name=run.name, method=run.method, arm=run.arm.key, label=run.arm.label, seed=run.seed,
                   sweep=None if run.sweep is None else list(run.sweep),
                   train_args=run.train_args(self.args.tasks, self.data, self.passthrough, None, self.curve_episodes))
        # every revision that trained or evaluated it
        if (revision := code_revision()) not in rec.setdefault("revisions", []):
            rec["revisions"].append(revision)
        if (machine := machine_name()) not in rec.setdefault("machines", []):  # and every processor
            rec["machines"].append(machine)
        run.write_record(rec)
        self.say(f"start {run.name} ({index}/{total})")
        t_run = time.perf_counter()
        if not (run.dir / "results.json").exists():  # the trainer writes results.json once its last step is saved
            t, before = time.perf_counter(), rec["train_seconds"]

            def record_time():  # also while the trainer runs: a study killed outright loses at most a minute of it
                rec["train_seconds"] = before + time.perf_counter() - t
                run.write_record(rec)

            with open(run.dir / "train.log", "a") as log:
                log.write(f"$ python -m harmodt.train {shlex.join(train_args)}\n")
                log.flush()
                rc = self.child([sys.executable, "-m", "harmodt.train", *train_args], log, env, on_wait=record_time)
            record_time()
            if rc != 0:
                self.say(f"stop  {run.name}: training stopped (exit {rc}); its checkpoint resumes it"
                         if self.stopping.is_set()
                         else f"FAIL  {run.name}: training exited {rc}\n{tail_lines(run.dir / 'train.log', 25)}")
                return False
        # the final checkpoint, then (with --validation-seed) the one chosen on the validation goals, on the test goals
        for ck, path, what in ((run.dir / "checkpoint.pt", run.eval_path, "evaluation"),
                               (run.best_checkpoint, run.best_eval_path, "evaluation of best.pt")):
            if path.exists() or not ck.exists():
                continue
            t = time.perf_counter()
            ok = self.evaluate(run, [], path, "eval.log", what, env, checkpoint=ck)
            rec["eval_seconds"] += time.perf_counter() - t
            run.write_record(rec)
            if not ok:
                return False
        res = loads_json(run.eval_path.read_text())
        best = (f"; best on validation {loads_json(run.best_eval_path.read_text())['mean_success']:.3f}"
                if run.best_eval_path.exists() else "")
        self.say(f"done  {run.name} ({index}/{total}) in {time.perf_counter() - t_run:.0f} s "
                 f"(train {rec['train_seconds']:.0f} s, eval {rec['eval_seconds']:.0f} s): mean success "
                 f"{res['mean_success']:.3f}{best}")
        return self.evaluate_unseen(run, env)

    def evaluate(self, run: Run, extra: list[str], out: Path, log_name: str, what: str, env: dict,
                 checkpoint: Path | None = None) -> bool:
        """``python -m harmodt.evaluate`` on ``checkpoint`` (default: the run's final one) with the study's
        episodes and seed (the same goals for every run), into ``out`` (renamed into place once complete)."""
        if self.stopping.is_set():
            return False
        eval_args = [str(checkpoint or run.dir / "checkpoint.pt"), *extra, "--episodes", str(self.args.eval_episodes),
                     "--seed", str(self.args.eval_seed),
                     "--out", str(out) + ".tmp", "--no-progress",
                     *(["--precision", "bf16"] if self.args.eval_precision == "bf16" else []),
                     *(["--stop-at-success"] if self.args.eval_stop_at_success else [])]
        with open(run.dir / log_name, "a") as log:
            log.write(f"$ python -m harmodt.evaluate {shlex.join(eval_args)}\n")
            log.flush()
            rc = self.child([sys.executable, "-m", "harmodt.evaluate", *eval_args], log, env)
        if rc != 0:
            self.say(f"stop  {run.name}: {what} stopped (exit {rc}); it runs again next time" if self.stopping.is_set()
                     else f"FAIL  {run.name}: {what} exited {rc}\n{tail_lines(run.dir / log_name, 25)}")
            return False
        move_atomic(str(out) + ".tmp", out)
        return True

    def evaluate_unseen(self, run: Run, env: dict) -> bool:
        """The held-out tasks (``--eval-tasks``) at every vote threshold (once for a dense model); a
        threshold whose results exist is skipped, so this resumes like the other evaluations."""
        if not self.eval_tasks:
            return True
        cfg = loads_json((run.dir / "config.json").read_text())
        mode = unseen_mode(cfg)
        if mode == "skip":
            self.say(f"note  {run.name}: no held-out evaluation (conditioned on the task ID, it cannot name an unseen "
                     "task)")
        for threshold in evaluation_keys(mode, self.thresholds):
            path = run.unseen_path(threshold)
            if path.exists():
                continue
            extra = (["--tasks", ",".join(self.eval_tasks)]
                     + ([] if threshold is None else ["--vote-threshold", str(threshold)]))
            what = "held-out evaluation" + ("" if threshold is None else f" at T={threshold}")
            t = time.perf_counter()
            if not self.evaluate(run, extra, path, "unseen.log", what, env):
                return False
            res = loads_json(path.read_text())
            self.say(f"held-out {run.name}{'' if threshold is None else f' T={threshold}'} in "
                     f"{time.perf_counter() - t:.0f} s: mean success {res['mean_success']:.3f} on "
                     f"{len(self.eval_tasks)} unseen task(s)")
        return True

    def child(self, cmd: list[str], log, env: dict, on_wait=None) -> int:
        """Run one trainer or evaluator process to its end; its exit status (130 without starting it
        once the study is stopping). The child runs in its own session, so a Ctrl-C at the terminal
        reaches it once, from stop_children, and not also straight from the terminal. ``on_wait``
        is called every ``self.wait_tick_s`` seconds while the child runs."""
        with self.children_lock:
            if self.stopping.is_set():
                return 130
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            self.children.add(proc)
        try:
            while True:
                try:
                    return proc.wait(timeout=self.wait_tick_s)
                except subprocess.TimeoutExpired:
                    if on_wait is not None:
                        on_wait()
        finally:
            with self.children_lock:
                self.children.discard(proc)

    def signal_children(self, signum: int) -> list[subprocess.Popen]:
        """Send ``signum`` to every running child; the children it was sent to."""
        with self.children_lock:
            procs = [p for p in self.children if p.poll() is None]
            for p in procs:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:  # exited since poll
                    pass
        return procs

    def stop_children(self) -> None:
        """Start no further child and ask every running trainer / evaluator to stop (a trainer saves
        its checkpoint at its next step); wait for them and kill any still running after 120 s."""
        self.stopping.set()
        procs = self.signal_children(signal.SIGINT)
        deadline = time.time() + 120
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def on_signal(self, signum, frame) -> None:
        """SIGINT / SIGTERM handler of the study process: the first raises KeyboardInterrupt in the
        main thread (run_all then stops the runs, main exits 130); one while the runs are already
        stopping is passed on to the children, so that trainers stop at once instead of at their
        next step (their last checkpoint stays valid: checkpoint writes are atomic)."""
        if not self.stopping.is_set():
            self.stopping.set()  # from here on no child starts, whatever the main thread was doing
            raise KeyboardInterrupt
        self.signal_children(signal.SIGINT)

    def prepare(self) -> None:
        """The study folder, the shared dataset and command.txt, before any run starts (any executor)."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.prepare_data()
        write_atomic(self.out / "command.txt", self.command + "\n")

    def run_all(self) -> bool:
        """Every run through the local process pool (``--executor local``)."""
        self.prepare()
        self.say(f"{len(self.runs)} runs, {self.args.workers} at a time, {self.threads} thread(s) each; out {self.out}")
        t = time.perf_counter()
        pool = ThreadPoolExecutor(self.args.workers)
        try:
            futures = [pool.submit(self.execute, r, i + 1) for i, r in enumerate(self.runs)]
            ok = [f.result() for f in futures]
        except KeyboardInterrupt:
            self.stop_children()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown()
        self.say(f"runs done in {time.perf_counter() - t:.0f} s: {sum(ok)} of {len(ok)} evaluated")
        return all(ok)

    # -- aggregation ------------------------------------------------------------------------
    def collect(self) -> dict:
        from ..tasks import parse_tasks

        tasks = parse_tasks(self.args.tasks)
        runs = []
        for run in self.runs:
            entry = run_entry(run, self.args.eval_episodes, self.args.eval_seed)
            if self.eval_tasks and run.finished() and "config" in entry:
                entry["unseen"] = collect_unseen(run, entry["config"], self.thresholds)
            runs.append(entry)
        return {"command": self.command, "tasks": tasks, "methods": self.methods, "arms": [a.label for a in self.arms],
                "variant_flags": {a.label: shlex.join([a.method, *a.flags]) for a in self.arms[len(self.methods):]},
                "seeds": self.seeds, "family_spec": self.family,
                "sweep": (None if self.sweep is None
                          else {"key": self.sweep[0], "values": self.sweep[1], "methods": self.sweep_arms}),
                "eval_episodes": self.args.eval_episodes, "eval_seed": self.args.eval_seed,
                "eval_precision": self.args.eval_precision,
                "eval_returns_truncated": self.args.eval_stop_at_success, "data": self.data,
                "eval_tasks": self.eval_tasks, "vote_thresholds": self.thresholds,
                "passthrough": self.passthrough, "training_path": training_path(runs),
                "bootstrap": {"seed": BOOTSTRAP_SEED, "samples": BOOTSTRAP_SAMPLES},
                "complete": all(r["status"] == "finished" for r in runs), "runs": runs,
                "failed_jobs": failed_jobs(self.out, self.runs)}

    def report(self) -> dict:
        study = self.collect()
        study["variants"] = aggregate(study)
        study["pairwise"] = pairwise(study)
        study["family"] = family(study)
        study["pairwise_best"] = pairwise(study, key="best")
        study["along_training"] = along_training(study)
        study["unseen"] = aggregate_unseen(study)
        study["learned_masks"] = compare_learned_masks(study, self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        figures = draw_figures(study, self.out, say=self.say)
        write_atomic(self.out / "study.json", json.dumps(study, indent=2))
        write_atomic(self.out / "summary.md", summary_markdown(study, [f.name for f in figures]))
        self.say(f"wrote {self.out / 'study.json'}, {self.out / 'summary.md'} and {self.out / 'figures'}")
        return study


def training_path(runs: list[dict]) -> dict:
    """How the runs trained, from their configs: ``fused`` (the masked ops on the kernels of
    ``backend``) and ``dropout_rng`` (``counter``: the fused path's counter-based dropout;
    ``torch``: torch's RNG), each as the sorted list of the values the runs used."""
    cfgs = [r["config"] for r in runs if r.get("config")]
    return {k: sorted({str(c.get(k, default)) for c in cfgs}) for k, default in (("fused", False), ("backend", "auto"),
                                                                               ("dropout_rng", "torch"))}
