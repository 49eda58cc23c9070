"""The command-line benchmark scripts run end to end (one short round each), so they keep up with the
code they time."""

import json
import subprocess
import sys

import pytest


def run(*args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_surgery_step_script(tmp_path):
    out = tmp_path / "surgery.json"
    text = run("bench.surgery_step", "--rounds", "1", "--warmup", "0", "--threads", "1", "--out", str(out))
    assert "pcgrad, 5 tasks" in text and "cagrad rule alone" in text
    assert json.loads(out.read_text())


@pytest.mark.long
def test_profile_step_script():
    text = run("bench.profile_step", "--rounds", "1", "--steps", "1", "--top", "3")
    assert "fused" in text and "reference" in text and "peer" in text


@pytest.mark.long
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


def test_kernel_table_ranks_a_steps_kernels_by_gpu_time():
    """bench.profile_step.kernel_table (the GPU benchmark's top kernels of a graphed step): per-step
    GPU time, kernels and launch calls, and the top kernels by GPU time (ties by name)."""
    from bench.profile_step import kernel_table

    t = kernel_table([("a", 300.0, 20), ("b", 900.0, 10), ("c", 300.0, 4)], launches=12, steps=2, top=2)
    assert t["gpu_ms_per_step"] == 0.75 and t["kernels_per_step"] == 17 and t["launches_per_step"] == 6
    assert [r["kernel"] for r in t["top"]] == ["b", "a"]
    assert t["top"][0]["share"] == 0.6 and t["top"][0]["ms_per_step"] == 0.45 and t["top"][1]["calls_per_step"] == 10


def test_profile_step_kernels_without_cuda_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: tests/gpu runs the kernel table")
    proc = subprocess.run([sys.executable, "-m", "bench.profile_step", "--kernels"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == "--kernels: needs a CUDA GPU (torch.cuda.is_available() is False)"


@pytest.mark.slow
def test_gpu_scale_script_end_to_end_on_the_cpu(tmp_path):
    """bench/gpu_scale.sh's MT50 part at a tiny size on the CPU (two tasks, one layer, a few steps): data
    generated, both runs trained with their mask intervals, checkpoints and a final evaluation timed,
    each run's summary and the README table written, so that a GPU session spends nothing on discovery."""
    import os
    from pathlib import Path

    res = tmp_path / "results"
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "PARTS": "mt50", "TASKS": "reach-v3,push-v3", "EPISODES": "2",
           "STEPS": "6", "UPDATE_EVERY": "3", "STEPS_OFFICIAL": "4", "UPDATE_EVERY_OFFICIAL": "2", "EVAL_EPISODES": "1",
           "RUNS": str(tmp_path / "runs"), "DATA": str(tmp_path / "data"), "RESULTS": str(res),
           "TRAIN_EXTRA": "--n-layer 1 --n-head 2 --n-embd 16 --context-len 4 --prompt-len 2 --batch-size 2 --warmup-steps 1 "
                          "--checkpoint-every 2 --log-every 1 --threads 1"}
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(["bash", "bench/gpu_scale.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for label, steps, every, updates in (("tm3", 6, 3, 1), ("tm2", 4, 2, 1)):
        r = json.loads((res / f"{label}.json").read_text())
        assert r["exit_code"] == 0 and r["steps"] == steps and r["update_every"] == every and r["mask_updates"] == updates, r
        assert r["checkpoints"] == steps // 2 and r["checkpoint_s"] > 0 and r["checkpoint_mb"] > 0
        assert r["evaluations"] == 1 and r["evaluation_s"] > 0 and r["steps_per_s"] > 0 and r["hours_per_1e6_steps"] > 0
        assert "--preset paper-mt50" in r["command"] and r["device"].endswith("cores)")
        assert {p.name for p in (res / label).iterdir()} == {"config.json", "metrics.jsonl", "results.json"}
    table = (res / "README.md").read_text()
    assert "| tm3 | 6 | 3 |" in table and "| tm2 | 4 | 2 |" in table
