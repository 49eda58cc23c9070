"""Minari datasets (the Farama standard for offline RL data): export of our layout, and reading
Minari datasets as a third layout for training.

Export (``python -m harmodt.data export DIR --minari OUT``) writes one Minari dataset per task
under the Minari root ``OUT``, with id ``metaworld/<task>/harmodt-<quality>-v0`` (quality from
the manifest's ``quality`` key, ``near-optimal`` when it has none). Each dataset holds the
task's training episodes in generation order, then its prompt episodes. Minari stores one
observation more than actions per episode (the one after the last step); our files do not keep
it, so the export repeats the last stored observation there and the import drops it. Each
step's ``success`` goes to the episode's ``infos["success"]`` (one entry per observation: False
at the reset, then each step's flag). The env spec is that of
``harmodt.envs.make_env(task, seed)`` with the seed that generated the training episodes, so
``MinariDataset.recover_environment()`` rebuilds the very env (random goal per episode) when
harmodt is installed; the dataset metadata's ``harmodt`` entry holds the task name, the
generation settings, the curriculum and its per-episode epsilon and success, and the number of
prompt episodes at the end of the dataset. The export is written under a hidden temporary root
inside ``OUT`` and each finished dataset is renamed into place, so a killed export leaves no
dataset that later loads.

Reading (``--data``): a Minari root folder (datasets found at any depth as
``<id>/data/metadata.json``), one dataset folder, or a comma list of dataset ids under the local
Minari root (``MINARI_DATASETS_PATH``, else ``~/.minari/datasets``). Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np

from ..envs import EPISODE_LEN
from ..files import OutputError, loads_json, move_atomic
from ..ownership import check_data_folder
from ..tasks import ML1_SEED, canonical_name, goal_of, is_task, task_seed, task_sort_key
from .formats import (ACT_DIM, MANIFEST, QUALITIES, STATE_DIM, DataError, TaskData, Trajectory, check_episode,
                      load_ours, read_manifest, select_episodes)

NAMESPACE = "metaworld"
ORIGINAL_PROMPTS = 2  # prompt episodes at the end of a dataset without harmodt metadata
_ID_RE = re.compile(r"^(?:(?P<namespace>[-_\w][-_\w/]*[-_\w]+)/)?(?P<name>[-_\w]+?)(?:-v(?P<version>\d+))?$")
_MAX_DEPTH = 6  # how deep below a root datasets are looked for


def dataset_id(task: str, quality: str) -> str:
    """The Minari id our export gives a task's dataset; a goal variation's (``pick-place-v3@g7``,
    whose '@' a Minari id cannot hold) is ``metaworld/pick-place-v3/harmodt-g7-<quality>-v0``."""
    base, at, goal = task.partition("@")
    return f"{NAMESPACE}/{base}/harmodt-{goal + '-' if at else ''}{quality}-v0"


def minari_root() -> Path:
    """The local Minari root, as Minari itself finds it (without creating it)."""
    env = os.environ.get("MINARI_DATASETS_PATH")
    return Path(env) if env else Path.home() / ".minari" / "datasets"


def _import_minari(where):
    try:
        import minari
    except ImportError as exc:
        raise DataError(f"{where}: Minari datasets need the minari package ({exc}); install it with "
                        "`pip install 'harmodt[minari]'`") from None
    return minari


# ---- finding datasets ------------------------------------------------------------------------
def _is_dataset(folder: Path) -> bool:
    return (folder / "data" / "metadata.json").is_file()


def _datasets_below(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if _is_dataset(here):
            found.append(here)
            dirnames.clear()
            continue
        depth = len(here.relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if depth < _MAX_DEPTH else []
    return sorted(found)


def minari_dataset_dirs(source: str) -> list[Path]:
    """The Minari dataset folders ``source`` names: a folder holding datasets (or being one), or a
    comma list of dataset ids (or namespaces) under the local Minari root; [] when it names none."""
    path = Path(source)
    if path.is_dir():
        return [path] if _is_dataset(path) else _datasets_below(path)
    root = minari_root()
    dirs = []
    for item in (s.strip() for s in source.split(",")):
        folder = root / item
        if not item or item.startswith(("/", ".")) or not folder.is_dir():
            return []
        found = [folder] if _is_dataset(folder) else _datasets_below(folder)
        if not found:
            return []
        dirs += found
    return dirs


def _read_metadata(folder: Path) -> dict:
    mpath = folder / "data" / "metadata.json"
    try:
        meta = loads_json(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{mpath}: unreadable Minari metadata ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("dataset_id"), str):
        raise DataError(f"{mpath}: not a Minari dataset's metadata (no 'dataset_id')")
    return meta


def _task_of(folder: Path, meta: dict) -> str:
    """The Meta-World v3 task a dataset holds: its harmodt metadata's, else its id's env part."""
    mpath = folder / "data" / "metadata.json"
    ours = meta.get("harmodt")
    if isinstance(ours, dict) and "task" in ours:
        name = str(ours["task"])
    else:
        m = _ID_RE.match(meta["dataset_id"])
        namespace = (m.group("namespace") or "") if m else ""
        name = namespace.split("/")[-1] if namespace else ""
        if not name:
            raise DataError(f"{mpath}: dataset id {meta['dataset_id']!r} names no task (expected "
                            f"{NAMESPACE}/<task>/<name>-v<N>)")
    task = canonical_name(name)
    if not is_task(task):
        raise DataError(f"{mpath}: dataset {meta['dataset_id']!r} is for {name!r}, not a Meta-World v3 task")
    return task


def _quality_of(meta: dict) -> str:
    ours = meta.get("harmodt")
    return ours.get("quality", "near-optimal") if isinstance(ours, dict) else "near-optimal"


def _choose(task: str, candidates: list[tuple[Path, dict]], quality: str) -> tuple[Path, dict]:
    """One dataset per task: the only one, else the one our export names for ``quality``."""
    if len(candidates) == 1:
        return candidates[0]
    goal = task.partition("@")[2]
    ours = [c for c in candidates if re.fullmatch(rf".*/harmodt-{goal + '-' if goal else ''}{quality}-v\d+",
                                                  c[1]["dataset_id"])]
    if ours:
        return max(ours, key=lambda c: int(c[1]["dataset_id"].rsplit("-v", 1)[1]))
    ids = ", ".join(c[1]["dataset_id"] for c in candidates)
    raise DataError(f"{candidates[0][0].parent}: {len(candidates)} Minari datasets for {task} ({ids}); "
                    "name the one to use as a dataset id in --data")


# ---- reading episodes ------------------------------------------------------------------------
def _as_array(where: str, name: str, value, kinds: str) -> np.ndarray:
    if isinstance(value, (dict, tuple)):
        raise DataError(f"{where}: {name} are a {type(value).__name__} space; expected one array")
    arr = np.asarray(value)
    if arr.dtype.kind not in kinds:
        raise DataError(f"{where}: {name} must be {'numeric' if 'f' in kinds else 'boolean'}, got {arr.dtype}")
    return arr


def _successes(infos, steps: int) -> np.ndarray | None:
    succ = (infos or {}).get("success")
    if succ is None:
        return None
    succ = np.asarray(succ).reshape(-1).astype(bool)
    if len(succ) == steps + 1:  # Minari's infos: the reset's, then each step's
        return succ[1:]
    return succ if len(succ) == steps else None


def _trajectory(where: str, ep) -> Trajectory:
    obs = _as_array(where, "observations", ep.observations, "fiu")
    act = _as_array(where, "actions", ep.actions, "fiu")
    rew = _as_array(where, "rewards", ep.rewards, "fiub")
    term = _as_array(where, "terminations", ep.terminations, "biu").astype(bool)
    trunc = _as_array(where, "truncations", ep.truncations, "biu").astype(bool)
    if obs.ndim < 1 or obs.shape[0] != act.shape[0] + 1:
        raise DataError(f"{where}: {obs.shape[0] if obs.ndim else 0} observations for "
                        f"{act.shape[0] if act.ndim else 0} actions (Minari stores one observation more than actions)")
    if term.shape != trunc.shape:
        raise DataError(f"{where}: terminations {list(term.shape)} and truncations {list(trunc.shape)} differ")
    obs, act, rew = obs[:-1].astype(np.float32), act.astype(np.float32), rew.astype(np.float32)
    check_episode(where, obs, act, rew, term | trunc)
    return Trajectory(obs, act, rew, term | trunc, _successes(ep.infos, len(rew)), term, trunc)


def _read_episodes(folder: Path, minari) -> list[Trajectory]:
    where = folder / "data"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = minari.MinariDataset(where)
            raw = list(ds.iterate_episodes())
    except DataError:
        raise
    except ImportError as exc:
        raise DataError(f"{where}: the Minari dataset's storage needs a package that is missing ({exc}); "
                        "install it with `pip install 'harmodt[minari]'`") from None
    except Exception as exc:  # h5py / pyarrow / Minari errors on truncated or malformed files
        raise DataError(f"{where}: unreadable or truncated Minari dataset ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    return [_trajectory(f"{where} (episode {ep.id})", ep) for ep in raw]


def _prompt_count(folder: Path, meta: dict) -> int:
    ours = meta.get("harmodt")
    n = ours.get("prompt_episodes", ORIGINAL_PROMPTS) if isinstance(ours, dict) else ORIGINAL_PROMPTS
    if not isinstance(n, int) or n < 1:
        raise DataError(f"{folder / 'data' / 'metadata.json'}: harmodt.prompt_episodes must be a "
                        f"positive integer, got {n!r}")
    return n


def _task_data(task: str, folder: Path, meta: dict, quality: str, episodes: int | None, minari) -> TaskData:
    trajs = _read_episodes(folder, minari)
    n_prompts = _prompt_count(folder, meta)
    if len(trajs) <= n_prompts:
        raise DataError(f"{folder / 'data'}: {len(trajs)} episodes; need more than {n_prompts} "
                        f"(the last {n_prompts} are prompts; empty task)")
    stored = _quality_of(meta)
    if stored == quality:  # the dataset already holds just this quality's episodes
        keep = "near-optimal"
    elif stored == "near-optimal":
        keep = quality
    else:
        raise DataError(f"{folder / 'data'}: holds {stored} data; {quality} data cannot be taken from it")
    return TaskData(task, select_episodes(trajs[:-n_prompts], keep, episodes), trajs[-n_prompts:])


def load_minari(source: str, tasks: list[str] | None, quality: str, episodes: int | None) -> dict[str, TaskData]:
    """Load Minari datasets, one per Meta-World v3 task, as :class:`TaskData`.

    ``source``: a Minari root folder, one dataset folder, or a comma list of dataset ids under
    the local Minari root. A dataset's task is its harmodt metadata's ``task`` or else the env
    part of its id (``<namespace>/<task>/<name>-v<N>``; ``-v2`` names map to v3). When a task
    has several datasets, the one named ``harmodt-<quality>-v<N>`` (highest N) is used.

    Prompt episodes are chosen as for the original layout: the last 2 episodes of the dataset
    (by episode id), or the ``harmodt.prompt_episodes`` last ones when its metadata (written by
    our export) says how many there are. The episodes before them are the training episodes,
    from which ``quality`` and ``episodes`` select as in the other layouts (a dataset our export
    wrote for that very quality is taken whole). The observation after an episode's last step
    is dropped; ``infos["success"]``, when present, gives the per-step success flags.
    """
    dirs = minari_dataset_dirs(source)
    if not dirs:
        raise DataError(f"{source}: no Minari datasets found")
    minari = _import_minari(source)
    by_task: dict[str, list[tuple[Path, dict]]] = {}
    for folder in dirs:
        meta = _read_metadata(folder)
        by_task.setdefault(_task_of(folder, meta), []).append((folder, meta))
    if quality not in QUALITIES:
        raise DataError(f"quality must be near-optimal or sub-optimal, got {quality!r}")
    out = {}
    for task in tasks or sorted(by_task, key=task_sort_key):
        if task not in by_task:
            raise DataError(f"{source}: no Minari dataset for task {task!r} (it has {', '.join(by_task)})")
        folder, meta = _choose(task, by_task[task], quality)
        out[task] = _task_data(task, folder, meta, quality, episodes, minari)
    return out


# ---- export ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _minari_root_at(path: Path):
    """Point Minari's dataset root at ``path`` for the duration (Minari reads it from the env)."""
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def _episode_buffer(minari, index: int, tr: Trajectory):
    obs = np.concatenate([tr.observations, tr.observations[-1:]])  # the unknown final observation repeated
    term = tr.terminals if tr.terminals is not None else tr.dones
    trunc = tr.truncations if tr.truncations is not None else np.zeros_like(tr.dones)
    succ = tr.successes if tr.successes is not None else np.zeros_like(tr.dones)
    return minari.data_collector.EpisodeBuffer(
        id=index, observations=obs, actions=tr.actions, rewards=tr.rewards,
        terminations=term, truncations=trunc, infos={"success": np.concatenate([[False], succ])})


def _env_spec(task: str, settings: dict):
    """The EnvSpec of ``harmodt.envs.make_env`` with the seed that generated the task's training
    episodes, or None when the settings do not record a seed."""
    from gymnasium.envs.registration import EnvSpec

    if not isinstance(settings.get("seed"), int):
        return None
    seed = task_seed(settings["seed"], task) % (2**31)
    # a gymnasium id cannot hold the "@" of a goal variation: harmodt/pick-place-v3-g7
    return EnvSpec(id=f"harmodt/{task.replace('@', '-')}", entry_point="harmodt.envs:make_env",
                   kwargs={"task": task, "seed": seed}, max_episode_steps=EPISODE_LEN)


def _env_id(task: str) -> str:
    base, split, index = goal_of(task)
    if split is None:
        return f"Meta-World/MT1 env_name={task}"
    return f"Meta-World/ML1 env_name={base} {split}_tasks[{index}] seed={ML1_SEED}"


def _harmodt_metadata(task: str, manifest: dict, td: TaskData, quality: str, spec) -> dict:
    entry = manifest["files"][task]
    keep = ("episodes", "steps", "prompt_episodes", "success_rate", "mean_return", "episode_success", "prompt_success")
    meta = {"task": task, "quality": quality, "prompt_episodes": len(td.prompts), "env_id": _env_id(task),
            "env_entry_point": "harmodt.envs:make_env", "env_seed": None if spec is None else spec.kwargs["seed"],
            "final_observation": "repeated (our files do not store the observation after the last step)",
            "generator": manifest.get("generator"), "settings": manifest.get("settings", {}),
            "curriculum_success_by_decile": manifest.get("curriculum_success_by_decile")}
    meta.update({k: entry[k] for k in keep if k in entry})
    return meta


def _write_dataset(minari, ds_id: str, task: str, td: TaskData, manifest: dict, quality: str) -> None:
    import gymnasium as gym

    spec = _env_spec(task, manifest.get("settings", {}))
    trajs = td.trajectories + td.prompts
    buffers = [_episode_buffer(minari, i, tr) for i, tr in enumerate(trajs)]
    obs_space = gym.spaces.Box(-np.inf, np.inf, (STATE_DIM,), np.float32)
    act_space = gym.spaces.Box(-1.0, 1.0, (ACT_DIM,), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = minari.create_dataset_from_buffers(
            ds_id, buffers, env=spec, observation_space=obs_space, action_space=act_space,
            algorithm_name="harmodt.data.generate: Meta-World v3 scripted experts, random-to-expert curriculum",
            author="harmodt", author_email="n/a", code_permalink="harmodt.data.generate",
            description=f"Meta-World v3 {task}: {len(td.trajectories)} curriculum episodes (random to expert) "
                        f"followed by {len(td.prompts)} noise-free expert prompt episodes",
            requirements=["harmodt", "metaworld>=3.1,<3.2"], data_format="hdf5")
    ds.storage.update_metadata({"harmodt": _harmodt_metadata(task, manifest, td, quality, spec)})
    roles = ["training"] * len(td.trajectories) + ["prompt"] * len(td.prompts)
    ds.storage.update_episode_metadata([{"harmodt_role": r} for r in roles])


def _move_into(tmp_root: Path, out: Path, ds_id: str) -> None:
    """Rename a finished dataset from the temporary root into ``out``, with its namespaces' files."""
    parts = Path(ds_id).parts
    for i in range(1, len(parts)):
        ns_file = Path(*parts[:i]) / "namespace_metadata.json"
        if (tmp_root / ns_file).exists() and not (out / ns_file).exists():
            (out / ns_file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tmp_root / ns_file, out / ns_file)
    (out / ds_id).parent.mkdir(parents=True, exist_ok=True)
    move_atomic(tmp_root / ds_id, out / ds_id)


def export_minari(src: str | Path, out: str | Path) -> list[str]:
    """Write our data folder ``src`` as Minari datasets (one per task) under the Minari root
    ``out``; returns their ids. An id that already exists under ``out`` is a DataError."""
    src, out = Path(src), Path(os.path.abspath(out))  # (absolute: Minari reads its root from the environment)
    check_data_folder(out, "--minari")
    if (out / MANIFEST).exists() or out.resolve().is_relative_to(src.resolve()):
        raise OutputError(f"--minari {out}: is {src} or inside it; Minari datasets go into a root of their own")
    if not (src / MANIFEST).exists():
        raise DataError(f"{src}: export reads our layout (a folder with {MANIFEST} written by "
                        "`python -m harmodt.data generate`)")
    manifest = read_manifest(src)
    quality = manifest.get("quality", "near-optimal")
    if quality not in QUALITIES:
        raise DataError(f"{src / MANIFEST}: quality must be one of {', '.join(QUALITIES)}, got {quality!r}")
    minari = _import_minari(src)
    data = load_ours(src)
    ids = {task: dataset_id(task, quality) for task in data}
    for ds_id in ids.values():
        if (out / ds_id).exists():
            raise DataError(f"{out / ds_id}: a Minari dataset with this id exists; remove it or export to another root")
    out.mkdir(parents=True, exist_ok=True)
    tmp_root = out / f".harmodt-export-{os.getpid()}"
    shutil.rmtree(tmp_root, ignore_errors=True)
    try:
        with _minari_root_at(tmp_root):
            for task, td in data.items():
                _write_dataset(minari, ids[task], task, td, manifest, quality)
                _move_into(tmp_root, out, ids[task])
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return list(ids.values())
