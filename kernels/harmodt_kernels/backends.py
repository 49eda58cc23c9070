"""What a kernel backend is, and the environment that decides where one can run: the leaf of
:mod:`kernels` that its other modules import (none of them imports the package's ``__init__``).

:class:`Backend` holds one backend's implementations and what they accept;
:class:`BackendUnavailable` says why one cannot run; :func:`triton_interpreted` and
:func:`native_skipped` are the one place each environment variable is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

__all__ = ["Backend", "BackendUnavailable", "native_skipped", "triton_interpreted"]


class BackendUnavailable(RuntimeError):
    """A requested kernel backend cannot run here."""


def triton_interpreted() -> bool:
    """Whether Triton kernels run under its CPU interpreter (``TRITON_INTERPRET=1``): the one
    place the variable is read."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def native_skipped() -> bool:
    """Whether ``HARMODT_SKIP_NATIVE=1`` keeps the native library unloaded: the one place the
    variable is read."""
    return os.environ.get("HARMODT_SKIP_NATIVE") == "1"


@dataclass(frozen=True)
class Backend:
    """One backend's implementations (trusting their arguments) and what they accept."""

    name: str
    devices: tuple | None  # device types its tensors may live on (None: any)
    linear_dtypes: tuple  # of x and weight
    adamw_dtypes: tuple  # of params and grads
    bool_masks: bool  # masked_linear and masked_adamw take bool masks as they are (else packed only)
    max_numel: int | None  # largest parameter (AdamW) or P (harmony_select)
    linear: Callable  # (x, weight, bias, masks, task_ids, task_grads, segments) -> y
    adamw: Callable  # (params, grads, exp_avgs, exp_avg_sqs, masks, steps, lr, beta1, beta2, eps, weight_decay, grad_scale, workspace)
    select: Callable  # (harmony, recovery, masks, k) -> packed masks
    dropout: Callable  # (x, p, seed) -> counter-based dropout of x (harmodt_kernels.reference.dropout's bits)
    # (x, weight, bias, masks, task_ids, relu, dropout_p, seed) -> y without task_grads, checking every argument
    # itself in its kernel (raising on a bad one) on a backend of one device type; None: the backend trusts its arguments
    linear_self_checked: Callable | None = None
