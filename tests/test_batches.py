"""Prompt-DT batches: shapes, left padding, returns-to-go, normalization, length-weighted sampling."""

import numpy as np
import torch

from _synthetic import datasets
from harmodt.data.batches import PromptDTBatcher, returns_to_go

TASKS = ["a", "b", "c"]


def test_shapes_and_dtypes():
    b = PromptDTBatcher(datasets(TASKS), TASKS, 20, 5, 1000.0, seed=0)
    batch = b.sample([1], 8)
    assert batch["states"].shape == (8, 20, 39) and batch["actions"].shape == (8, 20, 4)
    assert batch["rtg"].shape == (8, 20, 1) and batch["timesteps"].shape == (8, 20) and batch["mask"].shape == (8, 20)
    assert batch["prompt_states"].shape == (8, 5, 39) and batch["prompt_mask"].shape == (8, 5)
    assert batch["timesteps"].dtype == torch.int64 and batch["mask"].dtype == torch.bool
    assert (batch["task_ids"] == 1).all()
    mixed = b.sample([0, 2], 7)
    assert mixed["task_ids"].tolist() == [0, 0, 0, 0, 2, 2, 2]


def test_left_padding_and_values_match_the_trajectory():
    ds = datasets(["a"], episodes=1, length=30)
    b = PromptDTBatcher(ds, ["a"], 10, 2, 10.0, seed=0)
    tr = ds["a"].trajectories[0]
    mean, std = b.state_mean["a"], b.state_std["a"]
    rtg = returns_to_go(tr.rewards)
    batch = b.sample([0], 256)
    for i in range(256):
        m = batch["mask"][i]
        n = int(m.sum())
        assert m[: 10 - n].logical_not().all() and m[10 - n :].all()  # padding on the left only
        ts = batch["timesteps"][i, 10 - n :].numpy()
        assert (np.diff(ts) == 1).all()
        np.testing.assert_allclose(batch["states"][i, 10 - n :].numpy(), (tr.observations[ts] - mean) / std, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(batch["actions"][i, 10 - n :].numpy(), tr.actions[ts])
        np.testing.assert_allclose(batch["rtg"][i, 10 - n :, 0].numpy(), rtg[ts] / 10.0, rtol=1e-5)
        assert (batch["states"][i, : 10 - n] == 0).all() and (batch["actions"][i, : 10 - n] == 0).all()
    assert (batch["mask"].sum(1) < 10).any()  # windows near the end are padded


def test_returns_to_go():
    np.testing.assert_allclose(returns_to_go(np.array([1.0, 2.0, 3.0], dtype=np.float32)), [6.0, 5.0, 3.0])


def test_sampling_weighted_by_length_and_deterministic():
    from types import SimpleNamespace

    from _synthetic import trajectory

    rng = np.random.default_rng(0)
    td = SimpleNamespace(trajectories=[trajectory(rng, 10), trajectory(rng, 90)], prompts=[trajectory(rng, 10)])
    b = PromptDTBatcher({"a": td}, ["a"], 1, 1, 1.0, seed=0)
    batch = b.sample([0], 8000)
    # length-weighted: P(long) = 0.9, and a start step >= 10 exists only there: 0.9 * 80/90 = 0.8
    # (uniform over trajectories would give 0.5 * 80/90 = 0.44)
    frac = (batch["timesteps"][:, 0] >= 10).float().mean().item()
    assert 0.77 < frac < 0.83
    b2 = PromptDTBatcher({"a": td}, ["a"], 1, 1, 1.0, seed=0)
    assert torch.equal(b2.sample([0], 8000)["timesteps"], batch["timesteps"])
