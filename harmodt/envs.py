"""Meta-World v3 environments with random goals (MT50-rand) and the shipped scripted experts.

Each task has a pool of 50 goals drawn once by Meta-World's benchmark seed (``GOAL_POOL_SEED``,
as in Meta-World's MT benchmarks); every reset picks one of them at random with the env's own
seed, so episodes get random but reproducible goals and copies with different seeds see
different goal sequences. Building the goal pool is the slow part (~0.75 s), so it is cached per
task; one more env of a task then costs ~0.1 s.
"""

from __future__ import annotations

import functools
import warnings

import gymnasium as gym
import numpy as np

GOAL_POOL_SEED = 0  # seed of Meta-World's goal pool per task (shared by data generation and evaluation)
EPISODE_LEN = 500  # Meta-World's max_path_length: episodes truncate here


def quiet() -> None:
    """Silence the warnings Meta-World and gymnasium print on every step or reset."""
    warnings.filterwarnings("ignore", message=".*Constant\\(s\\) may be too high.*")
    warnings.filterwarnings("ignore", module="gymnasium.utils.passive_env_checker")
    warnings.filterwarnings("ignore", message=".*is not within the observation space.*")
    warnings.filterwarnings("ignore", message=".*Box observation space maximum and minimum.*")


@functools.lru_cache(maxsize=None)
def _goal_pool(task: str):
    import metaworld

    quiet()
    if task not in metaworld.env_dict.ALL_V3_ENVIRONMENTS:
        raise ValueError(f"unknown Meta-World v3 task {task!r}")
    bench = metaworld.MT1(task, seed=GOAL_POOL_SEED)
    return bench.train_classes[task], list(bench.train_tasks)


def make_env(task: str, seed: int) -> gym.Env:
    """A single-task env: 39-dim float64 observations (goal in obs[36:39]), random goal from the
    task's pool at every reset (drawn with ``seed``), truncation at step 500."""
    from metaworld.wrappers import RandomTaskSelectWrapper

    quiet()
    cls, tasks = _goal_pool(task)
    env = cls()
    env.seed(int(seed))
    env = gym.wrappers.TimeLimit(env, env.max_path_length)
    env = RandomTaskSelectWrapper(env, tasks)
    env.action_space.seed(int(seed))
    return env


def make_vector_env(tasks: list[str], seeds: list[int]) -> gym.vector.SyncVectorEnv:
    """One env per (task, seed) entry in a synchronous vector env (async is slower on 2 cores)."""
    if len(tasks) != len(seeds):
        raise ValueError(f"make_vector_env: {len(tasks)} tasks but {len(seeds)} seeds")
    return gym.vector.SyncVectorEnv([functools.partial(make_env, t, s) for t, s in zip(tasks, seeds)],
                                    autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)


class ScriptedExpert:
    """Meta-World's scripted policy for a task; actions clipped to [-1, 1]."""

    def __init__(self, task: str):
        from metaworld.policies import ENV_POLICY_MAP

        quiet()
        if task not in ENV_POLICY_MAP:
            raise ValueError(f"no scripted policy for {task!r}")
        self.policy = ENV_POLICY_MAP[task]()

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        # the policies read the goal from obs[-3:]: give them the plain 39-dim observation
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.clip(self.policy.get_action(obs[:39]), -1.0, 1.0)


def scripted_policy(task: str) -> ScriptedExpert:
    return ScriptedExpert(task)
