"""The checks of a study before any run starts: its own flags, every run's training flags (parsed
as the trainer would), its folder."""

from __future__ import annotations

import shlex

from ..runtime import bf16_matmul_note
from .comparisons import parse_family
from .plan import OWN_FLAGS, StudyError, flag_for_key, without_threads
from .unseen import parse_thresholds


def check_study(study) -> None:
    """Every flag of ``study`` (a harmodt.study.runner.Study) and every run's training flags checked
    before any run starts, then its folder made (last: a study refused for a flag makes no folder);
    sets its held-out tasks, their vote thresholds and its ``--family``. StudyError naming the flag
    otherwise."""
    from ..config import METHODS, ConfigError, goal_seeds
    from ..domains import SEED
    from ..run.cli import parse_args
    from ..tasks import parse_tasks

    bad = [a.method for a in study.arms if a.method not in METHODS]
    if bad:
        raise StudyError(f"{'--methods' if bad[0] in study.methods else '--variant'}: unknown {', '.join(bad)} "
                         f"(choose from {', '.join(METHODS)})")
    if not study.arms or not study.seeds:
        raise StudyError("need at least one method (or --variant) and one seed")
    if len(set(study.methods)) != len(study.methods) or len(set(study.seeds)) != len(study.seeds):
        raise StudyError("--methods and --seeds must not repeat an entry")
    for i, a in enumerate(study.arms):
        if any(a.key == b.key or a.label == b.label for b in study.arms[:i]):
            raise StudyError(f"--variant {a.label!r}: its label or run name ({a.key}) repeats another method's")
    if [k for k in study.sweep_arms if k not in {a.key for a in study.arms}]:
        raise StudyError("--sweep-methods must name methods of --methods or run names of --variant labels "
                         f"({', '.join(a.key for a in study.arms)})")
    if study.args.eval_episodes < 1:
        raise StudyError("--eval-episodes must be at least 1")
    if study.args.eval_precision == "bf16" and not _cuda() and (note := bf16_matmul_note()):
        raise StudyError(f"--eval-precision bf16 refused: {note.removeprefix('[harmodt] note: ')}")
    for name, value in (("--eval-seed", study.args.eval_seed), ("--data-seed", study.args.data_seed)):
        if not SEED.allows(value):
            raise StudyError(f"{name} must be {SEED.describe(int)}, got {value}")
    for name, value, least in (("--curve-episodes", study.args.curve_episodes, 0),
                               ("--gen-episodes", study.args.gen_episodes, 1),
                               ("--threads-per-run", study.args.threads_per_run, 0)):
        if value < least:
            raise StudyError(f"{name} must be >= {least} (an integer), got {value}")
    for flag in study.passthrough:
        if flag.split("=")[0] in OWN_FLAGS:
            raise StudyError(f"{flag.split('=')[0]} is set by the study for every run; use the study's own option")
    if study.sweep is not None:
        flag = flag_for_key(study.sweep[0])
        if flag in study.passthrough or any(flag in a.flags for a in study.arms if a.key in study.sweep_arms):
            raise StudyError(f"--sweep {study.sweep[0]} and {flag} both given")
    try:
        tasks = parse_tasks(study.args.tasks)
    except ValueError as exc:
        raise StudyError(f"--tasks: {exc}") from None
    try:
        study.eval_tasks = parse_tasks(study.args.eval_tasks) if study.args.eval_tasks else []
    except ValueError as exc:
        raise StudyError(f"--eval-tasks: {exc}") from None
    if seen := [t for t in study.eval_tasks if t in tasks]:
        raise StudyError(f"--eval-tasks: {', '.join(seen)} "
                         f"{'is a training task' if len(seen) == 1 else 'are training tasks'}")
    if study.args.vote_thresholds and not study.eval_tasks:
        raise StudyError("--vote-thresholds needs --eval-tasks")
    study.thresholds = parse_thresholds(study.args.vote_thresholds, len(tasks)) if study.eval_tasks else []
    try:
        study.family = parse_family(study.args.family)
    except ValueError as exc:
        raise StudyError(str(exc)) from None
    variants = list(dict.fromkeys(r.variant for r in study.runs))
    if unknown := [x for pair in study.family for x in pair if x not in variants]:
        raise StudyError(f"--family names {unknown[0]!r}, which is not an arm of this study ({', '.join(variants)})")
    for run in study.runs:  # every run's flags must parse (unknown flags, bad values): fail before any run starts
        try:
            cfg = parse_args(run.train_args(study.args.tasks, study.data, study.passthrough, study.threads,
                                            study.curve_episodes))
        except ConfigError as exc:
            raise StudyError(f"run {run.name}: {exc}") from None
        except SystemExit:
            raise StudyError(f"run {run.name}: the trainer rejected its flags (see above)") from None
        validation = goal_seeds(cfg.seed, cfg.validation_seed)["validation"]  # the resolved seed, whichever flag set it
        if validation is not None and validation == study.args.eval_seed:
            raise StudyError(f"run {run.name}: its --validation-seed {validation} is the study's --eval-seed: the "
                             "goals best.pt is chosen on must differ from the goals it is scored on")
        rec = run.record()
        want = run.train_args(study.args.tasks, study.data, study.passthrough, None, study.curve_episodes)
        if (rec.get("train_args") and without_threads(rec["train_args"]) != without_threads(want)
                and not study.args.report_only):
            raise StudyError(f"{run.dir} was made with other flags ({shlex.join(rec['train_args'])}); "
                             f"use another --out or delete that folder")
    if not study.out_writable():  # last: a study refused for a flag makes no folder
        raise StudyError(f"--out {study.out}: cannot make the folder or write in it")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
