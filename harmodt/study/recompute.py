"""``python -m harmodt.study.recompute FOLDER``: the statistics of a study again from its study.json alone.

A published study keeps study.json, summary.md and its figures, not its run folders. This command
recomputes what is computed from the runs' entries (each arm's interval, the paired differences from
the reference, every pair of arms, the held-out rows) with the current statistics, keeps what needs
the run folders (the learned-mask comparison, the figures drawn from checkpoints and metrics), redraws
the figures drawn from study.json alone, and rewrites study.json and summary.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..run.outputs import write_atomic
from .figures import draw_figures
from .report import aggregate, along_training, pairwise, summary_markdown
from .unseen import aggregate_unseen


def recompute(folder: Path) -> dict:
    path = folder / "study.json"
    try:
        study = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {path}: not a readable study.json ({exc})")
    study["variants"] = aggregate(study)
    study["pairwise"] = pairwise(study)
    study["along_training"] = along_training(study)
    study["unseen"] = aggregate_unseen(study)
    draw_figures(study, folder, say=lambda msg: None, names=STUDY_JSON_FIGURES)
    figures = sorted(p.name for p in (folder / "figures").glob("*.png"))
    write_atomic(path, json.dumps(study, indent=2))
    write_atomic(folder / "summary.md", summary_markdown(study, figures))
    return study


STUDY_JSON_FIGURES = ("methods.png", "success_vs_vote_threshold.png", "validation_success.png", "validation_differences.png")  # the figures that read nothing but the study dict


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harmodt.study.recompute",
                                description="Recompute a study's statistics from FOLDER/study.json; rewrite study.json and summary.md.")
    p.add_argument("folders", nargs="+", type=Path, help="study folders (each with a study.json)")
    for folder in p.parse_args(argv).folders:
        recompute(folder)
        print(f"rewrote {folder / 'study.json'} and {folder / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
