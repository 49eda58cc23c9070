"""The study's report: each run's entry (final and best success, mask movement), the aggregate per
arm with t-intervals and paired bootstrap differences, every pair of arms, and summary.md."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np

from ..files import loads_json
from ..masks import alpha_total
from ..methods import METHODS, REFERENCE
from ..run.outputs import read_metrics
from .stats import SEED_LEVEL_METHOD, excludes_zero, fmt as _fmt, holm, paired_difference, paired_t, t_interval
from .learned_masks import learned_masks_markdown
from .unseen import unseen_markdown


def run_entry(run, eval_episodes: int, eval_seed: int) -> dict:
    """A run's entry in study.json: its arm, status, times, config and, once evaluated, its results."""
    rec = run.record()
    entry = {"name": run.name, "arm": run.arm.key, "method": run.method, "seed": run.seed, "variant": run.variant,
             "sweep": None if run.sweep is None else {"key": run.sweep[0], "value": run.sweep[1]},
             "status": "finished" if run.finished() else "missing",
             "train_seconds": rec.get("train_seconds"), "eval_seconds": rec.get("eval_seconds"), "revisions": rec.get("revisions"), "machines": rec.get("machines"),
             "train_command": None if not rec.get("train_args") else "python -m harmodt.train " + shlex.join(rec["train_args"])}
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
    entry["final"] = {"mean_success": res["mean_success"], "step": res.get("steps"), "episodes": eval_episodes, "eval_seed": eval_seed}
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


def mask_flips_bound_fraction(cfg: dict) -> float | None:
    """How far a run's schedule lets a task's mask move (None for a dense method, 0 for masks that do
    not learn): alpha_t of Eq. 12 summed over its mask updates (harmodt.masks.alpha_total), and no
    more than the task's initially masked weights, over its active ones (:func:`masked_and_active`
    of config.json ``cfg``); at sparsity S the cap alone is about S / (1 - S)."""
    method = METHODS.get(cfg.get("method"))
    if method is None or not method.masked:
        return None
    if not method.learns_masks:
        return 0.0
    m = cfg["masks"]
    flips = alpha_total(cfg["steps"], m["update_every"], m["eta_min"], m["eta_max"])
    weights, active = masked_and_active(cfg["model"], m["sparsity"])
    return min(flips, weights - active) / active


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
            "episodes": cfg.get("eval_episodes"), "selected_on": "test", "tasks": {t: {"success": r["success"]} for t, r in best["tasks"].items()}}


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
        entry = {"variant": v, "arm": proto["arm"], "method": proto["method"], "sweep_value": None if proto["sweep"] is None else proto["sweep"]["value"],
                 "seeds_finished": [r["seed"] for r in rows], "seeds_planned": [r["seed"] for r in study["runs"] if r["variant"] == v]}
        if rows:
            m, lo, hi = t_interval([r["mean_success"] for r in rows])
            entry.update(mean_success=m, ci_low=lo, ci_high=hi, per_seed={str(r["seed"]): r["mean_success"] for r in rows},
                         per_task={t: float(np.mean([r["tasks"][t]["success"] for r in rows])) for t in study["tasks"]},
                         per_task_return={t: float(np.mean([r["tasks"][t]["return"] for r in rows])) for t in study["tasks"]},
                         train_seconds=float(np.mean([r["train_seconds"] or 0 for r in rows])))
            bests = [r["best"] for r in rows if r.get("best")]
            if bests:  # the trainer's best evaluation of each seed (reported beside the final; never ranked on)
                bm, blo, bhi = t_interval([b["mean_success"] for b in bests])
                entry["best"] = {"mean_success": bm, "ci_low": blo, "ci_high": bhi, "seeds": len(bests),
                                 "per_seed": {str(r["seed"]): {"mean_success": r["best"]["mean_success"], "step": r["best"]["step"]}
                                              for r in rows if r.get("best")},
                                 "episodes": bests[0]["episodes"], "selected_on": bests[0].get("selected_on", "test")}
            method = METHODS.get(entry["method"])
            if method is not None and method.masked and not method.learns_masks:  # masks never updated: they do not move
                rows = [{"final_mask_changed_fraction": 0.0, "final_mask_changed_fraction_min": 0.0, **r} for r in rows]
            if bounds := [b for r in rows if r.get("config") and (b := mask_flips_bound_fraction(r["config"])) is not None]:
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
            entry["paired"] = _paired(rows, by_variant[ref], study["tasks"], ref)
            if entry.get("best", {}).get("selected_on") == "validation":  # chosen without looking at the test goals
                entry["paired_best"] = _paired(rows, by_variant[ref], study["tasks"], ref, key="best")
        if "paired" in entry and entry["paired"] is None:
            del entry["paired"]
        if first_value is not None and entry["sweep_value"] not in (None, first_value) and rows:
            # a swept value against the same arm at the first value
            sref = next((w for w in order if by_variant[w] and by_variant[w][0]["arm"] == entry["arm"]
                         and (by_variant[w][0]["sweep"] or {}).get("value") == first_value), None)
            if sref is not None and (p := _paired(rows, by_variant[sref], study["tasks"], sref)):
                entry["paired_sweep"] = p
        out.append(entry)
    return out


def along_training(study: dict) -> dict | None:
    """Success on the validation goals against training steps (the runs' ``validation_curve``): per
    variant and step the t-interval over seeds, and per comparison and step the paired difference with
    the seed as the unit (:func:`paired_t`). The comparisons: every variant against Prompt-DT, and every
    variant with learned masks against every one with fixed (random ERK) masks. None without curves."""
    finished = [r for r in study["runs"] if r["status"] == "finished" and r.get("validation_curve")]
    if not finished:
        return None
    names = list(dict.fromkeys(r["variant"] for r in finished))
    curves = {v: {r["seed"]: dict((int(s), x) for s, x in r["validation_curve"]) for r in finished if r["variant"] == v} for v in names}
    method = {r["variant"]: METHODS.get(r["method"]) for r in finished}
    variants = {}
    for v in names:
        steps = sorted(set.intersection(*[set(c) for c in curves[v].values()]))
        variants[v] = {str(s): dict(zip(("mean", "ci_low", "ci_high"), t_interval([c[s] for c in curves[v].values()])),
                                    seeds=len(curves[v])) for s in steps}
    refs = [v for v in names if method[v] is not None and method[v].name == REFERENCE]
    fixed = [v for v in names if method[v] is not None and method[v].masks == "fixed"]
    pairs = [(v, r) for r in refs for v in names if v != r]
    pairs += [(v, r) for r in fixed for v in names if method[v] is not None and method[v].learns_masks]
    differences = []
    for v, r in pairs:
        seeds = sorted(set(curves[v]) & set(curves[r]))
        if not seeds:
            continue
        steps = sorted(set.intersection(*[set(curves[v][s]) & set(curves[r][s]) for s in seeds]))
        per_step = {}
        for st in steps:
            d = [curves[v][s][st] - curves[r][s][st] for s in seeds]
            mean, lo, hi, pv = paired_t(d)
            per_step[str(st)] = {"mean_diff": mean, "ci_low": lo, "ci_high": hi, "p_value": pv, "seeds": len(seeds)}
        differences.append({"variant": v, "reference": r, "per_step": per_step})
    return {"goals": "validation", "interval": SEED_LEVEL_METHOD, "variants": variants, "differences": differences}


HOLM_ALPHA = 0.05


def pairwise(study: dict, key: str | None = None) -> dict:
    """``{row variant: {column variant: paired difference}}``: row minus column success paired by seed
    (:func:`paired_difference`), for every two variants with evaluated runs: of the final checkpoints,
    or (``key="best"``) of the checkpoints chosen on the validation goals (runs without one left out).
    Each unordered pair is one comparison of the family; ``holm`` marks the cells (both orders of a
    pair) whose p-value survives Holm's correction over the family at 5 %, and ``comparisons`` gives
    the family's size."""
    finished = [r for r in study["runs"] if r["status"] == "finished"
                and (key is None or r.get(key, {}).get("selected_on") == "validation")]
    names = list(dict.fromkeys(r["variant"] for r in finished))
    rows = {v: [r for r in finished if r["variant"] == v] for v in names}
    table = {a: {b: p for b in names if b != a and (p := _paired(rows[a], rows[b], study["tasks"], b, key))} for a in names}
    family = {(a, b): table[a][b]["p_value"] for i, a in enumerate(names) for b in names[i + 1:] if b in table[a]}
    kept = holm(family, HOLM_ALPHA)
    for (a, b), rejected in kept.items():
        for x, y in ((a, b), (b, a)):
            if y in table[x]:
                table[x][y].update(holm=rejected, comparisons=len(family))
    return table


def parse_family(text: str) -> list[list[str]]:
    """``--family "A - B; C - D"``: the comparisons fixed before the runs, each a variant label minus
    another (labels as summary.md names the arms); ValueError for a comparison not of that form."""
    pairs = []
    for item in filter(None, (x.strip() for x in text.split(";"))):
        parts = [x.strip() for x in item.split(" - ")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"--family: {item!r} is not \"LABEL - LABEL\" (a space on each side of the minus)")
        pairs.append(parts)
    return pairs


def family(study: dict) -> dict | None:
    """The pre-registered comparisons (study.json ``family_spec``, from ``--family``): each one's
    paired difference by seed (:func:`_paired`), and Holm's correction over these alone at 5 %.
    None without a family; ValueError naming a label no arm has."""
    spec = study.get("family_spec") or []
    if not spec:
        return None
    finished = [r for r in study["runs"] if r["status"] == "finished"]
    rows = {v: [r for r in finished if r["variant"] == v] for v in dict.fromkeys(r["variant"] for r in study["runs"])}
    for label in {x for pair in spec for x in pair} - set(rows):
        raise ValueError(f"--family names {label!r}, which is not an arm of this study ({', '.join(rows)})")
    out = []
    for a, b in spec:
        p = _paired(rows[a], rows[b], study["tasks"], b) if rows[a] and rows[b] else None
        out.append({"variant": a, **(p or {"reference": b, "seeds": 0})})
    kept = holm({i: c["p_value"] for i, c in enumerate(out) if "p_value" in c}, HOLM_ALPHA)
    for i, rejected in kept.items():
        out[i]["holm"] = rejected
    return {"alpha": HOLM_ALPHA, "size": len(spec), "comparisons": out}


def family_markdown(fam: dict | None) -> list[str]:
    if not fam:
        return []
    lines = ["", "## The pre-registered comparisons", "",
             f"Fixed before the runs (`--family`). Mean over seeds of the per-seed success difference, its 95 % interval "
             f"({SEED_LEVEL_METHOD}) and paired-t p-value; † where the p-value survives Holm's correction over these "
             f"{fam['size']} at {fam['alpha'] * 100:.0f} %.", "",
             "| # | comparison | seeds | difference | 95 % CI | p | Holm |", "|---|---|---|---|---|---|---|"]
    for i, c in enumerate(fam["comparisons"], 1):
        if "mean_diff" not in c:
            lines.append(f"| {i} | {c['variant']} − {c['reference']} | 0 | – | – | – | – |")
            continue
        lines.append(f"| {i} | {c['variant']} − {c['reference']} | {c['seeds']} | {c['mean_diff']:+.3f} | {_interval(c)} | "
                     f"{_fmt(c['p_value'], 4)} | {'†' if c.get('holm') else 'no'} |")
    return lines


def _paired(rows: list[dict], ref_rows: list[dict], tasks: list[str], ref: str, key: str | None = None) -> dict | None:
    """Success of ``rows`` minus that of ``ref_rows``, paired by seed (:func:`paired_difference`): of the
    final checkpoints, or (``key="best"``) of the checkpoints chosen on the validation goals."""
    def by_seed(rs):
        return {r["seed"]: {t: (r[key] if key else r)["tasks"][t]["success"] for t in tasks} for r in rs if key is None or key in r}

    return paired_difference(by_seed(rows), by_seed(ref_rows), tasks, ref)


def _interval(p: dict, nd: int = 3) -> str:
    """``[low, high]`` of an interval dict with signed numbers; "–" for a bound that is NaN (one seed)."""
    def bound(x):
        return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:+.{nd}f}"
    return f"[{bound(p['ci_low'])}, {bound(p['ci_high'])}]"


def along_training_markdown(at: dict | None) -> list[str]:
    """The along-training section of summary.md: each comparison's paired difference per step."""
    if not at or not at["differences"]:
        return []
    steps = sorted({int(s) for d in at["differences"] for s in d["per_step"]})
    lines = ["", "## Along training (validation goals)", "",
             f"Difference of mean success on the validation goals at each evaluation step, mean over seeds and its 95 % interval "
             f"({at['interval']}); **bold** where the interval excludes 0. No multiplicity correction across steps.", "",
             "| comparison | seeds | " + " | ".join(str(s) for s in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for d in at["differences"]:
        cells = []
        for s in steps:
            p = d["per_step"].get(str(s))
            txt = "–" if p is None else f"{p['mean_diff']:+.3f} {_interval(p, 2)}"
            cells.append(f"**{txt}**" if p is not None and excludes_zero(p) else txt)
        seeds = max((p["seeds"] for p in d["per_step"].values()), default=0)
        lines.append(f"| {d['variant']} − {d['reference']} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def masked_and_active(model_cfg: dict, sparsity: float) -> tuple[int, int]:
    """The masked weights of the model of a run's config (config.json's ``model``) and those one
    task's ERK mask keeps active (the exact draw), the model built on the meta device: nothing is
    allocated."""
    import torch

    from ..config import ModelConfig
    from ..masks import erk_densities
    from ..model import PromptDT

    with torch.device("meta"):
        model = PromptDT(ModelConfig(**model_cfg), 1)
    shapes = {n: tuple(w.shape) for n, w in model.masked_weights().items()}
    dens = erk_densities(shapes, 1.0 - sparsity)
    return sum(a * b for a, b in shapes.values()), sum(int(round(dens[n] * a * b)) for n, (a, b) in shapes.items())


def mask_schedules(runs: list[dict], n_tasks: int) -> str:
    """The mask schedule of the arms whose masks learn (t_m, eta_min, eta_max of their configs) and the
    most weights Eq. 12 lets each task switch over the run (harmodt.masks.alpha_total), also as a
    fraction of a task's active weights; "no arm's masks move" when none learns."""
    schedules: dict[tuple, list[str]] = {}
    for r in runs:
        method = METHODS.get(r["method"])
        if not r.get("config") or method is None or not method.learns_masks:
            continue
        cfg, mk = r["config"], r["config"]["masks"]
        key = (cfg["steps"], mk["update_every"], mk["eta_min"], mk["eta_max"], mk["sparsity"], json.dumps(cfg["model"], sort_keys=True))
        if r["variant"] not in schedules.setdefault(key, []):
            schedules[key].append(r["variant"])
    if not schedules:
        return "no arm's masks move (none learns them)"
    parts = []
    for (steps, every, eta_min, eta_max, sparsity, model), variants in schedules.items():
        bound = alpha_total(steps, every, eta_min, eta_max)
        active = masked_and_active(json.loads(model), sparsity)[1]
        parts.append(f"{', '.join(variants)}: t_m {every}, eta_min {eta_min}, eta_max {eta_max}; Eq. 12 lets a task switch at most "
                     f"{bound} weights off (and as many on) over the run, {100 * bound / active:.2f} % of its {active} active weights")
    return "; ".join(parts)


def pairwise_markdown(pw: dict, title: str, what: str) -> list[str]:
    """A section of summary.md: the table of :func:`pairwise` (row minus column), Holm survivors marked."""
    if len(pw) <= 2:
        return []
    names = list(pw)
    m = next((p["comparisons"] for row in pw.values() for p in row.values() if "comparisons" in p), 0)
    survive = sorted({tuple(sorted((a, b))) for a in names for b, p in pw[a].items() if p.get("holm")})
    lines = ["", f"## {title}", "",
             f"Row minus column: mean over seeds of the {what}, and its 95 % interval, a "
             f"{SEED_LEVEL_METHOD}; **bold** where that interval excludes 0. The table holds {m} comparisons "
             f"(each unordered pair once); † marks those whose paired-t p-value survives Holm's correction over all {m} "
             f"at {HOLM_ALPHA * 100:.0f} %: {', '.join(f'{a} vs {b}' for a, b in survive) if survive else 'none does'}.", "",
             "| row − column | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for a in names:
        cells = []
        for b in names:
            p = pw[a].get(b)
            if p is None:
                cells.append("–")
                continue
            txt = f"{p['mean_diff']:+.3f} {_interval(p, 2)}" + (" †" if p.get("holm") else "")
            cells.append(f"**{txt}**" if excludes_zero(p) else txt)
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(study: dict, figures: list[str] = ()) -> str:
    variants = study["variants"]
    runs = study["runs"]
    n_done = sum(r["status"] == "finished" for r in runs)
    lines = [f"# Study: {', '.join(study['arms'])} on {len(study['tasks'])} tasks", ""]
    if not study["complete"]:
        missing = [r["name"] for r in runs if r["status"] != "finished"]
        lines += [f"**Partial: {n_done} of {len(runs)} runs evaluated.** Missing: {', '.join(missing)}.", ""]
    for job in study.get("failed_jobs", []):
        lines += [f"Run {job['run']}: job {job['id']} ({job['executor']}) failed; the last lines of its log {job['log']}:", "",
                  "```", job.get("tail", ""), "```", ""]
    cfg = next((r["config"] for r in runs if r.get("config")), None)
    if cfg:
        mc, mk = cfg["model"], cfg["masks"]
        lines += [f"Budget: {cfg['steps']} steps at batch {cfg['batch_size']}, {mc['n_layer']} layers x {mc['n_embd']} "
                  f"({mc['n_head']} heads), lr {cfg['lr']}, warm-up {cfg['warmup_steps']}, {cfg['quality']} data; masks: "
                  f"sparsity {mk['sparsity']}, {mask_schedules(runs, len(study['tasks']))}"
                  + ("" if study["sweep"] is None else f" (swept: {study['sweep']['key']} = {', '.join(study['sweep']['values'])}"
                     f" for {', '.join(study['sweep'].get('methods') or study['methods'])})") + ". "
                  f"Evaluation: {study['eval_episodes']} episodes per task, seed {study['eval_seed']} for every run.", ""]
    finished_runs = [r for r in runs if r["status"] == "finished"]
    revisions = {rev for r in finished_runs for rev in r.get("revisions") or []}
    unrecorded = sum(not r.get("revisions") for r in finished_runs)
    if len(revisions) == 1 and not unrecorded:
        lines += [f"Code revision: {next(iter(revisions))} for every finished run.", ""]
    elif revisions or unrecorded:
        parts = ([f"code revisions {', '.join(sorted(revisions))} (study.json names each run's)"] if revisions else []) + \
                ([f"{unrecorded} of {len(finished_runs)} finished runs do not record their code revision"] if unrecorded else [])
        lines += ["; ".join(parts).capitalize() + ".", ""]
    if machines := sorted({m for r in finished_runs for m in r.get("machines") or []}):
        lines += [("Machine: " if len(machines) == 1 else "Machines (study.json names each run's): ") + "; ".join(machines) + ".", ""]
    if study.get("variant_flags"):
        lines += ["Variants: " + "; ".join(f"{label} = `{flags}`" for label, flags in study["variant_flags"].items())
                  + " (their flags follow the shared ones).", ""]
    with_best = any("best" in v for v in variants)
    on_validation = any(v.get("best", {}).get("selected_on") == "validation" for v in variants)
    best_text = (" Best on validation: per seed the checkpoint with the highest mean success on the validation goals "
                 "(--validation-seed, every --eval-every steps and at the end), measured on the test goals with the final "
                 "checkpoint's episodes; mean over seeds. Its Δ is in the table below." if on_validation else
                 " Best during training: per seed the highest mean success among the trainer's own evaluations "
                 "(every --eval-every steps and at the end, with fewer episodes, on the test goals), as the official code "
                 "reports; mean over seeds. Chosen on the goals it is reported on, it is biased upward: reported, not ranked on.")
    best_head = "best on validation (test goals)" if on_validation else "best during training"
    lines += ["## Mean success over tasks", "",
              "Final: the study's evaluation of each run's final checkpoint; mean over seeds of each run's mean success over tasks, "
              "95 % t-interval over the per-seed means. "
              f"Δ: paired difference from the reference (mean over seeds of the per-seed difference of mean success); its 95 % "
              f"interval is a {SEED_LEVEL_METHOD}. The (seed, task) bootstrap interval, which treats the pairs as "
              f"independent replicates and so is narrower than the evidence allows, is shown beside it as a secondary column "
              f"({study['bootstrap']['samples']} resamples, seed {study['bootstrap']['seed']})."
              + (best_text if with_best else ""), "",
              "| method | seeds | final mean success | 95 % CI | per seed | Δ vs reference | 95 % CI of Δ (seeds) | (seed, task) bootstrap CI |"
              + (f" {best_head} | its 95 % CI | per seed (step) |" if with_best else ""),
              "|---|---|---|---|---|---|---|---|" + ("---|---|---|" if with_best else "")]
    for v in variants:
        seeds = f"{len(v['seeds_finished'])}/{len(v['seeds_planned'])}"
        if "mean_success" not in v:
            lines.append(f"| {v['variant']} | {seeds} | – | – | – | – | – | – |" + (" – | – | – |" if with_best else ""))
            continue
        per_seed = ", ".join(f"{x:.2f}" for x in v["per_seed"].values())
        p = v.get("paired")
        delta = f"{p['mean_diff']:+.3f} (vs {p['reference']})" if p else "–"
        dci = _interval(p) if p else "–"
        bci = _interval(p["pairs_bootstrap"]) if p else "–"
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
            order += f" {'=' if v['mean_success'] == prev['mean_success'] else '>'} {v['variant']} ({v['mean_success']:.3f})"
        lines += ["", f"Ranking by final mean success: {order}."]
    if on_validation and (bp := [v for v in variants if v.get("paired_best")]):
        lines += ["", "## Best on validation against the reference", "",
                  f"Per seed the checkpoint chosen on the validation goals, measured on the test goals; Δ and its 95 % interval "
                  f"({SEED_LEVEL_METHOD}) beside the final checkpoints' Δ.", "",
                  "| method | Δ best on validation | 95 % CI (seeds) | p | Δ final | 95 % CI (seeds) |", "|---|---|---|---|---|---|"]
        for v in bp:
            b, f = v["paired_best"], v["paired"]
            lines.append(f"| {v['variant']} − {b['reference']} | {b['mean_diff']:+.3f} | {_interval(b)} | {_fmt(b['p_value'])} | "
                         f"{f['mean_diff']:+.3f} | {_interval(f)} |")
    lines += family_markdown(study.get("family"))
    lines += along_training_markdown(study.get("along_training"))
    done = [v for v in variants if "per_task" in v]
    if done:
        lines += ["", "## Success per task", "", "Mean over the finished seeds.", "",
                  "| task | " + " | ".join(v["variant"] for v in done) + " |", "|---|" + "---|" * len(done)]
        for t in study["tasks"]:
            lines.append(f"| {t} | " + " | ".join(f"{v['per_task'][t]:.2f}" for v in done) + " |")
        lines.append("| **mean** | " + " | ".join(f"**{v['mean_success']:.3f}**" for v in done) + " |")
    lines += pairwise_markdown(study.get("pairwise") or {}, "Every pair of methods", "per-seed success difference")
    lines += pairwise_markdown(study.get("pairwise_best") or {}, "Every pair of methods, best on validation",
                               "per-seed success difference of the checkpoints chosen on the validation goals (measured on "
                               "the test goals), a family of its own")
    swept = [v for v in done if "paired_sweep" in v]
    if swept:
        key = study["sweep"]["key"]
        lines += ["", f"## {key}: each value against the first", "",
                  f"Paired difference from the same method at {key}={study['sweep']['values'][0]}, 95 % interval: a "
                  f"{SEED_LEVEL_METHOD}.", "", "| method | Δ success | 95 % CI (seeds) | seeds |", "|---|---|---|---|"]
        for v in swept:
            p = v["paired_sweep"]
            lines.append(f"| {v['variant']} | {p['mean_diff']:+.3f} | {_interval(p)} | {p['seeds']} |")
    masked = [v for v in done if "final_mask_changed_fraction" in v or "final_harmony_score" in v]
    if masked:
        lines += ["", "## Masks and harmony", "",
                  "Final averaged harmony score (Definition 3.2, at the last mask update); fraction of each task's active "
                  "weights not active in its initial ERK mask at the end (mean over tasks and seeds, and the least of any "
                  "task in any seed; 0 for masks that are never updated); the most that fraction can be under the run's "
                  "schedule (alpha_t of Eq. 12 summed over the mask updates, capped by the task's initially masked weights, over "
                  "its active ones: at sparsity S never above S / (1 − S)); "
                  "weights the updates switched off per task over the run.", "",
                  "| method | harmony score | mask changed fraction | least of a task | Eq. 12 bound | weights switched per task | "
                  "train s per run |", "|---|---|---|---|---|---|---|"]
        for v in masked:
            lines.append(f"| {v['variant']} | {_fmt(v.get('final_harmony_score'))} | {_fmt(v.get('final_mask_changed_fraction'), 5)} | "
                         f"{_fmt(v.get('final_mask_changed_fraction_min'), 5)} | {_fmt(v.get('mask_flips_bound_fraction'), 4)} | "
                         f"{_fmt(v.get('weights_flipped_per_task'), 0)} | {v['train_seconds']:.0f} |")
    lines += learned_masks_markdown(study)
    lines += unseen_markdown(study)
    if figures:
        lines += ["", "## Figures", ""] + [f"![{Path(f).stem}](figures/{f})" for f in figures]
    lines += ["", "## Command", "", "```", study["command"], "```", ""]
    return "\n".join(lines)


