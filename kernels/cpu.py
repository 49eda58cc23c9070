"""Native CPU ops (C++, `kernels/csrc/`), loaded from ``kernels/_lib/libharmodt_kernels.so``.

Three ops, the ``"cpu"`` backend of :mod:`kernels`: :func:`masked_linear` (forward and backward),
:func:`masked_adamw_` and :func:`harmony_select`, with the semantics of :mod:`kernels.reference`.

Build: ``pip install --no-build-isolation -e .`` (runs CMake through setup.py), or by hand::

    cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$(python -c 'import torch;print(torch.utils.cmake_prefix_path)')"
    cmake --build build/cmake -j2

``HARMODT_KERNELS_LIB`` loads the library from another path; ``HARMODT_SKIP_NATIVE=1`` loads none
(the backend is then unavailable). :func:`unavailable_reason` says why the ops cannot run (None
when they can). The wrappers check their arguments and raise :class:`KernelArgumentError` (a
``ValueError``; :class:`KernelDTypeError`, also a ``TypeError``, for dtypes) naming the bad one.
The C++ ops have fake implementations, so ``torch.compile`` traces through them without a graph
break.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import torch

from . import reference
from .reference import num_words

__all__ = [
    "KernelArgumentError",
    "KernelDTypeError",
    "build",
    "harmony_select",
    "library_path",
    "masked_adamw_",
    "masked_linear",
    "unavailable_reason",
]

LIB_NAME = "libharmodt_kernels.so"
OPS = ("masked_linear_forward", "masked_linear_backward", "adamw_group_", "harmony_select")
_PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE_ROOT = _PACKAGE_DIR.parent


class KernelArgumentError(ValueError):
    """A bad argument to a native op (shape, device, value)."""


class KernelDTypeError(KernelArgumentError, TypeError):
    """A bad dtype; also a TypeError, as the reference raises for dtypes."""


def library_path() -> Path:
    """Where the shared library is looked for (``HARMODT_KERNELS_LIB`` when set)."""
    env = os.environ.get("HARMODT_KERNELS_LIB")
    return Path(env) if env else _PACKAGE_DIR / "_lib" / LIB_NAME


_state: dict = {"tried": False, "reason": None, "fakes": False}


def _has_ops() -> bool:
    try:
        for name in OPS:
            getattr(torch.ops.harmodt_kernels, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _load() -> str | None:
    if os.environ.get("HARMODT_SKIP_NATIVE") == "1":
        return "HARMODT_SKIP_NATIVE=1 is set"
    if _state["tried"]:
        return _state["reason"]
    _state["tried"] = True
    path = library_path()
    if not _has_ops():
        if not path.is_file():
            _state["reason"] = (f"the native library {path} is not built; run `pip install --no-build-isolation -e .` "
                                "(or cmake, see kernels/cpu.py) in the repository root")
            return _state["reason"]
        try:
            torch.ops.load_library(str(path))
        except Exception as exc:  # noqa: BLE001 - any load failure makes the backend unavailable
            _state["reason"] = f"the native library {path} failed to load: {exc}"
            return _state["reason"]
        if not _has_ops():
            _state["reason"] = f"the native library {path} loaded but does not register the harmodt_kernels ops {', '.join(OPS)}"
            return _state["reason"]
    _register_fakes()
    _state["reason"] = None
    return None


def unavailable_reason() -> str | None:
    """None when the native ops can run, else one sentence saying why not."""
    return _load()


def _ops():
    why = _load()
    if why:
        raise RuntimeError(f"native CPU kernels unavailable: {why}")
    return torch.ops.harmodt_kernels


def _register_fakes() -> None:
    """Shape-only (meta) implementations of the C++ ops, for torch.compile's tracing."""
    if _state["fakes"]:
        return
    _state["fakes"] = True

    @torch.library.register_fake("harmodt_kernels::masked_linear_forward")
    def _(x, weight, bias, masks, task_ids):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("harmodt_kernels::masked_linear_backward")
    def _(grad_y, x, weight, masks, task_ids, need_x, need_weight, need_bias, task_grads):
        (r, k), n = x.shape, weight.shape[0]
        return (x.new_empty((r, k) if need_x else (0,)), x.new_empty((n, k) if need_weight else (0,)),
                x.new_empty((n,) if need_bias else (0,)))

    @torch.library.register_fake("harmodt_kernels::adamw_group_")
    def _(params, grads, exp_avgs, exp_avg_sqs, masks, steps, lr, beta1, beta2, eps, weight_decay, grad_scale):
        return None

    @torch.library.register_fake("harmodt_kernels::harmony_select")
    def _(masked_grads, grads, params, masks, k, lam, fisher):
        return masks.new_empty(masks.shape)


def build(build_dir: str | os.PathLike | None = None, output_dir: str | os.PathLike | None = None, native_arch: bool = True,
          march: str | None = None, verbose: bool = False) -> Path:
    """Configure and build the library with CMake from a source checkout (the same CMake run as
    `setup.py`'s); returns its path. ``output_dir``: where it goes (default ``kernels/_lib``; load
    another with ``HARMODT_KERNELS_LIB``). ``native_arch=False``: no ``-march=native``; ``march``:
    an ``-march`` target instead (e.g. ``"x86-64"``)."""
    if not (_SOURCE_ROOT / "CMakeLists.txt").is_file():
        raise RuntimeError(f"no CMakeLists.txt in {_SOURCE_ROOT}: build() needs a source checkout")
    cmake = shutil.which("cmake")
    if cmake is None:
        try:
            import cmake as cmake_pkg  # the `cmake` PyPI package
        except ImportError as exc:
            raise RuntimeError("cmake is not on PATH; `pip install cmake`") from exc
        cmake = str(Path(cmake_pkg.CMAKE_BIN_DIR) / "cmake")
    bdir = Path(build_dir) if build_dir else _SOURCE_ROOT / "build" / "cmake"
    out = Path(output_dir) if output_dir else _PACKAGE_DIR / "_lib"
    stdout = None if verbose else subprocess.DEVNULL
    subprocess.run([cmake, "-S", str(_SOURCE_ROOT), "-B", str(bdir), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                    f"-DHARMODT_OUTPUT_DIR={out}", f"-DHARMODT_NATIVE_ARCH={'ON' if native_arch else 'OFF'}",
                    f"-DHARMODT_MARCH={march or ''}"], check=True, stdout=stdout)
    subprocess.run([cmake, "--build", str(bdir), "-j", str(os.cpu_count() or 1)], check=True, stdout=stdout)
    _state["tried"] = False
    return out / LIB_NAME


# ---- argument checks (shapes, dtypes and devices only: nothing that reads tensor values, so
# torch.compile traces them without a graph break; task_ids' range is checked in C++) ----------


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_tensor(name: str, t, dtypes: tuple) -> None:
    if not isinstance(t, torch.Tensor):
        raise KernelArgumentError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise KernelArgumentError(f"{name} must be a CPU tensor, got one on {t.device}")
    if t.dtype not in dtypes:
        raise KernelDTypeError(f"{name} must be {' or '.join(_name(d) for d in dtypes)}, got {_name(t.dtype)}")


def _check_shape(name: str, t: torch.Tensor, shape: tuple, what: str = "") -> None:
    if tuple(t.shape) != tuple(shape):
        raise KernelArgumentError(f"{name} must be {list(shape)}{what}, got {list(t.shape)}")


_FLOATS = (torch.float32, torch.bfloat16)


# ---- masked_linear --------------------------------------------------------------------------


class _MaskedLinear(torch.autograd.Function):
    """The C++ forward and backward as one autograd node; task_grads (kept on ctx, not saved, as
    the backward writes into it) receives each task's unmasked dY_t^T X_t."""

    @staticmethod
    def forward(ctx, x, weight, bias, masks, task_ids, task_grads):
        ctx.save_for_backward(x, weight, masks, task_ids)
        ctx.has_bias = bias is not None
        ctx.task_grads = task_grads
        return torch.ops.harmodt_kernels.masked_linear_forward(x, weight, bias, masks, task_ids)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, masks, task_ids = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and ctx.has_bias
        dx, dw, db = torch.ops.harmodt_kernels.masked_linear_backward(grad_y, x, weight, masks, task_ids, need_x, need_w, need_b,
                                                                      ctx.task_grads if need_w else None)
        return dx if need_x else None, dw if need_w else None, db if need_b else None, None, None, None


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, masks: torch.Tensor, task_ids: torch.Tensor,
                  task_grads: torch.Tensor | None = None) -> torch.Tensor:
    """``y[r] = x[r] @ (weight * M[task_ids[r]]).T + bias``, differentiable in x, weight and bias;
    see :func:`kernels.reference.masked_linear`.

    x ``[R, K]`` float32 or bfloat16; weight ``[N, K]`` and bias ``[N]`` (or None) of x's dtype;
    masks packed int32 ``[T, N, ceil(K/32)]``; task_ids int64 ``[R]`` in ``[0, T)``, or ``[1]`` for
    one task on every row; task_grads None or a contiguous float32 ``[T, N, K]`` buffer that
    receives each task's unmasked ``dY_t^T X_t`` on backward (when weight requires grad).
    """
    _check_tensor("x", x, _FLOATS)
    if x.dim() != 2:
        raise KernelArgumentError(f"x must be [R, K], got {list(x.shape)}")
    r, k = x.shape
    _check_tensor("weight", weight, (x.dtype,))
    if weight.dim() != 2 or weight.shape[1] != k:
        raise KernelArgumentError(f"weight must be [N, {k}] to match x {list(x.shape)}, got {list(weight.shape)}")
    n = weight.shape[0]
    if bias is not None:
        _check_tensor("bias", bias, (x.dtype,))
        _check_shape("bias", bias, (n,))
    _check_tensor("masks", masks, (torch.int32,))
    if masks.dim() != 3 or masks.shape[1:] != (n, num_words(k)):
        raise KernelArgumentError(f"masks must be packed [T, {n}, {num_words(k)}] for weight {list(weight.shape)}, got {list(masks.shape)}")
    _check_tensor("task_ids", task_ids, (torch.int64,))
    if task_ids.shape != (r,) and task_ids.shape != (1,):
        raise KernelArgumentError(f"task_ids must be [{r}] (one task per row of x) or [1] (one task for all rows), got {list(task_ids.shape)}")
    if task_grads is not None:
        _check_tensor("task_grads", task_grads, (torch.float32,))
        _check_shape("task_grads", task_grads, (masks.shape[0], n, k), " (tasks, weight rows, weight columns)")
        if not task_grads.is_contiguous():
            raise KernelArgumentError("task_grads must be contiguous (it is accumulated in place)")
    _ops()
    return _MaskedLinear.apply(x, weight, bias, masks, task_ids, task_grads)


# ---- masked_adamw_ --------------------------------------------------------------------------


def masked_adamw_(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, masks: list, steps: list, *, lr: float, beta1: float,
                  beta2: float, eps: float, weight_decay: float, grad_scale: float | torch.Tensor = 1.0) -> None:
    """One AdamW step in place on every parameter of a group, weights outside ``masks[i]`` kept
    bit for bit; see :func:`kernels.reference.masked_adamw_`.

    params, exp_avgs, exp_avg_sqs: contiguous float32 CPU tensors (written); grads of the same
    shapes; masks[i]: None, or the packed int32 words of a mask over params[i]'s last dimension
    (a bool mask of params[i]'s shape is packed here); steps[i]: float32 0-dim tensors
    (incremented); grad_scale: a float or a one-element CPU tensor (read by the op itself, so the
    call never reads a tensor value back into Python).
    """
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "masks": masks, "steps": steps}
    if len({len(v) for v in lists.values()}) != 1:
        raise KernelArgumentError("masked_adamw_: params, grads, exp_avgs, exp_avg_sqs, masks and steps must have one length, got "
                                  + ", ".join(f"{k}: {len(v)}" for k, v in lists.items()))
    packed = []
    for i, p in enumerate(params):
        for name in ("params", "grads", "exp_avgs", "exp_avg_sqs"):
            t = lists[name][i]
            _check_tensor(f"{name}[{i}]", t, (torch.float32,))
            _check_shape(f"{name}[{i}]", t, p.shape, " (params[i]'s shape)")
            if name != "grads" and not t.is_contiguous():
                raise KernelArgumentError(f"{name}[{i}] must be contiguous (it is written in place)")
        _check_tensor(f"steps[{i}]", steps[i], (torch.float32,))
        _check_shape(f"steps[{i}]", steps[i], ())
        m = masks[i]
        if m is not None:
            if p.dim() == 0:
                raise KernelArgumentError(f"masks[{i}]: a masked parameter must be at least 1-D, params[{i}] is 0-D")
            _check_tensor(f"masks[{i}]", m, (torch.int32, torch.bool))
            if m.dtype == torch.bool:
                _check_shape(f"masks[{i}]", m, p.shape, " (a bool mask of params[i]'s shape)")
                m = reference.pack_masks(m)
            _check_shape(f"masks[{i}]", m, (*p.shape[:-1], num_words(p.shape[-1])), " (packed words of params[i]'s last dimension)")
        packed.append(m)
    if isinstance(grad_scale, torch.Tensor):
        if grad_scale.numel() != 1:
            raise KernelArgumentError(f"grad_scale must be a float or a one-element tensor, got shape {list(grad_scale.shape)}")
        _check_tensor("grad_scale", grad_scale, (torch.float32, torch.float64, torch.bfloat16, torch.float16))
        grad_scale = grad_scale.reshape(()).to(torch.float32)  # read inside the op: no scalar comes back to Python
    else:
        grad_scale = torch.tensor(float(grad_scale), dtype=torch.float32)
    with torch.no_grad():
        _ops().adamw_group_([p.detach() for p in params], [g.contiguous() for g in grads], list(exp_avgs), list(exp_avg_sqs), packed,
                            list(steps), float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), grad_scale)


# ---- harmony_select -------------------------------------------------------------------------


def harmony_select(masked_grads: torch.Tensor, grads: torch.Tensor, params: torch.Tensor, masks: torch.Tensor, k: int, lam: float,
                   importance: str = "magnitude") -> torch.Tensor:
    """Algorithm 2's selection for all tasks; the new packed masks ``[T, ceil(P/32)]``, equal bit
    for bit to :func:`kernels.reference.harmony_select`."""
    if importance not in ("magnitude", "fisher"):
        raise KernelArgumentError(f"importance must be 'magnitude' or 'fisher', got {importance!r}")
    floats = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    _check_tensor("masked_grads", masked_grads, floats)
    if masked_grads.dim() != 2:
        raise KernelArgumentError(f"masked_grads must be [T, P], got {list(masked_grads.shape)}")
    t_count, p = masked_grads.shape
    _check_tensor("grads", grads, floats)
    _check_shape("grads", grads, (t_count, p), " like masked_grads")
    _check_tensor("params", params, floats)
    _check_shape("params", params, (p,))
    _check_tensor("masks", masks, (torch.int32,))
    _check_shape("masks", masks, (t_count, num_words(p)), " (packed)")
    return _ops().harmony_select(masked_grads, grads, params, masks, int(k), float(lam), importance == "fisher")


# Load at import (when not skipped), so that the first call is not what loads the library: a
# torch.compile trace of that call would otherwise reach the file-system checks of the loader.
_load()
