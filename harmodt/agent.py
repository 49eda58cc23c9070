"""A harmodt checkpoint as a Meta-World ``Agent``: score it with Meta-World's own evaluation.

Meta-World v3 ships the benchmark's scorer, ``metaworld.evaluation.evaluation(agent, envs,
num_episodes)``, which steps a vector env (``gym.make_vec("Meta-World/MT10", ...)`` or
``"Meta-World/custom-mt-envs"``) and asks the agent for actions through two calls:
``eval_action(observations) -> actions`` and ``reset(env_mask)``. :class:`HarmoDTAgent`
implements them from a checkpoint::

    import gymnasium as gym, metaworld
    from metaworld.evaluation import evaluation
    from harmodt.agent import HarmoDTAgent

    envs = gym.make_vec("Meta-World/MT10", vector_strategy="sync", seed=0)
    agent = HarmoDTAgent.from_checkpoint("runs/x/checkpoint.pt", envs)
    mean_success, mean_return, per_task, _ = evaluation(agent, agent.wrap(envs), 50)

For every env of the vector env the agent keeps the current episode's history (states, actions,
returns-to-go, timesteps; the last K steps the model reads), and acts through its task's mask
(the voted mask of Eq. 13 for a task the checkpoint was not trained on) and its task's prompt,
the same deterministic prompt :func:`harmodt.evaluate.evaluate` uses (built by the same code,
:func:`harmodt.policy_inputs.task_inputs`, with the prompt keys/values computed once per task). Each
``eval_action`` is one batched forward for all envs; envs whose episodes started at different
steps are left-padded to the longest history and the padding is hidden from attention.

Returns-to-go: the policy conditions on the return still to collect, which starts at the
checkpoint's target return and drops by each step's reward, but the ``Agent`` protocol never
passes rewards. ``agent.wrap(envs)`` returns the vector env wrapped so that every ``step`` hands
its rewards to the agent; step through the wrapped env (as above) and the agent acts exactly as
``harmodt.evaluate`` does. Stepping the unwrapped env makes the next ``eval_action`` raise an
error naming the wrapper, rather than act on a stale return-to-go.

Task of each env: read from the vector env (Meta-World's env class of each env, as
``metaworld.evaluation`` reads it) or given as a list of harmodt task names, one per env.
Observations: Meta-World's one-hot task ID (``use_one_hot=True``) after the 39 state features is
recognized and dropped (the model knows each env's task from its prompt or task ID).

Scores: Meta-World's evaluation ends an episode at its first success (``terminate_on_success``)
and counts the first ``num_episodes`` episodes of each task; ``harmodt.evaluate`` runs every
episode for 500 steps and counts success at any step, so the success rates estimate the same
quantity. Goals differ in how they are drawn (Meta-World's 50 pre-sampled goals per task vs a
fresh goal per reset), both uniform over the task's goal space.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from .policy_inputs import EvalError, TaskInputs, task_inputs


def task_names_of(envs) -> list[str]:
    """The Meta-World task name (``reach-v3``) of every env of a vector env, read from its env
    classes as ``metaworld.evaluation`` does."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    by_class = {cls.__name__: name for name, cls in ALL_V3_ENVIRONMENTS.items()}
    names = list(envs.get_attr("task_name"))
    unknown = [n for n in names if n not in by_class]
    if unknown:
        raise EvalError(f"the vector env's envs {unknown} are not Meta-World v3 task envs; pass the task names instead")
    return [by_class[n] for n in names]


def _canonical_tasks(names) -> list[str]:
    from .tasks import canonical_name, is_task

    out = [canonical_name(str(n)) for n in names]
    bad = [n for n, c in zip(names, out) if not is_task(c)]
    if bad:
        raise EvalError(f"unknown task names {bad}: expected Meta-World v3 task names or "
                        "TASK@gN / TASK@testN, one per env")
    if not out:
        raise EvalError("no envs: give the vector env or one task name per env")
    return out


class HarmoDTAgent:
    """A harmodt policy over a vector env of ``len(task_names)`` envs, env i acting on
    ``task_names[i]``; see the module docstring. Build it with :meth:`from_checkpoint`, or from a
    loaded model as :func:`harmodt.evaluate.evaluate` takes it (same keyword arguments)."""

    def __init__(self, model, task_masks, eval_info: dict, task_names: list[str], *, seed: int = 12345,
                 backend: str = "reference", vote_threshold: int | None = None, precision: str = "fp32",
                 target_return: float | None = None, prompt_segment: str | None = None):
        self.task_names = _canonical_tasks(task_names)
        tasks = list(dict.fromkeys(self.task_names))  # the distinct tasks, in the order of their first env
        model.eval()
        self.model = model
        self.inputs: TaskInputs = task_inputs(model, task_masks, eval_info, tasks, seed, backend=backend,
                                              vote_threshold=vote_threshold, precision=precision,
                                              target_return=target_return, prompt_segment=prompt_segment)
        self.device = next(model.parameters()).device
        cfg = model.cfg
        self.k, self.state_dim, self.max_ep_len = cfg.context_len, cfg.state_dim, cfg.max_ep_len
        n = self.num_envs = len(self.task_names)
        rows = torch.tensor([tasks.index(t) for t in self.task_names])  # task index of every env (N,)
        self._ctx = self.inputs.ctx(rows)
        self._kv, self._pvalid = self.inputs.prompt(rows)
        self._ids = self.inputs.embed_ids[rows.to(self.device)]
        self._mean = torch.from_numpy(self.inputs.mean[rows.numpy()])  # (N, S)
        self._std = torch.from_numpy(self.inputs.std[rows.numpy()])
        # the last K steps of every env's episode, on the model's device; the newest step is last
        self._states = torch.zeros(n, self.k, cfg.state_dim, device=self.device)
        self._actions = torch.zeros(n, self.k, cfg.act_dim, device=self.device)
        self._rtg = torch.zeros(n, self.k, 1, device=self.device)
        self._steps = torch.zeros(n, self.k, dtype=torch.long, device=self.device)
        self._t = torch.zeros(n, dtype=torch.long, device=self.device)  # step of the episode
        self._n_real = np.zeros(n, np.int64)  # real (not padding) steps in the buffers, at most K
        self._rtg_now = torch.zeros(n)  # scaled return-to-go of the next step
        self._awaiting = np.zeros(n, bool)  # acted, and the step's rewards not yet fed
        self.reset(np.ones(n, bool))

    @classmethod
    def from_checkpoint(cls, path: str, envs, *, device: str | torch.device = "cpu", fused: bool = False,
                        backend: str = "auto", seed: int = 12345, vote_threshold: int | None = None,
                        precision: str = "fp32", target_return: float | None = None,
                        prompt_segment: str | None = None) -> "HarmoDTAgent":
        """The policy of a training checkpoint for ``envs``: a vector env (its envs' tasks are read
        from it) or a list of task names, one per env. ``fused``/``backend``: the masked linears'
        kernels as ``python -m harmodt.evaluate --fused --backend``; ``vote_threshold``: Eq. 13's
        threshold for unseen tasks (default: the training config's); ``seed``: the seed of
        ``harmodt.evaluate`` whose prompts to use (they depend on it only for unseen tasks and
        ``prompt_segment="random"``)."""
        import harmodt_kernels

        from .evaluate import load_checkpoint

        names = list(envs) if isinstance(envs, (list, tuple)) else task_names_of(envs)
        device = torch.device(device)
        try:
            backends = harmodt_kernels.select_backends(device, fused, backend)
        except (harmodt_kernels.BackendUnavailable, ValueError) as exc:
            raise EvalError(str(exc)) from None
        model, masks, info, cfg, _ = load_checkpoint(path, device)
        threshold = vote_threshold if vote_threshold is not None else cfg["masks"]["vote_threshold"]
        return cls(model, masks, info, names, seed=seed, backend=backends.masked_linear, vote_threshold=threshold,
                   precision=precision, target_return=target_return, prompt_segment=prompt_segment)

    @property
    def prompts(self) -> dict:
        """Which prompt episode and timesteps each task's prompt is (as harmodt.evaluate records)."""
        return dict(self.inputs.sources)

    def wrap(self, envs) -> "RewardFeed":
        """``envs`` wrapped so that each step's rewards reach this agent (see the module docstring)."""
        return RewardFeed(envs, self)

    def _states_of(self, observations) -> torch.Tensor:
        obs = np.asarray(observations, dtype=np.float32)
        if obs.ndim != 2 or obs.shape[0] != self.num_envs:
            raise EvalError(f"observations of shape {obs.shape}: the agent was built for {self.num_envs} envs, "
                            f"expected ({self.num_envs}, {self.state_dim}) or with a one-hot task ID after the state")
        extra = obs[:, self.state_dim :]
        if extra.shape[1] and not (np.isin(extra, (0.0, 1.0)).all() and (extra.sum(1) == 1).all()):
            raise EvalError(f"observations have {obs.shape[1]} features, the checkpoint's model reads {self.state_dim} "
                            "(Meta-World's state, optionally followed by a one-hot task ID); the features "
                            "after them are not a one-hot ID")
        if obs.shape[1] < self.state_dim:
            raise EvalError(f"observations have {obs.shape[1]} features, the checkpoint's model reads {self.state_dim}")
        return (torch.from_numpy(np.ascontiguousarray(obs[:, : self.state_dim])) - self._mean) / self._std  # (N, S)

    def eval_action(self, observations) -> np.ndarray:
        """The action of every env (N, A) float64 for its observation (N, S) and its episode so far."""
        if self._awaiting.any():
            raise RuntimeError("HarmoDTAgent: the rewards of the last step never reached the agent, so its "
                               "returns-to-go are unknown; step through agent.wrap(envs), e.g. "
                               "evaluation(agent, agent.wrap(envs), 50)")
        s_now = self._states_of(observations)
        # (N, S + 1): one transfer
        sent = torch.cat([s_now, self._rtg_now.unsqueeze(1)], dim=1).to(self.device, non_blocking=True)
        # drop the oldest step, make room for this one
        for buf in (self._states, self._actions, self._rtg, self._steps):
            buf.copy_(torch.roll(buf, -1, dims=1))
        self._states[:, -1], self._rtg[:, -1, 0] = sent[:, :-1], sent[:, -1]
        self._actions[:, -1] = 0.0
        self._steps[:, -1] = self._t.clamp(max=self.max_ep_len - 1)
        self._n_real = np.minimum(self._n_real + 1, self.k)
        length = int(self._n_real.max())
        history_valid = None  # every env has `length` real steps: no padding
        if (self._n_real != length).any():
            history_valid = torch.from_numpy(
                np.arange(length)[None, :] >= (length - self._n_real)[:, None]).to(self.device)
        with torch.inference_mode(), self.inputs.autocast():
            act = self.model.act(self._states[:, -length:], self._actions[:, -length:], self._rtg[:, -length:],
                                 self._steps[:, -length:], self._ids, self._ctx, self._kv, self._pvalid, history_valid)
        self._actions[:, -1] = act.float()
        self._t += 1
        self._awaiting[:] = True
        return act.float().cpu().numpy().astype(np.float64)  # one transfer back

    def observe_rewards(self, rewards) -> None:
        """Lower every env's return-to-go by its reward of the step just taken (RewardFeed calls this)."""
        rew = torch.from_numpy(np.asarray(rewards, dtype=np.float32).reshape(self.num_envs))
        self._rtg_now = self._rtg_now - rew / self.inputs.rtg_scale
        self._awaiting[:] = False

    def reset(self, env_mask) -> None:
        """Start a new episode in every env where ``env_mask`` (N,) is true."""
        mask = np.asarray(env_mask, dtype=bool).reshape(self.num_envs)
        if not mask.any():
            return
        m = torch.from_numpy(mask)
        md = m.to(self.device)
        for buf in (self._states, self._actions, self._rtg, self._steps, self._t):
            buf[md] = 0
        self._n_real[mask] = 0
        self._rtg_now[m] = self.inputs.target / self.inputs.rtg_scale
        self._awaiting[mask] = False


class RewardFeed(gym.vector.VectorWrapper):
    """A vector env whose ``step`` hands its rewards to a :class:`HarmoDTAgent` (for its
    returns-to-go) and whose ``reset`` starts new episodes in the agent; everything else,
    ``get_attr``/``set_attr``/``call`` included, goes to the wrapped env."""

    def __init__(self, env, agent: HarmoDTAgent):
        super().__init__(env)
        if env.num_envs != agent.num_envs:
            raise EvalError(f"the vector env has {env.num_envs} envs, the agent was built for {agent.num_envs}")
        self.agent = agent

    def reset(self, *, seed=None, options=None):
        out = self.env.reset(seed=seed, options=options)
        self.agent.reset(np.ones(self.agent.num_envs, bool))
        return out

    def step(self, actions):
        obs, rewards, terminations, truncations, infos = self.env.step(actions)
        self.agent.observe_rewards(rewards)
        return obs, rewards, terminations, truncations, infos

    def get_attr(self, name: str):
        return self.env.get_attr(name)

    def set_attr(self, name: str, values) -> None:
        self.env.set_attr(name, values)

    def call(self, name: str, *args, **kwargs):
        return self.env.call(name, *args, **kwargs)
