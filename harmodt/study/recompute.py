"""``python -m harmodt.study.recompute FOLDER``: the statistics of a study again from its study.json alone.

A published study keeps study.json, summary.md and its figures, not its run folders. This command
recomputes what is computed from the runs' entries (each arm's interval, the paired differences from
the reference, every pair of arms, the held-out rows) with the current statistics, keeps what needs
the run folders (the learned-mask comparison, the figures drawn from checkpoints and metrics), redraws
the figures drawn from study.json alone, and rewrites study.json and summary.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..files import FolderLock, OutputError, finite_json, loads_json, writable_folder
from ..oneline import OneLineParser
from ..oneline import run_tool
from ..run.outputs import write_atomic
from .plan import StudyError
from .figures import draw_figures
from .comparisons import along_training, family, pairwise
from .report import aggregate, summary_markdown
from .unseen import aggregate_unseen


def read_study(folder: Path) -> dict:
    """FOLDER/study.json, checked for what recomputing needs (StudyError, one line, otherwise)
    and for a folder that can be written in, before anything is computed."""
    path = folder / "study.json"
    try:
        study = loads_json(path.read_text())
    except (OSError, ValueError) as exc:
        raise StudyError(f"{path}: not a readable study.json ({exc})") from None
    if (not isinstance(study, dict) or not isinstance(study.get("runs"), list)
            or not all(isinstance(r, dict) for r in study["runs"])):
        raise StudyError(f"{path}: not a study.json (expected an object whose 'runs' is a list of run entries)")
    names = [r["name"] for r in study["runs"] if r.get("name") is not None]
    if repeated := sorted({str(n) for n in names if names.count(n) > 1}):
        raise StudyError(f"{path}: the run entry {repeated[0]!r} appears {names.count(repeated[0])} times (each run "
                         "counts once)")
    if not writable_folder(folder):
        raise StudyError(f"{folder}: not writable (study.json and summary.md are rewritten there)")
    return study


def recompute(folder: Path) -> dict:
    path = folder / "study.json"
    study = read_study(folder)
    try:
        study["variants"] = aggregate(study)
        study["pairwise"] = pairwise(study)
        study["family"] = family(study)
        study["pairwise_best"] = pairwise(study, key="best")
        study["along_training"] = along_training(study)
        study["unseen"] = aggregate_unseen(study)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StudyError(f"{path}: its run entries cannot be recomputed ({type(exc).__name__}: {exc})") from None
    draw_figures(study, folder, say=lambda msg: None, names=STUDY_JSON_FIGURES)
    figures = sorted(p.name for p in (folder / "figures").glob("*.png"))
    write_atomic(path, finite_json(study, indent=2))  # (a statistic without a value: null, never a bare NaN)
    write_atomic(folder / "summary.md", summary_markdown(study, figures))
    return study


# the figures that read nothing but the study dict
STUDY_JSON_FIGURES = ("methods.png", "success_vs_vote_threshold.png", "validation_success.png",
                      "validation_differences.png")


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m harmodt.study.recompute",
                                description="Recompute a study's statistics from FOLDER/study.json; rewrite study.json "
                                            "and summary.md.")
    p.add_argument("folders", nargs="+", type=Path, help="study folders (each with a study.json)")
    folders = p.parse_args(argv).folders
    return run_tool(lambda: _recompute_all(folders),
                    "[study] recompute interrupted: every file is the old one or the new one (written atomically)",
                    (StudyError, OutputError))


def _recompute_all(folders: list[Path]) -> int:
    for folder in folders:
        read_study(folder)  # every folder checked before any is rewritten
    for folder in folders:
        with FolderLock(folder, "study folder"):  # (a study writing there meanwhile would replace these files)
            recompute(folder)
        print(f"rewrote {folder / 'study.json'} and {folder / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
