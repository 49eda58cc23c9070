"""The previous version's training step as a benchmark variant, run in a subprocess.

``HARMODT_BENCH_BASELINE`` names a checkout of an earlier harmodt (its native library built, if it
has one). :class:`BaselineStep` starts ``python`` in that directory, so it imports that
checkout's ``harmodt`` and ``harmodt_kernels``; the process builds a ``harmodt.train.Trainer`` on the same
synthetic data as this checkout's benchmarks (``bench.common.synthetic_datasets``, sent as source)
and then waits. Each call writes a step count to its stdin and reads back the ms per step it
measured, so the old step interleaves round by round with this checkout's steps while this process
waits idle. The worker uses only the API both versions share: ``TrainConfig(tasks, method,
progress, eval_episodes, fused, precision)``, ``validate``, ``Trainer(cfg, datasets)``,
``sample_tasks()`` and ``train_step()``. Nothing is written into the other checkout (no bytecode).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import synthetic_datasets

_WORKER = r"""
import json, os, sys, time
# the package roots: kernels/ holds harmodt_kernels
# (an older checkout links it at its root and keeps modules in kernels/)
sys.path[:0] = [".", "kernels"] if os.path.isdir("kernels/harmodt_kernels") else ["."]
spec = json.loads(sys.argv[1])
try:
    from harmodt.runtime import keep_freed_memory
    keep_freed_memory()
except ImportError:
    pass
import torch
import harmodt
from harmodt.config import TrainConfig, validate
from harmodt.train import Trainer
exec(spec["datasets_source"])
cfg = validate(TrainConfig(tasks=",".join(spec["tasks"]), method=spec["method"], progress=False, eval_episodes=0,
                           fused=spec["fused"], precision=spec["precision"]))
tr = Trainer(cfg, synthetic_datasets(spec["tasks"]))
print(json.dumps({"ready": harmodt.__file__, "threads": torch.get_num_threads()}), flush=True)
for line in sys.stdin:
    n = int(line)
    t = time.perf_counter()
    for _ in range(n):
        tr.train_step(tr.sample_tasks())
    print(json.dumps({"ms": (time.perf_counter() - t) / n * 1e3}), flush=True)
"""


def baseline_dir() -> Path | None:
    """The previous version's checkout (``HARMODT_BENCH_BASELINE``), or None when not set."""
    d = os.environ.get("HARMODT_BENCH_BASELINE")
    return Path(d) if d else None


def describe(path: Path) -> str:
    """The checkout's commit (``git rev-parse --short HEAD``), or its path when git cannot tell."""
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or str(path)
    except (OSError, subprocess.SubprocessError):
        return str(path)


class BaselineStep:
    """A training step of the checkout at ``path`` in a persistent subprocess; ``self(n)`` runs n
    steps there and returns its ms per step. Use as a context manager (the process ends on exit)."""

    def __init__(self, path: Path, tasks, method="harmodt-f", fused=True, precision="fp32"):
        spec = {"tasks": list(tasks), "method": method, "fused": fused, "precision": precision,
                "datasets_source": inspect.getsource(synthetic_datasets)}
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        env.pop("PYTHONPATH", None)
        self.path = Path(path)
        self._err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER, json.dumps(spec)], cwd=self.path, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True,
                                     bufsize=1)
        self.info = self._read("ready")
        if not str(self.info["ready"]).startswith(str(self.path.resolve())):
            self.close()
            raise RuntimeError(f"the baseline worker imported harmodt from {self.info['ready']}, not from {self.path}")
        self.commit = describe(self.path)

    def _read(self, key: str) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self._err.seek(0)
                tail = self._err.read()[-2000:]
                raise RuntimeError(f"the baseline worker in {self.path} stopped:\n{tail}")
            try:
                msg = json.loads(line)
            except ValueError:
                continue  # the old code's own prints
            if isinstance(msg, dict) and key in msg:
                return msg

    def __call__(self, n: int) -> float:
        self.proc.stdin.write(f"{n}\n")
        return float(self._read("ms")["ms"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._err.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
