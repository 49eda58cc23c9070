"""A full disk while a run appends to its logs (metrics.jsonl, TensorBoard's event file) stops with
one line naming the folder, exit 2, and the run resumes from its checkpoint.

Each case runs the real `python -m harmodt.train` in a process of its own, with the failing write
injected from outside (a wrapper script), as a full disk makes it fail."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data_folders import tiny_train_args, write_ours  # noqa: E402

from harmodt import checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASKS = "reach-v3,push-v3"
TINY = tiny_train_args(TASKS, steps=4, checkpoint_every=2, log_every=1)

# metrics.jsonl: the run's file object is opened through the module's `open`; its third write fails
METRICS_FULL = """
import errno, sys
import harmodt.run.outputs as outputs
class Full:
    def __init__(self, fh): self.fh, self.n = fh, 0
    def write(self, b):
        self.n += 1
        if self.n == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.fh.write(b)
    def __getattr__(self, name): return getattr(self.fh, name)
outputs.open = lambda *a, **k: Full(open(*a, **k))
"""
# TensorBoard: its writer thread's 5th record fails; the error surfaces at the next scalar or flush
EVENTS_FULL = """
import errno, sys
from tensorboard.summary.writer import record_writer
real, n = record_writer.RecordWriter.write, [0]
def write(self, data):
    n[0] += 1
    if n[0] == 5:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(self, data)
record_writer.RecordWriter.write = write
"""
RUN = """
import sys
from harmodt import train
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_ours(tmp_path_factory.mktemp("disk") / "data", TASKS.split(","), episodes=4, length=30)


def train(args: list[str], prelude: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", prelude + RUN, *args], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)


@pytest.mark.parametrize("prelude,where,name", [(METRICS_FULL, "", "metrics.jsonl"), (EVENTS_FULL, "/tb", "events")],
                         ids=["metrics.jsonl", "tensorboard"])
def test_disk_full_while_logging_is_one_line_and_the_run_resumes(tmp_path, data, prelude, where, name):
    out = tmp_path / "run"
    proc = train([*TINY, "--data", str(data), "--out", str(out)], prelude)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.fullmatch(rf"error: {re.escape(str(out) + where)}: no space left on the device to append to {name} "
                        r"\((\d+ bytes needed, )?\d+ bytes free\); a resumed run continues from its last checkpoint", lines[0]), lines[0]
    done = train([*TINY, "--data", str(data), "--out", str(out), "--resume"])
    assert done.returncode == 0, done.stderr
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 4
