"""Batched evaluation: same results as one-episode-at-a-time, voted masks, checkpoint errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from _synthetic import datasets
from harmodt.config import ModelConfig, TrainConfig, validate
import harmodt_kernels
from harmodt.evaluate import EvalError, evaluate
from harmodt.run import resume
from harmodt.train import Trainer

TASKS = ["reach-v3", "drawer-close-v3"]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    model = ModelConfig(n_layer=1, n_head=2, n_embd=32, context_len=4, prompt_len=2, dropout=0.0)
    cfg = validate(TrainConfig(tasks=",".join(TASKS), method="harmodt-f", steps=4, batch_size=4, eval_episodes=0,
                               out=str(tmp_path_factory.mktemp("run")), progress=False, model=model))
    tr = Trainer(cfg, datasets(TASKS, length=80))
    for _ in range(3):
        tr.train_step(tr.sample_tasks())
    return tr


def test_batched_equals_sequential(trainer):
    info = trainer.eval_info()
    kw = dict(max_steps=25, progress=False)
    batched = evaluate(trainer.model, trainer.task_masks, info, TASKS, 2, seed=3, **kw)
    seq = evaluate(trainer.model, trainer.task_masks, info, TASKS, 2, seed=3, batch_size=1, **kw)
    assert batched["env_steps"] == seq["env_steps"] == 2 * 2 * 25
    for t in TASKS:
        assert batched["tasks"][t]["success"] == seq["tasks"][t]["success"]
        np.testing.assert_allclose(batched["tasks"][t]["return"], seq["tasks"][t]["return"], rtol=1e-4)


BACKENDS = [b for b in ("reference", "cpu", "triton") if b in harmodt_kernels.available_backends("cpu")]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])  # (the interpreter has no bf16)
def test_bf16_evaluation_runs_and_stays_close_to_fp32(trainer, backend):
    """``precision="bf16"`` (autocast): every episode runs, and returns stay near fp32's."""
    info = trainer.eval_info()
    kw = dict(max_steps=25, progress=False, backend=backend)
    fp32 = evaluate(trainer.model, trainer.task_masks, info, TASKS, 2, seed=3, **kw)
    bf16 = evaluate(trainer.model, trainer.task_masks, info, TASKS, 2, seed=3, precision="bf16", **kw)
    assert bf16["env_steps"] == fp32["env_steps"] == 2 * 2 * 25
    for t in TASKS:
        assert 0.0 <= bf16["tasks"][t]["success"] <= 1.0
        np.testing.assert_allclose(bf16["tasks"][t]["return"], fp32["tasks"][t]["return"], rtol=0.1, atol=1.0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_kernel_backends_give_the_reference_returns(trainer, backend):
    info = trainer.eval_info()
    a = evaluate(trainer.model, trainer.task_masks, info, TASKS, 1, seed=5, max_steps=15, progress=False)
    b = evaluate(trainer.model, trainer.task_masks, info, TASKS, 1, seed=5, max_steps=15, progress=False, backend=backend)
    assert a["backend"] == "reference" and b["backend"] == backend
    for t in TASKS:
        np.testing.assert_allclose(a["tasks"][t]["return"], b["tasks"][t]["return"], rtol=1e-4)


def test_unseen_task_uses_voted_mask(trainer):
    info = trainer.eval_info()
    res = evaluate(trainer.model, trainer.task_masks, info, ["reach-v3", "button-press-v3"], 1, seed=1, max_steps=10,
                   vote_threshold=1, progress=False)
    assert res["tasks"]["button-press-v3"]["mask"] == "voted" and res["tasks"]["reach-v3"]["mask"] == "trained"
    with pytest.raises(EvalError, match="vote-threshold"):
        evaluate(trainer.model, trainer.task_masks, info, ["button-press-v3"], 1, seed=1, max_steps=5, progress=False)


def test_a_vote_threshold_that_empties_the_voted_mask_is_refused(trainer):
    """No weight is kept by more than N of the N training tasks: one line naming the threshold, the
    number of training tasks and the density, before any episode runs."""
    n = len(TASKS)
    with pytest.raises(EvalError, match=rf"--vote-threshold {n}: with {n} training tasks the voted mask keeps 0.00% "):
        evaluate(trainer.model, trainer.task_masks, trainer.eval_info(), ["button-press-v3"], 1, seed=1, max_steps=5,
                 vote_threshold=n, progress=False)


def test_evaluate_cli_bad_checkpoint(tmp_path):
    bad = tmp_path / "ck.pt"
    bad.write_bytes(b"not a checkpoint")
    for path, needle in ((bad, "cannot read checkpoint"), (tmp_path / "missing.pt", "not found")):
        proc = subprocess.run([sys.executable, "-m", "harmodt.evaluate", str(path)], capture_output=True, text=True)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
    torch.save({"model": {}}, tmp_path / "other.pt")
    proc = subprocess.run([sys.executable, "-m", "harmodt.evaluate", str(tmp_path / "other.pt")], capture_output=True, text=True)
    assert proc.returncode == 2 and "not a harmodt training checkpoint" in proc.stderr
    import numpy as np_

    torch.save({"model": {}, "config": {}, "eval_info": {"state_mean": np_.zeros(3)}}, tmp_path / "old.pt")  # the older pickled format
    proc = subprocess.run([sys.executable, "-m", "harmodt.evaluate", str(tmp_path / "old.pt")], capture_output=True, text=True)
    assert proc.returncode == 2 and "harmodt.checkpoint convert" in proc.stderr and "Traceback" not in proc.stderr


def test_sharded_simulator_gives_the_same_results(trainer):
    """The simulator split over a worker process (ShardedVectorEnv) gives exactly the results of
    one in-process vector env: every env keeps its construction seed."""
    info = trainer.eval_info()
    kw = dict(max_steps=12, progress=False)
    one = evaluate(trainer.model, trainer.task_masks, info, TASKS, 3, seed=4, sim_workers=1, **kw)
    two = evaluate(trainer.model, trainer.task_masks, info, TASKS, 3, seed=4, sim_workers=2, **kw)
    assert one["tasks"] == two["tasks"]


def test_sharded_env_matches_vector_env_and_names_failures():
    from harmodt.envs import ShardedVectorEnv, make_vector_env

    tasks, seeds = ["reach-v3", "drawer-close-v3", "reach-v3"], [1, 2, 3]
    a, b = make_vector_env(tasks, seeds), ShardedVectorEnv(tasks, seeds, shards=2)
    try:
        np.testing.assert_array_equal(a.reset(seed=None)[0], b.reset()[0])
        rng = np.random.default_rng(0)
        for _ in range(5):
            act = rng.uniform(-1, 1, (3, 4))
            ra, rb = a.step(act), b.step(act)
            np.testing.assert_array_equal(ra[0], rb[0])
            np.testing.assert_array_equal(ra[1], rb[1])
            np.testing.assert_array_equal(np.asarray(ra[4]["success"], float), rb[4]["success"])
    finally:
        a.close()
        b.close()
    with pytest.raises(RuntimeError, match=r"(?s)envs \[1\].*unknown Meta-World v3 task 'nope-v3'"):
        ShardedVectorEnv(["reach-v3", "nope-v3"], [0, 1], shards=2)


def expert_guided(model, info, tasks, episodes, monkeypatch):
    """``model.act`` made to succeed: the scripted expert's action for the last (unnormalized) state
    plus a tenth of the model's own action, so both the simulator and the model decide each step."""
    from harmodt.envs import ScriptedExpert

    experts = [ScriptedExpert(t) for t in tasks]
    mean = torch.tensor(np.stack([np.asarray(info["state_mean"][t]) for t in tasks]))
    std = torch.tensor(np.stack([np.asarray(info["state_std"][t]) for t in tasks]))
    real = model.act

    def act(states, actions, rtg, timesteps, task_ids, ctx, *args, **kw):
        rows = ctx.task_ids  # each row's task (its mask row: the tasks are the training tasks, in order)
        obs = (states[:, -1] * std[rows] + mean[rows]).double().numpy()
        expert = np.stack([experts[i](o) for i, o in zip(rows.tolist(), obs)])
        return (torch.from_numpy(expert).float() + 0.1 * real(states, actions, rtg, timesteps, task_ids, ctx, *args, **kw)).clamp(-1, 1)

    monkeypatch.setattr(model, "act", act)


def test_stop_at_success_keeps_success_rates(trainer, monkeypatch):
    """``stop_at_success``: the same successes as full episodes on the same seeds, fewer simulated
    steps, and the episodes that never succeed (simulated to the end) get the returns of full
    episodes (up to the GEMMs' rounding: the policy computes the running rows alone). Two simulator
    shards: the envs of this process and of the worker both stop."""
    info = trainer.eval_info()
    expert_guided(trainer.model, info, TASKS, 3, monkeypatch)
    rows, guided = [], trainer.model.act  # the rows of every policy call
    monkeypatch.setattr(trainer.model, "act", lambda states, *a, **k: (rows.append(states.shape[0]), guided(states, *a, **k))[1])
    kw = dict(max_steps=60, progress=False, sim_workers=2)
    full = evaluate(trainer.model, trainer.task_masks, info, TASKS, 3, seed=2, **kw)
    assert set(rows) == {len(TASKS) * 3}
    rows.clear()
    stop = evaluate(trainer.model, trainer.task_masks, info, TASKS, 3, seed=2, stop_at_success=True, **kw)
    assert min(rows) < max(rows) == len(TASKS) * 3  # the finished episodes' rows leave the policy's batch
    assert not full["returns_truncated"] and stop["returns_truncated"]
    rates = [r["success"] for r in full["tasks"].values()]
    assert 0 < sum(rates) and min(rates) < 1  # some episodes succeed and stop early, some run to the end
    assert {t: r["success"] for t, r in stop["tasks"].items()} == {t: r["success"] for t, r in full["tasks"].items()}
    assert stop["env_steps"] < full["env_steps"] == 2 * 3 * 60
    for t, r in full["tasks"].items():
        if r["success"] == 0:
            assert stop["tasks"][t]["return"] == pytest.approx(r["return"], rel=1e-4)
        else:
            assert stop["tasks"][t]["return"] < r["return"]



def test_more_episodes_than_run_at_once_go_in_chunks_with_their_own_goals(trainer, monkeypatch):
    """Beyond ``MAX_EPISODES_AT_ONCE`` the episodes run in chunks of at most that many (the envs of
    one chunk are closed before the next is built), each episode with the seed it would have had
    all at once: the per-task results equal one all-at-once run's (up to the GEMMs' rounding)."""
    import harmodt.evaluate as ev

    info = trainer.eval_info()
    kw = dict(max_steps=20, progress=False)
    whole = evaluate(trainer.model, trainer.task_masks, info, TASKS, 3, seed=5, **kw)
    rows, real = [], trainer.model.act
    monkeypatch.setattr(trainer.model, "act", lambda states, *a, **k: (rows.append(states.shape[0]), real(states, *a, **k))[1])
    monkeypatch.setattr(ev, "MAX_EPISODES_AT_ONCE", 4)
    released, real_release = [], ev.return_freed_memory
    monkeypatch.setattr(ev, "return_freed_memory", lambda: released.append(len(rows)) or real_release())
    chunked = evaluate(trainer.model, trainer.task_masks, info, TASKS, 3, seed=5, **kw)
    assert sorted(set(rows)) == [2, 4] and len(rows) == 2 * 20  # chunks of 4, 2 (6 episodes)
    assert released == [20, 40]  # the freed simulators go back to the OS after each chunk
    assert chunked["env_steps"] == whole["env_steps"] == 2 * 3 * 20
    for t in TASKS:
        assert chunked["tasks"][t]["success"] == whole["tasks"][t]["success"]
        np.testing.assert_allclose(chunked["tasks"][t]["return"], whole["tasks"][t]["return"], rtol=1e-4)

# ---- prompts at evaluation, task-ID models, old checkpoints ------------------------------------

def captured_prompts(model, monkeypatch):
    """The prompt batches evaluation encodes (a wrapper around ``encode_prompt``)."""
    seen, real = [], model.encode_prompt
    monkeypatch.setattr(model, "encode_prompt", lambda prompt, ctx=None: (seen.append(prompt), real(prompt, ctx))[1])
    return seen


def reference_window(n: int, kp: int) -> list:
    """The timesteps Prompt-DT's get_prompt takes from an n-step episode: from max(0, n - K* - 1), K* steps at most."""
    si = max(0, n - kp - 1)
    return list(range(si, min(n, si + kp)))


def test_last_prompt_is_the_best_episode_last_steps_for_every_seed(trainer, monkeypatch):
    from harmodt.data.batches import best_prompt_choice, prompt_segment

    info = trainer.eval_info()
    assert info["prompt_segment"] == "last"
    seen = captured_prompts(trainer.model, monkeypatch)
    kp = trainer.cfg.model.prompt_len
    runs = [evaluate(trainer.model, trainer.task_masks, info, TASKS, 1, seed=s, max_steps=3, progress=False) for s in (3, 4)]
    for i, t in enumerate(TASKS):
        prompts = trainer.datasets[t].prompts
        best = best_prompt_choice(prompts)
        n = len(prompts[best].rewards)
        want = {"segment": "last", "episodes": "training prompts", "episode": best, "timesteps": reference_window(n, kp)}
        assert runs[0]["tasks"][t]["prompt"] == runs[1]["tasks"][t]["prompt"] == want
        expected, _ = prompt_segment(prompts, trainer.batcher.state_mean[t], trainer.batcher.state_std[t], kp, trainer.cfg.rtg_scale,
                                     trainer.cfg.model.max_ep_len, torch.Generator(), "last")
        for k, v in expected.items():
            assert torch.equal(seen[0][k][i], v[0]) and torch.equal(seen[1][k][i], v[0]), (t, k)
    rnd = evaluate(trainer.model, trainer.task_masks, info, TASKS, 1, seed=3, max_steps=3, progress=False, prompt_segment="random")
    for i, t in enumerate(TASKS):
        rec = rnd["tasks"][t]["prompt"]
        assert rec["segment"] == "random" and 0 <= rec["episode"] < len(trainer.datasets[t].prompts)
        assert rec["timesteps"] == seen[2]["prompt_timesteps"][i][seen[2]["prompt_mask"][i]].tolist()


def test_unseen_task_prompt_is_cut_the_same_way(trainer):
    from harmodt.data.batches import best_prompt_choice
    from harmodt.policy_inputs import expert_prompts

    res = evaluate(trainer.model, trainer.task_masks, trainer.eval_info(), ["button-press-v3"], 1, seed=1, max_steps=3,
                   vote_threshold=1, progress=False)
    rolled = expert_prompts("button-press-v3", 2, 1 + 7919)  # the pair evaluation rolls out for the first task at seed 1
    best = best_prompt_choice(rolled)
    n, kp = len(rolled[best].rewards), trainer.cfg.model.prompt_len
    assert res["tasks"]["button-press-v3"]["prompt"] == {"segment": "last", "episodes": "expert rollouts", "episode": best,
                                                         "timesteps": reference_window(n, kp)}


def tiny_trainer(tmp_path, **kw):
    model = ModelConfig(n_layer=1, n_head=2, n_embd=32, context_len=4, prompt_len=2, dropout=0.0)
    cfg = validate(TrainConfig(**{**dict(tasks=",".join(TASKS), method="mtdt", steps=4, batch_size=4, eval_episodes=0,
                                         out=str(tmp_path / "run"), progress=False, model=model), **kw}))
    tr = Trainer(cfg, datasets(TASKS, length=80))
    tr.train_step([0])
    return tr


def test_task_id_models_refuse_unseen_tasks(tmp_path):
    for conditioning in ("auto", "task-embedding"):
        tr = tiny_trainer(tmp_path, conditioning=conditioning)
        with pytest.raises(EvalError, match="cannot act on unseen tasks: button-press-v3"):
            evaluate(tr.model, None, tr.eval_info(), ["reach-v3", "button-press-v3"], 1, seed=1, max_steps=2, progress=False)
        res = evaluate(tr.model, None, tr.eval_info(), TASKS, 1, seed=1, max_steps=2, progress=False)
        assert "prompt" not in res["tasks"]["reach-v3"]


def test_checkpoint_from_before_the_new_options_evaluates_as_before(tmp_path):
    """An MTDT checkpoint written when "auto" meant the learned task embedding and prompts were
    random windows (no prompt_segment in its config and eval_info) loads as that model."""
    from harmodt import checkpoint
    from harmodt.evaluate import load_checkpoint

    tr = tiny_trainer(tmp_path, conditioning="task-embedding", prompt_segment="random")
    state = resume.state(tr)
    state["config"]["conditioning"] = "auto"
    del state["config"]["prompt_segment"], state["eval_info"]["prompt_segment"]
    checkpoint.save(state, tmp_path / "old.pt")
    model, masks, info, cfg, step = load_checkpoint(str(tmp_path / "old.pt"))
    assert model.conditioning == "task-embedding" and cfg["prompt_segment"] == "random" and masks is None
    kw = dict(max_steps=6, progress=False)
    assert evaluate(model, None, info, TASKS, 1, seed=2, **kw)["tasks"] == evaluate(tr.model, None, tr.eval_info(), TASKS, 1, seed=2,
                                                                                    **kw)["tasks"]


def test_evaluate_cli_records_each_task_prompt(trainer, tmp_path):
    from harmodt import checkpoint
    from harmodt.evaluate import main

    checkpoint.save(resume.state(trainer), tmp_path / "ck.pt")
    assert main([str(tmp_path / "ck.pt"), "--episodes", "1", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "e.json")]) == 0
    out = json.loads((tmp_path / "e.json").read_text())
    for t in TASKS:
        assert out["tasks"][t]["prompt"]["segment"] == "last" and len(out["tasks"][t]["prompt"]["timesteps"]) == 2
