"""The hostile inputs of a new user on tiny runs (2 tasks, 1-2 layers, a few steps): each stops with
one line and its exit code (2: a bad flag, file or data set; 130: Ctrl-C), never a traceback, and
never does something wrong with exit 0. Test goals that selected best.pt never score it, and a
resumed run knows its data.

Run as a script (``python tests/test_bad_inputs_hostile.py DIR [CODE [SECONDS]]``) it builds every row
under DIR, runs it (with the harmodt of CODE on PYTHONPATH, default this checkout; a row still running
after SECONDS is stopped) and prints the markdown table of command, exit code and line.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data_folders import tiny_train_args, write_ours  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASKS = "reach-v3,push-v3"
TINY = tiny_train_args(TASKS, steps=3, checkpoint_every=3, log_every=3)
# an unwritable location even for root: /proc takes no new file
UNWRITABLE = "/proc"


def python(args: list[str], code: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(code))  # (run in ``code``: `python -m` puts the working folder first on the path)
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=code)


def build(base: Path, code: Path = ROOT) -> dict:
    """A data folder, a finished tiny run, a best.pt of a run with --seed 1 --validation-seed 12345 (a
    copy of its checkpoint with that config), study.json files without runs."""
    from harmodt import checkpoint

    data = write_ours(base / "data", TASKS.split(","), episodes=4, length=30)
    flags = TINY + ["--data", str(data)]
    proc = python(["harmodt.train", *flags, "--out", str(base / "run")], code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = checkpoint.load(base / "run" / "checkpoint.pt")
    ck["config"] = dict(ck["config"], seed=1, validation_seed=12345, eval_episodes=1)
    (base / "selected").mkdir()
    checkpoint.save(ck, base / "selected" / "best.pt")
    for name, text in (("list", "[]"), ("noruns", '{"methods": []}')):
        (base / name).mkdir()
        (base / name / "study.json").write_text(text)
    (base / "afolder").mkdir()
    return {"base": base, "flags": flags, "data": data, "code": code}


def changed_data_resume(a: dict) -> list[str]:
    """A run of 3 steps continued to 6 after its data folder was written again with other content."""
    data2 = write_ours(a["base"] / "data2", TASKS.split(","), episodes=4, length=30)
    flags = [f if f != str(a["data"]) else str(data2) for f in a["flags"]]
    out = a["base"] / "resume-data"
    assert python(["harmodt.train", *flags, "--out", str(out)], a["code"]).returncode == 0
    write_ours(data2, TASKS.split(","), episodes=4, length=30, seed=5)  # regenerated: other episodes
    return ["harmodt.train", *flags, "--steps", "6", "--resume", "--allow-changed", "steps", "--out", str(out)]


def data_generate(a: dict, name: str, episodes: int, *extra: str) -> list[str]:
    return ["harmodt.data", "generate", "--tasks", "reach-v3", "--episodes", str(episodes), "--prompt-episodes", "1", "--workers", "1",
            "--no-progress", "--out", str(a["base"] / name), *extra]


def other_settings(a: dict) -> list[str]:
    assert python(data_generate(a, "gen", 1), a["code"]).returncode == 0
    return data_generate(a, "gen", 2)


def overwrite(a: dict) -> list[str]:
    assert python(data_generate(a, "gen2", 1), a["code"]).returncode == 0
    return ["harmodt.data", "generate", "--tasks", "push-v3", "--episodes", "1", "--prompt-episodes", "1", "--workers", "1",
            "--no-progress", "--overwrite", "--out", str(a["base"] / "gen2")]


def named(prefix: str, extra) -> str:
    """A folder of its own for each row (an accepted row must not meet another's files)."""
    return prefix + "".join(c if c.isalnum() else "_" for c in "".join(extra))[:60]


def train(a: dict, *extra: str, out: str | None = None) -> list[str]:
    return ["harmodt.train", *a["flags"], *extra, "--out", str(a["base"] / (out or named("x", extra)))]


def study(a: dict, *extra: str) -> list[str]:
    return ["harmodt.study", "--tasks", TASKS, "--methods", "harmodt-f", "--seeds", "1", "--data", str(a["data"]), "--out",
            str(a["base"] / named("study", extra)), *extra, "--steps", "3", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
            "--device", "cpu"]


# row -> (build(assets) -> module and arguments, the exit code, a piece of the line)
ROWS = {
    "train --grad-clip -1": (lambda a: train(a, "--grad-clip", "-1"), 2, "--grad-clip must be > 0 (a finite number), got -1.0"),
    "train --grad-clip 0": (lambda a: train(a, "--grad-clip", "0"), 2, "--grad-clip must be > 0"),
    "train --lr inf": (lambda a: train(a, "--lr", "inf"), 2, "--lr must be > 0 (a finite number), got inf"),
    "train --rtg-scale 0": (lambda a: train(a, "--rtg-scale", "0"), 2, "--rtg-scale must be > 0"),
    "train --tasks-per-batch 5 (2 tasks)": (lambda a: train(a, "--tasks-per-batch", "5", "--batch-size", "8"), 2,
                                            "--tasks-per-batch cannot exceed the number of tasks of --tasks (5 > 2)"),
    "train --max-ep-len 10 (30-step episodes)": (lambda a: train(a, "--max-ep-len", "10"), 2,
                                                 "--max-ep-len 10 is shorter than the data's longest episode"),
    "train --validation-seed -5": (lambda a: train(a, "--validation-seed", "-5"), 2, "--validation-seed must be in [0, 2147483647] (an integer) or -1 (off), got -5"),
    "train --n-head 0": (lambda a: train(a, "--n-head", "0"), 2, "--n-head must be >= 1 (an integer), got 0"),
    "train --n-layer 0": (lambda a: train(a, "--n-layer", "0"), 2, "--n-layer must be >= 1 (an integer), got 0"),
    "train --n-embd -4": (lambda a: train(a, "--n-embd", "-4"), 2, "--n-embd must be >= 1 (an integer), got -4"),
    "train --seed -3": (lambda a: train(a, "--seed", "-3"), 2, "--seed must be in [0, 2147483647] (an integer), got -3"),
    "train --state-dim 12": (lambda a: train(a, "--state-dim", "12"), 2, "--state-dim 12 does not match the data"),
    "train --config with \"steps\": \"20\"": (lambda a: ["harmodt.train", "--config", str(config_file(a)), "--out", str(a["base"] / "xc")], 2,
                                              "--steps must be an integer, got '20' (str)"),
    "train --out an existing unwritable folder": (lambda a: ["harmodt.train", *a["flags"], "--out", UNWRITABLE], 2,
                                                   f"--out {UNWRITABLE}: the folder is not writable"),
    "train --lr 1e30 (the loss goes NaN)": (lambda a: train(a, "--lr", "1e30", "--warmup-steps", "0", "--steps", "6", out="nan"), 2,
                                            "(mean of steps 1-3) at step 3: training stopped; no checkpoint was written"),
    "train --resume after the data were regenerated": (changed_data_resume, 2, "--resume: the data differ from those"),
    "evaluate --seed -1": (lambda a: ["harmodt.evaluate", str(a["base"] / "run" / "checkpoint.pt"), "--seed", "-1"], 2,
                           "argument --seed: must be in [0, 2147483647] (an integer), got -1"),
    "evaluate --out in an unwritable folder": (lambda a: ["harmodt.evaluate", str(a["base"] / "run" / "checkpoint.pt"), "--out",
                                                          f"{UNWRITABLE}/eval.json"], 2, f"the folder {UNWRITABLE} is not writable"),
    "evaluate --out an existing folder": (lambda a: ["harmodt.evaluate", str(a["base"] / "run" / "checkpoint.pt"), "--out",
                                                     str(a["base"] / "afolder")], 2, "is a folder; name a file"),
    "evaluate best.pt on the goals it was selected on (--seed 1 --validation-seed 12345)": (
        lambda a: ["harmodt.evaluate", str(a["base"] / "selected" / "best.pt")], 2,
        "comes from a run validated on these goals (its --validation-seed 12345)"),
    "study.recompute on a study.json of []": (lambda a: ["harmodt.study.recompute", str(a["base"] / "list")], 2, "not a study.json"),
    "study.recompute on a study.json without runs": (lambda a: ["harmodt.study.recompute", str(a["base"] / "noruns")], 2, "not a study.json"),
    "study.recompute on a folder without study.json": (lambda a: ["harmodt.study.recompute", str(a["base"] / "afolder")], 2,
                                                       "not a readable study.json"),
    "study --eval-seed -1": (lambda a: study(a, "--eval-seed", "-1"), 2, "--eval-seed must be in [0, 2147483647] (an integer), got -1"),
    "study --validation-seed 012345": (lambda a: study(a, "--validation-seed", "012345", "--eval-every", "3"), 2,
                                       "its --validation-seed 12345 is the study's --eval-seed"),
    "study --variant carrying --validation-seed 12345": (
        lambda a: study(a, "--variant", "F val=harmodt-f --validation-seed 12345", "--eval-every", "3"), 2,
        "its --validation-seed 12345 is the study's --eval-seed"),
    "data generate into a folder of other settings": (other_settings, 2, "holds a data set made with other settings (episodes 1 -> 2)"),
}


def config_file(a: dict) -> Path:
    path = a["base"] / "steps-text.json"
    path.write_text(json.dumps({"tasks": TASKS, "steps": "20"}))
    return path


def run_row(a: dict, row: str) -> tuple[list[str], subprocess.CompletedProcess]:
    argv = ROWS[row][0](a)
    return argv, python(argv, a["code"], a.get("timeout", 600))


def interrupted_generate(a: dict) -> subprocess.CompletedProcess:
    """``data generate`` stopped by Ctrl-C (SIGINT) while it rolls out episodes."""
    argv = data_generate(a, "interrupted", 200)
    proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(a["code"])), cwd=a["code"], start_new_session=True)
    time.sleep(10)  # (imports done; 200 episodes take far longer than this on any machine)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build(tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize("row", list(ROWS))
def test_hostile_input_is_one_line_and_its_exit_code(assets, row):
    argv, proc = run_row(assets, row)
    code, needle = ROWS[row][1], ROWS[row][2]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert needle in lines[0], lines[0]
    if argv[0] == "harmodt.evaluate":
        assert not list(Path(assets["base"] / "afolder").iterdir())  # nothing written, no stray .tmp


def test_nan_loss_leaves_valid_json_and_the_last_good_checkpoint(assets):
    """A loss gone NaN stops the run before its metric line: metrics.jsonl is JSON, and no checkpoint of NaN weights is written."""
    proc = python(train(assets, "--lr", "1e30", "--warmup-steps", "0", "--steps", "6", "--checkpoint-every", "1", out="nan1"))
    assert proc.returncode == 2 and "at step 2: training stopped; the last checkpoint" in proc.stderr, proc.stderr
    assert "is at step 1" in proc.stderr and "Traceback" not in proc.stderr
    out = assets["base"] / "nan1"
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    from harmodt import checkpoint

    ck = checkpoint.load(out / "checkpoint.pt")
    assert all(t.isfinite().all() for t in ck["model"].values() if t.is_floating_point())


def test_results_json_without_an_evaluation_is_valid_json(assets):
    res = json.loads((assets["base"] / "run" / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert res["mean_success"] is None and res["steps"] == 3


def test_overwrite_leaves_no_orphan_files(assets):
    proc = python(overwrite(assets))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (assets["base"] / "gen2").iterdir()) == [".push-v3.record.json", "curriculum.png", "manifest.json",
                                                                             "push-v3.npz"]


def test_ctrl_c_in_data_generate_is_one_line(assets):
    proc = interrupted_generate(assets)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [
        "[harmodt.data] interrupted: finished tasks are kept; run the same command again to continue"]


def table(base: Path, code: Path, timeout: float = 600) -> str:
    """The markdown table of every row, measured by running it with the harmodt of ``code`` (a row still
    running after ``timeout`` seconds is stopped and shown so: it was accepted)."""
    a = dict(build(base, code), timeout=timeout)
    lines = [f"FLAGS = {' '.join(a['flags']).replace(str(base) + '/', '')}", "", "| input | command | exit code | line |", "|---|---|---|---|"]
    short = lambda s: s.replace(" ".join(a["flags"]), "FLAGS").replace(str(base) + "/", "").replace("|", "\\|")  # noqa: E731

    def add(row, argv, proc):
        err = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("[harmodt] device=")]
        if not err:
            shown = "(no line)"
        elif len(err) == 1:
            shown = err[0]
        else:
            shown = f"{len(err)} lines, last: {err[-1]}"
        lines.append(f"| {row} | ``python -m {short(' '.join(argv))}`` | {proc.returncode} | ``{short(shown[:400])}`` |")

    for row in ROWS:
        try:
            argv, proc = run_row(a, row)
        except AssertionError as exc:  # a step before the row failed
            lines.append(f"| {row} | (setup failed: {exc}) | | |")
            continue
        except subprocess.TimeoutExpired as exc:
            lines.append(f"| {row} | ``python -m {short(' '.join(exc.cmd[2:]))}`` | (running) | ``accepted: still running after {timeout:.0f} s, stopped`` |")
            continue
        add(row, argv, proc)
    add("Ctrl-C during data generate", data_generate(a, "interrupted", 4), interrupted_generate(a))
    argv = overwrite(a)
    add("data generate --overwrite (other tasks)", argv, python(argv, code))
    lines.append(f"| (files after the overwrite) | ``ls -A gen2`` | | ``{' '.join(sorted(p.name for p in (base / 'gen2').iterdir()))}`` |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT, float(sys.argv[3]) if len(sys.argv) > 3 else 600))
