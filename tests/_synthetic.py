"""Small synthetic offline data for tests that do not need Meta-World rollouts."""

from types import SimpleNamespace

import numpy as np


def trajectory(rng: np.random.Generator, length: int = 60, state_dim: int = 39, act_dim: int = 4):
    return SimpleNamespace(
        observations=rng.normal(size=(length, state_dim)).astype(np.float32),
        actions=rng.uniform(-1, 1, size=(length, act_dim)).astype(np.float32),
        rewards=rng.uniform(0, 10, size=length).astype(np.float32),
        dones=np.eye(1, length, length - 1, dtype=bool)[0],
        successes=None,
    )


def datasets(tasks, episodes: int = 3, length: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {
        t: SimpleNamespace(name=t, trajectories=[trajectory(rng, length) for _ in range(episodes)],
                           prompts=[trajectory(rng, length) for _ in range(2)])
        for t in tasks
    }
