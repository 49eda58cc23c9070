"""`python -m harmodt.study`: its statistics on inputs with known answers, how a Ctrl-C stops it (its
child processes, also one starting at that moment), and a tiny study that runs end to end, resumes
after an interruption and draws every figure."""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from _synthetic import trajectory
from harmodt.masks import TaskMasks
from harmodt.study import checks as checks_mod
from harmodt.study import runner as runner_mod
from harmodt.study.__main__ import build_parser
from harmodt.study.figures import draw_figures
from harmodt.study.plan import Arm, Run, StudyError, flag_for_key, machine_name, method_arm, parse_sweep, parse_variant, run_name, variant_label
from harmodt.study.comparisons import along_training, family, pairwise
from harmodt.study.mask_movement import mask_flips_bound_fraction
from harmodt.study.report import aggregate, summary_markdown
from harmodt.study.runner import Study
from harmodt.study.stats import classical_mds, holm, jaccard_matrix, paired_bootstrap, paired_difference, paired_t, t_interval
from harmodt.study.unseen import aggregate_unseen, default_thresholds, parse_thresholds, unseen_mode

TASKS = ["reach-v3", "drawer-close-v3"]


# ---- statistics ----------------------------------------------------------------------------

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


def test_sweep_parsing_and_names():
    assert parse_sweep("masks.eta_max=100,2000") == ("masks.eta_max", ["100", "2000"])
    assert flag_for_key("masks.eta_max") == "--eta-max" and flag_for_key("sparsity") == "--sparsity"
    assert run_name("harmodt-f", 1, ("masks.eta_max", "2000")) == "harmodt-f-eta_max2000-s1"
    assert variant_label("HarmoDT-F", ("masks.eta_max", "2000")) == "HarmoDT-F eta_max=2000"
    for bad in ("eta_max", "eta_max=", "=1,2", "eta_max=1,1"):
        with pytest.raises(StudyError):
            parse_sweep(bad)


def test_variants_parse_into_labelled_arms_whose_flags_come_last(tmp_path):
    arm = parse_variant("HarmoDT-F official=harmodt-f --preset official --lam 0.5")
    assert arm == Arm("harmodt-f-official", "HarmoDT-F official", "harmodt-f", ("--preset", "official", "--lam", "0.5"))
    run = Run(tmp_path, arm, 0, None)
    assert run.name == "harmodt-f-official-s0" and run.variant == "HarmoDT-F official" and run.method == "harmodt-f"
    args = run.train_args("MT10", "data", ["--lam", "0.1", "--steps", "10"], 2, 0)
    assert args.index("--lam", args.index("0.1")) < args.index("0.5")  # the variant's flags after the shared ones
    assert args[-2:] == ["--threads", "2"]
    swept = Run(tmp_path, arm, 1, ("masks.eta_max", "400"))
    assert swept.name == "harmodt-f-official-eta_max400-s1" and swept.variant == "HarmoDT-F official eta_max=400"
    assert swept.train_args("MT10", "data", [], None, 0)[-2:] == ["--eta-max", "400"]
    for bad in ("harmodt-f --lam 1", "=harmodt-f", "X=", "X=--lam 1", "X=harmodt-f --seed 3", "X=harmodt-f 'unclosed"):
        with pytest.raises(StudyError):
            parse_variant(bad)


@pytest.mark.parametrize("extra,needle", [
    (["--variant", "HarmoDT-F=harmodt-f"], "repeats"),
    (["--variant", "A=nosuch"], "--variant: unknown nosuch"),
    (["--variant", "A=harmodt-f --eta-max 5", "--sweep", "eta_max=1,2"], "both given"),
    (["--eval-tasks", "reach-v3"], "is a training task"),
    (["--eval-tasks", "nosuch-v3"], "--eval-tasks"),
    (["--eval-tasks", "push-v3", "--vote-thresholds", "2"], "outside 0..1"),
    (["--vote-thresholds", "1"], "needs --eval-tasks"),
    (["--family", "HarmoDT-F-Prompt-DT"], "not \"LABEL - LABEL\""),
    (["--family", "HarmoDT-F - MTDT"], "'MTDT', which is not an arm"),
])
def test_study_checks_variants_and_held_out_tasks(tmp_path, extra, needle):
    args, rest = build_parser().parse_known_args(["--out", str(tmp_path / "s"), "--tasks", ",".join(TASKS),
                                                  "--methods", "prompt-dt,harmodt-f", "--seeds", "0", *extra])
    with pytest.raises(StudyError, match=needle.replace(".", r"\.")):
        Study(args, rest, "python -m harmodt.study").check()


def test_vote_thresholds_default_to_quarters_of_the_training_tasks():
    assert default_thresholds(20) == [5, 10, 15]
    assert default_thresholds(10) == [3, 5, 8]  # 2.5 and 7.5 round half up
    assert default_thresholds(2) == [1]  # at least 1, below N
    assert parse_thresholds("", 10) == [3, 5, 8] and parse_thresholds("0,9", 10) == [0, 9]
    for bad in ("10", "1,1", "a", "-1"):
        with pytest.raises(StudyError):
            parse_thresholds(bad, 10)
    assert unseen_mode({"method": "harmodt-r", "conditioning": "auto"}) == "masked"
    assert unseen_mode({"method": "prompt-dt", "conditioning": "auto"}) == "dense"
    assert unseen_mode({"method": "mtdt", "conditioning": "auto"}) == "skip"
    assert unseen_mode({"method": "mtdt", "conditioning": "prompt"}) == "dense"
    assert unseen_mode({"method": "prompt-dt", "conditioning": "task-state"}) == "skip"


def test_held_out_success_is_paired_with_prompt_dt_by_seed_and_task():
    """Each voted-mask row's Δ is its held-out success minus Prompt-DT's over the (seed, task) pairs
    both have (seed 2 has no HarmoDT-F run); Prompt-DT's own row and MTDT's have none."""
    pd = {0: (1.0, 0.0), 1: (0.5, 0.5), 2: (0.0, 0.0)}
    hf = {0: {"1": (1.0, 1.0), "3": (0.0, 0.0)}, 1: {"1": (0.0, 1.0), "3": (0.5, 0.5)}}

    def run(method, seed, evaluations, mode):
        evs = {key: {"tasks": {"a": {"success": s[0], "return": 10 * s[0]}, "b": {"success": s[1], "return": 10 * s[1]}},
                     "mean_success": sum(s) / 2, "mean_return": 5 * sum(s), **({"vote_density": 0.5} if key != "dense" else {})}
               for key, s in evaluations.items()}
        return {"variant": {"prompt-dt": "Prompt-DT", "harmodt-f": "HarmoDT-F", "mtdt": "MTDT"}[method], "method": method,
                "seed": seed, "status": "finished", "unseen": {"mode": mode, "evaluations": evs, "note": "skipped"}}

    runs = [run("prompt-dt", s, {"dense": v}, "dense") for s, v in pd.items()]
    runs += [run("harmodt-f", s, v, "masked") for s, v in hf.items()] + [run("mtdt", 0, {}, "skip")]
    rows = aggregate_unseen({"runs": runs, "variants": [], "eval_tasks": ["a", "b"], "vote_thresholds": [1, 3]})
    by = {(r["variant"], r.get("threshold")): r for r in rows}
    assert "vs_reference" not in by[("Prompt-DT", None)] and "vs_reference" not in by[("MTDT", None)]
    for t in (1, 3):
        diffs = [hf[s][str(t)][i] - pd[s][i] for s in (0, 1) for i in (0, 1)]
        m, lo, hi, pv = paired_t([np.mean(diffs[:2]), np.mean(diffs[2:])])  # seeds 0 and 1
        _, blo, bhi = paired_bootstrap(diffs)
        got = by[("HarmoDT-F", t)]["vs_reference"]
        assert got["reference"] == "Prompt-DT" and got["seeds"] == 2 and got["pairs"] == 4
        assert (got["mean_diff"], got["ci_low"], got["ci_high"]) == (pytest.approx(m), pytest.approx(lo), pytest.approx(hi))
        assert got["pairs_bootstrap"] == {"ci_low": blo, "ci_high": bhi}
    assert by[("HarmoDT-F", 1)]["vs_reference"]["mean_diff"] == pytest.approx(0.25)
    assert by[("HarmoDT-F", 3)]["vs_reference"]["mean_diff"] == pytest.approx(-0.25)


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


# ---- the CLI, end to end ---------------------------------------------------------------------

def write_synthetic_data(root, episodes=5):
    """The original HarmoDT layout (task folders of numbered npz files; the last two are prompts)."""
    rng = np.random.default_rng(0)
    for task in TASKS:
        (root / task).mkdir(parents=True)
        for i in range(episodes):
            tr = trajectory(rng, length=40)
            np.savez(root / task / f"{i}.npz", observations=tr.observations, actions=tr.actions, rewards=tr.rewards, dones=tr.dones)
    return root


TINY = ["--steps", "8", "--batch-size", "2", "--warmup-steps", "2", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
        "--context-len", "4", "--prompt-len", "2", "--update-every", "2", "--eta-max", "50", "--log-every", "2",
        "--checkpoint-every", "2"]


def study_cmd(data, out, *extra):
    return [sys.executable, "-m", "harmodt.study", "--tasks", ",".join(TASKS), "--methods", "prompt-dt,harmodt-f", "--seeds", "0,1",
            "--out", str(out), "--data", str(data), "--eval-episodes", "1", "--eval-seed", "7", *TINY, *extra]


def test_study_rejects_flags_it_sets_itself(tmp_path):
    proc = subprocess.run(study_cmd(tmp_path, tmp_path / "s", "--seed", "3"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--seed" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(study_cmd(tmp_path, tmp_path / "s", "--no-such-flag", "1"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def ignoring_sigint(cmd):
    """``cmd`` started with SIGINT ignored, as a shell without job control starts a background job
    (and as some test harnesses start pytest): Python then installs no KeyboardInterrupt handler."""
    code = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    return [sys.executable, "-c", code, *cmd[1:]]


def interrupted_when(cmd, path, poll: float):
    """Start ``cmd`` with SIGINT ignored (:func:`ignoring_sigint`), send it SIGINT once ``path``
    exists, and return (exit code, output)."""
    proc = subprocess.Popen(ignoring_sigint(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 150
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(poll)
    assert path.exists() and proc.poll() is None, proc.communicate()[0] if proc.poll() is not None else f"no {path.name} in time"
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=150)[0]
    return proc.returncode, output


def processes_using(path) -> list[str]:
    """Command lines of the running processes that name ``path`` (the study's runs)."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                cmdline = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(path) in cmdline:
                found.append(cmdline)
    return found


@pytest.fixture
def sigint_default():
    """This process with Python's Ctrl-C handler, so that its children start with the default SIGINT
    action even when pytest was started with SIGINT ignored."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]  # exit 0 after 120 s; 1 (KeyboardInterrupt) or -2 on SIGINT


def bare_study(tmp_path) -> Study:
    args, rest = build_parser().parse_known_args(["--out", str(tmp_path / "s"), "--methods", "prompt-dt", "--seeds", "0"])
    return Study(args, rest, "python -m harmodt.study")


def test_final_evaluations_take_the_study_eval_options(tmp_path, monkeypatch):
    """--eval-stop-at-success and --eval-precision reach every final evaluation's command (the
    defaults add nothing); bf16 is refused in one line on a CPU without bf16 instructions."""
    for extra, flags in (([], []), (["--eval-stop-at-success", "--eval-precision", "bf16"], ["--precision", "bf16", "--stop-at-success"])):
        args, rest = build_parser().parse_known_args(["--out", str(tmp_path / "s"), "--methods", "prompt-dt", "--seeds", "0", *extra])
        study = Study(args, rest, "python -m harmodt.study")
        run = study.runs[0]
        run.dir.mkdir(parents=True, exist_ok=True)
        seen = []
        monkeypatch.setattr(study, "child", lambda cmd, log, env: seen.append(cmd) or 1)
        assert not study.evaluate(run, [], tmp_path / "e.json", "eval.log", "evaluation", {})
        tail = seen[0][seen[0].index("--no-progress") + 1 :]
        assert tail == flags
    monkeypatch.setattr(checks_mod, "_cuda", lambda: False)
    monkeypatch.setattr(checks_mod, "bf16_matmul_note", lambda: "[harmodt] note: this CPU has no bf16 matrix instructions")
    with pytest.raises(StudyError, match="--eval-precision bf16 refused: this CPU has no bf16"):
        study.check()


def test_a_child_starting_while_the_study_stops_is_stopped_too(tmp_path, monkeypatch, sigint_default):
    """The Ctrl-C lands between a child's start and its registration: stop_children must still
    reach it (before, it found no child and the run went on to its end)."""
    study = bare_study(tmp_path)
    real_popen = subprocess.Popen
    stoppers = []

    def popen_then_stop(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        stopper = threading.Thread(target=study.stop_children)  # the main thread's KeyboardInterrupt handling
        stopper.start()
        stopper.join(1.0)  # it sees no child yet unless it waits for this start to be registered
        stoppers.append(stopper)
        return proc

    monkeypatch.setattr(runner_mod.subprocess, "Popen", popen_then_stop)
    with open(tmp_path / "child.log", "w") as log:
        rc = study.child(SLEEPER, log, dict(os.environ))
    stoppers[0].join(150)
    assert rc in (1, -signal.SIGINT), rc
    assert not study.children


def test_no_child_starts_once_the_study_stops(tmp_path, monkeypatch):
    study = bare_study(tmp_path)
    study.stop_children()

    def no_popen(*args, **kwargs):
        raise AssertionError("a child was started after the study was stopped")

    monkeypatch.setattr(runner_mod.subprocess, "Popen", no_popen)
    with open(tmp_path / "child.log", "w") as log:
        assert study.child(SLEEPER, log, dict(os.environ)) == 130


def test_first_ctrl_c_interrupts_the_study_a_second_is_passed_to_its_children(tmp_path, sigint_default):
    study = bare_study(tmp_path)
    rcs = []
    with open(tmp_path / "child.log", "w") as log:
        worker = threading.Thread(target=lambda: rcs.append(study.child(SLEEPER, log, dict(os.environ))))
        worker.start()
        while not study.children:
            time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):
            study.on_signal(signal.SIGINT, None)
        assert study.stopping.is_set() and worker.is_alive()  # the first only interrupts the main thread
        study.on_signal(signal.SIGINT, None)  # the second goes on to the running child
        worker.join(150)
    assert rcs and rcs[0] in (1, -signal.SIGINT), rcs


def test_ctrl_c_during_an_evaluation_stops_the_evaluator(tmp_path):
    """A one-run study started with SIGINT ignored, interrupted once its evaluation starts: the study
    exits 130, the evaluator is stopped by SIGINT (not killed after the grace period), no process is
    left and no evaluation file is written."""
    data = write_synthetic_data(tmp_path / "data")
    out = tmp_path / "study"
    cmd = [*study_cmd(data, out), "--threads-per-run", "1"]
    cmd[cmd.index("--methods") + 1], cmd[cmd.index("--seeds") + 1] = "prompt-dt", "0"
    code, log = interrupted_when(cmd, out / "runs" / "prompt-dt-s0" / "eval.log", poll=0.05)
    assert code == 130 and "interrupted" in log, log
    assert "stop  prompt-dt-s0: evaluation stopped" in log and "exit -9" not in log, log
    assert not (out / "runs" / "prompt-dt-s0" / "run_eval.json").exists()
    assert processes_using(out) == []


@pytest.mark.long
def test_tiny_study_resumes_and_draws_every_figure(tmp_path):
    data = write_synthetic_data(tmp_path / "data")
    out = tmp_path / "study"
    cmd = study_cmd(data, out, "--eval-every", "4", "--curve-episodes", "1", "--workers", "2", "--threads-per-run", "1")
    # first sitting: stopped with Ctrl-C (SIGINT) once the first run is evaluated (three runs are left then);
    # started with SIGINT ignored, which must not make the study deaf to it
    first = out / "runs" / "prompt-dt-s0" / "run_eval.json"
    code, log1 = interrupted_when(cmd, first, poll=0.2)
    assert "start prompt-dt-s0" in log1 and "done  prompt-dt-s0" in log1
    assert code == 130 and "interrupted" in log1, log1
    assert "FAIL" not in log1 and "exit -9" not in log1, log1  # the runs were stopped by SIGINT, not killed
    assert processes_using(out) == []  # no trainer or evaluator goes on after the study
    stamp = first.stat().st_mtime_ns
    # second sitting: the same command skips the finished run and resumes or starts the others
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "skip  prompt-dt-s0" in proc.stdout
    assert first.stat().st_mtime_ns == stamp
    assert proc.stdout.count("done  ") + proc.stdout.count("skip  ") == 4
    for name in ("harmodt-f-s0", "prompt-dt-s1", "harmodt-f-s1"):  # every training command resumes its folder
        assert "--resume" in (out / "runs" / name / "train.log").read_text()
    study = json.loads((out / "study.json").read_text())
    assert study["complete"] and len(study["runs"]) == 4
    for r in study["runs"]:
        assert r["status"] == "finished" and set(r["tasks"]) == set(TASKS) and r["config"]["steps"] == 8
        assert r["train_seconds"] > 0 and r["eval_seconds"] > 0
    for r in study["runs"]:  # final: the study's evaluation; best: the trainer's evaluations at steps 4 and 8
        assert r["final"] == {"mean_success": r["mean_success"], "step": 8, "episodes": 1, "eval_seed": 7}
        assert r["best"]["step"] in (4, 8) and r["best"]["evaluations"] == 2 and r["best"]["episodes"] == 1
    hf = [r for r in study["runs"] if r["method"] == "harmodt-f"]
    assert all(0 < r["final_mask_changed_fraction"] < 1 for r in hf)
    # every run was evaluated on the same goals: the evaluation command carries the shared seed
    for r in study["runs"]:
        assert "--seed 7" in (out / "runs" / r["name"] / "eval.log").read_text()
    assert {r["config"]["data"] for r in study["runs"]} == {str(data)}  # one shared dataset
    figures = {p.name for p in (out / "figures").glob("*.png")}
    assert figures == {"methods.png", "eval_success_vs_steps.png", "harmony_vs_steps.png", "mask_jaccard.png", "mask_mds.png",
                       "mask_changed_vs_steps.png"}
    assert "success_vs_sweep.png skipped" in proc.stdout  # no sweep: the only figure without data
    md = (out / "summary.md").read_text()
    assert "python -m harmodt.study" in md and "| HarmoDT-F | 2/2 |" in md and "vs Prompt-DT" in md
    assert "best during training" in md and "Ranking by final mean success" in md
    assert "Partial" not in md
    # a different budget in the same folder is refused instead of mixing runs
    proc = subprocess.run([*cmd, "--lr", "0.01"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "other flags" in proc.stderr


@pytest.mark.long
def test_tiny_study_chooses_the_best_checkpoint_on_validation_goals(tmp_path):
    """--validation-seed: every run's best.pt (chosen on the validation goals) is evaluated on the test
    goals beside its final checkpoint; the report pairs both by seed and draws the along-training figures."""
    data = write_synthetic_data(tmp_path / "data")
    out = tmp_path / "study"
    cmd = study_cmd(data, out, "--eval-every", "4", "--curve-episodes", "1", "--seeds", "0", "--validation-seed", "99")
    proc = subprocess.run([*cmd[:-2], "--validation-seed", "7"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--validation-seed 7 is the study's --eval-seed" in proc.stderr
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = json.loads((out / "study.json").read_text())
    assert study["complete"]
    for r in study["runs"]:
        run_dir = out / "runs" / r["name"]
        assert "--seed 7" in (run_dir / "eval.log").read_text() and "best.pt" in (run_dir / "eval.log").read_text()
        best = json.loads((run_dir / "run_best_eval.json").read_text())
        assert r["best"]["selected_on"] == "validation" and r["best"]["mean_success"] == best["mean_success"]
        assert r["best"]["step"] in (4, 8) and [s for s, _ in r["validation_curve"]] == [4, 8]
        assert r["machines"] == [machine_name()]  # the processor each run trained on
    assert [(d["variant"], d["reference"]) for d in study["along_training"]["differences"]] == [("HarmoDT-F", "Prompt-DT")]
    assert "paired_best" in study["variants"][1]
    figures = {p.name for p in (out / "figures").glob("*.png")}
    assert {"validation_success.png", "validation_differences.png"} <= figures
    assert "## Along training (validation goals)" in (out / "summary.md").read_text()


@pytest.mark.long
def test_tiny_study_with_a_variant_evaluates_held_out_tasks(tmp_path):
    """Two synthetic training tasks and push-v3 held out: the variant's runs are named and labelled by
    it, HarmoDT acts through the voted mask at each threshold, Prompt-DT once, MTDT is skipped with a
    note; a second sitting evaluates nothing again; the voted mask's density matches a hand count."""
    import torch

    data = write_synthetic_data(tmp_path / "data")
    out = tmp_path / "study"
    cmd = study_cmd(data, out, "--workers", "2", "--threads-per-run", "1", "--eval-tasks", "push-v3", "--vote-thresholds", "0,1",
                    "--variant", "HarmoDT-F tiny=harmodt-f --eta-max 20")
    cmd[cmd.index("--methods") + 1] = "mtdt,prompt-dt"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "note  mtdt-s0: no held-out evaluation" in proc.stdout
    study = json.loads((out / "study.json").read_text())
    assert study["eval_tasks"] == ["push-v3"] and study["vote_thresholds"] == [0, 1]
    assert {r["name"] for r in study["runs"]} == {f"{k}-s{s}" for k in ("mtdt", "prompt-dt", "harmodt-f-tiny") for s in (0, 1)}
    variant_run = next(r for r in study["runs"] if r["name"] == "harmodt-f-tiny-s1")
    assert variant_run["variant"] == "HarmoDT-F tiny" and variant_run["config"]["masks"]["eta_max"] == 20
    assert variant_run["train_command"].endswith("--eta-max 50 --log-every 2 --checkpoint-every 2 --eta-max 20")  # last wins
    for r in study["runs"]:
        assert "--tasks push-v3" in (out / "runs" / r["name"] / "unseen.log").read_text() if r["method"] != "mtdt" \
            else not (out / "runs" / r["name"] / "unseen.log").exists()
    rows = {(r["variant"], r.get("threshold")): r for r in study["unseen"]}
    assert set(rows) == {("MTDT", None), ("Prompt-DT", None), ("HarmoDT-F tiny", 0), ("HarmoDT-F tiny", 1)}
    assert rows[("MTDT", None)]["mode"] == "skip" and "task ID" in rows[("MTDT", None)]["note"]
    for key in (("Prompt-DT", None), ("HarmoDT-F tiny", 0), ("HarmoDT-F tiny", 1)):
        row = rows[key]
        runs = [r for r in study["runs"] if r["variant"] == key[0]]
        evals = [r["unseen"]["evaluations"]["dense" if key[1] is None else str(key[1])] for r in runs]
        m, lo, hi = t_interval([e["tasks"]["push-v3"]["return"] for e in evals])
        assert row["seeds"] == [0, 1] and row["per_task"]["push-v3"]["return"] == {"mean": m, "ci_low": lo, "ci_high": hi}
        assert row["train_tasks"]["mean_success"] == pytest.approx(np.mean([r["mean_success"] for r in runs]))
    for r in study["runs"]:  # Eq. 13 by hand: a weight is voted in when more than T training tasks keep it
        if r["method"] != "harmodt-f":
            continue
        masks = TaskMasks.from_state(torch.load(out / "runs" / r["name"] / "checkpoint.pt", weights_only=True)["masks"], TASKS).masks
        counts = np.concatenate([masks[n].numpy().astype(int).sum(0).reshape(-1) for n in sorted(masks)])
        for t in (0, 1):
            assert r["unseen"]["evaluations"][str(t)]["vote_density"] == pytest.approx((counts > t).mean())
        assert 0 < r["unseen"]["evaluations"]["1"]["vote_density"] < r["unseen"]["evaluations"]["0"]["vote_density"] <= 1
    md = (out / "summary.md").read_text()
    assert "## Unseen tasks (Eq. 13)" in md and "| HarmoDT-F tiny | 1 |" in md and "MTDT: not evaluated" in md
    assert "HarmoDT-F tiny = `harmodt-f --eta-max 20`" in md and "| HarmoDT-F tiny | 2/2 |" in md
    assert (out / "figures" / "success_vs_vote_threshold.png").exists()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/unseen_*.json")}
    assert len(stamps) == 6  # 2 Prompt-DT + 2 x 2 HarmoDT-F
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200)  # resumable: nothing is evaluated again
    assert proc.returncode == 0 and "] held-out " not in proc.stdout and proc.stdout.count("skip  ") == 6, proc.stdout[-2000:]
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/unseen_*.json")} == stamps


def test_a_running_child_reports_its_time_while_it_runs(tmp_path):
    """The study writes a trainer's time so far while it runs (a study killed outright keeps it)."""
    study = bare_study(tmp_path)
    study.wait_tick_s = 0.2
    ticks = []
    with open(tmp_path / "child.log", "w") as log:
        rc = study.child([sys.executable, "-c", "import time; time.sleep(1.5)"], log, dict(os.environ), on_wait=lambda: ticks.append(1))
    assert rc == 0 and len(ticks) >= 3


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
