"""Bit identity of training between two trees: every method, on the reference path and ``--fused``
with the ``cpu`` backend, trained briefly in a baseline revision and in a candidate tree, and the
results compared bit for bit.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/bit_identity.py                  # main against this checkout
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/bit_identity.py --baseline e06ca74 --methods harmodt-f

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
import configparser
import fnmatch
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LIB_NAME = "libharmodt_kernels.so"
NATIVE_SUFFIXES = (".cpp", ".cc", ".h", ".hpp", ".cu", ".cuh")
TASKS = ("reach-v3", "push-v3", "door-open-v3")
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
# Not behaviour: the run's own paths, and metrics.jsonl's size in bytes (its timings' digits vary).
DEFAULT_IGNORE = ("checkpoint/config/out", "checkpoint/config/data", "checkpoint/run/metrics_bytes")
CHECKPOINT_ORDER = ("model", "masks", "optimizer", "rng")  # compared first, in this order
TIMING_SUFFIX = "_s"  # steps_per_s, mask_update_s, eval_env_steps_per_s: wall-clock figures

_PROBE = r"""
import json, pathlib
import harmodt, harmodt_kernels
info = {"harmodt": str(pathlib.Path(harmodt.__file__).resolve()),
        "kernels": str(pathlib.Path(harmodt_kernels.__file__).resolve().parent), "methods": None}
try:
    from harmodt.methods import METHODS
    info["methods"] = list(METHODS)
except (ImportError, AttributeError):
    pass
print(json.dumps(info))
"""

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

_WRITE_DATA = r"""
import sys
sys.path.insert(0, "tests")
from _data_folders import write_ours
write_ours(sys.argv[1], tasks=tuple(sys.argv[2].split(",")), episodes=4, prompts=2, length=20, seed=0)
"""


class UsageError(Exception):
    """A bad flag value, revision or method: exit status 2."""


class SetupError(Exception):
    """A tree that cannot be made ready (git, imports, native library, data): exit status 1."""


# ---------------------------------------------------------------------------------------------------
# Comparison


@dataclass(frozen=True)
class Difference:
    """The first place two results differ: ``key`` a slash path (``checkpoint/optimizer/state/3/exp_avg``),
    ``detail`` what differs there."""
    key: str
    detail: str

    def __str__(self):
        return f"{self.key}: {self.detail}"


def _float_bits(x: float) -> bytes:
    return struct.pack("<d", x)


def _bit_view(t: torch.Tensor) -> torch.Tensor:
    """A floating tensor as integers of its width (its bits); other tensors as they are."""
    if t.is_floating_point() or t.is_complex():
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        t = t.contiguous()
        if t.is_complex():
            t = torch.view_as_real(t)
        return t.view(ints[t.element_size()])
    return t


def _tensor_difference(a: torch.Tensor, b: torch.Tensor, key: str) -> Difference | None:
    if a.dtype != b.dtype:
        return Difference(key, f"dtype {a.dtype} vs {b.dtype}")
    if a.shape != b.shape:
        return Difference(key, f"shape {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.detach().cpu(), b.detach().cpu()
    if torch.equal(_bit_view(a), _bit_view(b)):
        return None
    differs = _bit_view(a) != _bit_view(b)
    if differs.dim() > a.dim():  # a complex tensor's real and imaginary halves
        differs = differs.any(-1)
    n = int(differs.sum())
    if a.dtype == torch.bool:
        return Difference(key, f"{n} of {a.numel()} elements differ")
    wide = torch.float64 if (a.is_floating_point() or a.is_complex()) else torch.int64
    gap = (a.to(wide) - b.to(wide)).abs()
    top = float(gap.max()) if gap.numel() else 0.0
    return Difference(key, f"{n} of {a.numel()} elements differ, max |a-b| {top:.3g}")


def first_difference(a, b, key: str = "", ignore: tuple[str, ...] = ()) -> Difference | None:
    """The first difference between two nested results (dicts, lists/tuples, tensors, numbers,
    strings, None), walking ``a``'s order; None when they are bit for bit the same. ``ignore``: slash
    paths not compared (fnmatch patterns: ``metrics.jsonl/*/lr``). A list and a tuple of the same
    items are the same; an int and a float are not."""
    if _ignored(key, ignore):
        return None
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return Difference(key, f"{type(a).__name__} vs {type(b).__name__}")
        return _tensor_difference(a, b, key)
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a:
            sub = f"{key}/{k}" if key else str(k)
            if k not in b:
                return None if _ignored(sub, ignore) else Difference(sub, "missing in the candidate")
            if (d := first_difference(a[k], b[k], sub, ignore)) is not None:
                return d
        for k in b:
            sub = f"{key}/{k}" if key else str(k)
            if k not in a and not _ignored(sub, ignore):
                return Difference(sub, "missing in the baseline")
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return Difference(key, f"length {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            if (d := first_difference(x, y, f"{key}/{i}" if key else str(i), ignore)) is not None:
                return d
        return None
    if type(a) is not type(b):
        return Difference(key, f"{type(a).__name__} {a!r} vs {type(b).__name__} {b!r}")
    if isinstance(a, float):
        if _float_bits(a) == _float_bits(b):
            return None
        gap = abs(a - b) if math.isfinite(a) and math.isfinite(b) else math.inf
        return Difference(key, f"{a!r} vs {b!r}, |a-b| {gap:.3g}")
    if a != b:
        return Difference(key, f"{_short(a)} vs {_short(b)}")
    return None


def _ignored(key: str, ignore: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in ignore)


def _short(x, limit: int = 60) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def metric_records(path: Path) -> dict[str, dict]:
    """metrics.jsonl's records keyed ``line N (step S)``, without their timing keys (``*_s``)."""
    records = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        rec = json.loads(line)
        records[f"line {i} (step {rec.get('step')})"] = {k: v for k, v in rec.items() if not k.endswith(TIMING_SUFFIX)}
    return records


def _checkpoint_in_order(ck: dict) -> dict:
    first = {k: ck[k] for k in CHECKPOINT_ORDER if k in ck}
    return {**first, **{k: v for k, v in ck.items() if k not in first}}


def compare_runs(baseline: Path, candidate: Path, ignore: tuple[str, ...] = DEFAULT_IGNORE) -> Difference | None:
    """The first difference between two run folders: metrics.jsonl, then checkpoint.pt."""
    d = first_difference(metric_records(baseline / "metrics.jsonl"), metric_records(candidate / "metrics.jsonl"),
                         "metrics.jsonl", ignore)
    if d is not None:
        return d
    a, b = (torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True) for run in (baseline, candidate))
    return first_difference(_checkpoint_in_order(a), _checkpoint_in_order(b), "checkpoint", ignore)


# ---------------------------------------------------------------------------------------------------
# Trees


@dataclass(eq=False)
class Tree:
    """One side of the comparison: a directory with harmodt, how to run Python in it, what it has."""
    label: str
    root: Path
    env: dict = field(repr=False)
    kernels: Path | None = None  # the kernel package's folder, from the probe
    methods: list | None = None
    native: str = ""  # how it got its native library

    @property
    def lib(self) -> Path:
        return self.kernels / "_lib" / LIB_NAME


def _git(*args, cwd: Path) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SetupError(f"git {' '.join(args)} in {cwd}: {last_line(proc.stderr)}")
    return proc.stdout.strip()


def resolve_revision(repo: Path, rev: str, flag: str) -> str:
    proc = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=repo,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        what = "neither a directory nor a revision" if flag == "--candidate" else "not a revision"
        raise UsageError(f"{flag} {rev!r} is {what} of {repo}")
    return proc.stdout.strip()


def add_worktree(repo: Path, commit: str, dest: Path) -> Path:
    _git("worktree", "add", "--detach", str(dest), commit, cwd=repo)
    return dest


def remove_worktree(repo: Path, dest: Path):
    subprocess.run(["git", "worktree", "remove", "--force", str(dest)], cwd=repo, capture_output=True)
    shutil.rmtree(dest, ignore_errors=True)
    subprocess.run(["git", "worktree", "prune"], cwd=repo, capture_output=True)


def pytest_pythonpath(root: Path) -> list[Path]:
    """The folders pytest.ini's ``pythonpath`` puts on sys.path (where a tree keeps importable packages)."""
    ini = root / "pytest.ini"
    if not ini.is_file():
        return []
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ini)
    entries = parser.get("pytest", "pythonpath", fallback="").split()
    return [(root / e).resolve() for e in entries]


def tree_env(root: Path) -> dict:
    paths = [root.resolve(), *pytest_pythonpath(root)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(str(p) for p in paths)), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("HARMODT_KERNELS_LIB", None)  # each tree loads its own library
    return env


def run_python(tree: Tree, args: list, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=tree.root, env=tree.env, capture_output=True, text=True,
                          timeout=timeout)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def probe(tree: Tree):
    """Where the tree's harmodt and harmodt_kernels import from (both must be inside it), and its methods."""
    proc = run_python(tree, ["-c", _PROBE], timeout=300)
    if proc.returncode != 0:
        raise SetupError(f"{tree.label} ({tree.root}) cannot import harmodt: {last_line(proc.stderr)}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    root = tree.root.resolve()
    for name in ("harmodt", "kernels"):
        if not Path(info[name]).is_relative_to(root):
            raise SetupError(f"{tree.label} imports {name} from {info[name]}, outside its tree {root}")
    tree.kernels, tree.methods = Path(info["kernels"]), info["methods"]


def native_sources(root: Path) -> str:
    """A digest of the tree's C++ sources (bytes) and CMakeLists.txt (without its comments and the
    line that sets where the library goes), by content: the same digest, the same library."""
    try:
        listed = _git("ls-files", "--cached", "--others", "--exclude-standard", cwd=root).splitlines()
    except SetupError:  # not a git checkout: its files outside build/
        listed = [str(f.relative_to(root)) for f in root.rglob("*") if "build" not in f.relative_to(root).parts]
    digests = []
    for name in listed:
        path = root / name
        if path.name == "CMakeLists.txt" and path.is_file():
            lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
            text = "\n".join(line for line in lines if line and not line.startswith("set(HARMODT_OUTPUT_DIR"))
            digests.append(hashlib.sha256(text.encode()).hexdigest())
        elif name.endswith(NATIVE_SUFFIXES) and path.is_file():
            digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


def provide_native_lib(tree: Tree, donors: list[Tree], build: bool):
    """The tree's native library: already there, copied from a donor with the same C++ sources, or built."""
    if tree.lib.is_file():
        tree.native = "its own"
        return
    if not build:
        mine = native_sources(tree.root)
        for donor in donors:
            ready = donor is not tree and donor.kernels is not None and donor.lib.is_file()
            if ready and native_sources(donor.root) == mine:
                tree.lib.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(donor.lib, tree.lib)
                tree.native = f"copied from the {donor.label} (same native sources)"
                return
    print(f"building the native library of the {tree.label} (python setup.py build_ext --inplace) ...", file=sys.stderr)
    proc = run_python(tree, ["setup.py", "build_ext", "--inplace"], timeout=1800)
    if proc.returncode != 0 or not tree.lib.is_file():
        raise SetupError(f"building the {tree.label}'s native library failed: {last_line(proc.stderr or proc.stdout)}")
    tree.native = "built"


def write_data(trees: list[Tree], dest: Path) -> Path:
    """The synthetic data folder, written once by the first tree with tests/_data_folders.py."""
    for tree in trees:
        if (tree.root / "tests" / "_data_folders.py").is_file():
            proc = run_python(tree, ["-c", _WRITE_DATA, str(dest), ",".join(TASKS)], timeout=300)
            if proc.returncode != 0:
                raise SetupError(f"writing the data with the {tree.label}'s tests/_data_folders.py: "
                                 f"{last_line(proc.stderr)}")
            return dest
    raise SetupError("no tree has tests/_data_folders.py to write the synthetic data with")


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
    p = argparse.ArgumentParser(prog="python bench/bit_identity.py", description=__doc__.split("\n\n")[0],
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
    repo = Path(_git("rev-parse", "--show-toplevel", cwd=candidate_dir if candidate_dir.is_dir() else REPO))
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
        commit = _git("rev-parse", "--short=10", "HEAD", cwd=root)
        dirty = _git("status", "--porcelain", "--untracked-files=no", cwd=root)
    except SetupError:
        return ""
    return f" = {commit}{' with uncommitted changes' if dirty else ''}"


if __name__ == "__main__":
    sys.exit(main())
