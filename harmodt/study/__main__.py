"""The command line of ``python -m harmodt.study`` (see the package docstring)."""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import signal
import sys
from pathlib import Path

from ..config import EVALUATION_GOALS_SEED
from ..oneline import OneLineParser
from ..files import FolderLock, OutputError, read_json
from ..flags import field_flag
from ..oneline import run_tool
from ..ownership import holds_data_set, run_files
from ..tasks import TASKS_HELP
from .executors import add_arguments as add_executor_arguments, check_args as check_executor_args, run_jobs
from .plan import StudyError, without_threads
from .runner import Study


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m harmodt.study", allow_abbrev=False,
        description="Train and evaluate every (method, seed[, swept value]) on one dataset; write study.json, "
                    "summary.md and figures. Flags not listed here are passed to every `python -m harmodt.train` run.")
    field_flag(p, "tasks", default="MT10", help=f"{TASKS_HELP} (default MT10)")
    p.add_argument("--methods", default="mtdt,prompt-dt,harmodt-r,harmodt-m,harmodt-f", help="comma list of methods")
    p.add_argument("--seeds", default="0,1,2", help="comma list of training seeds")
    p.add_argument("--out", required=True, help="study folder (runs/, data/, study.json, summary.md, figures/)")
    p.add_argument("--workers", type=int, default=1, help="runs trained at the same time (default 1)")
    field_flag(p, "threads", "--threads-per-run", type=int, help="torch threads per run (default: cores / workers)")
    p.add_argument("--sweep", default=None,
                   help="KEY=V1,V2,...: run the grid over a config key (e.g. masks.eta_max=100,2000)")
    p.add_argument("--sweep-methods", default="",
                   help="comma list: the methods (or variant run names) the sweep applies to (default all); "
                        "the others run once with their default value")
    field_flag(p, "eval_episodes", type=int, default=20,
               help="evaluation episodes per task for every final checkpoint (default 20)")
    field_flag(p, "precision", "--eval-precision", choices=["fp32", "bf16"],
               help="the final evaluations' policy precision (bf16: autocast; on a CPU only with bf16 instructions, "
                    "AVX512-BF16 or AMX)")
    field_flag(p, "stop_at_success", "--eval-stop-at-success", action="store_true",
               help="every evaluation (during training and the final ones) ends each episode at its first success: the "
                    "same success rates (what the study ranks by and selects best.pt by) for less simulation and "
                    "policy work; returns in study.json are then truncated there")
    field_flag(p, "seed", "--eval-seed", type=int, default=EVALUATION_GOALS_SEED,
               help=f"evaluation seed shared by all runs: the same goals (default {EVALUATION_GOALS_SEED}); no run's "
                    "--validation-seed may equal it")
    p.add_argument("--curve-episodes", type=int, default=3,
                   help="episodes per task of the trainer's own evaluations when --eval-every is passed (default 3)")
    field_flag(p, "data", help="dataset folder shared by all runs (default: generate one into OUT/data)")
    field_flag(p, "gen_episodes", type=int, help="episodes per task when the study generates the data (default 100)")
    field_flag(p, "seed", "--data-seed", type=int, help="seed of the generated data (default 0)")
    p.add_argument("--variant", action="append", default=[], metavar='"LABEL=METHOD [TRAIN FLAGS...]"',
                   help="a labelled method with training flags of its own (after the shared ones, so they win); "
                        "repeatable, e.g. --variant \"HarmoDT-F official=harmodt-f --preset official\" "
                        "(runs harmodt-f-official-s0, ...)")
    p.add_argument("--eval-tasks", default="",
                   help="held-out task spec (e.g. ML1-pick-place-test[:5], ML10-test): evaluate every "
                        "run's final checkpoint on these unseen tasks too")
    p.add_argument("--vote-thresholds", default="", help="T1,T2,...: Eq. 13 thresholds for --eval-tasks "
                   "(default N/4, N/2, 3N/4 of the N training tasks, rounded, at least 1)")
    p.add_argument("--family", default="", metavar='"A - B; C - D"',
                   help="the comparisons fixed before the runs (arm labels, a space on each side of the minus): "
                        "summary.md reports each with Holm's correction over these alone, beside the table of "
                        "every pair")
    p.add_argument("--report-only", action="store_true",
                   help="start no run: aggregate the finished ones and draw the figures")
    add_executor_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, passthrough = build_parser().parse_known_args(argv)
    command = "python -m harmodt.study " + shlex.join(argv)
    return run_tool(lambda: _run(args, passthrough, command),
                    "[study] interrupted: finished runs are kept; rerun the same command to continue",
                    (StudyError, OutputError))


def _run(args, passthrough: list[str], command: str) -> int:
    """The study of the parsed flags: checked, run, reported; 0 when every run finished, else 1."""
    if args.workers < 1:
        raise StudyError("--workers must be at least 1")
    check_executor_args(args)
    study = Study(args, passthrough, command)
    study.check()  # (last: --out made and found writable)
    with FolderLock(study.out, "--out"):  # one study writes into its folder at a time
        if (bad := other_study(study.out, args, passthrough)) is not None:
            raise StudyError(f"--out {study.out}: {bad}")
        return _run_study(study, args)


def _run_study(study: Study, args) -> int:
    """The checked study run and reported (holding its folder's lock)."""
    # Ctrl-C / SIGTERM stop the study in every phase, also when it was started with SIGINT ignored (a
    # background job of a non-interactive shell): its runs are in their own sessions, so the study is the
    # only process a Ctrl-C reaches, and its children (started after this) get the default disposition back
    old_handlers = {sig: signal.signal(sig, study.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        ok = True
        if not args.report_only:  # the local pool, or one submitit job per run (Slurm, or local processes)
            ok = study.run_all() if args.executor == "local" else run_jobs(study)
        elif (study.out / "command.txt").exists():
            study.command = (study.out / "command.txt").read_text().strip()
        study.report()
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    return 0 if ok else 1


# what makes a study the same study
PLAN_KEYS = ("tasks", "sweep", "sweep_methods", "eval_episodes", "eval_precision", "eval_stop_at_success", "eval_seed",
             "curve_episodes", "data", "gen_episodes", "data_seed", "eval_tasks", "vote_thresholds")
GROWING_KEYS = ("methods", "seeds", "variant")  # a later command of the same study may add entries, never drop one


def other_study(out: Path, args, passthrough: list[str]) -> str | None:
    """How the study whose files are in ``out`` (its command.txt, else its study.json's command) differs from
    this one, or None when there is none, or it is this study (the same plan and training flags, with at
    most more methods, seeds or variants). A training run's or data set's files in ``out`` also differ."""
    if found := run_files(out):
        return f"holds the files of a training run ({', '.join(found)}); a study goes into a folder of its own"
    if holds_data_set(out):
        return "holds a data set; a study goes into a folder of its own"
    try:
        old = (out / "command.txt").read_text().strip() if (out / "command.txt").exists() else (
            read_json(out / "study.json").get("command") if (out / "study.json").exists() else None)
    except (OSError, ValueError, AttributeError) as exc:
        return f"holds a study whose command cannot be read ({exc}); choose another --out"
    if old is None:
        return None
    try:
        words = shlex.split(str(old))
        with contextlib.redirect_stderr(io.StringIO()):
            before, before_pass = build_parser().parse_known_args(words[3:])
    except (ValueError, SystemExit):
        return f"holds the study of another command ({str(old)[:120]}); choose another --out"
    diff = [k for k in PLAN_KEYS if getattr(before, k) != getattr(args, k)]
    diff += [k for k in GROWING_KEYS if not set(_entries(getattr(before, k))) <= set(_entries(getattr(args, k)))]
    if without_threads(before_pass) != without_threads(passthrough):
        diff.append("training flags")
    if diff:
        names = ", ".join(k if " " in k else "--" + k.replace("_", "-") for k in diff)
        return (f"holds the study of another command ({names} differ: "
                f"{shlex.join(words[3:])[:160]}); its study.json, summary.md and runs are that study's: choose another "
                "--out")
    return None


def _entries(value) -> list[str]:
    """The entries of a comma list flag (or of a repeated one)."""
    return value if isinstance(value, list) else [e.strip() for e in str(value).split(",") if e.strip()]


if __name__ == "__main__":
    sys.exit(main())
