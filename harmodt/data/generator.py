"""Offline Meta-World v3 data from the shipped scripted experts, from random to expert.

The paper's data are SAC replay buffers: episodes from a random policy up to a converged expert.
We mimic that with a per-episode curriculum over each task's E episodes. Episode ``e`` has
progress ``u = e / (E - 1)`` and, at every step, takes a uniformly random action in [-1, 1]^4 with
probability

    eps(u) = clip(1 - u / 0.8, 0, 1)

and otherwise the scripted expert's action plus Gaussian noise N(0, 0.1^2) (clipped to [-1, 1]);
the last 20% of the episodes (eps = 0) are the noise-free expert. So the first episodes are
almost uniformly random, the middle ones a mix of random and noisy expert behaviour, and the
tail is expert (like the converged end of a SAC replay buffer). Gaussian noise alone cannot give random-level behaviour
(the experts correct themselves every step; at sigma = 3 MT10 still succeeds 60% of the time), hence
the random-action mixing. Goals are random per episode (MT50-rand, see ``harmodt.envs``); a goal
variation (``pick-place-v3@g7``) keeps its one ML1 goal in every episode, hidden from the
observation, and its expert is the base task's, told the goal. Each episode's goal position is
stored beside it (``episode_goals``, ``prompt_episode_goals``).

Each task also gets ``prompt_episodes`` separate noise-free expert episodes, kept as prompt
trajectories. Every step stores observation, action, reward, terminal/truncated flags and
success. A run is deterministic for a seed (each task has its own RNG stream, so the result does
not depend on the number of workers) and parallel across tasks.

Crash safety (SIGKILL at any moment): a run first removes the folder's ``manifest.json`` and any
temporary files a killed run left; each task's file goes to a temporary name, is flushed to disk
and renamed when complete, then its per-task record (settings, size, sha256) is written the
same way; ``manifest.json`` (settings, counts, success rates, sizes, sha256 checksums) is
written last. So a folder whose run was killed has no manifest and loading refuses it as
incomplete; running the same command again reuses every task whose file matches its record and
generates the rest. A folder holding a data set of other settings or other tasks is refused
unless ``overwrite`` (``--overwrite``), which removes the old tasks' files that the new set does
not rewrite.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ..files import loads_json
from ..envs import EPISODE_LEN, ScriptedExpert, make_env
from ..domains import SEED_MAX
from ..tasks import is_task, task_seed
from .formats import (FORMAT_VERSION, MANIFEST, DataError, atomic_json, is_temp_name, save_task_file, sha256,
                      task_file_name)

# 2: observations stored exactly as the env returned them. Version 1 stored door-open-v3's and
# door-close-v3's observations after their scripted policies had written into them (the door
# handle's position moved by their target offsets, -5 cm in x for door-open) at every step the
# expert acted, so those two tasks' data did not match what an env shows a policy.
GENERATOR_VERSION = 2  # (formats.V1_WRONG_TASKS: the tasks whose version-1 data loading refuses)
SIGMA = 0.1  # Gaussian noise on expert actions
EXPERT_FRACTION = 0.2  # the last 20% of episodes have eps = 0
CURRICULUM = ("eps(u) = clip(1 - u / 0.8, 0, 1), u = episode / (E - 1); otherwise expert + N(0, 0.1^2) while eps > 0, "
              "noise-free expert once eps = 0")


def epsilon(e: int, n: int) -> float:
    """Probability of a uniformly random action in episode ``e`` of ``n``."""
    u = e / max(n - 1, 1)
    return float(np.clip(1.0 - u / (1.0 - EXPERT_FRACTION), 0.0, 1.0))


def rollout(env, expert, rng: np.random.Generator, eps: float, sigma: float) -> dict:
    """One episode (until truncation at 500 steps or termination): the ``formats.STEP_KEYS`` arrays
    and ``goal``, the episode's goal position (3,)."""
    coin = rng.random(EPISODE_LEN) < eps
    uniform = rng.uniform(-1.0, 1.0, size=(EPISODE_LEN, 4))
    noise = rng.normal(0.0, sigma, size=(EPISODE_LEN, 4)) if sigma > 0 else np.zeros((EPISODE_LEN, 4))
    obs, _ = env.reset()
    goal = np.array(env.unwrapped._get_pos_goal(), dtype=np.float32)  # also when obs hides it
    o, a, r, term, trunc, succ = [], [], [], [], [], []
    for t in range(EPISODE_LEN):
        o.append(obs.astype(np.float32))  # stored before anything else reads it
        act = uniform[t] if coin[t] else np.clip(expert(obs) + noise[t], -1.0, 1.0)
        act = act.astype(np.float32)
        a.append(act)
        obs, rew, terminated, truncated, info = env.step(act)
        r.append(rew)
        term.append(bool(terminated))
        trunc.append(bool(truncated))
        succ.append(bool(info.get("success", 0.0)))
        if terminated or truncated:
            break
    return {"observations": np.stack(o), "actions": np.stack(a), "rewards": np.asarray(r, dtype=np.float32),
            "terminals": np.asarray(term), "truncations": np.asarray(trunc), "successes": np.asarray(succ),
            "goal": goal}


def curriculum_rollouts(task: str, episodes: int, seed: int, queue=None) -> tuple[list, list, np.random.Generator]:
    """A task's ``episodes`` curriculum episodes (:func:`rollout` dicts) as ``generate`` makes them
    for ``seed``, their epsilons, and the task's RNG after them (it goes on to draw the prompts).
    ``queue``: ``put(1)`` after each episode."""
    tseed = task_seed(seed, task)
    rng = np.random.default_rng(tseed)
    env = make_env(task, tseed % (2**31))
    expert = ScriptedExpert(task)
    eps_list = [epsilon(e, episodes) for e in range(episodes)]
    data = []
    for e in range(episodes):
        data.append(rollout(env, expert, rng, eps_list[e], SIGMA if eps_list[e] > 0 else 0.0))
        if queue is not None:
            queue.put(1)
    env.close()
    return data, eps_list, rng


def generate_task(task: str, episodes: int, out: str, seed: int, prompt_episodes: int, settings: dict,
                  queue=None) -> dict:
    """Generate and write one task's file; returns its manifest record."""
    out = Path(out)
    tseed = task_seed(seed, task)
    data, eps_list, rng = curriculum_rollouts(task, episodes, seed, queue)
    expert = ScriptedExpert(task)
    penv = make_env(task, (tseed + 1_000_003) % (2**31))
    prompts = [rollout(penv, expert, rng, 0.0, 0.0) for _ in range(prompt_episodes)]
    record = save_task_file(out / f"{task}.npz", data, prompts, {
        "episode_epsilon": np.asarray(eps_list, dtype=np.float32),
        "episode_goals": np.stack([ep["goal"] for ep in data]),  # (E, 3)
        "prompt_episode_goals": np.stack([p["goal"] for p in prompts])})  # (P, 3)
    success = [bool(ep["successes"].any()) for ep in data]
    record.update({
        "success_rate": float(np.mean(success)), "episode_success": success,
        "prompt_success": [bool(p["successes"].any()) for p in prompts],
        "mean_return": float(np.mean([ep["rewards"].sum() for ep in data])), "settings": settings,
    })
    atomic_json(out / f".{task}.record.json", record)
    return record


def _reusable(out: Path, task: str, settings: dict) -> dict | None:
    rpath = out / f".{task}.record.json"
    try:
        rec = loads_json(rpath.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("file") != task_file_name(task):
        return None
    path = out / rec["file"]
    if (rec.get("settings") != settings or not path.is_file()
            or path.stat().st_size != rec.get("bytes", path.stat().st_size)):
        return None
    return rec if sha256(path) == rec.get("sha256") else None


def _start_run(out: Path, tasks: list[str]) -> None:
    """Mark the folder incomplete (no manifest) and remove temporary files of killed runs and the
    files of tasks not in ``tasks`` (those of an earlier data set, which would be orphans)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for task, names in _task_files(out).items():
        if task not in tasks:
            for name in names:
                (out / name).unlink(missing_ok=True)
    for p in out.iterdir():
        if is_temp_name(p.name) and p.is_file():
            p.unlink(missing_ok=True)


def _task_files(out: Path) -> dict[str, list[str]]:
    """{task: names of its files in ``out``}: its data file and its per-task record."""
    found: dict[str, list[str]] = {}
    for p in out.iterdir() if out.is_dir() else ():
        task = (p.stem if p.suffix == ".npz" and is_task(p.stem)
                else p.name[1:-len(".record.json")] if p.name.endswith(".record.json") else None)
        if task and p.is_file():
            found.setdefault(task, []).append(p.name)
    return found


def other_dataset(out: Path, tasks: list[str], settings: dict) -> str | None:
    """How the data set already in ``out`` differs from the one of ``tasks`` and ``settings`` (its
    manifest's, or for an unfinished run its per-task records'), or None when there is none or it
    is this one (a rerun, which reuses every finished task)."""
    try:
        manifest = loads_json((out / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    if isinstance(manifest, dict):
        old, old_tasks = manifest.get("settings"), manifest.get("tasks", list(manifest.get("files", {})))
    else:  # an unfinished run: its per-task records say its settings (a file without one counts by its task alone)
        found = _task_files(out)
        if not found:
            return None
        kinds = []
        for task in found:
            try:
                kinds.append(loads_json((out / f".{task}.record.json").read_text())["settings"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
        old_tasks = sorted(found)
        old = settings if not kinds else kinds[0] if all(k == kinds[0] for k in kinds) else "mixed"
    diff = []
    if isinstance(old, dict) and isinstance(settings, dict):
        diff = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
    elif old != settings:
        diff = ["its per-task records disagree" if old == "mixed" else f"settings {old!r}"]
    if [t for t in old_tasks if t not in tasks]:
        diff.append(f"tasks {','.join(old_tasks)} -> {','.join(tasks)}")
    return "; ".join(diff) or None


def _quiet_interrupt() -> None:
    """A worker process's Ctrl-C: it ends without a traceback (the main process prints the one line)."""
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))


def decile_success(records: dict) -> list[float]:
    """Success rate of episodes by decile of their index within each task, pooled over tasks."""
    buckets = [[] for _ in range(10)]
    for rec in records.values():
        s = rec["episode_success"]
        for i, ok in enumerate(s):
            buckets[min(9, i * 10 // len(s))].append(ok)
    return [float(np.mean(b)) if b else float("nan") for b in buckets]


def generate(tasks: list[str], episodes: int, out: str, seed: int = 0, workers: int | None = None,
             prompt_episodes: int = 2, progress: bool = True, overwrite: bool = False) -> dict:
    """Generate ``episodes`` curriculum episodes (+ prompts) for every task into ``out``. A folder
    holding a data set of other settings or tasks is refused (DataError) unless ``overwrite``, which
    replaces it whole (no file of the old one stays)."""
    if episodes < 1:
        raise ValueError(f"--episodes must be at least 1, got {episodes}")
    if prompt_episodes < 1:
        raise ValueError(f"--prompt-episodes must be at least 1, got {prompt_episodes}")
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"--seed must be in [0, {SEED_MAX}], got {seed}")
    outp = Path(out)
    settings = {"episodes": episodes, "seed": seed, "prompt_episodes": prompt_episodes, "curriculum": CURRICULUM,
                "sigma": SIGMA, "format_version": FORMAT_VERSION, "generator_version": GENERATOR_VERSION}
    if not overwrite and (diff := other_dataset(outp, tasks, settings)) is not None:
        raise DataError(f"{out}: holds a data set made with other settings ({diff}); pass --overwrite to replace it, "
                        f"or choose another --out")
    _start_run(outp, tasks)
    t0 = time.time()
    records = {t: r for t in tasks if (r := _reusable(outp, t, settings)) is not None}
    todo = [t for t in tasks if t not in records]
    workers = max(1, min(len(todo) or 1, workers or os.cpu_count() or 1))
    from tqdm import tqdm

    bar = tqdm(total=len(todo) * episodes, disable=not progress, desc="episodes", unit="ep", dynamic_ncols=True)
    if todo and workers == 1:

        class _Tick:
            def put(self, n):
                bar.update(n)

        for t in todo:
            records[t] = generate_task(t, episodes, out, seed, prompt_episodes, settings, _Tick())
    elif todo:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager:
            queue = manager.Queue()
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_quiet_interrupt) as pool:
                futures = {t: pool.submit(generate_task, t, episodes, out, seed, prompt_episodes, settings, queue)
                           for t in todo}
                pending = set(futures)
                while pending:
                    while not queue.empty():
                        bar.update(queue.get())
                    for t in [t for t in pending if futures[t].done()]:
                        records[t] = futures[t].result()
                        pending.discard(t)
                    time.sleep(0.05)
                while not queue.empty():
                    bar.update(queue.get())
    bar.close()
    records = {t: records[t] for t in tasks}
    manifest = {
        "format_version": FORMAT_VERSION, "generator": "harmodt.data.generate", "settings": settings,
        "tasks": tasks, "files": {t: {k: v for k, v in r.items() if k != "settings"} for t, r in records.items()},
        "curriculum_success_by_decile": decile_success(records), "seconds": round(time.time() - t0, 1),
        "content_sha256": hashlib.sha256("".join(f"{t}:{records[t]['sha256']}\n" for t in tasks).encode()).hexdigest(),
    }
    atomic_json(outp / MANIFEST, manifest)
    return manifest
