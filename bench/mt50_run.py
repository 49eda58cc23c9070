"""A training run from the command line, timed part by part: ``python -m harmodt.train`` in this
process with timers around its checkpoints (``harmodt.run.resume.save``) and evaluations
(``Trainer.evaluate``), then one summary of what a 1e6-step run of those settings costs.

    python -m bench.mt50_run --results docs/results/mt50-gpu --label tm5000 -- \\
        --preset paper-mt50 --data data/mt50 --device cuda --fused --steps 20000 --out runs/mt50-tm5000

Writes ``RESULTS/LABEL.json`` (the command, device and versions, steps/s, seconds per mask update,
per checkpoint and per evaluation, checkpoint size, peak GPU memory, hours per 1e6 steps) and copies
the run's config.json, metrics.jsonl and results.json into ``RESULTS/LABEL/``. Steps/s is the
median of the metric lines' rates after the first line (warm-up, compilation, graph capture), over
the lines whose window holds no checkpoint (the loop's rate leaves mask updates and evaluations out,
not checkpoints); a mask update's seconds the median of the updates after the first (the first
compiles), or the first when it is the only one. Hours per 1e6 steps = (1e6 / steps/s + 1e6 /
t_m x mask update + 1e6 / checkpoint interval x checkpoint) / 3600, evaluations left out (their
number is a choice: ``--eval-every``). Exit code: the training's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

STEPS = 1_000_000


def timed(owner, name: str, seconds: list) -> None:
    """Wrap ``owner.name`` so that each call's seconds (the device synchronized at the end) are appended
    to ``seconds``."""
    fn = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t)

    setattr(owner, name, wrapper)


def _median(xs: list) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(metrics: list[dict], cfg, seconds: dict, checkpoint_mb: float | None) -> dict:
    """The figures of a run from its metric lines and the timed calls (see the module's docstring)."""
    lines = [m for m in metrics if "steps_per_s" in m][1:]
    every = cfg.checkpoint_every
    # no checkpoint in the window
    clean = [m["steps_per_s"] for m in lines if (m["step"] // every) * every <= m["step"] - cfg.log_every]
    sps = _median(clean) or _median([m["steps_per_s"] for m in lines])
    updates = [m["mask_update_s"] for m in metrics if "mask_update_s" in m]
    update_s = _median(updates[1:]) or _median(updates)
    checkpoint_s = _median(seconds["checkpoint"])
    t_m = cfg.masks.update_every
    hours = None
    if sps:
        hours = (STEPS / sps + (STEPS / t_m * update_s if update_s else 0.0)
                 + STEPS / every * (checkpoint_s or 0.0)) / 3600
    done = max((m["step"] for m in metrics if "step" in m), default=0)
    return {"steps": done, "steps_asked": cfg.steps, "update_every": t_m, "checkpoint_every": every, "steps_per_s": sps,
            "steps_per_s_lines": [m["steps_per_s"] for m in lines], "mask_updates": len(updates),
            "mask_update_s": update_s, "mask_update_s_all": updates, "checkpoints": len(seconds["checkpoint"]),
            "checkpoint_s": checkpoint_s, "checkpoint_s_all": seconds["checkpoint"], "checkpoint_mb": checkpoint_mb,
            "evaluations": len(seconds["evaluation"]),
            "evaluation_s": seconds["evaluation"][-1] if seconds["evaluation"] else None,
            "evaluation_episodes": cfg.eval_episodes, "hours_per_1e6_steps": hours}


def report(results: Path) -> str:
    """``RESULTS/README.md``: one row per LABEL.json in ``results``; returns the text."""
    runs = {f.stem: json.loads(f.read_text()) for f in sorted(results.glob("*.json"))}
    rows = ["| run | steps | t_m | steps/s | s per mask update | s per checkpoint (MB) | "
            "s per evaluation (episodes) | peak GPU MiB | h per 1e6 steps |",
            "|---|---|---|---|---|---|---|---|---|"]

    def f(x, fmt="{:.3g}"):
        return "n/a" if x is None else fmt.format(x)

    for label, r in runs.items():
        rows.append(f"| {label} | {r['steps']} | {r['update_every']} | {f(r['steps_per_s'])} | "
                    f"{f(r['mask_update_s'])} | {f(r['checkpoint_s'])} ({f(r['checkpoint_mb'])}) | "
                    f"{f(r['evaluation_s'])} ({r['evaluation_episodes']}) | "
                    f"{f(r.get('peak_gpu_memory_allocated_mib'), '{:.0f}')} | {f(r['hours_per_1e6_steps'])} |")
    first = next(iter(runs.values()), {})
    text = "\n".join([
        "# MT50 end to end on one device", "",
        f"Device: {first.get('device', 'n/a')}; torch {first.get('torch', 'n/a')}, "
        f"Triton {first.get('triton', 'n/a')}, Python {first.get('python', 'n/a')}, "
        f"{first.get('cpu_cores', 'n/a')} CPU cores. Written by `bench/gpu_scale.sh` "
        "(`python -m bench.mt50_run`); each run's command, config, metric lines and results are beside this file.", "",
        *rows, "",
        "Steps/s: the median rate of the metric lines after the first, over windows without a checkpoint. "
        "Hours per 1e6 steps: "
        "1e6 steps at that rate, plus 1e6 / t_m mask updates and 1e6 / interval checkpoints at their measured seconds; "
        "evaluations are left out. Commands:", "",
        *[f"- {label}: `{r['command']}` (CUDA graph: {r.get('cuda_graph')}, precision: {r.get('precision')}, "
          f"exit code {r['exit_code']})"
          for label, r in runs.items()], ""])
    (results / "README.md").write_text(text)
    return text


def device_info(device: str) -> dict:
    d = {"python": platform.python_version(), "torch": torch.__version__, "cpu_cores": os.cpu_count()}
    try:
        import triton

        d["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - not installed on every machine
        d["triton"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        d.update(device=torch.cuda.get_device_name(0),
                 peak_gpu_memory_allocated_mib=torch.cuda.max_memory_allocated() / 2**20,
                 peak_gpu_memory_reserved_mib=torch.cuda.max_memory_reserved() / 2**20)
    else:
        from .common import cpu_model

        d["device"] = f"{cpu_model()} ({os.cpu_count()} cores)"
    return d


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, train_argv = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m bench.mt50_run", description=__doc__.splitlines()[0])
    p.add_argument("--results", required=True, help="folder of the summary (created)")
    p.add_argument("--label", default=None, help="the run's name in it: LABEL.json and LABEL/ (needed unless --report)")
    p.add_argument("--report", action="store_true", help="only write RESULTS/README.md from the LABEL.json files there")
    a = p.parse_args(own)
    if a.report:
        print(report(Path(a.results)))
        return 0
    if not a.label or not train_argv:
        p.error("give --label and the training flags after --")
    from harmodt import train
    from harmodt.run import resume
    from harmodt.run.cli import parse_args

    cfg = parse_args(train_argv)  # what the run will be (the flags checked before anything runs)
    seconds = {"checkpoint": [], "evaluation": []}
    timed(resume, "save", seconds["checkpoint"])
    timed(train.Trainer, "evaluate", seconds["evaluation"])
    t = time.perf_counter()
    rc = train.main(train_argv)
    wall = time.perf_counter() - t
    out, res = Path(cfg.out), Path(a.results)
    (res / a.label).mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "metrics.jsonl", "results.json"):
        if (out / name).is_file():
            shutil.copy(out / name, res / a.label / name)
    metrics = ([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
               if (out / "metrics.jsonl").is_file() else [])
    ck = out / "checkpoint.pt"
    run_cfg = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
    summary = {"command": "python -m harmodt.train " + shlex.join(train_argv), "exit_code": rc, "wall_s": wall,
               **device_info(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")),
               "cuda_graph": run_cfg.get("cuda_graph"), "precision": run_cfg.get("precision"),
               **summarize(metrics, cfg, seconds, ck.stat().st_size / 1e6 if ck.is_file() else None)}
    if (out / "results.json").is_file():
        summary["final_mean_success"] = json.loads((out / "results.json").read_text()).get("mean_success")
    (res / f"{a.label}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if not k.endswith("_all") and k != "steps_per_s_lines"},
                     indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
