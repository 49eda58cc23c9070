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


def test_gpu_figures_stops_a_part_whole_at_its_limit(tmp_path):
    """bench/gpu_figures.sh with a stand-in python whose pytest leaves a child running (as pytest-xdist's
    workers outlive a pytest stopped alone): at the part's time limit the child is stopped too, so nothing
    of part 1 runs beside part 2's timings."""
    import os
    import time
    from pathlib import Path

    child_pid = tmp_path / "child.pid"
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
if [ "$1" = -c ]; then echo fake-gpu-torch0.0; exit 0; fi
sleep 300 &
echo $! > {child_pid}
sleep 300
""")
    fake.chmod(0o755)
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHON=str(fake), PARTS="tests", TESTS_S="2", OUT=str(tmp_path / "out"))
    start = time.monotonic()
    proc = subprocess.run(["bash", str(repo / "bench" / "gpu_figures.sh")], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120)
    assert time.monotonic() - start < 60, proc.stdout
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the part failed (stopped by its limit)
    assert "time limit (2 s): stopping the part" in (tmp_path / "out" / "fake-gpu-torch0.0-tests-gpu.txt").read_text()
    pid = int(child_pid.read_text())
    for _ in range(50):  # the group's KILL has been sent before the script returns; reaping may lag a moment
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the part's child {pid} outlived the part")
