"""Render benchmark results (``bench/results/<machine>.json``, written by bench/conftest.py) as
markdown: one table per machine with every figure, its min-max over rounds, the previous
version's figure where it was measured, and its target.

    python -m bench.render                     # print the tables of every bench/results/*.json
    python -m bench.render FILE.json ...       # print these
    python -m bench.render --write [FILE ...]  # replace bench/figures.md's "## Latest figures" section
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIGURES = HERE / "figures.md"
HEADING = "## Latest figures"
INTRO = ("Rendered by `python -m bench.render --write` from the results file the benchmark run wrote; "
         "min-max is over the rounds; targets are reported, never asserted.")


def _num(v, unit: str) -> str:
    if v is None:
        return ""
    if unit in ("launches", "syncs"):
        return f"{v:.0f}"
    a = abs(v)
    s = f"{v:.3g}" if a < 10 else f"{v:.1f}" if a < 1000 else f"{v:.0f}"
    return s + ("x" if unit == "x" else " %" if unit == "%" else f" {unit}")


def _range(f: dict) -> str:
    if f.get("min") is None or f.get("max") is None:
        return ""
    unit = f["unit"]
    lo = _num(f["min"], unit).removesuffix(f" {unit}").removesuffix(unit if unit == "x" else " %")
    return f"{lo} - {_num(f['max'], unit)}"


def _target(f: dict) -> str:
    if "target" not in f:
        return ""
    return f"{f['target']} ({'met' if f['met'] else 'not met'})"


def render(doc: dict) -> str:
    m = doc["machine"]
    hw = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores ({m.get('cpu_capability', '')})"
    before, after = (doc.get(k) or {} for k in ("load_before", "load_after"))
    lines = [f"**{hw}**: torch {m['torch']}, triton {m.get('triton')}, {doc.get('threads')} torch threads; "
             f"load average {before.get('loadavg', ['?'])[0]} before, {after.get('loadavg', ['?'])[0]} after"
             + (f", fp32 GEMM {before['gemm_fp32_gflops']:.0f} / {after['gemm_fp32_gflops']:.0f} GFLOP/s before / after"
                if "gemm_fp32_gflops" in before and "gemm_fp32_gflops" in after else "")
             + f"; `{doc['command']}` ({doc.get('duration_s', 0) / 60:.0f} min).", ""]
    prev = sorted({str(b["info"].get("previous_version")) for b in doc["benchmarks"]
                   if b.get("info", {}).get("previous_version")})
    if prev:
        lines += [f"Previous version: commit {', '.join(prev)} (`HARMODT_BENCH_BASELINE`), "
                  "measured in the same rounds.", ""]
    lines += ["| benchmark | figure | median | min - max | previous version | target |", "|---|---|---|---|---|---|"]
    for b in doc["benchmarks"]:
        for f in b["figures"]:
            lines.append(f"| `{b['name']}` | {f['label']} | {_num(f['value'], f['unit'])} | {_range(f)} | "
                         f"{_num(f.get('baseline'), f['unit'])} | {_target(f)} |")
    skipped = Counter(doc.get("skipped", {}).values())
    if skipped:
        lines += [""] + [f"Skipped: {n} benchmark{'s' if n > 1 else ''}: {reason}." for reason, n in skipped.items()]
    return "\n".join(lines) + "\n"


def write_figures(text: str, path: Path = FIGURES) -> None:
    src = path.read_text()
    start = src.index(HEADING)
    nxt = src.find("\n## ", start + len(HEADING))
    tail = "" if nxt < 0 else src[nxt:]
    path.write_text(src[:start] + f"{HEADING}\n\n{INTRO}\n\n{text}" + tail)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.render", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", help="results files (default: bench/results/*.json)")
    p.add_argument("--write", action="store_true", help=f"replace the '{HEADING}' section of bench/figures.md")
    args = p.parse_args(argv)
    files = [Path(f) for f in args.files] or sorted((HERE / "results").glob("*.json"))
    if not files:
        print("no results files: run python -m pytest bench/ --benchmark-only first", file=sys.stderr)
        return 1
    text = "\n".join(render(json.loads(f.read_text())) for f in files)
    if args.write:
        write_figures(text)
        print(f"wrote the tables of {', '.join(map(str, files))} into {FIGURES}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
