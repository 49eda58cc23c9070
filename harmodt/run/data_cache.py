"""The training data of a run: ``--data``, or our Meta-World data generated once into the cache
(``$HARMODT_CACHE``, default ``~/.cache/harmodt``) and reused by every run with the same tasks,
episodes and seed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..files import cache_dir, loads_json # noqa: F401 (where generated data are cached)
from ..config import ConfigError, TrainConfig


def current_cache(path: Path) -> bool:
    """A cached data folder that is complete and written by the current generator (an older
    generator's folder is generated again)."""
    from ..data.formats import generator_version
    from ..data.generator import GENERATOR_VERSION

    try:
        manifest = loads_json((Path(path) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return generator_version(manifest) == GENERATOR_VERSION


def cached_data_path(cfg: TrainConfig, tasks: list[str]) -> Path:
    """Where the generated data of ``cfg``'s tasks, ``gen_episodes`` and seed live in the cache."""
    key = f"{'_'.join(t.replace('-v3', '') for t in tasks)}_e{cfg.gen_episodes}_s{cfg.seed}"
    if len(key) > 120:
        key = hashlib.sha1(key.encode()).hexdigest()[:16] + f"_e{cfg.gen_episodes}_s{cfg.seed}"
    return cache_dir() / "data" / key


def load_training_data(cfg: TrainConfig, tasks: list[str], may_generate: bool = True) -> dict:
    """Load ``--data``, or generate our Meta-World data into the cache when no folder is given
    (``may_generate=False``, as under torchrun: ConfigError instead when the cache lacks it)."""
    from ..data import generate, load_dataset

    path = cfg.data
    if not path:
        path = str(cached_data_path(cfg, tasks))
        if not current_cache(Path(path)):
            if not may_generate:
                raise ConfigError(f"no --data given and no generated data in {path}: under torchrun the ranks do "
                                  "not generate data; write it first (python -m harmodt.data generate --out "
                                  "FOLDER ...) and pass --data FOLDER")
            print(f"[harmodt] generating offline data for {len(tasks)} tasks x {cfg.gen_episodes} episodes into {path}",
                  flush=True)
            # overwrite: the folder is the cache's own
            generate(tasks, cfg.gen_episodes, path, seed=cfg.seed, progress=cfg.progress, overwrite=True)
    return load_dataset(path, tasks=tasks, quality=cfg.quality, episodes_per_task=cfg.episodes_per_task or None)


def check_data(cfg: TrainConfig, datasets: dict) -> str:
    """What must hold between ``cfg`` and the data it trains on (ConfigError, one line, otherwise):
    observations of ``--state-dim`` and actions of ``--act-dim`` values, no episode longer than
    ``--max-ep-len`` (the timestep embedding has one row per step; evaluation episodes last
    harmodt.envs.EPISODE_LEN steps). Returns the data's fingerprint (:func:`data_fingerprint`)."""
    from ..envs import EPISODE_LEN

    m = cfg.model
    longest = (0, "")
    for name, td in datasets.items():
        for tr in list(td.trajectories) + list(td.prompts):
            obs, act = tr.observations, tr.actions
            if obs.shape[-1] != m.state_dim:
                raise ConfigError(f"--state-dim {m.state_dim} does not match the data: {name}'s observations "
                                  f"have {obs.shape[-1]} values")
            if act.shape[-1] != m.act_dim:
                raise ConfigError(f"--act-dim {m.act_dim} does not match the data: {name}'s actions "
                                  f"have {act.shape[-1]} values")
            longest = max(longest, (len(obs), name))
    if longest[0] > m.max_ep_len:
        raise ConfigError(f"--max-ep-len {m.max_ep_len} is shorter than the data's longest episode ({longest[0]} "
                          f"steps, {longest[1]}); it must be at least that long")
    if cfg.eval_episodes and m.max_ep_len < EPISODE_LEN:
        raise ConfigError(f"--max-ep-len {m.max_ep_len} is shorter than an evaluation episode ({EPISODE_LEN} steps); "
                          f"pass --max-ep-len {EPISODE_LEN} or more, or --eval-episodes 0")
    return data_fingerprint(datasets)


def data_fingerprint(datasets: dict) -> str:
    """The sha256 of the data a run trains on (every task's episodes and prompts, in task order:
    observations, actions, rewards, episode ends), whatever layout they were read from. A checkpoint
    records it; ``--resume`` refuses data that differ (harmodt.run.resume)."""
    import numpy as np

    h = hashlib.sha256()
    for name in sorted(datasets):
        h.update(name.encode() + b"\0")
        for part in ("trajectories", "prompts"):
            for tr in getattr(datasets[name], part):
                for arr in (tr.observations, tr.actions, tr.rewards, tr.dones):
                    a = np.ascontiguousarray(np.asarray(arr))
                    h.update(f"{part}:{a.dtype.str}:{a.shape}".encode())
                    h.update(a.tobytes())
    return h.hexdigest()
