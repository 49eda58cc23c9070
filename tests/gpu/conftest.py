"""tests/gpu/: checks that need a CUDA device. Every test here carries the ``cuda`` marker
(``python -m pytest -m cuda`` runs them all) and each module skips itself without CUDA.

``HARMODT_GPU_FAILURES=FILE``: each failure's report is appended to FILE as it happens, so that a
run stopped by a time limit (bench/gpu_figures.sh) keeps what failed and why."""

import os
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.cuda)


def pytest_runtest_logreport(report):
    path = os.environ.get("HARMODT_GPU_FAILURES")
    if path and report.failed and _HERE in Path(report.fspath).resolve().parents:
        with open(path, "a") as f:
            f.write(f"==== {report.nodeid} ({report.when}, {report.duration:.1f} s)\n{report.longreprtext}\n")
