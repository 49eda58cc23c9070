"""tests/gpu/: checks that need a CUDA device. Every test here carries the ``cuda`` marker
(``python -m pytest -m cuda`` runs them all) and each module skips itself without CUDA."""

from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.cuda)
