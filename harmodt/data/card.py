"""A data card of Meta-World v3's scripted experts and of the curriculum our generator builds on
them: ``python -m harmodt.data card --tasks MT50 --goals N --out DIR``.

For each task it measures

- the expert: ``--goals`` noise-free episodes of the shipped scripted policy, one random goal each
  (the first resets of the task's env built with seed ``task_seed(seed, task) + 2 000 003``, so
  apart from the training data's goals): success (``info['success']`` at any step) with its 95 %
  Wilson interval, return, episode length and the first step of success;
- the curriculum: the ``--curriculum-episodes`` episodes ``python -m harmodt.data generate``
  makes for the task with the same seed (:func:`generator.curriculum_rollouts`, the very
  episodes of a data folder generated with that many episodes and seed), success by decile of the
  episode index.

It writes ``DIR/NAME.json`` (every number, per episode too), ``DIR/NAME.md`` (the card, see
:mod:`harmodt.data.card_report`) and ``DIR/NAME.png`` (per-task expert success with its interval).
Each (task, part) is a unit of work run in a process of its own (``--workers``); a finished unit is
cached (``--cache``) with its settings, so a killed run resumes where it stopped. Every unit has its
own seeded RNG streams, so the numbers do not depend on ``--workers``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from concurrent.futures import ProcessPoolExecutor, as_completed
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from ..files import cache_dir, loads_json, read_json, write_atomic
from ..ownership import check_output_file
from ..tasks import parse_tasks, task_seed
from .card_report import wilson
from .formats import DataError
from .generator import CURRICULUM, GENERATOR_VERSION, SIGMA, curriculum_rollouts, decile_success, rollout

EXPERT_SEED_OFFSET = 2_000_003  # the expert's goals: apart from the data's (seed) and its prompts' (+1 000 003)
PACKAGES = ("metaworld", "mujoco", "gymnasium", "numpy")
CARD_VERSION = 1


def versions() -> dict:
    """The installed versions of the packages the numbers depend on."""
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def expert_unit(task: str, goals: int, seed: int) -> dict:
    """``goals`` noise-free expert episodes of ``task``: per episode success, return, length, first
    step of success (None when never) and goal."""
    from ..envs import ScriptedExpert, make_env

    tseed = task_seed(seed, task)
    env = make_env(task, (tseed + EXPERT_SEED_OFFSET) % (2**31))
    expert, rng = ScriptedExpert(task), np.random.default_rng(tseed + EXPERT_SEED_OFFSET)
    eps = [rollout(env, expert, rng, 0.0, 0.0) for _ in range(goals)]
    env.close()
    return {"success": [bool(ep["successes"].any()) for ep in eps],
            "first_success": [int(np.argmax(ep["successes"])) + 1 if ep["successes"].any() else None for ep in eps],
            "return": [float(ep["rewards"].sum(dtype=np.float64)) for ep in eps],
            "length": [int(len(ep["rewards"])) for ep in eps],
            "goal": [[round(float(x), 5) for x in ep["goal"]] for ep in eps]}


def curriculum_unit(task: str, episodes: int, seed: int) -> dict:
    """The generator's ``episodes`` curriculum episodes of ``task`` for ``seed``: per episode its
    epsilon, success and return."""
    data, eps_list, _ = curriculum_rollouts(task, episodes, seed)
    return {"epsilon": [float(e) for e in eps_list], "success": [bool(ep["successes"].any()) for ep in data],
            "return": [float(ep["rewards"].sum(dtype=np.float64)) for ep in data]}


def _work(kind: str, task: str, count: int, seed: int) -> dict:
    try:
        return (expert_unit if kind == "expert" else curriculum_unit)(task, count, seed)
    except Exception as exc:  # noqa: BLE001 - one line to the parent, which names the unit
        raise RuntimeError(f"{task} ({kind}): {type(exc).__name__}: {exc}") from None


def unit_settings(kind: str, count: int, seed: int, vers: dict) -> dict:
    """What a cached unit must match to be reused."""
    s = {"card_version": CARD_VERSION, "kind": kind, "count": count, "seed": seed, "versions": vers}
    if kind == "curriculum":
        s.update(generator_version=GENERATOR_VERSION, curriculum=CURRICULUM, sigma=SIGMA)
    return s


def _cache_path(cache: Path, task: str, settings: dict) -> Path:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return cache / f"{task}.{settings['kind']}.{key}.json"


def _read(path: Path) -> dict | None:
    try:
        rec = loads_json(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("settings"), dict) and "result" in rec else None


def _cached(cache: Path, task: str, settings: dict) -> dict | None:
    """A finished unit with these settings, or None. An expert unit of N goals is the first N
    episodes of one with more (the same env and RNG, one goal per reset), so a cached larger one
    serves, cut to N."""
    rec = _read(_cache_path(cache, task, settings))
    if rec is not None and rec["settings"] == settings:
        return rec["result"]
    if settings["kind"] != "expert":
        return None
    n = settings["count"]
    for path in sorted(cache.glob(f"{task}.expert.*.json")):
        rec = _read(path)
        if rec is not None and {**rec["settings"], "count": n} == settings and rec["settings"]["count"] >= n:
            return {k: v[:n] for k, v in rec["result"].items()}
    return None


def task_summary(expert: dict, curriculum: dict) -> dict:
    """One task's numbers from its two units."""
    n, k = len(expert["success"]), int(sum(expert["success"]))
    lo, hi = wilson(k, n)
    first = [f for f in expert["first_success"] if f is not None]
    ret = np.asarray(expert["return"])
    return {"goals": n, "successes": k, "success_rate": k / n, "ci95": [lo, hi],
            "mean_return": float(ret.mean()), "sd_return": float(ret.std(ddof=1)) if n > 1 else 0.0,
            "mean_length": float(np.mean(expert["length"])),
            "first_success_mean": float(np.mean(first)) if first else None,
            "first_success_max": int(max(first)) if first else None,
            "curriculum_episodes": len(curriculum["success"]),
            "curriculum_success_rate": float(np.mean(curriculum["success"])),
            "curriculum_by_decile": decile_success({"t": {"episode_success": curriculum["success"]}}),
            "expert": expert, "curriculum": curriculum}


def measure(tasks: list[str], goals: int, curriculum_episodes: int, seed: int = 0, workers: int | None = None,
            cache: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Every task's expert and curriculum units (cached ones reused); the card's numbers."""
    from tqdm import tqdm

    if goals < 1:
        raise ValueError(f"--goals must be at least 1, got {goals}")
    if curriculum_episodes < 1:
        raise ValueError(f"--curriculum-episodes must be at least 1, got {curriculum_episodes}")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if cache is None:
        cache = cache_dir() / "card"
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    vers = versions()
    units = [(kind, t, count) for kind, count in (("expert", goals), ("curriculum", curriculum_episodes))
             for t in tasks]
    results, todo = {}, []
    for kind, t, count in units:
        settings = unit_settings(kind, count, seed, vers)
        rec = _cached(cache, t, settings)
        if rec is None:
            todo.append((kind, t, count, _cache_path(cache, t, settings), settings))
        else:
            results[kind, t] = rec
    bar = tqdm(total=sum(u[2] for u in todo), disable=not progress, desc="episodes", unit="ep", dynamic_ncols=True)

    def done(kind, t, count, path, settings, res):
        write_atomic(path, json.dumps({"settings": settings, "task": t, "result": res}))
        results[kind, t] = res
        bar.update(count)

    workers = max(1, min(len(todo) or 1, workers or os.cpu_count() or 1))
    try:
        if workers == 1:
            for kind, t, count, path, settings in todo:
                done(kind, t, count, path, settings, _work(kind, t, count, seed))
        elif todo:
            import multiprocessing as mp

            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                futures = {pool.submit(_work, kind, t, count, seed): (kind, t, count, path, settings)
                           for kind, t, count, path, settings in todo}
                for fut in as_completed(futures):
                    done(*futures[fut], fut.result())
    finally:
        bar.close()
    per_task = {t: task_summary(results["expert", t], results["curriculum", t]) for t in tasks}
    k, n = sum(p["successes"] for p in per_task.values()), sum(p["goals"] for p in per_task.values())
    return {
        "card_version": CARD_VERSION, "tasks": list(tasks), "goals_per_task": goals,
        "curriculum_episodes_per_task": curriculum_episodes,
        "seed": seed, "versions": vers, "expert_goal_seed": f"task_seed(seed, task) + {EXPERT_SEED_OFFSET}",
        "curriculum": CURRICULUM, "sigma": SIGMA, "generator_version": GENERATOR_VERSION,
        "expert_success": {"successes": k, "episodes": n, "rate": k / n, "ci95": list(wilson(k, n)),
                           "mean_of_task_rates": float(np.mean([p["success_rate"] for p in per_task.values()]))},
        "curriculum_by_decile": decile_success({t: {"episode_success": p["curriculum"]["success"]}
                                                for t, p in per_task.items()}),
        "per_task": per_task,
    }


def training_set(root: str | os.PathLike, tasks: list[str]) -> dict:
    """The success of a generated training set (``generate``'s folder, its manifest.json): per task
    and pooled by decile of the episode index, over every episode of the card's ``tasks``."""
    from .formats import read_manifest

    root = Path(root)
    manifest = read_manifest(root)
    files = manifest.get("files", {})
    missing = [t for t in tasks if "episode_success" not in files.get(t, {})]
    if missing:
        raise DataError(f"{root / 'manifest.json'}: no episode_success for {missing[0]} (the card's tasks must "
                        "all be in the training set)")
    records = {t: {"episode_success": [bool(x) for x in files[t]["episode_success"]]} for t in tasks}
    return {"path": str(root), "settings": manifest.get("settings", {}),
            "episodes_per_task": sorted({len(r["episode_success"]) for r in records.values()}),
            "success_by_decile": decile_success(records),
            "success_rate": {t: float(np.mean(r["episode_success"])) for t, r in records.items()}}


def default_name(tasks_arg: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", tasks_arg.lower()).strip("-")[:40] or "tasks"
    return f"metaworld-v3-{slug}"


def is_card(path: Path) -> bool:
    """Whether ``path`` is a card JSON this command wrote (its command is a ``data card`` one)."""
    try:
        card = read_json(path)
    except (OSError, ValueError):
        return False
    return isinstance(card, dict) and str(card.get("command", "")).startswith("python -m harmodt.data card")


def add_parser(sub) -> None:
    c = sub.add_parser("card", help="measure the scripted experts and the curriculum per task; write "
                                    "a data card (md, json, png)")
    c.add_argument("--tasks", required=True, help="task names and sets (as for generate), e.g. MT50")
    c.add_argument("--goals", type=int, default=50, help="noise-free expert episodes per task, one "
                                                         "random goal each (default 50)")
    c.add_argument("--curriculum-episodes", type=int, default=100,
                   help="curriculum episodes per task, as `generate --episodes` makes them (default 100)")
    c.add_argument("--seed", type=int, default=0,
                   help="seed (the curriculum's episodes are those of `generate --seed`)")
    c.add_argument("--out", required=True, help="folder for NAME.md, NAME.json and NAME.png")
    c.add_argument("--name", default=None, help="file name stem (default metaworld-v3-<tasks>)")
    c.add_argument("--workers", type=int, default=None, help="parallel processes (default: one per core); the "
                                                             "numbers do not depend on it")
    c.add_argument("--cache", default=None, help="folder of finished units, for resuming (default $HARMODT_CACHE/card)")
    c.add_argument("--training-data", default=None, metavar="DIR",
                   help="a folder `generate` wrote (the training set): its own success per task "
                        "and by decile join the card")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("--overwrite", action="store_true", help="let NAME.* replace files of a run, data set or study")


def run(args) -> list[Path]:
    """The ``card`` command: measure, then write the JSON, the figure and the card."""
    from .card_report import write_figure, write_markdown

    tasks = parse_tasks(args.tasks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or default_name(args.tasks)
    for path in (out / f"{name}.json", out / f"{name}.png", out / f"{name}.md"):  # checked before the measuring
        check_output_file(path, "--out", overwrite=args.overwrite, own=lambda p: is_card(p.with_suffix(".json")))
    # checked before the episodes run
    training = None if args.training_data is None else training_set(args.training_data, tasks)
    card = measure(tasks, args.goals, args.curriculum_episodes, args.seed, args.workers, args.cache,
                   not args.no_progress)
    if training is not None:
        card["training_set"] = training
    card["command"] = " ".join(["python -m harmodt.data card", "--tasks", shlex.quote(args.tasks),
                                "--goals", str(args.goals),
                                "--curriculum-episodes", str(args.curriculum_episodes), "--seed", str(args.seed),
                                "--out", shlex.quote(args.out)]
                               + (["--name", shlex.quote(args.name)] if args.name else [])
                               + (["--training-data", shlex.quote(args.training_data)] if args.training_data else []))
    paths = [out / f"{name}.json", out / f"{name}.png", out / f"{name}.md"]
    write_atomic(paths[0], json.dumps(card, indent=1) + "\n")
    write_figure(card, paths[1])
    write_markdown(card, paths[2], paths[1].name, paths[0].name)
    return paths
