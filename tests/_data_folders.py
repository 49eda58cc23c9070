"""Small data folders of our layout written without Meta-World rollouts, for the data tests."""

import json
from pathlib import Path

import numpy as np

from harmodt.data.formats import FORMAT_VERSION, atomic_json, save_task_file, sha256


def episode(rng: np.random.Generator, length: int, end: str = "truncated", success_from: int | None = None) -> dict:
    """One episode of our step arrays; it ends truncated or terminal at its last step."""
    flags = np.eye(1, length, length - 1, dtype=bool)[0]
    none = np.zeros(length, bool)
    succ = np.zeros(length, bool)
    if success_from is not None:
        succ[success_from:] = True
    return {"observations": rng.normal(size=(length, 39)).astype(np.float32),
            "actions": rng.uniform(-1, 1, (length, 4)).astype(np.float32),
            "rewards": rng.uniform(0, 10, length).astype(np.float32),
            "terminals": flags if end == "terminal" else none, "truncations": flags if end == "truncated" else none,
            "successes": succ}


def write_ours(root, tasks=("reach-v3", "push-v3"), episodes: int = 4, prompts: int = 2, length: int = 20, seed: int = 0,
               **manifest_extra) -> Path:
    """Our layout: per task ``episodes`` curriculum-like episodes (lengths vary, every other one
    terminal and successful) and ``prompts`` successful prompt episodes; then the manifest."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = {}
    for task in tasks:
        eps = [episode(rng, length + i, "terminal" if i % 2 else "truncated", 3 if i % 2 else None) for i in range(episodes)]
        prs = [episode(rng, length, "truncated", 2) for _ in range(prompts)]
        epsilon = np.linspace(1.0, 0.0, episodes).astype(np.float32)
        files[task] = save_task_file(root / f"{task}.npz", eps, prs, {"episode_epsilon": epsilon})
        files[task].update(episode_success=[bool(e["successes"].any()) for e in eps], success_rate=0.5)
    settings = {"episodes": episodes, "seed": seed, "prompt_episodes": prompts, "curriculum": "synthetic", "generator_version": 2}
    atomic_json(root / "manifest.json", {"format_version": FORMAT_VERSION, "generator": "tests._data_folders",
                                         "settings": settings, "tasks": list(tasks), "files": files, **manifest_extra})
    return root


def rewrite_task_file(root, task: str, arrays: dict) -> Path:
    """Replace a task's file with ``arrays`` (npz) and list its new size and checksum in the
    manifest, so only the arrays' own faults remain."""
    root = Path(root)
    path = root / f"{task}.npz"
    np.savez(path, **arrays)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"][task].update(bytes=path.stat().st_size, sha256=sha256(path))
    (root / "manifest.json").write_text(json.dumps(manifest))
    return path


def task_arrays(root, task: str) -> dict:
    with np.load(Path(root) / f"{task}.npz") as z:
        return {k: z[k] for k in z.files}


def minari_episodes(count: int = 5, length: int = 12, obs_dim: int = 39, obs_dtype=np.float64, with_success: bool = True) -> list[dict]:
    """Episodes by Minari's conventions: one observation more than actions, infos per observation.
    Episode i has every reward equal to i; each ends terminal; success from the 6th observation."""
    rng = np.random.default_rng(1)
    return [{"observations": rng.normal(size=(length + 1, obs_dim)).astype(obs_dtype),
             "actions": rng.uniform(-1, 1, (length, 4)).astype(np.float32), "rewards": np.full(length, float(i)),
             "terminations": np.eye(1, length, length - 1, dtype=bool)[0], "truncations": np.zeros(length, bool),
             "infos": {"success": np.arange(length + 1) > 5} if with_success else {}}
            for i in range(count)]


def write_minari_dataset(root, ds_id: str, episodes: list[dict]) -> Path:
    """A Minari dataset ``ds_id`` under the Minari root ``root`` written by Minari's own API, as a
    dataset from elsewhere would be (no harmodt metadata, no env spec); returns its folder."""
    import warnings

    import gymnasium as gym
    import minari

    from harmodt.data.minari import _minari_root_at

    buffers = [minari.data_collector.EpisodeBuffer(id=i, **ep) for i, ep in enumerate(episodes)]
    obs = episodes[0]["observations"]
    with _minari_root_at(Path(root)), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(ds_id, buffers, observation_space=gym.spaces.Box(-np.inf, np.inf, obs.shape[1:], obs.dtype),
                                           action_space=gym.spaces.Box(-1, 1, (4,), np.float32))
    return Path(root) / ds_id


def tiny_train_args(tasks: str, steps: int, checkpoint_every: int, log_every: int) -> list[str]:
    """`python -m harmodt.train` flags of a tiny CPU run (1 layer × 32, context 5, prompt 2, no evaluation)
    on the tasks of :func:`write_ours`; the caller adds --data and --out."""
    return ["--tasks", tasks, "--steps", str(steps), "--batch-size", "4", "--n-layer", "1", "--n-embd", "32",
            "--n-head", "2", "--context-len", "5", "--prompt-len", "2", "--eval-episodes", "0",
            "--checkpoint-every", str(checkpoint_every), "--log-every", str(log_every), "--device", "cpu",
            "--no-progress"]
