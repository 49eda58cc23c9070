"""The original HarmoDT layout (the authors' MT50 folders): ``DIR/<task-name>/<i>.npz``, one
episode per file with ``observations``, ``actions``, ``rewards`` and ``dones`` or ``terminals``;
as in the official loader, the last 2 files of each task (in numeric order of ``i``) are its
prompt episodes. ``-v2`` task names map to the v3 environments."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..tasks import canonical_name, is_task
from .formats import DataError, TaskData, Trajectory, check_episode, load_npz, select_episodes


def _episode_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.suffix == ".npz" and re.fullmatch(r"\d+", p.stem)]
    return sorted(files, key=lambda p: int(p.stem))


def _load_original_episode(path: Path) -> Trajectory:
    arrs = load_npz(path)
    for k in ("observations", "actions", "rewards"):
        if k not in arrs:
            raise DataError(f"{path}: missing key {k!r}")
    if "dones" in arrs:
        done = arrs["dones"]
    elif "terminals" in arrs:
        done = arrs["terminals"]
    else:
        raise DataError(f"{path}: missing key 'dones' (or 'terminals')")
    try:
        obs = np.asarray(arrs["observations"], dtype=np.float32)
        act = np.asarray(arrs["actions"], dtype=np.float32)
        rew = np.asarray(arrs["rewards"], dtype=np.float32)
        done = np.asarray(done).astype(bool)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: non-numeric data ({exc})") from None
    # some dumps store rewards / dones as [T, 1] columns
    rew = rew.reshape(-1) if rew.ndim == 2 and rew.shape[1] == 1 else rew
    done = done.reshape(-1) if done.ndim == 2 and done.shape[1] == 1 else done
    check_episode(path, obs, act, rew, done)
    succ = np.asarray(arrs["successes"], dtype=bool).reshape(-1) if "successes" in arrs else None
    return Trajectory(obs, act, rew, done, succ)


def load_original(root: Path, tasks: list[str] | None, quality: str, episodes: int | None) -> dict[str, TaskData]:
    folders = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        name = canonical_name(d.name)
        if is_task(name):
            folders[name] = d
        elif _episode_files(d):
            raise DataError(f"{d}: holds episode files but {d.name!r} is not a Meta-World v3 task name")
    wanted = tasks or list(folders)
    if not wanted:
        raise DataError(f"{root}: no task folders (expected {root}/<task-name>/<i>.npz, a "
                        "manifest.json or Minari datasets)")
    out = {}
    for task in wanted:
        if task not in folders:
            raise DataError(f"{root}: no folder for task {task!r} (looked for {task} and {task[:-3]}-v2)")
        files = _episode_files(folders[task])
        if len(files) < 3:
            raise DataError(f"{folders[task]}: {len(files)} episode files; need at least 3 (the last 2 are prompts)")
        trajs = [_load_original_episode(p) for p in files]
        out[task] = TaskData(task, select_episodes(trajs[:-2], quality, episodes), trajs[-2:])
    return out
