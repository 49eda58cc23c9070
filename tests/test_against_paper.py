"""`python -m harmodt.study.against_paper`: verdicts against the paper's MT50 numbers, from a study built by
the study's own aggregation (aggregate, pairwise)."""

import json

import numpy as np
import pytest

from harmodt.study.against_paper import AgainstPaperError, END, START, main, tables_markdown, write_between_markers
from harmodt.study.comparisons import pairwise
from harmodt.study.report import aggregate

TASKS = [f"task-{i}" for i in range(6)]
ARMS = {"MTDT": "mtdt", "Prompt-DT": "prompt-dt", "HarmoDT-R": "harmodt-r", "HarmoDT-F official": "harmodt-f"}


def make_study(means: dict, seeds=range(5), noise=0.02, rng_seed=0) -> dict:
    """A study whose arm ``v`` has per-seed mean success ``means[v]`` plus seed noise."""
    rng = np.random.default_rng(rng_seed)
    runs = []
    for s in seeds:
        for v, m in means.items():
            per_task = np.clip(m + noise * rng.standard_normal(len(TASKS)), 0, 1)
            runs.append({"name": f"{v}-s{s}", "variant": v, "arm": ARMS[v], "method": ARMS[v], "seed": s, "sweep": None,
                         "status": "finished", "train_seconds": 1.0, "mean_success": float(per_task.mean()),
                         "tasks": {t: {"success": float(x), "return": 0.0} for t, x in zip(TASKS, per_task)}})
    study = {"tasks": TASKS, "methods": ["mtdt", "prompt-dt", "harmodt-r"], "sweep": None, "runs": runs,
             "passthrough": ["--steps", "50000"]}
    study["variants"] = aggregate(study)
    study["pairwise"] = pairwise(study)
    return study


def claim_rows(text: str) -> dict:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and " − " in cells[0] and "(Table" in cells[1]:
            rows[cells[0]] = cells
    return rows


def test_verdicts_follow_direction_and_holm():
    # F far above Prompt-DT and MTDT; MTDT far above Prompt-DT (against the paper); F and R level
    study = make_study({"MTDT": 0.55, "Prompt-DT": 0.35, "HarmoDT-R": 0.70, "HarmoDT-F official": 0.70})
    rows = claim_rows(tables_markdown(study))
    assert set(rows) == {"HarmoDT-F − Prompt-DT", "HarmoDT-F − MTDT", "Prompt-DT − MTDT", "HarmoDT-F − HarmoDT-R"}
    assert rows["HarmoDT-F − Prompt-DT"][4] == "supports" and "†" in rows["HarmoDT-F − Prompt-DT"][2]
    assert rows["HarmoDT-F − MTDT"][4] == "supports"
    assert rows["Prompt-DT − MTDT"][4] == "contradicts"
    assert rows["HarmoDT-F − HarmoDT-R"][4] == "cannot tell"
    assert rows["HarmoDT-F − Prompt-DT"][1] == "+10.87 (Table 3)" and rows["HarmoDT-F − HarmoDT-R"][1] == "+6.81 (Table 2)"
    # our F − Prompt-DT is about +35 points: the paper's +10.87 lies below our interval; F − R about 0: +6.81 above it
    assert rows["HarmoDT-F − Prompt-DT"][5] == "below our interval"
    assert rows["HarmoDT-F − HarmoDT-R"][5] in ("above our interval", "inside")


def test_masked_gains_over_prompt_dt_are_set_beside_mtdt_on_the_same_seeds():
    study = make_study({"MTDT": 0.55, "Prompt-DT": 0.35, "HarmoDT-R": 0.56, "HarmoDT-F official": 0.54})
    text = tables_markdown(study)
    d = study["pairwise"]["MTDT"]["Prompt-DT"]
    note = next(line for line in text.splitlines() if line.startswith("Masked arms against Prompt-DT"))
    assert f"MTDT − Prompt-DT {100 * d['mean_diff']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]" in note
    assert "HarmoDT-F official − Prompt-DT" in note and "HarmoDT-R − Prompt-DT" in note and "5 seeds" in note
    assert "learned masks against random ones is HarmoDT-F − HarmoDT-R" in note and "validation goals" not in note
    study["pairwise_best"] = study["pairwise"]
    assert "on the checkpoints chosen on the validation goals" in tables_markdown(study)
    assert "Masked arms" not in tables_markdown(make_study({"Prompt-DT": 0.4, "HarmoDT-F official": 0.6}))


def test_a_gap_that_misses_holm_cannot_tell():
    # 3 seeds: a small F − Prompt-DT whose interval excludes 0 (p about 0.04) but that Holm over 6 comparisons does not keep
    study = make_study({"MTDT": 0.5, "Prompt-DT": 0.5, "HarmoDT-R": 0.5, "HarmoDT-F official": 0.52}, seeds=range(3), noise=0.01,
                       rng_seed=1)
    d = study["pairwise"]["HarmoDT-F official"]["Prompt-DT"]
    assert d["ci_low"] > 0 and d["p_value"] < 0.05 and not d["holm"]
    assert claim_rows(tables_markdown(study))["HarmoDT-F − Prompt-DT"][4] == "cannot tell"


def test_one_seed_says_so_and_arms_sit_beside_both_tables():
    study = make_study({"MTDT": 0.46, "Prompt-DT": 0.33, "HarmoDT-R": 0.49, "HarmoDT-F official": 0.48}, seeds=[0])
    text = tables_markdown(study)
    assert all(r[4] == "cannot tell (1 seed)" for r in claim_rows(text).values())
    r_row = next(line for line in text.splitlines() if line.startswith("| HarmoDT-R |"))
    assert r_row.endswith("| – | 75.39 ± 1.18 |")  # Table 3 has no HarmoDT-R
    f_row = next(line for line in text.splitlines() if line.startswith("| HarmoDT-F official |"))
    assert "72.80 ± 1.6" in f_row and "82.20 ± 0.40" in f_row
    assert "50000 steps" in text and "1 seed (0)" in text


def test_header_names_seeds_only_when_every_arm_has_the_same():
    study = make_study({"MTDT": 0.46, "Prompt-DT": 0.33}, seeds=[0, 1, 2])
    study["runs"] = [r for r in study["runs"] if not (r["variant"] == "Prompt-DT" and r["seed"] == 2)]
    study["variants"], study["pairwise"] = aggregate(study), pairwise(study)
    text = tables_markdown(study)
    header = text.splitlines()[0]
    assert "each arm's finished seeds (the seeds column)" in header and "(0, 1, 2)" not in header
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in text.splitlines()
            if line.startswith("| MTDT |") or line.startswith("| Prompt-DT |")}
    assert rows == {"MTDT": "3", "Prompt-DT": "2"}
    assert "3 seeds (0, 1, 2)" in tables_markdown(make_study({"MTDT": 0.46, "Prompt-DT": 0.33}, seeds=[0, 1, 2]))


def test_claims_need_both_arms():
    study = make_study({"Prompt-DT": 0.4, "HarmoDT-F official": 0.6})
    assert set(claim_rows(tables_markdown(study))) == {"HarmoDT-F − Prompt-DT"}


def test_two_arms_of_one_method_are_refused():
    study = make_study({"Prompt-DT": 0.4, "HarmoDT-F official": 0.6})
    extra = dict(next(v for v in study["variants"] if v["method"] == "harmodt-f"), variant="HarmoDT-F paper")
    study["variants"].append(extra)
    with pytest.raises(AgainstPaperError, match="both harmodt-f"):
        tables_markdown(study)


def test_write_replaces_only_the_marked_block(tmp_path, capsys):
    study_file = tmp_path / "study.json"
    study_file.write_text(json.dumps(make_study({"MTDT": 0.5, "Prompt-DT": 0.4, "HarmoDT-R": 0.6, "HarmoDT-F official": 0.6})))
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n{START}\nold table\n{END}\nafter\n")
    assert main([str(study_file), "--write", str(readme)]) == 0
    doc = readme.read_text()
    assert doc.startswith("# Title\n\nbefore\n" + START + "\nOurs: 6 tasks") and doc.endswith(END + "\nafter\n")
    assert "old table" not in doc and "| HarmoDT-F − Prompt-DT |" in doc
    assert main([str(study_file), "--write", str(readme)]) == 0 and readme.read_text() == doc  # idempotent


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    good = tmp_path / "study.json"
    good.write_text(json.dumps(make_study({"Prompt-DT": 0.4, "HarmoDT-F official": 0.6}, seeds=[0, 1])))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for argv, needle in (([str(tmp_path / "missing.json")], "no such study file"), ([str(bad)], "not a study.json"),
                         ([str(good), "--write", str(readme)], "needs one <!-- against-paper --> line")):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    with pytest.raises(AgainstPaperError):
        write_between_markers(readme, "x")
