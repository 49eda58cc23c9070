"""Offline data: generation from Meta-World v3 scripted experts, loading (ours, the original
layout and Minari datasets), export to Minari, and Prompt-DT batches."""

from .formats import DataError, TaskData, Trajectory, detect_layout, load_dataset

__all__ = ["DataError", "TaskData", "Trajectory", "detect_layout", "generate", "load_dataset"]


def generate(*args, **kwargs):
    """See :func:`harmodt.data.generate.generate` (imported lazily: it pulls in Meta-World)."""
    from .generate import generate as _generate

    return _generate(*args, **kwargs)
