"""What the study's tests share: two tasks, a synthetic data set, a tiny study's command, a study
object with no run started, and watching a study's processes."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

from _synthetic import trajectory
from harmodt.study.__main__ import build_parser
from harmodt.study.runner import Study


TASKS = ["reach-v3", "drawer-close-v3"]


def write_synthetic_data(root, episodes=5):
    """The original HarmoDT layout (task folders of numbered npz files; the last two are prompts)."""
    rng = np.random.default_rng(0)
    for task in TASKS:
        (root / task).mkdir(parents=True)
        for i in range(episodes):
            tr = trajectory(rng, length=40)
            np.savez(root / task / f"{i}.npz", observations=tr.observations, actions=tr.actions, rewards=tr.rewards, dones=tr.dones)
    return root


TINY = ["--steps", "8", "--batch-size", "2", "--warmup-steps", "2", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
        "--context-len", "4", "--prompt-len", "2", "--update-every", "2", "--eta-max", "50", "--log-every", "2",
        "--checkpoint-every", "2"]


def study_cmd(data, out, *extra):
    return [sys.executable, "-m", "harmodt.study", "--tasks", ",".join(TASKS), "--methods", "prompt-dt,harmodt-f", "--seeds", "0,1",
            "--out", str(out), "--data", str(data), "--eval-episodes", "1", "--eval-seed", "7", *TINY, *extra]


def ignoring_sigint(cmd):
    """``cmd`` started with SIGINT ignored, as a shell without job control starts a background job
    (and as some test harnesses start pytest): Python then installs no KeyboardInterrupt handler."""
    code = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    return [sys.executable, "-c", code, *cmd[1:]]


def interrupted_when(cmd, path, poll: float):
    """Start ``cmd`` with SIGINT ignored (:func:`ignoring_sigint`), send it SIGINT once ``path``
    exists, and return (exit code, output)."""
    proc = subprocess.Popen(ignoring_sigint(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 150
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(poll)
    assert path.exists() and proc.poll() is None, proc.communicate()[0] if proc.poll() is not None else f"no {path.name} in time"
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=150)[0]
    return proc.returncode, output


def processes_using(path) -> list[str]:
    """Command lines of the running processes that name ``path`` (the study's runs)."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                cmdline = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(path) in cmdline:
                found.append(cmdline)
    return found


def bare_study(tmp_path) -> Study:
    args, rest = build_parser().parse_known_args(["--out", str(tmp_path / "s"), "--methods", "prompt-dt", "--seeds", "0"])
    return Study(args, rest, "python -m harmodt.study")
