"""Batched evaluation: same results as one-episode-at-a-time, voted masks, checkpoint errors."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from _synthetic import datasets
from harmodt.config import ModelConfig, TrainConfig, validate
from harmodt.evaluate import EvalError, evaluate
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


def test_fused_reference_backend_gives_same_returns(trainer):
    info = trainer.eval_info()
    a = evaluate(trainer.model, trainer.task_masks, info, TASKS, 1, seed=5, max_steps=15, progress=False)
    b = evaluate(trainer.model, trainer.task_masks, info, TASKS, 1, seed=5, max_steps=15, progress=False, fused=True, backend="reference")
    for t in TASKS:
        np.testing.assert_allclose(a["tasks"][t]["return"], b["tasks"][t]["return"], rtol=1e-4)


def test_unseen_task_uses_voted_mask(trainer):
    info = trainer.eval_info()
    res = evaluate(trainer.model, trainer.task_masks, info, ["reach-v3", "button-press-v3"], 1, seed=1, max_steps=10,
                   vote_threshold=1, progress=False)
    assert res["tasks"]["button-press-v3"]["mask"] == "voted" and res["tasks"]["reach-v3"]["mask"] == "trained"
    with pytest.raises(EvalError, match="vote-threshold"):
        evaluate(trainer.model, trainer.task_masks, info, ["button-press-v3"], 1, seed=1, max_steps=5, progress=False)


def test_evaluate_cli_bad_checkpoint(tmp_path):
    bad = tmp_path / "ck.pt"
    bad.write_bytes(b"not a checkpoint")
    for path, needle in ((bad, "cannot read checkpoint"), (tmp_path / "missing.pt", "not found")):
        proc = subprocess.run([sys.executable, "-m", "harmodt.evaluate", str(path)], capture_output=True, text=True)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
    torch.save({"model": {}}, tmp_path / "other.pt")
    proc = subprocess.run([sys.executable, "-m", "harmodt.evaluate", str(tmp_path / "other.pt")], capture_output=True, text=True)
    assert proc.returncode == 2 and "not a harmodt training checkpoint" in proc.stderr
