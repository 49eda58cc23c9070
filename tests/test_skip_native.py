"""Machines without the native build: with HARMODT_SKIP_NATIVE=1 the native library is not loaded,
--fused falls back to the plain-PyTorch reference with a one-line note, and training runs."""

import json
import os
import subprocess
import sys

from _data_folders import write_ours


def test_training_runs_on_the_plain_path_without_the_native_library(tmp_path):
    data = write_ours(tmp_path / "data")
    env = {**os.environ, "HARMODT_SKIP_NATIVE": "1"}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "harmodt.train", "--tasks", "reach-v3,push-v3", "--data", str(data), "--device", "cpu",
                        "--fused", "--steps", "3", "--batch-size", "2", "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
                        "--eval-episodes", "0", "--out", str(tmp_path / "run"), "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "masked_linear=reference" in r.stdout
    notes = [line for line in r.stdout.splitlines() if "note:" in line]
    assert len(notes) == 1 and "HARMODT_SKIP_NATIVE=1" in notes[0]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 3
