"""Reading offline data: our generated layout and the original HarmoDT dataset layout.

* **ours** (``DIR/manifest.json`` present): ``DIR/<task>.npz`` per task, episodes concatenated
  with ``episode_starts``/``episode_lengths``; separate noise-free expert prompt episodes in the
  same file (``prompt_*`` arrays); the manifest holds every file's sha256.
* **original** (the authors' MT50 folders): ``DIR/<task-name>/<i>.npz``, one episode per file
  with ``observations``, ``actions``, ``rewards`` and ``dones`` or ``terminals``; as in the
  official loader, the last 2 files of each task (in numeric order of ``i``) are its prompt
  episodes. ``-v2`` task names map to the v3 environments.

Qualities (Appendix A.1): ``near-optimal`` keeps every episode; ``sub-optimal`` the first 50% of
each task's episodes (in generation / file order: the noisier half). ``episodes_per_task=E`` then
keeps E episodes evenly spaced over the kept ones, so the random-to-expert mix is preserved.

Bad data raises :class:`DataError` with one line naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..tasks import MT50, canonical_name

FORMAT_VERSION = 1
# Tasks whose data our generator version 1 wrote wrong (observations altered by the scripted
# policy; see generate.GENERATOR_VERSION): loading refuses them from such a folder.
V1_WRONG_TASKS = ("door-open-v3", "door-close-v3")


def generator_version(manifest: dict) -> int:
    """The generator version that wrote a data folder (1 when its manifest does not say)."""
    return manifest.get("settings", {}).get("generator_version", 1)
STATE_DIM = 39
ACT_DIM = 4


class DataError(ValueError):
    """A data file or folder that cannot be used; the message names it and the problem."""


@dataclass
class Trajectory:
    observations: np.ndarray  # (T, 39) float32
    actions: np.ndarray  # (T, 4) float32
    rewards: np.ndarray  # (T,) float32
    dones: np.ndarray  # (T,) bool: episode ended at this step (terminal or truncated)
    successes: np.ndarray | None = None  # (T,) bool, when the data has it


@dataclass
class TaskData:
    name: str  # v3 task name
    trajectories: list[Trajectory]  # training episodes, in generation / file order
    prompts: list[Trajectory]  # expert prompt episodes


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_npz(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: unreadable or truncated npz file ({type(exc).__name__}: {exc})") from None


def _check_episode(path: Path, obs, act, rew, done, label: str = "") -> None:
    where = f"{path}{label}"
    if obs.ndim != 2 or obs.shape[1] != STATE_DIM:
        raise DataError(f"{where}: observations must be [T, {STATE_DIM}], got {list(obs.shape)}")
    if act.ndim != 2 or act.shape[1] != ACT_DIM:
        raise DataError(f"{where}: actions must be [T, {ACT_DIM}], got {list(act.shape)}")
    t = obs.shape[0]
    if t == 0:
        raise DataError(f"{where}: empty episode (0 steps)")
    for name, arr in (("rewards", rew), ("dones", done)):
        if arr.ndim != 1:
            raise DataError(f"{where}: {name} must be [T], got {list(arr.shape)}")
    for name, arr in (("actions", act), ("rewards", rew), ("dones", done)):
        if arr.shape[0] != t:
            raise DataError(f"{where}: {name} has {arr.shape[0]} steps, observations have {t}")
    for name, arr in (("observations", obs), ("actions", act), ("rewards", rew)):
        if not np.isfinite(arr).all():
            raise DataError(f"{where}: {name} contain NaN or inf")


def _select(trajs: list, quality: str, episodes: int | None) -> list:
    if quality == "sub-optimal":
        trajs = trajs[: max(1, len(trajs) // 2)]
    elif quality != "near-optimal":
        raise DataError(f"quality must be near-optimal or sub-optimal, got {quality!r}")
    if episodes and episodes < len(trajs):
        idx = np.unique(np.linspace(0, len(trajs) - 1, episodes).round().astype(int))
        trajs = [trajs[i] for i in idx]
    return trajs


# ---- ours -----------------------------------------------------------------------------------
def _split(arrs: dict, prefix: str, path: Path) -> list[Trajectory]:
    need = ["observations", "actions", "rewards", "terminals", "truncations", "successes", "episode_starts", "episode_lengths"]
    for k in need:
        if prefix + k not in arrs:
            raise DataError(f"{path}: missing key {prefix + k!r}")
    obs, act, rew = arrs[prefix + "observations"], arrs[prefix + "actions"], arrs[prefix + "rewards"]
    done = arrs[prefix + "terminals"] | arrs[prefix + "truncations"]
    _check_episode(path, obs, act, rew, done, f" ({prefix or 'training '}data)")
    starts, lengths = arrs[prefix + "episode_starts"], arrs[prefix + "episode_lengths"]
    if len(starts) == 0:
        raise DataError(f"{path}: no {prefix or 'training '}episodes")
    if (starts + lengths).max() > obs.shape[0] or (lengths <= 0).any():
        raise DataError(f"{path}: episode offsets do not fit the {obs.shape[0]} stored steps")
    succ = arrs[prefix + "successes"]
    return [Trajectory(obs[s : s + n], act[s : s + n], rew[s : s + n], done[s : s + n], succ[s : s + n])
            for s, n in zip(starts.tolist(), lengths.tolist())]


def _load_ours(root: Path, tasks: list[str] | None, quality: str, episodes: int | None) -> dict[str, TaskData]:
    mpath = root / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{mpath}: unreadable manifest ({exc})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{mpath}: format_version {manifest.get('format_version')} is not {FORMAT_VERSION}")
    files = manifest.get("files", {})
    wanted = tasks or list(files)
    written_by = generator_version(manifest)
    out = {}
    for task in wanted:
        if task not in files:
            raise DataError(f"{root}: task {task!r} is not in this data set (it has {', '.join(files) or 'no tasks'})")
        if written_by < 2 and task in V1_WRONG_TASKS:
            raise DataError(f"{root / files[task]['file']}: written by generator version {written_by}, whose {task} "
                            "observations were altered by the scripted policy (the door handle moved by its target "
                            "offset); generate this task again with `python -m harmodt.data generate`")
        path = root / files[task]["file"]
        if not path.exists():
            raise DataError(f"{path}: file not found (listed in {mpath})")
        if sha256(path) != files[task]["sha256"]:
            raise DataError(f"{path}: checksum does not match {mpath} (corrupted or modified file)")
        arrs = _load_npz(path)
        out[task] = TaskData(task, _select(_split(arrs, "", path), quality, episodes), _split(arrs, "prompt_", path))
    return out


# ---- original layout ------------------------------------------------------------------------
def _episode_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.suffix == ".npz" and re.fullmatch(r"\d+", p.stem)]
    return sorted(files, key=lambda p: int(p.stem))


def _load_original_episode(path: Path) -> Trajectory:
    arrs = _load_npz(path)
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
    _check_episode(path, obs, act, rew, done)
    succ = np.asarray(arrs["successes"], dtype=bool).reshape(-1) if "successes" in arrs else None
    return Trajectory(obs, act, rew, done, succ)


def _load_original(root: Path, tasks: list[str] | None, quality: str, episodes: int | None) -> dict[str, TaskData]:
    folders = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        name = canonical_name(d.name)
        if name in MT50:
            folders[name] = d
    wanted = tasks or list(folders)
    if not wanted:
        raise DataError(f"{root}: no task folders (expected {root}/<task-name>/<i>.npz or a manifest.json)")
    out = {}
    for task in wanted:
        if task not in folders:
            raise DataError(f"{root}: no folder for task {task!r} (looked for {task} and {task[:-3]}-v2)")
        files = _episode_files(folders[task])
        if len(files) < 3:
            raise DataError(f"{folders[task]}: {len(files)} episode files; need at least 3 (the last 2 are prompts)")
        trajs = [_load_original_episode(p) for p in files]
        out[task] = TaskData(task, _select(trajs[:-2], quality, episodes), trajs[-2:])
    return out


def detect_layout(path: str | Path) -> str:
    """'ours' (manifest.json) or 'original' (task folders of numbered npz files)."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"{root}: data folder does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: is not a folder")
    if (root / "manifest.json").exists():
        return "ours"
    return "original"


def load_dataset(path: str | Path, tasks: list[str] | None = None, quality: str = "near-optimal",
                 episodes_per_task: int | None = None) -> dict[str, TaskData]:
    """Load ``tasks`` (v3 names; None = all in the folder) from either layout."""
    root = Path(path)
    layout = detect_layout(root)
    tasks = None if tasks is None else [canonical_name(t) for t in tasks]
    loader = _load_ours if layout == "ours" else _load_original
    return loader(root, tasks, quality, episodes_per_task)
