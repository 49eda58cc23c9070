"""HarmoDTAgent: a checkpoint scored by Meta-World's own evaluation acts exactly as harmodt.evaluate."""

import math

import gymnasium as gym
import metaworld  # noqa: F401 - registers the Meta-World/* vector envs
import numpy as np
import pytest
import torch

from _synthetic import datasets
from harmodt import envs as harmodt_envs
from harmodt.agent import HarmoDTAgent
from harmodt.config import ModelConfig, TrainConfig, validate
from harmodt.evaluate import EvalError, evaluate
from harmodt.run import resume
from harmodt.train import Trainer

TASKS = ["reach-v3", "button-press-topdown-v3"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batch-of-a-few forwards run fastest on one thread (two spin against each other on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A harmodt-f checkpoint trained for a few steps on synthetic data of TASKS, and its trainer."""
    out = tmp_path_factory.mktemp("run")
    model = ModelConfig(n_layer=1, n_head=2, n_embd=32, context_len=4, prompt_len=3, dropout=0.0)
    cfg = validate(TrainConfig(tasks=",".join(TASKS), method="harmodt-f", steps=4, batch_size=4, eval_episodes=0, out=str(out),
                               progress=False, model=model))
    tr = Trainer(cfg, datasets(TASKS, length=80))
    for _ in range(3):
        tr.train_step(tr.sample_tasks())
    resume.save(tr, out / "checkpoint.pt")
    return tr, str(out / "checkpoint.pt")


class Recorder:
    """A vector env that records what harmodt.evaluate sees and sends: observations, rewards, actions."""

    def __init__(self, env):
        self.env, self.obs, self.rewards, self.actions = env, [], [], []

    def reset(self, seed=None):
        obs, info = self.env.reset(seed=seed)
        self.obs.append(obs)
        return obs, info

    def step(self, actions):
        self.actions.append(np.array(actions))
        obs, rew, term, trunc, info = self.env.step(actions)
        self.obs.append(obs)
        self.rewards.append(rew)
        return obs, rew, term, trunc, info

    def close(self):
        self.env.close()


def record_evaluate(monkeypatch, tr, tasks, steps, seed, **kw):
    made = []
    real = harmodt_envs.make_vector_env
    monkeypatch.setattr(harmodt_envs, "make_vector_env", lambda t, s: made.append(Recorder(real(t, s))) or made[-1])
    res = evaluate(tr.model, tr.task_masks, tr.eval_info(), tasks, 1, seed=seed, max_steps=steps, progress=False, sim_workers=1, **kw)
    monkeypatch.undo()
    assert len(made) == 1
    return res, made[0]


def test_agent_actions_equal_harmodt_evaluate_actions_step_by_step(trained, monkeypatch):
    """Fed the observations and rewards harmodt.evaluate's episodes saw, the agent returns the very
    actions evaluate's model took: same prompts (an unseen task's too), masks (the voted one),
    normalization, returns-to-go and K-step context; with Meta-World's one-hot task ID appended too."""
    tr, path = trained
    tasks = TASKS + ["button-press-v3"]  # the last one unseen: voted mask, expert-rollout prompt
    res, rec = record_evaluate(monkeypatch, tr, tasks, 9, seed=3, vote_threshold=1)
    for one_hot in (False, True):
        agent = HarmoDTAgent.from_checkpoint(path, tasks, seed=3, vote_threshold=1)
        assert agent.prompts == {t: res["tasks"][t]["prompt"] for t in tasks}
        agent.reset(np.ones(len(tasks), bool))
        for obs, rew, want in zip(rec.obs, rec.rewards, rec.actions):
            if one_hot:
                obs = np.concatenate([obs, np.eye(len(tasks))], axis=1)
            np.testing.assert_allclose(agent.eval_action(obs), want, rtol=0, atol=1e-6)
            agent.observe_rewards(rew)


def test_envs_at_different_steps_act_as_if_alone(trained):
    """One forward for envs whose episodes started at different steps (left-padded histories):
    each env gets the action a one-env agent with the same episode gives."""
    tr, _ = trained
    kw = dict(seed=1)
    both = HarmoDTAgent(tr.model, tr.task_masks, tr.eval_info(), TASKS, **kw)
    alone = [HarmoDTAgent(tr.model, tr.task_masks, tr.eval_info(), [t], **kw) for t in TASKS]
    rng = np.random.default_rng(0)
    for t in range(9):
        obs = rng.normal(size=(2, 39))
        rew = rng.uniform(0, 10, size=2)
        if t == 5:  # env 1 starts a new episode: its history is 1 step, env 0's is K
            both.reset(np.array([False, True]))
            alone[1].reset(np.array([True]))
        got = both.eval_action(obs)
        for i in range(2):
            np.testing.assert_allclose(got[i], alone[i].eval_action(obs[i : i + 1])[0], rtol=0, atol=1e-5)
            alone[i].observe_rewards(rew[i : i + 1])
        both.observe_rewards(rew)


def test_bad_observations_and_missing_rewards_are_named(trained):
    tr, _ = trained
    agent = HarmoDTAgent(tr.model, tr.task_masks, tr.eval_info(), TASKS, seed=1)
    obs = np.zeros((2, 39))
    with pytest.raises(EvalError, match=r"shape \(3, 39\).*built for 2 envs"):
        agent.eval_action(np.zeros((3, 39)))
    with pytest.raises(EvalError, match="have 41 features.*reads 39.*not a one-hot"):
        agent.eval_action(np.full((2, 41), 0.5))
    with pytest.raises(EvalError, match="have 30 features"):
        agent.eval_action(np.zeros((2, 30)))
    agent.eval_action(obs)
    with pytest.raises(RuntimeError, match=r"agent\.wrap\(envs\)"):  # stepped without the wrapper: no rewards came
        agent.eval_action(obs)
    agent.reset(np.array([True, True]))
    agent.eval_action(obs)  # a new episode needs no rewards of the last one
    with pytest.raises(EvalError, match="unknown task names"):
        HarmoDTAgent(tr.model, tr.task_masks, tr.eval_info(), ["reach-v3", "nope-v3"])


def test_metaworld_evaluation_agrees_with_harmodt_evaluate(trained):
    """Meta-World's own scorer over a custom MT vector env (one-hot IDs on, 2 envs per task) gives
    per-task success rates and returns within sampling error of harmodt.evaluate's."""
    from metaworld.evaluation import evaluation

    tr, path = trained
    n_mw, n_ours, horizon, per_task = 16, 8, 50, 2  # each env builds its own simulator (and Meta-World's 50-goal list): few envs
    envs = gym.make_vec("Meta-World/custom-mt-envs", vector_strategy="sync", envs_list=[t for t in TASKS for _ in range(per_task)],
                        seed=11, use_one_hot=True, max_episode_steps=horizon)
    try:
        agent = HarmoDTAgent.from_checkpoint(path, envs, seed=5)
        assert agent.task_names == [t for t in TASKS for _ in range(per_task)]
        mean_success, _, success, returns = evaluation(agent, agent.wrap(envs), n_mw)
    finally:
        envs.close()
    ours = evaluate(tr.model, tr.task_masks, tr.eval_info(), TASKS, n_ours, seed=5, max_steps=horizon, progress=False, sim_workers=1)
    assert set(success) == set(TASKS) and all(len(returns[t]) == n_mw for t in TASKS)
    assert mean_success == pytest.approx(np.mean([success[t] for t in TASKS]))
    for t in TASKS:
        p1, p2 = success[t], ours["tasks"][t]["success"]
        pooled = (p1 * n_mw + p2 * n_ours) / (n_mw + n_ours)
        bound = 4 * math.sqrt(max(pooled * (1 - pooled), 0.05) * (1 / n_mw + 1 / n_ours))  # two-proportion test, 4 sigma
        assert abs(p1 - p2) <= bound, (t, p1, p2)
        if p1 == p2 == 0:  # every episode ran all `horizon` steps in both: their mean returns estimate the same mean
            r = np.asarray(returns[t])
            se = r.std(ddof=1) * math.sqrt(1 / n_mw + 1 / n_ours) + 1e-3 * abs(r.mean())
            assert abs(r.mean() - ours["tasks"][t]["return"]) <= 4 * se, (t, r.mean(), ours["tasks"][t]["return"])
