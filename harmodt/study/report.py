"""The study's report: each run's entry (final and best success, mask movement), the aggregate per
arm with t-intervals and paired bootstrap differences, and summary.md (the comparisons between
arms: harmodt/study/comparisons.py; how far masks may move: mask_movement.py)."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np

from ..files import loads_json
from ..methods import METHODS, REFERENCE
from ..run.outputs import read_metrics
from .comparisons import along_training_markdown, family_markdown, interval_text, paired_success, pairwise_markdown
from .learned_masks import learned_masks_markdown
from .mask_movement import mask_flips_bound_fraction, mask_schedules
from .stats import SEED_LEVEL_METHOD, fmt as _fmt, t_interval
from .unseen import unseen_markdown


def run_entry(run, eval_episodes: int, eval_seed: int) -> dict:
    """A run's entry in study.json: its arm, status, times, config and, once evaluated, its results."""
    rec = run.record()
    entry = {"name": run.name, "arm": run.arm.key, "method": run.method, "seed": run.seed, "variant": run.variant,
             "sweep": None if run.sweep is None else {"key": run.sweep[0], "value": run.sweep[1]},
             "status": "finished" if run.finished() else "missing",
             "train_seconds": rec.get("train_seconds"), "eval_seconds": rec.get("eval_seconds"),
             "revisions": rec.get("revisions"), "machines": rec.get("machines"),
             "train_command": None if not rec.get("train_args") else "python -m harmodt.train "
             + shlex.join(rec["train_args"])}
    cfg_path = run.dir / "config.json"
    if cfg_path.exists():
        entry["config"] = loads_json(cfg_path.read_text())
    if not run.finished():
        return entry
    res = loads_json(run.eval_path.read_text())
    entry["tasks"] = res["tasks"]
    entry["mean_success"] = res["mean_success"]
    entry["mean_return"] = float(np.mean([r["return"] for r in res["tasks"].values()]))
    entry["steps"] = res.get("steps")
    entry["final"] = {"mean_success": res["mean_success"], "step": res.get("steps"), "episodes": eval_episodes,
                      "eval_seed": eval_seed}
    best = _validation_best(run, eval_episodes) or _trainer_best(run.dir)
    if best is not None:
        entry["best"] = best
    metrics = read_metrics(run.dir / "metrics.jsonl")
    changed = [r for r in metrics if "mask_changed_fraction" in r]
    if changed:
        entry["final_mask_changed_fraction"] = float(np.mean(changed[-1]["mask_changed_fraction"]))
        entry["final_mask_changed_fraction_min"] = float(np.min(changed[-1]["mask_changed_fraction"]))
    if curve := [[r["step"], r["validation_mean_success"]] for r in metrics if "validation_mean_success" in r]:
        entry["validation_curve"] = curve  # the trainer's evaluations on the validation goals (--validation-seed)
    harmony = [r for r in metrics if "harmony_score" in r]
    if harmony:
        entry["final_harmony_score"] = float(harmony[-1]["harmony_score"])
    flips = [r for r in metrics if "masked_per_task" in r]
    if flips:
        entry["weights_flipped_per_task"] = float(np.mean([np.mean(r["masked_per_task"]) for r in flips]) * len(flips))
    return entry


def _validation_best(run, eval_episodes: int) -> dict | None:
    """The checkpoint chosen on the validation goals (``--validation-seed``: the trainer's best.pt) as
    the study measured it on the test goals, with its step and validation success; None without one."""
    if not run.best_eval_path.exists():
        return None
    res = loads_json(run.best_eval_path.read_text())
    chosen = loads_json((run.dir / "results.json").read_text())["best"]
    return {"mean_success": res["mean_success"], "step": chosen["step"], "evaluations": chosen.get("evaluations"),
            "episodes": eval_episodes, "selected_on": "validation", "validation_mean_success": chosen["mean_success"],
            "tasks": {t: {"success": r["success"]} for t, r in res["tasks"].items()}}


def _trainer_best(run_dir: Path) -> dict | None:
    """The best of the trainer's evaluations (results.json's ``best``: step, mean success, number of
    evaluations, per-task success) with their episodes per task, or None without one."""
    try:
        res = loads_json((run_dir / "results.json").read_text())
        cfg = loads_json((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    best = res.get("best")
    if not best:
        return None
    return {"mean_success": best["mean_success"], "step": best["step"], "evaluations": best.get("evaluations"),
            "episodes": cfg.get("eval_episodes"), "selected_on": "test",
            "tasks": {t: {"success": r["success"]} for t, r in best["tasks"].items()}}


def aggregate(study: dict) -> list[dict]:
    """Per variant (arm[, swept value]): the t-interval of the per-seed means and the paired
    bootstrap difference from the reference variant (the Prompt-DT arm at the same swept value when
    the study has it, else the same arm at the first swept value)."""
    finished = [r for r in study["runs"] if r["status"] == "finished"]
    order = []
    for r in study["runs"]:
        if r["variant"] not in order:
            order.append(r["variant"])
    by_variant = {v: [r for r in finished if r["variant"] == v] for v in order}
    first_value = None if study["sweep"] is None else study["sweep"]["values"][0]
    out = []
    for v in order:
        rows = by_variant[v]
        proto = next(r for r in study["runs"] if r["variant"] == v)
        entry = {"variant": v, "arm": proto["arm"], "method": proto["method"],
                 "sweep_value": None if proto["sweep"] is None else proto["sweep"]["value"],
                 "seeds_finished": [r["seed"] for r in rows],
                 "seeds_planned": [r["seed"] for r in study["runs"] if r["variant"] == v]}
        if rows:
            m, lo, hi = t_interval([r["mean_success"] for r in rows])
            entry.update(mean_success=m, ci_low=lo, ci_high=hi,
                         per_seed={str(r["seed"]): r["mean_success"] for r in rows},
                         per_task={t: float(np.mean([r["tasks"][t]["success"] for r in rows])) for t in study["tasks"]},
                         tasks_at_zero=[t for t in study["tasks"] if all(r["tasks"][t]["success"] == 0 for r in rows)],
                         per_task_return={t: float(np.mean([r["tasks"][t]["return"] for r in rows]))
                                          for t in study["tasks"]},
                         train_seconds=float(np.mean([r["train_seconds"] or 0 for r in rows])))
            bests = [r["best"] for r in rows if r.get("best")]
            if bests:  # the trainer's best evaluation of each seed (reported beside the final; never ranked on)
                bm, blo, bhi = t_interval([b["mean_success"] for b in bests])
                entry["best"] = {"mean_success": bm, "ci_low": blo, "ci_high": bhi, "seeds": len(bests),
                                 "per_seed": {str(r["seed"]): {"mean_success": r["best"]["mean_success"],
                                                               "step": r["best"]["step"]}
                                              for r in rows if r.get("best")},
                                 "episodes": bests[0]["episodes"], "selected_on": bests[0].get("selected_on", "test")}
            method = METHODS.get(entry["method"])
            # masks never updated: they do not move
            if method is not None and method.masked and not method.learns_masks:
                rows = [{"final_mask_changed_fraction": 0.0, "final_mask_changed_fraction_min": 0.0, **r} for r in rows]
            if bounds := [b for r in rows if r.get("config")
                          and (b := mask_flips_bound_fraction(r["config"])) is not None]:
                entry["mask_flips_bound_fraction"] = float(np.mean(bounds))
            for key in ("final_mask_changed_fraction", "final_harmony_score", "weights_flipped_per_task"):
                vals = [r[key] for r in rows if key in r]
                if vals:
                    entry[key] = float(np.mean(vals))
            if vals := [r["final_mask_changed_fraction_min"] for r in rows if "final_mask_changed_fraction_min" in r]:
                entry["final_mask_changed_fraction_min"] = float(np.min(vals))  # the least-moved task of any seed
        ref = None
        if REFERENCE in study["methods"]:  # Prompt-DT at the same swept value, else the unswept Prompt-DT
            pds = [w for w in order if by_variant[w] and by_variant[w][0]["arm"] == REFERENCE]
            ref = next((w for w in pds if (by_variant[w][0]["sweep"] or {}).get("value") == entry["sweep_value"]),
                       next((w for w in pds if by_variant[w][0]["sweep"] is None), None))
        elif first_value is not None and entry["sweep_value"] != first_value:
            ref = next((w for w in order if by_variant[w] and by_variant[w][0]["arm"] == entry["arm"]
                        and (by_variant[w][0]["sweep"] or {}).get("value") == first_value), None)
        if ref is not None and ref != v and rows:
            entry["paired"] = paired_success(rows, by_variant[ref], study["tasks"], ref)
            if entry.get("best", {}).get("selected_on") == "validation":  # chosen without looking at the test goals
                entry["paired_best"] = paired_success(rows, by_variant[ref], study["tasks"], ref, key="best")
        if "paired" in entry and entry["paired"] is None:
            del entry["paired"]
        if first_value is not None and entry["sweep_value"] not in (None, first_value) and rows:
            # a swept value against the same arm at the first value
            sref = next((w for w in order if by_variant[w] and by_variant[w][0]["arm"] == entry["arm"]
                         and (by_variant[w][0]["sweep"] or {}).get("value") == first_value), None)
            if sref is not None and (p := paired_success(rows, by_variant[sref], study["tasks"], sref)):
                entry["paired_sweep"] = p
        out.append(entry)
    return out


def summary_markdown(study: dict, figures: list[str] = ()) -> str:
    variants = study["variants"]
    runs = study["runs"]
    n_done = sum(r["status"] == "finished" for r in runs)
    lines = [f"# Study: {', '.join(study['arms'])} on {len(study['tasks'])} tasks", ""]
    if not study["complete"]:
        missing = [r["name"] for r in runs if r["status"] != "finished"]
        lines += [f"**Partial: {n_done} of {len(runs)} runs evaluated.** Missing: {', '.join(missing)}.", ""]
    for job in study.get("failed_jobs", []):
        lines += [f"Run {job['run']}: job {job['id']} ({job['executor']}) failed; the last lines of its log "
                  f"{job['log']}:", "",
                  "```", job.get("tail", ""), "```", ""]
    cfg = next((r["config"] for r in runs if r.get("config")), None)
    if cfg:
        mc, mk = cfg["model"], cfg["masks"]
        lines += [f"Budget: {cfg['steps']} steps at batch {cfg['batch_size']}, {mc['n_layer']} layers x {mc['n_embd']} "
                  f"({mc['n_head']} heads), lr {cfg['lr']}, warm-up {cfg['warmup_steps']}, {cfg['quality']} data; "
                  + (f"masks: sparsity {mk['sparsity']}, {mask_schedules(runs, len(study['tasks']))}" if any(
                      getattr(METHODS.get(r["method"]), "masked", False) for r in runs) else "no arm uses masks")
                  + ("" if study["sweep"] is None
                     else f" (swept: {study['sweep']['key']} = {', '.join(study['sweep']['values'])}"
                     f" for {', '.join(study['sweep'].get('methods') or study['methods'])})") + ". "
                  f"Evaluation: {study['eval_episodes']} episodes per task, seed {study['eval_seed']} for every run.",
                  ""]
    finished_runs = [r for r in runs if r["status"] == "finished"]
    revisions = {rev for r in finished_runs for rev in r.get("revisions") or []}
    unrecorded = sum(not r.get("revisions") for r in finished_runs)
    if len(revisions) == 1 and not unrecorded:
        lines += [f"Code revision: {next(iter(revisions))} for every finished run.", ""]
    elif revisions or unrecorded:
        parts = ([f"code revisions {', '.join(sorted(revisions))} (study.json names each run's)"]
                 if revisions else []) + \
                ([f"{unrecorded} of {len(finished_runs)} finished runs do not record their code revision"]
                 if unrecorded else [])
        lines += ["; ".join(parts).capitalize() + ".", ""]
    if machines := sorted({m for r in finished_runs for m in r.get("machines") or []}):
        lines += [("Machine: " if len(machines) == 1 else "Machines (study.json names each run's): ")
                  + "; ".join(machines) + ".", ""]
    if study.get("variant_flags"):
        lines += ["Variants: " + "; ".join(f"{label} = `{flags}`" for label, flags in study["variant_flags"].items())
                  + " (their flags follow the shared ones).", ""]
    with_best = any("best" in v for v in variants)
    on_validation = any(v.get("best", {}).get("selected_on") == "validation" for v in variants)
    best_text = (" Best on validation: per seed the checkpoint with the highest mean success on the validation goals "
                 "(--validation-seed, every --eval-every steps and at the end), measured on the test goals with the "
                 "final checkpoint's episodes; mean over seeds. Its Δ is in the table below." if on_validation else
                 " Best during training: per seed the highest mean success among the trainer's own evaluations "
                 "(every --eval-every steps and at the end, with fewer episodes, on the test goals), as the official "
                 "code reports; mean over seeds. Chosen on the goals it is reported on, it is biased upward: reported, "
                 "not ranked on.")
    best_head = "best on validation (test goals)" if on_validation else "best during training"
    lines += ["## Mean success over tasks", "",
              "Final: the study's evaluation of each run's final checkpoint; mean over seeds of each run's mean "
              "success over tasks, 95 % t-interval over the per-seed means. "
              "Δ: paired difference from the reference (mean over seeds of the per-seed difference of mean success); "
              f"its 95 % interval is a {SEED_LEVEL_METHOD}. The (seed, task) bootstrap interval, which treats the "
              "pairs as independent replicates and so is narrower than the evidence allows, is shown beside it as a "
              f"secondary column ({study['bootstrap']['samples']} resamples, seed {study['bootstrap']['seed']})."
              + (best_text if with_best else ""), "",
              "| method | seeds | final mean success | 95 % CI | per seed | Δ vs reference | 95 % CI of Δ (seeds) | "
              "(seed, task) bootstrap CI |"
              + (f" {best_head} | its 95 % CI | per seed (step) |" if with_best else ""),
              "|---|---|---|---|---|---|---|---|" + ("---|---|---|" if with_best else "")]
    for v in variants:
        seeds = f"{len(v['seeds_finished'])}/{len(v['seeds_planned'])}"
        if "mean_success" not in v:
            lines.append(f"| {v['variant']} | {seeds} | – | – | – | – | – | – |"
                         + (" – | – | – |" if with_best else ""))
            continue
        per_seed = ", ".join(f"{x:.2f}" for x in v["per_seed"].values())
        p = v.get("paired")
        delta = f"{p['mean_diff']:+.3f} (vs {p['reference']})" if p else "–"
        dci = interval_text(p) if p else "–"
        bci = interval_text(p["pairs_bootstrap"]) if p else "–"
        row = (f"| {v['variant']} | {seeds} | {v['mean_success']:.3f} | [{_fmt(v['ci_low'])}, {_fmt(v['ci_high'])}] | "
               f"{per_seed} | {delta} | {dci} | {bci} |")
        if with_best:
            b = v.get("best")
            row += (" – | – | – |" if b is None else
                    f" {b['mean_success']:.3f} | [{_fmt(b['ci_low'])}, {_fmt(b['ci_high'])}] | "
                    + ", ".join(f"{x['mean_success']:.2f} ({x['step']})" for x in b["per_seed"].values()) + " |")
        lines.append(row)
    ranked = sorted((v for v in variants if "mean_success" in v), key=lambda v: -v["mean_success"])
    if len(ranked) > 1:
        order = f"{ranked[0]['variant']} ({ranked[0]['mean_success']:.3f})"
        for prev, v in zip(ranked, ranked[1:]):
            sign = "=" if v["mean_success"] == prev["mean_success"] else ">"
            order += f" {sign} {v['variant']} ({v['mean_success']:.3f})"
        lines += ["", f"Ranking by final mean success: {order}."]
    if on_validation and (bp := [v for v in variants if v.get("paired_best")]):
        lines += ["", "## Best on validation against the reference", "",
                  "Per seed the checkpoint chosen on the validation goals, measured on the test goals; Δ and its 95 % "
                  f"interval ({SEED_LEVEL_METHOD}) beside the final checkpoints' Δ.", "",
                  "| method | Δ best on validation | 95 % CI (seeds) | p | Δ final | 95 % CI (seeds) |",
                  "|---|---|---|---|---|---|"]
        for v in bp:
            b, f = v["paired_best"], v["paired"]
            lines.append(f"| {v['variant']} − {b['reference']} | {b['mean_diff']:+.3f} | {interval_text(b)} | "
                         f"{_fmt(b['p_value'])} | {f['mean_diff']:+.3f} | {interval_text(f)} |")
    lines += family_markdown(study.get("family"))
    lines += along_training_markdown(study.get("along_training"))
    done = [v for v in variants if "per_task" in v]
    if done:
        lines += ["", "## Success per task", "", "Mean over the finished seeds.", "",
                  "| task | " + " | ".join(v["variant"] for v in done) + " |", "|---|" + "---|" * len(done)]
        for t in study["tasks"]:
            lines.append(f"| {t} | " + " | ".join(f"{v['per_task'][t]:.2f}" for v in done) + " |")
        lines.append("| **mean** | " + " | ".join(f"**{v['mean_success']:.3f}**" for v in done) + " |")
        lines += ["", "At zero in every finished seed:", ""]
        lines += [f"- {v['variant']}: {len(v['tasks_at_zero'])} of {len(study['tasks'])} tasks"
                  + (f" ({', '.join(v['tasks_at_zero'])})" if v["tasks_at_zero"] else "") for v in done]
    lines += pairwise_markdown(study.get("pairwise") or {}, "Every pair of methods", "per-seed success difference")
    lines += pairwise_markdown(study.get("pairwise_best") or {}, "Every pair of methods, best on validation",
                               "per-seed success difference of the checkpoints chosen on the validation goals "
                               "(measured on the test goals), a family of its own")
    swept = [v for v in done if "paired_sweep" in v]
    if swept:
        key = study["sweep"]["key"]
        lines += ["", f"## {key}: each value against the first", "",
                  f"Paired difference from the same method at {key}={study['sweep']['values'][0]}, 95 % interval: a "
                  f"{SEED_LEVEL_METHOD}.", "", "| method | Δ success | 95 % CI (seeds) | seeds |", "|---|---|---|---|"]
        for v in swept:
            p = v["paired_sweep"]
            lines.append(f"| {v['variant']} | {p['mean_diff']:+.3f} | {interval_text(p)} | {p['seeds']} |")
    masked = [v for v in done if "final_mask_changed_fraction" in v or "final_harmony_score" in v]
    if masked:
        lines += ["", "## Masks and harmony", "",
                  "Final averaged harmony score (Definition 3.2, at the last mask update); fraction of each task's "
                  "active weights not active in its initial ERK mask at the end (mean over tasks and seeds, and the "
                  "least of any task in any seed; 0 for masks that are never updated); the most that fraction can be "
                  "under the run's schedule (alpha_t of Eq. 12 summed over the mask updates, capped by the task's "
                  "initially masked weights, over its active ones: at sparsity S never above S / (1 − S)); "
                  "weights the updates switched off per task over the run.", "",
                  "| method | harmony score | mask changed fraction | least of a task | Eq. 12 bound | weights "
                  "switched per task | train s per run |", "|---|---|---|---|---|---|---|"]
        for v in masked:
            lines.append(f"| {v['variant']} | {_fmt(v.get('final_harmony_score'))} | "
                         f"{_fmt(v.get('final_mask_changed_fraction'), 5)} | "
                         f"{_fmt(v.get('final_mask_changed_fraction_min'), 5)} | "
                         f"{_fmt(v.get('mask_flips_bound_fraction'), 4)} | "
                         f"{_fmt(v.get('weights_flipped_per_task'), 0)} | {v['train_seconds']:.0f} |")
    lines += learned_masks_markdown(study)
    lines += unseen_markdown(study)
    if figures:
        lines += ["", "## Figures", ""] + [f"![{Path(f).stem}](figures/{f})" for f in figures]
    lines += ["", "## Command", "", "```", study["command"], "```", ""]
    return "\n".join(lines)
