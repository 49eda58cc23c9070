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
