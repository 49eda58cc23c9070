"""ERK (Appendix C), Eq. 12, the mask update (Algorithm 2) and the vote (Eq. 13)."""

import math

import pytest
import torch

import harmodt_kernels
from harmodt.masks import TaskMasks, alpha_schedule, erk_densities, harmony_score

PAPER_SHAPES = {f"blocks.{i}.{n}": s for i in range(6) for n, s in
                [("attn.qkv.weight", (768, 256)), ("attn.proj.weight", (256, 256)), ("fc.weight", (1024, 256)), ("mlp_proj.weight", (256, 1024))]}


@pytest.mark.parametrize("sparsity", [0.05, 0.2, 0.5, 0.9])
def test_erk_densities_follow_appendix_c(sparsity):
    dens = erk_densities(PAPER_SHAPES, 1 - sparsity)
    numel = {n: a * b for n, (a, b) in PAPER_SHAPES.items()}
    total = sum(dens[n] * numel[n] for n in dens) / sum(numel.values())
    # erk_densities is plain Python float64 arithmetic over a few dozen layers (no BLAS, the same on
    # every processor): its round-off is ~1e-14, so 1e-9 here and below checks the formula, not luck.
    assert total == pytest.approx(1 - sparsity, abs=1e-9)
    # below 1, density is proportional to (n_in + n_out) / (n_in * n_out)
    ratios = [dens[n] / ((a + b) / (a * b)) for n, (a, b) in PAPER_SHAPES.items() if dens[n] < 1]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)
    assert all(0 < d <= 1 for d in dens.values())


def test_erk_caps_small_layers_dense():
    shapes = {"tiny": (4, 4), "big": (512, 512)}
    dens = erk_densities(shapes, 0.9)
    assert dens["tiny"] == 1.0
    total = (16 * dens["tiny"] + 512 * 512 * dens["big"]) / (16 + 512 * 512)
    assert total == pytest.approx(0.9)


def test_erk_masks_overall_density_and_independent_draws():
    tm = TaskMasks.erk(PAPER_SHAPES, 3, 0.2, torch.Generator().manual_seed(0))
    for t in range(3):
        assert abs(tm.density(t) - 0.8) < 0.005
    a, b = tm.masks["blocks.0.fc.weight"][0], tm.masks["blocks.0.fc.weight"][1]
    assert a.sum() == b.sum() and not torch.equal(a, b)
    assert all(m.dtype == torch.bool for m in tm.masks.values())


@pytest.mark.parametrize("t,total,lo,hi,expected", [
    (0, 1000, 0, 100, 0), (250, 1000, 0, 100, 50), (500, 1000, 0, 100, 100), (750, 1000, 0, 100, 50),
    (1000, 1000, 0, 100, 0), (500, 1000, 10, 100, 100), (0, 1000, 10, 100, 10), (1, 1_000_000, 0, 100, 1),
])
def test_alpha_schedule_eq12(t, total, lo, hi, expected):
    assert alpha_schedule(t, total, lo, hi) == expected
    raw = hi + 0.5 * (lo - hi) * (1 + math.cos(2 * math.pi * t / total))
    assert abs(alpha_schedule(t, total, lo, hi) - math.ceil(raw)) <= 1 and alpha_schedule(t, total, lo, hi) >= raw - 1e-9


def _setup(t=4, shapes=None, seed=0):
    shapes = shapes or {"a": (7, 9), "b": (5, 13)}
    g = torch.Generator().manual_seed(seed)
    tm = TaskMasks.erk(shapes, t, 0.3, g)
    p = sum(a * b for a, b in shapes.values())
    return tm, torch.randn(t, p, generator=g), torch.randn(t, p, generator=g), torch.randn(p, generator=g)


@pytest.mark.parametrize("importance", ["magnitude", "fisher"])
@pytest.mark.parametrize("k", [0, 1, 5, 40])
def test_mask_update_invariants(importance, k):
    tm, g_bar, g, params = _setup()
    before = torch.cat([m.reshape(4, -1) for m in tm.masks.values()], 1)
    g_bar = g_bar * before  # masked gradients are zero outside the mask
    counts = tm.update(g_bar, g, params, k, 10.0, importance)
    after = torch.cat([m.reshape(4, -1) for m in tm.masks.values()], 1)
    assert torch.equal(before.sum(1), after.sum(1))  # per-task density exactly constant
    for i in range(4):
        n_act, n_msk = int(before[i].sum()), int((~before[i]).sum())
        kk = min(k, n_act, n_msk)
        dropped, added = before[i] & ~after[i], ~before[i] & after[i]
        assert int(dropped.sum()) == kk == counts["masked"][i]
        assert int(added.sum()) == kk == counts["recovered"][i]
        # recovery only from weights masked before the update: the top-k of g_i * ghat among them
        ghat = g_bar.mean(0)
        rec = torch.where(before[i], torch.tensor(float("-inf")), g[i] * ghat)
        assert torch.equal(added.nonzero().flatten().sort().values, torch.sort(rec, descending=True, stable=True).indices[:kk].sort().values)
        # masking takes the k lowest harmony scores among active weights
        imp = params.abs() if importance == "magnitude" else g_bar[i] ** 2
        h = torch.where(before[i], g_bar[i] * ghat + 10.0 * imp, torch.tensor(float("inf")))
        assert torch.equal(dropped.nonzero().flatten().sort().values, torch.sort(h, stable=True).indices[:kk].sort().values)


def test_masked_weights_get_infinite_harmony_score():
    # masked weights with hugely negative scores must never be chosen for masking again
    tm, g_bar, g, params = _setup()
    before = torch.cat([m.reshape(4, -1) for m in tm.masks.values()], 1)
    g_bar = torch.where(before, torch.ones(()), torch.full((), -1e6))
    tm.update(g_bar, g, params, 3, 0.0, "magnitude")
    after = torch.cat([m.reshape(4, -1) for m in tm.masks.values()], 1)
    assert int((before & ~after).sum()) == 12  # 3 per task, all from active weights
    assert not (~before & ~after & before).any()


def test_lam_on_agreement_matches_official_ordering():
    tm, g_bar, g, params = _setup(seed=3)
    tm2 = TaskMasks({n: m.clone() for n, m in tm.masks.items()})
    before = torch.cat([m.reshape(4, -1) for m in tm.masks.values()], 1)
    tm.update(g_bar, g, params, 4, 10.0, "magnitude", lam_on="agreement")
    ghat = g_bar.mean(0)
    for i in range(4):
        h = torch.where(before[i], 10.0 * g_bar[i] * ghat + params.abs(), torch.tensor(float("inf")))
        dropped = torch.sort(h, stable=True).indices[:4]
        after = torch.cat([m.reshape(4, -1) for m in tm.masks.values()], 1)
        assert not after[i, dropped].any()
    tm2.update(g_bar, g, params, 4, 10.0, "magnitude", lam_on="importance")
    assert any(not torch.equal(tm.masks[n], tm2.masks[n]) for n in tm.masks)


def test_vote_eq13():
    m = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 1], [1, 1, 0, 0]], dtype=torch.bool).view(3, 1, 4)
    tm = TaskMasks({"w": m})
    assert tm.vote(1)["w"].view(-1).tolist() == [True, True, False, True]
    assert tm.vote(2)["w"].view(-1).tolist() == [True, False, False, False]


def test_packed_masks_roundtrip():
    tm, *_ = _setup()
    for n, m in tm.masks.items():
        assert torch.equal(harmodt_kernels.unpack_masks(tm.packed()[n], m.shape[-1]), m)


def test_harmony_score_range():
    g = torch.randn(5, 1000)
    assert -1 <= harmony_score(g) <= 1
    assert harmony_score(g[:1].repeat(5, 1)) == pytest.approx(1.0)


def test_checkpoint_state_is_one_bit_per_weight_and_round_trips():
    """TaskMasks.state stores the kernels' packed words (1 bit per weight) and from_state gives the bool
    masks back, for any order or subset of the tasks."""
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (6, 70), "b": (3, 32)}  # 70: a last word with padding bits
    tm = TaskMasks.erk(shapes, 4, 0.6, g)
    names = ["t0", "t1", "t2", "t3"]
    st = tm.state(names)
    assert st["tasks"] == names and st["shapes"] == {"a": [6, 70], "b": [3, 32]}
    assert {n: (w.dtype, tuple(w.shape)) for n, w in st["words"].items()} == {"a": (torch.int32, (4, 6, 3)), "b": (torch.int32, (4, 3, 1))}
    back = TaskMasks.from_state(st)
    assert all(torch.equal(back.masks[n], tm.masks[n]) for n in shapes)
    some = TaskMasks.from_state(st, ["t2", "t0"])
    assert all(torch.equal(some.masks[n], tm.masks[n][[2, 0]]) for n in shapes)
    bit = st["words"]["a"][1, 2, 2] >> 3 & 1  # column 2 * 32 + 3 = 67 of row 2, task 1
    assert bool(bit) == bool(tm.masks["a"][1, 2, 67])


def test_masks_of_the_earlier_checkpoint_format_load():
    """A checkpoint's masks as they were stored before packing, {task: {weight: bool [N, K]}}, give the
    same TaskMasks; a missing task, a foreign layout or a misfit weight is one ValueError naming it."""
    g = torch.Generator().manual_seed(1)
    tm = TaskMasks.erk({"a": (5, 40)}, 3, 0.5, g)
    old = {t: {"a": tm.masks["a"][i].clone()} for i, t in enumerate(["x", "y", "z"])}
    assert torch.equal(TaskMasks.from_state(old).masks["a"], tm.masks["a"])
    assert torch.equal(TaskMasks.from_state(old, ["z", "x"]).masks["a"], tm.masks["a"][[2, 0]])
    for d in (old, tm.state(["x", "y", "z"])):
        with pytest.raises(ValueError, match="no masks of task 'w'"):
            TaskMasks.from_state(d, ["x", "w"])
        with pytest.raises(ValueError, match="mask of a has shape"):
            TaskMasks.from_state(d, weights={"a": torch.zeros(5, 41)})
    with pytest.raises(ValueError, match="does not read"):
        TaskMasks.from_state({**tm.state(["x", "y", "z"]), "layout": "uint8-bits"})
