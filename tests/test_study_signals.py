"""How a Ctrl-C or SIGTERM stops `python -m harmodt.study`: its child processes (also one starting at
that moment), a second Ctrl-C passed on to them, and a trainer's time written while it runs."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from _study import bare_study, interrupted_when, processes_using, study_cmd, write_synthetic_data
from harmodt.study import runner as runner_mod


@pytest.fixture
def sigint_default():
    """This process with Python's Ctrl-C handler, so that its children start with the default SIGINT
    action even when pytest was started with SIGINT ignored."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]  # exit 0 after 120 s; 1 (KeyboardInterrupt) or -2 on SIGINT


def test_a_child_starting_while_the_study_stops_is_stopped_too(tmp_path, monkeypatch, sigint_default):
    """The Ctrl-C lands between a child's start and its registration: stop_children must still
    reach it (before, it found no child and the run went on to its end)."""
    study = bare_study(tmp_path)
    real_popen = subprocess.Popen
    stoppers = []

    def popen_then_stop(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        stopper = threading.Thread(target=study.stop_children)  # the main thread's KeyboardInterrupt handling
        stopper.start()
        stopper.join(1.0)  # it sees no child yet unless it waits for this start to be registered
        stoppers.append(stopper)
        return proc

    monkeypatch.setattr(runner_mod.subprocess, "Popen", popen_then_stop)
    with open(tmp_path / "child.log", "w") as log:
        rc = study.child(SLEEPER, log, dict(os.environ))
    stoppers[0].join(150)
    assert rc in (1, -signal.SIGINT), rc
    assert not study.children


def test_no_child_starts_once_the_study_stops(tmp_path, monkeypatch):
    study = bare_study(tmp_path)
    study.stop_children()

    def no_popen(*args, **kwargs):
        raise AssertionError("a child was started after the study was stopped")

    monkeypatch.setattr(runner_mod.subprocess, "Popen", no_popen)
    with open(tmp_path / "child.log", "w") as log:
        assert study.child(SLEEPER, log, dict(os.environ)) == 130


def test_first_ctrl_c_interrupts_the_study_a_second_is_passed_to_its_children(tmp_path, sigint_default):
    study = bare_study(tmp_path)
    rcs = []
    with open(tmp_path / "child.log", "w") as log:
        worker = threading.Thread(target=lambda: rcs.append(study.child(SLEEPER, log, dict(os.environ))))
        worker.start()
        while not study.children:
            time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):
            study.on_signal(signal.SIGINT, None)
        assert study.stopping.is_set() and worker.is_alive()  # the first only interrupts the main thread
        study.on_signal(signal.SIGINT, None)  # the second goes on to the running child
        worker.join(150)
    assert rcs and rcs[0] in (1, -signal.SIGINT), rcs


def test_ctrl_c_during_an_evaluation_stops_the_evaluator(tmp_path):
    """A one-run study started with SIGINT ignored, interrupted once its evaluation starts: the study
    exits 130, the evaluator is stopped by SIGINT (not killed after the grace period), no process is
    left and no evaluation file is written."""
    data = write_synthetic_data(tmp_path / "data")
    out = tmp_path / "study"
    cmd = [*study_cmd(data, out), "--threads-per-run", "1"]
    cmd[cmd.index("--methods") + 1], cmd[cmd.index("--seeds") + 1] = "prompt-dt", "0"
    code, log = interrupted_when(cmd, out / "runs" / "prompt-dt-s0" / "eval.log", poll=0.05)
    assert code == 130 and "interrupted" in log, log
    assert "stop  prompt-dt-s0: evaluation stopped" in log and "exit -9" not in log, log
    assert not (out / "runs" / "prompt-dt-s0" / "run_eval.json").exists()
    assert processes_using(out) == []


def test_a_running_child_reports_its_time_while_it_runs(tmp_path):
    """The study writes a trainer's time so far while it runs (a study killed outright keeps it)."""
    study = bare_study(tmp_path)
    study.wait_tick_s = 0.2
    ticks = []
    with open(tmp_path / "child.log", "w") as log:
        rc = study.child([sys.executable, "-c", "import time; time.sleep(1.5)"], log, dict(os.environ), on_wait=lambda: ticks.append(1))
    assert rc == 0 and len(ticks) >= 3
