"""How well a task can be told apart from what a prompt-conditioned model sees.

For every task of a data set, each episode gives what Prompt-DT is shown of it, normalised as the
model sees it (:class:`harmodt.data.batches.PromptDTBatcher`'s state statistics, per task or pooled):

- ``prompt``: a K*-step window cut as a prompt is (:func:`harmodt.data.batches.episode_segments`:
  "last" = the last K* steps before the final step, Prompt-DT's cut; "random" = a window anywhere),
  its normalised states, actions, scaled returns-to-go and timesteps / max_ep_len, flattened;
- ``first``: the episode's first normalised observation (what the history shows at an episode's start);
- ``both``: the two concatenated.

Two classifiers tell the tasks apart from one such vector: nearest centroid (Euclidean, on the
vectors as they are) and multinomial logistic regression (a softmax layer fitted with L-BFGS and an
L2 penalty on standardised vectors). Held out two ways: ``heldout``, k-fold over each task's training
episodes (every episode is tested once, by a classifier fitted on the other folds of every task);
``prompt_episodes``, a classifier fitted on every training episode tested on the task's expert prompt
episodes (the episodes the model's prompts are cut from). Per task the accuracy is the fraction of
its held-out episodes assigned to it. With the per-task success of Prompt-DT runs (``run_eval.json``)
the per-task accuracies get a Spearman rank correlation.

The vectors and classifiers are in harmodt/study/task_identity.py. ``python -m harmodt.study.identify
--data DIR --out DIR [--runs DIR] [--control mtdt]`` writes ``identify.json``, ``identify.md`` and ``identify.png``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..data.batches import STATE_NORMS
from ..oneline import OneLineParser, run_tool
from .task_identity import (CLASSIFIERS, VIEWS, IdentifyConfig, IdentifyError, classify, episode_features,
                            heldout_predictions, per_task_scores, spearman)


def method_success(runs_dir: Path, tasks: list[str], method: str = "prompt-dt") -> dict:
    """Per-task success of a method's runs under ``runs_dir`` (``METHOD-s*/run_eval.json``, the final
    checkpoint's evaluation), averaged over seeds, with each run's prompt segment and state statistics
    from its config.json."""
    paths = sorted(runs_dir.glob(f"{method}-s*/run_eval.json"), key=lambda p: int(p.parent.name.rsplit("-s", 1)[1]))
    if not paths:
        raise IdentifyError(f"{runs_dir}: no {method}-s*/run_eval.json")
    per_seed, settings = {}, {}
    for path in paths:
        ev = json.loads(path.read_text())
        missing = [t for t in tasks if t not in ev["tasks"]]
        if missing:
            raise IdentifyError(f"{path}: has no success for {', '.join(missing[:3])} (the data's tasks)")
        per_seed[path.parent.name] = {t: float(ev["tasks"][t]["success"]) for t in tasks}
        cfg_path = path.parent / "config.json"
        if cfg_path.exists():
            c = json.loads(cfg_path.read_text())
            settings[path.parent.name] = {"prompt_segment": c.get("prompt_segment", "random"),
                                          "state_norm": c.get("state_norm", "per-task"), "steps": c.get("steps"),
                                          "prompt_len": c.get("model", {}).get("prompt_len")}
    mean = {t: float(np.mean([s[t] for s in per_seed.values()])) for t in tasks}
    return {"runs": str(runs_dir), "seeds": list(per_seed), "settings": settings, "per_seed": per_seed,
            "per_task": mean, "mean_success": float(np.mean(list(mean.values())))}


def identify(datasets: dict, cfg: IdentifyConfig, state_norms=STATE_NORMS, classifiers=CLASSIFIERS,
             success: dict | None = None, controls: dict | None = None) -> list[dict]:
    """Every (state statistics, view, segment, classifier): overall and per-task accuracy on both
    held-out sets, and the Spearman correlation of per-task accuracy with ``success`` (task ->
    Prompt-DT success) when given, and with each of ``controls`` (method -> task -> success: runs
    that see no prompt, to tell identification from task difficulty) under ``spearman_controls``."""
    tasks = list(datasets)
    short = [t for t in tasks if len(datasets[t].trajectories) < cfg.folds]
    if short:
        raise IdentifyError(f"--folds {cfg.folds}: tasks with fewer training episodes than folds: "
                            f"{', '.join(short[:3])}")
    results = []
    for norm in state_norms:
        f = episode_features(datasets, tasks, cfg, norm)
        y, yp = f["train_labels"], f["prompt_labels"]
        for view, seg in VIEWS:
            x, xp = f["train"][(view, seg)], f["prompts"][(view, seg)]
            for clf in classifiers:
                preds = {"heldout": (y, heldout_predictions(x, y, len(tasks), clf, cfg)),
                         "prompt_episodes": (yp, classify(clf, x, y, xp, len(tasks), cfg))}
                row = {"state_norm": norm, "view": view, "segment": seg, "classifier": clf, "features": x.shape[1]}
                per_task = {t: {} for t in tasks}
                for test, (truth, pred) in preds.items():
                    row[test] = float(np.mean(truth == pred))
                    for t, s in per_task_scores(truth, pred, tasks).items():
                        per_task[t][test] = s["accuracy"]
                        per_task[t][test + "_confused_with"] = s["confused_with"]
                    acc = [per_task[t][test] for t in tasks]
                    if success is not None:
                        row.setdefault("spearman", {})[test] = spearman(acc, [success[t] for t in tasks])
                    for method, ctl in (controls or {}).items():
                        row.setdefault("spearman_controls", {}).setdefault(method, {})[test] = spearman(
                            acc, [ctl[t] for t in tasks])
                row["per_task"] = per_task
                results.append(row)
    return results


# ---- report ----------------------------------------------------------------------------------
def _key(view, seg):
    return view if seg is None else f"{view} ({seg})"


def _find(results, norm, view, seg, clf):
    return next(r for r in results
                if (r["state_norm"], r["view"], r["segment"], r["classifier"]) == (norm, view, seg, clf))


def _f(x, nd=3):
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{nd}f}"


def markdown(report: dict) -> str:
    """The summary tables of a report (:func:`run`'s dict)."""
    res, tasks, pdt = report["results"], report["tasks"], report.get("prompt_dt")
    norms = sorted({r["state_norm"] for r in res}, key=STATE_NORMS.index)
    clfs = sorted({r["classifier"] for r in res}, key=CLASSIFIERS.index)
    d = report["data"]
    lines = [f"# Task identification: {d['path']}", "",
             f"{len(tasks)} tasks; {d['train_episodes_per_task']} training episodes and "
             f"{d['prompt_episodes_per_task']} expert prompt episodes per task; K* = {report['config']['prompt_len']}; "
             f"{report['config']['folds']}-fold held-out over training episodes; chance {1 / len(tasks):.3f}.", ""]
    for test, title in (("heldout", "held-out training episodes (k-fold)"),
                        ("prompt_episodes", "expert prompt episodes")):
        lines += [f"## Accuracy on {title}", "",
                  "| view | " + " | ".join(f"{n}, {c}" for n in norms for c in clfs) + " |",
                  "|---|" + "---|" * (len(norms) * len(clfs))]
        for view, seg in VIEWS:
            lines.append(f"| {_key(view, seg)} | "
                         + " | ".join(_f(_find(res, n, view, seg, c)[test]) for n in norms for c in clfs) + " |")
        if pdt:
            lines.append("| Spearman ρ with Prompt-DT success (logistic; first / prompt (last) / both (last)) | "
                         + " | ".join(" / ".join(_f(_find(res, n, v, s, c)["spearman"][test]["rho"], 2)
                                                 for v, s in VIEWS[:3])
                                      for n in norms for c in clfs) + " |")
        for method in report.get("controls") or {}:
            lines.append(f"| Spearman ρ with {method} success (control; same views) | " + " | ".join(
                " / ".join(_f(_find(res, n, v, s, c)["spearman_controls"][method][test]["rho"], 2)
                           for v, s in VIEWS[:3])
                for n in norms for c in clfs) + " |")
        lines.append("")
    if pdt:
        lines += [f"Prompt-DT runs: {pdt['runs']} ({', '.join(pdt['seeds'])}), mean success {pdt['mean_success']:.3f}."]
        lines += [f"Control {m}: {', '.join(c['seeds'])}, mean success {c['mean_success']:.3f}."
                  for m, c in (report.get("controls") or {}).items()]
        lines.append("")
    norm = report["model_state_norm"]
    lines += [f"## Per task ({norm} statistics, logistic regression, held-out training episodes; "
              "prompt = last K* steps)", "",
              "| task | Prompt-DT success | first | prompt | both | prompt, NC | prompt, on expert prompt episodes | "
              "prompt mistaken for |",
              "|---|---|---|---|---|---|---|---|"]
    first, prompt, both = (_find(res, norm, v, s, "logistic")["per_task"] for v, s in VIEWS[:3])
    nc = _find(res, norm, "prompt", "last", "nearest-centroid")["per_task"] if "nearest-centroid" in clfs else None
    order = sorted(tasks, key=lambda t: (pdt["per_task"][t] if pdt else 0.0, t))
    for t in order:
        lines.append(f"| {t} | {_f(pdt['per_task'][t], 2) if pdt else '—'} | {_f(first[t]['heldout'], 2)} | "
                     f"{_f(prompt[t]['heldout'], 2)} | {_f(both[t]['heldout'], 2)} | "
                     f"{_f(nc[t]['heldout'], 2) if nc else '—'} | {_f(prompt[t]['prompt_episodes'], 2)} | "
                     f"{prompt[t]['heldout_confused_with'] or '—'} |")
    return "\n".join(lines) + "\n"


def figure(report: dict, path: Path) -> Path:
    """Left: per-task held-out accuracy (the model's statistics, logistic) against Prompt-DT success;
    right: overall held-out accuracy per view, statistics and classifier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, tasks, pdt, norm = report["results"], report["tasks"], report.get("prompt_dt"), report["model_state_norm"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    if pdt:
        sx = [pdt["per_task"][t] for t in tasks]
        for (view, seg), marker in zip(VIEWS[:3], "o^s"):
            r = _find(res, norm, view, seg, "logistic")
            rho = r["spearman"]["heldout"]["rho"]
            ax.scatter(sx, [r["per_task"][t]["heldout"] for t in tasks], marker=marker, alpha=0.7,
                       label=f"{_key(view, seg)}: ρ {_f(rho, 2)}")
        ax.set_xlabel("Prompt-DT success (mean over seeds)")
        ax.legend(fontsize=8)
    ax.set_ylabel("held-out accuracy of the task")
    ax.set_title(f"per task ({norm} statistics, logistic)")
    ax = axes[1]
    norms = sorted({r["state_norm"] for r in res}, key=STATE_NORMS.index)
    clfs = sorted({r["classifier"] for r in res}, key=CLASSIFIERS.index)
    combos = [(n, c) for n in norms for c in clfs]
    width = 0.8 / len(combos)
    for i, (n, c) in enumerate(combos):
        ax.bar(np.arange(len(VIEWS)) + i * width, [_find(res, n, v, s, c)["heldout"] for v, s in VIEWS], width,
               label=f"{n}, {c}")
    ax.axhline(1 / len(tasks), color="k", lw=0.8, ls="--", label="chance")
    ax.set_xticks(np.arange(len(VIEWS)) + 0.4 - width / 2, [_key(v, s) for v, s in VIEWS], fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_title("held-out accuracy over all tasks")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    fig.suptitle(report["data"]["path"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(data: Path, out: Path, cfg: IdentifyConfig, runs: Path | None = None, tasks: list[str] | None = None,
        control_methods: tuple = ()) -> dict:
    """Load ``data``, classify, and write ``out``/identify.json, identify.md and identify.png;
    ``control_methods``: methods whose runs under ``runs`` the per-task accuracies are also ranked against."""
    if control_methods and runs is None:
        raise IdentifyError("--control needs --runs")
    from ..data.formats import DataError
    from ..data.load import load_dataset

    try:
        datasets = load_dataset(data, tasks)
    except DataError as e:
        raise IdentifyError(str(e)) from None
    names = list(datasets)
    pdt = method_success(runs, names) if runs is not None else None
    controls = {m: method_success(runs, names, m) for m in control_methods}
    settings = next(iter(pdt["settings"].values()), {}) if pdt else {}
    report = {
        "data": {"path": str(data), "train_episodes_per_task": sorted({len(d.trajectories) for d in datasets.values()}),
                 "prompt_episodes_per_task": sorted({len(d.prompts) for d in datasets.values()})},
        "config": asdict(cfg), "tasks": names, "model_state_norm": settings.get("state_norm", "per-task"),
        "prompt_dt": pdt, "controls": controls,
        "results": identify(datasets, cfg, success=pdt["per_task"] if pdt else None,
                            controls={m: c["per_task"] for m, c in controls.items()}),
    }
    manifest = data / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        report["data"].update(settings=m.get("settings", {}), content_sha256=m.get("content_sha256"))
    for key in ("train_episodes_per_task", "prompt_episodes_per_task"):
        v = report["data"][key]
        report["data"][key] = v[0] if len(v) == 1 else v
    out.mkdir(parents=True, exist_ok=True)
    (out / "identify.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "identify.md").write_text(markdown(report))
    figure(report, out / "identify.png")
    return report


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m harmodt.study.identify", allow_abbrev=False,
                      description="How well tasks can be told apart from a Prompt-DT prompt, the first observation, "
                                  "or both.")
    p.add_argument("--data", type=Path, required=True, help="a data folder (python -m harmodt.data generate)")
    p.add_argument("--out", type=Path, required=True, help="folder for identify.json, identify.md, identify.png")
    p.add_argument("--runs", type=Path, default=None, help="a study's runs folder with prompt-dt-s*/run_eval.json")
    p.add_argument("--control", default="", help="comma list of methods (e.g. mtdt) whose runs in --runs the per-task "
                                                 "accuracies are also rank-correlated with")
    p.add_argument("--tasks", default=None, help="comma list of task names (default: every task in --data)")
    for name, default in asdict(IdentifyConfig()).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = IdentifyConfig(**{k: getattr(args, k) for k in asdict(IdentifyConfig())})

    def body() -> int:
        if cfg.folds < 2 or cfg.prompt_len < 1:
            raise IdentifyError(f"--folds must be at least 2 and --prompt-len at least 1, got {cfg.folds} and "
                                f"{cfg.prompt_len}")
        report = run(args.data, args.out, cfg, args.runs, args.tasks.split(",") if args.tasks else None,
                     tuple(m for m in args.control.split(",") if m))
        best = _find(report["results"], report["model_state_norm"], "prompt", "last", "logistic")
        print(f"[identify] {len(report['tasks'])} tasks: prompt (last) logistic held-out accuracy "
              f"{best['heldout']:.3f}; wrote {args.out}/identify.json, identify.md, identify.png")
        return 0

    return run_tool(body, "[identify] interrupted", (IdentifyError,))


if __name__ == "__main__":
    sys.exit(main())
