"""Native CPU ops (C++/OpenMP, `kernels/csrc/`), loaded from ``kernels/_lib/libharmodt_kernels.so``.

Build: ``pip install --no-build-isolation -e .`` (runs CMake through setup.py), or by hand::

    cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$(python -c 'import torch;print(torch.utils.cmake_prefix_path)')"
    cmake --build build/cmake -j2

Set ``HARMODT_KERNELS_LIB`` to load the library from another path. :func:`unavailable_reason`
says why the ops cannot run (None when they can); the wrappers below raise
:class:`KernelArgumentError` (a ``ValueError``, and a ``TypeError`` for dtype problems, like the
reference) naming the bad argument.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from .reference import num_words

__all__ = [
    "KernelArgumentError",
    "apply_mask_",
    "apply_masks_",
    "apply_masks_sq_norms_",
    "attention",
    "bias_dropout_add",
    "bias_relu_",
    "dropout_apply",
    "build",
    "core_round_trip_ns",
    "harmony_select",
    "library_path",
    "masked_linear",
    "masked_mlp",
    "masked_qkv_attention",
    "pack_masks",
    "unavailable_reason",
    "unpack_masks",
]

LIB_NAME = "libharmodt_kernels.so"
_PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE_ROOT = _PACKAGE_DIR.parent


class KernelArgumentError(ValueError):
    """A bad argument to a native op (shape, device, value)."""


class KernelDTypeError(KernelArgumentError, TypeError):
    """A bad dtype; also a TypeError, as the reference raises for dtypes."""


def library_path() -> Path:
    """Where the shared library is looked for."""
    env = os.environ.get("HARMODT_KERNELS_LIB")
    return Path(env) if env else _PACKAGE_DIR / "_lib" / LIB_NAME


_state: dict = {"tried": False, "reason": None}


def _load() -> str | None:
    if _state["tried"]:
        return _state["reason"]
    _state["tried"] = True
    path = library_path()
    if hasattr(torch.ops, "harmodt_kernels") and _has_ops():
        _state["reason"] = None
        return None
    if not path.is_file():
        _state["reason"] = (
            f"the native library {path} is not built; run `pip install --no-build-isolation -e .` "
            "(or cmake, see kernels/cpu.py) in the repository root"
        )
        return _state["reason"]
    try:
        torch.ops.load_library(str(path))
    except Exception as exc:  # noqa: BLE001 - any load failure makes the backend unavailable
        _state["reason"] = f"the native library {path} failed to load: {exc}"
        return _state["reason"]
    if not _has_ops():
        _state["reason"] = f"the native library {path} loaded but does not register the harmodt_kernels ops"
        return _state["reason"]
    _state["reason"] = None
    return None


def _has_ops() -> bool:
    try:
        ns = torch.ops.harmodt_kernels
        for name in ("apply_mask_", "apply_masks_", "apply_masks_sq_norms_", "dropout_apply", "pack_masks", "unpack_masks", "masked_linear_forward",
                     "masked_linear_backward", "masked_mlp_forward", "masked_qkv_attention_forward", "attention_forward", "attention_backward", "harmony_select",
                     "bias_relu_", "bias_relu_backward", "bias_dropout_add", "dropout_bias_backward", "gemm", "gemm_epilogue", "onednn_gemm_available", "bf16_gemm_available", "f32_native_by_default", "linear",
                     "layer_norm_forward", "layer_norm_backward", "adamw_group_", "sum_squares", "fused_block",
                     "bias_relu_backward_", "bias_dropout_add_"):
            getattr(ns, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def unavailable_reason() -> str | None:
    """None when the native ops can run, else a sentence saying why not (not built, load error)."""
    return _load()


def _ops():
    why = _load()
    if why:
        raise RuntimeError(f"native CPU kernels unavailable: {why}")
    return torch.ops.harmodt_kernels


def build(build_dir: str | os.PathLike | None = None, verbose: bool = False, output_dir: str | os.PathLike | None = None,
          native_arch: bool = True, march: str | None = None) -> Path:
    """Configure and build the library with CMake from a source checkout; returns its path.

    The same CMake run as `setup.py`'s; the tests call it when the library is missing.
    ``output_dir``: where the library goes (default ``kernels/_lib``; load another one with
    ``HARMODT_KERNELS_LIB``). ``native_arch=False`` builds for the baseline x86-64 instruction set
    (no AVX-512: the portable fallback loops every op keeps beside its vector path). ``march``: an
    ``-march`` target instead of the build machine's, e.g. ``"haswell"`` (AVX2 and FMA without
    AVX-512: the paths AMD Zen 2/3 run).
    """
    if not (_SOURCE_ROOT / "CMakeLists.txt").is_file():
        raise RuntimeError(f"no CMakeLists.txt in {_SOURCE_ROOT}: build() needs a source checkout")
    cmake = shutil.which("cmake")
    if cmake is None:
        try:
            import cmake as cmake_pkg  # the `cmake` PyPI package

            cmake = str(Path(cmake_pkg.CMAKE_BIN_DIR) / "cmake")
        except ImportError as exc:
            raise RuntimeError("cmake is not on PATH; `pip install cmake`") from exc
    bdir = Path(build_dir) if build_dir else _SOURCE_ROOT / "build" / "cmake"
    out = Path(output_dir) if output_dir else _PACKAGE_DIR / "_lib"
    cfg = [
        cmake, "-S", str(_SOURCE_ROOT), "-B", str(bdir),
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DHARMODT_OUTPUT_DIR={out}",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-DHARMODT_NATIVE_ARCH={'ON' if native_arch else 'OFF'}",
        f"-DHARMODT_MARCH={march or ''}",
    ]
    stdout = None if verbose else subprocess.DEVNULL
    subprocess.run(cfg, check=True, stdout=stdout)
    subprocess.run([cmake, "--build", str(bdir), "-j", str(os.cpu_count() or 1)], check=True, stdout=stdout)
    _state["tried"] = False
    return out / LIB_NAME


# ----------------------------------------------------------------------------------------------
# argument checks


def _check_cpu(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise KernelArgumentError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise KernelArgumentError(f"{name} must be a CPU tensor, got device {t.device}")


def _check_dtype(name: str, t: torch.Tensor, allowed: tuple) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise KernelDTypeError(f"{name} must be {names}, got {str(t.dtype).replace('torch.', '')}")


def apply_mask_(out: torch.Tensor, src: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``out = where(mask, src, 0)`` in one vectorized pass (AVX-512 masked loads when built for
    them); fp32 contiguous ``src``/``out`` of one shape (``out`` may be ``src``), ``mask`` bool of
    that shape or its packed int32 words ``[..., ceil(K/32)]``. Returns ``out``."""
    for name, t in (("out", out), ("src", src), ("mask", mask)):
        _check_cpu(name, t)
    _check_dtype("out", out, (torch.float32,))
    _check_dtype("src", src, (torch.float32,))
    _check_dtype("mask", mask, (torch.bool, torch.int32))
    if src.dim() == 0 or out.shape != src.shape:
        raise KernelArgumentError(f"apply_mask_: src {tuple(src.shape)} and out {tuple(out.shape)} must have one shape (at least 1-D)")
    want = src.shape if mask.dtype == torch.bool else (*src.shape[:-1], num_words(src.shape[-1]))
    if tuple(mask.shape) != tuple(want):
        kind = "bool mask" if mask.dtype == torch.bool else "packed mask"
        raise KernelArgumentError(f"apply_mask_: {kind} {tuple(mask.shape)} does not fit src {tuple(src.shape)} (needs {tuple(want)})")
    for name, t in (("out", out), ("src", src), ("mask", mask)):
        if not t.is_contiguous():
            raise KernelArgumentError(f"apply_mask_: {name} must be contiguous")
    _ops().apply_mask_(out, src, mask)
    torch.autograd.graph.increment_version(out)  # as an in-place torch op does: autograd sees the write
    return out


def apply_masks_(outs: list, srcs: list, masks: list) -> list:
    """:func:`apply_mask_` over lists in one native call (the op checks every shape and dtype and
    names the failing entry's shapes); returns ``outs``."""
    if not len(outs) == len(srcs) == len(masks):
        raise KernelArgumentError(f"apply_masks_: got {len(outs)} outputs, {len(srcs)} sources and {len(masks)} masks")
    _ops().apply_masks_(outs, srcs, masks)
    torch.autograd.graph.increment_version(outs)  # as in-place torch ops do: autograd sees the writes
    return outs


def apply_masks_sq_norms_(outs: list, srcs: list, masks: list) -> torch.Tensor:
    """:func:`apply_masks_`, also returning each output's sum of squares (float64 ``[len]``),
    computed while each row is in cache."""
    if not len(outs) == len(srcs) == len(masks):
        raise KernelArgumentError(f"apply_masks_sq_norms_: got {len(outs)} outputs, {len(srcs)} sources and {len(masks)} masks")
    sq = _ops().apply_masks_sq_norms_(outs, srcs, masks)
    torch.autograd.graph.increment_version(outs)
    return sq


def dropout_apply(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """``x * keep / (1 - p)`` with the counter-based keep mask of
    :func:`kernels.reference.dropout_keep_mask` (AVX-512: 32 elements per 8 SplitMix64 draws)."""
    _check_cpu("x", x)
    _check_dtype("x", x, (torch.float32, torch.bfloat16))
    if not 0.0 <= p < 1.0:
        raise KernelArgumentError(f"dropout_apply: p must be in [0, 1), got {p}")
    return _ops().dropout_apply(x, int(seed), float(p))


def core_round_trip_ns(rounds: int = 2000) -> float:
    """Round trip of one cache line between the first two of this process's OpenMP threads, in ns
    (NaN with fewer than two threads): ~60 ns when they share an L3, ~340 ns when a VM's two
    vCPUs sit on two CCDs of an AMD EPYC host, where every line the threads hand each other
    costs that much (bench/README.md, "The slow state")."""
    if int(rounds) < 1:
        raise KernelArgumentError(f"core_round_trip_ns: rounds must be >= 1, got {rounds}")
    return float(_ops().core_round_trip_ns(int(rounds)))


def pack_masks(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[..., K]`` -> int32 ``[..., ceil(K/32)]``."""
    _check_cpu("mask", mask)
    _check_dtype("mask", mask, (torch.bool,))
    if mask.dim() == 0:
        raise KernelArgumentError("mask must have at least one dimension, got a scalar")
    return _ops().pack_masks(mask)


def unpack_masks(words: torch.Tensor, k: int) -> torch.Tensor:
    """int32 ``[..., ceil(K/32)]`` -> bool ``[..., K]``."""
    _check_cpu("words", words)
    _check_dtype("words", words, (torch.int32,))
    if words.dim() == 0:
        raise KernelArgumentError("words must have at least one dimension, got a scalar")
    k = int(k)
    if k < 0:
        raise KernelArgumentError(f"k must be >= 0, got {k}")
    if words.shape[-1] != num_words(k):
        raise KernelArgumentError(
            f"unpack_masks: words has {words.shape[-1]} words in its last dimension, K={k} needs {num_words(k)}"
        )
    return _ops().unpack_masks(words, k)


# ----------------------------------------------------------------------------------------------
# GEMM epilogues (kernels/csrc/epilogues.cpp)


class _BiasReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, bias):
        _ops().bias_relu_(z, bias)
        ctx.mark_dirty(z)
        ctx.save_for_backward(z)
        ctx.bias_dtype = bias.dtype
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        need_bias = bool(ctx.needs_input_grad[1])
        dz, db = _ops().bias_relu_backward(grad.to(out.dtype), out, need_bias)
        return dz, db.to(ctx.bias_dtype) if need_bias else None


class _BiasDropoutAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, bias, residual, seed, p):
        ctx.seed, ctx.p, ctx.y_dtype, ctx.bias_dtype = seed, p, y.dtype, bias.dtype
        return _ops().bias_dropout_add(y, bias, residual, seed, p)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        need_y, need_bias = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
        dy = db = None
        if need_y or need_bias:
            dy, db = _ops().dropout_bias_backward(grad, ctx.seed, ctx.p, need_bias, ctx.y_dtype)
        return (dy if need_y else None), (db.to(ctx.bias_dtype) if need_bias else None), grad, None, None


def _check_epilogue_args(op: str, y: torch.Tensor, bias: torch.Tensor) -> None:
    _check_cpu("y" if op == "bias_dropout_add" else "z", y)
    _check_cpu("bias", bias)
    _check_dtype("y" if op == "bias_dropout_add" else "z", y, (torch.float32, torch.bfloat16))
    _check_dtype("bias", bias, (torch.float32, torch.bfloat16))
    if y.dim() == 0 or bias.shape != (y.shape[-1],):
        raise KernelArgumentError(f"{op}: bias {tuple(bias.shape)} must be the last dimension of {tuple(y.shape)}")


def bias_relu_(z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``z <- relu(z + bias)`` in one pass, in place (z: a fresh contiguous GEMM output); returns
    ``z``. The backward is one pass too (ReLU's gradient and the bias gradient's row sums)."""
    _check_epilogue_args("bias_relu_", z, bias)
    if not z.is_contiguous():
        raise KernelArgumentError("bias_relu_: z must be contiguous (it is written in place)")
    return _BiasReLU.apply(z, bias)


def bias_dropout_add(y: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """``residual + dropout(y + bias)`` in one pass with ``kernels.dropout``'s keep mask (see
    :func:`kernels.reference.bias_dropout_add`); the result has ``residual``'s dtype. The backward
    is one pass: the dropped gradient and the bias gradient's row sums."""
    _check_epilogue_args("bias_dropout_add", y, bias)
    _check_cpu("residual", residual)
    _check_dtype("residual", residual, (torch.float32, torch.bfloat16))
    if residual.shape != y.shape:
        raise KernelArgumentError(f"bias_dropout_add: y {tuple(y.shape)} and residual {tuple(residual.shape)} must have one shape")
    if not 0.0 <= p < 1.0:
        raise KernelArgumentError(f"bias_dropout_add: p must be in [0, 1), got {p}")
    return _BiasDropoutAdd.apply(y, bias, residual, int(seed), float(p))


# ----------------------------------------------------------------------------------------------
# layer norm (kernels/csrc/layer_norm.cpp)


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = _ops().layer_norm_forward(x, weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd, weight)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, mean, rstd, weight = ctx.saved_tensors
        dx, dw, db = _ops().layer_norm_backward(grad.contiguous(), x, mean, rstd, weight, None)
        return dx, dw, db, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm(x, (C,), weight, bias, eps)`` over the last dimension of a contiguous fp32
    ``x (..., C)``, differentiable: one pass per row forward and backward (the raw ops
    ``layer_norm_forward`` / ``layer_norm_backward`` also add a residual gradient into ``dx``)."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        _check_cpu(name, t)
        _check_dtype(name, t, (torch.float32,))
    if x.dim() == 0 or weight.shape != (x.shape[-1],) or bias.shape != (x.shape[-1],):
        raise KernelArgumentError(f"layer_norm: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must be the last "
                                  f"dimension of x {tuple(x.shape)}")
    if not x.is_contiguous():
        raise KernelArgumentError("layer_norm: x must be contiguous")
    return _LayerNorm.apply(x, weight, bias, float(eps))


# ----------------------------------------------------------------------------------------------
# dense GEMMs and linear layers (kernels/csrc/gemm.cpp)

GEMM_ENGINES = ("auto", "native", "onednn", "blas")


def onednn_gemm_available() -> bool:
    """Whether fp32 GEMMs can go through oneDNN's matmul (PyTorch exports it and was built with
    oneDNN and its matmul runs on this CPU); ``engine="auto"`` uses it where
    :func:`f32_native_by_default` is false."""
    return bool(_ops().onednn_gemm_available())


def f32_gemm_available() -> bool:
    """Whether fp32 GEMMs can go through this library's own kernel: the AVX-512 one
    (``kernels/csrc/gemm_avx512.cpp``, built and running with AVX-512 BW/DQ/VL) or, in builds
    without AVX-512, the AVX2 + FMA one (``kernels/csrc/gemm_avx2.cpp``)."""
    return bool(_ops().f32_gemm_available())


def f32_native_by_default() -> bool:
    """Whether ``engine="auto"`` runs fp32 GEMMs on that kernel: the AVX-512 one wherever it runs,
    the AVX2 one where oneDNN's matmul does not."""
    return bool(_ops().f32_native_by_default())


def bf16_gemm_available() -> bool:
    """Whether bf16 GEMMs can go through this library's AVX512-BF16 kernel
    (``kernels/csrc/gemm_avx512.cpp``: built with AVX512-BF16 and running on a CPU that has it);
    ``engine="auto"`` uses it then."""
    return bool(_ops().bf16_gemm_available())


def _check_matmul_args(op: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor, b_k_dim: int, bias) -> None:
    """gemm's and linear's checks: 2-D fp32/bf16 CPU operands of one dtype whose K agree (``b``'s
    K along ``b_k_dim``: 0 for ``b (K, N)``, 1 for a weight ``(N, K)``) and a bias over N."""
    for name, t in ((a_name, a), (b_name, b)):
        _check_cpu(name, t)
        _check_dtype(name, t, (torch.float32, torch.bfloat16))
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[b_k_dim]:
        want = "(K, N)" if b_k_dim == 0 else "(N, K)"
        raise KernelArgumentError(f"{op}: {a_name} {tuple(a.shape)} must be (M, K) and {b_name} {tuple(b.shape)} {want}")
    if a.dtype != b.dtype:
        raise KernelDTypeError(f"{op}: {a_name} ({a.dtype}) and {b_name} ({b.dtype}) must have one dtype")
    n = b.shape[1 - b_k_dim]
    if bias is not None:
        _check_cpu("bias", bias)
        if bias.shape != (n,) or bias.dtype != a.dtype:
            raise KernelArgumentError(f"{op}: bias {tuple(bias.shape)} {bias.dtype} must be ({n},) {a.dtype}")


def _check_weight_operand(op: str, a: torch.Tensor, b: torch.Tensor, b_mask: torch.Tensor | None) -> None:
    """A bf16 ``a`` may take an fp32 ``b`` = ``W`` or ``W.t()`` of a contiguous ``W`` (rounded to bf16
    as the GEMM reads it), with ``b_mask`` = W's packed mask (:func:`pack_masks`) or None; an fp32
    ``a`` may take such a ``b`` with its ``b_mask``."""
    w = b.t() if b.dim() == 2 and b.stride(0) == 1 and b.stride(1) != 1 else b
    if not w.is_contiguous():
        raise KernelArgumentError(f"{op}: an fp32 b with a bf16 a or a b_mask must be a contiguous W or W.t(), got strides "
                                  f"{tuple(b.stride())}")
    if b_mask is not None:
        _check_cpu("b_mask", b_mask)
        want = (w.shape[0], (w.shape[1] + 31) // 32)
        if b_mask.dtype != torch.int32 or tuple(b_mask.shape) != want:
            raise KernelArgumentError(f"{op}: b_mask must be W's packed mask, int32 {want}, got {tuple(b_mask.shape)} {b_mask.dtype}")


def _matmul_operands(op: str, a: torch.Tensor, b: torch.Tensor, bias, b_mask) -> None:
    if a.dtype == torch.bfloat16 and b.dtype == torch.float32:  # a bf16 GEMM reading an fp32 weight (W * M rounded as read)
        _check_cpu("a", a)
        _check_cpu("b", b)
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
            raise KernelArgumentError(f"{op}: a {tuple(a.shape)} must be (M, K) and b {tuple(b.shape)} (K, N)")
        if bias is not None and (bias.shape != (b.shape[1],) or bias.dtype != a.dtype):
            raise KernelArgumentError(f"{op}: bias {tuple(bias.shape)} {bias.dtype} must be ({b.shape[1]},) {a.dtype}")
        _check_weight_operand(op, a, b, b_mask)
        return
    _check_matmul_args(op, "a", a, "b", b, 0, bias)
    if b_mask is not None:
        if b.dtype != torch.float32:
            raise KernelArgumentError(f"{op}: b_mask goes with an fp32 b only, got {b.dtype}")
        _check_weight_operand(op, a, b, b_mask)


def _check_native_engine(op: str, engine: str, dtype: torch.dtype) -> None:
    if engine != "native":
        return
    if dtype == torch.bfloat16 and not bf16_gemm_available():
        raise KernelArgumentError(f"{op}: engine 'native' for bf16 is the AVX512-BF16 kernel, which this build or CPU lacks; "
                                  "use engine='auto'")
    if dtype == torch.float32 and not f32_gemm_available():
        raise KernelArgumentError(f"{op}: engine 'native' for fp32 is the AVX-512 kernel (or, built without AVX-512, the "
                                  "AVX2 + FMA one), which this build or CPU lacks; use engine='auto'")


def gemm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, engine: str = "auto",
         b_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b (+ bias)`` for 2-D ``a (M, K)``, ``b (K, N)`` of one dtype (fp32 or bf16; each
    contiguous or a transposed view). ``engine``: ``"native"`` (this library's kernels,
    ``kernels/csrc/gemm_avx512.cpp``: for bf16 the AVX512-BF16 one; for fp32 the AVX-512 one, or in a
    build without AVX-512 the AVX2 + FMA one, ``kernels/csrc/gemm_avx2.cpp``; fails loudly where the
    build or CPU lacks the one asked for), ``"onednn"`` (oneDNN's matmul; fails loudly where this PyTorch build lacks
    it or the CPU lacks the AVX-512 it asks for), ``"blas"`` (``torch.mm``: MKL's sgemm for fp32, oneDNN
    inside for bf16), ``"auto"`` (native for bf16 where available; for fp32 native where
    :func:`f32_native_by_default`, else oneDNN where it runs; on a CPU where oneDNN does not run, such as an AVX2-only AMD
    Zen 3, the native fp32 kernel (MKL without it) and, for bf16, the fp32 GEMM of the exactly
    widened operands rounded once to bf16, since ``torch.mm``'s own bf16 path there runs at a few
    GFLOP/s). An fp32 weight ``b`` (``W`` or ``W.t()`` of a contiguous ``W``) may come with its packed
    mask ``b_mask``: ``a @ (b * M)`` (bf16 ``a``: ``a @ bf16(b * M)``), masked (and rounded) while the
    native kernels pack it (no ``W * M`` buffer), or by one pass before the GEMM on the other
    engines."""
    _matmul_operands("gemm", a, b, bias, b_mask)
    if engine not in GEMM_ENGINES:
        raise KernelArgumentError(f"gemm: engine must be one of {GEMM_ENGINES}, got {engine!r}")
    _check_native_engine("gemm", engine, a.dtype)
    if engine == "onednn" and not onednn_gemm_available():
        raise KernelArgumentError("gemm: engine 'onednn' is not available here (this PyTorch build has no "
                                  "at::native::mkldnn_matmul or no oneDNN, or its matmul refuses this CPU); use engine='auto' or 'blas'")
    return _ops().gemm(a, b, bias, engine, b_mask)


GEMM_EPILOGUES = ("bias_relu", "bias_dropout_add", "masked_grad", "relu_grad")


def gemm_epilogue(a: torch.Tensor, b: torch.Tensor, epilogue: str, bias: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None, mask: torch.Tensor | None = None, seed: int = 0, p: float = 0.0,
                  engine: str = "auto", b_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A training block's GEMM and the pass after it, as one op (``kernels/csrc/gemm.cpp``):

    * ``"bias_relu"``: ``relu(a @ b + bias)`` in ``a``'s dtype (the fc layer);
    * ``"bias_dropout_add"``: ``residual + dropout(a @ b + bias)`` in fp32 (the keep mask of
      :func:`dropout_apply` over the flat index of ``(M, N)``; proj and mlp_proj);
    * ``"masked_grad"``: ``(a @ b) * mask`` in fp32 and its sum of squares (a weight gradient, Eq. 4;
      ``mask`` packed by :func:`pack_masks`);
    * ``"relu_grad"``: ``(a @ b) * (z > 0)`` in ``a``'s dtype and its column sums in fp32 (ReLU's
      backward with the fc bias gradient; ``z``, the ReLU's output in ``a``'s dtype, passed as
      ``residual``).

    Returns ``(out, extra)``: the sum of squares (float64, 0-dim) for ``"masked_grad"``, the column
    sums (fp32 ``(N,)``) for ``"relu_grad"``, else None.
    ``bias``: fp32 ``(N,)``; ``residual``: fp32 ``(M, N)``. bf16 operands on the AVX512-BF16 kernel
    (``engine`` ``"auto"`` where available, or ``"native"``) apply the epilogue to each output
    block in registers, from the unrounded fp32 sums; otherwise the GEMM (:func:`gemm`'s engine)
    then the epilogue op, which for bf16 reads the GEMM's rounded output. ``b``/``b_mask``: as in
    :func:`gemm` (a bf16 ``a`` with an fp32 weight, masked as read)."""
    _matmul_operands("gemm_epilogue", a, b, None, b_mask)
    if epilogue not in GEMM_EPILOGUES:
        raise KernelArgumentError(f"gemm_epilogue: epilogue must be one of {GEMM_EPILOGUES}, got {epilogue!r}")
    if engine not in GEMM_ENGINES:
        raise KernelArgumentError(f"gemm_epilogue: engine must be one of {GEMM_ENGINES}, got {engine!r}")
    m, n = a.shape[0], b.shape[1]
    if epilogue in ("bias_relu", "bias_dropout_add") and (bias is None or bias.shape != (n,) or bias.dtype != torch.float32):
        got = None if bias is None else f"{tuple(bias.shape)} {bias.dtype}"
        raise KernelArgumentError(f"gemm_epilogue: {epilogue!r} needs bias, float32 ({n},), got {got}")
    if epilogue == "bias_dropout_add":
        if residual is None or residual.shape != (m, n) or residual.dtype != torch.float32:
            got = None if residual is None else f"{tuple(residual.shape)} {residual.dtype}"
            raise KernelArgumentError(f"gemm_epilogue: 'bias_dropout_add' needs residual, float32 ({m}, {n}), got {got}")
        if not 0.0 <= p < 1.0:
            raise ValueError(f"gemm_epilogue: p must be in [0, 1), got {p}")
    if epilogue == "relu_grad" and (residual is None or residual.shape != (m, n) or residual.dtype != a.dtype):
        got = None if residual is None else f"{tuple(residual.shape)} {residual.dtype}"
        raise KernelArgumentError(f"gemm_epilogue: 'relu_grad' needs residual = the ReLU's output, {a.dtype} ({m}, {n}), got {got}")
    if epilogue == "masked_grad" and (mask is None or mask.shape != (m, (n + 31) // 32) or mask.dtype != torch.int32):
        got = None if mask is None else f"{tuple(mask.shape)} {mask.dtype}"
        raise KernelArgumentError(f"gemm_epilogue: 'masked_grad' needs mask, packed int32 ({m}, {(n + 31) // 32}), got {got}")
    _check_native_engine("gemm_epilogue", engine, a.dtype)
    out, sq = _ops().gemm_epilogue(a, b, epilogue, bias, residual, mask, int(seed), float(p), engine, b_mask)
    return out, (sq if epilogue in ("masked_grad", "relu_grad") else None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for 2-D ``x (M, K)``, ``weight (N, K)``, ``bias (N,)`` of one dtype (fp32 or
    bf16), differentiable, with the forward GEMM and both backward GEMMs through :func:`gemm`'s
    ``"auto"`` engine. The autograd node is C++ (one dispatch per call)."""
    _check_matmul_args("linear", "x", x, "weight", weight, 1, bias)
    return _ops().linear(x, weight, bias)


# ----------------------------------------------------------------------------------------------
# attention


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, key_valid, query_pos, k_prefix, v_prefix, p, seed, qkv_bias):
        need = bool(ctx.needs_input_grad[0] or ctx.needs_input_grad[7])
        out, lse = _ops().attention_forward(qkv, k_prefix, v_prefix, key_valid, query_pos, p, seed, need, qkv_bias)
        if need:
            ctx.save_for_backward(qkv, key_valid, query_pos, k_prefix, v_prefix, lse, qkv_bias)
        ctx.p, ctx.seed = p, seed
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        qkv, key_valid, query_pos, k_prefix, v_prefix, lse, qkv_bias = ctx.saved_tensors
        dqkv = _ops().attention_backward(grad_out, qkv, k_prefix, v_prefix, key_valid, query_pos, lse, ctx.p, ctx.seed, qkv_bias)
        dbias = None
        if ctx.needs_input_grad[7]:  # the bias was added to every own token's q/k/v: fp32 column sums
            dbias = dqkv.reshape(-1, dqkv.shape[2] * dqkv.shape[3] * dqkv.shape[4]).sum(0, dtype=torch.float32)
        return (dqkv if ctx.needs_input_grad[0] else None), None, None, None, None, None, None, dbias


def attention(qkv: torch.Tensor, key_valid: torch.Tensor, query_pos: torch.Tensor, prefix=None, p: float = 0.0,
              seed: int = 0, qkv_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Fused causal attention (see :func:`kernels.reference.attention`): one pass per (batch, head)
    pair with the keys in fp32 buffers, AVX-512 scores/softmax/combination, dropout recomputed in
    the backward from the seed (only the rows' log-sum-exp is saved). Prefix keys/values take no
    gradient. ``qkv_bias``: float32 ``(3 H D,)`` added to the own tokens' q/k/v as they are read
    (the projection's bias, so its GEMM need not write it)."""
    _check_cpu("qkv", qkv)
    _check_dtype("qkv", qkv, (torch.float32, torch.bfloat16))
    _check_dtype("key_valid", key_valid, (torch.bool,))
    _check_dtype("query_pos", query_pos, (torch.int64,))
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise KernelArgumentError(f"attention: qkv must be (B, T, 3, H, D), got {tuple(qkv.shape)}")
    if qkv_bias is not None:
        _check_cpu("qkv_bias", qkv_bias)
        _check_dtype("qkv_bias", qkv_bias, (torch.float32,))
        if qkv_bias.shape != (3 * qkv.shape[3] * qkv.shape[4],):
            raise KernelArgumentError(f"attention: qkv_bias must be ({3 * qkv.shape[3] * qkv.shape[4]},) for qkv "
                                      f"{tuple(qkv.shape)}, got {tuple(qkv_bias.shape)}")
        qkv_bias = qkv_bias.contiguous()
    kp = vp = None
    if prefix is not None:
        kp, vp = prefix
        if kp.requires_grad or vp.requires_grad:
            raise KernelArgumentError("attention: prefix keys/values take no gradient here (they are a cache)")
        if kp.stride(-1) != 1:
            kp = kp.contiguous()
        if vp.stride(-1) != 1:
            vp = vp.contiguous()
    if not 0.0 <= p < 1.0:
        raise KernelArgumentError(f"attention: dropout p must be in [0, 1), got {p}")
    return _Attention.apply(qkv.contiguous(), key_valid.contiguous(), query_pos.contiguous(), kp, vp, float(p), int(seed), qkv_bias)


# ----------------------------------------------------------------------------------------------
# masked_linear


class _MaskedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, masks, task_ids, task_grads):
        ctx.save_for_backward(x, weight, masks, task_ids)
        ctx.has_bias = bias is not None
        ctx.task_grads = task_grads
        return _ops().masked_linear_forward(x, weight, bias, masks, task_ids)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight, masks, task_ids = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, dw, db = _ops().masked_linear_backward(
            grad_y, x, weight, masks, task_ids, bool(need_x), bool(need_w), bool(need_b and ctx.has_bias),
            ctx.task_grads if need_w else None,
        )
        return dx, dw, db, None, None, None


def masked_linear(x, weight, bias, masks, task_ids, task_grads=None, task_weights=None):
    """``y[r] = x[r] @ (weight * M[task_ids[r]]).T + bias``; see :func:`kernels.reference.masked_linear`.

    x ``[R, K]`` float32/bfloat16, weight ``[N, K]`` same dtype, bias ``[N]`` or None, masks packed
    int32 ``[T, N, ceil(K/32)]`` (or bool ``[T, N, K]``, packed here), task_ids integer ``[R]`` in
    ``[0, T)``; task_grads: None or a contiguous float32 ``[T, N, K]`` buffer that receives each
    task's unmasked ``dY_t^T X_t`` on backward (when weight requires grad, like the reference).
    task_weights: None or every task's ``weight * M_t`` already expanded, ``[T, N, K]`` of x's dtype
    (:func:`kernels.task_weights`), read instead of expanding the bits; inference only (no gradients).
    """
    for name, t in (("x", x), ("weight", weight), ("masks", masks), ("task_ids", task_ids)):
        _check_cpu(name, t)
    _check_dtype("x", x, (torch.float32, torch.bfloat16))
    if x.dim() != 2:
        raise KernelArgumentError(f"x must be [R, K], got shape {tuple(x.shape)}")
    r, k = x.shape
    if weight.dim() != 2 or weight.shape[1] != k:
        raise KernelArgumentError(f"weight must be [N, {k}] to match x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise KernelDTypeError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    n = weight.shape[0]
    if bias is not None:
        _check_cpu("bias", bias)
        if bias.shape != (n,):
            raise KernelArgumentError(f"bias must be [{n}], got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise KernelDTypeError(f"bias dtype {bias.dtype} differs from x dtype {x.dtype}")
    if masks.dtype == torch.bool:
        if masks.dim() != 3 or masks.shape[1:] != (n, k):
            raise KernelArgumentError(f"bool masks must be [T, {n}, {k}], got {tuple(masks.shape)}")
        masks = pack_masks(masks)
    _check_dtype("masks", masks, (torch.int32, torch.bool))
    if masks.dim() != 3 or masks.shape[1:] != (n, num_words(k)):
        raise KernelArgumentError(f"masks must be [T, {n}, {num_words(k)}] int32, got {tuple(masks.shape)}")
    if task_ids.dtype.is_floating_point or task_ids.dtype.is_complex or task_ids.dtype == torch.bool:
        raise KernelDTypeError(f"task_ids must be an integer tensor, got {task_ids.dtype}")
    if task_ids.shape != (r,):
        raise KernelArgumentError(f"task_ids must be [{r}], got {tuple(task_ids.shape)}")
    task_ids = task_ids.to(torch.int64)
    t_count = masks.shape[0]
    if task_grads is not None:
        _check_cpu("task_grads", task_grads)
        _check_dtype("task_grads", task_grads, (torch.float32,))
        if task_grads.shape != (t_count, n, k):
            raise KernelArgumentError(f"task_grads must be [{t_count}, {n}, {k}], got {tuple(task_grads.shape)}")
        if not task_grads.is_contiguous():
            raise KernelArgumentError("task_grads must be contiguous (it is accumulated in place)")
    if r > 0:
        lo, hi = int(task_ids.min()), int(task_ids.max())
        if lo < 0 or hi >= t_count:
            raise KernelArgumentError(f"task_ids must lie in [0, {t_count}) (masks hold {t_count} tasks), got [{lo}, {hi}]")
    if task_weights is not None:
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
            raise KernelArgumentError("masked_linear with task_weights is inference-only: call it under torch.no_grad()")
        _check_task_weights("task_weights", task_weights, t_count, weight)
        return _ops().masked_linear_forward(x, weight, bias, masks, task_ids, task_weights)
    return _MaskedLinear.apply(x, weight, bias, masks, task_ids, task_grads)


def _check_task_weights(name, tw, t_count, weight) -> None:
    _check_cpu(name, tw)
    if tw.dtype != weight.dtype:
        raise KernelDTypeError(f"{name} dtype {tw.dtype} differs from the weight's {weight.dtype}")
    if tw.shape != (t_count, *weight.shape):
        raise KernelArgumentError(f"{name} must be [{t_count}, {weight.shape[0]}, {weight.shape[1]}] (one W * M per task), "
                                  f"got {tuple(tw.shape)}")


# ----------------------------------------------------------------------------------------------
# harmony_select


def harmony_select(masked_grads, grads, params, masks, k, lam, importance="magnitude"):
    """Algorithm 2's selection for all tasks; see :func:`kernels.reference.harmony_select`."""
    if importance not in ("magnitude", "fisher"):
        raise KernelArgumentError(f"importance must be 'magnitude' or 'fisher', got {importance!r}")
    for name, t in (("masked_grads", masked_grads), ("grads", grads), ("params", params), ("masks", masks)):
        _check_cpu(name, t)
    for name, t in (("masked_grads", masked_grads), ("grads", grads), ("params", params)):
        if not t.dtype.is_floating_point:
            raise KernelDTypeError(f"{name} must be floating point, got {t.dtype}")
    _check_dtype("masks", masks, (torch.int32,))
    if masked_grads.dim() != 2:
        raise KernelArgumentError(f"masked_grads must be [T, P], got {tuple(masked_grads.shape)}")
    t_count, p = masked_grads.shape
    if grads.shape != (t_count, p):
        raise KernelArgumentError(f"grads must be [{t_count}, {p}] like masked_grads, got {tuple(grads.shape)}")
    if params.shape != (p,):
        raise KernelArgumentError(f"params must be [{p}], got {tuple(params.shape)}")
    if masks.shape != (t_count, num_words(p)):
        raise KernelArgumentError(f"masks must be [{t_count}, {num_words(p)}], got {tuple(masks.shape)}")
    return _ops().harmony_select(masked_grads, grads, params, masks, int(k), float(lam), importance == "fisher")


def masked_mlp(x, w1, b1, m1, w2, b2, m2, task_ids, task_w1=None, task_w2=None) -> torch.Tensor:
    """Inference-only fused MLP of a block (see :func:`kernels.reference.masked_mlp`): per task,
    fc, ReLU and projection run on the task's rows while their hidden activations are in cache.
    No gradients: inputs that require grad are refused. ``task_w1`` / ``task_w2``: None or every
    task's ``W * M_t`` already expanded (:func:`kernels.task_weights`), read instead of the bits."""
    for name, t in (("x", x), ("w1", w1), ("w2", w2), ("m1", m1), ("m2", m2), ("task_ids", task_ids)):
        _check_cpu(name, t)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w2, b2)):
        raise KernelArgumentError("masked_mlp is inference-only: call it under torch.no_grad() (or use masked_linear)")
    _check_dtype("x", x, (torch.float32, torch.bfloat16))
    _check_dtype("m1", m1, (torch.int32,))
    _check_dtype("m2", m2, (torch.int32,))
    _check_dtype("task_ids", task_ids, (torch.int64,))
    for name, tw, w, m in (("task_w1", task_w1, w1, m1), ("task_w2", task_w2, w2, m2)):
        if tw is not None:
            _check_task_weights(name, tw, m.shape[0], w)
    return _ops().masked_mlp_forward(x, w1, b1, m1, w2, b2, m2, task_ids, task_w1, task_w2)


def masked_qkv_attention(x, weight, bias, masks, row_tasks, n_head, key_valid, query_pos, prefix=None,
                         task_weights=None) -> torch.Tensor:
    """Inference-only fusion of a block's masked q/k/v projection and attention (see
    :func:`kernels.reference.masked_qkv_attention`): per run of consecutive batch rows of one task
    (at most 16), the projection's output goes from the GEMM to the attention while in cache.
    ``task_weights``: None or every task's ``W * M_t`` (:func:`kernels.task_weights`), read instead of the bits."""
    for name, t in (("x", x), ("weight", weight), ("masks", masks), ("row_tasks", row_tasks), ("key_valid", key_valid)):
        _check_cpu(name, t)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        raise KernelArgumentError("masked_qkv_attention is inference-only: call it under torch.no_grad()")
    _check_dtype("x", x, (torch.float32, torch.bfloat16))
    _check_dtype("masks", masks, (torch.int32,))
    _check_dtype("row_tasks", row_tasks, (torch.int64,))
    _check_dtype("key_valid", key_valid, (torch.bool,))
    _check_dtype("query_pos", query_pos, (torch.int64,))
    kp, vp = (None, None) if prefix is None else prefix
    if task_weights is not None:
        _check_task_weights("task_weights", task_weights, masks.shape[0], weight)
    return _ops().masked_qkv_attention_forward(x, weight, bias, masks, row_tasks, int(n_head), key_valid, query_pos.contiguous(), kp, vp,
                                               task_weights)
