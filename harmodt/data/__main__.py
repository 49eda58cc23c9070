"""`python -m harmodt.data generate --tasks TASKS --episodes E --out DIR [--seed S] [--workers W]
[--prompt-episodes P]`,
`python -m harmodt.data card --tasks TASKS --out DIR [--goals N] [--workers W]` (a data card of the
scripted experts and the curriculum: harmodt/data/card.py),
`python -m harmodt.data inspect DATA` (layout, tasks, episodes, success rates; DATA in any of the three layouts)
and `python -m harmodt.data export DIR --minari OUT` (our folder DIR as Minari datasets under the Minari root OUT).
Bad input prints one line `error: ...` and exits with status 2."""

from __future__ import annotations

import signal
import sys
from concurrent.futures.process import BrokenProcessPool

from pathlib import Path

import numpy as np

from ..files import FolderLock
from ..oneline import OneLineParser, run_tool
from ..ownership import check_data_folder
from ..tasks import TASKS_HELP, parse_tasks
from . import card
from .formats import DataError
from .generator import CURRICULUM, generate
from .load import detect_layout, load_dataset
from .minari import export_minari


def _curve_plot(curve: list[float], out: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([f"{10 * i}-{10 * i + 10}%" for i in range(10)], curve, color="tab:blue")
    ax.set_ylim(0, 1)
    ax.set_ylabel("episode success rate")
    ax.set_xlabel("episode index decile (per task)")
    ax.set_title("curriculum: random -> expert")
    ax.tick_params(axis="x", labelsize=7, rotation=45)
    fig.tight_layout()
    path = f"{out}/curriculum.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m harmodt.data", description="Generate, inspect or export offline Meta-World data.")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="roll out the scripted experts with a random-to-expert curriculum")
    g.add_argument("--tasks", required=True, help=TASKS_HELP)
    g.add_argument("--episodes", type=int, required=True, help="curriculum episodes per task")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--seed", type=int, default=0, help="seed (same seed, same data)")
    g.add_argument("--workers", type=int, default=None, help="parallel processes (default: one per core)")
    g.add_argument("--prompt-episodes", type=int, default=2, help="noise-free expert prompt episodes per task")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a data set of other settings or tasks already in --out (its files are removed)")
    i = sub.add_parser("inspect", help="summarize data (ours, the original layout, or Minari datasets)")
    i.add_argument("path", help="data folder, Minari root or dataset folder, or comma list of Minari dataset ids")
    e = sub.add_parser("export", help="write our data folder as Minari datasets, one per task")
    e.add_argument("path", help="our data folder (with manifest.json)")
    e.add_argument("--minari", required=True, metavar="OUT", help="Minari root to write the datasets under")
    card.add_parser(sub)
    args = p.parse_args(argv)
    return run_tool(lambda: _run(args), "[harmodt.data] interrupted: finished tasks are kept; run the same command "
                    "again to continue",
                    (DataError, ValueError, OSError, RuntimeError))


def _run(args) -> int:
    """The chosen subcommand."""
    try:
        if args.cmd == "generate":
            tasks = parse_tasks(args.tasks)
            # Ctrl-C stops it, also when started with SIGINT ignored
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if args.workers is not None and args.workers < 1:
                raise ValueError(f"--workers must be at least 1, got {args.workers}")
            check_data_folder(args.out)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            with FolderLock(args.out, "--out"):  # one writer per data folder
                _generate(args, tasks)
        elif args.cmd == "card":
            for path in card.run(args):
                print(f"wrote {path}")
        elif args.cmd == "export":
            for ds_id in export_minari(args.path, args.minari):
                print(f"wrote Minari dataset {ds_id} under {args.minari}")
        else:
            layout = detect_layout(args.path)
            data = load_dataset(args.path)
            print(f"{args.path}: {layout} layout, {len(data)} tasks")
            for t, td in data.items():
                steps = sum(len(tr.rewards) for tr in td.trajectories)
                succ = [bool(tr.successes.any()) for tr in td.trajectories if tr.successes is not None]
                rate = f"success {np.mean(succ):.2f}" if succ else "success n/a"
                print(f"  {t:<32} episodes {len(td.trajectories):5d}  steps {steps:8d}  prompts {len(td.prompts)}  "
                      f"{rate}")
    except BrokenProcessPool as exc:
        raise DataError(f"a generation worker stopped ({exc}); finished tasks are kept: "
                        "run the same command again") from None
    return 0


def _generate(args, tasks: list[str]) -> None:
    """``generate``: the data set, its summary lines and its curriculum plot."""
    m = generate(tasks, args.episodes, args.out, seed=args.seed, workers=args.workers,
                 prompt_episodes=args.prompt_episodes, progress=not args.no_progress, overwrite=args.overwrite)
    curve = m["curriculum_success_by_decile"]
    print(f"wrote {len(tasks)} tasks x {args.episodes} episodes to {args.out} in {m['seconds']} s")
    print(f"curriculum: {CURRICULUM}")
    print("success by episode decile: " + "  ".join(f"{c:.2f}" for c in curve))
    for t, r in m["files"].items():
        print(f"  {t:<32} success {r['success_rate']:.2f}  steps {r['steps']}  prompts ok "
              f"{sum(r['prompt_success'])}/{len(r['prompt_success'])}")
    plot = _curve_plot(curve, args.out)
    if plot:
        print(f"curve plot: {plot}")


if __name__ == "__main__":
    sys.exit(main())
