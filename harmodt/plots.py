"""Training curves as a picture: `python -m harmodt.plots RUN_DIR` writes RUN_DIR/curves.png.

Panels: training loss, averaged harmony score (Definition 3.2) at each mask update, steps per
second, and evaluation success when the run evaluated. Training writes it at the end too. A step
logged more than once is drawn with its last record.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .files import loads_json
from .run import outputs
from .run.outputs import last_per_step


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``RUN_DIR/metrics.jsonl`` (harmodt.run.outputs.read_metrics); FileNotFoundError
    when the folder has none."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (is {run_dir} a training output folder?)")
    return outputs.read_metrics(path)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    recs = read_metrics(run_dir)
    series = {
        "training loss": last_per_step(recs, "loss"),
        "harmony score (Def. 3.2)": last_per_step(recs, "harmony_score"),
        "steps per second": last_per_step(recs, "steps_per_s"),
        "evaluation success": last_per_step(recs, "eval_mean_success"),
    }
    series = {k: v for k, v in series.items() if v}
    fig, axes = plt.subplots(1, max(len(series), 1), figsize=(4.2 * max(len(series), 1), 3.2), squeeze=False)
    for ax, (title, pts) in zip(axes[0], series.items()):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    cfg_path = run_dir / "config.json"
    if cfg_path.exists():
        cfg = loads_json(cfg_path.read_text())
        fig.suptitle(f"{cfg.get('method')} on {cfg.get('tasks')}", fontsize=10)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def draw_curves(run_dir: str | Path) -> Path | None:
    """:func:`plot_run` at the end of training; None without matplotlib (the curves stay in
    metrics.jsonl and TensorBoard)."""
    try:
        return plot_run(run_dir)
    except ImportError:
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m harmodt.plots RUN_DIR", file=sys.stderr)
        return 2
    try:
        print(plot_run(argv[0]))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
