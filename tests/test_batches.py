"""Prompt-DT batches: shapes, left padding, returns-to-go, normalization, length-weighted sampling,
and how prompts are cut from prompt episodes."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from _synthetic import datasets
from harmodt.data.batches import PromptDTBatcher, best_prompt_choice, prompt_segment, returns_to_go

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


# ---- prompts: the last K* steps (Prompt-DT's code), the first ones or a random window (--prompt-segment)

def _expected_window(tr, mean, std, k, scale, si):
    """A trajectory's prompt row starting at step ``si``: the steps [si, si + k) that exist, left-padded to k."""
    n = len(tr.rewards)
    end = min(n, si + k)
    pad = k - (end - si)
    states = np.zeros((k, tr.observations.shape[1]), np.float32)
    states[pad:] = (tr.observations[si:end] - mean) / std
    actions = np.zeros((k, tr.actions.shape[1]), np.float32)
    actions[pad:] = tr.actions[si:end]
    rtg = np.zeros(k, np.float32)
    rtg[pad:] = returns_to_go(tr.rewards)[si:end] / scale
    ts = np.zeros(k, np.int64)
    ts[pad:] = np.arange(si, end)
    return states, actions, rtg, ts, np.arange(k) >= pad


def _expected_last(tr, mean, std, k, scale):
    """A trajectory's prompt row as Prompt-DT's get_prompt cuts it: start si = max(0, n - k - 1)."""
    return _expected_window(tr, mean, std, k, scale, max(0, len(tr.rewards) - k - 1))


def _expected_first(tr, mean, std, k, scale):
    """A trajectory's first k steps as a prompt row (``--prompt-segment first``)."""
    return _expected_window(tr, mean, std, k, scale, 0)


@pytest.mark.parametrize("segment, expected", [("last", _expected_last), ("first", _expected_first)])
def test_prompts_are_the_segment_of_a_prompt_episode_of_the_row_task(segment, expected):
    """Each row's prompt is the ``segment`` window of one of its task's prompt episodes, drawn per row."""
    ds = datasets(TASKS, episodes=2, length=30)
    short = ds["b"].prompts[1]  # a prompt episode shorter than K*: taken whole, left-padded
    for key in ("observations", "actions", "rewards", "dones"):
        setattr(short, key, getattr(short, key)[:2])
    b = PromptDTBatcher(ds, TASKS, 6, 4, 100.0, seed=3, prompt_segment=segment)
    batch = b.sample([0, 1, 2], 300)
    drawn = {t: set() for t in TASKS}
    for i in range(300):
        t = TASKS[int(batch["task_ids"][i])]
        row = (batch["prompt_states"][i].numpy(), batch["prompt_actions"][i].numpy(), batch["prompt_rtg"][i, :, 0].numpy(),
               batch["prompt_timesteps"][i].numpy(), batch["prompt_mask"][i].numpy())
        matches = []
        for j, tr in enumerate(ds[t].prompts):
            exp = expected(tr, b.state_mean[t], b.state_std[t], 4, 100.0)
            if all(np.allclose(x, y, rtol=1e-5, atol=1e-6) if x.dtype.kind == "f" else np.array_equal(x, y) for x, y in zip(row, exp)):
                matches.append(j)
        assert matches, (i, t)
        drawn[t].add(matches[0])
    assert all(d == {0, 1} for d in drawn.values())  # every prompt episode of every task is drawn
    assert not batch["prompt_mask"].all()  # task b's short episode is padded


def test_random_prompt_segment_gives_the_earlier_batches_bit_for_bit():
    """``prompt_segment="random"`` draws exactly what the batcher drew before the option existed:
    tests/data/random_prompt_draw.npz holds batches and evaluation prompts of that earlier code for
    the same data and seeds."""
    saved = np.load(Path(__file__).parent / "data" / "random_prompt_draw.npz")
    ds = datasets(TASKS, episodes=3, length=30)
    b = PromptDTBatcher(ds, TASKS, 6, 3, 100.0, seed=5, prompt_segment="random")
    for i, (ids, n) in enumerate([([0], 4), ([1, 2], 5), ([2], 3)]):
        batch = b.sample(ids, n)
        assert {k.split("_", 1)[1] for k in saved.files if k.startswith(f"{i}_")} == set(batch)
        for k, v in batch.items():
            assert np.array_equal(v.numpy(), saved[f"{i}_{k}"]), (i, k)
    g = torch.Generator().manual_seed(11)
    for t in TASKS:
        seg, src = prompt_segment(ds[t].prompts, b.state_mean[t], b.state_std[t], 3, 100.0, 500, g, "random")
        for k, v in seg.items():
            assert np.array_equal(v.numpy(), saved[f"eval_{t}_{k}"]), (t, k)
        real = seg["prompt_mask"][0]
        assert src["timesteps"] == seg["prompt_timesteps"][0][real].tolist()


def test_evaluation_prompt_is_the_best_episode_last_steps_ties_to_the_lowest_index():
    ds = datasets(["a"], episodes=1, length=20)
    trajs = ds["a"].prompts + [copy.deepcopy(ds["a"].prompts[0])]  # episodes 0 and 2 have the same return
    trajs[1].rewards = trajs[1].rewards * 0.5
    trajs[0].rewards[-1] += 1.0
    trajs[2].rewards[-1] += 1.0  # 0 and 2 tie for the highest return
    assert best_prompt_choice(trajs) == 0
    b = PromptDTBatcher(ds, ["a"], 6, 3, 100.0)
    mean, std = b.state_mean["a"], b.state_std["a"]
    for seed in (0, 1):  # the seed plays no part
        seg, src = prompt_segment(trajs, mean, std, 3, 100.0, 500, torch.Generator().manual_seed(seed), "last")
        assert src == {"episode": 0, "timesteps": [16, 17, 18]}  # si = 20 - 3 - 1: the final step 19 is left out
        states, actions, rtg, ts, _ = _expected_last(trajs[0], mean, std, 3, 100.0)
        for x, y in zip((seg["prompt_states"][0], seg["prompt_actions"][0], seg["prompt_rtg"][0, :, 0], seg["prompt_timesteps"][0]),
                        (states, actions, rtg, ts)):
            np.testing.assert_allclose(x.numpy(), y, rtol=1e-5, atol=1e-6)
    trajs[1].rewards = trajs[1].rewards * 4  # now episode 1 has the highest return
    assert prompt_segment(trajs, mean, std, 3, 100.0, 500, torch.Generator(), "last")[1]["episode"] == 1


@pytest.mark.parametrize("n, steps", [(2, [0, 1]), (4, [0, 1, 2, 3]), (5, [0, 1, 2, 3]), (6, [1, 2, 3, 4]), (30, [25, 26, 27, 28])])
def test_last_prompt_window_is_the_reference_get_prompt_window(n, steps):
    """Prompt-DT's get_prompt: si = max(0, n - K* - 1), steps [si, si + K*) cut at the episode end;
    for K* = 4 an episode of n steps gives these timesteps (n <= K* + 1 starts at 0)."""
    rng = np.random.default_rng(n)
    from _synthetic import trajectory

    tr = trajectory(rng, n)
    mean, std = np.zeros(39, np.float32), np.ones(39, np.float32)
    seg, src = prompt_segment([tr], mean, std, 4, 1.0, 500, torch.Generator(), "last")
    assert src == {"episode": 0, "timesteps": steps}
    real = seg["prompt_mask"][0]
    assert seg["prompt_timesteps"][0][real].tolist() == steps and int(real.sum()) == len(steps)
    np.testing.assert_array_equal(seg["prompt_states"][0][real].numpy(), tr.observations[steps])


def test_unknown_prompt_segment_is_refused():
    with pytest.raises(ValueError, match="prompt_segment"):
        PromptDTBatcher(datasets(["a"]), ["a"], 6, 3, 100.0, prompt_segment="start")


def test_first_prompt_at_evaluation_is_the_best_episode_start():
    """``segment="first"`` at evaluation: the highest-return prompt episode's first K* steps, whatever the seed."""
    ds = datasets(["a"], episodes=2, length=30)
    b = PromptDTBatcher(ds, ["a"], 6, 4, 100.0)
    best = best_prompt_choice(ds["a"].prompts)
    for seed in (0, 1):
        seg, src = prompt_segment(ds["a"].prompts, b.state_mean["a"], b.state_std["a"], 4, 100.0, 500,
                                  torch.Generator().manual_seed(seed), "first")
        assert src == {"episode": best, "timesteps": [0, 1, 2, 3]}
        want = _expected_first(ds["a"].prompts[best], b.state_mean["a"], b.state_std["a"], 4, 100.0)
        np.testing.assert_allclose(seg["prompt_states"][0].numpy(), want[0], rtol=1e-5, atol=1e-6)


def _mixed_lengths():
    """Three tasks of trajectories and prompt episodes of mixed lengths, some shorter than a window."""
    from types import SimpleNamespace

    from _synthetic import trajectory

    rng = np.random.default_rng(7)
    lens = {"a": [30, 4, 17], "b": [9, 25], "c": [40, 3, 12, 6]}
    return {t: SimpleNamespace(name=t, trajectories=[trajectory(rng, n) for n in ls], prompts=[trajectory(rng, n) for n in (2, 14)])
            for t, ls in lens.items()}


CASES = [(4, "last", "per-task"), (3, "random", "pooled"), (0, "last", "per-task")]  # (K*, prompt segment, state norm)
DRAWS = [([0], 4), ([1, 2], 5), ([2, 0, 1], 7), ([1], 9)]


def test_batches_are_those_of_the_per_field_sampler_bit_for_bit():
    """The batcher draws exactly the batches of the earlier per-task, per-field sampler: tests/data/batch_draw.npz
    holds that sampler's batches for these data and seeds (padding, mixed tasks, both prompt cuts, no prompt)."""
    saved = np.load(Path(__file__).parent / "data" / "batch_draw.npz")
    for case, (kp, seg, norm) in enumerate(CASES):
        b = PromptDTBatcher(_mixed_lengths(), ["a", "b", "c"], 6, kp, 100.0, seed=5 + case, prompt_segment=seg, state_norm=norm)
        for i, (ids, n) in enumerate(DRAWS):
            batch = b.sample(ids, n)
            assert {k.split("_", 2)[2] for k in saved.files if k.startswith(f"{case}_{i}_")} == set(batch), (case, i)
            for k, v in batch.items():
                assert v.dtype == torch.from_numpy(saved[f"{case}_{i}_{k}"]).dtype and np.array_equal(v.numpy(), saved[f"{case}_{i}_{k}"]), (case, i, k)


def test_sample_into_writes_the_batch_sample_returns():
    """``sample_into`` (the graphed step's path into its static buffers) gives ``sample``'s batch from the
    same generator state, in the buffers it was handed."""
    a = PromptDTBatcher(_mixed_lengths(), ["a", "b", "c"], 6, 4, 100.0, seed=1)
    b = PromptDTBatcher(_mixed_lengths(), ["a", "b", "c"], 6, 4, 100.0, seed=1)
    out = b.empty_batch(5)
    for v in out.values():
        v.fill_(7)
    buffers = {k: v.data_ptr() for k, v in out.items()}
    for ids in ([2], [0, 1], [1, 2, 0]):
        want = a.sample(ids, 5)
        got = b.sample_into(ids, out)
        assert {k: v.data_ptr() for k, v in got.items()} == buffers
        assert all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(ValueError, match="empty_batch"):  # buffers of another layout
        b.sample_into([0], {k: v.clone() for k, v in out.items()})
