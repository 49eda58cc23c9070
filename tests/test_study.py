"""`python -m harmodt.study`: its arms, sweeps and checks, held-out tasks, the options of its final
evaluations, and a tiny study that runs end to end, resumes after an interruption and draws every
figure (statistics and the report: test_study_report.py; Ctrl-C: test_study_signals.py)."""

import json
import subprocess

import numpy as np
import pytest

from _study import TASKS, interrupted_when, processes_using, study_cmd, write_synthetic_data
from harmodt.masks import TaskMasks
from harmodt.study import checks as checks_mod
from harmodt.study.__main__ import build_parser
from harmodt.study.plan import Arm, Run, StudyError, flag_for_key, machine_name, parse_sweep, parse_variant, run_name, variant_label
from harmodt.study.runner import Study
from harmodt.study.stats import paired_bootstrap, paired_t, t_interval
from harmodt.study.unseen import aggregate_unseen, default_thresholds, parse_thresholds, unseen_mode


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


def test_study_rejects_flags_it_sets_itself(tmp_path):
    proc = subprocess.run(study_cmd(tmp_path, tmp_path / "s", "--seed", "3"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--seed" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(study_cmd(tmp_path, tmp_path / "s", "--no-such-flag", "1"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


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
