"""Training step invariants, mask update inside training, checkpoints and resume."""

import copy
import dataclasses
import json
import os
import signal

import pytest
import torch

from _synthetic import datasets
from harmodt.config import ConfigError, ModelConfig, TrainConfig, parse_args, validate
from harmodt.train import Trainer, action_loss, run

TASKS = ["reach-v3", "push-v3", "door-open-v3"]


def tiny_cfg(tmp_path, **kw) -> TrainConfig:
    model = ModelConfig(n_layer=2, n_head=2, n_embd=32, context_len=5, prompt_len=2, dropout=0.1)
    base = dict(tasks=",".join(TASKS), method="harmodt-f", steps=12, batch_size=4, warmup_steps=2, lr=1e-3,
                eval_episodes=0, log_every=4, checkpoint_every=4, out=str(tmp_path / "run"), progress=False, model=model)
    base.update(kw)
    cfg = TrainConfig(**base)
    cfg.masks.update_every = 5
    cfg.masks.eta_max = 20
    return validate(cfg)


@pytest.mark.parametrize("tasks_per_batch", [1, 2])
def test_step_leaves_weights_outside_mask_unchanged(tmp_path, tasks_per_batch):
    tr = Trainer(tiny_cfg(tmp_path, tasks_per_batch=tasks_per_batch), datasets(TASKS))
    for _ in range(3):  # build up momentum on all tasks first
        tr.train_step(tr.sample_tasks())
    for task_ids in ([0], [2], [1, 2]) if tasks_per_batch == 2 else ([0], [2], [1]):
        before = {n: w.detach().clone() for n, w in tr.weights.items()}
        tr.train_step(task_ids)
        for n, w in tr.weights.items():
            keep = tr.task_masks.masks[n][task_ids].any(0)
            assert torch.equal(w.detach()[~keep], before[n][~keep]), n  # bit-for-bit
            assert not torch.equal(w.detach()[keep], before[n][keep]), n  # the step did move the task's weights


@pytest.mark.parametrize("fused", [False, True])
def test_step_clips_like_clip_grad_norm(tmp_path, fused):
    """A training step (clipping from the squared norms the masked backward recorded, applied
    inside the optimizer step) moves every parameter as torch's clip_grad_norm_ followed by the
    masked step does, from the same gradients."""
    tr = Trainer(tiny_cfg(tmp_path, fused=fused, grad_clip=1e-3), datasets(TASKS))  # small: clipping is active
    for _ in range(2):
        tr.train_step(tr.sample_tasks())
    batch = tr.batcher.sample([1], tr.cfg.batch_size)
    tr.batcher.sample = lambda ids, size: batch  # the same batch for both
    state = {k: v.clone() for k, v in tr.model.state_dict().items()}
    opt_state = copy.deepcopy(tr.opt.state_dict())
    rng = torch.get_rng_state()  # the same dropout draws
    tr.train_step([1])
    got = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    norms = tr.model.grad_sq_norms.by_param()
    assert len(norms) == len(tr.weights)
    for w in tr.weights.values():
        assert norms[w] == pytest.approx(float(w.grad.double().square().sum()), rel=1e-6)  # from the masked backward
    tr.model.load_state_dict(state)
    tr.opt.load_state_dict(opt_state)
    tr.sched.last_epoch -= 1
    tr.step -= 1
    torch.set_rng_state(rng)
    loss = action_loss(tr.model(batch, tr.context(batch["task_ids"])), batch)
    tr.opt.zero_grad(set_to_none=True)
    loss.backward()
    assert torch.nn.utils.clip_grad_norm_(tr.params, tr.cfg.grad_clip) > 10 * tr.cfg.grad_clip
    packed = tr.task_masks.packed()
    tr.opt.masked_step({w: packed[n][1] for n, w in tr.weights.items()})
    for n, p in tr.model.named_parameters():
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-6, atol=1e-9, msg=n)


def test_bf16_steps_keep_masks_and_match_across_paths(tmp_path):
    """--precision bf16 (CPU autocast): W * M is written in bf16 (by the fused block nodes with
    --fused) and its gradient comes back as masked fp32; weights outside the task's mask stay bit for bit; --fused (packed masks, native)
    and the plain path (bool masks, torch.where) give the same losses to bf16 precision."""
    losses = {}
    for fused in (False, True):
        tr = Trainer(tiny_cfg(tmp_path, fused=fused, precision="bf16"), datasets(TASKS))
        out = []
        for task in (0, 2, 1, 0):
            before = {n: w.detach().clone() for n, w in tr.weights.items()}
            out.append(tr.train_step([task]))
            for n, w in tr.weights.items():
                keep = tr.task_masks.masks[n][task]
                assert torch.equal(w.detach()[~keep], before[n][~keep]), n
                assert w.grad.dtype == torch.float32 and not w.grad[~keep].any(), n
        if fused:  # the block nodes expand W * M to bf16 and mask the gradients themselves (no W * M buffers)
            assert all(m._w_eff is None for m in tr.model._masked_linears)
            assert torch.isfinite(tr.model.grad_sq_norms.values).all()
        else:
            assert {m._w_eff.dtype for m in tr.model._masked_linears} == {torch.bfloat16}
        losses[fused] = out
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=2e-2, atol=1e-3)


def test_masked_forward_equals_dense_model_with_masked_weights(tmp_path):
    tr = Trainer(tiny_cfg(tmp_path), datasets(TASKS))
    tr.model.eval()
    batch = tr.batcher.sample([1], 4)
    pred = tr.model(batch, tr.context(batch["task_ids"]))
    with torch.no_grad():
        for n, w in tr.weights.items():
            w.mul_(tr.task_masks.masks[n][1])
    torch.testing.assert_close(pred, tr.model(batch), rtol=1e-5, atol=1e-6)


def test_mixed_task_batch_matches_per_task_batches(tmp_path):
    tr = Trainer(tiny_cfg(tmp_path), datasets(TASKS))
    tr.model.eval()
    batch = tr.batcher.sample([0, 2], 6)
    mixed = tr.model(batch, tr.context(batch["task_ids"]))
    for t in (0, 2):
        rows = batch["task_ids"] == t
        sub = {k: v[rows] for k, v in batch.items()}
        torch.testing.assert_close(mixed[rows], tr.model(sub, tr.context(sub["task_ids"])), rtol=1e-5, atol=1e-6)


def test_mask_update_in_training_keeps_density(tmp_path):
    tr = Trainer(tiny_cfg(tmp_path), datasets(TASKS))
    d0 = [tr.task_masks.density(t) for t in range(3)]
    before = {n: m.clone() for n, m in tr.task_masks.masks.items()}
    tr.step = 6  # alpha_t > 0 away from t = 0
    info = tr.mask_update()
    assert [tr.task_masks.density(t) for t in range(3)] == d0
    assert info["alpha"] > 0 and all(c == info["alpha"] for c in info["masked_per_task"])
    assert any(not torch.equal(before[n], tr.task_masks.masks[n]) for n in before)
    assert -1 <= info["harmony_score"] <= 1
    active = [sum(int(m[t].sum()) for m in tr.task_masks.masks.values()) for t in range(3)]
    assert info["mask_changed_fraction"] == pytest.approx([c / a for c, a in zip(info["masked_per_task"], active)])


def test_harmodt_r_masks_stay_frozen(tmp_path):
    cfg = tiny_cfg(tmp_path, method="harmodt-r")
    run(cfg, datasets(TASKS))
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    tr = Trainer(cfg, datasets(TASKS))  # same seed -> same initial ERK masks
    for i, t in enumerate(TASKS):
        for n, m in ck["masks"][t].items():
            assert torch.equal(m, tr.task_masks.masks[n][i])


@pytest.mark.parametrize("method", ["mtdt", "prompt-dt", "harmodt-r", "harmodt-m", "harmodt-f"])
def test_every_method_trains_and_writes_outputs(tmp_path, method):
    cfg = tiny_cfg(tmp_path, method=method, steps=6)
    res = run(cfg, datasets(TASKS))
    out = tmp_path / "run"
    assert res["steps"] == 6 and res["method"] == method
    assert json.loads((out / "config.json").read_text())["method"] == method
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r and "steps_per_s" in r for r in recs)
    assert any("harmony_score" in r for r in recs)  # logged at the mask update (step 5)
    assert (out / "curves.png").stat().st_size > 1000 and any((out / "tb").iterdir())
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert {"model", "masks", "optimizer", "step", "config", "rng"} <= set(ck)
    if method.startswith("harmodt"):
        assert set(ck["masks"]) == set(TASKS)
        assert all(m.dtype == torch.bool for m in ck["masks"][TASKS[0]].values())
    else:
        assert ck["masks"] is None


def test_resume_gives_same_result_as_uninterrupted(tmp_path, monkeypatch):
    full = tiny_cfg(tmp_path, steps=12, out=str(tmp_path / "full"))
    run(full, datasets(TASKS))
    half = dataclasses.replace(full, out=str(tmp_path / "half"))
    real_step = Trainer.train_step

    def interrupted_step(self, task_ids):  # Ctrl-C during step 7: the run saves after it and stops
        if self.step == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, task_ids)

    monkeypatch.setattr(Trainer, "train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        run(half, datasets(TASKS))
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert torch.load(tmp_path / "half" / "checkpoint.pt", weights_only=False)["step"] == 7
    rest = dataclasses.replace(full, out=str(tmp_path / "half"), resume=True)
    run(rest, datasets(TASKS))
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "half" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for t in TASKS:
        for n in a["masks"][t]:
            assert torch.equal(a["masks"][t][n], b["masks"][t][n])


def test_existing_run_needs_resume(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=4)
    run(cfg, datasets(TASKS))
    with pytest.raises(ConfigError, match="--resume"):
        run(cfg, datasets(TASKS))


@pytest.mark.parametrize("argv,msg", [
    (["--method", "foo"], "--method"),
    (["--tasks", "reach-v3,nope"], "nope"),
    (["--sparsity", "1.5"], "--sparsity"),
    (["--tasks-per-batch", "9", "--batch-size", "4"], "--tasks-per-batch"),
])
def test_bad_flags_are_one_clear_line(argv, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_args(argv)


def test_no_arguments_selects_embedded_default_and_preset_paper():
    cfg = parse_args([])
    assert cfg.steps == 5000 and cfg.model.n_layer == 3 and cfg.method == "harmodt-f"
    cfg = parse_args(["--preset", "paper-mt50"])
    assert cfg.tasks == "MT50" and cfg.model.n_layer == 6 and cfg.masks.sparsity == 0.2 and cfg.masks.update_every == 5000
    cfg = parse_args(["--preset", "paper-mt50", "--sparsity", "0.3", "--n-layer", "4"])
    assert cfg.masks.sparsity == 0.3 and cfg.model.n_layer == 4


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fused_training_matches_reference_path(tmp_path, backend):
    """--fused (kernels.masked_linear + kernels.harmony_select) gives the same losses and masks."""
    losses, masks = {}, {}
    for fused in (False, True):
        cfg = tiny_cfg(tmp_path, steps=8, fused=fused, backend=backend if fused else "auto", tasks_per_batch=2,
                       model=ModelConfig(n_layer=1, n_head=2, n_embd=16, context_len=4, prompt_len=2))  # small P: the interpreter is slow
        tr = Trainer(cfg, datasets(TASKS))
        out = []
        for step in range(8):
            if step == 4:
                tr.mask_update()
            out.append(tr.train_step(tr.sample_tasks()))
        losses[fused] = out
        masks[fused] = tr.task_masks.masks
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-4, atol=1e-6)
    for n in masks[False]:
        assert torch.equal(masks[True][n], masks[False][n]), n
