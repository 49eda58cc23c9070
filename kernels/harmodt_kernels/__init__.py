"""Public kernel API: HarmoDT's masked ops and counter-based dropout, the same calls on every backend.

Ops (see kernels/README.md):

* :func:`masked_linear` -- ``y[r] = x[r] @ (W * M[task_ids[r]]).T + b`` and its backward
  (``dX = dY (W * M_t)``, ``dW = sum_t M_t * dY_t^T X_t``), for one task or a mixed-task batch;
* :func:`masked_adamw_` -- AdamW on a list of parameters where each weight outside its mask stays
  bit-for-bit unchanged (the optimizer half of Eq. 11);
* :func:`harmony_select` -- Algorithm 2's mask/recover selection for every task at once, given
  the scores (harmodt.masks computes them);
* :func:`dropout` -- counter-based dropout: the bits are a hash of (element index, seed), so the
  backward recomputes them and every backend draws the same ones.

Backends:

* ``"reference"``: plain PyTorch (`harmodt_kernels/reference.py`), the single source of truth; any device.
* ``"triton"``: Triton kernels (`harmodt_kernels/triton_*.py`); CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` is set.
* ``"cpu"``: native C++ ops (ATen's thread pool) built from `kernels/csrc/` by CMake (`harmodt_kernels/cpu.py`).
* ``"auto"``: Triton on CUDA, the native op on CPU when it is built, else the reference.

The choice is made in one place, :func:`select_backends`, which returns the chosen ops as a value
(:class:`KernelOps`) that callers hand down. Each op is one module of ``ops/`` (its argument
checks, its op class, its autograd function); an op checks its arguments once per configuration
of shapes, dtypes and devices (one :class:`KernelArgumentError` naming the bad one) and calls its
backend's implementation, which trusts them. A :class:`Backend` maps op names to implementations;
the three tables are below. The public functions below take an explicit ``backend=`` (tests,
benchmarks, one-off calls) and fail loudly when it cannot run (:class:`BackendUnavailable`).
Nothing here keeps module-level state but the cache of each backend's ops (:func:`backend_ops`):
the native library is loaded into a :class:`harmodt_kernels.cpu.NativeLibrary` object the
dispatch owns, and Triton's AdamW launch tables live in a workspace the caller (the optimizer)
owns. ``harmodt_kernels`` is a leaf package: it never imports ``harmodt``, and inside it no
module imports this ``__init__``.
"""

from __future__ import annotations

import torch

from . import reference
from .backends import Backend, BackendUnavailable, native_skipped, triton_interpreted
from .checks import FLOATS, KernelArgumentError
from .ops import CachedMaskedLinearOp, DropoutOp, HarmonySelectOp, KernelOps, MaskedAdamWOp, MaskedLinearOp
from .ops import masked_adamw as adamw_op
from .reference import num_words

__all__ = [
    "BACKENDS",
    "Backend",
    "CachedMaskedLinearOp",
    "DropoutOp",
    "BackendUnavailable",
    "KernelArgumentError",
    "KernelOps",
    "REFERENCE_OPS",
    "available_backends",
    "backend_ops",
    "dropout",
    "backend_reason",
    "harmony_select",
    "masked_adamw_",
    "masked_linear",
    "native_skipped",
    "num_words",
    "pack_masks",
    "resolve_backend",
    "select_backends",
    "triton_interpreted",
    "unpack_masks",
]

BACKENDS = ("auto", "triton", "cpu", "reference")
CONCRETE = ("triton", "cpu", "reference")


def _check_name(backend: str, allowed: tuple = BACKENDS) -> None:
    if backend not in allowed:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(allowed)}")


# ---- backends ---------------------------------------------------------------------------------


# Each backend maps op names to its implementations (the calling conventions: harmodt_kernels/ops/<op>.py).
REFERENCE = Backend("reference", devices=None, linear_dtypes=FLOATS, adamw_dtypes=FLOATS, bool_masks=True,
                    max_numel=None, impls={
                        "masked_linear": reference.masked_linear,
                        "masked_adamw": adamw_op.on_reference,
                        "harmony_select": reference.harmony_select,
                        "dropout": reference.dropout,
                    })


def _native(device_type: str) -> Backend:
    if device_type != "cpu":
        raise BackendUnavailable(f"the native ops take CPU tensors (got {device_type})")
    try:
        from .cpu import NativeLibrary
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise BackendUnavailable(f"the native CPU library is not installed ({exc})") from None
    lib = NativeLibrary(skip=native_skipped())
    if lib.unavailable is not None:
        raise BackendUnavailable(lib.unavailable)
    return Backend("cpu", devices=("cpu",), linear_dtypes=(torch.float32, torch.bfloat16),
                   adamw_dtypes=(torch.float32,), bool_masks=False, max_numel=None, impls={
                       "masked_linear": lib.masked_linear,
                       "masked_linear_self_checked": lib.linear_self_checked,
                       "masked_adamw": lib.masked_adamw_,
                       "harmony_select": lib.harmony_select,
                       "dropout": lib.dropout,
                   })


def _triton(device_type: str) -> Backend:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        raise BackendUnavailable(f"triton is not importable ({exc})") from None
    interpret = triton_interpreted()
    if device_type != "cuda" and not interpret:
        raise BackendUnavailable(f"Triton needs CUDA tensors (got {device_type}) or "
                                 "TRITON_INTERPRET=1 for the CPU interpreter")
    from .triton_dropout import triton_dropout
    from .triton_harmony_select import triton_harmony_select
    from .triton_masked_adamw import triton_masked_adamw_
    from .triton_masked_linear import triton_masked_linear

    halves = (torch.float32, torch.bfloat16, torch.float16)
    return Backend("triton", devices=("cuda", "cpu") if interpret else ("cuda",), linear_dtypes=halves,
                   adamw_dtypes=halves, bool_masks=False, max_numel=2**31 - 1, impls={
                       "masked_linear": triton_masked_linear,
                       "masked_adamw": triton_masked_adamw_,
                       "harmony_select": triton_harmony_select,
                       "dropout": triton_dropout,
                   })


def make_backend(backend: str, device: torch.device | str) -> Backend:
    """Concrete ``backend`` for tensors of ``device``, its library loaded; raises
    :class:`BackendUnavailable` with the reason when it cannot run there."""
    _check_name(backend, CONCRETE)
    device_type = torch.device(device).type
    if backend == "reference":
        return REFERENCE
    return _native(device_type) if backend == "cpu" else _triton(device_type)


def backend_reason(backend: str, device: torch.device | str) -> str | None:
    """None when concrete ``backend`` can run on tensors of ``device``, else a one-line reason."""
    try:
        make_backend(backend, device)
    except BackendUnavailable as exc:
        return str(exc)
    return None


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The concrete backends that can run on tensors of ``device``."""
    return [b for b in CONCRETE if backend_reason(b, device) is None]


# ---- the ops (ops/): checked once, then the backend's implementation --------------------------

REFERENCE_OPS = KernelOps.on(REFERENCE)  # every op on the plain-PyTorch reference (an immutable value)


def select_backends(device: torch.device | str, fused: bool, backend: str = "auto") -> KernelOps:
    """The one place a run's kernel ops are chosen: without ``fused`` every op runs on the
    reference (W * M materialized by plain PyTorch); with it, on ``backend`` for ``device``
    (``"auto"``: triton on CUDA, cpu on CPU when built, else the reference, with the reason in
    ``fallback``). Raises :class:`BackendUnavailable` when an explicit backend cannot run."""
    _check_name(backend)
    device = torch.device(device)
    if not fused:
        return REFERENCE_OPS
    if backend == "auto":
        preferred = "triton" if device.type == "cuda" else "cpu"
        try:
            return KernelOps.on(make_backend(preferred, device))
        except BackendUnavailable as exc:
            return KernelOps.on(REFERENCE, fallback=str(exc))
    try:
        return KernelOps.on(make_backend(backend, device))
    except BackendUnavailable as exc:
        raise BackendUnavailable(f"--backend {backend} cannot run on {device}: {exc}") from None


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend name :func:`select_backends` picks for ``backend`` with ``fused``."""
    return select_backends(device, True, backend).masked_linear.backend.name


def backend_ops(backend: str, device: torch.device | str = "cpu") -> KernelOps:
    """The ops of one concrete ``backend`` for tensors of ``device`` (what the public functions
    below call); raises :class:`BackendUnavailable` when it cannot run there. Made once per
    (backend, device type, environment) and kept in a plain dict, which ``torch.compile`` reads
    as it is: a compiled caller finds the ops an earlier eager call made and never traces their
    construction (a library load, frozen dataclasses); a compiled caller whose
    ops no eager call has made yet stops with one line saying so."""
    _check_name(backend, CONCRETE)
    key = (backend, torch.device(device).type, triton_interpreted(), native_skipped())
    ops = _BACKEND_OPS.get(key)
    if ops is None:
        if torch.compiler.is_compiling():
            raise BackendUnavailable(f"backend {backend!r} on {key[1]} is first used inside torch.compile: call "
                                     f"harmodt_kernels.backend_ops({backend!r}, {key[1]!r}) once before compiling")
        ops = _BACKEND_OPS.setdefault(key, _make_ops(*key))
    return ops


_BACKEND_OPS: dict[tuple, KernelOps] = {}


def _make_ops(backend: str, device_type: str, interpret: bool, skip_native: bool) -> KernelOps:
    try:
        return KernelOps.on(make_backend(backend, device_type))
    except BackendUnavailable as exc:
        raise BackendUnavailable(f"backend {backend!r} cannot run on {device_type}: {exc}") from None


# ---- masks ------------------------------------------------------------------------------------


def pack_masks(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[..., K]`` -> int32 ``[..., ceil(K/32)]``; bit ``j % 32`` of word ``j // 32`` is column j."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() == 0:
        raise KernelArgumentError(f"pack_masks: mask must be a bool tensor of at least 1 dimension, got "
                                  f"{getattr(mask, 'dtype', type(mask).__name__)} {list(getattr(mask, 'shape', []))}")
    return reference.pack_masks(mask)


def unpack_masks(words: torch.Tensor, k: int) -> torch.Tensor:
    """int32 ``[..., ceil(K/32)]`` -> bool ``[..., K]``."""
    if not isinstance(words, torch.Tensor) or words.dtype != torch.int32 or words.dim() == 0:
        raise KernelArgumentError(f"unpack_masks: words must be an int32 tensor of at least 1 dimension, got "
                                  f"{getattr(words, 'dtype', type(words).__name__)} "
                                  f"{list(getattr(words, 'shape', []))}")
    if words.shape[-1] != num_words(k):
        raise KernelArgumentError(f"unpack_masks: words {list(words.shape)} cannot hold K={k} bits (the last "
                                  f"dimension must be {num_words(k)})")
    return reference.unpack_masks(words, k)


# ---- the public ops, on an explicit backend ---------------------------------------------------


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, masks: torch.Tensor,
                  task_ids: torch.Tensor,
                  backend: str = "reference", task_grads: torch.Tensor | None = None, segments: tuple | None = None,
                  relu: bool = False, dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """``y[r] = x[r] @ (weight * M[task_ids[r]]).T + bias``, differentiable in x, weight and bias.

    x ``[R, K]``, weight ``[N, K]``, bias ``[N]`` or None, masks packed int32 ``[T, N, ceil(K/32)]``
    (the reference also takes bool ``[T, N, K]``), task_ids int64 ``[R]`` in ``[0, T)``, or ``[1]``
    when every row belongs to one task (a single-task batch: one mask, no grouping).
    ``task_grads``: optional contiguous float32 ``[T, N, K]`` that receives each task's unmasked
    ``dY_t^T X_t`` on backward (Algorithm 2's recovery gradient). Under autocast the operands are
    cast to its dtype first, as ``F.linear``'s are. The triton and cpu backends never materialize
    ``weight * M``; the reference does (one copy per task present). ``segments``: optional
    host-side ``((task, rows), ...)`` layout of rows grouped by task; the reference splits a
    mixed-task batch by it instead of reading ``task_ids`` back (no host synchronisation); the
    fused backends group rows on the device and need none. Task ids out of range raise on CPU
    tensors (the cpu and triton backends) and are not checked on a GPU (that would synchronise).
    The epilogue: ``relu`` applies ReLU to the output, then ``dropout_p > 0`` applies
    :func:`dropout` ``(y, dropout_p, seed)`` to the ``[R, N]`` output (the fused backends in the
    same kernel or pass; their backward recomputes the bits).
    """
    return backend_ops(backend, x.device if isinstance(x, torch.Tensor) else "cpu").masked_linear(
        x, weight, bias, masks, task_ids, task_grads, segments, relu, dropout_p, seed)


def dropout(x: torch.Tensor, p: float, seed: int, backend: str = "reference") -> torch.Tensor:
    """Counter-based dropout: ``where(keep, x / (1 - p), 0)`` where element i (row-major) is kept
    iff a 32-bit hash of (i, seed) is >= ``floor(p * 2^32)`` (:func:`harmodt_kernels.reference.counter_keep`
    defines the bits; every backend computes the same ones). Differentiable; the backward
    recomputes the bits from ``seed``. ``seed``: an int in ``[0, 2^63)``
    (:func:`harmodt_kernels.reference.site_seed` derives one per dropout site)."""
    return backend_ops(backend, x.device if isinstance(x, torch.Tensor) else "cpu").dropout(x, p, seed)


def masked_adamw_(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, masks: list, steps: list, *, lr: float,
                  beta1: float, beta2: float, eps: float, weight_decay: float, grad_scale: float | torch.Tensor = 1.0,
                  backend: str = "reference", workspace: dict | None = None) -> None:
    """One AdamW step in place on every parameter of a group; weights outside their mask keep their
    value bit for bit while their moments decay as with a zero gradient.

    params, exp_avgs, exp_avg_sqs: contiguous tensors of one float dtype per parameter (float32 on
    the cpu backend); grads of the same shapes. ``masks[i]``: None (the whole parameter may
    change), a bool mask of the parameter's shape, or its packed int32 words over the last
    dimension (``pack_masks``: ``[*shape[:-1], ceil(K/32)]``). ``steps[i]``: a float32 0-dim
    tensor of its own, incremented. ``grad_scale``: every gradient is multiplied by it first (a
    float, or a one-element tensor on the parameters' device, e.g. the clipping factor; read on
    the device). ``workspace``: see :class:`MaskedAdamWOp`. See
    :func:`harmodt_kernels.reference.masked_adamw_` for the arithmetic.
    """
    if not params:
        return
    device = params[0].device if isinstance(params[0], torch.Tensor) else "cpu"
    backend_ops(backend, device).masked_adamw(params, grads, exp_avgs, exp_avg_sqs, masks, steps, lr=lr, beta1=beta1,
                                              beta2=beta2, eps=eps, weight_decay=weight_decay, grad_scale=grad_scale,
                                              workspace=workspace)


def harmony_select(harmony: torch.Tensor, recovery: torch.Tensor, masks: torch.Tensor, k: int,
                   backend: str = "reference") -> torch.Tensor:
    """Algorithm 2's mask/recover selection for all tasks in one call, given the scores; returns
    the new packed masks ``[T, ceil(P/32)]``. harmony and recovery float32 ``[T, P]``, masks
    packed int32 ``[T, ceil(P/32)]``: per task the ``k_i`` active weights of lowest harmony are
    masked and the ``k_i`` masked weights of highest recovery are recovered. See
    :func:`harmodt_kernels.reference.harmony_select`."""
    device = harmony.device if isinstance(harmony, torch.Tensor) else "cpu"
    return backend_ops(backend, device).harmony_select(harmony, recovery, masks, k)
