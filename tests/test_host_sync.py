"""A training step that does not log never makes the host wait for the device: no operator that
reads a tensor's value back to the host (``.item()``, ``float(t)``, ``.tolist()``: ATen's
``_local_scalar_dense``) and none whose output shape depends on tensor values (``nonzero``,
``masked_select``, ``unique``, ...). Counted on the CPU profile of whole steps (task draw included),
for the ``--fused`` cpu backend and the reference, one-task and mixed-task batches. That is what
lets a CUDA graph capture the step on a GPU."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import harmodt_kernels
from _synthetic import datasets
from harmodt.config import ModelConfig, TrainConfig, validate
from harmodt.train import Trainer

TASKS = ["reach-v3", "push-v3", "door-open-v3"]

# ATen operators that wait for the device's result on the host (a value read back, or an output
# size that depends on values).
SYNCING = frozenset(f"aten::{n}" for n in ("_local_scalar_dense", "item", "nonzero", "nonzero_static", "masked_select", "unique",
                                            "_unique", "_unique2", "unique_consecutive", "unique_dim", "bincount", "argwhere",
                                            "repeat_interleave_tensor", "_assert_async", "is_nonzero", "equal", "allclose"))


def trainer(tmp_path, fused: bool, tasks_per_batch: int, method: str = "harmodt-f") -> Trainer:
    model = ModelConfig(n_layer=2, n_head=2, n_embd=32, context_len=5, prompt_len=2, dropout=0.1)
    cfg = validate(TrainConfig(tasks=",".join(TASKS), method=method, steps=10, batch_size=4, tasks_per_batch=tasks_per_batch,
                               warmup_steps=2, lr=1e-3, eval_episodes=0, out=str(tmp_path / "run"), progress=False, model=model,
                               device="cpu", fused=fused, backend="cpu" if fused else "auto"))
    return Trainer(cfg, datasets(TASKS))


def syncing_ops(tr: Trainer, steps: int = 3) -> dict:
    """{operator: calls} of the syncing operators in ``steps`` whole training steps."""
    for _ in range(2):  # warm-up: optimizer state, lazily built tables
        tr.train_step(tr.sample_tasks())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            tr.train_step(tr.sample_tasks())
    found = {}
    for e in prof.events():
        if e.name in SYNCING:
            found[e.name] = found.get(e.name, 0) + 1
    return found


@pytest.mark.parametrize("tasks_per_batch", [1, 2], ids=["one-task", "mixed-task"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu", "reference"])
def test_training_step_has_no_host_sync(tmp_path, fused, tasks_per_batch):
    if fused and "cpu" not in harmodt_kernels.available_backends("cpu"):
        pytest.skip("the native CPU library is not built")
    tr = trainer(tmp_path, fused, tasks_per_batch)
    assert syncing_ops(tr) == {}


def test_the_count_sees_a_sync(tmp_path):
    """The profile does catch a host read inside the step (the count above can fail)."""
    tr = trainer(tmp_path, False, 1)
    step = tr.train_step
    tr.train_step = lambda ids: step(ids) + 0 * float(tr.opt.state[tr.params[0]]["step"])
    assert syncing_ops(tr).get("aten::_local_scalar_dense", 0) == 3
