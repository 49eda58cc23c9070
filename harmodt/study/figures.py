"""The study's figures, one function each: it returns a matplotlib figure, or a sentence saying why
its data are missing. :func:`draw_figures` draws every one into ``OUT/figures``."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from ..methods import METHODS
from ..run.outputs import read_metrics
from .learned_masks import checkpoint_masks
from .stats import classical_mds, jaccard_matrix

# labelled variants (``--variant``, swept values) take one of the colours no method has, chosen by the label
# so that a variant has the same colour in every study
_VARIANT_COLORS = ["tab:brown", "tab:pink", "tab:olive", "black", "gold", "navy"]


def variant_color(variant: str) -> str:
    """A variant's colour in every figure: its method's own (harmodt.methods) for a method's plain label,
    a stable one of the colours no method uses for any other label."""
    own = {m.label: m.color for m in METHODS.values()}
    if variant in own:
        return own[variant]
    rest = [c for c in _VARIANT_COLORS if c not in own.values()]
    return rest[zlib.crc32(variant.encode()) % len(rest)]


def final_masks(ck_path: Path, tasks: list[str]) -> np.ndarray | None:
    """Boolean ``[T, P]``: every task's final mask over all masked weights (name order), or None for a
    missing or unreadable checkpoint or one without masks (:func:`checkpoint_masks`)."""
    got = checkpoint_masks(ck_path, tasks)
    if got is None:
        return None
    return np.concatenate([got[0][n].reshape(len(tasks), -1) for n in sorted(got[0])], axis=1)


@dataclass
class Figures:
    """What the figures read: the study dict and its run folders."""
    study: dict
    out: Path
    plt: object = field(repr=False)

    @cached_property
    def variants(self) -> list[dict]:
        return [v for v in self.study["variants"] if "mean_success" in v]

    @cached_property
    def finished(self) -> list[dict]:
        return [r for r in self.study["runs"] if r["status"] == "finished"]

    @cached_property
    def metrics(self) -> dict[str, list[dict]]:
        return {r["name"]: read_metrics(self.out / "runs" / r["name"] / "metrics.jsonl") for r in self.finished}

    @cached_property
    def colors(self) -> dict:
        """Each variant's :func:`variant_color`, or, where an earlier variant has it, the next free one."""
        colors = {v["variant"]: variant_color(v["variant"]) for v in self.study["variants"]}
        free = [c for c in _VARIANT_COLORS if c not in {m.color for m in METHODS.values()} | set(colors.values())]
        for i, n in enumerate(colors):
            if colors[n] in list(colors.values())[:i] and free:
                colors[n] = free.pop(0)
        return colors

    def series(self, variant: str, key: str) -> dict[str, list]:
        """{run name: [(step, value)]} of one metrics key for the variant's finished runs."""
        res = {}
        for r in self.finished:
            pts = [(m["step"], m[key]) for m in self.metrics[r["name"]] if key in m] if r["variant"] == variant else []
            if pts:
                res[r["name"]] = pts
        return res

    def curves(self, key: str) -> dict[str, dict]:
        return {v["variant"]: c for v in self.variants if (c := self.series(v["variant"], key))}

    @cached_property
    def mask_similarity(self) -> list[tuple[str, np.ndarray, int]]:
        """(variant, mean task x task Jaccard matrix of its runs' final masks, runs) for variants with masks."""
        out = []
        for v in self.variants:
            mats = [jaccard_matrix(m) for r in self.finished if r["variant"] == v["variant"]
                    if (m := final_masks(self.out / "runs" / r["name"] / "checkpoint.pt",
                                         self.study["tasks"])) is not None]
            if mats:
                out.append((v["variant"], np.mean(mats, 0), len(mats)))
        return out


def _mean_curve(curves: dict):
    steps = sorted(set.intersection(*[{s for s, _ in c} for c in curves.values()]))
    return steps, [float(np.mean([dict(c)[s] for c in curves.values()])) for s in steps]


def _curves_figure(f: Figures, curves: dict, ylabel: str, title: str, seeds: bool):
    """One line per variant (its mean over seeds) against training steps; ``seeds``: each seed thin too."""
    fig, ax = f.plt.subplots(figsize=(6, 3.8))
    for name, c in curves.items():
        if seeds:
            for pts in c.values():
                ax.plot(*zip(*pts), color=f.colors[name], alpha=0.25, lw=0.8)
        steps, mean = _mean_curve(c)
        if steps:
            ax.plot(steps, mean, color=f.colors[name], lw=2, marker="o", ms=3, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def _err(rows: list[dict], mean="mean_success") -> list[list[float]]:
    return [[r[mean] - r["ci_low"] if not math.isnan(r["ci_low"]) else 0 for r in rows],
            [r["ci_high"] - r[mean] if not math.isnan(r["ci_high"]) else 0 for r in rows]]


def _lower_limit(rows: list[dict], mean="mean_success") -> float:
    """The y axis' bottom: 0 unless an interval reaches below it (then its lowest bound), never clipping a bar."""
    lows = [r["ci_low"] for r in rows if not math.isnan(r["ci_low"])] + [r[mean] for r in rows]
    return min(0.0, min(lows)) - 0.02


def methods_figure(f: Figures):
    """Mean success per variant with its 95 % CI and the seeds (Tables 1-2)."""
    if not f.variants:
        return "no run has been evaluated"
    fig, ax = f.plt.subplots(figsize=(max(5.5, 1.2 * len(f.variants) + 1.5), 3.8))
    xs = np.arange(len(f.variants))
    ax.bar(xs, [v["mean_success"] for v in f.variants], yerr=_err(f.variants), capsize=5,
           color=[f.colors[v["variant"]] for v in f.variants], alpha=0.8)
    for x, v in zip(xs, f.variants):
        seeds = list(v["per_seed"].values())
        ax.scatter([x] * len(seeds), seeds, color="k", s=12, zorder=3)
    ax.set_xticks(xs, [v["variant"].replace(" ", "\n", 1) for v in f.variants], fontsize=8)
    ax.set_ylabel("mean success over tasks")
    ax.set_ylim(_lower_limit(f.variants), 1.05)
    ax.set_title(f"Mean success on {len(f.study['tasks'])} tasks\n(bars: mean and 95 % CI over seeds; dots: seeds)",
                 fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return fig


def eval_curves_figure(f: Figures):
    """The trainer's evaluation success against steps (``--eval-every``)."""
    curves = f.curves("eval_mean_success")
    if not curves:
        return "no run logged eval_mean_success during training (pass --eval-every)"
    return _curves_figure(f, curves, "evaluation success (in training)",
                          "Evaluation success during training (thin: seeds; thick: mean)",
                          seeds=True)


def harmony_figure(f: Figures):
    """The averaged harmony score against steps (Figure 2a)."""
    curves = f.curves("harmony_score")
    if not curves:
        return "no run logged harmony_score (no mask update happened)"
    return _curves_figure(f, curves, "averaged harmony score (Def. 3.2)",
                          f"Harmony of the task gradients on {len(f.study['tasks'])} tasks (mean over seeds)",
                          seeds=False)


def sweep_figure(f: Figures):
    """Success against the swept value (Figure 2b); unswept arms as level lines."""
    sweep = f.study["sweep"]
    if sweep is None:
        return "the study has no --sweep"
    if not any(v["sweep_value"] is not None for v in f.variants):
        return "no run of a swept value has been evaluated"
    values = sweep["values"]
    fig, ax = f.plt.subplots(figsize=(5.5, 3.8))
    try:
        xv, numeric = [float(v) for v in values], True
    except ValueError:
        xv, numeric = list(range(len(values))), False
    for arm in dict.fromkeys(v["arm"] for v in f.variants if v["sweep_value"] is not None):
        pts = [(x, v) for x, val in zip(xv, values) for v in f.variants if v["arm"] == arm and v["sweep_value"] == val]
        label = pts[0][1]["variant"].rsplit(" ", 1)[0]
        ax.errorbar([p[0] for p in pts], [p[1]["mean_success"] for p in pts], yerr=_err([p[1] for p in pts]),
                    marker="o", capsize=4, label=label)
    for v in f.variants:
        if v["sweep_value"] is None:
            ax.axhline(v["mean_success"], ls="--", lw=1, color=f.colors[v["variant"]],
                       label=f"{v['variant']} (not swept, mean)")
    if numeric and min(xv) > 0 and max(xv) / min(xv) >= 20:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(xv, values)
    ax.set_xlabel(sweep["key"])
    ax.set_ylabel("mean success over tasks")
    ax.set_title(f"Success against {sweep['key']} (mean and 95 % CI over seeds)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def _mask_panels(f: Figures, width: float, height: float):
    """Short task names, a figure and one panel per masked variant of ``f.mask_similarity``."""
    short = [t.replace("-v3", "") for t in f.study["tasks"]]
    fig, axes = f.plt.subplots(1, len(f.mask_similarity), figsize=(width * len(f.mask_similarity), height),
                               squeeze=False)
    return short, fig, axes[0]


def jaccard_figure(f: Figures):
    """Task x task Jaccard similarity of the final masks (Figure 5)."""
    if not f.mask_similarity:
        return "no evaluated run has masks"
    short, fig, axes = _mask_panels(f, 4.6, 4.4)
    for ax, (name, jac, n) in zip(axes, f.mask_similarity):
        diag = np.eye(len(jac), dtype=bool)
        off = jac[~diag]
        # one scale for every panel and study, 0 to 1, with the diagonal (always 1) left blank
        im = ax.imshow(np.where(diag, np.nan, jac), vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(len(short)), short, rotation=90, fontsize=6)
        ax.set_yticks(range(len(short)), short, fontsize=6)
        spread = f"; off-diagonal {off.min():.3f} to {off.max():.3f}" if off.size else ""
        ax.set_title(f"{name} (mean of {n} seed{'s' if n > 1 else ''}{spread})", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, label="Jaccard")
    fig.suptitle("Jaccard similarity of the tasks' final masks (scale 0 to 1, diagonal blank)", fontsize=10)
    return fig


def mds_figure(f: Figures):
    """The tasks' final masks in 2-D: classical MDS of 1 - Jaccard (Figure 5)."""
    if not f.mask_similarity:
        return "no evaluated run has masks"
    short, fig, axes = _mask_panels(f, 4.4, 4.0)
    for ax, (name, jac, _) in zip(axes, f.mask_similarity):
        xy, explained = classical_mds(1.0 - jac)
        ax.scatter(xy[:, 0], xy[:, 1], c=range(len(short)), cmap="tab10" if len(short) <= 10 else "viridis")
        for (x, y), s in zip(xy, short):
            ax.annotate(s, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_xlabel(f"MDS 1 ({explained[0]:.0%} of the variance)")
        ax.set_ylabel(f"MDS 2 ({explained[1]:.0%} of the variance)")
        ax.set_title(name, fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Tasks' final masks in 2-D (classical MDS of 1 - Jaccard)", fontsize=10)
    return fig


def mask_changed_figure(f: Figures):
    """Fraction of each task's mask changed since initialisation, against steps."""
    changed = f.curves("mask_changed_fraction")
    if not changed:
        return "no run logged mask_changed_fraction (HarmoDT-M/F with a mask update)"
    fig, axes = f.plt.subplots(1, len(changed), figsize=(4.6 * len(changed), 3.8), squeeze=False)
    for ax, (name, c) in zip(axes[0], changed.items()):
        steps = sorted(set.intersection(*[{s for s, _ in pts} for pts in c.values()]))
        per = np.array([[np.asarray(dict(pts)[s]) for s in steps] for pts in c.values()]).mean(0)  # (steps, tasks)
        for i, t in enumerate(f.study["tasks"]):
            ax.plot(steps, per[:, i] * 100, lw=1.2, label=t.replace("-v3", ""))
        ax.set_xlabel("training step")
        ax.set_ylabel("% of the task's mask changed since init")
        ax.set_title(f"{name} (mean of {len(c)} seed{'s' if len(c) > 1 else ''})", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.suptitle("Mask movement since the ERK initialisation", fontsize=10)
    return fig


def unseen_figure(f: Figures):
    """Held-out success against the vote threshold (Eq. 13): a line per masked arm, dense arms as bands."""
    if not f.study.get("eval_tasks"):
        return "the study has no --eval-tasks"
    rows = [r for r in f.study.get("unseen") or [] if r["mode"] != "skip"]
    if not rows:
        return "no run has been evaluated on the held-out tasks"
    fig, ax = f.plt.subplots(figsize=(5.5, 3.8))
    masked = list(dict.fromkeys(r["variant"] for r in rows if r["mode"] != "dense"))
    ts = sorted(f.study["vote_thresholds"])
    dodge = 0.04 * (ts[-1] - ts[0] if len(ts) > 1 else 1)
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        color = f.colors.get(variant)
        if mine[0]["mode"] == "dense":
            r = mine[0]
            ax.axhline(r["mean"], color=color, lw=1.5, label=f"{variant} (its prompt; band: 95 % CI)")
            if not math.isnan(r["ci_low"]):
                ax.axhspan(r["ci_low"], r["ci_high"], color=color, alpha=0.15)
            continue
        # masked arms side by side around each T, so arms with equal results do not hide each other
        shift = dodge * (masked.index(variant) - (len(masked) - 1) / 2)
        ax.errorbar([r["threshold"] + shift for r in mine], [r["mean"] for r in mine], yerr=_err(mine, "mean"),
                    marker="o", capsize=4, color=color, label=f"{variant} (voted mask)")
    ax.set_xticks(f.study["vote_thresholds"])
    ax.set_xlabel(f"vote threshold T (of {len(f.study['tasks'])} training tasks)")
    ax.set_ylabel("mean success on held-out tasks")
    ax.set_ylim(_lower_limit(rows, "mean"), 1.02)
    what = "goals" if all("@" in t for t in f.study["eval_tasks"]) else "tasks"  # TASK@gN / TASK@testN: goal variations
    ax.set_title(f"Unseen {what} ({len(f.study['eval_tasks'])}): success against T (mean and 95 % CI over seeds)",
                 fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def validation_success_figure(f: Figures):
    """Success on the validation goals against training steps per variant: mean over seeds, its 95 %
    t-interval as a band, each seed thin (study.json's ``along_training``)."""
    at = f.study.get("along_training")
    if not at or not at["variants"]:
        return "no run evaluated on validation goals during training (pass --validation-seed and --eval-every)"
    fig, ax = f.plt.subplots(figsize=(6, 3.8))
    for v, per_step in at["variants"].items():
        color = f.colors[v]
        for r in f.finished:
            if r["variant"] == v and r.get("validation_curve"):
                ax.plot(*zip(*r["validation_curve"]), color=color, alpha=0.25, lw=0.8)
        steps = [int(s) for s in per_step]
        rows = list(per_step.values())
        n = rows[-1]["seeds"]
        ax.plot(steps, [r["mean"] for r in rows], color=color, lw=2, marker="o", ms=3,
                label=f"{v} ({n} seed{'' if n == 1 else 's'})")
        if all(not math.isnan(r["ci_low"]) for r in rows):
            ax.fill_between(steps, [r["ci_low"] for r in rows], [r["ci_high"] for r in rows], color=color, alpha=0.15,
                            lw=0)
    ax.set_xlabel("training step")
    ax.set_ylabel("mean success (validation goals)")
    ax.set_title("Success on the validation goals during training\n(thick: mean over seeds; band: its 95 % t-interval; "
                 "thin: seeds)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def validation_differences_figure(f: Figures):
    """Each comparison of ``along_training`` (against Prompt-DT; learned against random masks) against
    training steps: the mean paired difference and its seed-level 95 % interval."""
    at = f.study.get("along_training")
    if not at or not at["differences"]:
        return "no two variants evaluated on validation goals share a seed"
    diffs = at["differences"]
    fig, ax = f.plt.subplots(figsize=(6.5, 3.8))
    all_steps = sorted({int(s) for d in diffs for s in d["per_step"]})
    width = 0.6 * max(1, min(np.diff(all_steps), default=1)) / max(1, len(diffs))
    for i, d in enumerate(diffs):
        steps = np.array([int(s) for s in d["per_step"]], dtype=float) + (i - (len(diffs) - 1) / 2) * width
        rows = list(d["per_step"].values())
        means = [r["mean_diff"] for r in rows]
        err = [[r["mean_diff"] - r["ci_low"] if not math.isnan(r["ci_low"]) else 0 for r in rows],
               [r["ci_high"] - r["mean_diff"] if not math.isnan(r["ci_high"]) else 0 for r in rows]]
        ref = METHODS.get(next((r["method"] for r in f.study["runs"] if r["variant"] == d["reference"]), ""))
        ax.errorbar(steps, means, yerr=err, marker="o", ms=4, capsize=3, color=f.colors[d["variant"]],
                    # dashed: against random (fixed) masks
                    ls="--" if ref is not None and ref.masks == "fixed" else "-",
                    label=f"{d['variant']} − {d['reference']}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("Δ mean success (validation goals)")
    ax.set_title(f"Paired differences during training: mean over seeds and 95 % interval\n({at['interval']})",
                 fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


FIGURES = {"methods.png": methods_figure, "eval_success_vs_steps.png": eval_curves_figure,
           "harmony_vs_steps.png": harmony_figure,
           "success_vs_sweep.png": sweep_figure, "mask_jaccard.png": jaccard_figure, "mask_mds.png": mds_figure,
           "mask_changed_vs_steps.png": mask_changed_figure, "success_vs_vote_threshold.png": unseen_figure,
           "validation_success.png": validation_success_figure,
           "validation_differences.png": validation_differences_figure}


def draw_figures(study: dict, out: Path, say=print, names=None) -> list[Path]:
    """Draw every figure whose data exist into ``out/figures`` (run folders under ``out/runs``); print a note for
    the rest.
    ``names``: only these figures (the others are left as they are)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    f = Figures(study, out, plt)
    written = []
    for name, draw in FIGURES.items():
        if names is not None and name not in names:
            continue
        # a figure whose data are gone (or not there yet) is not left from an earlier report
        (fig_dir / name).unlink(missing_ok=True)
        fig = draw(f)
        if isinstance(fig, str):
            say(f"figure {name} skipped: {fig}")
            continue
        fig.tight_layout()
        fig.savefig(fig_dir / name, dpi=110)
        plt.close(fig)
        written.append(fig_dir / name)
    return written
