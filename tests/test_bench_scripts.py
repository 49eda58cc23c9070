"""The command-line benchmark scripts run end to end (one short round each), so they keep up with the
code they time."""

import json
import subprocess
import sys


def run(*args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_surgery_step_script(tmp_path):
    out = tmp_path / "surgery.json"
    text = run("bench.surgery_step", "--rounds", "1", "--warmup", "0", "--threads", "1", "--out", str(out))
    assert "pcgrad, 5 tasks" in text and "cagrad rule alone" in text
    assert json.loads(out.read_text())


def test_profile_step_script():
    text = run("bench.profile_step", "--rounds", "1", "--steps", "1", "--top", "3")
    assert "fused" in text and "reference" in text and "peer" in text


def test_overlap_script():
    text = run("bench.overlap", "--steps", "1", "--rounds", "1", "--episodes", "2", timeout=600)
    for way in ("simulator", "policy", "serial", "pipelined", "pipelined / serial"):
        assert way in text
