"""Benchmark run setup and the results file.

* The ``cuda`` marker: benchmarks that need a GPU; they are skipped without CUDA. Run only them
  with ``python -m pytest bench/ --benchmark-only -m cuda``.
* Every benchmark runs with the allocator setting the CLIs use (``keep_freed_memory``), applied
  once before any benchmark module is imported.
* At the end of a run in which benchmarks recorded figures (``bench.common.record``), all of them
  are written to ``bench/results/<machine>.json`` (``HARMODT_BENCH_RESULTS`` names another file;
  ``HARMODT_BENCH_RESULTS=none`` writes none): the machine, torch/triton versions, the command,
  the load average and an fp32 GEMM rate before and after, each benchmark's variants (median/min/max ms), derived
  figures, table rows and the skipped benchmarks with their reasons. ``python -m bench.render``
  renders it as bench/figures.md's tables.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import torch

from harmodt.runtime import keep_freed_memory

from . import common

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_SKIPS: dict[str, str] = {}
_START: dict = {}


def gemm_gflops(reps: int = 10) -> float:
    """fp32 GEMM rate right now at the fc layer's training shape (600 x 256 @ 256 x 1024): how fast
    this machine is at the moment, next to the load average (a shared machine's rate drifts)."""
    x, w = torch.randn(600, 256), torch.randn(1024, 256)
    x @ w.T
    t = time.perf_counter()
    for _ in range(reps):
        x @ w.T
    return 2 * 600 * 256 * 1024 * reps / (time.perf_counter() - t) / 1e9


def _load() -> dict:
    d = {"loadavg": [round(x, 2) for x in os.getloadavg()], "gemm_fp32_gflops": round(gemm_gflops(), 1)}
    try:
        d["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return d


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one); run with -m cuda")
    keep_freed_memory()
    _START.update(time=time.time(), load=_load())


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPS[report.nodeid.split("::", 1)[-1]] = reason.removeprefix("Skipped: ")


def _command(config) -> str:
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                   if k.startswith("HARMODT_BENCH_") and k != "HARMODT_BENCH_RESULTS")
    return (env + " " if env else "") + "python -m pytest " + shlex.join(config.invocation_params.args)


def results_path(mach: dict) -> Path | None:
    where = os.environ.get("HARMODT_BENCH_RESULTS", "")
    if where.lower() in ("none", "0", "off"):
        return None
    return Path(where) if where else RESULTS_DIR / f"{mach['name']}.json"


def pytest_sessionfinish(session, exitstatus):
    if not common.RESULTS:
        return
    gpu = any(r["device"].startswith("cuda") for r in common.RESULTS)
    mach = common.machine(gpu)
    path = results_path(mach)
    if path is None:
        return
    doc = {
        "machine": mach,
        "command": _command(session.config),
        "threads": torch.get_num_threads(),
        "duration_s": round(time.time() - _START.get("time", time.time()), 1),
        "load_before": _START.get("load"),
        "load_after": _load(),
        "benchmarks": common.RESULTS,
        "skipped": dict(sorted(_SKIPS.items())),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=float) + "\n")
    os.replace(tmp, path)
    session.config._harmodt_results = path


def pytest_terminal_summary(terminalreporter, config):
    path = getattr(config, "_harmodt_results", None)
    if path is not None:
        terminalreporter.write_line(f"benchmark figures written to {path} (render: python -m bench.render {path})")
