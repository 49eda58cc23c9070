"""The gradients of the mask update (``--mask-grads paper|official``) against hand computations,
and ``--preset official``.

The hand computations follow the official code's procedure literally: copy the model, multiply
each masked matrix by the task's mask, run a plain forward and backward, ``clip_grad_norm_`` over
all parameters, then mask the matrices' gradients.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic import datasets  # noqa: E402

from harmodt.config import ModelConfig, TrainConfig, flat_keys, to_dict, validate  # noqa: E402
from harmodt.presets import PRESETS  # noqa: E402
from harmodt.run.cli import parse_args  # noqa: E402
from harmodt.model import action_loss  # noqa: E402
from harmodt.train import Trainer  # noqa: E402

TASKS = ("reach-v3", "push-v3", "pick-place-v3")


def trainer(tmp_path, method="harmodt-f", mask_grads="official", recovery_grad="dense", grad_clip=0.25, **kw) -> Trainer:
    cfg = TrainConfig(tasks=",".join(TASKS), method=method, steps=20, batch_size=4, grad_clip=grad_clip, out=str(tmp_path / "run"),
                      progress=False, device="cpu", model=ModelConfig(n_layer=2, n_head=2, n_embd=32, context_len=5, prompt_len=2), **kw)
    cfg.masks.mask_grads = mask_grads
    cfg.masks.recovery_grad = recovery_grad
    tr = Trainer(validate(cfg), datasets(TASKS))
    for _ in range(3):  # away from the initialisation
        tr.train_step(tr.sample_tasks())
    return tr


def hand_gradient(tr: Trainer, batch: dict, task: int | None, train: bool, clip: float | None):
    """(masked matrices' gradients, their gradients before masking) ``[P]`` of one forward of a
    copy of the model whose matrices hold theta * M_task (task None: theta), and the norm the clip saw."""
    model = copy.deepcopy(tr.model)
    model.train(train)
    params = dict(model.named_parameters())
    if task is not None:
        with torch.no_grad():
            for n in tr.weights:
                params[n].mul_(tr.task_masks.masks[n][task])
    loss = action_loss(model(batch), batch)  # no mask context: plain F.linear on the copied weights
    loss.backward()
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)) if clip is not None else None
    full = torch.cat([params[n].grad.reshape(-1) for n in tr.weights])
    if task is None:
        return full, full, norm
    masked = torch.cat([(params[n].grad * tr.task_masks.masks[n][task]).reshape(-1) for n in tr.weights])
    return masked, full, norm


def expected(tr: Trainer, official: bool, recovery_grad: str):
    """What task_gradients should return, computed by hand from the same batches and RNG draws."""
    gbar, dense, norms = [], [], []
    for i in range(len(tr.tasks)):
        batch = tr.batcher.sample([i], tr.cfg.batch_size)
        clip = tr.cfg.grad_clip if official else None
        start = torch.get_rng_state()
        masked, full, norm = hand_gradient(tr, batch, i if tr.task_masks is not None else None, official, clip)
        gbar.append(masked)
        norms.append(norm)
        if tr.task_masks is None:
            continue
        if recovery_grad == "masked":
            dense.append(full)
        else:
            after = torch.get_rng_state()
            torch.set_rng_state(start)  # the same dropout draw for g_i
            dense.append(hand_gradient(tr, batch, None, official, clip)[0])
            torch.set_rng_state(after)
    return torch.stack(gbar), torch.stack(dense) if dense else None, norms


def run_both(tr: Trainer, official: bool, recovery_grad: str):
    data, rng = tr.batcher.state_dict(), torch.get_rng_state()
    got = tr.mask_updater.task_gradients()
    rng_after = torch.get_rng_state()
    tr.batcher.load_state_dict(data)
    torch.set_rng_state(rng)
    want = expected(tr, official, recovery_grad)
    assert torch.equal(torch.get_rng_state(), rng_after)  # as many dropout draws as the hand computation
    return got, want


@pytest.mark.parametrize("method,recovery_grad", [("harmodt-f", "dense"), ("harmodt-f", "masked"), ("prompt-dt", "dense")])
def test_official_mask_gradients_match_hand_computation(tmp_path, method, recovery_grad):
    """--mask-grads official: dropout on (drawn from the run's RNG), each task's gradient clipped to
    --grad-clip over all parameters (unmasked gradients at theta*M_i) before it is stored."""
    tr = trainer(tmp_path, method, "official", recovery_grad)
    assert tr.model.training
    (masked, dense), (want_masked, want_dense, norms) = run_both(tr, True, recovery_grad)
    assert tr.model.training  # the mode is restored
    assert all(n > tr.cfg.grad_clip for n in norms), norms  # every task's gradient was clipped
    torch.testing.assert_close(masked, want_masked, rtol=1e-5, atol=1e-8)
    if method == "prompt-dt":
        assert dense is None
        return
    torch.testing.assert_close(dense, want_dense, rtol=1e-5, atol=1e-8)
    # ghat averages equal-norm task gradients: each stored gbar_i is a clipped gradient, masked
    for i in range(len(TASKS)):
        active = torch.cat([tr.task_masks.masks[n][i].reshape(-1) for n in tr.weights])
        assert torch.all(masked[i][~active] == 0) and masked[i].norm() <= tr.cfg.grad_clip * (1 + 1e-5)
        if recovery_grad == "masked":
            torch.testing.assert_close(dense[i][active], masked[i][active], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("recovery_grad", ["dense", "masked"])
def test_paper_mask_gradients_match_hand_computation(tmp_path, recovery_grad):
    """--mask-grads paper (the default): dropout off, no clipping, no RNG draw."""
    tr = trainer(tmp_path, "harmodt-f", "paper", recovery_grad, grad_clip=1e-3)
    rng = torch.get_rng_state()
    (masked, dense), (want_masked, want_dense, _) = run_both(tr, False, recovery_grad)
    assert torch.equal(torch.get_rng_state(), rng)
    torch.testing.assert_close(masked, want_masked, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(dense, want_dense, rtol=1e-5, atol=1e-8)
    assert masked.norm(dim=1).min() > 1e-3  # unclipped


def test_official_and_paper_differ_and_the_update_keeps_density(tmp_path):
    """The two choices give different gradients on the same state; an official mask update keeps
    every task's density and changes the masks."""
    grads = {}
    for choice in ("paper", "official"):
        tr = trainer(tmp_path, mask_grads=choice)
        grads[choice] = tr.mask_updater.task_gradients()[0]
    assert not torch.allclose(grads["paper"], grads["official"])
    before = [tr.task_masks.density(i) for i in range(len(TASKS))]
    tr.step = 10
    info = tr.mask_updater()
    assert [tr.task_masks.density(i) for i in range(len(TASKS))] == before
    assert sum(info["masked_per_task"]) > 0 and max(info["mask_changed_fraction"]) > 0


def test_official_mask_gradients_on_the_cpu_kernels(tmp_path):
    """--fused on the CPU kernels captures the same official gradients as the reference path."""
    got = {}
    for fused in (False, True):
        tr = trainer(tmp_path, fused=fused, backend="cpu" if fused else "auto", dropout_rng="counter")  # the same training steps first
        if fused and tr.backends.masked_linear.backend.name != "cpu":
            pytest.skip("the native CPU kernels are not built here")
        got[fused] = tr.mask_updater.task_gradients()
    for a, b in zip(got[False], got[True]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


# ---- --preset official ----------------------------------------------------------------------
OFFICIAL = {"masks.update_every": 500, "masks.lam_on": "agreement", "masks.mask_grads": "official"}


def test_preset_official_sets_the_three_choices_and_nothing_else():
    assert PRESETS["official"] == OFFICIAL
    got = flat_keys(to_dict(parse_args(["--preset", "official"])))
    base = flat_keys(to_dict(validate(TrainConfig())))  # the defaults as a run sees them (--tasks-per-batch 0 resolved)
    assert {k: got[k] for k in OFFICIAL} == OFFICIAL
    assert {k: v for k, v in got.items() if k not in OFFICIAL} == {k: v for k, v in base.items() if k not in OFFICIAL}


def test_flags_given_override_the_preset():
    cfg = parse_args(["--preset", "official", "--update-every", "1000", "--lam-on", "importance"])
    assert (cfg.masks.update_every, cfg.masks.lam_on, cfg.masks.mask_grads) == (1000, "importance", "official")
    cfg = parse_args(["--mask-grads", "paper", "--preset", "official"])  # wherever the flag stands
    assert cfg.masks.mask_grads == "paper" and cfg.masks.lam_on == "agreement"


def test_presets_combine_left_to_right():
    """The preset alone starts from the paper's defaults (not the embedded default); after
    embedded-default it changes only its three keys."""
    alone = parse_args(["--preset", "official"])
    assert alone.steps == 1_000_000 and alone.model.n_layer == 6
    both = flat_keys(to_dict(parse_args(["--preset", "embedded-default", "official"])))
    embedded = flat_keys(to_dict(parse_args([])))
    assert both == {**embedded, **OFFICIAL}
    assert parse_args(["--preset", "official", "paper-mt50"]).masks.mask_grads == "official"
    assert parse_args(["--preset", "paper-mt50", "official", "--steps", "7"]).steps == 7
