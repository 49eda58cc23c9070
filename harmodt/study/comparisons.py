"""The study's comparisons between arms: every pair by seed with Holm's correction over the table,
the pre-registered family (``--family``) with Holm's over it alone, and the differences along
training on the validation goals; with their sections of summary.md."""

from __future__ import annotations

import numpy as np

from ..methods import METHODS, REFERENCE
from .stats import SEED_LEVEL_METHOD, excludes_zero, fmt as _fmt, holm, paired_difference, paired_t, t_interval


def along_training(study: dict) -> dict | None:
    """Success on the validation goals against training steps (the runs' ``validation_curve``): per
    variant and step the t-interval over seeds, and per comparison and step the paired difference with
    the seed as the unit (:func:`paired_t`). The comparisons: every variant against Prompt-DT, and every
    variant with learned masks against every one with fixed (random ERK) masks. None without curves."""
    finished = [r for r in study["runs"] if r["status"] == "finished" and r.get("validation_curve")]
    if not finished:
        return None
    names = list(dict.fromkeys(r["variant"] for r in finished))
    curves = {v: {r["seed"]: dict((int(s), x) for s, x in r["validation_curve"]) for r in finished if r["variant"] == v}
              for v in names}
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
    table = {a: {b: p for b in names if b != a and (p := paired_success(rows[a], rows[b], study["tasks"], b, key))}
             for a in names}
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
    paired difference by seed (:func:`paired_success`), and Holm's correction over these alone at 5 %.
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
        p = paired_success(rows[a], rows[b], study["tasks"], b) if rows[a] and rows[b] else None
        out.append({"variant": a, **(p or {"reference": b, "seeds": 0})})
    kept = holm({i: c["p_value"] for i, c in enumerate(out) if "p_value" in c}, HOLM_ALPHA)
    for i, rejected in kept.items():
        out[i]["holm"] = rejected
    return {"alpha": HOLM_ALPHA, "size": len(spec), "comparisons": out}


def family_markdown(fam: dict | None) -> list[str]:
    if not fam:
        return []
    lines = ["", "## The pre-registered comparisons", "",
             "Fixed before the runs (`--family`). Mean over seeds of the per-seed success difference, its 95 % "
             f"interval ({SEED_LEVEL_METHOD}) and paired-t p-value; † where the p-value survives Holm's correction "
             f"over these {fam['size']} at {fam['alpha'] * 100:.0f} %.", "",
             "| # | comparison | seeds | difference | 95 % CI | p | Holm |", "|---|---|---|---|---|---|---|"]
    for i, c in enumerate(fam["comparisons"], 1):
        if "mean_diff" not in c:
            lines.append(f"| {i} | {c['variant']} − {c['reference']} | 0 | – | – | – | – |")
            continue
        lines.append(f"| {i} | {c['variant']} − {c['reference']} | {c['seeds']} | {c['mean_diff']:+.3f} | "
                     f"{interval_text(c)} | {_fmt(c['p_value'], 4)} | {'†' if c.get('holm') else 'no'} |")
    return lines


def paired_success(rows: list[dict], ref_rows: list[dict], tasks: list[str], ref: str,
                   key: str | None = None) -> dict | None:
    """Success of ``rows`` minus that of ``ref_rows``, paired by seed (:func:`paired_difference`): of the
    final checkpoints, or (``key="best"``) of the checkpoints chosen on the validation goals."""
    def by_seed(rs):
        return {r["seed"]: {t: (r[key] if key else r)["tasks"][t]["success"] for t in tasks}
                for r in rs if key is None or key in r}

    return paired_difference(by_seed(rows), by_seed(ref_rows), tasks, ref)


def interval_text(p: dict, nd: int = 3) -> str:
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
             "Difference of mean success on the validation goals at each evaluation step, mean over seeds and its 95 "
             f"% interval ({at['interval']}); **bold** where the interval excludes 0. No multiplicity correction "
             "across steps.", "",
             "| comparison | seeds | " + " | ".join(str(s) for s in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for d in at["differences"]:
        cells = []
        for s in steps:
            p = d["per_step"].get(str(s))
            txt = "–" if p is None else f"{p['mean_diff']:+.3f} {interval_text(p, 2)}"
            cells.append(f"**{txt}**" if p is not None and excludes_zero(p) else txt)
        seeds = max((p["seeds"] for p in d["per_step"].values()), default=0)
        lines.append(f"| {d['variant']} − {d['reference']} | {seeds} | " + " | ".join(cells) + " |")
    return lines


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
             "(each unordered pair once); † marks those whose paired-t p-value survives Holm's correction over all "
             f"{m} at {HOLM_ALPHA * 100:.0f} %: "
             f"{', '.join(f'{a} vs {b}' for a, b in survive) if survive else 'none does'}.", "",
             "| row − column | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for a in names:
        cells = []
        for b in names:
            p = pw[a].get(b)
            if p is None:
                cells.append("–")
                continue
            txt = f"{p['mean_diff']:+.3f} {interval_text(p, 2)}" + (" †" if p.get("holm") else "")
            cells.append(f"**{txt}**" if excludes_zero(p) else txt)
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines
