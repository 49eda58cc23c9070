"""What a study runs: its arms (a method, or a labelled ``--variant`` of one with its own training
flags), the swept values, and one :class:`Run` folder per (arm, seed[, swept value])."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..config import flag as flag_for_key  # the study's name for it
from ..files import loads_json, write_atomic
from ..methods import METHODS

# flags the study sets itself for every run; passing them through would make runs disagree with their names
OWN_FLAGS = ("--method", "--seed", "--out", "--resume", "--no-resume", "--tasks", "--data", "--eval-episodes",
             "--preset", "--config")
VARIANT_ONLY_FLAGS = ("--preset",)  # a variant may name a preset: the variant's label says which runs have it


class StudyError(ValueError):
    """A bad study option or a run folder that disagrees with the study; printed as one line."""


@dataclass(frozen=True)
class Arm:
    """One line of the study's tables: a trainer method, its label, and the training flags its runs add."""
    key: str  # run-name prefix: the method, or the slug of a variant's label
    label: str
    method: str
    flags: tuple[str, ...] = ()


def method_arm(method: str) -> Arm:
    """The arm of a plain ``--methods`` entry, labelled as the method table says (an unknown name as itself)."""
    known = METHODS.get(method)
    return Arm(method, known.label if known else method, method)


def slug(label: str) -> str:
    """``HarmoDT-F official`` -> ``harmodt-f-official``."""
    return re.sub(r"[^a-z0-9.+]+", "-", label.lower()).strip("-")


def parse_variant(text: str) -> Arm:
    """``"LABEL=METHOD [TRAIN FLAGS...]"`` -> its Arm (the flags split as a shell would)."""
    label, sep, rest = text.partition("=")
    try:
        words = shlex.split(rest)
    except ValueError as exc:
        raise StudyError(f"--variant {text!r}: {exc}") from None
    if not sep or not label.strip() or not slug(label) or not words or words[0].startswith("-"):
        raise StudyError(f"--variant must be \"LABEL=METHOD [TRAIN FLAGS...]\", got {text!r}")
    for flag in words[1:]:
        name = flag.split("=")[0]
        if name in OWN_FLAGS and name not in VARIANT_ONLY_FLAGS:
            raise StudyError(f"--variant {label.strip()!r}: {name} is set by the study for every run")
    return Arm(slug(label), label.strip(), words[0], tuple(words[1:]))


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


def run_name(key: str, seed: int, sweep: tuple[str, str] | None) -> str:
    """Folder name of a run: ``harmodt-f-s0``, ``harmodt-f-eta_max2000-s1``, ``harmodt-f-official-s0``."""
    if sweep is None:
        return f"{key}-s{seed}"
    name, value = sweep
    safe = re.sub(r"[^A-Za-z0-9.+-]", "_", f"{name.split('.')[-1]}{value}")
    return f"{key}-{safe}-s{seed}"


def variant_label(label: str, sweep: tuple[str, str] | None) -> str:
    """The label of an arm at a swept value: ``HarmoDT-F eta_max=2000``."""
    return label if sweep is None else f"{label} {sweep[0].split('.')[-1]}={sweep[1]}"


class Run:
    """One (arm, seed[, swept value]) of the study and its folder."""

    def __init__(self, study_dir: Path, arm: Arm, seed: int, sweep: tuple[str, str] | None):
        self.arm, self.seed, self.sweep = arm, seed, sweep
        self.method = arm.method
        self.name = run_name(arm.key, seed, sweep)
        self.variant = variant_label(arm.label, sweep)
        self.dir = study_dir / "runs" / self.name
        self.eval_path = self.dir / "run_eval.json"  # the study's evaluation of the final checkpoint
        self.best_checkpoint = self.dir / "best.pt"  # written by a trainer with --validation-seed
        self.best_eval_path = self.dir / "run_best_eval.json"  # the study's evaluation of best.pt on the same goals
        self.record_path = self.dir / "study_run.json"

    def train_args(self, tasks: str, data: str, passthrough: list[str], threads: int | None,
                   eval_episodes_in_training: int) -> list[str]:
        """The trainer's flags: the study's own, the shared passthrough, the arm's (they win), the swept value."""
        args = ["--tasks", tasks, "--data", data, "--method", self.method, "--seed", str(self.seed),
                "--out", str(self.dir), "--resume", "--eval-episodes", str(eval_episodes_in_training), "--no-progress",
                *passthrough, *self.arm.flags]
        if self.sweep is not None:
            args += [flag_for_key(self.sweep[0]), self.sweep[1]]
        if threads and "--threads" not in passthrough and "--threads" not in self.arm.flags:
            args += ["--threads", str(threads)]
        return args

    def unseen_path(self, threshold: int | None) -> Path:
        """Results of the held-out tasks: through the voted mask at ``threshold``, or (None) of a dense model."""
        return self.dir / ("unseen_dense.json" if threshold is None else f"unseen_t{threshold}.json")

    def record(self) -> dict:
        try:
            return loads_json(self.record_path.read_text())
        except (OSError, ValueError):
            return {}

    def write_record(self, rec: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.record_path, json.dumps(rec, indent=2))

    def finished(self) -> bool:
        """Trained and evaluated: the final checkpoint, and the best-on-validation one where the run has it."""
        return self.eval_path.exists() and (self.best_eval_path.exists() or not self.best_checkpoint.exists())


# ---- the job record of a study run through submitit (OUT/jobs.json) -----------------------------

def read_jobs(out: Path) -> dict:
    try:
        return loads_json((out / "jobs.json").read_text())
    except (OSError, ValueError):
        return {}


def failed_jobs(out: Path, runs: list[Run]) -> list[dict]:
    """The failed jobs of the runs not finished, for summary.md."""
    jobs = read_jobs(out)
    return [{"run": r.name, **jobs[r.name]} for r in runs
            if not r.finished() and jobs.get(r.name, {}).get("state") == "failed"]



def code_revision() -> str:
    """The revision of the code a run trains with: the git commit of the checkout that holds this package,
    with ``-dirty`` when ``harmodt/`` or ``kernels/`` differ from it; ``harmodt <version>`` outside git."""
    from .. import __version__

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "harmodt", "kernels"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"harmodt {__version__}"
    return head + ("-dirty" if dirty else "")


def machine_name() -> str:
    """The processor a run trains on and its core count (``Intel(R) Xeon(R) Processor, 2 cores``): training
    is reproducible bit for bit on one processor model, not across them."""
    import os
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def without_threads(args: list[str]) -> list[str]:
    """``args`` without ``--threads N`` (a run's thread count may change between sittings)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--threads":
            skip = True
        else:
            out.append(a)
    return out
