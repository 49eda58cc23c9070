"""Public kernel API: HarmoDT's three masked ops, the same calls on every backend.

Ops (see kernels/README.md):

* :func:`masked_linear` -- ``y[r] = x[r] @ (W * M[task_ids[r]]).T + b`` and its backward
  (``dX = dY (W * M_t)``, ``dW = sum_t M_t * dY_t^T X_t``), for one task or a mixed-task batch;
* :func:`masked_adamw_` -- AdamW on a list of parameters where each weight outside its mask stays
  bit-for-bit unchanged (the optimizer half of Eq. 11);
* :func:`harmony_select` -- Algorithm 2's mask/recover selection for every task at once.

Backends:

* ``"reference"``: plain PyTorch (`kernels/reference.py`), the single source of truth; any device.
* ``"triton"``: Triton kernels (`kernels/triton_*.py`); CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` is set.
* ``"cpu"``: native C++ ops (ATen's thread pool) built from `kernels/csrc/` by CMake (`kernels/cpu.py`).
* ``"auto"``: Triton on CUDA, the native op on CPU when it is built, else the reference.

The choice is made in one place, :func:`select_backends`, and handed down as a value
(:class:`KernelBackends`); each op takes a concrete ``backend=`` and never looks one up itself. A
backend that cannot run raises :class:`BackendUnavailable` naming why. ``kernels`` is a leaf
package: it never imports ``harmodt``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from . import reference
from .reference import num_words

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "KernelBackends",
    "available_backends",
    "harmony_select",
    "masked_adamw_",
    "masked_linear",
    "num_words",
    "pack_masks",
    "resolve_backend",
    "select_backends",
    "unpack_masks",
]

BACKENDS = ("auto", "triton", "cpu", "reference")
CONCRETE = ("triton", "cpu", "reference")


class BackendUnavailable(RuntimeError):
    """A requested kernel backend cannot run here."""


def triton_interpreted() -> bool:
    """Whether Triton kernels run under its CPU interpreter (``TRITON_INTERPRET=1``): the one
    place the variable is read."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on tensors of ``device``, else why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton is not importable ({exc})"
    if device.type == "cuda" or triton_interpreted():
        return None
    return f"Triton needs CUDA tensors (got {device.type}) or TRITON_INTERPRET=1 for the CPU interpreter"


def _cpu_reason(device: torch.device) -> str | None:
    """None when the native CPU ops can run on tensors of ``device``, else why not."""
    if device.type != "cpu":
        return f"the native ops take CPU tensors (got {device.type})"
    try:
        from . import cpu
    except ImportError as exc:  # pragma: no cover - depends on the install
        return f"the native CPU library is not installed ({exc})"
    return cpu.unavailable_reason()


def backend_reason(backend: str, device: torch.device | str) -> str | None:
    """None when concrete ``backend`` can run on tensors of ``device``, else a one-line reason."""
    if backend not in CONCRETE:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return _reason(backend, torch.device(device).type, triton_interpreted(), os.environ.get("HARMODT_SKIP_NATIVE"))


@functools.lru_cache(maxsize=None)
def _reason(backend: str, device_type: str, interpret: bool, skip_native: str | None) -> str | None:
    """:func:`backend_reason`, computed once per (backend, device type, environment): every op
    call checks its backend, and a GPU step is bound by per-call host time."""
    if backend == "reference":
        return None
    if backend == "triton":
        return _triton_reason(torch.device(device_type))
    return _cpu_reason(torch.device(device_type))


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The concrete backends that can run on tensors of ``device``."""
    return [b for b in CONCRETE if backend_reason(b, device) is None]


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """``backend`` made concrete for ``device`` (``"auto"``: triton on CUDA, cpu on CPU when built,
    else reference); raises :class:`BackendUnavailable` when an explicit one cannot run."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        preferred = "triton" if device.type == "cuda" else "cpu"
        return preferred if backend_reason(preferred, device) is None else "reference"
    why = backend_reason(backend, device)
    if why is not None:
        raise BackendUnavailable(f"--backend {backend} cannot run on {device}: {why}")
    return backend


@dataclass(frozen=True)
class KernelBackends:
    """The concrete backend of each op for one run (made by :func:`select_backends`)."""

    masked_linear: str = "reference"
    masked_adamw: str = "reference"
    harmony_select: str = "reference"

    def describe(self) -> str:
        return f"masked_linear={self.masked_linear} masked_adamw={self.masked_adamw} harmony_select={self.harmony_select}"


def select_backends(device: torch.device | str, fused: bool, backend: str = "auto") -> KernelBackends:
    """The one place a run's kernel backends are chosen: without ``fused`` every op runs on the
    reference (W * M materialized by plain PyTorch); with it, on ``backend`` made concrete for
    ``device`` (:func:`resolve_backend`)."""
    if not fused:
        if backend not in BACKENDS:
            raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        return KernelBackends()
    b = resolve_backend(backend, device)
    return KernelBackends(b, b, b)


def _check_concrete(op: str, backend: str, device: torch.device) -> None:
    if torch.compiler.is_compiling():  # checked when the eager call ran; nothing to trace here
        return
    if backend not in CONCRETE:
        raise ValueError(f"{op}: backend must be one of {', '.join(CONCRETE)} (use select_backends for 'auto'), got {backend!r}")
    why = backend_reason(backend, device)
    if why is not None:
        raise BackendUnavailable(f"{op}: backend {backend!r} cannot run: {why}")


# ---- masks ------------------------------------------------------------------------------------


def pack_masks(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[..., K]`` -> int32 ``[..., ceil(K/32)]``; bit ``j % 32`` of word ``j // 32`` is column j."""
    return reference.pack_masks(mask)


def unpack_masks(words: torch.Tensor, k: int) -> torch.Tensor:
    """int32 ``[..., ceil(K/32)]`` -> bool ``[..., K]``."""
    return reference.unpack_masks(words, k)


# ---- the ops ----------------------------------------------------------------------------------


def _autocast_operands(x, weight, bias):
    """Under autocast on the tensors' device, the operands in the autocast dtype (as ``F.linear``
    would get them; the cast is differentiable, so gradients reach the fp32 weight)."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return x, weight, bias
    dt = torch.get_autocast_dtype(dev)
    return x.to(dt), weight.to(dt), None if bias is None else bias.to(dt)


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, masks: torch.Tensor, task_ids: torch.Tensor,
                  backend: str = "reference", task_grads: torch.Tensor | None = None, segments: tuple | None = None) -> torch.Tensor:
    """``y[r] = x[r] @ (weight * M[task_ids[r]]).T + bias``, differentiable in x, weight and bias.

    x ``[R, K]``, weight ``[N, K]``, bias ``[N]`` or None, masks packed int32 ``[T, N, ceil(K/32)]``,
    task_ids int64 ``[R]`` in ``[0, T)``, or ``[1]`` when every row belongs to one task (a
    single-task batch: one mask, no grouping). ``task_grads``: optional float32 ``[T, N, K]`` that
    receives each task's unmasked ``dY_t^T X_t`` on backward (Algorithm 2's recovery gradient).
    Under autocast the operands are cast to its dtype first, as ``F.linear``'s are. The triton and
    cpu backends never materialize ``weight * M``; the reference does (one copy per task present).
    ``segments``: optional host-side ``((task, rows), ...)`` layout of rows grouped by task; the
    reference splits a mixed-task batch by it instead of reading ``task_ids`` back (no host
    synchronisation); the fused backends group rows on the device and need none.
    """
    _check_concrete("masked_linear", backend, x.device)
    x, weight, bias = _autocast_operands(x, weight, bias)
    with torch.autocast(x.device.type, enabled=False):
        if backend == "triton":
            from .triton_masked_linear import triton_masked_linear

            return triton_masked_linear(x, weight, bias, masks, task_ids, task_grads=task_grads)
        if backend == "cpu":
            from . import cpu

            return cpu.masked_linear(x, weight, bias, masks, task_ids, task_grads=task_grads)
        return reference.masked_linear(x, weight, bias, masks, task_ids, task_grads=task_grads, segments=segments)


def masked_adamw_(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, masks: list, steps: list, *, lr: float,
                  beta1: float, beta2: float, eps: float, weight_decay: float, grad_scale: float | torch.Tensor = 1.0,
                  backend: str = "reference") -> None:
    """One AdamW step in place on every parameter of a group; weights outside their mask keep their
    value bit for bit while their moments decay as with a zero gradient.

    ``masks[i]``: None (the whole parameter may change), or the packed int32 words of a bool mask
    over the parameter's last dimension (``pack_masks`` of a ``[N, K]`` bool: ``[N, ceil(K/32)]``).
    ``steps[i]``: a float32 0-dim tensor, incremented. ``grad_scale``: every gradient is multiplied
    by it first (a float, or a 0-dim tensor on the parameters' device, e.g. the clipping factor).
    See :func:`kernels.reference.masked_adamw_` for the arithmetic.
    """
    if not params:
        return
    _check_concrete("masked_adamw_", backend, params[0].device)
    args = (params, grads, exp_avgs, exp_avg_sqs, masks, steps)
    kw = dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps), weight_decay=float(weight_decay), grad_scale=grad_scale)
    if backend == "triton":
        from .triton_masked_adamw import triton_masked_adamw_

        return triton_masked_adamw_(*args, **kw)
    if backend == "cpu":
        from . import cpu

        return cpu.masked_adamw_(*args, **kw)
    return reference.masked_adamw_(*args, **kw)


def harmony_select(masked_grads: torch.Tensor, grads: torch.Tensor, params: torch.Tensor, masks: torch.Tensor, k: int, lam: float,
                   importance: str = "magnitude", backend: str = "reference") -> torch.Tensor:
    """Algorithm 2's mask/recover selection for all tasks in one call; returns the new packed masks
    ``[T, ceil(P/32)]``. See :func:`kernels.reference.harmony_select`."""
    _check_concrete("harmony_select", backend, masked_grads.device)
    if backend == "triton":
        from .triton_harmony_select import triton_harmony_select

        return triton_harmony_select(masked_grads, grads, params, masks, k, lam, importance)
    if backend == "cpu":
        from . import cpu

        return cpu.harmony_select(masked_grads, grads, params, masks, k, lam, importance)
    return reference.harmony_select(masked_grads, grads, params, masks, k, lam, importance)
