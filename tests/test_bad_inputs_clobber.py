"""Nothing lost, nothing executed: outputs that would replace a run's, a data set's or a study's files,
a folder another process writes into, checkpoints that hold code or nonsense, data that claim what
they are not, and the last tracebacks. Each row stops with one line ``error: ...`` and exit code 2,
and the folder it targets is byte-identical afterwards (hashed before and after).

The rows call each tool's ``main`` in this process (stderr captured); the cases that need a process
of their own (a pickle payload, two trainings at once, a full disk) are tests below the table.
Run as a script (``python tests/test_bad_inputs_clobber.py DIR``) it builds every row under DIR and
prints the markdown table of command, exit code and line (docs/errors.md holds it).
"""

import json
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # (run as a script: the shared test modules beside it)
from _clobber import (ROOT, TASKS, bad_checkpoint, build, config_file, data_copy, entry, evaluate, folder_hash,  # noqa: E402
                      huge_offsets, masks_none, nan_weights, outside, python, study, study_json, swapped, tool, train_on)

from harmodt import checkpoint  # noqa: E402


# row -> (build(assets) -> (module, argv), the folder whose bytes must stay (relative to the assets' base), a piece of the line)
ROWS = {
    # outputs never clobber inputs
    "evaluate --out its own checkpoint": (lambda a: evaluate(a, str(a["ck"]), "--out", str(a["ck"])), "run",
                                          "run/checkpoint.pt, which this command reads; name another file"),
    "evaluate --out a run's results.json": (lambda a: evaluate(a, str(a["ck"]), "--out", str(a["base"] / "run" / "results.json")), "run",
                                            "results.json: is a file of the run in"),
    "evaluate --out a data set's manifest.json": (lambda a: evaluate(a, str(a["ck"]), "--out", str(a["data"] / "manifest.json")), "data",
                                                  "manifest.json: is a file of the data set in"),
    "evaluate --out another checkpoint": (lambda a: evaluate(a, str(a["ck"]), "--out", str(a["base"] / "others" / "other.pt")), "others",
                                          "other.pt: is a checkpoint, which this command did not write; name a new file, or pass --overwrite"),
    "train --out a run folder without its checkpoint.pt": (lambda a: ("harmodt.train", [*a["flags"], "--out", str(a["base"] / "nock")]),
                                                           "nock", "holds the files of a run (config.json, metrics.jsonl"),
    "train --resume --out a finished run without its checkpoint.pt": (
        lambda a: ("harmodt.train", [*a["flags"], "--resume", "--out", str(a["base"] / "nock")]), "nock", "without its checkpoint.pt"),
    "train --out a data folder": (lambda a: ("harmodt.train", [*a["flags"], "--out", str(a["data"])]), "data", "holds a data set"),
    "train --out a study folder": (lambda a: ("harmodt.train", [*a["flags"], "--out", str(a["base"] / "study")]), "study",
                                   "is a study's folder"),
    "data generate --out a run folder": (lambda a: ("harmodt.data", ["generate", "--tasks", "reach-v3", "--episodes", "1", "--out",
                                                                     str(a["base"] / "run")]), "run", "holds the files of a training run"),
    "data card --out a data folder --name manifest": (
        lambda a: ("harmodt.data", ["card", "--tasks", "reach-v3", "--out", str(a["data"]), "--name", "manifest"]), "data",
        "manifest.json: is a file of the data set in"),
    "data export --minari inside the data folder": (lambda a: ("harmodt.data", ["export", str(a["data"]), "--minari", str(a["data"] / "m")]),
                                                    "data", "Minari datasets go into a root of their own"),
    "checkpoint convert onto itself": (lambda a: ("harmodt.checkpoint", ["convert", str(a["ck"]), str(a["ck"])]), "run",
                                       "which this command reads"),
    "checkpoint convert onto an existing checkpoint": (
        lambda a: ("harmodt.checkpoint", ["convert", str(a["base"] / "others" / "other.pt"), str(a["ck"])]), "run", "is a checkpoint"),
    "study --out a run folder": (lambda a: study(a, a["base"] / "run"), "run", "holds the files of a training run"),
    "study --out another study's folder": (lambda a: study(a, a["base"] / "study"), "study",
                                           "holds the study of another command (--methods differ"),
    # data checked for what they claim
    "manifest entry naming a file outside the folder": (lambda a: train_on(a, data_copy(a, "outside", outside), "x-outside"), "data",
                                                        "names the file '../../../outside.npz'"),
    "manifest entries swapped between tasks": (lambda a: train_on(a, data_copy(a, "swapped", swapped), "x-swapped"), "data",
                                               "the entry of reach-v3 names the file 'push-v3.npz'"),
    "manifest entry a string": (lambda a: train_on(a, data_copy(a, "string", lambda m: entry(m, "reach-v3.npz")), "x-string"), "data",
                                "the entry of reach-v3 must be an object whose 'file' names its task file"),
    "manifest entry without \"file\"": (lambda a: ("harmodt.data", ["inspect", str(data_copy(a, "nofile", lambda m: entry(m, {})))]),
                                        "data", "the entry of reach-v3 must be an object"),
    "manifest with a key twice": (lambda a: train_on(a, data_copy(a, "twicekey", lambda m: json.dumps(m)[:-1] + ', "tasks": []}'), "x-twice"),
                                  "data", "duplicated key 'tasks'"),
    "episode offsets that wrap around in int64": (lambda a: train_on(a, data_copy(a, "offsets", arrays=huge_offsets), "x-offsets"), "data",
                                                  "episode offsets do not fit the"),
    "--config giving \"steps\" twice": (lambda a: ("harmodt.train", ["--config", config_file(a, '{"steps": 3, "steps": 5}'), "--out",
                                                                     str(a["base"] / "x-cfg")]), "data", "duplicated key 'steps'"),
    "--config /dev/zero": (lambda a: ("harmodt.train", ["--config", "/dev/zero", "--out", str(a["base"] / "x-zero")]), "data",
                           "--config /dev/zero: larger than 1 MB"),
    "study.recompute with a run entry twice": (lambda a: ("harmodt.study.recompute", [study_json(a)]), "data",
                                               "the run entry 'mtdt-s0' appears 2 times"),
    # checkpoints checked for what they claim
    "checkpoint with NaN weights": (lambda a: evaluate(a, bad_checkpoint(a, "nanw", nan_weights)), "run", "its weights hold NaN or inf"),
    "checkpoint with a NaN target return": (lambda a: evaluate(a, bad_checkpoint(a, "nant", lambda ck: ck["eval_info"].update(
        target_return=float("nan")))), "run", "target_return nan is not a finite float32 number"),
    "checkpoint of a masked method with masks None": (lambda a: evaluate(a, bad_checkpoint(a, "nomask", masks_none)), "run",
                                                      "--method harmodt-f trains through per-task masks, but the checkpoint holds none"),
    "checkpoint config with n_head 0": (lambda a: evaluate(a, bad_checkpoint(a, "nhead", lambda ck: ck["config"]["model"].update(n_head=0))),
                                        "run", "its config is not one training accepts (--n-head must be >= 1"),
    "checkpoint config with rtg_scale 0": (lambda a: evaluate(a, bad_checkpoint(a, "rtg0", lambda ck: ck["config"].update(rtg_scale=0.0))),
                                           "run", "--rtg-scale must be > 0"),
    "checkpoint without state_mean": (lambda a: evaluate(a, bad_checkpoint(a, "nomean", lambda ck: ck["eval_info"].pop("state_mean"))),
                                      "run", "eval_info.state_mean has no tensor for reach-v3"),
    "checkpoint with rtg_scale 1e-36 (target / scale overflows float32)": (
        lambda a: evaluate(a, bad_checkpoint(a, "rtgtiny", lambda ck: (ck["config"].update(rtg_scale=1e-36),
                                                                       ck["eval_info"].update(rtg_scale=1e-36)))), "run",
        "target_return / rtg_scale (4500.0 / 1e-36) overflows float32"),
    "evaluate --target-return 1e39": (lambda a: evaluate(a, str(a["ck"]), "--target-return", "1e39"), "run",
                                      "/run/checkpoint.pt: target_return 1e+39 is not a finite float32 number"),
}


def run_row(a: dict, row: str) -> tuple[str, list[str], int, str, bool]:
    """(module, argv, exit code, stderr, whether the targeted folder kept its bytes) of ``row``."""
    module, argv = ROWS[row][0](a)
    target = a["base"] / ROWS[row][1]
    before = folder_hash(target)
    code, err = tool(module, argv)
    return module, argv, code, err, folder_hash(target) == before


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build(tmp_path_factory.mktemp("clobber"))


@pytest.mark.parametrize("row", list(ROWS))
def test_refused_in_one_line_and_nothing_changed(assets, row):
    module, argv, code, err, kept = run_row(assets, row)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (code, err)
    assert ROWS[row][2] in lines[0], lines[0]
    assert kept, f"{ROWS[row][1]} changed"
    assert not list(assets["base"].rglob("*.tmp-*")) and not list(assets["base"].rglob(".harmodt.lock"))


def test_overwrite_flag_lets_evaluate_replace_a_file_it_did_not_write(assets):
    """--overwrite is the explicit way to replace such a file (never the checkpoint evaluated); and an
    evaluation file of its own is replaced without it."""
    target = assets["base"] / "scratch"
    target.mkdir()
    shutil.copyfile(assets["ck"], target / "ck.pt")
    code, err = tool("harmodt.checkpoint", ["convert", str(assets["base"] / "others" / "other.pt"), str(target / "ck.pt"), "--overwrite"])
    assert code == 0, err
    code, err = tool("harmodt.checkpoint", ["convert", str(target / "ck.pt"), str(target / "ck.pt"), "--overwrite"])
    assert code == 2 and "which this command reads" in err


def test_convert_runs_no_code_from_the_file(tmp_path):
    """A pickle whose payload would create a marker file: ``checkpoint convert`` refuses it in one line
    and the marker never appears; an old-format checkpoint (numpy arrays) still converts."""
    marker = tmp_path / "marker"
    proc = python(["-c", f"""
import torch
class Payload:
    def __reduce__(self):
        return (open, ({str(marker)!r}, "w"))
torch.save({{"model": {{}}, "config": {{}}, "eval_info": {{}}, "x": Payload()}}, {str(tmp_path / 'evil.pt')!r})
"""])
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert not marker.exists()  # (torch.save pickles the payload; it runs only when unpickled)
    code, err = tool("harmodt.checkpoint", ["convert", str(tmp_path / "evil.pt"), str(tmp_path / "out.pt")])
    assert code == 2 and err.count("\n") == 1 and "needs Python objects beyond numpy arrays (" in err, err
    assert not marker.exists() and not (tmp_path / "out.pt").exists()
    code, err = tool("harmodt.evaluate", [str(tmp_path / "evil.pt"), "--device", "cpu"])
    assert code == 2 and not marker.exists()


def test_no_unpickling_anywhere_in_the_project():
    pattern = re.compile(r"weights_only\s*=\s*False|allow_pickle\s*=\s*True")
    found = [f"{p}:{i}" for folder in ("harmodt", "kernels", "bench") for p in (ROOT / folder).rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found


def test_two_trainings_started_together_leave_one_run_and_one_refusal(assets):
    """Two ``train --out o/twin`` at once: one finishes a complete run, the other stops with one line
    (the folder is in use by the first's pid, or, if the first finished before, its checkpoint exists)."""
    out = assets["base"] / "twin"
    flags = [*assets["flags"], "--steps", "30", "--out", str(out)]
    procs = [python(["-m", "harmodt.train", *flags, "--seed", str(seed)]) for seed in (1, 2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    ok = [i for i, (code, _) in enumerate(results) if code == 0][0]
    refused = [ln for ln in results[1 - ok][1].splitlines() if ln.startswith("error: ")]
    assert len(refused) == 1 and ("in use by another harmodt process (pid " in refused[0] or "checkpoint.pt exists" in refused[0]), refused
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["seed"] == ok + 1 and checkpoint.load(out / "checkpoint.pt")["config"]["seed"] == ok + 1
    assert json.loads((out / "results.json").read_text())["steps"] == 30
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 31))
    assert not (out / ".harmodt.lock").exists() and not list(out.glob("*.tmp-*"))


def test_a_held_lock_is_named_and_a_stale_one_taken_over(assets):
    """A folder another process writes into is refused naming its pid; a lock file left by a process
    that died (its pid written, no lock held) does not stop the next run."""
    out = assets["base"] / "locked"
    out.mkdir()
    holder = python(["-c", f"from harmodt.files import FolderLock\nimport sys, time\nwith FolderLock({str(out)!r}, 'x'):\n"
                           "    print('held', flush=True)\n    time.sleep(120)\n"])
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = tool("harmodt.train", [*assets["flags"], "--out", str(out)])
        assert code == 2 and f"--out {out}: in use by another harmodt process (pid {holder.pid}, lock file" in err, err
        assert sorted(p.name for p in out.iterdir()) == [".harmodt.lock"]
    finally:
        holder.kill()
        holder.wait()
    (out / ".harmodt.lock").write_text("999999999\n")  # a dead writer's lock file
    code, err = tool("harmodt.train", [*assets["flags"], "--out", str(out)])
    assert code == 0, err
    assert (out / "results.json").exists() and not (out / ".harmodt.lock").exists()


def test_disk_full_at_a_checkpoint_is_one_line_and_keeps_the_previous_one(assets):
    """ENOSPC while the second checkpoint is written (os.fsync made to fail there, as a full disk
    does): one line naming the folder and the bytes needed, exit 2; the step-1 checkpoint stays."""
    out = assets["base"] / "full"
    wrapper = """
import errno, os, sys
real, seen = os.fsync, []
def fsync(fd):
    if "checkpoint.pt.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
        seen.append(fd)
        if len(seen) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
    return real(fd)
os.fsync = fsync
from harmodt import train
sys.exit(train.main(sys.argv[1:]))
"""
    proc = python(["-c", wrapper, *assets["flags"], "--out", str(out)])
    code, err = proc.wait(timeout=600), proc.stderr.read()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert re.fullmatch(rf"error: {re.escape(str(out))}: no space left on the device to write checkpoint\.pt \(\d+ bytes needed, \d+ bytes free\); "
                        r"the previous checkpoint\.pt, if any, is kept", lines[0]), lines[0]
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 1 and not list(out.glob("*.tmp-*"))


def test_relative_minari_export_path_works(assets, monkeypatch):
    pytest.importorskip("minari")
    monkeypatch.chdir(assets["base"])
    code, err = tool("harmodt.data", ["export", "data", "--minari", "mroot"])
    assert code == 0, err
    from harmodt.data.minari import dataset_id

    for task in TASKS.split(","):
        assert (assets["base"] / "mroot" / dataset_id(task, "near-optimal") / "data").is_dir()
    assert not (assets["base"] / "mroot" / "mroot").exists()


def test_huge_observations_normalize_to_finite_states():
    """Finite observations x 1e20 (their squares overflow float32): the statistics come out finite (computed
    again in float64) and the states keep their spread; ordinary data keep the float32 statistics bit for bit."""
    from _synthetic import datasets
    from harmodt.data.batches import state_stats

    data = datasets(["reach-v3"])
    mean, std = state_stats(data, ["reach-v3"])
    obs = np.concatenate([t.observations for t in data["reach-v3"].trajectories])
    assert np.array_equal(mean["reach-v3"], obs.mean(0).astype(np.float32))
    for t in data["reach-v3"].trajectories:
        t.observations = t.observations * np.float32(1e20)
    mean, std = state_stats(data, ["reach-v3"])
    big = np.concatenate([t.observations for t in data["reach-v3"].trajectories])
    normed = (big - mean["reach-v3"]) / std["reach-v3"]
    assert np.isfinite(std["reach-v3"]).all() and 0.5 < normed.std() < 2


def table(base: Path) -> str:
    a = build(base)
    lines = ["| case | command | exit code | line |", "|---|---|---|---|"]
    for row in ROWS:
        module, argv, code, err, kept = run_row(a, row)
        shown = " ".join(ln for ln in err.splitlines() if ln.strip()).replace(str(base) + "/", "").replace("|", "\\|")
        cmd = f"python -m {module} {shlex.join(argv)}".replace(" ".join(a["flags"]), "FLAGS").replace(str(base) + "/", "").replace("|", "\\|")
        lines.append(f"| {row} | ``{cmd}`` | {code} | ``{shown[:300]}`` |" + ("" if kept else " (folder changed)"))
    return "\n".join(lines)


if __name__ == "__main__":
    t0 = time.time()
    print(table(Path(sys.argv[1])))
    print(f"({time.time() - t0:.0f} s)", file=sys.stderr)
