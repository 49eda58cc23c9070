"""A study's arms and differences beside the HarmoDT paper's reported numbers, with a verdict per claim.

``python -m harmodt.study.against_paper STUDY.json [--write README.md]`` prints (or writes between
the markers ``<!-- against-paper -->`` and ``<!-- /against-paper -->`` of a Markdown file) two tables:

* each arm's final mean success over seeds with its 95 % t-interval, and its best-on-validation mean,
  beside the paper's number for that method on MT50 near-optimal: Table 3's row at 3 layers × 4 heads
  (0.87 M parameters; MTDT, Prompt-DT and HarmoDT-F only) and Table 2 (6 × 8, 1.47 M; all four);
* each of the paper's claims F − Prompt-DT, F − MTDT, Prompt-DT − MTDT (Table 3) and F − R (Table 2)
  beside our paired difference over seeds (its 95 % paired-t interval and p-value, Holm over every
  pair of the study's arms, as in summary.md), with a verdict.

The verdict is about the claim's direction, fixed before any result: **supports** when our difference
is positive and survives Holm; **contradicts** when it is negative and survives Holm; otherwise
**cannot tell**. A second column says whether the paper's gap lies inside our interval, below it or
above it, which is about size, not direction. The paper reports success in % over 3 seeds at 1e6
steps on its own data; the study's budget and data are its own (the table says so).

Arms are matched to the paper's methods by their method (``mtdt``, ``prompt-dt``, ``harmodt-r``,
``harmodt-f``); a study with two arms of one method is refused.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..files import loads_json, write_atomic
from ..oneline import OneLineParser, run_tool


class AgainstPaperError(ValueError):
    """A study file or a Markdown file the comparison cannot use."""


@dataclass(frozen=True)
class Reported:
    """One number of the paper: mean success in % (over 3 seeds) and its ± as printed."""
    mean: float
    spread: str


# MT50 near-optimal, success in % (HarmoDT, ICML 2024). Table 3's (3, 4, 0.87) row has no HarmoDT-R.
TABLE3_MT50_3x4 = {"mtdt": Reported(58.13, "3.6"), "prompt-dt": Reported(61.93, "0.4"),
                   "harmodt-f": Reported(72.80, "1.6")}
TABLE2_MT50 = {"mtdt": Reported(65.80, "1.02"), "prompt-dt": Reported(69.33, "0.89"),
               "harmodt-r": Reported(75.39, "1.18"),
               "harmodt-f": Reported(82.20, "0.40")}
METHOD_NAMES = {"mtdt": "MTDT", "prompt-dt": "Prompt-DT", "harmodt-r": "HarmoDT-R", "harmodt-f": "HarmoDT-F"}

# The paper's claims: (better, worse, the table whose gap is the claim's size).
CLAIMS = (("harmodt-f", "prompt-dt", "Table 3"), ("harmodt-f", "mtdt", "Table 3"),
          ("prompt-dt", "mtdt", "Table 3"), ("harmodt-f", "harmodt-r", "Table 2"))
TABLES = {"Table 3": TABLE3_MT50_3x4, "Table 2": TABLE2_MT50}

START, END = "<!-- against-paper -->", "<!-- /against-paper -->"


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _pct(x, signed: bool = False) -> str:
    return "–" if _nan(x) else (f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}")


def _interval(lo, hi, signed: bool = False) -> str:
    return f"[{_pct(lo, signed)}, {_pct(hi, signed)}]"


def verdict(diff: dict | None) -> str:
    """The claim's direction against one paired difference (better − worse) of the study's pairwise table."""
    if diff is None:
        return "cannot tell (no shared seed)"
    if diff["seeds"] < 2:
        return f"cannot tell ({diff['seeds']} seed)"
    if diff.get("holm") and diff["ci_low"] > 0:
        return "supports"
    if diff.get("holm") and diff["ci_high"] < 0:
        return "contradicts"
    return "cannot tell"


def size_check(diff: dict | None, paper_gap: float) -> str:
    """Where the paper's gap (a fraction) lies against our 95 % interval of the difference."""
    if diff is None or _nan(diff["ci_low"]):
        return "–"
    if paper_gap < diff["ci_low"]:
        return "below our interval"
    if paper_gap > diff["ci_high"]:
        return "above our interval"
    return "inside"


def arms_by_method(study: dict) -> dict[str, dict]:
    """``{method: variant entry of study.json}`` for the paper's four methods that the study ran."""
    out: dict[str, dict] = {}
    for v in study["variants"]:
        if v.get("sweep_value") is not None:
            raise AgainstPaperError(f"study arm {v['variant']!r} is a swept value: compare an unswept study")
        method = v["method"]
        if method not in METHOD_NAMES:
            continue
        if method in out:
            raise AgainstPaperError(f"study arms {out[method]['variant']!r} and {v['variant']!r} are both {method}: "
                                    "one arm per method can stand for the paper's")
        out[method] = v
    return out


def tables_markdown(study: dict) -> str:
    """The two Markdown tables (arms, claims) with a line on budget and seeds."""
    arms = arms_by_method(study)
    if not arms:
        raise AgainstPaperError("the study has none of the paper's methods (mtdt, prompt-dt, harmodt-r, harmodt-f)")
    steps = _flag(study.get("passthrough", []), "--steps")
    seed_sets = {tuple(sorted(v["seeds_finished"])) for v in arms.values()}
    if len(seed_sets) == 1:
        seeds = next(iter(seed_sets))
        over = f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds)) or 'none'})"
    else:
        over = "each arm's finished seeds (the seeds column)"
    lines = [f"Ours: {len(study['tasks'])} tasks, {steps or 'the trainer default'} steps, mean success over {over}, "
             "95 % t-interval over the per-seed means, in %. The paper: MT50 near-optimal, 1e6 steps, mean ± its "
             "spread over 3 seeds.", "",
             "| arm | seeds | ours, final [95 % CI] | ours, best on validation | Table 3 (3 × 4, 0.87 M) | Table 2 (6 "
             "× 8, 1.47 M) |",
             "|---|---|---|---|---|---|"]
    for method, v in arms.items():
        t3, t2 = TABLE3_MT50_3x4.get(method), TABLE2_MT50.get(method)
        best = v.get("best") or {}
        lines.append(f"| {v['variant']} | {len(v['seeds_finished'])} | {_pct(v['mean_success'])} "
                     f"{_interval(v['ci_low'], v['ci_high'])} | {_pct(best.get('mean_success'))} | "
                     f"{f'{t3.mean:.2f} ± {t3.spread}' if t3 else '–'} | "
                     f"{f'{t2.mean:.2f} ± {t2.spread}' if t2 else '–'} |")
    lines += ["", "Claims: our paired difference over seeds (final checkpoints), its 95 % paired-t interval and "
              f"p-value; † where it survives Holm over the study's {_family(study)} pairwise comparisons. Verdict on "
              "the claim's direction: supports (positive and †), contradicts (negative and †), cannot tell "
              "(otherwise). The paper's gap against our interval says whether the size agrees.", "",
              "| claim | the paper's gap | ours [95 % CI] | p | verdict | the paper's gap against ours |",
              "|---|---|---|---|---|---|"]
    for better, worse, table in CLAIMS:
        if better not in arms or worse not in arms:
            continue
        reported = TABLES[table]
        gap = reported[better].mean - reported[worse].mean
        d = study["pairwise"].get(arms[better]["variant"], {}).get(arms[worse]["variant"])
        ours = "–" if d is None else (f"{_pct(d['mean_diff'], True)} {_interval(d['ci_low'], d['ci_high'], True)}"
                                      + (" †" if d.get("holm") else ""))
        p = "–" if d is None or _nan(d["p_value"]) else f"{d['p_value']:.2g}"
        lines.append(f"| {METHOD_NAMES[better]} − {METHOD_NAMES[worse]} | {gap:+.2f} ({table}) | {ours} | {p} | "
                     f"{verdict(d)} | {size_check(d, gap / 100)} |")
    lines += without_masks(study, arms)
    return "\n".join(lines) + "\n"


def _ours(d: dict) -> str:
    p = "–" if _nan(d["p_value"]) else f"{d['p_value']:.2g}"
    holm = ", †" if d.get("holm") else ""
    return (f"{_pct(d['mean_diff'], True)} {_interval(d['ci_low'], d['ci_high'], True)} "
            f"(p {p}{holm}, {d['seeds']} seeds)")


def _best(study: dict, arms: dict[str, dict]) -> str:
    """MTDT − Prompt-DT on the checkpoints chosen on the validation goals (study.json's ``pairwise_best``), or ""."""
    d = (study.get("pairwise_best") or {}).get(arms["mtdt"]["variant"], {}).get(arms["prompt-dt"]["variant"])
    return "" if d is None else f", and on the checkpoints chosen on the validation goals {_ours(d)}"


def without_masks(study: dict, arms: dict[str, dict]) -> list[str]:
    """What the arm without masks does beside the masked arms' claims: MTDT − Prompt-DT on the same
    seeds next to each masked arm's gain over Prompt-DT (a gain MTDT, with no mask, also gets is not
    the masks'), and what HarmoDT-F − MTDT and HarmoDT-F − HarmoDT-R each compare."""
    pw = study["pairwise"]
    mtdt_pd = (pw.get(arms["mtdt"]["variant"], {}).get(arms["prompt-dt"]["variant"])
               if {"mtdt", "prompt-dt"} <= arms.keys() else None)
    masked = {m: d for m in ("harmodt-r", "harmodt-f") if m in arms and "prompt-dt" in arms
              and (d := pw.get(arms[m]["variant"], {}).get(arms["prompt-dt"]["variant"]))}
    if mtdt_pd is None or not masked:
        return []
    gains = "; ".join(f"{arms[m]['variant']} − Prompt-DT {_ours(d)}" for m, d in masked.items())
    lines = ["", "Masked arms against Prompt-DT, beside MTDT (no mask: the task's one-hot ID beside the state, no "
             "prompt) against Prompt-DT on the same seeds (†: survives Holm over the pairwise comparisons of the "
             f"same checkpoints): {gains}; MTDT − Prompt-DT {_ours(mtdt_pd)}{_best(study, arms)}. "
             "A masked arm's gain over Prompt-DT is the masks' own only as far as it exceeds MTDT's, so a "
             "\"supports\" for HarmoDT-F − "
             "Prompt-DT says the paper's direction holds, not that masks cause it."]
    if "harmodt-f" in arms and "mtdt" in arms:
        lines[-1] += (" HarmoDT-F − MTDT sets masks and a prompt against a one-hot task ID without masks; learned "
                      "masks against random ones is HarmoDT-F − HarmoDT-R" + (" (the same ERK draw per seed)."
                                                                              if "harmodt-r" in arms else "."))
    return lines


def _family(study: dict) -> int:
    sizes = {d.get("comparisons") for row in study["pairwise"].values() for d in row.values()}
    sizes.discard(None)
    return max(sizes, default=0)


def _flag(argv: list[str], name: str) -> str | None:
    return next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name), None)


def write_between_markers(path: Path, text: str) -> None:
    """Replace what lies between the markers of ``path`` with ``text`` (the markers are kept)."""
    doc = path.read_text()
    found = len(re.findall(re.escape(START), doc)), len(re.findall(re.escape(END), doc))
    if found != (1, 1) or doc.index(START) > doc.index(END):
        raise AgainstPaperError(f"{path}: needs one {START} line followed by one {END} line (found {found[0]} and "
                                f"{found[1]})")
    head, rest = doc.split(START, 1)
    _, tail = rest.split(END, 1)
    write_atomic(path, f"{head}{START}\n{text}{END}{tail}")


def load_study(path: Path) -> dict:
    try:
        study = loads_json(path.read_text())
    except FileNotFoundError:
        raise AgainstPaperError(f"{path}: no such study file") from None
    except ValueError as e:
        raise AgainstPaperError(f"{path}: not a study.json ({e})") from None
    if not isinstance(study, dict) or not {"variants", "pairwise", "tasks"} <= study.keys():
        raise AgainstPaperError(f"{path}: not a study.json (no variants, pairwise and tasks)")
    return study


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m harmodt.study.against_paper", allow_abbrev=False,
                      description="A study's arms and claims beside the HarmoDT paper's MT50 numbers (Tables 2 and 3).")
    p.add_argument("study", type=Path, help="a study.json written by python -m harmodt.study")
    p.add_argument("--write", type=Path, default=None,
                   help=f"a Markdown file whose {START} ... {END} block is replaced (default: print)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    def run() -> int:
        text = tables_markdown(load_study(args.study))
        if args.write is None:
            print(text, end="")
        else:
            write_between_markers(args.write, text)
            print(f"[against-paper] wrote {args.write}")
        return 0

    return run_tool(run, "[against-paper] interrupted", (AgainstPaperError,))


if __name__ == "__main__":
    sys.exit(main())
