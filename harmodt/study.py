"""`python -m harmodt.study`: compare methods over seeds on one dataset, and draw the paper's figures.

Every (method, seed[, swept value]) is one run: ``python -m harmodt.train ... --out DIR/runs/<name>
--resume --eval-episodes 0`` in its own process, then ``python -m harmodt.evaluate`` on its final
checkpoint with the same ``--eval-seed`` for every run (the same goals for all methods). A run whose
evaluation file exists is skipped; an interrupted one resumes from its checkpoint, so a study can
be spread over several sittings. Training flags the study does not know are passed to every run.

Outputs: ``DIR/study.json`` (every run's config, per-task success and return, wall times),
``DIR/summary.md`` (mean success with a 95 % t-interval over seeds, the paired difference from the
baseline with a bootstrap interval over (seed, task) pairs, a per-task table, mask movement, and
the command) and ``DIR/figures/*.png``.

Final and best: a run's *final* success is the study's evaluation of its final checkpoint; with
``--eval-every`` its *best* is the highest mean success among the trainer's own evaluations
(``--curve-episodes`` episodes per task, the final checkpoint's included; results.json's ``best``),
as the official code reports. Both are reported, labelled; rankings use the final success.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

METHOD_LABELS = {"mtdt": "MTDT", "prompt-dt": "Prompt-DT", "harmodt-r": "HarmoDT-R", "harmodt-m": "HarmoDT-M",
                 "harmodt-f": "HarmoDT-F"}
# flags the study sets itself for every run; passing them through would make runs disagree with their names
OWN_FLAGS = ("--method", "--seed", "--out", "--resume", "--no-resume", "--tasks", "--data", "--eval-episodes", "--preset",
             "--config")
FIGURES = ("methods.png", "eval_success_vs_steps.png", "harmony_vs_steps.png", "success_vs_sweep.png", "mask_jaccard.png",
           "mask_mds.png", "mask_changed_vs_steps.png")
BOOTSTRAP_SEED = 20240721
BOOTSTRAP_SAMPLES = 10_000


class StudyError(ValueError):
    """A bad study option or a run folder that disagrees with the study; printed as one line."""


# ---- statistics ----------------------------------------------------------------------------

def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t distribution (numerical integration of the density and bisection)."""
    if df < 1:
        raise ValueError("df must be at least 1")
    if not 0.0 < p < 1.0:
        raise ValueError("p must be in (0, 1)")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:  # 0.5 + integral of the density over [0, x], Simpson's rule
        n = 4000
        xs = np.linspace(0.0, x, n + 1)
        f = np.exp(log_c - (df + 1) / 2 * np.log1p(xs * xs / df))
        return 0.5 + (x / n / 3) * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return 0.5 * (lo + hi)


def t_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the t-interval of the mean of ``values``; one value gives (v, nan, nan)."""
    v = np.asarray(values, dtype=float)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, float("nan"), float("nan")
    half = t_quantile(0.5 + level / 2, len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return mean, mean - half, mean + half


def paired_bootstrap(diffs, level: float = 0.95, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean of paired differences
    (one per (seed, task) pair), resampling the pairs with replacement."""
    d = np.asarray(diffs, dtype=float).reshape(-1)
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(samples, len(d)))].mean(1)
    a = (1 - level) / 2
    return float(d.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def jaccard_matrix(masks: np.ndarray) -> np.ndarray:
    """``[T, T]`` Jaccard similarity |A & B| / |A | B| of the rows of a boolean ``[T, P]`` matrix."""
    m = np.asarray(masks, dtype=np.float64)
    inter = m @ m.T
    size = m.sum(1)
    union = size[:, None] + size[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def classical_mds(dist: np.ndarray, dims: int = 2) -> np.ndarray:
    """Classical (Torgerson) MDS: the ``[n, dims]`` coordinates whose distances best match ``dist``
    (double-centred squared distances, top eigenvectors scaled by the square roots of their eigenvalues)."""
    d2 = np.asarray(dist, dtype=np.float64) ** 2
    n = len(d2)
    j = np.eye(n) - np.ones((n, n)) / n
    b = -0.5 * j @ d2 @ j
    vals, vecs = np.linalg.eigh(b)
    order = np.argsort(vals)[::-1][:dims]
    coords = vecs[:, order] * np.sqrt(np.clip(vals[order], 0.0, None))
    if coords.shape[1] < dims:
        coords = np.pad(coords, ((0, 0), (0, dims - coords.shape[1])))
    return coords


# ---- the runs ------------------------------------------------------------------------------

def flag_for_key(key: str) -> str:
    """Training flag of a config key: ``masks.eta_max`` and ``eta_max`` -> ``--eta-max``."""
    return "--" + key.split(".")[-1].replace("_", "-")


def parse_sweep(text: str | None) -> tuple[str, list[str]] | None:
    if not text:
        return None
    if "=" not in text:
        raise StudyError(f"--sweep must be KEY=V1,V2,..., got {text!r}")
    key, values = text.split("=", 1)
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not key.strip() or not vals:
        raise StudyError(f"--sweep must be KEY=V1,V2,..., got {text!r}")
    if len(set(vals)) != len(vals):
        raise StudyError(f"--sweep lists a value twice: {text!r}")
    return key.strip(), vals


def run_name(method: str, seed: int, sweep: tuple[str, str] | None) -> str:
    if sweep is None:
        return f"{method}-s{seed}"
    key, value = sweep
    safe = re.sub(r"[^A-Za-z0-9.+-]", "_", f"{key.split('.')[-1]}{value}")
    return f"{method}-{safe}-s{seed}"


def variant_label(method: str, sweep: tuple[str, str] | None) -> str:
    label = METHOD_LABELS.get(method, method)
    return label if sweep is None else f"{label} {sweep[0].split('.')[-1]}={sweep[1]}"


class Run:
    """One (method, seed[, swept value]) of the study and its folder."""

    def __init__(self, study_dir: Path, method: str, seed: int, sweep: tuple[str, str] | None):
        self.method, self.seed, self.sweep = method, seed, sweep
        self.name = run_name(method, seed, sweep)
        self.variant = variant_label(method, sweep)
        self.dir = study_dir / "runs" / self.name
        self.eval_path = self.dir / "run_eval.json"
        self.record_path = self.dir / "study_run.json"

    def train_args(self, tasks: str, data: str, passthrough: list[str], threads: int | None, eval_episodes_in_training: int) -> list[str]:
        args = ["--tasks", tasks, "--data", data, "--method", self.method, "--seed", str(self.seed), "--out", str(self.dir),
                "--resume", "--eval-episodes", str(eval_episodes_in_training), "--no-progress", *passthrough]
        if self.sweep is not None:
            args += [flag_for_key(self.sweep[0]), self.sweep[1]]
        if threads and "--threads" not in passthrough:
            args += ["--threads", str(threads)]
        return args

    def record(self) -> dict:
        try:
            return json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return {}

    def write_record(self, rec: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=2))
        os.replace(tmp, self.record_path)

    def finished(self) -> bool:
        return self.eval_path.exists()


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class Study:
    def __init__(self, args: argparse.Namespace, passthrough: list[str], command: str):
        self.args = args
        self.passthrough = passthrough
        self.command = command
        self.out = Path(args.out)
        self.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        self.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        self.sweep = parse_sweep(args.sweep)
        self.sweep_methods = [m.strip() for m in (args.sweep_methods or "").split(",") if m.strip()] or list(self.methods)
        sweeps = [None] if self.sweep is None else [(self.sweep[0], v) for v in self.sweep[1]]
        # seed by seed (a study cut short has the same seeds of every variant): every method at the first swept
        # value, then the swept methods at the other values
        self.runs = [Run(self.out, m, s, sw if m in self.sweep_methods else None) for s in self.seeds
                     for i, sw in enumerate(sweeps) for m in self.methods if i == 0 or m in self.sweep_methods]
        self.data = args.data or str(self.out / "data")
        self.print_lock = threading.Lock()
        self.curve_episodes = args.curve_episodes if "--eval-every" in passthrough else 0
        self.threads = args.threads_per_run or max(1, (os.cpu_count() or 1) // max(1, args.workers))
        self.stopping = threading.Event()  # set on Ctrl-C / SIGTERM: no new run or evaluation starts
        self.children: set[subprocess.Popen] = set()

    def say(self, msg: str) -> None:
        with self.print_lock:
            print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # -- checks -----------------------------------------------------------------------------
    def check(self) -> None:
        from .config import METHODS, ConfigError, parse_args

        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise StudyError(f"--methods: unknown {', '.join(bad)} (choose from {', '.join(METHODS)})")
        if [m for m in self.sweep_methods if m not in self.methods]:
            raise StudyError("--sweep-methods must be a subset of --methods")
        if not self.methods or not self.seeds:
            raise StudyError("need at least one method and one seed")
        if len(set(self.methods)) != len(self.methods) or len(set(self.seeds)) != len(self.seeds):
            raise StudyError("--methods and --seeds must not repeat an entry")
        if self.args.eval_episodes < 1:
            raise StudyError("--eval-episodes must be at least 1")
        for flag in self.passthrough:
            if flag.split("=")[0] in OWN_FLAGS:
                raise StudyError(f"{flag.split('=')[0]} is set by the study for every run; use the study's own option")
        if self.sweep is not None and flag_for_key(self.sweep[0]) in self.passthrough:
            raise StudyError(f"--sweep {self.sweep[0]} and {flag_for_key(self.sweep[0])} both given")
        for run in self.runs:  # every run's flags must parse (unknown flags, bad values): fail before any run starts
            try:
                parse_args(run.train_args(self.args.tasks, self.data, self.passthrough, self.threads, self.curve_episodes))
            except ConfigError as exc:
                raise StudyError(f"run {run.name}: {exc}") from None
            except SystemExit:
                raise StudyError(f"run {run.name}: the trainer rejected its flags (see above)") from None
            rec = run.record()
            want = run.train_args(self.args.tasks, self.data, self.passthrough, None, self.curve_episodes)
            if rec.get("train_args") and _without_threads(rec["train_args"]) != _without_threads(want) and not self.args.report_only:
                raise StudyError(f"{run.dir} was made with other flags ({shlex.join(rec['train_args'])}); "
                                 f"use another --out or delete that folder")

    # -- data -------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.args.data:
            if not Path(self.args.data).exists():
                raise StudyError(f"--data {self.args.data} does not exist")
            return
        from .train import _current_cache

        if _current_cache(Path(self.data)):
            return
        cmd = [sys.executable, "-m", "harmodt.data", "generate", "--tasks", self.args.tasks, "--episodes", str(self.args.gen_episodes),
               "--out", self.data, "--seed", str(self.args.data_seed), "--workers", str(max(1, self.args.workers * self.threads)),
               "--no-progress"]
        self.say(f"generating the shared dataset: {shlex.join(cmd[1:])}")
        t = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "data_generate.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise StudyError(f"data generation failed (exit {rc}):\n{_tail(self.out / 'data_generate.log')}")
        self.say(f"dataset ready in {time.perf_counter() - t:.0f} s")

    # -- one run ----------------------------------------------------------------------------
    def execute(self, run: Run, index: int) -> bool:
        total = len(self.runs)
        if run.finished():
            self.say(f"skip  {run.name} ({index}/{total}): already evaluated")
            return True
        if self.stopping.is_set():
            return False
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        rec = run.record()
        train_args = run.train_args(self.args.tasks, self.data, self.passthrough, self.threads, self.curve_episodes)
        rec.setdefault("train_seconds", 0.0)
        rec.setdefault("eval_seconds", 0.0)
        rec.update(name=run.name, method=run.method, seed=run.seed, sweep=None if run.sweep is None else list(run.sweep),
                   train_args=run.train_args(self.args.tasks, self.data, self.passthrough, None, self.curve_episodes))
        run.write_record(rec)
        self.say(f"start {run.name} ({index}/{total})")
        t_run = time.perf_counter()
        if not (run.dir / "results.json").exists():  # the trainer writes results.json once its last step is saved
            t = time.perf_counter()
            with open(run.dir / "train.log", "a") as log:
                log.write(f"$ python -m harmodt.train {shlex.join(train_args)}\n")
                log.flush()
                rc = self.child([sys.executable, "-m", "harmodt.train", *train_args], log, env)
            rec["train_seconds"] += time.perf_counter() - t
            run.write_record(rec)
            if rc != 0:
                self.say(f"FAIL  {run.name}: training exited {rc}\n{_tail(run.dir / 'train.log')}")
                return False
        if self.stopping.is_set():
            return False
        t = time.perf_counter()
        eval_args = [str(run.dir / "checkpoint.pt"), "--episodes", str(self.args.eval_episodes), "--seed", str(self.args.eval_seed),
                     "--out", str(run.eval_path) + ".tmp", "--no-progress"]
        with open(run.dir / "eval.log", "a") as log:
            log.write(f"$ python -m harmodt.evaluate {shlex.join(eval_args)}\n")
            log.flush()
            rc = self.child([sys.executable, "-m", "harmodt.evaluate", *eval_args], log, env)
        rec["eval_seconds"] += time.perf_counter() - t
        run.write_record(rec)
        if rc != 0:
            self.say(f"FAIL  {run.name}: evaluation exited {rc}\n{_tail(run.dir / 'eval.log')}")
            return False
        os.replace(str(run.eval_path) + ".tmp", run.eval_path)
        res = json.loads(run.eval_path.read_text())
        self.say(f"done  {run.name} ({index}/{total}) in {time.perf_counter() - t_run:.0f} s "
                 f"(train {rec['train_seconds']:.0f} s, eval {rec['eval_seconds']:.0f} s): mean success {res['mean_success']:.3f}")
        return True

    def child(self, cmd: list[str], log, env: dict) -> int:
        """Run one trainer or evaluator process to its end; its exit status."""
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=os.setsid)  # own process group: Ctrl-C reaches it once, from stop_children
        with self.print_lock:
            self.children.add(proc)
        try:
            return proc.wait()
        finally:
            with self.print_lock:
                self.children.discard(proc)

    def stop_children(self) -> None:
        """Ask every running trainer / evaluator to stop (a trainer saves its checkpoint at its next
        step) and wait for them; kill any still running after 120 s."""
        import signal

        self.stopping.set()
        with self.print_lock:
            procs = list(self.children)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        deadline = time.time() + 120
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()

    def run_all(self) -> bool:
        self.out.mkdir(parents=True, exist_ok=True)
        self.prepare_data()
        (self.out / "command.txt").write_text(self.command + "\n")
        self.say(f"{len(self.runs)} runs, {self.args.workers} at a time, {self.threads} thread(s) each; out {self.out}")
        t = time.perf_counter()
        import signal

        def on_term(signum, frame):
            raise KeyboardInterrupt

        old = signal.signal(signal.SIGTERM, on_term)
        pool = ThreadPoolExecutor(self.args.workers)
        try:
            futures = [pool.submit(self.execute, r, i + 1) for i, r in enumerate(self.runs)]
            ok = [f.result() for f in futures]
        except KeyboardInterrupt:
            self.stop_children()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            signal.signal(signal.SIGTERM, old)
        pool.shutdown()
        self.say(f"runs done in {time.perf_counter() - t:.0f} s: {sum(ok)} of {len(ok)} evaluated")
        return all(ok)

    # -- aggregation ------------------------------------------------------------------------
    def collect(self) -> dict:
        from .tasks import parse_tasks

        tasks = parse_tasks(self.args.tasks)
        runs = []
        for run in self.runs:
            rec = run.record()
            entry = {"name": run.name, "method": run.method, "seed": run.seed, "variant": run.variant,
                     "sweep": None if run.sweep is None else {"key": run.sweep[0], "value": run.sweep[1]},
                     "status": "finished" if run.finished() else "missing",
                     "train_seconds": rec.get("train_seconds"), "eval_seconds": rec.get("eval_seconds"),
                     "train_command": None if not rec.get("train_args") else "python -m harmodt.train " + shlex.join(rec["train_args"])}
            cfg_path = run.dir / "config.json"
            if cfg_path.exists():
                entry["config"] = json.loads(cfg_path.read_text())
            if run.finished():
                res = json.loads(run.eval_path.read_text())
                entry["tasks"] = res["tasks"]
                entry["mean_success"] = res["mean_success"]
                entry["mean_return"] = float(np.mean([r["return"] for r in res["tasks"].values()]))
                entry["steps"] = res.get("steps")
                entry["final"] = {"mean_success": res["mean_success"], "step": res.get("steps"),
                                  "episodes": self.args.eval_episodes, "eval_seed": self.args.eval_seed}
                best = _trainer_best(run.dir)
                if best is not None:
                    entry["best"] = best
                metrics = _metrics(run.dir)
                changed = [r for r in metrics if "mask_changed_fraction" in r]
                if changed:
                    entry["final_mask_changed_fraction"] = float(np.mean(changed[-1]["mask_changed_fraction"]))
                harmony = [r for r in metrics if "harmony_score" in r]
                if harmony:
                    entry["final_harmony_score"] = float(harmony[-1]["harmony_score"])
                flips = [r for r in metrics if "masked_per_task" in r]
                if flips:
                    entry["weights_flipped_per_task"] = float(np.mean([np.mean(r["masked_per_task"]) for r in flips]) * len(flips))
            runs.append(entry)
        return {"command": self.command, "tasks": tasks, "methods": self.methods, "seeds": self.seeds,
                "sweep": None if self.sweep is None else {"key": self.sweep[0], "values": self.sweep[1], "methods": self.sweep_methods},
                "eval_episodes": self.args.eval_episodes, "eval_seed": self.args.eval_seed, "data": self.data,
                "passthrough": self.passthrough, "bootstrap": {"seed": BOOTSTRAP_SEED, "samples": BOOTSTRAP_SAMPLES},
                "complete": all(r["status"] == "finished" for r in runs), "runs": runs}

    def report(self) -> dict:
        study = self.collect()
        study["variants"] = aggregate(study)
        study["pairwise"] = pairwise(study)
        self.out.mkdir(parents=True, exist_ok=True)
        figures = draw_figures(study, self.out, say=self.say)
        (self.out / "study.json").write_text(json.dumps(study, indent=2))
        (self.out / "summary.md").write_text(summary_markdown(study, [f.name for f in figures]))
        self.say(f"wrote {self.out / 'study.json'}, {self.out / 'summary.md'} and {self.out / 'figures'}")
        return study


def _without_threads(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--threads":
            skip = True
            continue
        out.append(a)
    return out


def _trainer_best(run_dir: Path) -> dict | None:
    """The best of the trainer's evaluations (results.json's ``best``: step, mean success, number of
    evaluations, per-task success) with their episodes per task, or None without one."""
    try:
        res = json.loads((run_dir / "results.json").read_text())
        cfg = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    best = res.get("best")
    if not best:
        return None
    return {"mean_success": best["mean_success"], "step": best["step"], "evaluations": best.get("evaluations"),
            "episodes": cfg.get("eval_episodes"), "tasks": {t: {"success": r["success"]} for t, r in best["tasks"].items()}}


def _metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl records; a step a resumed run logged twice keeps its last record per key set."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    seen = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        seen[(rec.get("step"), tuple(sorted(rec)))] = rec
    return sorted(seen.values(), key=lambda r: r.get("step", 0))


def aggregate(study: dict) -> list[dict]:
    """Per variant (method[, swept value]): the t-interval of the per-seed means and the paired
    bootstrap difference from the reference variant (Prompt-DT at the same swept value when the
    study has it, else the same method at the first swept value)."""
    finished = [r for r in study["runs"] if r["status"] == "finished"]
    order = []
    for r in study["runs"]:
        if r["variant"] not in order:
            order.append(r["variant"])
    by_variant = {v: [r for r in finished if r["variant"] == v] for v in order}
    first_value = None if study["sweep"] is None else study["sweep"]["values"][0]
    out = []
    for v in order:
        rows = by_variant[v]
        proto = next(r for r in study["runs"] if r["variant"] == v)
        entry = {"variant": v, "method": proto["method"], "sweep_value": None if proto["sweep"] is None else proto["sweep"]["value"],
                 "seeds_finished": [r["seed"] for r in rows], "seeds_planned": [r["seed"] for r in study["runs"] if r["variant"] == v]}
        if rows:
            m, lo, hi = t_interval([r["mean_success"] for r in rows])
            entry.update(mean_success=m, ci_low=lo, ci_high=hi, per_seed={str(r["seed"]): r["mean_success"] for r in rows},
                         per_task={t: float(np.mean([r["tasks"][t]["success"] for r in rows])) for t in study["tasks"]},
                         per_task_return={t: float(np.mean([r["tasks"][t]["return"] for r in rows])) for t in study["tasks"]},
                         train_seconds=float(np.mean([r["train_seconds"] or 0 for r in rows])))
            bests = [r["best"] for r in rows if r.get("best")]
            if bests:  # the trainer's best evaluation of each seed (reported beside the final; never ranked on)
                bm, blo, bhi = t_interval([b["mean_success"] for b in bests])
                entry["best"] = {"mean_success": bm, "ci_low": blo, "ci_high": bhi, "seeds": len(bests),
                                 "per_seed": {str(r["seed"]): {"mean_success": r["best"]["mean_success"], "step": r["best"]["step"]}
                                              for r in rows if r.get("best")},
                                 "episodes": bests[0]["episodes"]}
            for key in ("final_mask_changed_fraction", "final_harmony_score", "weights_flipped_per_task"):
                vals = [r[key] for r in rows if key in r]
                if vals:
                    entry[key] = float(np.mean(vals))
        ref = None
        if "prompt-dt" in study["methods"]:  # Prompt-DT at the same swept value, else the unswept Prompt-DT
            pds = [w for w in order if by_variant[w] and by_variant[w][0]["method"] == "prompt-dt"]
            ref = next((w for w in pds if (by_variant[w][0]["sweep"] or {}).get("value") == entry["sweep_value"]),
                       next((w for w in pds if by_variant[w][0]["sweep"] is None), None))
        elif first_value is not None and entry["sweep_value"] != first_value:
            ref = next((w for w in order if by_variant[w] and by_variant[w][0]["method"] == entry["method"]
                        and by_variant[w][0]["sweep"]["value"] == first_value), None)
        if ref is not None and ref != v and rows:
            entry["paired"] = _paired(rows, by_variant[ref], study["tasks"], ref)
        if "paired" in entry and entry["paired"] is None:
            del entry["paired"]
        if first_value is not None and entry["sweep_value"] not in (None, first_value) and rows:
            # a swept value against the same method at the first value
            sref = next((w for w in order if by_variant[w] and by_variant[w][0]["method"] == entry["method"]
                         and (by_variant[w][0]["sweep"] or {}).get("value") == first_value), None)
            if sref is not None and (p := _paired(rows, by_variant[sref], study["tasks"], sref)):
                entry["paired_sweep"] = p
        out.append(entry)
    return out


def pairwise(study: dict) -> dict:
    """``{row variant: {column variant: paired difference}}``: row minus column success over the (seed, task)
    pairs both have, with its bootstrap interval, for every two variants with evaluated runs."""
    finished = [r for r in study["runs"] if r["status"] == "finished"]
    names = list(dict.fromkeys(r["variant"] for r in finished))
    rows = {v: [r for r in finished if r["variant"] == v] for v in names}
    return {a: {b: p for b in names if b != a and (p := _paired(rows[a], rows[b], study["tasks"], b))} for a in names}


def _paired(rows: list[dict], ref_rows: list[dict], tasks: list[str], ref: str) -> dict | None:
    """Paired bootstrap of per-(seed, task) success differences from ``ref_rows`` (seeds both have)."""
    base = {r["seed"]: r for r in ref_rows}
    diffs = [r["tasks"][t]["success"] - base[r["seed"]]["tasks"][t]["success"] for r in rows if r["seed"] in base for t in tasks]
    if not diffs:
        return None
    d, lo, hi = paired_bootstrap(diffs)
    return {"reference": ref, "mean_diff": d, "ci_low": lo, "ci_high": hi, "pairs": len(diffs)}


def _fmt(x, nd=3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def summary_markdown(study: dict, figures: list[str] = ()) -> str:
    variants = study["variants"]
    runs = study["runs"]
    n_done = sum(r["status"] == "finished" for r in runs)
    lines = [f"# Study: {', '.join(METHOD_LABELS.get(m, m) for m in study['methods'])} on {len(study['tasks'])} tasks", ""]
    if not study["complete"]:
        missing = [r["name"] for r in runs if r["status"] != "finished"]
        lines += [f"**Partial: {n_done} of {len(runs)} runs evaluated.** Missing: {', '.join(missing)}.", ""]
    cfg = next((r["config"] for r in runs if r.get("config")), None)
    if cfg:
        mc, mk = cfg["model"], cfg["masks"]
        lines += [f"Budget: {cfg['steps']} steps at batch {cfg['batch_size']}, {mc['n_layer']} layers x {mc['n_embd']} "
                  f"({mc['n_head']} heads), lr {cfg['lr']}, warm-up {cfg['warmup_steps']}, {cfg['quality']} data; masks: "
                  f"sparsity {mk['sparsity']}, t_m {mk['update_every']}, eta_max {mk['eta_max']}"
                  + ("" if study["sweep"] is None else f" (swept: {study['sweep']['key']} = {', '.join(study['sweep']['values'])}"
                     f" for {', '.join(study['sweep'].get('methods') or study['methods'])})") + ". "
                  f"Evaluation: {study['eval_episodes']} episodes per task, seed {study['eval_seed']} for every run.", ""]
    with_best = any("best" in v for v in variants)
    lines += ["## Mean success over tasks", "",
              "Final: the study's evaluation of each run's final checkpoint; mean over seeds of each run's mean success over tasks, "
              "95 % t-interval over the per-seed means. "
              "Δ: paired difference from the reference, mean over (seed, task) pairs, 95 % percentile bootstrap interval "
              f"({study['bootstrap']['samples']} resamples, seed {study['bootstrap']['seed']})."
              + (" Best during training: per seed the highest mean success among the trainer's own evaluations "
                 "(every --eval-every steps and at the end, with fewer episodes), as the official code reports; "
                 "mean over seeds. It is reported, not ranked on." if with_best else ""), "",
              "| method | seeds | final mean success | 95 % CI | per seed | Δ vs reference | 95 % CI of Δ |"
              + (" best during training | its 95 % CI | per seed (step) |" if with_best else ""),
              "|---|---|---|---|---|---|---|" + ("---|---|---|" if with_best else "")]
    for v in variants:
        seeds = f"{len(v['seeds_finished'])}/{len(v['seeds_planned'])}"
        if "mean_success" not in v:
            lines.append(f"| {v['variant']} | {seeds} | – | – | – | – | – |" + (" – | – | – |" if with_best else ""))
            continue
        per_seed = ", ".join(f"{x:.2f}" for x in v["per_seed"].values())
        p = v.get("paired")
        delta = f"{p['mean_diff']:+.3f} (vs {p['reference']})" if p else "–"
        dci = f"[{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]" if p else "–"
        row = (f"| {v['variant']} | {seeds} | {v['mean_success']:.3f} | [{_fmt(v['ci_low'])}, {_fmt(v['ci_high'])}] | "
               f"{per_seed} | {delta} | {dci} |")
        if with_best:
            b = v.get("best")
            row += (" – | – | – |" if b is None else
                    f" {b['mean_success']:.3f} | [{_fmt(b['ci_low'])}, {_fmt(b['ci_high'])}] | "
                    + ", ".join(f"{x['mean_success']:.2f} ({x['step']})" for x in b["per_seed"].values()) + " |")
        lines.append(row)
    ranked = sorted((v for v in variants if "mean_success" in v), key=lambda v: -v["mean_success"])
    if len(ranked) > 1:
        order = f"{ranked[0]['variant']} ({ranked[0]['mean_success']:.3f})"
        for prev, v in zip(ranked, ranked[1:]):
            order += f" {'=' if v['mean_success'] == prev['mean_success'] else '>'} {v['variant']} ({v['mean_success']:.3f})"
        lines += ["", f"Ranking by final mean success: {order}."]
    done = [v for v in variants if "per_task" in v]
    if done:
        lines += ["", "## Success per task", "", "Mean over the finished seeds.", "",
                  "| task | " + " | ".join(v["variant"] for v in done) + " |", "|---|" + "---|" * len(done)]
        for t in study["tasks"]:
            lines.append(f"| {t} | " + " | ".join(f"{v['per_task'][t]:.2f}" for v in done) + " |")
        lines.append("| **mean** | " + " | ".join(f"**{v['mean_success']:.3f}**" for v in done) + " |")
    pw = study.get("pairwise") or {}
    if len(pw) > 2:
        names = list(pw)
        lines += ["", "## Every pair of methods", "",
                  "Row minus column: mean success difference over the (seed, task) pairs both have, and its 95 % bootstrap "
                  "interval; **bold** where the interval excludes 0.", "",
                  "| row − column | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for a in names:
            cells = []
            for b in names:
                p = pw[a].get(b)
                if p is None:
                    cells.append("–")
                    continue
                txt = f"{p['mean_diff']:+.3f} [{p['ci_low']:+.2f}, {p['ci_high']:+.2f}]"
                cells.append(f"**{txt}**" if p["ci_low"] > 0 or p["ci_high"] < 0 else txt)
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    swept = [v for v in done if "paired_sweep" in v]
    if swept:
        key = study["sweep"]["key"]
        lines += ["", f"## {key}: each value against the first", "",
                  f"Paired difference from the same method at {key}={study['sweep']['values'][0]} over (seed, task) pairs, "
                  "95 % bootstrap interval.", "", "| method | Δ success | 95 % CI | pairs |", "|---|---|---|---|"]
        for v in swept:
            p = v["paired_sweep"]
            lines.append(f"| {v['variant']} | {p['mean_diff']:+.3f} | [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}] | {p['pairs']} |")
    masked = [v for v in done if "final_mask_changed_fraction" in v or "final_harmony_score" in v]
    if masked:
        lines += ["", "## Masks and harmony", "",
                  "Final averaged harmony score (Definition 3.2, at the last mask update); fraction of each task's active "
                  "weights not active in its initial ERK mask at the last update (mean over tasks and seeds); weights the "
                  "updates switched off per task over the run.", "",
                  "| method | harmony score | mask changed fraction | weights switched per task | train s per run |", "|---|---|---|---|---|"]
        for v in masked:
            lines.append(f"| {v['variant']} | {_fmt(v.get('final_harmony_score'))} | {_fmt(v.get('final_mask_changed_fraction'), 5)} | "
                         f"{_fmt(v.get('weights_flipped_per_task'), 0)} | {v['train_seconds']:.0f} |")
    if figures:
        lines += ["", "## Figures", ""] + [f"![{Path(f).stem}](figures/{f})" for f in figures]
    lines += ["", "## Command", "", "```", study["command"], "```", ""]
    return "\n".join(lines)


# ---- figures -------------------------------------------------------------------------------

def _final_masks(ck_path: Path, tasks: list[str]) -> np.ndarray | None:
    """Boolean ``[T, P]``: every task's final mask over all masked weights (name order), or None."""
    import torch

    if not ck_path.exists():
        return None
    try:
        ck = torch.load(ck_path, map_location="cpu", weights_only=True)
    except Exception:  # a checkpoint with non-tensor state (RNG states): the study wrote it, so it may be unpickled
        ck = torch.load(ck_path, map_location="cpu", weights_only=False)
    masks = ck.get("masks")
    if not masks:
        return None
    names = sorted(masks[tasks[0]])
    return np.stack([np.concatenate([masks[t][n].numpy().reshape(-1) for n in names]) for t in tasks]).astype(bool)


def draw_figures(study: dict, out: Path, say=print) -> list[Path]:
    """Draw every figure whose data exist into ``out/figures`` (run folders under ``out/runs``); print a note for the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:  # a figure whose data are gone (or not there yet) is not left from an earlier report
        (fig_dir / name).unlink(missing_ok=True)
    written = []
    variants = [v for v in study["variants"] if "mean_success" in v]
    run_dir = {r["name"]: out / "runs" / r["name"] for r in study["runs"]}
    finished = [r for r in study["runs"] if r["status"] == "finished"]
    metrics = {r["name"]: _metrics(run_dir[r["name"]]) for r in finished}
    colors = {v["variant"]: plt.cm.tab10(i % 10) for i, v in enumerate(study["variants"])}
    n_tasks = len(study["tasks"])

    def save(fig, name):
        fig.tight_layout()
        path = fig_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    def series(variant: str, key: str, reduce=None):
        """{run name: [(step, value)]} of one metrics key for the variant's finished runs."""
        res = {}
        for r in finished:
            if r["variant"] != variant:
                continue
            pts = [(m["step"], reduce(m[key]) if reduce else m[key]) for m in metrics[r["name"]] if key in m]
            if pts:
                res[r["name"]] = pts
        return res

    def mean_curve(curves: dict):
        steps = sorted(set.intersection(*[{s for s, _ in c} for c in curves.values()]))
        return steps, [float(np.mean([dict(c)[s] for c in curves.values()])) for s in steps]

    # 1. method bars with CIs (Tables 1-2)
    if variants:
        fig, ax = plt.subplots(figsize=(max(5.5, 1.2 * len(variants) + 1.5), 3.8))
        xs = np.arange(len(variants))
        means = [v["mean_success"] for v in variants]
        err = [[v["mean_success"] - v["ci_low"] if not math.isnan(v["ci_low"]) else 0 for v in variants],
               [v["ci_high"] - v["mean_success"] if not math.isnan(v["ci_high"]) else 0 for v in variants]]
        ax.bar(xs, means, yerr=err, capsize=5, color=[colors[v["variant"]] for v in variants], alpha=0.8)
        for x, v in zip(xs, variants):
            seeds = list(v["per_seed"].values())
            ax.scatter([x] * len(seeds), seeds, color="k", s=12, zorder=3)
        ax.set_xticks(xs, [v["variant"].replace(" ", "\n", 1) for v in variants], fontsize=8)
        ax.set_ylabel("mean success over tasks")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"Mean success on {n_tasks} tasks\n(bars: mean and 95 % CI over seeds; dots: seeds)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        save(fig, "methods.png")
    else:
        say("figure methods.png skipped: no run has been evaluated")

    # 2. evaluation success against steps (--eval-every)
    curves = {v["variant"]: series(v["variant"], "eval_mean_success") for v in variants}
    curves = {k: c for k, c in curves.items() if c}
    if curves:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for name, c in curves.items():
            for pts in c.values():
                ax.plot(*zip(*pts), color=colors[name], alpha=0.25, lw=0.8)
            steps, mean = mean_curve(c)
            if steps:
                ax.plot(steps, mean, color=colors[name], lw=2, marker="o", ms=3, label=name)
        ax.set_xlabel("training step")
        ax.set_ylabel("evaluation success (in training)")
        ax.set_title("Evaluation success during training (thin: seeds; thick: mean)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save(fig, "eval_success_vs_steps.png")
    else:
        say("figure eval_success_vs_steps.png skipped: no run logged eval_mean_success during training (pass --eval-every)")

    # 3. averaged harmony score against steps (Figure 2a)
    harm = {v["variant"]: series(v["variant"], "harmony_score") for v in variants}
    harm = {k: c for k, c in harm.items() if c}
    if harm:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for name, c in harm.items():
            steps, mean = mean_curve(c)
            if steps:
                ax.plot(steps, mean, color=colors[name], lw=2, marker="o", ms=3, label=name)
        ax.set_xlabel("training step")
        ax.set_ylabel("averaged harmony score (Def. 3.2)")
        ax.set_title(f"Harmony of the task gradients on {n_tasks} tasks (mean over seeds)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save(fig, "harmony_vs_steps.png")
    else:
        say("figure harmony_vs_steps.png skipped: no run logged harmony_score (no mask update happened)")

    # 4. success against the swept value (Figure 2b)
    if study["sweep"] is not None and any(v["sweep_value"] is not None for v in variants):
        key = study["sweep"]["key"]
        values = study["sweep"]["values"]
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        try:
            xv = [float(v) for v in values]
            numeric = True
        except ValueError:
            xv, numeric = list(range(len(values))), False
        for method in study["methods"]:
            pts = [(x, v) for x, val in zip(xv, values) for v in variants if v["method"] == method and v["sweep_value"] == val]
            if not pts:
                continue
            x = [p[0] for p in pts]
            y = [p[1]["mean_success"] for p in pts]
            lo = [p[1]["mean_success"] - p[1]["ci_low"] if not math.isnan(p[1]["ci_low"]) else 0 for p in pts]
            hi = [p[1]["ci_high"] - p[1]["mean_success"] if not math.isnan(p[1]["ci_high"]) else 0 for p in pts]
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=4, label=METHOD_LABELS.get(method, method))
        for v in variants:  # methods the sweep left out: a level line at their mean
            if v["sweep_value"] is None:
                ax.axhline(v["mean_success"], ls="--", lw=1, color=colors[v["variant"]], label=f"{v['variant']} (not swept, mean)")
        if numeric and min(xv) > 0 and max(xv) / min(xv) >= 20:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(xv, values)
        ax.set_xlabel(key)
        ax.set_ylabel("mean success over tasks")
        ax.set_title(f"Success against {key} (mean and 95 % CI over seeds)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save(fig, "success_vs_sweep.png")
    else:
        say("figure success_vs_sweep.png skipped: the study has no --sweep" if study["sweep"] is None
            else "figure success_vs_sweep.png skipped: no run of a swept value has been evaluated")

    # 5. task x task Jaccard similarity of the final masks, and their 2-D MDS embedding (Figure 5)
    masked = []
    for v in variants:
        mats = []
        for r in finished:
            if r["variant"] == v["variant"]:
                m = _final_masks(run_dir[r["name"]] / "checkpoint.pt", study["tasks"])
                if m is not None:
                    mats.append(jaccard_matrix(m))
        if mats:
            masked.append((v["variant"], np.mean(mats, 0), len(mats)))
    if masked:
        short = [t.replace("-v3", "") for t in study["tasks"]]
        fig, axes = plt.subplots(1, len(masked), figsize=(4.6 * len(masked), 4.4), squeeze=False)
        for ax, (name, jac, n) in zip(axes[0], masked):
            off = jac[~np.eye(len(jac), dtype=bool)]
            im = ax.imshow(jac, vmin=off.min() if off.size else 0, vmax=off.max() if off.size else 1, cmap="viridis")
            ax.set_xticks(range(len(short)), short, rotation=90, fontsize=6)
            ax.set_yticks(range(len(short)), short, fontsize=6)
            ax.set_title(f"{name} (mean of {n} seed{'s' if n > 1 else ''})", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046, label="Jaccard")
        fig.suptitle("Jaccard similarity of the tasks' final masks", fontsize=10)
        save(fig, "mask_jaccard.png")
        fig, axes = plt.subplots(1, len(masked), figsize=(4.4 * len(masked), 4.0), squeeze=False)
        for ax, (name, jac, n) in zip(axes[0], masked):
            xy = classical_mds(1.0 - jac)
            ax.scatter(xy[:, 0], xy[:, 1], c=range(len(short)), cmap="tab10" if len(short) <= 10 else "viridis")
            for (x, y), s in zip(xy, short):
                ax.annotate(s, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
            ax.set_xlabel("MDS 1")
            ax.set_ylabel("MDS 2")
            ax.set_title(f"{name}", fontsize=8)
            ax.grid(alpha=0.3)
        fig.suptitle("Tasks' final masks in 2-D (classical MDS of 1 - Jaccard)", fontsize=10)
        save(fig, "mask_mds.png")
    else:
        say("figures mask_jaccard.png and mask_mds.png skipped: no evaluated run has masks")

    # 6. fraction of each task's mask changed since initialisation, against steps
    changed = {v["variant"]: series(v["variant"], "mask_changed_fraction") for v in variants}
    changed = {k: c for k, c in changed.items() if c}
    if changed:
        fig, axes = plt.subplots(1, len(changed), figsize=(4.6 * len(changed), 3.8), squeeze=False)
        for ax, (name, c) in zip(axes[0], changed.items()):
            steps = sorted(set.intersection(*[{s for s, _ in pts} for pts in c.values()]))
            per = np.array([[np.asarray(dict(pts)[s]) for s in steps] for pts in c.values()]).mean(0)  # (steps, tasks)
            for i, t in enumerate(study["tasks"]):
                ax.plot(steps, per[:, i] * 100, lw=1.2, label=t.replace("-v3", ""))
            ax.set_xlabel("training step")
            ax.set_ylabel("% of the task's mask changed since init")
            ax.set_title(f"{name} (mean of {len(c)} seed{'s' if len(c) > 1 else ''})", fontsize=8)
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=6, ncol=2)
        fig.suptitle("Mask movement since the ERK initialisation", fontsize=10)
        save(fig, "mask_changed_vs_steps.png")
    else:
        say("figure mask_changed_vs_steps.png skipped: no run logged mask_changed_fraction (HarmoDT-M/F with a mask update)")
    return written


# ---- CLI -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m harmodt.study", allow_abbrev=False,
        description="Train and evaluate every (method, seed[, swept value]) on one dataset; write study.json, summary.md "
                    "and figures. Flags not listed here are passed to every `python -m harmodt.train` run.")
    p.add_argument("--tasks", default="MT10",
                   help="comma list of task names and sets: MT5, MT10, MT30, MT50, ML10-train/test, ML45-train/test, "
                        "ML1-<task>-train/test[slice] (goal variations), v3 task names, TASK@gN, TASK@testN (README: Task names; default MT10)")
    p.add_argument("--methods", default="mtdt,prompt-dt,harmodt-r,harmodt-m,harmodt-f", help="comma list of methods")
    p.add_argument("--seeds", default="0,1,2", help="comma list of training seeds")
    p.add_argument("--out", required=True, help="study folder (runs/, data/, study.json, summary.md, figures/)")
    p.add_argument("--workers", type=int, default=1, help="runs trained at the same time (default 1)")
    p.add_argument("--threads-per-run", type=int, default=0, help="torch threads per run (default: cores / workers)")
    p.add_argument("--sweep", default=None, help="KEY=V1,V2,...: run the grid over a config key (e.g. masks.eta_max=100,2000)")
    p.add_argument("--sweep-methods", default="", help="comma list: the methods the sweep applies to (default all); "
                   "the others run once with their default value")
    p.add_argument("--eval-episodes", type=int, default=20, help="evaluation episodes per task for every final checkpoint (default 20)")
    p.add_argument("--eval-seed", type=int, default=12345, help="evaluation seed shared by all runs: the same goals (default 12345)")
    p.add_argument("--curve-episodes", type=int, default=3,
                   help="episodes per task of the trainer's own evaluations when --eval-every is passed (default 3)")
    p.add_argument("--data", default="", help="dataset folder shared by all runs (default: generate one into OUT/data)")
    p.add_argument("--gen-episodes", type=int, default=100, help="episodes per task when the study generates the data (default 100)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generated data (default 0)")
    p.add_argument("--report-only", action="store_true", help="start no run: aggregate the finished ones and draw the figures")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, passthrough = build_parser().parse_known_args(argv)
    command = "python -m harmodt.study " + shlex.join(argv)
    try:
        if args.workers < 1:
            raise StudyError("--workers must be at least 1")
        study = Study(args, passthrough, command)
        study.check()
        ok = True
        if not args.report_only:
            ok = study.run_all()
        elif (study.out / "command.txt").exists():
            study.command = (study.out / "command.txt").read_text().strip()
        study.report()
        return 0 if ok else 1
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n[study] interrupted: finished runs are kept; rerun the same command to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
