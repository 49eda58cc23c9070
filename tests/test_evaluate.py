"""Batched evaluation: same results as one-episode-at-a-time, voted masks, checkpoint errors."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from _synthetic import datasets
from harmodt.config import ModelConfig, TrainConfig, validate
import kernels
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


BACKENDS = [b for b in ("reference", "cpu", "triton") if b in kernels.available_backends("cpu")]


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
