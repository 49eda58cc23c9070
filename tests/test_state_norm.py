"""--state-norm: per-task statistics (the default, HarmoDT's code) or one mean and std pooled over
every task's states (Prompt-DT's code), carried by the checkpoint into evaluation."""

import numpy as np
import pytest
import torch

from _synthetic import datasets
from harmodt import train
from harmodt.config import ConfigError, ModelConfig, TrainConfig, validate
from harmodt.data.batches import PromptDTBatcher, state_stats
from harmodt.evaluate import load_checkpoint
from harmodt.policy_inputs import task_inputs

TASKS = ["reach-v3", "push-v3", "door-open-v3"]


def shifted(tasks):
    """Synthetic data whose tasks' states differ in mean and scale, so pooled != per task."""
    ds = datasets(tasks, episodes=2, length=40)
    for i, name in enumerate(tasks):
        for tr in ds[name].trajectories + ds[name].prompts:
            tr.observations = (tr.observations * (1 + i) + 3 * i).astype(np.float32)
    return ds


def test_per_task_and_pooled_statistics():
    ds = shifted(TASKS)
    per_mean, per_std = state_stats(ds, TASKS, "per-task")
    pooled_mean, pooled_std = state_stats(ds, TASKS, "pooled")
    every = np.concatenate([t.observations for n in TASKS for t in ds[n].trajectories])
    for name in TASKS:
        own = np.concatenate([t.observations for t in ds[name].trajectories])
        np.testing.assert_array_equal(per_mean[name], own.mean(0).astype(np.float32))
        np.testing.assert_array_equal(per_std[name], (own.std(0) + 1e-6).astype(np.float32))
        np.testing.assert_array_equal(pooled_mean[name], every.mean(0).astype(np.float32))
        np.testing.assert_array_equal(pooled_std[name], (every.std(0) + 1e-6).astype(np.float32))
    assert not np.allclose(per_mean[TASKS[0]], pooled_mean[TASKS[0]])
    with pytest.raises(ValueError, match="state_norm"):
        state_stats(ds, TASKS, "global")


def test_batches_use_the_pooled_statistics():
    ds = shifted(TASKS)
    per = PromptDTBatcher(ds, TASKS, 5, 2, 100.0, seed=0)
    pooled = PromptDTBatcher(ds, TASKS, 5, 2, 100.0, seed=0, state_norm="pooled")
    a, b = per.sample([2], 16), pooled.sample([2], 16)  # same seed: the same windows
    mean_p, std_p = per.state_mean[TASKS[2]], per.state_std[TASKS[2]]
    mean_q, std_q = pooled.state_mean[TASKS[2]], pooled.state_std[TASKS[2]]
    raw = a["states"] * torch.from_numpy(std_p) + torch.from_numpy(mean_p)  # undo the per-task normalization
    want = ((raw - torch.from_numpy(mean_q)) / torch.from_numpy(std_q)) * a["mask"].unsqueeze(-1)
    torch.testing.assert_close(b["states"], want, rtol=1e-4, atol=1e-4)


def test_the_checkpoint_carries_the_pooled_statistics_into_evaluation(tmp_path):
    ds = shifted(TASKS)
    cfg = validate(TrainConfig(tasks=",".join(TASKS), method="prompt-dt", steps=4, batch_size=3, warmup_steps=1, eval_episodes=0,
                               log_every=2, checkpoint_every=2, out=str(tmp_path / "run"), progress=False, state_norm="pooled",
                               model=ModelConfig(n_layer=1, n_head=2, n_embd=16, context_len=4, prompt_len=2)))
    train.run(cfg, ds)
    model, masks, info, saved, _ = load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    assert saved["state_norm"] == "pooled" and info["state_norm"] == "pooled"
    mean, std = state_stats(ds, TASKS, "pooled")
    inputs = task_inputs(model, masks, info, TASKS, seed=0)
    for i, name in enumerate(TASKS):
        np.testing.assert_array_equal(inputs.mean[i], mean[name])
        np.testing.assert_array_equal(inputs.std[i], std[name])


def test_a_bad_value_is_a_config_error():
    with pytest.raises(ConfigError, match="--state-norm"):
        validate(TrainConfig(state_norm="global"))
