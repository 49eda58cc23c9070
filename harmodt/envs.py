"""Meta-World v3 environments: random goals (MT50-rand), fixed goal variations (ML1), and the
shipped scripted experts.

``make_env(task, seed)`` builds the task's env class from ``metaworld.env_dict`` directly (no
``metaworld.MT1``/``gym.make``, which first build a 50-goal pool with 50 resets: ~0.7 s more per
task). For a Meta-World task name (``reach-v3``) it sets the task once with the goal visible in
``obs[36:39]`` (``partially_observable=False``, as in Meta-World's MT benchmarks) and unfreezes
the goal vector: every reset then draws a fresh goal (object/target positions) uniformly from the
task's reset space with the env's own RNG, seeded by ``seed`` at construction. So goals are
random per episode, the sequence is reproducible for a seed, and copies built with different
seeds see different goals. ``reset(seed=...)`` does not reseed the goals (Meta-World ignores
it); only the construction seed does.

For a goal variation (``pick-place-v3@g7``, ``pick-place-v3@test3``; see :mod:`harmodt.tasks`)
it sets the very task ``metaworld.ML1(base, seed=ML1_SEED)`` lists as train goal 7 (test goal
3), as ML1 sets it: the goal vector frozen, so every reset restores the same object and target
positions, and the goal hidden (``partially_observable=True``: ``obs[36:39]`` is zero). Nothing
else in a reset is random, so the seed changes nothing a policy sees; a policy must infer the
goal from its prompt (the few-shot setting). Building the ML1 benchmark costs a few seconds (100
resets); it is done once per base task and process.
"""

from __future__ import annotations

import functools
import warnings

import gymnasium as gym
import numpy as np

from .tasks import ML1_SEED, goal_of

EPISODE_LEN = 500  # Meta-World's max_path_length: episodes truncate here


@functools.lru_cache(maxsize=None)
def _ml1(base: str):
    """Meta-World's ML1 benchmark of ``base`` with our fixed seed (cached: it takes 100 resets)."""
    import metaworld

    return metaworld.ML1(base, seed=ML1_SEED)


def ml1_task(task: str):
    """The ``metaworld.Task`` of a goal variation (``pick-place-v3@g7``): that entry of
    ``ML1(base, seed=ML1_SEED).train_tasks`` (``@testN``: of ``.test_tasks``)."""
    base, split, index = goal_of(task)
    if split is None:
        raise ValueError(f"{task!r} is not a goal variation (TASK@gN or TASK@testN)")
    bench = _ml1(base)
    return (bench.train_tasks if split == "train" else bench.test_tasks)[index]


def _raw_env(task: str, seed: int):
    """The unwrapped Meta-World env of a task name, with its task set and its RNG seeded."""
    import metaworld
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS, ML1_ARGS_KWARGS

    try:
        base, split, _ = goal_of(task)
    except ValueError:
        if "@" in task:
            raise  # goal_of's message names the bad goal
        raise ValueError(f"unknown Meta-World v3 task {task!r}") from None
    cls = ALL_V3_ENVIRONMENTS[base]
    env = cls()
    if split is not None:
        env.set_task(ml1_task(task))  # goal frozen and hidden, as ML1 sets it
    else:
        kwargs = {k: v for k, v in ML1_ARGS_KWARGS[base]["kwargs"].items() if k != "task_id"}
        kwargs.update(rand_vec=np.zeros(env._random_reset_space.low.size), env_cls=cls, partially_observable=False)
        env.set_task(metaworld._encode_task(base, kwargs))  # placeholder goal: unfrozen just below
        env._freeze_rand_vec = False  # draw a new goal at every reset ...
        env.seeded_rand_vec = True  # ... from env.np_random (seeded below), not the global np.random
    env.seed(int(seed))
    return env


def make_env(task: str, seed: int) -> gym.Env:
    """A single-task env: 39-dim float64 observations, truncation at step 500. A Meta-World task
    (``reach-v3``): a new random goal at every reset drawn with the RNG seeded by ``seed``, the
    goal in obs[36:39]. A goal variation (``pick-place-v3@g7``): the same ML1 goal at every
    reset, obs[36:39] zero."""
    env = _raw_env(task, seed)
    return gym.wrappers.TimeLimit(env, env.max_path_length)


def fixed_goal(task: str) -> np.ndarray | None:
    """The goal position (what ``obs[36:39]`` would show) of a goal variation; None for a
    random-goal task."""
    if goal_of(task)[1] is None:
        return None
    env = _raw_env(task, 0)
    env.reset()
    goal = np.array(env._get_pos_goal(), dtype=np.float64)
    env.close()
    return goal


def make_vector_env(tasks: list[str], seeds: list[int]) -> gym.vector.SyncVectorEnv:
    """One env per (task, seed) entry in a synchronous vector env (async is slower on 2 cores)."""
    if len(tasks) != len(seeds):
        raise ValueError(f"make_vector_env: {len(tasks)} tasks but {len(seeds)} seeds")
    return gym.vector.SyncVectorEnv([functools.partial(make_env, t, s) for t, s in zip(tasks, seeds)],
                                    autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)


def step_some(envs: gym.vector.SyncVectorEnv, actions: np.ndarray, active: np.ndarray):
    """Step only the envs of ``envs`` where ``active`` (N,) is true, each with its row of
    ``actions`` (N, A): (obs, rewards, success) of the stepped envs, in their order. Each env's
    ``step`` is what ``envs.step`` calls for it, so a stepped env sees exactly the steps it would
    have seen while no episode has ended before it (``envs.step`` would then reset that env;
    this never resets one): step no env past its episode's end."""
    idx = np.flatnonzero(active)
    obs, rew, success = np.empty((len(idx), 39)), np.empty(len(idx)), np.empty(len(idx))
    for j, i in enumerate(idx):
        o, r, _, _, info = envs.envs[i].step(actions[i])
        obs[j], rew[j], success[j] = o, r, float(info.get("success", 0.0))
    return obs, rew, success


def _shard_worker(conn, tasks: list[str], seeds: list[int]) -> None:
    """Runs one shard's sync vector env in a worker process: ("reset",) -> obs;
    ("step", actions) -> (obs, rewards, terminated, truncated, success); ("step_some", (actions,
    active)) -> :func:`step_some`'s; ("close",) ends."""
    import traceback

    try:
        env = make_vector_env(tasks, seeds)
        conn.send(("ready", None))
        while True:
            cmd, arg = conn.recv()
            if cmd == "reset":
                obs, _ = env.reset(seed=None)
                conn.send(("ok", obs))
            elif cmd == "step":
                obs, rew, term, trunc, info = env.step(arg)
                success = np.asarray(info.get("success", np.zeros(len(tasks))), dtype=float)
                conn.send(("ok", (obs, rew, term, trunc, success)))
            elif cmd == "step_some":
                conn.send(("ok", step_some(env, *arg)))
            else:
                env.close()
                conn.send(("ok", None))
                return
    except Exception:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("error", traceback.format_exc()))


class ShardedVectorEnv:
    """The envs of :func:`make_vector_env` split into ``shards`` groups that step concurrently:
    group 0 in this process, every other group in a worker process (``spawn``), so the simulator
    uses both cores of this machine while the policy's forward waits for it. Each env keeps its
    own construction seed, so observations, rewards and successes are exactly those of the
    single-process vector env. Rows are dealt round-robin (every shard gets a mix of tasks: their
    step costs differ up to 4x). ``step`` returns ``info`` with ``success`` only."""

    def __init__(self, tasks: list[str], seeds: list[int], shards: int = 2):
        import multiprocessing as mp

        if len(tasks) != len(seeds):
            raise ValueError(f"ShardedVectorEnv: {len(tasks)} tasks but {len(seeds)} seeds")
        self.n = len(tasks)
        shards = max(1, min(int(shards), self.n))
        self.rows = [np.arange(i, self.n, shards) for i in range(shards)]
        ctx = mp.get_context("spawn")
        self.workers = []
        for rows in self.rows[1:]:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_shard_worker, args=(child, [tasks[i] for i in rows], [seeds[i] for i in rows]),
                               daemon=True)
            proc.start()
            child.close()
            self.workers.append((proc, parent, rows))
        self.local = make_vector_env([tasks[i] for i in self.rows[0]], [seeds[i] for i in self.rows[0]])
        self._last_obs = np.zeros((self.n, 39))
        for _, conn, rows in self.workers:
            self._recv(conn, rows)

    def _recv(self, conn, rows):
        try:
            status, payload = conn.recv()
        except EOFError:
            raise RuntimeError(f"simulator worker for envs {rows.tolist()} died (its error is printed above; when "
                               "calling evaluation from your own script, start it under `if __name__ == "
                               "'__main__':`, since the workers are spawned processes that import the main module, "
                               "or pass sim_workers=1)") from None
        if status == "error":
            raise RuntimeError(f"simulator worker for envs {rows.tolist()} failed:\n{payload}")
        return payload

    def reset(self, seed=None):
        if seed is not None:
            raise ValueError("ShardedVectorEnv.reset: goals come from each env's construction seed; pass seed=None")
        for _, conn, _ in self.workers:
            conn.send(("reset", None))
        obs = np.empty((self.n, 39))
        local, _ = self.local.reset(seed=None)
        obs[self.rows[0]] = local
        for _, conn, rows in self.workers:
            obs[rows] = self._recv(conn, rows)
        self._last_obs = obs
        return obs, {}

    def step(self, actions: np.ndarray):
        actions = np.asarray(actions)
        for _, conn, rows in self.workers:
            conn.send(("step", actions[rows]))
        obs, rew = np.empty((self.n, 39)), np.empty(self.n)
        term, trunc, success = np.empty(self.n, bool), np.empty(self.n, bool), np.empty(self.n)
        o, r, te, tr, info = self.local.step(actions[self.rows[0]])
        parts = [(self.rows[0], (o, r, te, tr, np.asarray(info.get("success", np.zeros(len(r))), dtype=float)))]
        parts += [(rows, self._recv(conn, rows)) for _, conn, rows in self.workers]
        for rows, (o, r, te, tr, su) in parts:
            obs[rows], rew[rows], term[rows], trunc[rows], success[rows] = o, r, te, tr, su
        self._last_obs = obs
        return obs, rew, term, trunc, {"success": success}

    def step_some(self, actions: np.ndarray, active: np.ndarray):
        """Step the envs where ``active`` (N,) is true (:func:`step_some` in every shard): (obs (N, 39),
        rewards (N,), success (N,)), where the other rows hold their last observation, reward 0 and
        success 0. For episodes that are over for the caller while their env runs on (no reset)."""
        actions, active = np.asarray(actions), np.asarray(active, bool)
        for _, conn, rows in self.workers:
            conn.send(("step_some", (actions[rows], active[rows])))
        obs, rew, success = self._last_obs.copy(), np.zeros(self.n), np.zeros(self.n)
        parts = [(self.rows[0], step_some(self.local, actions[self.rows[0]], active[self.rows[0]]))]
        parts += [(rows, self._recv(conn, rows)) for _, conn, rows in self.workers]
        for rows, (o, r, su) in parts:
            stepped = rows[active[rows]]
            obs[stepped], rew[stepped], success[stepped] = o, r, su
        self._last_obs = obs
        return obs, rew, success

    def close(self):
        for proc, conn, _ in self.workers:
            try:
                conn.send(("close", None))
                conn.recv()
            except (EOFError, BrokenPipeError, OSError):
                pass
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        self.workers = []
        self.local.close()


class ScriptedExpert:
    """Meta-World's scripted policy for a task (a goal variation: its base task's policy, told
    the fixed goal the observation hides); actions clipped to [-1, 1]."""

    def __init__(self, task: str):
        from metaworld.policies import ENV_POLICY_MAP

        base = goal_of(task)[0]
        if base not in ENV_POLICY_MAP:
            raise ValueError(f"no scripted policy for {task!r}")
        self.policy = ENV_POLICY_MAP[base]()
        self.goal = fixed_goal(task)  # (3,) or None

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        # the policies read the goal from obs[-3:]: give them the plain 39-dim observation, as a
        # copy: door-open-v3's and door-close-v3's policies write into the array they are given
        # (their target offsets are added to the handle position in place), which would alter the
        # caller's observation
        obs = np.array(obs[:39], dtype=np.float64)
        if self.goal is not None:
            obs[36:39] = self.goal
        with warnings.catch_warnings():  # "Constant(s) may be too high", many times per episode
            warnings.simplefilter("ignore")
            return np.clip(self.policy.get_action(obs), -1.0, 1.0)
