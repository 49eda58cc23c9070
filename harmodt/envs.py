"""Meta-World v3 environments with random goals (MT50-rand) and the shipped scripted experts.

``make_env(task, seed)`` builds the task's env class from ``metaworld.env_dict`` directly (no
``metaworld.MT1``/``gym.make``, which first build a 50-goal pool with 50 resets: ~0.7 s more per
task), sets the task once with the goal visible in ``obs[36:39]`` (``partially_observable=False``,
as in Meta-World's MT benchmarks) and unfreezes the goal vector: every reset then draws a fresh
goal (object/target positions) uniformly from the task's reset space with the env's own RNG,
seeded by ``seed`` at construction. So goals are random per episode, the sequence is reproducible
for a seed, and copies built with different seeds see different goals. ``reset(seed=...)`` does
not reseed the goals (Meta-World ignores it); only the construction seed does.
"""

from __future__ import annotations

import functools
import warnings

import gymnasium as gym
import numpy as np

EPISODE_LEN = 500  # Meta-World's max_path_length: episodes truncate here


def quiet() -> None:
    """Silence the warnings Meta-World and gymnasium print on every step or reset."""
    warnings.filterwarnings("ignore", message=".*Constant\\(s\\) may be too high.*")
    warnings.filterwarnings("ignore", module="gymnasium.utils.passive_env_checker")
    warnings.filterwarnings("ignore", message=".*is not within the observation space.*")
    warnings.filterwarnings("ignore", message=".*Box observation space maximum and minimum.*")


def make_env(task: str, seed: int) -> gym.Env:
    """A single-task env: 39-dim float64 observations (goal in obs[36:39]), a new random goal at
    every reset drawn with the RNG seeded by ``seed``, truncation at step 500."""
    import metaworld
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS, ML1_ARGS_KWARGS

    quiet()
    if task not in ALL_V3_ENVIRONMENTS:
        raise ValueError(f"unknown Meta-World v3 task {task!r}")
    cls = ALL_V3_ENVIRONMENTS[task]
    env = cls()
    kwargs = {k: v for k, v in ML1_ARGS_KWARGS[task]["kwargs"].items() if k != "task_id"}
    kwargs.update(rand_vec=np.zeros(env._random_reset_space.low.size), env_cls=cls, partially_observable=False)
    env.set_task(metaworld._encode_task(task, kwargs))  # placeholder goal: unfrozen just below
    env._freeze_rand_vec = False  # draw a new goal at every reset ...
    env.seeded_rand_vec = True  # ... from env.np_random (seeded below), not the global np.random
    env.seed(int(seed))
    return gym.wrappers.TimeLimit(env, env.max_path_length)


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
