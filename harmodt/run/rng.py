"""Every global random stream of the process (torch's CPU generator, the CUDA generator of the
training device, numpy's and Python's), captured and restored: a checkpoint holds them so that a
resumed run draws what the uninterrupted one would, and evaluation leaves them as they were."""

from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed torch's CPU generator (and CUDA's), numpy's and Python's with ``seed``."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def capture(device: torch.device) -> dict:
    """The global streams as tensors and plain types (``torch.load(weights_only=True)`` reads them
    back): ``torch``, ``python``, ``numpy`` and, on a CUDA device, ``cuda``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore(state: dict, device: torch.device) -> None:
    """Set the global streams from :func:`capture`'s ``state`` (the CUDA one only on a CUDA device)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(_as_tuples(state["python"]))
    npr = state["numpy"]
    np.random.set_state((npr["name"], npr["keys"].numpy().astype(np.uint32), npr["pos"], npr["has_gauss"],
                         npr["gauss"]))


@contextmanager
def preserved(device: torch.device):
    """Inside, draw freely: on leaving, every global stream is back where it was."""
    state = capture(device)
    try:
        yield
    finally:
        restore(state, device)


def _as_tuples(x):
    """random.setstate wants the tuples that a checkpoint's round trip may have kept as lists."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
