"""Learned masks against random ones: what Algorithm 2 changed in a HarmoDT-F (or -M) run, measured
against the HarmoDT-R run of the same seed.

HarmoDT-R keeps its ERK draw; a learned run of the same seed starts from that very draw (both seed it
with ``seed + 1``), so the R run's masks are the learned run's initial masks. For every such pair
this module measures, per task: the fraction of the learned mask still in the random one, how much
the task masks overlap each other (mean pairwise Jaccard) before and after, which weight matrices the
changes went to, how widely the recovered weights are shared with other tasks and how large they
are, the harmony score over training of both runs, and the per-task success difference.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..methods import METHODS
from ..run.outputs import read_metrics
from .stats import fmt, jaccard_matrix


def checkpoint_masks(ck_path: Path, tasks: list[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
    """``({weight name: bool [T, N, K]}, {weight name: float [N, K]})`` of a checkpoint with masks, or None."""
    from ..checkpoint import CheckpointError, load
    from ..masks import TaskMasks

    try:
        ck = load(ck_path)
    except CheckpointError:
        return None
    if not ck.get("masks"):
        return None
    masks = {n: m.numpy() for n, m in TaskMasks.from_state(ck["masks"], tasks).masks.items()}
    names = list(masks)
    weights = {n: ck["model"][n].float().numpy() for n in names}
    return masks, weights


def _mean_pairwise_jaccard(flat: np.ndarray) -> float:
    """Mean Jaccard index over every two different rows of a bool ``[T, P]`` (:func:`jaccard_matrix`)."""
    t = flat.shape[0]
    return float(np.mean(jaccard_matrix(flat)[np.triu_indices(t, 1)])) if t > 1 else float("nan")


def _matrix_kind(name: str) -> str:
    """``blocks.2.attn.qkv.weight`` -> ``attn.qkv``: a weight matrix's role with its block index removed."""
    return re.sub(r"^blocks\.\d+\.", "", name).removesuffix(".weight")


def compare_pair(learned: dict[str, np.ndarray], random: dict[str, np.ndarray], weights: dict[str, np.ndarray]) -> dict:
    """Measures of a learned run's final masks against its seed's random masks (its initial ones).

    ``learned`` and ``random``: ``{weight name: bool [T, N, K]}``; ``weights``: the learned run's
    final weights ``{name: [N, K]}``. Fractions are per task, then averaged unless named per task.
    """
    names = list(random)
    flat_l = np.concatenate([learned[n].reshape(learned[n].shape[0], -1) for n in names], axis=1)
    flat_r = np.concatenate([random[n].reshape(random[n].shape[0], -1) for n in names], axis=1)
    w = np.abs(np.concatenate([weights[n].reshape(-1) for n in names]))
    active = flat_l.sum(1)
    recovered = flat_l & ~flat_r  # active now, not in the initial draw
    dropped = flat_r & ~flat_l
    kept = (flat_l & flat_r).sum(1) / np.maximum(flat_r.sum(1), 1)
    changed = recovered.sum(1) / np.maximum(active, 1)
    keepers = flat_l.sum(0)  # how many tasks keep each weight at the end
    n_tasks = flat_l.shape[0]

    active_median = float(np.median(np.concatenate([w[s] for s in flat_l])))

    # mean number of *other* tasks keeping the selected (task, weight) entries
    def sharing(sel: np.ndarray, own: int) -> float:
        rows = [keepers[s] - own for s in sel if s.any()]  # own: 1 where the task itself keeps them
        return float(np.mean(np.concatenate(rows))) if rows else float("nan")

    # median |w| of the selected entries over that of every task's active entries
    def magnitude(sel: np.ndarray) -> float:
        rows = [w[s] for s in sel if s.any()]
        return float(np.median(np.concatenate(rows)) / active_median) if rows else float("nan")

    by_kind: dict[str, list[float]] = {}
    for n in names:
        a = learned[n].reshape(n_tasks, -1)
        r = random[n].reshape(n_tasks, -1)
        by_kind.setdefault(_matrix_kind(n), []).append(float(((a & ~r).sum() / max(a.sum(), 1))))
    return {
        "tasks": n_tasks,
        "kept_of_random": float(kept.mean()), "changed_fraction": float(changed.mean()),
        "changed_fraction_min": float(changed.min()), "changed_fraction_per_task": changed.tolist(),
        "task_jaccard_random": _mean_pairwise_jaccard(flat_r), "task_jaccard_learned": _mean_pairwise_jaccard(flat_l),
        "changed_by_matrix": {k: float(np.mean(v)) for k, v in by_kind.items()},
        "other_tasks_keeping_recovered": sharing(recovered, 1), "other_tasks_keeping_dropped": sharing(dropped, 0),
        "other_tasks_keeping_active": sharing(flat_l, 1), "other_tasks_max": n_tasks - 1,
        "magnitude_recovered": magnitude(recovered), "magnitude_dropped": magnitude(dropped),
    }


def _harmony(metrics: list[dict]) -> dict | None:
    pts = [(m["step"], m["harmony_score"]) for m in metrics if "harmony_score" in m]
    if not pts:
        return None
    return {"first": pts[0][1], "first_step": pts[0][0], "last": pts[-1][1], "last_step": pts[-1][0],
            "mean": float(np.mean([v for _, v in pts]))}


def _masks(run: dict) -> str:
    """How a run's method treats its masks (harmodt.methods.Method.masks); "none" for an unknown method."""
    method = METHODS.get(run["method"])
    return "none" if method is None else method.masks


def compare_learned_masks(study: dict, out: Path) -> list[dict]:
    """One entry per finished learned-mask run (HarmoDT-F/-M, any variant) whose seed has a finished
    HarmoDT-R run at the same swept value: the :func:`compare_pair` measures, both runs' harmony
    score over training and the per-task success difference learned minus random."""
    finished = [r for r in study["runs"] if r["status"] == "finished"]
    sweep_value = lambda r: (r.get("sweep") or {}).get("value")  # noqa: E731
    randoms = {(r["seed"], sweep_value(r)): r for r in finished if r["arm"] == r["method"] and _masks(r) == "fixed"}
    tasks = study["tasks"]
    res = []
    for r in finished:
        if _masks(r) != "learned" or (base := randoms.get((r["seed"], sweep_value(r)))) is None:
            continue
        got_l = checkpoint_masks(out / "runs" / r["name"] / "checkpoint.pt", tasks)
        got_r = checkpoint_masks(out / "runs" / base["name"] / "checkpoint.pt", tasks)
        if got_l is None or got_r is None:
            continue
        entry = {"run": r["name"], "variant": r["variant"], "random_run": base["name"], "seed": r["seed"],
                 **compare_pair(got_l[0], got_r[0], got_l[1])}
        entry["harmony_learned"] = _harmony(read_metrics(out / "runs" / r["name"] / "metrics.jsonl"))
        entry["harmony_random"] = _harmony(read_metrics(out / "runs" / base["name"] / "metrics.jsonl"))
        entry["success_diff_per_task"] = {t: r["tasks"][t]["success"] - base["tasks"][t]["success"] for t in tasks}
        entry["success_diff"] = float(np.mean(list(entry["success_diff_per_task"].values())))
        res.append(entry)
    return res


def learned_masks_markdown(study: dict) -> list[str]:
    """summary.md's section on learned against random masks (nothing without such a pair)."""
    rows = study.get("learned_masks") or []
    if not rows:
        return []
    lines = ["", "## Learned masks against random masks", "",
             "Each learned-mask run against the HarmoDT-R run of its seed, whose masks are the learned run's initial "
             "ones. Kept: fraction of the random mask still active at the end (mean over tasks). Changed: fraction of "
             "the final mask not in the random one (mean; min over tasks). Jaccard: mean over every two tasks of their "
             "masks' overlap, random then learned. Sharing: how many of the other tasks keep a weight at the end, for "
             "the weights a task recovered, for those it dropped, and for all its active weights. |w|: median final "
             "magnitude of the recovered and of the dropped weights over that of all active weights. Harmony: the "
             "score at the first and last mask update, learned run (random run). Δ success: learned minus random, "
             "mean over tasks.", "",
             "| run | kept | changed (min) | Jaccard R → learned | sharing: recovered / dropped / active | "
             "|w| recovered / dropped | harmony first → last | Δ success |",
             "|---|---|---|---|---|---|---|---|"]
    for e in rows:
        hl, hr = e.get("harmony_learned") or {}, e.get("harmony_random") or {}
        lines.append(
            f"| {e['run']} | {fmt(e['kept_of_random'])} | {fmt(e['changed_fraction'], 4)} "
            f"({fmt(e['changed_fraction_min'], 4)}) | {fmt(e['task_jaccard_random'])} → "
            f"{fmt(e['task_jaccard_learned'])} | {fmt(e['other_tasks_keeping_recovered'], 2)} / "
            f"{fmt(e['other_tasks_keeping_dropped'], 2)} / {fmt(e['other_tasks_keeping_active'], 2)} of "
            f"{e['other_tasks_max']} | {fmt(e['magnitude_recovered'], 2)} / {fmt(e['magnitude_dropped'], 2)} | "
            f"{fmt(hl.get('first'))} → {fmt(hl.get('last'))} ({fmt(hr.get('first'))} → {fmt(hr.get('last'))}) | "
            f"{e['success_diff']:+.3f} |")
    kinds = list(rows[0]["changed_by_matrix"])
    lines += ["", "Changed fraction by weight matrix (mean over blocks and tasks):", "",
              "| run | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for e in rows:
        lines.append(f"| {e['run']} | " + " | ".join(fmt(e["changed_by_matrix"].get(k), 4) for k in kinds) + " |")
    return lines
