"""Training step invariants, mask update inside training, checkpoints and resume."""

import copy
import dataclasses
import json
import os
import shutil
import signal

import pytest
import torch

from _synthetic import datasets
from harmodt.config import ConfigError, ModelConfig, TrainConfig, config_from_dict, to_dict, validate
from harmodt.masks import TaskMasks
from harmodt.model import action_loss
from harmodt.run.cli import parse_args
from harmodt.train import Trainer, run
import harmodt_kernels as kernels

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


FUSED_BACKENDS = ["reference"] + [b for b in ("cpu", "triton") if b in kernels.available_backends("cpu")]


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
        assert ck["masks"]["tasks"] == list(TASKS)
        assert all(m.dtype == torch.int32 for m in ck["masks"]["words"].values())  # 1 bit per weight
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
    (["--conditioning", "task"], "--conditioning must be one of auto, prompt, task-state, task-embedding"),
    (["--prompt-segment", "first"], "--prompt-segment must be last or random"),
    (["--task-order", "cyclic"], "--task-order must be random or round-robin"),
    (["--clip-scope", "all"], "--clip-scope must be masked or unmasked"),
    (["--weight-decay-scope", "none"], "--weight-decay-scope must be matrices or all"),
    (["--init", "gpt2"], "--init must be ours or reference"),
    (["--erk-draw", "uniform"], "--erk-draw must be exact or bernoulli"),
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


@pytest.mark.parametrize("tasks_per_batch", [pytest.param(1, marks=pytest.mark.long), 2])
@pytest.mark.parametrize("backend", [b for b in FUSED_BACKENDS if b != "reference"])
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


def test_checkpoint_is_device_free_and_safe(tmp_path):
    """The checkpoint holds CPU tensors and plain types only (weights_only=True loads it) and
    resumes on the CPU whatever device wrote it."""
    cfg = tiny_cfg(tmp_path, steps=4)
    run(cfg, datasets(TASKS))
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    tensors = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(ck)
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    from harmodt.evaluate import load_checkpoint

    model, masks, info, _, step = load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"), "cpu")
    assert step == 4 and next(model.parameters()).device.type == "cpu" and info["tasks"] == TASKS


def test_impossible_backend_is_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "harmodt.train", "--device", "cpu", "--fused", "--backend", "triton", "--steps", "1",
                        "--out", str(tmp_path / "x"), "--no-progress"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "triton" in r.stderr and "Traceback" not in r.stderr


def test_conditioning_and_prompt_segment_flags_and_configs_written_before_them():
    cfg = parse_args(["--method", "mtdt", "--steps", "5"])
    assert cfg.conditioning == "auto" and cfg.prompt_segment == "last"
    assert parse_args(["--method", "mtdt", "--conditioning", "task-id"]).conditioning == "task-embedding"  # the earlier name
    assert parse_args(["--prompt-segment", "random"]).prompt_segment == "random"
    # a config written before --prompt-segment: random windows, and MTDT's "auto" meant the learned embedding
    old = {k: v for k, v in to_dict(TrainConfig(method="mtdt")).items() if k != "prompt_segment"}
    cfg = config_from_dict(old)
    assert cfg.prompt_segment == "random" and cfg.conditioning == "task-embedding"
    cfg = config_from_dict({**old, "method": "prompt-dt"})
    assert cfg.prompt_segment == "random" and cfg.conditioning == "auto"
    assert config_from_dict({**old, "conditioning": "task-id"}).conditioning == "task-embedding"
    new = config_from_dict(to_dict(TrainConfig(method="mtdt")))  # today's config is read as written
    assert new.prompt_segment == "last" and new.conditioning == "auto"


@pytest.mark.parametrize("conditioning", ["auto", "task-embedding", "prompt"])
def test_mtdt_trains_with_every_conditioning(tmp_path, conditioning):
    tr = Trainer(tiny_cfg(tmp_path, method="mtdt", conditioning=conditioning), datasets(TASKS))
    assert tr.model.conditioning == {"auto": "task-state"}.get(conditioning, conditioning)
    assert ("prompt_states" in tr.batcher.sample([0], 2)) == (conditioning == "prompt")
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    loss = tr.train_step([1])
    assert torch.isfinite(loss) and any(not torch.equal(before[k], v) for k, v in tr.model.state_dict().items())


def test_results_keep_the_final_and_the_best_evaluation(tmp_path, monkeypatch):
    """--eval-every: results.json's top level and "final" are the last evaluation; "best" is the one
    with the highest mean success (the earliest of equal ones), with its step."""
    scores = {2: [0.2, 0.4], 4: [1.0, 0.6], 6: [0.6, 0.6], 8: [0.4, 0.2], 10: [0.0, 0.2]}  # steps 4 and 6 tie at 0.8

    def fake_evaluate(self):
        per = {t: {"success": s, "return": 100 * s, "episodes": 1, "prompt": {"episode": 1, "timesteps": [58, 59]}}
               for t, s in zip(self.tasks, scores[self.step])}
        return {"tasks": per, "mean_success": sum(scores[self.step]) / 2, "env_steps": 2, "seconds": 1.0}

    monkeypatch.setattr(Trainer, "evaluate", fake_evaluate)
    two = TASKS[:2]
    res = run(tiny_cfg(tmp_path, tasks=",".join(two), steps=10, eval_every=2, eval_episodes=1), datasets(two))
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    assert on_disk["mean_success"] == pytest.approx(0.1) and on_disk["tasks"][two[1]] == {
        "success": 0.2, "return": 20.0, "prompt": {"episode": 1, "timesteps": [58, 59]}}
    assert on_disk["final"] == {"step": 10, "mean_success": on_disk["mean_success"], "tasks": on_disk["tasks"]}
    best = on_disk["best"]
    assert best["step"] == 4 and best["mean_success"] == pytest.approx(0.8) and best["evaluations"] == 5
    assert best["tasks"][two[0]]["success"] == 1.0


def test_validation_goals_choose_the_best_checkpoint(tmp_path, monkeypatch):
    """--validation-seed: the evaluations during training (and at the last step) run on the validation
    goals; the best of them is saved as best.pt with that step's weights; the final evaluation runs on
    the test goals and is not a candidate for "best"."""
    validation = {2: 0.2, 4: 0.9, 6: 0.5, 8: 0.9, 10: 0.3}  # best at step 4 (8 ties it, later)
    seen = []

    def fake_evaluate(self, goals_seed=None):
        seen.append((self.step, goals_seed))
        s = validation[self.step] if goals_seed == 777 else 1.0  # the test goals always score 1.0
        per = {t: {"success": s, "return": 100 * s, "episodes": 1, "prompt": {"episode": 1, "timesteps": [58, 59]}} for t in self.tasks}
        return {"tasks": per, "mean_success": s, "env_steps": 2, "seconds": 1.0}

    monkeypatch.setattr(Trainer, "evaluate", fake_evaluate)
    two = TASKS[:2]
    cfg = tiny_cfg(tmp_path, tasks=",".join(two), steps=10, eval_every=2, eval_episodes=1, validation_seed=777, checkpoint_every=3)
    res = run(cfg, datasets(two))
    assert seen == [(2, 777), (4, 777), (6, 777), (8, 777), (10, 777), (10, None)]
    assert res["final"]["mean_success"] == 1.0 and res["mean_success"] == 1.0
    best = res["best"]
    assert (best["step"], best["mean_success"], best["evaluations"], best["goals"]) == (4, 0.9, 5, "validation")
    assert best["checkpoint"] == "best.pt" and best["validation_seed"] == 777
    saved = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert saved["step"] == 4
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "validation_mean_success" in m] == [2, 4, 6, 8, 10]
    assert [m["step"] for m in metrics if "eval_mean_success" in m] == [10]


def test_validation_goals_must_differ_from_the_test_goals(tmp_path):
    with pytest.raises(ConfigError, match="--validation-seed 12346 draws the final evaluation's test goals"):
        tiny_cfg(tmp_path, seed=1, validation_seed=12346, eval_episodes=1)


def test_results_without_evaluation_have_no_final_or_best(tmp_path):
    res = run(tiny_cfg(tmp_path, method="prompt-dt", steps=2), datasets(TASKS))
    assert res["final"] is None and res["best"] is None and res["tasks"] == {}


@pytest.mark.parametrize("stop", [False, True])
def test_stop_at_success_reaches_every_evaluation_of_a_run(tmp_path, monkeypatch, stop):
    """--stop-at-success: the evaluations during training and the final one all stop at success, and
    results.json says its returns are truncated; without it none does."""
    import harmodt.evaluate as evaluation

    seen, real = [], evaluation.evaluate

    def spy(*args, **kw):
        seen.append(kw.get("stop_at_success"))
        return real(*args, **{**kw, "max_steps": 5})

    monkeypatch.setattr(evaluation, "evaluate", spy)
    two = TASKS[:2]
    cfg = tiny_cfg(tmp_path, tasks=",".join(two), steps=4, eval_every=2, eval_episodes=1, validation_seed=777, stop_at_success=stop)
    res = run(cfg, datasets(two))
    assert seen == [stop] * 3 and res["returns_truncated"] is stop
