"""Training step invariants, mask update inside training, the fused and compiled paths against the
reference, checkpoints and resume (a run's outputs and flags: test_train_outputs.py)."""

import copy
import dataclasses
import os
import shutil
import signal

import pytest
import torch

from _synthetic import datasets
from _train import TASKS, tiny_cfg
from harmodt.config import ModelConfig
from harmodt.masks import TaskMasks
from harmodt.model import action_loss
from harmodt.train import Trainer, run
import harmodt_kernels


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


FUSED_BACKENDS = ["reference"] + [b for b in ("cpu", "triton") if b in harmodt_kernels.available_backends("cpu")]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_step_clips_like_clip_grad_norm(tmp_path, backend):
    """A training step (the clipping factor applied inside the masked optimizer step) moves every
    parameter as torch's clip_grad_norm_ followed by torch's AdamW step and restoring the weights
    outside the task's mask does, from the same gradients."""
    tr = Trainer(tiny_cfg(tmp_path, fused=True, backend=backend, grad_clip=1e-3), datasets(TASKS))  # small: clipping is active
    for _ in range(2):
        tr.train_step(tr.sample_tasks())
    batch = tr.batcher.sample([1], tr.cfg.batch_size)
    tr.batcher.sample = lambda ids, size: batch  # the same batch for both
    state = {k: v.clone() for k, v in tr.model.state_dict().items()}
    opt_state = copy.deepcopy(tr.opt.state_dict())
    rng = torch.get_rng_state()  # the same dropout draws (torch's RNG, or --fused's counter stream of this step)
    drop = tr.step_rule.counter_dropout()
    tr.train_step([1])
    got = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.model.load_state_dict(state)
    torch.set_rng_state(rng)
    loss = action_loss(tr.model(batch, tr.step_rule.context(batch["task_ids"], single_task=True, dropout=drop)), batch)
    loss.backward()
    assert torch.nn.utils.clip_grad_norm_(tr.params, tr.cfg.grad_clip) > 10 * tr.cfg.grad_clip
    ref = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in tr.opt.param_groups], lr=tr.cfg.lr,
                            foreach=False)
    ref.load_state_dict(opt_state)
    for g, g0 in zip(ref.param_groups, tr.opt.param_groups):
        g["lr"] = g0["lr"]
    ref.step()
    for n, p in tr.model.named_parameters():
        if n in tr.weights:
            keep = tr.task_masks.masks[n][1]
            assert torch.equal(got[n][~keep], state[n][~keep]), n
            torch.testing.assert_close(got[n][keep], p.detach()[keep], rtol=1e-5, atol=1e-7, msg=n)
        else:
            torch.testing.assert_close(got[n], p.detach(), rtol=1e-5, atol=1e-7, msg=n)


def test_bf16_steps_keep_masks_and_match_across_paths(tmp_path):
    """--precision bf16 (autocast): the masked layers compute in bf16, their gradients come back
    as masked fp32; weights outside the task's mask stay bit for bit; every backend gives the same
    losses to bf16 precision."""
    losses = {}
    for backend in ["reference", *[b for b in FUSED_BACKENDS if b == "cpu"]]:
        tr = Trainer(tiny_cfg(tmp_path, fused=True, backend=backend, precision="bf16"), datasets(TASKS))
        out = []
        for task in (0, 2, 1, 0):
            before = {n: w.detach().clone() for n, w in tr.weights.items()}
            out.append(float(tr.train_step([task])))
            for n, w in tr.weights.items():
                keep = tr.task_masks.masks[n][task]
                assert torch.equal(w.detach()[~keep], before[n][~keep]), n
                assert w.grad.dtype == torch.float32 and not w.grad[~keep].any(), n
        losses[backend] = out
    for backend, out in losses.items():
        torch.testing.assert_close(torch.tensor(out), torch.tensor(losses["reference"]), rtol=2e-2, atol=1e-3, msg=backend)


def test_masked_forward_equals_dense_model_with_masked_weights(tmp_path):
    tr = Trainer(tiny_cfg(tmp_path), datasets(TASKS))
    tr.model.eval()
    batch = tr.batcher.sample([1], 4)
    pred = tr.model(batch, tr.step_rule.context(batch["task_ids"], single_task=True))
    with torch.no_grad():
        for n, w in tr.weights.items():
            w.mul_(tr.task_masks.masks[n][1])
    torch.testing.assert_close(pred, tr.model(batch), rtol=1e-5, atol=1e-6)


def test_mixed_task_batch_matches_per_task_batches(tmp_path):
    tr = Trainer(tiny_cfg(tmp_path), datasets(TASKS))
    tr.model.eval()
    batch = tr.batcher.sample([0, 2], 6)
    mixed = tr.model(batch, tr.step_rule.context(batch["task_ids"]))
    for t in (0, 2):
        rows = batch["task_ids"] == t
        sub = {k: v[rows] for k, v in batch.items()}
        torch.testing.assert_close(mixed[rows], tr.model(sub, tr.step_rule.context(sub["task_ids"])), rtol=1e-5, atol=1e-6)


def test_mask_update_in_training_keeps_density(tmp_path):
    tr = Trainer(tiny_cfg(tmp_path), datasets(TASKS))
    d0 = [tr.task_masks.density(t) for t in range(3)]
    before = {n: m.clone() for n, m in tr.task_masks.masks.items()}
    tr.step = 6  # alpha_t > 0 away from t = 0
    info = tr.mask_updater()
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
    for n, m in TaskMasks.from_state(ck["masks"], TASKS).masks.items():
        assert torch.equal(m, tr.task_masks.masks[n])


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
    for n, m in a["masks"]["words"].items():
        assert torch.equal(m, b["masks"]["words"][n]), n


def test_a_checkpoint_with_byte_masks_resumes_as_the_packed_one(tmp_path, monkeypatch):
    """A checkpoint whose masks are stored as before packing ({task: {weight: bool [N, K]}}, one byte per
    weight) loads, and the run resumed from it ends bit for bit as the one resumed from the packed checkpoint."""
    from harmodt import checkpoint

    cfg = tiny_cfg(tmp_path, steps=12, out=str(tmp_path / "packed"))
    real_step = Trainer.train_step

    def interrupted_step(self, task_ids):  # Ctrl-C during step 7 (after the mask update at 5)
        if self.step == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, task_ids)

    monkeypatch.setattr(Trainer, "train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, datasets(TASKS))
    monkeypatch.setattr(Trainer, "train_step", real_step)
    shutil.copytree(tmp_path / "packed", tmp_path / "bytes")
    ck = checkpoint.load(tmp_path / "bytes" / "checkpoint.pt")
    masks = TaskMasks.from_state(ck["masks"]).masks
    ck["masks"] = {t: {n: m[i].clone() for n, m in masks.items()} for i, t in enumerate(TASKS)}  # the earlier layout
    checkpoint.save(ck, tmp_path / "bytes" / "checkpoint.pt")
    ends = {}
    for name in ("packed", "bytes"):
        run(dataclasses.replace(cfg, out=str(tmp_path / name), resume=True), datasets(TASKS))
        ends[name] = checkpoint.load(tmp_path / name / "checkpoint.pt")
    a, b = ends["packed"], ends["bytes"]
    assert a["step"] == b["step"] == 12 and a["masks"]["tasks"] == b["masks"]["tasks"]  # the resumed run writes packed masks
    for key in ("model", "optimizer", "rng", "masks"):
        assert same_bits(a[key], b[key]), key


def same_bits(a, b) -> bool:
    """Two checkpoint entries (nested dicts and lists of tensors and plain values) hold the same bits."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_bits(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("tasks_per_batch", [pytest.param(1, marks=pytest.mark.long), 2])
@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.long) if b == "triton" else b  # (the interpreter)
                                     for b in FUSED_BACKENDS if b != "reference"])
def test_fused_training_matches_reference_path(tmp_path, backend, tasks_per_batch):
    """--fused on a kernel backend (masked linear with its dropout epilogue, masked AdamW and
    harmony_select on its kernels) gives the reference path's losses and masks (both with
    counter-based dropout) over 20 steps with a mask update, and the same
    actions in evaluation's batched forward."""
    losses, masks, acts = {}, {}, {}
    for fused in (False, True):
        cfg = tiny_cfg(tmp_path, steps=20, fused=fused, backend=backend if fused else "auto", tasks_per_batch=tasks_per_batch,
                       dropout_rng="counter",  # the same dropout bits on both paths (the reference computes the counter stream too)
                       model=ModelConfig(n_layer=1, n_head=2, n_embd=16, context_len=4, prompt_len=2))  # small P: the interpreter is slow
        tr = Trainer(cfg, datasets(TASKS))
        assert tr.backends.masked_linear.backend.name == (backend if fused else "reference")
        out = []
        for step in range(20):
            if step == 10:
                tr.mask_updater()
            out.append(float(tr.train_step(tr.sample_tasks())))
        losses[fused] = out
        masks[fused] = tr.task_masks.masks
        tr.model.eval()
        batch = tr.batcher.sample([0, 1, 2], 6)
        kv, valid = tr.model.encode_prompt(batch, tr.step_rule.context(batch["task_ids"]))
        acts[fused] = tr.model.act(batch["states"], batch["actions"], batch["rtg"], batch["timesteps"], batch["task_ids"],
                                   tr.step_rule.context(batch["task_ids"]), kv, valid)
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-4, atol=1e-6)
    # The masks are a top-k selection on scores that the two paths compute to ~1e-6: equal unless two
    # scores at the cut are that close, which this seed's problem is not (checked with AVX-512 and
    # AVX2 kernels; CI's second pass keeps it so).
    for n in masks[False]:
        assert torch.equal(masks[True][n], masks[False][n]), n
    torch.testing.assert_close(acts[True], acts[False], rtol=1e-4, atol=1e-5)


@pytest.mark.long
def test_compile_gives_eager_losses(tmp_path):
    """--compile (torch.compile of the model) trains to the eager losses within fp32 tolerance."""
    losses = {}
    for compiled in (False, True):
        cfg = tiny_cfg(tmp_path, steps=6, compile=compiled, model=ModelConfig(n_layer=1, n_head=2, n_embd=16, context_len=4, prompt_len=2,
                                                                           dropout=0.0))
        tr = Trainer(cfg, datasets(TASKS))
        losses[compiled] = [float(tr.train_step([t])) for t in (0, 1, 2, 0, 1, 2)]
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-4, atol=1e-6)
