"""The study's statistics on inputs with known answers, and its report (aggregate per arm, every pair,
the pre-registered family, along training, mask movement) on made-up studies."""

import math

import numpy as np
import pytest

from _study import TASKS
from harmodt.masks import TaskMasks
from harmodt.study.comparisons import along_training, family, pairwise
from harmodt.study.figures import draw_figures
from harmodt.study.mask_movement import mask_flips_bound_fraction
from harmodt.study.plan import method_arm, run_name, variant_label
from harmodt.study.report import aggregate, summary_markdown
from harmodt.study.stats import classical_mds, holm, jaccard_matrix, paired_bootstrap, paired_difference, paired_t, t_interval


def test_t_interval_by_hand():
    # mean 0.6, sample sd 0.1, n 3: half width t(0.975, 2) * 0.1 / sqrt(3) = 4.302653 * 0.057735 = 0.248414
    m, lo, hi = t_interval([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6)
    assert hi - m == pytest.approx(0.248414, abs=1e-5) and m - lo == pytest.approx(0.248414, abs=1e-5)
    m, lo, hi = t_interval([0.4])
    assert m == 0.4 and math.isnan(lo) and math.isnan(hi)


def test_paired_t_by_hand():
    # differences 0.1, 0.3, 0.2: mean 0.2, sd 0.1, n 3, t = 0.2 / (0.1 / sqrt 3) = 3.4641; with 2 degrees of
    # freedom P(T <= t) = 1/2 + t / (2 sqrt(2 + t^2)), so p = 1 - t / sqrt(2 + t^2) = 0.074180
    m, lo, hi, p = paired_t([0.1, 0.3, 0.2])
    assert m == pytest.approx(0.2)
    assert hi - m == pytest.approx(0.248414, abs=1e-5) and m - lo == pytest.approx(0.248414, abs=1e-5)
    t = 0.2 / (0.1 / math.sqrt(3))
    assert p == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-10) and p == pytest.approx(0.074180, abs=1e-6)
    assert paired_t([0.1, 0.1]) == (pytest.approx(0.1), pytest.approx(0.1), pytest.approx(0.1), 0.0)
    assert paired_t([0.0, 0.0, 0.0])[3] == 1.0
    m, lo, hi, p = paired_t([0.3])
    assert m == 0.3 and math.isnan(lo) and math.isnan(hi) and math.isnan(p)


def test_paired_difference_takes_the_seed_as_the_unit():
    """3 seeds x 2 tasks: the interval comes from the 3 per-seed mean differences (0.1, 0.3, 0.2), not
    the 6 (seed, task) cells; the cell bootstrap is the labelled secondary interval."""
    ref = {0: {"a": 0.0, "b": 0.4}, 1: {"a": 0.5, "b": 0.1}, 2: {"a": 0.2, "b": 0.2}}
    arm = {0: {"a": 0.2, "b": 0.4}, 1: {"a": 0.9, "b": 0.3}, 2: {"a": 0.2, "b": 0.6}, 3: {"a": 1.0, "b": 1.0}}
    p = paired_difference(arm, ref, ["a", "b"], "Ref")
    m, lo, hi, pv = paired_t([0.1, 0.3, 0.2])
    assert p["seeds"] == 3 and p["pairs"] == 6 and p["per_seed"] == {"0": pytest.approx(0.1), "1": pytest.approx(0.3), "2": pytest.approx(0.2)}
    assert (p["mean_diff"], p["ci_low"], p["ci_high"], p["p_value"]) == (pytest.approx(m), pytest.approx(lo), pytest.approx(hi), pytest.approx(pv))
    _, blo, bhi = paired_bootstrap([0.2, 0.0, 0.4, 0.2, 0.0, 0.4])
    assert p["pairs_bootstrap"] == {"ci_low": blo, "ci_high": bhi}
    assert p["ci_high"] - p["ci_low"] > bhi - blo  # three replicates, not six
    assert paired_difference(arm, {7: ref[0]}, ["a", "b"], "Ref") is None


def test_holm_by_hand():
    # m = 4: sorted 0.005 <= 0.05/4, 0.011 <= 0.05/3 = 0.0167, 0.03 > 0.05/2: stop; 0.01 rejected too
    assert holm({"w": 0.03, "x": 0.005, "y": 0.011, "z": 0.04}) == {"x": True, "y": True, "w": False, "z": False}
    # every p below alpha, but the smallest is above alpha / m: nothing survives
    assert holm({"a": 0.02, "b": 0.03, "c": 0.04}) == {"a": False, "b": False, "c": False}
    assert holm({"a": 0.001, "b": float("nan")}) == {"a": True, "b": False}  # NaN counts in m (0.001 <= 0.025)


def test_paired_bootstrap_constant_differences_have_zero_width():
    m, lo, hi = paired_bootstrap([0.1] * 12)
    assert m == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)


def test_paired_bootstrap_is_seeded_and_brackets_the_mean():
    d = np.r_[np.zeros(15), np.ones(15)]  # mean 0.5, bootstrap sd of the mean sqrt(0.25 / 30) = 0.0913
    a, b = paired_bootstrap(d), paired_bootstrap(d)
    assert a == b
    m, lo, hi = a
    assert m == 0.5 and lo < 0.5 < hi
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 30), rel=0.1)


def test_jaccard_and_classical_mds():
    masks = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 0, 0]], bool)
    jac = jaccard_matrix(masks)
    np.testing.assert_allclose(jac, [[1, 1 / 3, 1], [1 / 3, 1, 1 / 3], [1, 1 / 3, 1]])
    pts = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [1.0, 1.0]])  # MDS recovers Euclidean distances exactly
    dist = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    xy, explained = classical_mds(dist)
    # LAPACK's eigh (numpy's OpenBLAS) on a 4x4 Gram matrix of norm ~25: backward error ~n * eps64 *
    # 25 ~ 2e-14 (measured 2e-15 with SkylakeX, Haswell and Prescott kernels); 1e-9 is loose but
    # tells an exact embedding from a wrong one.
    np.testing.assert_allclose(np.linalg.norm(xy[:, None] - xy[None], axis=-1), dist, atol=1e-9)
    np.testing.assert_allclose(explained.sum(), 1.0)  # planar points: two axes explain everything
    # four points at equal distances (a regular simplex) need three axes: two explain 2/3
    xy, explained = classical_mds(1.0 - np.eye(4))
    np.testing.assert_allclose(explained, [1 / 3, 1 / 3], atol=1e-12)


def fake_study(success: dict, sweep=None) -> dict:
    """A study dict of finished runs: success[(method, sweep value, seed)] = per-task successes."""
    runs = []
    for (method, value, seed), per_task in success.items():
        sw = None if value is None else (sweep, value)
        runs.append({"name": run_name(method, seed, sw), "arm": method, "method": method, "seed": seed,
                     "variant": variant_label(method_arm(method).label, sw),
                     "sweep": None if sw is None else {"key": sweep, "value": value}, "status": "finished",
                     "train_seconds": 1.0, "tasks": {t: {"success": s, "return": 10 * s} for t, s in zip(TASKS, per_task)},
                     "mean_success": float(np.mean(per_task))})
    methods = list(dict.fromkeys(k[0] for k in success))
    values = list(dict.fromkeys(k[1] for k in success)) if sweep else None
    return {"command": "python -m harmodt.study ...", "tasks": TASKS, "methods": methods, "seeds": [0, 1],
            "arms": [method_arm(m).label for m in methods],
            "sweep": None if sweep is None else {"key": sweep, "values": values}, "eval_episodes": 20, "eval_seed": 1,
            "bootstrap": {"seed": 1, "samples": 100}, "complete": True, "runs": runs}


def test_aggregate_paired_difference_from_prompt_dt():
    study = fake_study({("prompt-dt", None, 0): [0.2, 0.4], ("prompt-dt", None, 1): [0.6, 0.0],
                        ("harmodt-f", None, 0): [0.3, 0.5], ("harmodt-f", None, 1): [0.7, 0.1]})
    pd, hf = aggregate(study)
    assert pd["variant"] == "Prompt-DT" and "paired" not in pd
    assert pd["mean_success"] == pytest.approx(0.3)  # per-seed means 0.3 and 0.3: zero-width t-interval
    assert pd["ci_low"] == pytest.approx(0.3) and pd["ci_high"] == pytest.approx(0.3)
    assert hf["mean_success"] == pytest.approx(0.4)
    p = hf["paired"]
    assert p["reference"] == "Prompt-DT" and p["pairs"] == 4
    assert p["mean_diff"] == pytest.approx(0.1) and p["ci_low"] == pytest.approx(0.1) and p["ci_high"] == pytest.approx(0.1)
    assert hf["per_task"] == {"reach-v3": pytest.approx(0.5), "drawer-close-v3": pytest.approx(0.3)}
    study["variants"] = [pd, hf]
    pw = pairwise(study)
    assert pw["HarmoDT-F"]["Prompt-DT"]["mean_diff"] == pytest.approx(0.1)
    assert pw["Prompt-DT"]["HarmoDT-F"]["mean_diff"] == pytest.approx(-0.1)
    assert pw["Prompt-DT"]["HarmoDT-F"]["ci_low"] == pytest.approx(-0.1)
    md = summary_markdown(study)
    assert "| HarmoDT-F | 2/2 | 0.400 |" in md and "+0.100 (vs Prompt-DT)" in md and "reach-v3" in md


def test_tasks_at_zero_are_those_at_zero_in_every_finished_seed():
    # reach-v3 at zero in one seed only; drawer-close-v3 at zero in both seeds of Prompt-DT, in one of HarmoDT-F
    study = fake_study({("prompt-dt", None, 0): [0.0, 0.0], ("prompt-dt", None, 1): [0.5, 0.0],
                        ("harmodt-f", None, 0): [0.3, 0.0], ("harmodt-f", None, 1): [0.7, 0.1]})
    pd, hf = study["variants"] = aggregate(study)
    assert pd["tasks_at_zero"] == ["drawer-close-v3"] and hf["tasks_at_zero"] == []
    md = summary_markdown(study)
    assert "- Prompt-DT: 1 of 2 tasks (drawer-close-v3)" in md and "- HarmoDT-F: 0 of 2 tasks\n" in md


def test_pairwise_table_counts_its_comparisons_and_marks_holm_survivors():
    """Three arms, three seeds: 3 comparisons. HarmoDT-F beats Prompt-DT by 0.2 in every seed (zero
    variance: p = 0, survives); MTDT's differences vary (p well above 0.05 / 2): nothing else survives."""
    study = fake_study({("prompt-dt", None, 0): [0.2, 0.4], ("prompt-dt", None, 1): [0.6, 0.0], ("prompt-dt", None, 2): [0.4, 0.4],
                        ("harmodt-f", None, 0): [0.4, 0.6], ("harmodt-f", None, 1): [0.8, 0.2], ("harmodt-f", None, 2): [0.6, 0.6],
                        ("mtdt", None, 0): [0.3, 0.4], ("mtdt", None, 1): [0.3, 0.0], ("mtdt", None, 2): [0.9, 0.4]})
    study["variants"] = aggregate(study)
    pw = study["pairwise"] = pairwise(study)
    assert {p["comparisons"] for row in pw.values() for p in row.values()} == {3}
    assert pw["HarmoDT-F"]["Prompt-DT"]["holm"] and pw["Prompt-DT"]["HarmoDT-F"]["holm"]
    assert not pw["MTDT"]["Prompt-DT"]["holm"] and not pw["MTDT"]["HarmoDT-F"]["holm"]
    md = summary_markdown(study)
    assert "holds 3 comparisons" in md and "survives Holm's correction over all 3 at 5 %: HarmoDT-F vs Prompt-DT." in md
    assert "**+0.200 [+0.20, +0.20] †**" in md


def test_best_is_reported_beside_final_and_the_ranking_uses_final():
    study = fake_study({("prompt-dt", None, 0): [0.2, 0.4], ("prompt-dt", None, 1): [0.6, 0.0],
                        ("harmodt-f", None, 0): [0.3, 0.5], ("harmodt-f", None, 1): [0.7, 0.1]})
    best = {("prompt-dt", 0): (0.9, 40), ("prompt-dt", 1): (0.7, 20), ("harmodt-f", 0): (0.5, 60), ("harmodt-f", 1): (0.5, 80)}
    for r in study["runs"]:
        m, step = best[(r["method"], r["seed"])]
        r["best"] = {"mean_success": m, "step": step, "evaluations": 4, "episodes": 3, "tasks": {}}
    pd, hf = aggregate(study)
    assert pd["best"]["mean_success"] == pytest.approx(0.8) and hf["best"]["mean_success"] == pytest.approx(0.5)
    assert pd["best"]["per_seed"] == {"0": {"mean_success": 0.9, "step": 40}, "1": {"mean_success": 0.7, "step": 20}}
    assert hf["best"]["ci_low"] == pytest.approx(0.5) and hf["best"]["ci_high"] == pytest.approx(0.5)
    study["variants"] = [pd, hf]
    study["pairwise"] = pairwise(study)
    md = summary_markdown(study)
    assert "| final mean success |" in md and "best during training" in md
    assert "| HarmoDT-F | 2/2 | 0.400 |" in md and "| 0.500 | [0.500, 0.500] | 0.50 (60), 0.50 (80) |" in md
    # Prompt-DT has the higher best, HarmoDT-F the higher final: the ranking follows the final
    assert "Ranking by final mean success: HarmoDT-F (0.400) > Prompt-DT (0.300)." in md
    for r in study["runs"]:
        del r["best"]
    study["variants"] = aggregate(study)
    md = summary_markdown(study)
    assert "best during training" not in md and "| HarmoDT-F | 2/2 | 0.400 |" in md


def test_along_training_pairs_the_validation_curves_by_seed():
    """Three arms, three seeds, validation curves at steps 10 and 20: per step the t-interval over seeds,
    and paired t's over seeds for F − Prompt-DT, R − Prompt-DT and F − R (learned against fixed masks)."""
    success = {(m, None, s): [0.5, 0.5] for m in ("prompt-dt", "harmodt-r", "harmodt-f") for s in (0, 1, 2)}
    study = fake_study(success)
    curves = {"prompt-dt": [[0.2, 0.4], [0.3, 0.5], [0.1, 0.6]], "harmodt-r": [[0.3, 0.5], [0.3, 0.7], [0.2, 0.6]],
              "harmodt-f": [[0.4, 0.4], [0.5, 0.9], [0.3, 0.8]]}
    for r in study["runs"]:
        r["validation_curve"] = [[10, curves[r["method"]][r["seed"]][0]], [20, curves[r["method"]][r["seed"]][1]]]
    at = along_training(study)
    pd = at["variants"]["Prompt-DT"]["20"]
    m, lo, hi = t_interval([0.4, 0.5, 0.6])
    assert (pd["mean"], pd["ci_low"], pd["ci_high"], pd["seeds"]) == (pytest.approx(m), pytest.approx(lo), pytest.approx(hi), 3)
    pairs = [(d["variant"], d["reference"]) for d in at["differences"]]
    assert pairs == [("HarmoDT-R", "Prompt-DT"), ("HarmoDT-F", "Prompt-DT"), ("HarmoDT-F", "HarmoDT-R")]
    fr = at["differences"][2]["per_step"]
    # F − R per seed at step 10: 0.1, 0.2, 0.1 (mean 0.1333); t = mean / (sd / sqrt 3), 2 degrees of freedom
    d = np.array([0.1, 0.2, 0.1])
    t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
    assert fr["10"]["mean_diff"] == pytest.approx(d.mean())
    assert fr["10"]["p_value"] == pytest.approx(1 - t / math.sqrt(2 + t * t))  # the t(2) distribution's closed form
    assert fr["10"]["ci_low"] == pytest.approx(d.mean() - 4.302652729911275 * d.std(ddof=1) / math.sqrt(3))
    study["variants"] = aggregate(study)
    study["pairwise"] = pairwise(study)
    study["along_training"] = at
    md = summary_markdown(study)
    assert "## Along training (validation goals)" in md and "| HarmoDT-F − HarmoDT-R | 3 |" in md


def test_best_on_validation_is_compared_with_the_reference_by_seed():
    study = fake_study({("prompt-dt", None, 0): [0.2, 0.4], ("prompt-dt", None, 1): [0.6, 0.0],
                        ("harmodt-f", None, 0): [0.3, 0.5], ("harmodt-f", None, 1): [0.7, 0.1]})
    best = {("prompt-dt", 0): [0.4, 0.4], ("prompt-dt", 1): [0.6, 0.2], ("harmodt-f", 0): [0.6, 0.6], ("harmodt-f", 1): [0.8, 0.4]}
    for r in study["runs"]:
        b = best[(r["method"], r["seed"])]
        r["best"] = {"mean_success": float(np.mean(b)), "step": 20, "evaluations": 2, "episodes": 20, "selected_on": "validation",
                     "validation_mean_success": 0.9, "tasks": {t: {"success": x} for t, x in zip(TASKS, b)}}
    pd, hf = study["variants"] = aggregate(study)
    assert hf["best"]["selected_on"] == "validation" and "paired_best" not in pd
    assert hf["paired_best"]["mean_diff"] == pytest.approx(0.2) and hf["paired_best"]["per_seed"] == {"0": pytest.approx(0.2), "1": pytest.approx(0.2)}
    assert hf["paired"]["mean_diff"] == pytest.approx(0.1)  # the final checkpoints' difference is unchanged
    study["pairwise"] = pairwise(study)
    md = summary_markdown(study)
    assert "best on validation (test goals)" in md and "## Best on validation against the reference" in md
    assert "| HarmoDT-F − Prompt-DT | +0.200 |" in md


def test_pairwise_of_the_validation_chosen_checkpoints_is_a_family_of_its_own():
    """Three arms: the checkpoints chosen on validation differ by 0.2 in every seed where the final ones do not."""
    finals = {m: {s: [0.5, 0.5] for s in (0, 1, 2)} for m in ("prompt-dt", "harmodt-r", "mtdt")}
    finals["mtdt"][1] = [0.9, 0.1]
    study = fake_study({(m, None, s): v for m, per in finals.items() for s, v in per.items()})
    best = {"prompt-dt": [0.2, 0.4], "harmodt-r": [0.4, 0.6], "mtdt": [0.4, 0.6]}
    for r in study["runs"]:
        r["best"] = {"mean_success": float(np.mean(best[r["method"]])), "step": 20, "episodes": 20, "selected_on": "validation",
                     "tasks": {t: {"success": x + 0.01 * r["seed"]} for t, x in zip(TASKS, best[r["method"]])}}
    study["variants"] = aggregate(study)
    study["pairwise"], pb = pairwise(study), pairwise(study, key="best")
    assert pb["MTDT"]["Prompt-DT"]["mean_diff"] == pytest.approx(0.2) and pb["MTDT"]["Prompt-DT"]["holm"]
    assert pb["MTDT"]["Prompt-DT"]["comparisons"] == 3 and not pb["MTDT"]["HarmoDT-R"]["holm"]
    assert study["pairwise"]["MTDT"]["Prompt-DT"]["mean_diff"] == pytest.approx(0.0)
    study["pairwise_best"] = pb
    md = summary_markdown(study)
    assert "## Every pair of methods, best on validation" in md and "survives Holm's correction over all 3 at 5 %: HarmoDT-R vs Prompt-DT, MTDT vs Prompt-DT." in md
    for r in study["runs"]:
        r["best"]["selected_on"] = "test"  # chosen on the goals it is reported on: no such family
    assert pairwise(study, key="best") == {}


def test_budget_line_gives_each_moving_arm_its_schedule_and_the_eq12_bound():
    from harmodt.masks import alpha_total
    from harmodt.study.mask_movement import masked_and_active

    study = fake_study({("mtdt", None, 0): [0.5, 0.5], ("harmodt-r", None, 0): [0.5, 0.5], ("harmodt-f", None, 0): [0.5, 0.5]})
    model = {"n_layer": 1, "n_head": 2, "n_embd": 16}
    for r in study["runs"]:
        eta_max = 2400 if r["method"] == "harmodt-f" else 1600  # the shared flag, overridden by the moving arm's own
        r["config"] = {"steps": 1000, "batch_size": 8, "lr": 3e-4, "warmup_steps": 10, "quality": "near-optimal", "model": model,
                       "masks": {"sparsity": 0.2, "update_every": 250, "eta_min": 0, "eta_max": eta_max}}
    study["variants"] = aggregate(study)
    weights, active = masked_and_active(model, 0.2)
    assert weights == 12 * 16 * 16
    import torch
    from harmodt.config import ModelConfig
    from harmodt.masks import TaskMasks
    from harmodt.model import PromptDT

    shapes = {n: tuple(w.shape) for n, w in PromptDT(ModelConfig(**model), 2).masked_weights().items()}
    drawn = TaskMasks.erk(shapes, 2, 0.2, torch.Generator().manual_seed(0))  # the masks a run draws
    assert active == sum(int(m[1].sum()) for m in drawn.masks.values()) and abs(active - 0.8 * 12 * 16 * 16) < 4
    bound = alpha_total(1000, 250, 0, 2400)
    md = summary_markdown(study)
    assert (f"masks: sparsity 0.2, HarmoDT-F: t_m 250, eta_min 0, eta_max 2400; Eq. 12 lets a task switch at most {bound} weights off "
            f"(and as many on) over the run, {100 * bound / active:.2f} % of its {active} active weights.") in md
    assert "eta_max 1600" not in md
    study["runs"] = [r for r in study["runs"] if r["method"] != "harmodt-f"]
    assert "masks: sparsity 0.2, no arm's masks move (none learns them)." in summary_markdown(study)
    study["runs"] = [r for r in study["runs"] if r["method"] == "mtdt"]  # dense models only: no sparsity to report
    md = summary_markdown(study)
    assert "near-optimal data; no arm uses masks. Evaluation" in md and "sparsity" not in md.split("\n## ")[0]


def test_aggregate_sweep_of_one_method_beside_an_unswept_prompt_dt():
    study = fake_study({("prompt-dt", None, 0): [0.2, 0.4], ("harmodt-f", "100", 0): [0.3, 0.4],
                        ("harmodt-f", "2000", 0): [0.5, 0.6]}, sweep="masks.eta_max")
    study["sweep"]["values"] = ["100", "2000"]
    pd, f100, f2000 = aggregate(study)
    assert f100["paired"]["reference"] == "Prompt-DT" and f100["paired"]["mean_diff"] == pytest.approx(0.05)
    assert f2000["paired"]["reference"] == "Prompt-DT" and f2000["paired"]["mean_diff"] == pytest.approx(0.25)
    assert "paired_sweep" not in f100
    assert f2000["paired_sweep"]["reference"] == "HarmoDT-F eta_max=100" and f2000["paired_sweep"]["mean_diff"] == pytest.approx(0.2)
    study["variants"] = [pd, f100, f2000]
    assert "| HarmoDT-F eta_max=2000 | +0.200 | [–, –] | 1 |" in summary_markdown(study)  # one seed: no seed-level interval


def test_aggregate_sweep_without_prompt_dt_compares_with_the_first_value(tmp_path):
    study = fake_study({("harmodt-f", "100", 0): [0.2, 0.4], ("harmodt-f", "100", 1): [0.4, 0.4],
                        ("harmodt-f", "2000", 0): [0.0, 0.4], ("harmodt-f", "2000", 1): [0.2, 0.4]}, sweep="masks.eta_max")
    first, second = aggregate(study)
    assert "paired" not in first
    assert second["paired"]["reference"] == "HarmoDT-F eta_max=100"
    assert second["paired"]["mean_diff"] == pytest.approx(-0.1)
    assert second["paired_sweep"]["mean_diff"] == pytest.approx(-0.1)
    study["variants"] = [first, second]
    written = draw_figures(study, tmp_path, say=lambda m: None)
    assert {p.name for p in written} == {"methods.png", "success_vs_sweep.png"}  # no metrics or masks: the rest is skipped


def test_the_preregistered_family_is_corrected_over_itself_alone():
    """Three arms: the family holds HarmoDT-F − Prompt-DT (+0.2 in every seed, p 0) and MTDT −
    Prompt-DT (noisy); Holm over these 2, not over the 3 pairs of the whole table."""
    study = fake_study({("prompt-dt", None, 0): [0.2, 0.4], ("prompt-dt", None, 1): [0.6, 0.0], ("prompt-dt", None, 2): [0.4, 0.4],
                        ("harmodt-f", None, 0): [0.4, 0.6], ("harmodt-f", None, 1): [0.8, 0.2], ("harmodt-f", None, 2): [0.6, 0.6],
                        ("mtdt", None, 0): [0.3, 0.4], ("mtdt", None, 1): [0.3, 0.0], ("mtdt", None, 2): [0.9, 0.4]})
    study["family_spec"] = [["HarmoDT-F", "Prompt-DT"], ["MTDT", "Prompt-DT"]]
    study["variants"], study["pairwise"] = aggregate(study), pairwise(study)
    fam = study["family"] = family(study)
    first, second = fam["comparisons"]
    assert fam["size"] == 2 and first["mean_diff"] == pytest.approx(0.2) and first["holm"] and not second["holm"]
    assert second["p_value"] == pytest.approx(study["pairwise"]["MTDT"]["Prompt-DT"]["p_value"])
    md = summary_markdown(study)
    assert "## The pre-registered comparisons" in md and "| 1 | HarmoDT-F − Prompt-DT | 3 | +0.200 |" in md
    study["family_spec"] = [["HarmoDT-F", "HarmoDT-R"]]
    with pytest.raises(ValueError, match="HarmoDT-R"):
        family(study)
    study["family_spec"] = None
    assert family(study) is None


def test_reports_give_mask_movement_and_the_eq12_bound():
    import dataclasses

    from harmodt.config import MaskConfig, ModelConfig, TrainConfig
    from harmodt.masks import alpha_total

    cfg = dataclasses.asdict(TrainConfig(method="harmodt-f", steps=10_000, model=ModelConfig(n_layer=3, n_embd=128, n_head=4),
                                         masks=MaskConfig(update_every=500, eta_max=2400)))
    bound = alpha_total(10_000, 500, cfg["masks"]["eta_min"], 2400) / 471_858  # 3 x 128: ERK keeps 471,858 of 589,824 active
    assert mask_flips_bound_fraction(cfg) == pytest.approx(bound) and 0.05 < bound < 0.052
    assert mask_flips_bound_fraction({**cfg, "method": "harmodt-r"}) == 0.0
    big = {**cfg, "masks": {**cfg["masks"], "eta_max": 96_000}}
    assert mask_flips_bound_fraction(big) == (589_824 - 471_858) / 471_858  # no more than the initially masked: about 0.2 / 0.8
    assert mask_flips_bound_fraction({**cfg, "method": "prompt-dt"}) is None
    study = fake_study({("harmodt-r", None, 0): [0.2, 0.4], ("harmodt-f", None, 0): [0.4, 0.6]})
    for r in study["runs"]:
        r["config"] = {**cfg, "method": r["method"]}
    study["runs"][1].update(final_mask_changed_fraction=0.04, final_mask_changed_fraction_min=0.03)
    r, f = study["variants"] = aggregate(study)
    assert r["final_mask_changed_fraction"] == 0.0 and r["mask_flips_bound_fraction"] == 0.0
    assert f["final_mask_changed_fraction"] == 0.04 and f["mask_flips_bound_fraction"] == pytest.approx(bound)
    assert f"| HarmoDT-F | – | 0.04000 | 0.03000 | {bound:.4f} |" in summary_markdown(study)


def test_every_variant_of_a_study_has_its_own_colour(tmp_path):
    """Two labels whose stable colour is the same (both hash to tab:olive) are told apart within one study;
    a method's plain label keeps its method's colour."""
    from harmodt.study.figures import Figures, variant_color

    labels = ["MTDT", "Prompt-DT", "HarmoDT-R", "HarmoDT-S", "HarmoDT-F official", "Prompt-DT task-ID", "HarmoDT-F moving"]
    assert variant_color("HarmoDT-F official") == variant_color("Prompt-DT task-ID")
    colors = Figures({"variants": [{"variant": v} for v in labels], "runs": []}, tmp_path, None).colors
    assert len(set(colors.values())) == len(labels)
    assert colors["Prompt-DT"] == variant_color("Prompt-DT") and colors["HarmoDT-S"] == variant_color("HarmoDT-S")
    assert colors["HarmoDT-F official"] == variant_color("HarmoDT-F official")
