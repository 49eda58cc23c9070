"""What a kernel backend is, and the environment that decides where one can run: the leaf of
:mod:`harmodt_kernels` that its other modules import (none of them imports the package's ``__init__``).

:class:`Backend` maps each op's name to the backend's implementation and says what they accept;
:class:`BackendUnavailable` says why one cannot run; :func:`triton_interpreted` and
:func:`native_skipped` are the one place each environment variable is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

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
    """One backend: its implementations by op name (``"masked_linear"``, ``"masked_adamw"``,
    ``"harmony_select"``, ``"dropout"``; each trusts its arguments, which the op checked) and what
    they accept. The op modules (``harmodt_kernels/ops/``) document each one's calling convention.
    An optional ``"masked_linear_self_checked"`` is a masked linear without ``task_grads`` that
    checks every argument itself in its kernel, raising on a bad one."""

    name: str
    devices: tuple | None  # device types its tensors may live on (None: any)
    linear_dtypes: tuple  # of x and weight
    adamw_dtypes: tuple  # of params and grads
    bool_masks: bool  # masked_linear and masked_adamw take bool masks as they are (else packed only)
    max_numel: int | None  # largest parameter (AdamW) or P (harmony_select)
    impls: dict = field(hash=False)  # op name -> implementation
