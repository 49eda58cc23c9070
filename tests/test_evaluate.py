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


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_evaluation_runs_and_stays_close_to_fp32(trainer, fused):
    """``precision="bf16"`` (CPU autocast; the embeddings and action head stay fp32) on the fused
    inference ops and on the plain path: every episode runs, and returns stay near fp32's."""
    info = trainer.eval_info()
    kw = dict(max_steps=25, progress=False, fused=fused)
    fp32 = evaluate(trainer.model, trainer.task_masks, info, TASKS, 2, seed=3, **kw)
    bf16 = evaluate(trainer.model, trainer.task_masks, info, TASKS, 2, seed=3, precision="bf16", **kw)
    assert bf16["env_steps"] == fp32["env_steps"] == 2 * 2 * 25
    for t in TASKS:
        assert 0.0 <= bf16["tasks"][t]["success"] <= 1.0
        np.testing.assert_allclose(bf16["tasks"][t]["return"], fp32["tasks"][t]["return"], rtol=0.1, atol=1.0)


def test_expanded_masks_give_the_same_episodes(trainer):
    """Evaluation reading every task's W * M expanded once (the default with the native ops) runs
    exactly the episodes it runs expanding the bits at every forward; only the evaluated tasks'
    masks are expanded."""
    import kernels

    info = trainer.eval_info()
    kw = dict(max_steps=15, progress=False, fused=True)
    seen = []
    orig = kernels.task_weights
    kernels.task_weights = lambda w, m, **k: seen.append(m.shape[0]) or orig(w, m, **k)
    try:
        a = evaluate(trainer.model, trainer.task_masks, info, TASKS[1:], 2, seed=4, expand_masks=True, **kw)
    finally:
        kernels.task_weights = orig
    b = evaluate(trainer.model, trainer.task_masks, info, TASKS[1:], 2, seed=4, expand_masks=False, **kw)
    if "cpu" in kernels.available_backends("cpu"):
        assert seen and set(seen) == {1}  # one task evaluated: its masks alone
    assert a["tasks"] == b["tasks"]


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


def test_prompt_cache_matches_full_forward():
    from harmodt.masks import TaskMasks
    from harmodt.model import MaskContext, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, context_len=4, prompt_len=3, dropout=0.0)
    model = build_model(cfg, 2, "harmodt-f").eval()
    shapes = {n: tuple(w.shape) for n, w in model.masked_weights().items()}
    tm = TaskMasks.erk(shapes, 2, 0.3, torch.Generator().manual_seed(1))
    ids = torch.tensor([0, 1, 1])
    ctx = MaskContext.for_tasks(tm.masks, ids)
    b, k, kp = 3, cfg.context_len, cfg.prompt_len
    batch = {"states": torch.randn(b, k, 39), "actions": torch.randn(b, k, 4), "rtg": torch.randn(b, k, 1),
             "timesteps": torch.arange(k).expand(b, -1), "mask": torch.ones(b, k, dtype=torch.bool), "task_ids": ids,
             "prompt_states": torch.randn(b, kp, 39), "prompt_actions": torch.randn(b, kp, 4), "prompt_rtg": torch.randn(b, kp, 1),
             "prompt_timesteps": torch.arange(kp).expand(b, -1), "prompt_mask": torch.tensor([[1, 1, 1], [0, 1, 1], [1, 1, 1]]).bool()}
    with torch.inference_mode():
        full = model(batch, ctx)[:, -1]  # (B, A): prediction at the last state token
        kv, pvalid = model.encode_prompt({n: v for n, v in batch.items() if n.startswith("prompt_")}, ctx)
        cached = model.act(batch["states"], batch["actions"], batch["rtg"], batch["timesteps"], ids, ctx, kv, pvalid)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cached[1], cached[2])  # different histories/prompts really give different actions


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
