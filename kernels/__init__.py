"""Public kernel API: the same calls on every backend.

* ``"reference"``: plain PyTorch (`kernels/reference.py`), the single source of truth.
* ``"triton"``: Triton kernels (`kernels/triton_masked_linear.py`, `kernels/triton_harmony_select.py`); CUDA
  tensors, or CPU tensors when ``TRITON_INTERPRET=1`` is set.
* ``"cpu"``: the native C++/OpenMP ops built from `kernels/csrc/` by CMake (`kernels/cpu.py`).
* ``"auto"``: Triton for CUDA tensors, the native op for CPU tensors (or, per op, whichever
  `bench/` measured faster on CPU -- see ``CPU_DISPATCH``), the reference when neither can run.

An explicitly requested backend that cannot run raises :class:`BackendUnavailable` naming why.
``kernels`` is a leaf package: it never imports ``harmodt``.
"""

from __future__ import annotations

import os

import torch

from . import reference
from .reference import num_words

__all__ = [
    "BackendUnavailable",
    "apply_mask_",
    "apply_masks_",
    "apply_masks_sq_norms_",
    "attention",
    "available_backends",
    "bias_dropout_add",
    "bias_relu_",
    "dropout",
    "harmony_select",
    "layer_norm",
    "linear",
    "masked_linear",
    "masked_mlp",
    "masked_qkv_attention",
    "num_words",
    "pack_masks",
    "resolve_backend",
    "unpack_masks",
]

BACKENDS = ("auto", "triton", "cpu", "reference")

# On CPU tensors, "auto" takes the native op for these ops; an op listed with "reference" is one
# where bench/ measured the plain PyTorch path faster (kept measured, see bench/README.md).
CPU_DISPATCH = {"apply_mask_": "cpu", "apply_masks_": "cpu", "apply_masks_sq_norms_": "cpu", "attention": "cpu", "bias_dropout_add": "cpu", "bias_relu_": "cpu", "dropout": "cpu", "masked_linear": "cpu", "masked_mlp": "cpu", "masked_qkv_attention": "cpu", "harmony_select": "cpu", "layer_norm": "cpu", "linear": "cpu", "pack_masks": "cpu", "unpack_masks": "cpu"}


class BackendUnavailable(RuntimeError):
    """An explicitly requested kernel backend cannot run here."""


def _triton_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on tensors of this device, else why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton is not importable ({exc})"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"Triton needs CUDA tensors (got {device.type}) or TRITON_INTERPRET=1 for the CPU interpreter"


_CPU_READY = False  # set once the native library has loaded (it cannot unload)


def _cpu_reason(device: torch.device) -> str | None:
    global _CPU_READY
    if device.type != "cpu":
        return f"the native CPU op takes CPU tensors (got {device.type})"
    if _CPU_READY:
        return None
    try:
        from . import cpu
    except ImportError as exc:
        return f"the native CPU library is not installed ({exc})"
    why = cpu.unavailable_reason()
    _CPU_READY = why is None
    return why


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on tensors of ``device``."""
    device = torch.device(device)
    out = ["reference"]
    if _triton_reason(device) is None:
        out.append("triton")
    if _cpu_reason(device) is None:
        out.append("cpu")
    return out


def resolve_backend(backend: str, device: torch.device, op: str = "masked_linear") -> str:
    """Turn ``backend`` into a concrete one for ``op`` on ``device``; fail loudly if it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "reference":
        return backend
    if backend == "triton":
        why = _triton_reason(device)
        if why:
            raise BackendUnavailable(f"backend='triton' cannot run: {why}")
        return backend
    if backend == "cpu":
        why = _cpu_reason(device)
        if why:
            raise BackendUnavailable(f"backend='cpu' cannot run: {why}")
        return backend
    # auto
    if device.type == "cuda" and _triton_reason(device) is None:
        return "triton"
    if device.type == "cpu" and CPU_DISPATCH.get(op) == "cpu" and _cpu_reason(device) is None:
        return "cpu"
    return "reference"


def apply_mask_(out: torch.Tensor, src: torch.Tensor, mask: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``out = where(mask, src, 0)`` (``out`` may be ``src``); returns ``out``. ``mask``: bool of
    ``src``'s shape or its packed int32 words. The native op takes fp32 contiguous CPU tensors;
    under ``"auto"`` anything else goes to the reference."""
    if backend == "triton":
        raise BackendUnavailable("apply_mask_ has no Triton kernel (on a GPU torch.where is already one fused pass); "
                                 "use backend='auto' or 'reference'")
    b = resolve_backend(backend, src.device, "apply_mask_")
    if b == "cpu" and (backend == "cpu" or (src.dtype == out.dtype == torch.float32 and src.is_contiguous()
                                            and out.is_contiguous() and mask.is_contiguous())):
        from . import cpu

        return cpu.apply_mask_(out, src, mask)
    return reference.apply_mask_(out, src, mask)


def _native_mask_lists(outs: list, srcs: list, masks: list) -> bool:
    """Whether "auto" may take the native list ops: contiguous fp32 matrices and masks, or with
    packed masks fp32 -> bf16 and bf16 -> fp32."""
    def dtypes_ok(o, s, m):
        if s.dtype == o.dtype == torch.float32:
            return True
        return m.dtype == torch.int32 and {s.dtype, o.dtype} == {torch.float32, torch.bfloat16}

    return all(dtypes_ok(o, s, m) and s.is_contiguous() and o.is_contiguous() and m.is_contiguous() for o, s, m in zip(outs, srcs, masks))


def apply_masks_(outs: list, srcs: list, masks: list, backend: str = "auto") -> list:
    """:func:`apply_mask_` over lists of matrices in one call (the training step masks all of a
    model's weights, and later their gradients, at once); returns ``outs``."""
    if backend == "triton":
        raise BackendUnavailable("apply_masks_ has no Triton kernel; use backend='auto', 'cpu' or 'reference'")
    if not srcs:
        return outs
    b = resolve_backend(backend, srcs[0].device, "apply_masks_")
    if b == "cpu" and (backend == "cpu" or _native_mask_lists(outs, srcs, masks)):
        from . import cpu

        return cpu.apply_masks_(outs, srcs, masks)
    return reference.apply_masks_(outs, srcs, masks)


def apply_masks_sq_norms_(outs: list, srcs: list, masks: list, backend: str = "auto") -> torch.Tensor:
    """:func:`apply_masks_`, also returning each output's sum of squares, float64 ``[len(outs)]``
    (the training step masks its weight gradients and gets their norms for clipping in one pass)."""
    if backend == "triton":
        raise BackendUnavailable("apply_masks_sq_norms_ has no Triton kernel; use backend='auto', 'cpu' or 'reference'")
    if not srcs:
        return torch.zeros(0, dtype=torch.float64)
    b = resolve_backend(backend, srcs[0].device, "apply_masks_sq_norms_")
    if b == "cpu" and (backend == "cpu" or _native_mask_lists(outs, srcs, masks)):
        from . import cpu

        return cpu.apply_masks_sq_norms_(outs, srcs, masks)
    return reference.apply_masks_sq_norms_(outs, srcs, masks)


class _Dropout(torch.autograd.Function):
    """Counter-based dropout: the backward recomputes the keep mask from the seed (nothing saved)."""

    @staticmethod
    def forward(ctx, x, p, seed, fn):
        ctx.p, ctx.seed, ctx.fn = p, seed, fn
        return fn(x, seed, p)

    @staticmethod
    def backward(ctx, grad):
        return ctx.fn(grad, ctx.seed, ctx.p), None, None, None


def dropout(x: torch.Tensor, p: float, seed: int, backend: str = "auto") -> torch.Tensor:
    """Differentiable dropout of ``x`` (float32 or bfloat16, scaled by ``1/(1-p)``) whose keep
    mask is a function of ``(seed, element index)`` only (see
    :func:`kernels.reference.dropout_keep_mask`): draw ``seed`` from your generator per call."""
    if backend == "triton":
        raise BackendUnavailable("dropout has no Triton kernel; use backend='auto', 'cpu' or 'reference'")
    b = resolve_backend(backend, x.device, "dropout")
    if b == "cpu":
        from . import cpu

        fn = cpu.dropout_apply
    else:
        fn = reference.dropout_apply
    return _Dropout.apply(x, float(p), int(seed), fn)


def bias_relu_(z: torch.Tensor, bias: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``z <- relu(z + bias)`` in place, differentiable (``z``: a fresh GEMM output, ``bias`` over
    its last dimension); returns ``z``. The native op is one pass forward and one backward (ReLU's
    gradient with the bias gradient's row sums); see :func:`kernels.reference.bias_relu_`."""
    if backend == "triton":
        raise BackendUnavailable("bias_relu_ has no Triton kernel (on a GPU use torch ops); use backend='auto', 'cpu' or 'reference'")
    b = resolve_backend(backend, z.device, "bias_relu_")
    if b == "cpu" and (backend == "cpu" or (z.dtype in (torch.float32, torch.bfloat16) and z.is_contiguous()
                                            and bias.dtype in (torch.float32, torch.bfloat16))):
        from . import cpu

        return cpu.bias_relu_(z, bias)
    return reference.bias_relu_(z, bias)


def bias_dropout_add(y: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, p: float, seed: int,
                     backend: str = "auto") -> torch.Tensor:
    """``residual + dropout(y + bias)``, differentiable, with :func:`dropout`'s counter-based keep
    mask for ``seed`` over ``y``'s elements (so it equals ``residual + dropout(y + bias, p,
    seed)``); the result has ``residual``'s dtype. See :func:`kernels.reference.bias_dropout_add`."""
    if backend == "triton":
        raise BackendUnavailable("bias_dropout_add has no Triton kernel; use backend='auto', 'cpu' or 'reference'")
    b = resolve_backend(backend, y.device, "bias_dropout_add")
    if b == "cpu" and (backend == "cpu" or all(t.dtype in (torch.float32, torch.bfloat16) for t in (y, bias, residual))):
        from . import cpu

        return cpu.bias_dropout_add(y, bias, residual, seed, p)
    return reference.bias_dropout_add(y, bias, residual, int(seed), float(p))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, backend: str = "auto") -> torch.Tensor:
    """``F.layer_norm`` over the last dimension of ``x (..., C)``, differentiable. The native op
    (fp32, contiguous ``x``) reads each row twice while it is in cache and writes it once, forward
    and backward. See :func:`kernels.reference.layer_norm`."""
    if backend == "triton":
        raise BackendUnavailable("layer_norm has no Triton kernel (on a GPU use F.layer_norm); use backend='auto', 'cpu' or 'reference'")
    b = resolve_backend(backend, x.device, "layer_norm")
    if b == "cpu" and (backend == "cpu" or (all(t.dtype == torch.float32 for t in (x, weight, bias)) and x.is_contiguous()
                                            and not torch.is_autocast_enabled("cpu"))):
        from . import cpu

        return cpu.layer_norm(x, weight, bias, eps)
    return reference.layer_norm(x, weight, bias, eps)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``F.linear(x, weight, bias)`` over the last dimension of ``x (..., K)``, differentiable;
    returns ``(..., N)``. The native op runs the forward GEMM and both backward GEMMs through
    oneDNN's fp32 matmul instead of MKL's sgemm (:func:`kernels.cpu.gemm`; 5-30 % faster on this
    project's Zen 4 CPUs). Under CPU autocast the operands are cast to the autocast dtype first,
    as ``F.linear`` does. See :func:`kernels.reference.linear`."""
    if backend == "triton":
        raise BackendUnavailable("linear has no Triton kernel (on a GPU use F.linear); use backend='auto', 'cpu' or 'reference'")
    b = resolve_backend(backend, x.device, "linear")
    if b == "cpu":
        autocast = torch.is_autocast_enabled("cpu")
        if autocast:
            dt = torch.get_autocast_dtype("cpu")
            x, weight, bias = x.to(dt), weight.to(dt), None if bias is None else bias.to(dt)
        if backend == "cpu" or (x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16)
                                and (bias is None or bias.dtype == x.dtype)):
            from . import cpu

            x2 = x.flatten(0, -2) if x.dim() > 1 else x.unsqueeze(0)  # (M, K)
            if autocast:  # operands already cast; the op must not be cast again
                with torch.autocast("cpu", enabled=False):
                    y = cpu.linear(x2, weight, bias)
            else:
                y = cpu.linear(x2, weight, bias)
            return y.view(*x.shape[:-1], weight.shape[0])
    return reference.linear(x, weight, bias)


def attention(qkv: torch.Tensor, key_valid: torch.Tensor, query_pos: torch.Tensor, prefix=None, p: float = 0.0,
              seed: int = 0, backend: str = "auto", qkv_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of the model's blocks read from the packed projection ``qkv (B, T, 3, H,
    D)``, with optional cached prefix keys/values and counter-based dropout on the probabilities;
    returns ``(B, Tq, H * D)``. ``qkv_bias`` (float32 ``(3 H D,)``): the projection's bias, added to
    the own tokens' q/k/v in fp32 as they are read. Shapes and visibility:
    :func:`kernels.reference.attention`."""
    if backend == "triton":
        raise BackendUnavailable("attention has no Triton kernel (on a GPU use scaled_dot_product_attention); "
                                 "use backend='auto', 'cpu' or 'reference'")
    b = resolve_backend(backend, qkv.device, "attention")
    if b == "cpu" and (backend == "cpu" or qkv.dtype in (torch.float32, torch.bfloat16)):
        from . import cpu

        return cpu.attention(qkv, key_valid, query_pos, prefix, p, seed, qkv_bias)
    return reference.attention(qkv, key_valid, query_pos, prefix, p, seed, qkv_bias)


def pack_masks(mask: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """bool ``[..., K]`` -> int32 ``[..., ceil(K/32)]``; bit ``j % 32`` of word ``j // 32`` is column j."""
    b = resolve_backend(backend, mask.device, "pack_masks")
    if b == "cpu":
        from . import cpu

        return cpu.pack_masks(mask)
    return reference.pack_masks(mask)


def unpack_masks(words: torch.Tensor, k: int, backend: str = "auto") -> torch.Tensor:
    """int32 ``[..., ceil(K/32)]`` -> bool ``[..., K]``."""
    b = resolve_backend(backend, words.device, "unpack_masks")
    if b == "cpu":
        from . import cpu

        return cpu.unpack_masks(words, k)
    return reference.unpack_masks(words, k)


def task_weights(weight: torch.Tensor, masks: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Every task's ``weight * M_t``, ``[T, N, K]``, from packed int32 ``[T, N, ceil(K/32)]`` (or
    bool ``[T, N, K]``) masks, through :func:`apply_masks_`. Evaluation, where the weights do not
    change, expands them once and hands them to the inference ops (``task_weights=``), which then
    skip expanding the bits at every step; it costs ``T * N * K`` values of memory."""
    t = masks.shape[0]
    out = torch.empty(t, *weight.shape, dtype=weight.dtype, device=weight.device)
    apply_masks_(list(out.unbind(0)), [weight.detach().contiguous()] * t, list(masks.unbind(0)), backend=backend)
    return out


def masked_linear(x, weight, bias, masks, task_ids, backend: str = "auto", task_grads=None, task_weights=None):
    """``y[r] = x[r] @ (weight * M[task_ids[r]]).T + bias`` without materializing masked weights.

    See :func:`kernels.reference.masked_linear` for shapes and gradients. ``task_grads``: optional
    fp32 ``[T, N, K]`` buffer that receives each task's unmasked ``dY_t^T X_t`` on backward.
    ``task_weights``: optional ``[T, N, K]`` = :func:`task_weights` of these weight and masks, for
    inference: the native op reads it instead of expanding the bits; the other backends compute the
    same values from the masks.
    """
    b = resolve_backend(backend, x.device, "masked_linear")
    if b == "triton":
        from .triton_masked_linear import triton_masked_linear

        return triton_masked_linear(x, weight, bias, masks, task_ids, task_grads=task_grads)
    if b == "cpu":
        from . import cpu

        return cpu.masked_linear(x, weight, bias, masks, task_ids, task_grads=task_grads, task_weights=task_weights)
    return reference.masked_linear(x, weight, bias, masks, task_ids, task_grads=task_grads)


def _needs_grad(*tensors) -> bool:
    """Whether autograd would record an op on these (the inference-only native ops refuse it)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def masked_mlp(x, w1, b1, m1, w2, b2, m2, task_ids, backend: str = "auto", task_w1=None, task_w2=None):
    """A block's MLP, ``relu(x W1_t^T + b1) W2_t^T + b2`` through each row's task masks (packed),
    for inference: the native op keeps each task's hidden activations in cache; the reference and
    Triton compose two :func:`masked_linear` calls (differentiable). ``task_w1`` / ``task_w2``:
    optional :func:`task_weights` of (w1, m1) / (w2, m2), read by the native op instead of the bits."""
    b = resolve_backend(backend, x.device, "masked_mlp")
    if b == "cpu" and (backend == "cpu" or not _needs_grad(x, w1, b1, w2, b2)):  # (explicit "cpu" with gradients raises)
        from . import cpu

        return cpu.masked_mlp(x, w1, b1, m1, w2, b2, m2, task_ids, task_w1, task_w2)
    h = masked_linear(x, w1, b1, m1, task_ids, backend=b)  # with gradients: two differentiable calls
    return masked_linear(torch.relu(h), w2, b2, m2, task_ids, backend=b)


def masked_qkv_attention(x, weight, bias, masks, row_tasks, n_head, key_valid, query_pos, prefix=None, backend: str = "auto",
                         task_weights=None):
    """A block's masked q/k/v projection then attention, for inference: ``x`` ``[B * T, C]``,
    ``row_tasks (B,)`` each batch row's task, packed ``masks``; returns ``(B, Tq, C)``. The native
    op keeps each task run's projection in cache; otherwise :func:`masked_linear` then
    :func:`attention`. ``task_weights``: optional :func:`task_weights` of (weight, masks), read by
    the native op instead of the bits."""
    b = resolve_backend(backend, x.device, "masked_qkv_attention")
    if b == "cpu" and (backend == "cpu" or not _needs_grad(x, weight, bias)):  # (explicit "cpu" with gradients raises)
        from . import cpu

        return cpu.masked_qkv_attention(x, weight, bias, masks, row_tasks, n_head, key_valid, query_pos, prefix, task_weights)
    rows, c = row_tasks.shape[0], x.shape[1]
    t = x.shape[0] // rows
    qkv = masked_linear(x, weight, bias, masks, row_tasks.repeat_interleave(t), backend=b)
    return attention(qkv.view(rows, t, 3, n_head, c // n_head), key_valid, query_pos, prefix,
                     backend="reference" if b == "triton" else b)


def harmony_select(masked_grads, grads, params, masks, k, lam, importance="magnitude", backend: str = "auto"):
    """Algorithm 2's mask/recover selection for all tasks in one call; returns new packed masks.

    See :func:`kernels.reference.harmony_select`.
    """
    b = resolve_backend(backend, masked_grads.device, "harmony_select")
    if b == "triton":
        from .triton_harmony_select import triton_harmony_select

        return triton_harmony_select(masked_grads, grads, params, masks, k, lam, importance)
    if b == "cpu":
        from . import cpu

        return cpu.harmony_select(masked_grads, grads, params, masks, k, lam, importance)
    return reference.harmony_select(masked_grads, grads, params, masks, k, lam, importance)
