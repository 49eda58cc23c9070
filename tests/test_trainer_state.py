"""The trainer's own state (Trainer.state_dict / load_state) and the mask layouts TaskMasks hands
each kernel op (for_op, keep)."""

import copy

import pytest
import torch

from _synthetic import datasets
from harmodt.config import ModelConfig, TrainConfig, validate
from harmodt.masks import TaskMasks
from harmodt.run import rng
from harmodt.train import Trainer
import harmodt_kernels

TASKS = ["reach-v3", "push-v3", "door-open-v3"]


def tiny_trainer(tmp_path, **kw) -> Trainer:
    model = ModelConfig(n_layer=2, n_head=2, n_embd=32, context_len=5, prompt_len=2)
    cfg = TrainConfig(tasks=",".join(TASKS), method="harmodt-f", steps=12, batch_size=4, warmup_steps=2, lr=1e-3, eval_episodes=0,
                      out=str(tmp_path / "run"), progress=False, model=model, **kw)
    cfg.masks.eta_max = 20
    return Trainer(validate(cfg), datasets(TASKS))


def test_a_fresh_trainer_adopts_another_ones_state(tmp_path):
    """load_state(state_dict()) gives the same weights, masks, optimizer state and step: with the
    same RNG streams, the next steps of both trainers agree bit for bit."""
    tr = tiny_trainer(tmp_path)
    for _ in range(3):
        tr.train_step(tr.sample_tasks())
    tr.step = 6  # alpha_t > 0 away from t = 0
    tr.mask_updater()
    state, data, streams = copy.deepcopy(tr.state_dict()), tr.batcher.state_dict(), rng.capture(tr.device)
    losses = [tr.train_step(tr.sample_tasks()) for _ in range(2)]
    other = tiny_trainer(tmp_path)
    other.load_state(state)
    assert other.step == 6 and other.mask_updater.last_harmony == tr.mask_updater.last_harmony
    for n, m in TaskMasks.from_state(state["masks"]).masks.items():
        assert torch.equal(other.task_masks.masks[n], m), n
    other.batcher.load_state_dict(data)
    rng.restore(streams, other.device)
    for loss in losses:
        assert torch.equal(other.train_step(other.sample_tasks()), loss)
    for (n, a), b in zip(tr.model.state_dict().items(), other.model.state_dict().values()):
        assert torch.equal(a, b), n


OPS = [harmodt_kernels.backend_ops(b) for b in harmodt_kernels.available_backends("cpu")]


@pytest.mark.parametrize("ops", OPS, ids=[o.masked_linear.backend.name for o in OPS])
def test_each_op_gets_the_layout_it_takes(ops):
    g = torch.Generator().manual_seed(0)
    tm = TaskMasks.erk({"a": (7, 40), "b": (5, 13)}, 4, 0.3, g)
    for op in (ops.masked_linear, ops.masked_adamw):
        layers = tm.for_op(op)
        for n, m in tm.masks.items():
            got = layers[n] if layers[n].dtype == torch.bool else harmodt_kernels.unpack_masks(layers[n], m.shape[-1])
            assert (layers[n].dtype == torch.bool) == op.takes_bool_masks
            assert torch.equal(got, m)
        for ids in ([2], [0, 3]):
            keep = tm.keep(ids, op)
            for n, m in tm.masks.items():
                want = m[ids].any(0)
                got = keep[n] if keep[n].dtype == torch.bool else harmodt_kernels.unpack_masks(keep[n], m.shape[-1])
                assert (keep[n].dtype == torch.bool) == op.takes_bool_masks
                assert torch.equal(got, want)
