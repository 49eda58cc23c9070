"""Bad checkpoints and bad flags, one row each: the CLI (train, evaluate, checkpoint convert)
prints one line ``error: ...`` and exits with status 2, never a traceback, and a training run
refused for a flag writes nothing. The bad data files are in tests/test_bad_inputs_data.py.

Run as a script (``python tests/test_bad_inputs.py DIR``) it builds every row under DIR, runs it
and prints the markdown table of bad input, command, error line and exit code.
"""

import concurrent.futures
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data_folders import write_ours  # noqa: E402

TASKS = "reach-v3,push-v3"
TRAIN = ["--tasks", TASKS, "--steps", "3", "--batch-size", "4", "--n-layer", "2", "--n-embd", "32", "--n-head", "2",
         "--context-len", "5", "--prompt-len", "2", "--eval-episodes", "0", "--checkpoint-every", "3", "--device", "cpu",
         "--no-progress"]
CUDA = torch.cuda.is_available()


def build_assets(base: Path) -> dict:
    """A data folder, a finished 3-step run (its flags: TRAIN + --data) and bad checkpoints made
    from its checkpoint: truncated, old pickled format, weights of another shape than its config."""
    from harmodt import checkpoint
    from harmodt.config import ModelConfig
    from harmodt.methods import build_model

    data = write_ours(base / "data", TASKS.split(","), episodes=4, length=30)
    flags = TRAIN + ["--data", str(data)]
    proc = subprocess.run([sys.executable, "-m", "harmodt.train", *flags, "--out", str(base / "run")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    good = base / "run" / "checkpoint.pt"
    raw = good.read_bytes()
    bad = {}
    bad["truncated"] = base / "truncated.pt"
    bad["truncated"].write_bytes(raw[: len(raw) // 2])
    ck = checkpoint.load(good)
    old = dict(ck, eval_info=dict(ck["eval_info"], state_mean={t: v.numpy() for t, v in ck["eval_info"]["state_mean"].items()}))
    bad["unsafe"] = base / "unsafe.pt"
    torch.save(old, bad["unsafe"])  # numpy arrays pickled, as the older trainer did
    other = build_model(ModelConfig(n_layer=2, n_head=2, n_embd=64, context_len=5, prompt_len=2), 2, "harmodt-f")
    bad["shape"] = base / "shape.pt"
    checkpoint.save(dict(ck, model=other.state_dict()), bad["shape"])
    (base / "afile").write_text("a file, not a folder")
    return {"base": base, "flags": flags, "good": good, "afile": base / "afile", **bad}


def resume_dir(a: dict, name: str, ck: str) -> str:
    """A run folder holding the checkpoint ``ck`` ("good", "truncated", "unsafe", "shape")."""
    out = a["base"] / f"resume-{name}"
    out.mkdir(exist_ok=True)
    shutil.copy(a[ck], out / "checkpoint.pt")
    return str(out)


NO_TRITON = {"TRITON_INTERPRET": None}
# row -> (needs, build): build(assets) -> (module and arguments, environment changes, a piece of the line)
ROWS = {
    # ---- training flags ----
    "train: --backend without --fused": (None, lambda a: (["harmodt.train", "--backend", "cpu", "--out", f"{a['base']}/x"], {}, "--backend applies to the kernels of --fused")),
    "train: --log-every 0": (None, lambda a: (["harmodt.train", "--log-every", "0", "--out", f"{a['base']}/x"], {}, '--log-every must be >= 1 (an integer), got 0')),
    "train: --checkpoint-every 0": (None, lambda a: (["harmodt.train", "--checkpoint-every", "0", "--out", f"{a['base']}/x"], {}, '--checkpoint-every must be >= 1 (an integer), got 0')),
    "train: --threads -1": (None, lambda a: (["harmodt.train", "--threads", "-1", "--out", f"{a['base']}/x"], {}, '--threads must be >= 0')),
    "train: --episodes-per-task -1": (None, lambda a: (["harmodt.train", "--episodes-per-task", "-1", "--out", f"{a['base']}/x"], {}, '--episodes-per-task must be >= 0')),
    "train: --eval-every -1": (None, lambda a: (["harmodt.train", "--eval-every", "-1", "--out", f"{a['base']}/x"], {}, '--eval-every must be >= 0')),
    "train: --gen-episodes 0": (None, lambda a: (["harmodt.train", "--gen-episodes", "0", "--out", f"{a['base']}/x"], {}, '--gen-episodes must be >= 1 (an integer), got 0')),
    "train: --steps abc (not a number)": (None, lambda a: (["harmodt.train", "--steps", "abc", "--out", f"{a['base']}/x"], {}, "argument --steps: invalid int value: 'abc'")),
    "train: --steps 0": (None, lambda a: (["harmodt.train", "--steps", "0", "--out", f"{a['base']}/x"], {}, "--steps must be >= 1 (an integer), got 0")),
    "train: --sparsity 1.5": (None, lambda a: (["harmodt.train", "--sparsity", "1.5", "--out", f"{a['base']}/x"], {},
                                               "--sparsity must be in [0, 1)")),
    "train: --device tpu": (None, lambda a: (["harmodt.train", "--device", "tpu", "--out", f"{a['base']}/x"], {},
                                             "--device must be auto, cpu, cuda or cuda:N, got 'tpu'")),
    "train: --device cuda without CUDA": ("no-cuda", lambda a: (["harmodt.train", "--device", "cuda", "--out", f"{a['base']}/x"], {},
                                                                "--device cuda: CUDA is not available")),
    "train: --fused --backend triton without CUDA or TRITON_INTERPRET": (
        "no-cuda", lambda a: (["harmodt.train", "--device", "cpu", "--fused", "--backend", "triton", "--out", f"{a['base']}/x"], NO_TRITON,
                              "--backend triton cannot run on cpu: Triton needs CUDA tensors")),
    "train: --fused --backend cpu with HARMODT_SKIP_NATIVE=1": (
        None, lambda a: (["harmodt.train", "--device", "cpu", "--fused", "--backend", "cpu", "--out", f"{a['base']}/x"],
                         {"HARMODT_SKIP_NATIVE": "1"}, "--backend cpu cannot run on cpu: HARMODT_SKIP_NATIVE=1 is set")),
    "train: unknown task name": (None, lambda a: (["harmodt.train", "--tasks", "reach-v3,fly-v3", "--out", f"{a['base']}/x"], {},
                                                  "fly-v3")),
    "train: --out inside a file": (None, lambda a: (["harmodt.train", "--out", f"{a['afile']}/run"], {}, "cannot make the folder")),
    "train: --allow-changed without --resume": (None, lambda a: (["harmodt.train", "--allow-changed", "steps", "--out", f"{a['base']}/x"],
                                                                 {}, "--allow-changed applies to --resume only")),
    # ---- training --resume ----
    "train --resume: truncated checkpoint": (None, lambda a: (
        ["harmodt.train", *a["flags"], "--resume", "--out", resume_dir(a, "truncated", "truncated")], {}, "truncated, or not a torch checkpoint")),
    "train --resume: unsafe (old pickled) checkpoint": (None, lambda a: (
        ["harmodt.train", *a["flags"], "--resume", "--out", resume_dir(a, "unsafe", "unsafe")], {},
        "holds pickled Python objects, which are not loaded (unsafe)")),
    "train --resume: another model shape (--n-layer 3 --sparsity 0.5)": (None, lambda a: (
        ["harmodt.train", *a["flags"], "--n-layer", "3", "--sparsity", "0.5", "--resume", "--out", resume_dir(a, "layers", "good")], {},
        "model.n_layer (2 -> 3), masks.sparsity (0.2 -> 0.5); model.n_layer, masks.sparsity cannot change on --resume")),
    "train --resume: checkpoint weights of another shape than its config": (None, lambda a: (
        ["harmodt.train", *a["flags"], "--resume", "--out", resume_dir(a, "shape", "shape")], {}, "does not fit this model (RuntimeError")),
    "train --resume: more --steps without --allow-changed": (None, lambda a: (
        ["harmodt.train", *a["flags"], "--steps", "6", "--resume", "--out", resume_dir(a, "steps", "good")], {},
        "steps (3 -> 6); pass --allow-changed steps")),
    "train --resume: --allow-changed model.n_layer": (None, lambda a: (
        ["harmodt.train", *a["flags"], "--n-layer", "3", "--resume", "--allow-changed", "model.n_layer", "--out",
         resume_dir(a, "allow", "good")], {}, "--allow-changed: model.n_layer cannot change on --resume")),
    # ---- evaluation ----
    "evaluate: missing checkpoint": (None, lambda a: (["harmodt.evaluate", f"{a['base']}/none.pt", "--device", "cpu"], {},
                                                      "checkpoint not found")),
    "evaluate: truncated checkpoint": (None, lambda a: (["harmodt.evaluate", str(a["truncated"]), "--device", "cpu"], {},
                                                        "truncated, or not a torch checkpoint")),
    "evaluate: unsafe (old pickled) checkpoint": (None, lambda a: (["harmodt.evaluate", str(a["unsafe"]), "--device", "cpu"], {},
                                                                   "convert it with `python -m harmodt.checkpoint convert")),
    "evaluate: checkpoint weights of another shape than its config": (None, lambda a: (
        ["harmodt.evaluate", str(a["shape"]), "--device", "cpu"], {}, "the weights do not fit the model its config describes")),
    "evaluate: unknown task name": (None, lambda a: (["harmodt.evaluate", str(a["good"]), "--device", "cpu", "--tasks", "fly-v3"], {},
                                                     "--tasks: ")),
    "evaluate: --device tpu": (None, lambda a: (["harmodt.evaluate", str(a["good"]), "--device", "tpu"], {},
                                                "--device must be auto, cpu, cuda or cuda:N, got 'tpu'")),
    "evaluate: --device cuda without CUDA": ("no-cuda", lambda a: (["harmodt.evaluate", str(a["good"]), "--device", "cuda"], {},
                                                                   "--device cuda: CUDA is not available")),
    "evaluate: --fused --backend triton without CUDA or TRITON_INTERPRET": ("no-cuda", lambda a: (
        ["harmodt.evaluate", str(a["good"]), "--device", "cpu", "--fused", "--backend", "triton"], NO_TRITON,
        "--backend triton cannot run on cpu")),
    "evaluate: --batch-size 0": (None, lambda a: (["harmodt.evaluate", str(a["good"]), "--device", "cpu", "--batch-size", "0"], {},
                                                  "--batch-size must be at least 1")),
    "evaluate: --out in a folder that does not exist": (None, lambda a: (
        ["harmodt.evaluate", str(a["good"]), "--device", "cpu", "--out", f"{a['base']}/nowhere/eval.json"], {}, "does not exist")),
    "evaluate: --episodes 0": (None, lambda a: (["harmodt.evaluate", str(a["good"]), "--device", "cpu", "--episodes", "0"], {},
                                                "--episodes must be at least 1")),
    # ---- checkpoint conversion ----
    "checkpoint convert: truncated file": (None, lambda a: (
        ["harmodt.checkpoint", "convert", str(a["truncated"]), f"{a['base']}/converted.pt"], {}, "cannot read checkpoint: truncated")),
    "checkpoint convert: missing file": (None, lambda a: (
        ["harmodt.checkpoint", "convert", f"{a['base']}/none.pt", f"{a['base']}/converted.pt"], {}, "checkpoint not found")),
    "checkpoint convert: destination in a folder that does not exist": (None, lambda a: (
        ["harmodt.checkpoint", "convert", str(a["unsafe"]), f"{a['base']}/nowhere/converted.pt"], {}, "cannot write")),
}


def run_row(assets: dict, row: str) -> tuple[list[str], subprocess.CompletedProcess]:
    argv, env_change, _ = ROWS[row][1](assets)
    env = dict(os.environ)
    for k, v in env_change.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, env=env, timeout=300)
    return argv, proc


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every row's process, two at a time."""
    assets = build_assets(tmp_path_factory.mktemp("bad"))
    rows = [r for r, (needs, _) in ROWS.items() if not (needs == "no-cuda" and CUDA)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        done = dict(zip(rows, pool.map(lambda r: run_row(assets, r), rows)))
    return assets, done


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_is_one_error_line_and_exit_2(results, row):
    if ROWS[row][0] == "no-cuda" and CUDA:
        pytest.skip("CUDA is available here")
    assets, done = results
    argv, proc = done[row]
    needle = ROWS[row][1](assets)[2]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert needle in proc.stderr, proc.stderr
    if argv[0] == "harmodt.train" and "--resume" not in argv:
        assert not (assets["base"] / "x").exists()  # refused before any file was written
    if "--resume" in argv:  # the refused run left its checkpoint as it was
        out = Path(argv[argv.index("--out") + 1])
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]


def table(base: Path) -> str:
    """The markdown table of every row, measured by running it."""
    assets = build_assets(base)
    lines = [f"FLAGS = {' '.join(assets['flags']).replace(str(base) + '/', '')}", "",
             "| bad input | command | error line | exit code |", "|---|---|---|---|"]
    for row, (needs, _) in ROWS.items():
        if needs == "no-cuda" and CUDA:
            continue
        argv, proc = run_row(assets, row)
        env = {k: v for k, v in ROWS[row][1](assets)[1].items()}
        prefix = " ".join(f"{k}={v}" if v is not None else f"env -u {k}" for k, v in env.items())
        cmd = (prefix + " " if prefix else "") + "python -m " + " ".join(argv)
        err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        shown = err[-1] if len(err) == 1 else f"{len(err)} lines: " + " / ".join(err[-2:])
        short = lambda s: s.replace(" ".join(assets["flags"]), "FLAGS").replace(str(base) + "/", "").replace("|", "\\|")  # noqa: E731
        lines.append(f"| {row} | ``{short(cmd)}`` | ``{short(shown)}`` | {proc.returncode} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
