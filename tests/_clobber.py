"""The assets and row builders of tests/test_bad_inputs_clobber.py: a data folder, a finished tiny run
and a study folder, each tool's ``main`` run in this process, a folder's bytes hashed, and the changed
copies (checkpoints, data folders, configs) the rows refuse."""

import contextlib
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from _data_folders import task_arrays, tiny_train_args, write_ours
from harmodt import checkpoint


ROOT = Path(__file__).resolve().parent.parent
TASKS = "reach-v3,push-v3"
TINY = tiny_train_args(TASKS, steps=2, checkpoint_every=1, log_every=1)


def tool(module: str, argv: list[str]) -> tuple[int, str]:
    """``python -m module argv`` run in this process: its exit code and stderr."""
    import importlib

    try:
        main = importlib.import_module(module + ".__main__").main  # (a package run with -m)
    except ModuleNotFoundError:
        main = importlib.import_module(module).main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


def folder_hash(path: Path) -> str:
    """The names and bytes of every file under ``path``."""
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def python(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, **kw)


def build(base: Path) -> dict:
    """A data folder, a finished tiny run, a copy of that run without its checkpoint, a study folder."""
    data = write_ours(base / "data", TASKS.split(","), episodes=4, length=30)
    flags = TINY + ["--data", str(data)]
    code, err = tool("harmodt.train", [*flags, "--out", str(base / "run")])
    assert code == 0, err
    shutil.copytree(base / "run", base / "nock")
    (base / "nock" / "checkpoint.pt").unlink()
    a = {"base": base, "data": data, "flags": flags, "ck": base / "run" / "checkpoint.pt"}
    (base / "study").mkdir()
    module, argv = study(a, base / "study", "mtdt")
    (base / "study" / "command.txt").write_text(shlex.join(["python", "-m", module, *argv]) + "\n")
    (base / "others").mkdir()
    shutil.copyfile(base / "run" / "checkpoint.pt", base / "others" / "other.pt")
    return a


def bad_checkpoint(a: dict, name: str, change) -> str:
    """A copy of the run's checkpoint changed by ``change(ck)``, as ``NAME.pt``."""
    ck = checkpoint.load(a["ck"])
    change(ck)
    path = a["base"] / f"{name}.pt"
    checkpoint.save(ck, path)
    return str(path)


def evaluate(a: dict, ck: str, *extra: str) -> tuple[str, list[str]]:
    return "harmodt.evaluate", [ck, "--episodes", "1", "--device", "cpu", "--no-progress", *extra]


def data_copy(a: dict, name: str, change_manifest=None, arrays=None) -> Path:
    """A copy of the data folder with its manifest (and reach-v3's arrays) changed: ``change_manifest(m)``
    changes the dict ``m`` or returns the manifest's new text."""
    out = a["base"] / name
    shutil.copytree(a["data"], out)
    if arrays is not None:
        from _data_folders import rewrite_task_file

        rewrite_task_file(out, "reach-v3", arrays(task_arrays(out, "reach-v3")))
    if change_manifest is not None:
        m = json.loads((out / "manifest.json").read_text())
        text = change_manifest(m)
        (out / "manifest.json").write_text(json.dumps(m) if text is None else text)
    return out


def train_on(a: dict, data: Path, name: str) -> tuple[str, list[str]]:
    flags = [f if f != str(a["data"]) else str(data) for f in a["flags"]]
    return "harmodt.train", [*flags, "--out", str(a["base"] / name)]


def huge_offsets(arrs: dict) -> dict:
    big = 2 ** 62  # starts + lengths wraps around in int64
    return dict(arrs, episode_starts=np.array([big] * 4, np.int64), episode_lengths=np.array([big] * 4, np.int64))


def entry(m: dict, value) -> None:
    m["files"]["reach-v3"] = value


def swapped(m: dict) -> None:
    m["files"]["reach-v3"], m["files"]["push-v3"] = m["files"]["push-v3"], m["files"]["reach-v3"]


def outside(m: dict) -> None:
    m["files"]["reach-v3"]["file"] = "../../../outside.npz"


def config_file(a: dict, text: str) -> str:
    path = a["base"] / "twice.json"
    path.write_text(text)
    return str(path)


def study_json(a: dict) -> str:
    folder = a["base"] / "dupstudy"
    folder.mkdir(exist_ok=True)
    run = {"name": "mtdt-s0", "method": "mtdt", "arm": "mtdt", "label": "mtdt", "seed": 0, "status": "finished", "mean_success": 0.5}
    (folder / "study.json").write_text(json.dumps({"methods": ["mtdt"], "runs": [run, run]}))
    return str(folder)


def study(a: dict, out: Path, methods: str = "harmodt-f") -> tuple[str, list[str]]:
    return "harmodt.study", ["--tasks", TASKS, "--methods", methods, "--seeds", "1", "--data", str(a["data"]), "--out", str(out),
                             "--steps", "2", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--device", "cpu"]


def masks_none(ck: dict) -> None:
    ck["masks"] = None


def nan_weights(ck: dict) -> None:
    first = next(k for k, v in ck["model"].items() if v.is_floating_point())
    ck["model"][first] = torch.full_like(ck["model"][first], float("nan"))
