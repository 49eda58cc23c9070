"""The official code's training choices as options (``--preset reference``): round-robin task
order, the clip norm before masking, weight decay on every parameter, the reference's
initialisation and the Bernoulli ERK draw. Each default keeps harmodt's own behaviour."""

import copy
import math

import pytest
import torch

from _synthetic import datasets
from harmodt import steps
from harmodt.config import RESUME_RULES, ModelConfig, TrainConfig, config_from_dict, to_dict, validate
from harmodt.presets import PRESETS
from harmodt.masks import TaskMasks, erk_densities
from harmodt.methods import build_model
from harmodt.model import action_loss
from harmodt.optim import param_groups
from harmodt.run.cli import parse_args
from harmodt.run.distributed import round_robin
from harmodt.run.resume import changed_settings
from harmodt.train import Trainer
import harmodt_kernels

TASKS = ["reach-v3", "push-v3", "door-open-v3"]
NEW_KEYS = {"task_order": ("random", "round-robin"), "clip_scope": ("masked", "unmasked"), "weight_decay_scope": ("matrices", "all"),
            "model.init": ("ours", "reference"), "masks.erk_draw": ("exact", "bernoulli"), "state_norm": ("per-task", "pooled")}
FUSED_BACKENDS = ["reference"] + [b for b in ("cpu", "triton") if b in harmodt_kernels.available_backends("cpu")]


def tiny_cfg(tmp_path, dropout: float = 0.1, **kw) -> TrainConfig:
    model = ModelConfig(n_layer=2, n_head=2, n_embd=32, context_len=5, prompt_len=2, dropout=dropout)
    base = dict(tasks=",".join(TASKS), method="harmodt-f", steps=12, batch_size=4, warmup_steps=2, lr=1e-3, eval_episodes=0,
                log_every=4, checkpoint_every=4, out=str(tmp_path / "run"), progress=False, model=model)
    base.update(kw)
    cfg = TrainConfig(**base)
    cfg.masks.update_every = 5
    cfg.masks.eta_max = 20
    return validate(cfg)


# ---- flags, preset, saved configs, resume -------------------------------------------------------------

def test_preset_reference_sets_the_five_and_official_is_unchanged():
    cfg = parse_args(["--preset", "reference"])
    assert (cfg.task_order, cfg.clip_scope, cfg.weight_decay_scope, cfg.model.init, cfg.masks.erk_draw) == (
        "round-robin", "unmasked", "all", "reference", "bernoulli")
    assert PRESETS["official"] == {"masks.update_every": 500, "masks.lam_on": "agreement", "masks.mask_grads": "official"}
    both = parse_args(["--preset", "official", "reference"])
    assert both.masks.mask_grads == "official" and both.masks.lam_on == "agreement" and both.task_order == "round-robin"
    plain = parse_args(["--preset", "official"])
    assert (plain.task_order, plain.clip_scope, plain.weight_decay_scope, plain.model.init, plain.masks.erk_draw) == (
        "random", "masked", "matrices", "ours", "exact")
    assert parse_args(["--preset", "reference", "--clip-scope", "masked"]).clip_scope == "masked"  # flags override presets


def test_saved_configs_without_the_keys_mean_the_defaults_and_the_keys_are_fixed_on_resume():
    cfg = TrainConfig()
    old = to_dict(cfg)
    for key in NEW_KEYS:  # a config written before these options
        *parent, leaf = key.split(".")
        del (old[parent[0]] if parent else old)[leaf]
    loaded = config_from_dict(old)
    assert to_dict(loaded) == to_dict(cfg)
    assert changed_settings(old, cfg) == {}  # an old checkpoint resumes with the defaults
    for key, (default, other) in NEW_KEYS.items():
        assert RESUME_RULES.get(key, "fixed") == "fixed"
        *parent, leaf = key.split(".")
        changed = copy.deepcopy(cfg)
        setattr(getattr(changed, parent[0]) if parent else changed, leaf, other)
        assert changed_settings(old, changed) == {key: (default, other)}


# ---- task order ---------------------------------------------------------------------------------------

def test_round_robin_trains_task_step_mod_T(tmp_path):
    tr = Trainer(tiny_cfg(tmp_path, task_order="round-robin"), datasets(TASKS))
    seen = []
    for _ in range(7):
        ids = tr.sample_tasks()
        seen.append(ids)
        tr.train_step(ids)
    assert seen == [[0], [1], [2], [0], [1], [2], [0]]
    tr.step = 4  # the order follows the step alone (a resumed run goes on with it)
    assert tr.sample_tasks() == [1]
    rnd = Trainer(tiny_cfg(tmp_path), datasets(TASKS))
    drawn = []
    for s in range(12):
        rnd.step = s
        drawn.append(rnd.sample_tasks())
    assert drawn != [[s % 3] for s in range(12)]  # the default draws at random


def test_round_robin_with_several_tasks_per_batch_takes_consecutive_tasks(tmp_path):
    tr = Trainer(tiny_cfg(tmp_path, task_order="round-robin", tasks_per_batch=2), datasets(TASKS))
    got = []
    for s in range(4):
        tr.step = s
        got.append(tr.sample_tasks())
    assert got == [[0, 1], [2, 0], [1, 2], [0, 1]]
    assert round_robin(5, 3, 1) == [2] and round_robin(1, 3, 4) == [1, 2, 0, 1]  # (count = ranks * tasks per batch under torchrun)


# ---- clip scope ---------------------------------------------------------------------------------------

def hand_gradients(tr: Trainer, batch: dict, task_ids: list[int]) -> tuple[dict, dict]:
    """Every parameter's gradient of ``batch`` (rows grouped by task as ``task_ids``), by plain
    autograd on one copy of the model per task whose masked matrices hold W * M_t: (a) before
    masking, the masked matrices' the sum over the tasks of each copy's gradient, (b) masked,
    the sum of each copy's times M_t (what the step applies). {name: gradient} each."""
    copies, total = [], 0.0
    count = batch["mask"].sum()
    for t in task_ids:
        m = copy.deepcopy(tr.model)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n in tr.weights:
                    p.mul_(tr.task_masks.masks[n][t])
        rows = batch["task_ids"] == t
        sub = {k: v[rows] for k, v in batch.items()}
        total = total + action_loss(m(sub), sub, count)
        copies.append((t, m))
    total.backward()
    unmasked, masked = {}, {}
    for n, _ in tr.model.named_parameters():
        grads = [(t, dict(m.named_parameters())[n].grad) for t, m in copies]
        if all(g is None for _, g in grads):
            continue
        unmasked[n] = sum(g for _, g in grads if g is not None)
        masked[n] = sum(g * tr.task_masks.masks[n][t] for t, g in grads) if n in tr.weights else unmasked[n]
    return unmasked, masked


def norm(grads: dict) -> float:
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))


@pytest.mark.parametrize("task_ids", [[1], pytest.param([2, 0], marks=pytest.mark.long)])
@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.long) if b == "triton" else b  # (the interpreter)
                                     for b in FUSED_BACKENDS])
def test_unmasked_clip_norm_is_the_norm_of_the_gradient_before_masking(tmp_path, monkeypatch, backend, task_ids):
    """--clip-scope unmasked: the clip norm reads, for the masked matrices, their gradient computed
    by hand with the masks applied to the weights but not to the gradient (non-zero outside the
    masks), and the step's clip factor is max_norm / the norm of that gradient with every other
    parameter's; the default's is the masked gradient's (a larger factor)."""
    factors = {}
    for scope in ("masked", "unmasked"):
        tr = Trainer(tiny_cfg(tmp_path, dropout=0.0, fused=True, backend=backend, grad_clip=1e-3, clip_scope=scope,
                              tasks_per_batch=len(task_ids)), datasets(TASKS))
        for _ in range(2):
            tr.train_step(tr.sample_tasks())
        batch = tr.batcher.sample(task_ids, tr.cfg.batch_size)
        tr.batcher.sample = lambda ids, size: batch
        calls = []
        real = steps.clip_coefficient
        monkeypatch.setattr(steps, "clip_coefficient", lambda *a: calls.append((a, real(*a))) or calls[-1][1])
        state = copy.deepcopy(tr.model.state_dict())
        tr.train_step(task_ids)
        monkeypatch.undo()
        tr.model.load_state_dict(state)
        unmasked, masked = hand_gradients(tr, batch, task_ids)
        (params, max_norm, norm_grads), factor = calls[0]
        if scope == "unmasked":
            outside = {n: ~tr.task_masks.masks[n][task_ids].any(0) for n in tr.weights}
            assert all(bool(unmasked[n][o].any()) for n, o in outside.items() if o.any())  # (ERK leaves some layers dense)
            assert sum(int(o.sum()) for o in outside.values()) > 0
            for n, w in tr.weights.items():
                torch.testing.assert_close(norm_grads[w], unmasked[n], rtol=1e-5, atol=1e-8, msg=n)
        else:
            assert norm_grads is None
        factors[scope] = float(factor)
        want = max_norm / (norm(unmasked if scope == "unmasked" else masked) + 1e-6)
        assert factors[scope] == pytest.approx(want, rel=1e-5), scope
    assert norm(unmasked) > norm(masked) and factors["unmasked"] < factors["masked"]


def test_unmasked_clip_steps_keep_weights_outside_the_mask(tmp_path):
    tr = Trainer(tiny_cfg(tmp_path, clip_scope="unmasked", grad_clip=1e-3), datasets(TASKS))
    for task in (0, 2, 1):
        before = {n: w.detach().clone() for n, w in tr.weights.items()}
        tr.train_step([task])
        for n, w in tr.weights.items():
            keep = tr.task_masks.masks[n][task]
            assert torch.equal(w.detach()[~keep], before[n][~keep]) and not torch.equal(w.detach()[keep], before[n][keep]), n
            assert not w.grad[~keep].any(), n  # the step's gradient is still masked


# ---- weight-decay scope -------------------------------------------------------------------------------

def test_weight_decay_scope_all_decays_every_parameter(tmp_path):
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16), 3, "harmodt-f")
    everything = {id(p) for p in model.parameters()}
    groups = param_groups(model, 1e-4, "all")
    assert {id(p) for p in groups[0]["params"]} == everything and groups[0]["weight_decay"] == 1e-4 and not groups[1]["params"]
    ours = param_groups(model, 1e-4)
    decayed = {id(p) for p in ours[0]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 and not names[id(p)].startswith(("embed", "prompt_embed")) for p in ours[0]["params"])
    assert decayed and everything - decayed and ours[1]["weight_decay"] == 0.0
    tr = Trainer(tiny_cfg(tmp_path, weight_decay_scope="all"), datasets(TASKS))
    assert {id(p) for p in tr.opt.param_groups[0]["params"]} == {id(p) for p in tr.model.parameters()}
    assert tr.opt.param_groups[0]["weight_decay"] == tr.cfg.weight_decay


# ---- initialisation -----------------------------------------------------------------------------------

@torch.no_grad()
def test_reference_init_keeps_pytorch_defaults_outside_the_blocks():
    torch.manual_seed(0)
    mc = ModelConfig(n_layer=2, n_head=2, n_embd=64, init="reference")
    ref = build_model(mc, 3, "harmodt-f")
    ours = build_model(ModelConfig(n_layer=2, n_head=2, n_embd=64), 3, "harmodt-f")
    for m in (ref, ours):
        for blk in m.blocks:
            for lin in (blk.attn.qkv, blk.attn.proj, blk.fc, blk.mlp_proj):
                assert float(lin.weight.std()) == pytest.approx(0.02, rel=0.1) and not lin.bias.any()
            assert torch.equal(blk.ln1.weight, torch.ones(64)) and not blk.ln2.bias.any()
    assert float(ref.embed.timestep.weight.std()) == pytest.approx(1.0, rel=0.05)  # nn.Embedding: N(0, 1)
    assert float(ours.embed.timestep.weight.std()) == pytest.approx(0.02, rel=0.05)
    head = ref.predict_action.weight  # nn.Linear: Kaiming-uniform, U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert float(head.abs().max()) <= 1 / math.sqrt(64) and float(head.std()) == pytest.approx(1 / math.sqrt(3 * 64), rel=0.2)
    assert ref.predict_action.bias.any() and not ours.predict_action.bias.any()
    state = ref.embed.state.weight
    assert float(state.std()) == pytest.approx(1 / math.sqrt(3 * 39), rel=0.1)


# ---- ERK draw -----------------------------------------------------------------------------------------

SHAPES = {"a": (96, 32), "b": (32, 96), "c": (128, 128), "d": (4, 8)}


def test_bernoulli_erk_counts_vary_and_match_erk_within_a_binomial_bound():
    t = 8
    dens = erk_densities(SHAPES, 0.8)
    bern = TaskMasks.erk(SHAPES, t, 0.2, torch.Generator().manual_seed(0), draw="bernoulli")
    exact = TaskMasks.erk(SHAPES, t, 0.2, torch.Generator().manual_seed(0))
    for name, (n, k) in SHAPES.items():
        counts = bern.masks[name].reshape(t, -1).sum(1)
        assert torch.equal(exact.masks[name].reshape(t, -1).sum(1), torch.full((t,), round(dens[name] * n * k)))
        if dens[name] == 1.0:
            assert bool(bern.masks[name].all())
            continue
        assert len(set(counts.tolist())) > 1, name  # the count differs between tasks
        mean, var = t * n * k * dens[name], t * n * k * dens[name] * (1 - dens[name])
        assert abs(int(counts.sum()) - mean) <= 5 * math.sqrt(var), name
    total = sum(n * k for n, k in SHAPES.values())
    assert abs(bern.density() - 0.8) <= 5 * math.sqrt(0.8 * 0.2 / (t * total))
    assert bern.vote(t // 2)["c"].dtype == torch.bool


def test_mask_updates_keep_each_tasks_bernoulli_count(tmp_path):
    cfg = tiny_cfg(tmp_path)
    cfg.masks.erk_draw = "bernoulli"
    tr = Trainer(cfg, datasets(TASKS))
    per_task = [sum(int(m[i].sum()) for m in tr.task_masks.masks.values()) for i in range(3)]
    assert len(set(per_task)) == 3
    for _ in range(5):
        tr.train_step(tr.sample_tasks())
    info = tr.mask_updater()
    assert info["masked_per_task"] == [info["alpha"]] * 3 and info["alpha"] > 0 and min(info["mask_changed_fraction"]) > 0
    assert [sum(int(m[i].sum()) for m in tr.task_masks.masks.values()) for i in range(3)] == per_task
    assert info["density"] == pytest.approx(sum(per_task) / (3 * sum(w.numel() for w in tr.weights.values())))
    assert [tr.task_masks.density(i) for i in range(3)] != [info["density"]] * 3
