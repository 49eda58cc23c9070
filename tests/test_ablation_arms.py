"""The arms that separate task identity from harmony: a shared mask (HarmoDT-S, sparsity without
identity), Prompt-DT with the one-hot task ID (``--conditioning prompt-task-state``, identity without
masks), and the masks' movement every run reports against the bound of its Eq. 12 schedule."""

import json

import pytest
import torch

from _synthetic import datasets
from harmodt.config import ConfigError, MaskConfig, TrainConfig
from harmodt.masks import alpha_schedule, alpha_total
from harmodt.train import Trainer, run
from test_methods import TASKS
from test_methods import tiny_cfg as methods_cfg


def tiny_cfg(tmp_path, **kw) -> TrainConfig:
    return methods_cfg(tmp_path, **{"steps": 8, "batch_size": 6, "checkpoint_every": 4, **kw})


def test_shared_mask_is_one_erk_draw_for_every_task(tmp_path):
    shared = Trainer(tiny_cfg(tmp_path, method="harmodt-s"), datasets(TASKS)).task_masks
    per_task = Trainer(tiny_cfg(tmp_path, method="harmodt-r"), datasets(TASKS)).task_masks
    for name, m in shared.masks.items():
        assert m.shape[0] == len(TASKS) and all(torch.equal(m[0], m[i]) for i in range(1, len(TASKS)))
        assert m[0].sum() == per_task.masks[name][0].sum()  # the same ERK density per layer as HarmoDT-R
    assert not all(torch.equal(m[0], m[1]) for m in per_task.masks.values())  # (the control: R's tasks differ)
    assert shared.density() == pytest.approx(per_task.density())


def test_shared_mask_trains_and_never_moves(tmp_path):
    res = run(tiny_cfg(tmp_path, method="harmodt-s", masks=MaskConfig(update_every=3)), datasets(TASKS))
    move = json.loads((tmp_path / "run" / "results.json").read_text())["mask_movement"]
    assert move == res["mask_movement"] and move["flips_bound"] == 0
    assert set(move["changed_fraction"]) == set(TASKS) and move["changed_fraction_max"] == 0.0


def test_prompt_task_state_reads_prompt_and_task_id(tmp_path):
    cfg = tiny_cfg(tmp_path, method="prompt-dt", conditioning="prompt-task-state")
    tr = Trainer(cfg, datasets(TASKS))
    model = tr.model
    assert model.use_prompt and model.reads_task_id and tr.task_masks is None
    assert model.embed.state.in_features == 39 + len(TASKS)  # the one-hot beside every history state
    batch = tr.batcher.sample([0], 4)
    assert "prompt_states" in batch
    model.eval()
    with torch.no_grad():
        a = model(batch)
        b = model({**batch, "task_ids": torch.full_like(batch["task_ids"], 1)})
    assert not torch.equal(a, b)  # the task ID reaches the actions
    plain = Trainer(tiny_cfg(tmp_path, method="prompt-dt"), datasets(TASKS))
    assert not plain.model.reads_task_id
    for k, v in plain.batcher.sample([0], 4).items():  # the same data stream as Prompt-DT's
        assert torch.equal(v, batch[k]), k


def test_prompt_task_state_refuses_unseen_tasks(tmp_path):
    from harmodt.evaluate import load_checkpoint
    from harmodt.policy_inputs import EvalError, task_inputs

    cfg = tiny_cfg(tmp_path, method="prompt-dt", conditioning="prompt-task-state", steps=2, checkpoint_every=2)
    run(cfg, datasets(TASKS))
    model, masks, info, *_ = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(EvalError, match="task ID"):
        task_inputs(model, masks, info, ["window-open-v3"], seed=0)


def test_alpha_total_sums_eq12_over_the_updates():
    assert alpha_total(10_000, 500, 1, 100) == sum(alpha_schedule(t, 10_000, 1, 100) for t in range(500, 10_000, 500))
    assert alpha_total(100, 500, 1, 100) == 0  # no update before the end
    assert alpha_total(1_000_000, 5000, 1, 100) == pytest.approx(10_100, abs=100)  # the paper's schedule


def test_learned_masks_move_within_their_bound(tmp_path):
    cfg = tiny_cfg(tmp_path, method="harmodt-f", steps=9, masks=MaskConfig(update_every=3, eta_max=40, eta_min=5))
    res = run(cfg, datasets(TASKS))
    move = res["mask_movement"]
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    alphas = [r["alpha"] for r in recs if "alpha" in r]
    assert len(alphas) == 2 and move["flips_bound"] == sum(alphas) == alpha_total(9, 3, 5, 40)
    last = [r for r in recs if "mask_changed_fraction" in r][-1]["mask_changed_fraction"]
    assert [move["changed_fraction"][t] for t in TASKS] == pytest.approx(last)
    assert 0 < move["changed_fraction_mean"]
    for t in TASKS:
        assert move["changed_fraction"][t] <= move["flips_bound_fraction"][t] + 1e-12


def test_movement_bound_is_capped_by_the_initially_masked_weights(tmp_path):
    cfg = tiny_cfg(tmp_path, method="harmodt-f", steps=9, masks=MaskConfig(update_every=3, eta_max=10**6, eta_min=10**6))
    res = run(cfg, datasets(TASKS))
    move, s = res["mask_movement"], cfg.masks.sparsity
    for t in TASKS:  # ERK draws exactly round(density * numel) per layer: the cap is S / (1 - S) up to that rounding
        assert move["flips_bound_fraction"][t] == pytest.approx(s / (1 - s), rel=0.02)
        assert move["changed_fraction"][t] <= move["flips_bound_fraction"][t] + 1e-12


def test_unknown_conditioning_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="conditioning"):
        tiny_cfg(tmp_path, method="prompt-dt", conditioning="prompt-and-id")
