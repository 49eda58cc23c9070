"""Our data layout and what every layout shares: the schema, :class:`Trajectory` /
:class:`TaskData`, :class:`DataError`, episode checks, the quality selection and atomic writers.

Our layout (``DIR/manifest.json`` present): ``DIR/<task>.npz`` per task, episodes concatenated
with ``episode_starts``/``episode_lengths``; separate noise-free expert prompt episodes in the
same file (``prompt_*`` arrays); per-episode extras such as ``episode_epsilon`` and
``episode_goals`` (the goal position of each episode, also when the observation hides it); the
manifest holds every file's size and sha256. The manifest is written last, so a folder without
one (a generation that was killed) is refused as incomplete, never read.

Qualities (Appendix A.1): ``near-optimal`` keeps every episode; ``sub-optimal`` the first 50% of
each task's episodes (in generation / file order: the noisier half). ``episodes_per_task=E`` then
keeps E episodes evenly spaced over the kept ones, so the random-to-expert mix is preserved.

The other layouts (the original HarmoDT folders, Minari datasets) are read by
:mod:`harmodt.data.original` and :mod:`harmodt.data.minari`; :mod:`harmodt.data.load` tells the
layouts apart. Bad data raises :class:`DataError` with one line naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import files
from ..files import loads_json, write_atomic
from ..tasks import is_task

FORMAT_VERSION = 1
# Tasks whose data our generator version 1 wrote wrong (observations altered by the scripted
# policy; see generator.GENERATOR_VERSION): loading refuses them from such a folder.
V1_WRONG_TASKS = ("door-open-v3", "door-close-v3")
STATE_DIM = 39
ACT_DIM = 4
MANIFEST = "manifest.json"
QUALITIES = ("near-optimal", "sub-optimal")
# Arrays of one episode set in our task files (training: no prefix; prompts: "prompt_").
STEP_KEYS = ("observations", "actions", "rewards", "terminals", "truncations", "successes")
OFFSET_KEYS = ("episode_starts", "episode_lengths")
_DTYPES = {"observations": np.float32, "actions": np.float32, "rewards": np.float32,
           "terminals": np.bool_, "truncations": np.bool_, "successes": np.bool_}


def generator_version(manifest: dict) -> int:
    """The generator version that wrote a data folder (1 when its manifest does not say)."""
    return manifest.get("settings", {}).get("generator_version", 1)


class DataError(ValueError):
    """A data file or folder that cannot be used; the message names it and the problem."""


@dataclass
class Trajectory:
    observations: np.ndarray  # (T, 39) float32
    actions: np.ndarray  # (T, 4) float32
    rewards: np.ndarray  # (T,) float32
    dones: np.ndarray  # (T,) bool: episode ended at this step (terminal or truncated)
    successes: np.ndarray | None = None  # (T,) bool, when the data has it
    terminals: np.ndarray | None = None  # (T,) bool, when the data tells terminal from truncated
    truncations: np.ndarray | None = None  # (T,) bool, likewise


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


# ---- atomic writes ---------------------------------------------------------------------------
def temp_name(path: Path) -> Path:
    """The hidden temporary name ``path`` is written under before it is renamed into place (the writer's
    own: :func:`harmodt.files.temp_name` of ``.NAME``)."""
    return files.temp_name(path.with_name(f".{path.name}"))


def is_temp_name(name: str) -> bool:
    """A name made by :func:`temp_name` (a leftover of a killed writer when it stays)."""
    return re.fullmatch(r"\..+\.tmp-\d+(-[0-9a-f]+)?", name) is not None


def atomic_savez(path: Path, arrays: dict) -> None:
    """Write a compressed npz atomically (harmodt.files.write_atomic, under :func:`temp_name`): a
    reader sees either no file or the whole file, even after SIGKILL."""
    write_atomic(path, lambda fh: np.savez_compressed(fh, **arrays), tmp=temp_name(path))


def atomic_json(path: Path, obj) -> None:
    """Write JSON the way :func:`atomic_savez` writes arrays."""
    write_atomic(path, json.dumps(obj, indent=2), tmp=temp_name(path))


# ---- writing ours ----------------------------------------------------------------------------
def pack_episodes(episodes: list[dict], prefix: str = "") -> dict:
    """Concatenate episodes (dicts of the :data:`STEP_KEYS` arrays) into one task file's arrays."""
    lengths = np.array([len(ep["rewards"]) for ep in episodes], dtype=np.int64)
    out = {prefix + k: np.concatenate([np.asarray(ep[k], dtype=_DTYPES[k]) for ep in episodes]) for k in STEP_KEYS}
    out[prefix + "episode_lengths"] = lengths
    out[prefix + "episode_starts"] = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return out


def save_task_file(path: Path, episodes: list[dict], prompts: list[dict], extra: dict | None = None) -> dict:
    """Write one task's file of our layout atomically; returns its manifest entry (file, size,
    sha256, counts). ``extra`` holds further per-episode arrays (e.g. ``episode_epsilon``)."""
    arrays = pack_episodes(episodes)
    arrays.update(pack_episodes(prompts, "prompt_"))
    arrays.update(extra or {})
    atomic_savez(path, arrays)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256(path), "episodes": len(episodes),
            "steps": int(arrays["rewards"].shape[0]), "prompt_episodes": len(prompts)}


# ---- checks shared by the layouts ------------------------------------------------------------
def load_npz(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: unreadable or truncated npz file ({type(exc).__name__}: {exc})") from None


def check_episode(path, obs, act, rew, done, label: str = "") -> None:
    """Shapes ([T, 39], [T, 4], [T], [T]), at least one step and finite values, or a DataError."""
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


def select_episodes(trajs: list, quality: str, episodes: int | None) -> list:
    """The episodes a quality keeps (all, or the first half), then ``episodes`` evenly spaced."""
    if quality == "sub-optimal":
        trajs = trajs[: max(1, len(trajs) // 2)]
    elif quality != "near-optimal":
        raise DataError(f"quality must be near-optimal or sub-optimal, got {quality!r}")
    if episodes and episodes < len(trajs):
        idx = np.unique(np.linspace(0, len(trajs) - 1, episodes).round().astype(int))
        trajs = [trajs[i] for i in idx]
    return trajs


# ---- ours -----------------------------------------------------------------------------------
def _check_dtypes(path: Path, arrs: dict, prefix: str) -> None:
    for k, want in _DTYPES.items():
        arr = arrs[prefix + k]
        if arr.dtype != want:
            raise DataError(f"{path}: {prefix + k} must be {np.dtype(want).name}, got {arr.dtype}")
    for k in OFFSET_KEYS:
        arr = arrs[prefix + k]
        if arr.dtype.kind not in "iu" or arr.ndim != 1:
            raise DataError(f"{path}: {prefix + k} must be a 1-d integer array, got {arr.dtype} {list(arr.shape)}")


def _offsets(path: Path, arrs: dict, prefix: str, label: str) -> tuple[list[int], list[int]]:
    starts, lengths = arrs[prefix + "episode_starts"], arrs[prefix + "episode_lengths"]
    if starts.shape != lengths.shape:
        raise DataError(f"{path}: {prefix}episode_starts has {len(starts)} entries, "
                        f"{prefix}episode_lengths {len(lengths)}")
    if len(starts) == 0:
        raise DataError(f"{path}: no {label}episodes (empty task)")
    steps = arrs[prefix + "rewards"].shape[0] if arrs[prefix + "rewards"].ndim else 0
    starts, lengths = starts.tolist(), lengths.tolist()  # Python integers: a sum never wraps around
    if any(n <= 0 or s < 0 or s + n > steps for s, n in zip(starts, lengths)):
        raise DataError(f"{path}: {prefix}episode offsets do not fit the {steps} stored steps")
    return starts, lengths


def _split(arrs: dict, prefix: str, path: Path) -> list[Trajectory]:
    label = "prompt " if prefix else "training "
    for k in STEP_KEYS + OFFSET_KEYS:
        if prefix + k not in arrs:
            raise DataError(f"{path}: missing key {prefix + k!r}")
    _check_dtypes(path, arrs, prefix)
    starts, lengths = _offsets(path, arrs, prefix, label)
    obs, act, rew = arrs[prefix + "observations"], arrs[prefix + "actions"], arrs[prefix + "rewards"]
    term, trunc, succ = arrs[prefix + "terminals"], arrs[prefix + "truncations"], arrs[prefix + "successes"]
    for name, flags in (("terminals", term), ("truncations", trunc), ("successes", succ)):
        if flags.shape != rew.shape:
            raise DataError(f"{path}: {prefix + name} must be [{rew.shape[0] if rew.ndim else 'T'}] like the rewards, "
                            f"got {list(flags.shape)}")
    check_episode(path, obs, act, rew, term | trunc, f" ({label}data)")
    return [Trajectory(obs[s : s + n], act[s : s + n], rew[s : s + n], term[s : s + n] | trunc[s : s + n],
                       succ[s : s + n], term[s : s + n], trunc[s : s + n])
            for s, n in zip(starts, lengths)]


def read_manifest(root: Path) -> dict:
    """Our layout's manifest, checked for its format version and Meta-World v3 task names."""
    mpath = root / MANIFEST
    try:
        manifest = loads_json(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{mpath}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise DataError(f"{mpath}: not a data manifest (expected an object with 'files')")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{mpath}: format_version {manifest.get('format_version')} is not {FORMAT_VERSION}")
    unknown = [t for t in manifest.get("files", {}) if not is_task(t)]
    if unknown:
        raise DataError(f"{mpath}: unknown task {unknown[0]!r} (not a Meta-World v3 task name)")
    for task, entry in manifest.get("files", {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise DataError(f"{mpath}: the entry of {task} must be an object whose 'file' names its "
                            f"task file, got {entry!r:.80}")
        if entry["file"] != task_file_name(task):
            raise DataError(f"{mpath}: the entry of {task} names the file {entry['file']!r:.80}; a task's data are in "
                            f"its own file of this folder, {task_file_name(task)}")
    return manifest


def task_file_name(task: str) -> str:
    """The file of ``task`` in a folder of our layout."""
    return f"{task}.npz"


def _check_file(path: Path, entry: dict, mpath: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file not found (listed in {mpath})")
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        raise DataError(f"{path}: {size} bytes, {mpath} lists {entry['bytes']} (truncated or modified file)")
    if sha256(path) != entry.get("sha256"):
        raise DataError(f"{path}: checksum does not match {mpath} (corrupted or modified file)")


def load_ours(root: Path, tasks: list[str] | None = None, quality: str = "near-optimal",
              episodes: int | None = None) -> dict[str, TaskData]:
    """Our layout's ``tasks`` (None: all in the manifest), every file checked against it."""
    mpath = root / MANIFEST
    manifest = read_manifest(root)
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
        _check_file(path, files[task], mpath)
        arrs = load_npz(path)
        out[task] = TaskData(task, select_episodes(_split(arrs, "", path), quality, episodes),
                             _split(arrs, "prompt_", path))
    return out


def unfinished_generation(root: Path) -> list[str]:
    """Names in ``root`` that only a generation run writes (task files, per-task records,
    temporary files); with no manifest beside them the run did not finish."""
    names = []
    for p in root.iterdir():
        if p.suffix == ".npz" and is_task(p.stem):
            names.append(p.name)
        elif re.fullmatch(r"\.(.+)\.record\.json", p.name) or is_temp_name(p.name):
            names.append(p.name)
    return sorted(names)
