"""Unseen tasks in a study (``--eval-tasks``): every finished run's final checkpoint evaluated on
tasks it was not trained on, as Eq. 13 does.

A masked model (HarmoDT-R/M/F) acts on a held-out task through the voted mask at each threshold T
(a weight is active when more than T training tasks keep it) and the task's own prompt; a dense
prompted model (Prompt-DT) through its prompt alone, once; a model conditioned on the task ID
(MTDT) cannot name an unseen task and is skipped with a note. Results are aggregated per arm and
threshold with 95 % t-intervals over seeds, beside the same runs' training-task success (the upper
reference) and the density of the voted mask.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..files import loads_json
from ..methods import METHODS, REFERENCE
from .plan import StudyError
from .stats import SEED_LEVEL_METHOD, fmt, paired_difference, t_interval

SKIP_NOTE = "conditioned on the task ID (as MTDT): it cannot act on a task it was not trained on"


def default_thresholds(n_tasks: int) -> list[int]:
    """N/4, N/2 and 3N/4 of the N training tasks, rounded half up, at least 1 and below N (a
    threshold of N or more keeps no weight), without repeats."""
    out = []
    for frac in (0.25, 0.5, 0.75):
        t = min(max(1, math.floor(frac * n_tasks + 0.5)), n_tasks - 1)
        if t not in out:
            out.append(t)
    return out


def parse_thresholds(text: str | None, n_tasks: int) -> list[int]:
    """``--vote-thresholds T1,T2,...`` (default :func:`default_thresholds`), each in 0..N-1."""
    if not text:
        return default_thresholds(n_tasks)
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise StudyError(f"--vote-thresholds must be a comma list of integers, got {text!r}") from None
    if not vals or len(set(vals)) != len(vals):
        raise StudyError(f"--vote-thresholds must list distinct integers, got {text!r}")
    bad = [v for v in vals if not 0 <= v < n_tasks]
    if bad:
        raise StudyError(f"--vote-thresholds: {bad[0]} is outside 0..{n_tasks - 1} (a weight is voted in when more "
                         f"than T of the {n_tasks} training tasks keep it)")
    return vals


def unseen_mode(cfg: dict) -> str:
    """How a run's model acts on an unseen task: 'masked' (the voted mask and its prompt), 'dense'
    (its prompt) or 'skip' (it is conditioned on the task ID)."""
    method = METHODS[cfg["method"]]
    if method.resolve_conditioning(cfg.get("conditioning", "auto")) != "prompt":
        return "skip"
    return "masked" if method.masked else "dense"


def evaluation_keys(mode: str, thresholds: list[int]) -> list[int | None]:
    """The thresholds a run is evaluated at: each for a masked model, one (None) for a dense one."""
    return {"masked": list(thresholds), "dense": [None], "skip": []}[mode]


def voted_densities(ck_path: Path, thresholds: list[int]) -> dict[int, float]:
    """Fraction of the masked weights active in the voted mask (Eq. 13) at each threshold, from the
    checkpoint's task masks (loaded with the safe loader); {} for a checkpoint without masks."""
    from ..checkpoint import load
    from ..masks import TaskMasks

    ck = load(ck_path)
    if not ck.get("masks"):
        return {}
    masks = TaskMasks.from_state(ck["masks"], list(ck["eval_info"]["tasks"]))
    out = {}
    for t in thresholds:
        vote = masks.vote(t)
        out[t] = sum(int(v.sum()) for v in vote.values()) / sum(v.numel() for v in vote.values())
    return out


def collect_unseen(run, cfg: dict, thresholds: list[int]) -> dict:
    """A run's held-out results: ``{"mode", "evaluations": {"T" or "dense": {...}}}`` (or a note)."""
    mode = unseen_mode(cfg)
    if mode == "skip":
        return {"mode": mode, "note": SKIP_NOTE, "evaluations": {}}
    evals = {}
    densities = None
    for t in evaluation_keys(mode, thresholds):
        path = run.unseen_path(t)
        if not path.exists():
            continue
        res = loads_json(path.read_text())
        entry = {"threshold": t, "tasks": res["tasks"], "mean_success": res["mean_success"],
                 "mean_return": float(np.mean([r["return"] for r in res["tasks"].values()]))}
        if t is not None:
            if densities is None:
                densities = voted_densities(run.dir / "checkpoint.pt", thresholds)
            entry["vote_density"] = densities.get(t)
        evals["dense" if t is None else str(t)] = entry
    return {"mode": mode, "evaluations": evals}


def _ci(values) -> dict:
    m, lo, hi = t_interval(values)
    return {"mean": m, "ci_low": lo, "ci_high": hi}


def aggregate_unseen(study: dict) -> list[dict]:
    """One row per (arm, threshold): per held-out task success and return with their t-intervals over
    seeds, the mean over held-out tasks, the voted mask's density, the arm's training-task success and,
    for every row but Prompt-DT's, the paired difference from Prompt-DT's held-out success."""
    finished = [r for r in study["runs"] if r["status"] == "finished" and r.get("unseen")]
    train = {v["variant"]: v for v in study["variants"]}
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in finished):
        runs = [r for r in finished if r["variant"] == variant]
        mode = runs[0]["unseen"]["mode"]
        base = {"variant": variant, "method": runs[0]["method"], "mode": mode}
        if mode == "skip":
            rows.append({**base, "note": runs[0]["unseen"]["note"]})
            continue
        ref = train.get(variant, {})
        reference = {k: ref[k] for k in ("mean_success", "ci_low", "ci_high") if k in ref}
        for key in (["dense"] if mode == "dense" else [str(t) for t in study["vote_thresholds"]]):
            evs = [(r["seed"], r["unseen"]["evaluations"][key]) for r in runs if key in r["unseen"]["evaluations"]]
            if not evs:
                continue
            per_task = {t: {"success": _ci([e["tasks"][t]["success"] for _, e in evs]),
                            "return": _ci([e["tasks"][t]["return"] for _, e in evs])} for t in study["eval_tasks"]}
            row = {**base, "threshold": None if key == "dense" else int(key), "seeds": [s for s, _ in evs],
                   **_ci([e["mean_success"] for _, e in evs]),
                   "mean_return": float(np.mean([e["mean_return"] for _, e in evs])),
                   "per_task": per_task, "train_tasks": reference}
            dens = [e["vote_density"] for _, e in evs if e.get("vote_density") is not None]
            if dens:
                row["vote_density"] = float(np.mean(dens))
            row["success_by_seed"] = {str(s): {t: e["tasks"][t]["success"] for t in study["eval_tasks"]}
                                      for s, e in evs}
            rows.append(row)
    reference = next((r for r in rows if r["method"] == REFERENCE and r["mode"] == "dense"), None)
    if reference is not None:
        ref_success = reference["success_by_seed"]
        for r in rows:
            if r is reference or r["mode"] == "skip":
                continue
            if p := paired_difference(r["success_by_seed"], ref_success, study["eval_tasks"], reference["variant"]):
                r["vs_reference"] = p
    return rows


def _cell(s: dict, nd=2) -> str:
    return f"{fmt(s['mean'], nd)} [{fmt(s['ci_low'], nd)}, {fmt(s['ci_high'], nd)}]"


def unseen_markdown(study: dict) -> list[str]:
    """The summary's section on the held-out tasks (no lines without ``--eval-tasks``)."""
    rows = study.get("unseen") or []
    if not study.get("eval_tasks"):
        return []
    lines = ["", "## Unseen tasks (Eq. 13)", "",
             f"Held-out tasks: {', '.join(study['eval_tasks'])}; {study['eval_episodes']} episodes each, seed "
             f"{study['eval_seed']}. "
             "Masked methods act through the voted mask at threshold T (a weight is active when more than T of the "
             f"{len(study['tasks'])} training tasks keep it) and the task's own prompt; dense prompted methods through "
             "the prompt alone (T does not apply). Mean over seeds with the 95 % t-interval over seeds; the training "
             "tasks' final success of the same runs is the upper reference; density: the fraction of masked weights "
             "the voted mask keeps (mean over seeds); Δ: held-out success minus Prompt-DT's, paired by seed, with its "
             f"95 % interval, a {SEED_LEVEL_METHOD} (in brackets); the (seed, held-out task) bootstrap interval "
             "follows as a secondary one.", ""]
    done = [r for r in rows if r["mode"] != "skip"]
    if done:
        lines += ["| method | T | voted-mask density | seeds | held-out success | 95 % CI | "
                  "Δ vs Prompt-DT [95 % CI] | held-out return | training tasks' success |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in done:
            ref = r["train_tasks"]
            train = (f"{fmt(ref['mean_success'])} [{fmt(ref.get('ci_low'))}, {fmt(ref.get('ci_high'))}]"
                     if ref else "–")
            p = r.get("vs_reference")
            delta = (f"{p['mean_diff']:+.3f} [{fmt(p['ci_low'])}, {fmt(p['ci_high'])}]; bootstrap "
                     f"[{p['pairs_bootstrap']['ci_low']:+.3f}, {p['pairs_bootstrap']['ci_high']:+.3f}]") if p else "–"
            lines.append(f"| {r['variant']} | {'–' if r['threshold'] is None else r['threshold']} | "
                         f"{fmt(r.get('vote_density'))} | {len(r['seeds'])} | {fmt(r['mean'])} | [{fmt(r['ci_low'])}, "
                         f"{fmt(r['ci_high'])}] | {delta} | {fmt(r['mean_return'], 1)} | {train} |")
        for what, nd in (("success", 2), ("return", 0)):
            lines += ["", f"{what.capitalize()} per held-out task (mean [95 % CI] over seeds):", "",
                      "| method | T | " + " | ".join(study["eval_tasks"]) + " |",
                      "|---|---|" + "---|" * len(study["eval_tasks"])]
            for r in done:
                cells = [_cell(r["per_task"][t][what], nd) for t in study["eval_tasks"]]
                lines.append(f"| {r['variant']} | {'–' if r['threshold'] is None else r['threshold']} | "
                             + " | ".join(cells) + " |")
    else:
        lines.append("No run has been evaluated on the held-out tasks yet.")
    for r in rows:
        if r["mode"] == "skip":
            lines += ["", f"{r['variant']}: not evaluated on the held-out tasks: {r['note']}."]
    return lines
