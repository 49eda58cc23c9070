"""Native CPU ops (C++, `kernels/csrc/`), loaded from ``kernels/harmodt_kernels/_lib/libharmodt_kernels.so``.

:class:`NativeLibrary` loads the library and holds the ``"cpu"`` backend of :mod:`kernels`: its
:meth:`~NativeLibrary.masked_linear` (forward and backward), :meth:`~NativeLibrary.masked_adamw_`
and :meth:`~NativeLibrary.harmony_select`, with the semantics of :mod:`harmodt_kernels.reference`. They
trust their arguments: :mod:`harmodt_kernels` checks them first (``harmodt_kernels.backend_ops("cpu")``).

Build: ``pip install --no-build-isolation -e .`` (setup.py runs CMake), or by hand::

    cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$(python -c 'import torch;print(torch.utils.cmake_prefix_path)')"
    cmake --build build/cmake -j2

``HARMODT_KERNELS_LIB`` loads the library from another path; ``HARMODT_SKIP_NATIVE=1`` loads none
(the backend is then unavailable). The C++ ops have fake implementations (registered here, once
per process, as the ops themselves are), so ``torch.compile`` traces through them without a graph
break.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .backends import BackendUnavailable
from .ops.dropout import NativeCounterDropout
from .ops.masked_linear import NativeMaskedLinear

__all__ = ["LIB_NAME", "NativeLibrary", "library_path"]

LIB_NAME = "libharmodt_kernels.so"
OPS = ("masked_linear", "masked_linear_forward", "masked_linear_backward", "counter_dropout", "adamw_group_",
       "harmony_select")


def library_path() -> Path:
    """Where the shared library is looked for (``HARMODT_KERNELS_LIB`` when set)."""
    env = os.environ.get("HARMODT_KERNELS_LIB")
    return Path(env) if env else Path(__file__).resolve().parent / "_lib" / LIB_NAME


def _has_ops() -> bool:
    try:
        for name in OPS:
            getattr(torch.ops.harmodt_kernels, name)
    except (AttributeError, RuntimeError):
        return False
    return True


class NativeLibrary:
    """The native library, loaded on construction (a no-op when the process already has its ops).

    ``unavailable``: None when the ops can run, else one sentence saying why not. ``path``: the
    file it was (or would be) loaded from."""

    def __init__(self, path: str | os.PathLike | None = None, skip: bool = False):
        self.path = Path(path) if path is not None else library_path()
        self.unavailable = "HARMODT_SKIP_NATIVE=1 is set" if skip else self._load()
        # the differentiable op's handle, looked up once (torch.ops attribute lookups cost more than a small GEMM);
        # it checks every argument in C++ (masked_linear.cpp), so it is also the backend's masked_linear_self_checked
        self._linear = torch.ops.harmodt_kernels.masked_linear.default if self.unavailable is None else None
        self.linear_self_checked = self._linear

    def _load(self) -> str | None:
        if not _has_ops():
            if not self.path.is_file():
                return (f"the native library {self.path} is not built; run `pip install --no-build-isolation -e .` "
                        "(or cmake, see harmodt_kernels/cpu.py) in the repository root")
            try:
                torch.ops.load_library(str(self.path))
            except Exception as exc:  # noqa: BLE001 - any load failure makes the backend unavailable
                return f"the native library {self.path} failed to load: {exc}"
            if not _has_ops():
                return (f"the native library {self.path} loaded but does not register the harmodt_kernels ops "
                        f"{', '.join(OPS)}")
        _register_fakes()
        return None

    @property
    def ops(self):
        if self.unavailable is not None:
            raise BackendUnavailable(f"native CPU kernels unavailable: {self.unavailable}")
        return torch.ops.harmodt_kernels

    def masked_linear(self, x, weight, bias, masks, task_ids, task_grads=None, segments=None, relu=False, dropout_p=0.0,
                      seed=0) -> torch.Tensor:
        """See :func:`harmodt_kernels.masked_linear` (``segments`` is not needed: rows are grouped in C++);
        ReLU and dropout run in one pass over the output after the GEMMs. Without ``task_grads``:
        one call of the op ``harmodt_kernels::masked_linear``, whose autograd is C++
        (kernels/csrc/autograd.cpp); with it, Python's (:class:`_MaskedLinear`). A seed held in a
        tensor is read here (CPU tensors: nothing to wait for)."""
        seed = int(seed) if isinstance(seed, torch.Tensor) else seed
        if task_grads is None:
            return self._linear(x, weight, bias, masks, task_ids, relu, dropout_p, seed)
        return NativeMaskedLinear.apply(x, weight, bias, masks, task_ids, task_grads, relu, dropout_p, seed)

    def dropout(self, x, p, seed) -> torch.Tensor:
        """See :func:`harmodt_kernels.dropout`: the bits of :func:`harmodt_kernels.reference.counter_keep`."""
        seed = int(seed) if isinstance(seed, torch.Tensor) else seed
        return x if p == 0.0 else NativeCounterDropout.apply(x, p, seed)

    def masked_adamw_(self, params, grads, exp_avgs, exp_avg_sqs, masks, steps, lr, beta1, beta2, eps, weight_decay,
                      grad_scale, workspace=None) -> None:
        """See :func:`harmodt_kernels.masked_adamw_`; masks packed; grad_scale read inside the op (a float is
        made a tensor), so the call never reads a tensor value back into Python."""
        lr = float(lr) if isinstance(lr, torch.Tensor) else lr  # (a CPU tensor: nothing to wait for)
        if isinstance(grad_scale, torch.Tensor):
            grad_scale = grad_scale.reshape(()).to(torch.float32)
        else:
            grad_scale = torch.tensor(float(grad_scale), dtype=torch.float32)
        with torch.no_grad():
            self.ops.adamw_group_([p.detach() for p in params], [g.contiguous() for g in grads], exp_avgs, exp_avg_sqs,
                                  masks, steps, lr, beta1, beta2, eps, weight_decay, grad_scale)

    def harmony_select(self, harmony, recovery, masks, k) -> torch.Tensor:
        """See :func:`harmodt_kernels.harmony_select`; equal bit for bit to the reference."""
        return self.ops.harmony_select(harmony, recovery, masks, k)


def _register_fakes() -> None:
    """Shape-only (meta) implementations of the C++ ops, for torch.compile's tracing (a later
    registration replaces an earlier one, so loading twice is harmless)."""

    def linear_fake(x, weight, bias, masks, task_ids, relu, dropout_p, seed):
        # (reached in eager too when a meta tensor is among CPU ones: the dispatcher picks this kernel, which refuses)
        if len({t.device for t in (x, weight, bias, masks, task_ids) if t is not None}) > 1:
            raise ValueError("masked_linear: all tensors must be on one device")
        return x.new_empty(x.shape[0], weight.shape[0])

    torch.library.register_fake("harmodt_kernels::masked_linear_forward", linear_fake)
    torch.library.register_fake("harmodt_kernels::masked_linear", linear_fake)

    @torch.library.register_fake("harmodt_kernels::counter_dropout")
    def _(x, p, seed):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("harmodt_kernels::masked_linear_backward")
    def _(grad_y, x, weight, masks, task_ids, need_x, need_weight, need_bias, task_grads, out, relu, dropout_p, seed):
        (r, k), n = x.shape, weight.shape[0]
        return (x.new_empty((r, k) if need_x else (0,)), x.new_empty((n, k) if need_weight else (0,)),
                x.new_empty((n,) if need_bias else (0,)))

    @torch.library.register_fake("harmodt_kernels::adamw_group_")
    def _(params, grads, exp_avgs, exp_avg_sqs, masks, steps, lr, beta1, beta2, eps, weight_decay, grad_scale):
        return None

    @torch.library.register_fake("harmodt_kernels::harmony_select")
    def _(harmony, recovery, masks, k):
        return masks.new_empty(masks.shape)
