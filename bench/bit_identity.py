"""Bit identity of training between two trees: every method, on the reference path and ``--fused``
with the ``cpu`` backend, trained briefly in a baseline revision and in a candidate tree, and the
results compared bit for bit.

    OMP_NUM_THREADS=1 python -m bench.bit_identity                  # main against this checkout
    OMP_NUM_THREADS=1 python -m bench.bit_identity --baseline e06ca74 --methods harmodt-f

The baseline is checked out as a temporary ``git worktree`` (removed afterwards); the candidate is a
directory (default: the checkout holding this script) or a revision, checked out the same way. Each
tree runs in its own subprocess (``PYTHONPATH`` the tree plus its pytest.ini ``pythonpath``, cwd the
tree, ``OMP_NUM_THREADS=1``), which must import ``harmodt`` and ``harmodt_kernels`` from that tree and
runs its trainings one after another through ``python -m harmodt.train``'s entry (``runpy``), so the
imports are paid once; the two trees' processes run side by side. ``--isolate`` starts one process
per training instead (the same results, about three times slower).
A tree whose kernel package has no ``_lib/libharmodt_kernels.so`` gets a copy of another tree's when
their C++ sources are byte for byte the same and their CMakeLists.txt the same but for comments and
where the library goes, else it is built (``python setup.py
build_ext --inplace``, minutes). The methods are the baseline's table (``harmodt.methods.METHODS``).

Every run trains on the same tiny synthetic data (written once, by tests/_data_folders.py), a 1-layer
width-16 model, 20 steps with a mask update at step 10 and a checkpoint at the end. Compared, in this
order: every record of metrics.jsonl (its numbers; keys ending in ``_s`` are timings and skipped),
then the checkpoint (``torch.load(weights_only=True)``): model weights, masks, optimizer state, RNG
state, then its other entries (config paths and the metrics file's byte size are skipped, see
``--ignore``). Tensors must have the same dtype, shape and bits (floats compared as their integer
bit patterns, so -0.0 differs from 0.0 and equal NaNs are equal); Python floats likewise.

The negative control trains one pair again with a perturbation in the candidate's run only (its
learning rate 1e-6 larger, relatively) and requires the comparison to find it in what the run
computed (the learning rate's own entries are skipped for it: losses, weights, optimizer state); the
default run includes it, so a pass also shows that the check can fail.

Exit status: 0 all identical and the control detected; 1 a difference, a failed run, or an
undetected control; 2 a usage error (bad flag, unknown revision or method).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.bit_compare import DEFAULT_IGNORE, compare_runs
from bench.bit_trees import (LIB_NAME, TASKS, SetupError, Tree, UsageError, add_worktree, git, last_line, probe,
                              provide_native_lib, remove_worktree, resolve_revision, tree_env, write_data)

REPO = Path(__file__).resolve().parents[1]
STEPS, UPDATE_EVERY = 20, 10
TRAIN_FLAGS = ("--tasks", ",".join(TASKS), "--steps", str(STEPS), "--batch-size", "4", "--warmup-steps", "2",
               "--lr", "0.001", "--seed", "0", "--eval-episodes", "0", "--log-every", "2",
               "--checkpoint-every", str(STEPS), "--update-every", str(UPDATE_EVERY), "--eta-max", "20",
               "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--dropout", "0.1", "--context-len", "4",
               "--prompt-len", "2", "--device", "cpu", "--threads", "1", "--no-progress")
PATHS = {"reference": (), "fused": ("--fused", "--backend", "cpu")}
PATH_LABELS = {"reference": "reference", "fused": "fused (cpu)"}
CONTROL_PAIR = ("harmodt-f", "fused")
CONTROL_FLAGS = ("--lr", "0.001000001")  # after TRAIN_FLAGS: argparse keeps the last --lr
# The control's own flag, where it is written down: its run must differ elsewhere (losses, weights).
CONTROL_IGNORE = ("metrics.jsonl/*/lr", "checkpoint/config/lr", "checkpoint/optimizer/param_groups/*/lr",
                  "checkpoint/optimizer/param_groups/*/initial_lr", "checkpoint/scheduler/base_lrs",
                  "checkpoint/scheduler/_last_lr")


# Runs trainings through `python -m harmodt.train`'s own entry, one after another in this process
# (the imports once); each training's output goes to its log, a "bit-identity:" JSON line per training
# to stdout.
_WORKER = r"""
import contextlib, json, runpy, sys, time, traceback
for job in json.loads(sys.argv[1]):
    start, error = time.perf_counter(), None
    with open(job["log"], "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        sys.argv = ["harmodt.train", *job["argv"]]
        try:
            runpy.run_module("harmodt.train", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            error = None if e.code in (None, 0) else f"exit {e.code}"
        except Exception as e:
            traceback.print_exc()
            error = f"{type(e).__name__}: {e}"
    print("bit-identity:", json.dumps({"name": job["name"], "error": error, "seconds": time.perf_counter() - start}),
          flush=True)
"""





# ---------------------------------------------------------------------------------------------------
# Runs


@dataclass(frozen=True)
class Job:
    tree: Tree
    method: str
    path: str
    out: Path
    extra: tuple = ()

    @property
    def name(self) -> str:
        return self.out.name

    def argv(self, data: Path) -> list[str]:
        return [*TRAIN_FLAGS, "--method", self.method, "--data", str(data), "--out", str(self.out),
                *PATHS[self.path], *self.extra]


def run_batch(batch: list[Job], data: Path, logs: Path) -> dict[Job, str | None]:
    """The batch's trainings, one after another in one process of their tree; each job's error line or None."""
    tree = batch[0].tree
    spec = [{"name": j.name, "argv": j.argv(data), "log": str(logs / f"{j.name}.log")} for j in batch]
    errors = {j: "did not run" for j in batch}
    by_name = {j.name: j for j in batch}
    err_log = logs / f"worker-{batch[0].name}.err"
    with open(err_log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _WORKER, json.dumps(spec)], cwd=tree.root, env=tree.env,
                                stdout=subprocess.PIPE, stderr=err, text=True)
    for line in proc.stdout:
        if not line.startswith("bit-identity: "):  # output a training wrote past its log (a C library's, say)
            continue
        done = json.loads(line.removeprefix("bit-identity: "))
        job = by_name[done["name"]]
        errors[job] = done["error"]
        if errors[job] and errors[job].startswith("exit "):  # the training's own one-line error, in its log
            errors[job] += f": {last_line((logs / f'{job.name}.log').read_text())}"
        if errors[job] is None and not (job.out / "checkpoint.pt").is_file():
            errors[job] = "no checkpoint.pt written"
        note = f"FAILED {errors[job]}" if errors[job] else "ok"
        control = " (control)" if job.extra else ""
        print(f"  {tree.label} {job.method} {job.path}{control}: {done['seconds']:.1f} s {note}",
              file=sys.stderr, flush=True)
    if proc.wait() != 0:
        for job in batch:
            if errors[job] == "did not run":
                errors[job] = f"the {tree.label}'s worker failed ({err_log}): {last_line(err_log.read_text())}"
    return errors


def run_all(jobs: list[Job], data: Path, logs: Path, workers: int, isolate: bool) -> dict[Job, str | None]:
    """Every job: one process per tree running its jobs in turn, or with ``isolate`` one per job;
    ``workers`` processes at a time."""
    if isolate:
        batches = [[j] for j in jobs]
    else:
        batches = [[j for j in jobs if j.tree is tree] for tree in dict.fromkeys(j.tree for j in jobs)]
    logs.mkdir(parents=True, exist_ok=True)
    errors = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(lambda b: run_batch(b, data, logs), batches):
            errors.update(result)
    return errors


def verdict(base: Job, cand: Job, errors: dict, ignore: tuple) -> tuple[bool, str]:
    """(identical, what to print) for one pair of runs."""
    for job in (base, cand):
        if errors[job]:
            return False, f"run failed in the {job.tree.label}: {errors[job]}"
    d = compare_runs(base.out, cand.out, ignore)
    return d is None, "identical" if d is None else str(d)


def table(rows: list[tuple[str, dict[str, str]]], paths: list[str]) -> str:
    header = ["method", *(PATH_LABELS[p] for p in paths)]
    body = [[method, *(cells[p] for p in paths)] for method, cells in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.bit_identity", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default="main", help="the baseline revision (default main)")
    p.add_argument("--candidate", default=str(REPO), help="the candidate: a directory (a checkout, used as it is) "
                   "or a revision (default: this script's checkout)")
    p.add_argument("--methods", default="", help="comma list of methods (default: the baseline's method table)")
    p.add_argument("--paths", default="reference,fused", help="comma list of reference and fused (default both)")
    control = p.add_mutually_exclusive_group()
    control.add_argument("--control", action="store_true", help="run only the negative control pair")
    control.add_argument("--no-control", action="store_true", help="skip the negative control")
    p.add_argument("--jobs", type=int, default=2, help="processes at a time (default 2: the two trees side by side)")
    p.add_argument("--isolate", action="store_true", help="each training in a process of its own "
                   "(default: one process per tree runs its trainings in turn)")
    p.add_argument("--build", action="store_true", help="build a tree's missing native library instead of copying one")
    p.add_argument("--ignore", action="append", default=[], metavar="KEY",
                   help="a further slash path (fnmatch pattern) not compared, e.g. checkpoint/config/threads "
                   f"(always: {', '.join(DEFAULT_IGNORE)})")
    p.add_argument("--keep", metavar="DIR", help="write the data, logs and runs into DIR, a new or empty folder, "
                   "and keep them (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    args.paths = [x for x in args.paths.split(",") if x]
    if not args.paths or any(x not in PATHS for x in args.paths):
        p.error(f"--paths takes a comma list of {', '.join(PATHS)}, got {','.join(args.paths)!r}")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.keep and Path(args.keep).exists() and any(Path(args.keep).iterdir()):
        p.error(f"--keep {args.keep}: not empty")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return compare_trees(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def prepare(args, repo: Path, work: Path, worktrees: list) -> tuple[Tree, Tree, list[str]]:
    """The two trees, checked out, probed and given their native library; the methods to compare."""
    base_commit = resolve_revision(repo, args.baseline, "--baseline")
    candidate_dir = Path(args.candidate)
    cand_commit = None if candidate_dir.is_dir() else resolve_revision(repo, args.candidate, "--candidate")
    worktrees.append(add_worktree(repo, base_commit, work / "baseline-tree"))
    baseline = Tree("baseline", worktrees[-1], tree_env(worktrees[-1]))
    if cand_commit is not None:
        worktrees.append(add_worktree(repo, cand_commit, work / "candidate-tree"))
    candidate_root = worktrees[-1] if cand_commit is not None else candidate_dir.resolve()
    candidate = Tree("candidate", candidate_root, tree_env(candidate_root))
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(2, args.jobs)) as pool:
        list(pool.map(probe, (baseline, candidate)))
    if "fused" in args.paths or not args.no_control:
        donors = [candidate, baseline, Tree("checkout", REPO, {}, kernels=_checkout_kernels())]
        for tree in (candidate, baseline):
            provide_native_lib(tree, donors, args.build)
    methods = baseline.methods or candidate.methods
    if methods is None:
        raise SetupError("neither tree lists its methods (harmodt.methods.METHODS)")
    if args.methods:
        wanted = [m for m in args.methods.split(",") if m]
        if unknown := [m for m in wanted if m not in methods]:
            raise UsageError(f"--methods: {', '.join(unknown)} not in the baseline's table ({', '.join(methods)})")
        methods = wanted
    print(f"baseline  {args.baseline} = {base_commit[:10]} at {baseline.root} "
          f"(native library: {baseline.native or '-'})")
    print(f"candidate {candidate.root}{_describe(candidate.root)} (native library: {candidate.native or '-'})")
    if candidate.methods is not None and (extra := [m for m in candidate.methods if m not in methods]):
        print(f"not compared (not in the baseline's table, or not asked for): {', '.join(extra)}")
    return baseline, candidate, methods


def compare_trees(args) -> int:
    started = time.perf_counter()
    candidate_dir = Path(args.candidate)
    repo = Path(git("rev-parse", "--show-toplevel", cwd=candidate_dir if candidate_dir.is_dir() else REPO))
    work = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="bit-identity-"))
    work.mkdir(parents=True, exist_ok=True)
    worktrees = []
    try:
        baseline, candidate, methods = prepare(args, repo, work, worktrees)
        data = write_data([baseline, candidate], work / "data")
        runs = work / "runs"
        pairs = {} if args.control else {(m, p): (Job(baseline, m, p, runs / f"baseline-{m}-{p}"),
                                                  Job(candidate, m, p, runs / f"candidate-{m}-{p}"))
                                         for m in methods for p in args.paths}
        jobs = [job for pair in pairs.values() for job in pair]
        control = None
        if not args.no_control:
            m, p = CONTROL_PAIR
            base = pairs[m, p][0] if (m, p) in pairs else Job(baseline, m, p, runs / f"baseline-{m}-{p}")
            control = (base, Job(candidate, m, p, runs / f"control-{m}-{p}", CONTROL_FLAGS))
            jobs += [job for job in control if job not in jobs]
        errors = run_all(jobs, data, work / "logs", args.jobs, args.isolate)

        ignore = (*DEFAULT_IGNORE, *args.ignore)
        identical, rows = True, []
        for m in dict.fromkeys(m for m, _ in pairs):
            cells = {}
            for p in args.paths:
                same, cells[p] = verdict(*pairs[m, p], errors, ignore)
                identical &= same
            rows.append((m, cells))
        print()
        if rows:
            print(table(rows, args.paths))
        detected = True
        if control is not None:
            same, text = verdict(*control, errors, (*ignore, *CONTROL_IGNORE))
            detected = not same and not any(errors[job] for job in control)
            method, path = CONTROL_PAIR
            print(f"\ncontrol: {method} {PATH_LABELS[path]}, candidate run with {' '.join(CONTROL_FLAGS)}: "
                  f"{'detected' if detected else 'NOT DETECTED'} ({text})")
        summary = ("all identical; " if identical else "DIFFERENCES; ") if rows else ""
        print(f"\n{summary}{len(jobs)} trainings in {time.perf_counter() - started:.0f} s")
        return 0 if identical and detected else 1
    finally:
        for wt in reversed(worktrees):
            remove_worktree(repo, wt)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _checkout_kernels() -> Path | None:
    """This script's checkout's kernel package folder, found by where its native library lies."""
    for lib in (*REPO.glob(f"*/_lib/{LIB_NAME}"), *REPO.glob(f"*/*/_lib/{LIB_NAME}")):
        return lib.parent.parent
    return None


def _describe(root: Path) -> str:
    try:
        commit = git("rev-parse", "--short=10", "HEAD", cwd=root)
        dirty = git("status", "--porcelain", "--untracked-files=no", cwd=root)
    except SetupError:
        return ""
    return f" = {commit}{' with uncommitted changes' if dirty else ''}"


if __name__ == "__main__":
    sys.exit(main())
