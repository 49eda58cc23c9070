"""``masked_linear``: its argument checks, its op on one backend (:class:`MaskedLinearOp`, checks
once per configuration, then the backend's ``"masked_linear"``), the evaluation's cached variant
and the native backend's autograd function. Backend implementations take
``(x, weight, bias, masks, task_ids, task_grads, segments[, relu, dropout_p, seed])``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import reference
from ..backends import Backend
from ..checks import KernelArgumentError, dtype_name, same_device, shape, shape_list, tensor
from ..reference import num_words
from .common import remember, seed_arg, tensor_key
from .dropout import check as check_dropout

# Device types with an autocast mode, read once: Dynamo in some torch releases cannot trace
# ``torch.amp.is_autocast_available`` inside a compiled region.
_AUTOCAST_DEVICE_TYPES = frozenset(d for d in ("cpu", "cuda", "xpu", "mps", "hpu",
                                               "xla") if torch.amp.is_autocast_available(d))


def _autocast_operands(x, weight, bias):
    """Under autocast on the tensors' device, the operands in the autocast dtype (as ``F.linear``
    would get them; the cast is differentiable, so gradients reach the fp32 weight)."""
    dev = x.device.type
    if dev not in _AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(dev):
        return x, weight, bias
    dt = torch.get_autocast_dtype(dev)
    return x.to(dt), weight.to(dt), None if bias is None else bias.to(dt)


def check(x, weight, bias, masks, task_ids, task_grads, segments, *, dtypes: tuple, devices: tuple | None,
          bool_masks: bool) -> None:
    """The arguments of ``masked_linear`` (see :func:`harmodt_kernels.masked_linear`)."""
    op = "masked_linear"
    tensor(op, "x", x, dtypes, devices)
    if x.dim() != 2:
        raise KernelArgumentError(f"{op}: x must be [R, K], got {shape_list(x)}")
    r, k = x.shape
    tensor(op, "weight", weight, (x.dtype,), devices)
    if weight.dim() != 2 or weight.shape[1] != k:
        raise KernelArgumentError(f"{op}: weight must be [N, {k}] to match x {shape_list(x)}, got {shape_list(weight)}")
    n = weight.shape[0]
    if bias is not None:
        tensor(op, "bias", bias, (x.dtype,), devices)
        shape(op, "bias", bias, (n,))
    tensor(op, "masks", masks, (torch.int32, torch.bool) if bool_masks else (torch.int32,), devices)
    cols = k if masks.dtype == torch.bool else num_words(k)
    if masks.dim() != 3 or tuple(masks.shape[1:]) != (n, cols) or masks.shape[0] == 0:
        kind = f"bool [T, {n}, {k}] or packed" if bool_masks else "packed"
        raise KernelArgumentError(f"{op}: masks must be {kind} [T, {n}, {num_words(k)}] (T >= 1) for weight "
                                  f"{shape_list(weight)}, got {dtype_name(masks.dtype)} {shape_list(masks)}")
    tensor(op, "task_ids", task_ids, (torch.int64,), devices)
    if tuple(task_ids.shape) not in ((r,), (1,)):
        raise KernelArgumentError(f"{op}: task_ids must be [{r}] (one task per row of x) or [1] (one task for all "
                                  f"rows), got {shape_list(task_ids)}")
    if task_grads is not None:
        tensor(op, "task_grads", task_grads, (torch.float32,), devices)
        shape(op, "task_grads", task_grads, (masks.shape[0], n, k), " (tasks, weight rows, weight columns)")
        if not task_grads.is_contiguous():
            raise KernelArgumentError(f"{op}: task_grads must be contiguous (it is accumulated in place)")
    same_device(op, {"x": x, "weight": weight, "bias": bias, "masks": masks, "task_ids": task_ids,
                     "task_grads": task_grads})
    if segments is not None and sum(c for _, c in segments) != r:
        raise KernelArgumentError(f"{op}: segments {tuple(segments)} cover "
                                  f"{sum(c for _, c in segments)} rows, x has {r}")



@dataclass(frozen=True)
class MaskedLinearOp:
    """``y[r] = x[r] @ (weight * M[task_ids[r]]).T + bias`` on one backend; see :func:`masked_linear`."""

    backend: Backend
    checked: set = field(default_factory=set, compare=False, repr=False)  # configurations whose checks passed

    @property
    def takes_bool_masks(self) -> bool:
        return self.backend.bool_masks

    def cached(self, workspace: dict) -> "CachedMaskedLinearOp":
        """This op for repeated calls without gradients (see :class:`CachedMaskedLinearOp`)."""
        return CachedMaskedLinearOp(self, workspace)

    def __call__(self, x, weight, bias, masks, task_ids, task_grads=None, segments=None, relu=False, dropout_p=0.0,
                 seed=0) -> torch.Tensor:
        fast = self.backend.impls.get("masked_linear_self_checked")
        if task_grads is None and type(seed) is int and fast is not None and not torch.compiler.is_compiling() \
                and not torch.is_autocast_enabled(self.backend.devices[0]):
            try:  # the backend's op checks every argument itself; segments (which it does not read) once per layout
                if segments is None or (segments, x.shape[0]) in self.checked:
                    return fast(x, weight, bias, masks, task_ids, relu, dropout_p, seed)
            except Exception:  # noqa: BLE001 - a refused call: the checked path below names the bad argument
                pass
        if torch.compiler.is_compiling():
            return self._checked_call(x, weight, bias, masks, task_ids, task_grads, segments, relu, dropout_p, seed)
        try:  # what check reads (inline, hashed once: this is the hot path of every masked layer)
            key = (x.shape, x.dtype, x.device, weight.shape, weight.dtype, weight.device,
                   None if bias is None else (bias.shape, bias.dtype, bias.device), masks.shape, masks.dtype,
                   masks.device, task_ids.shape, task_ids.dtype, task_ids.device,
                   None if task_grads is None else (*tensor_key(task_grads), task_grads.is_contiguous()), segments,
                   relu, dropout_p)
            known = key in self.checked
        # not tensors, or segments not a tuple of pairs: the checks name what is wrong
        except (AttributeError, TypeError):
            return self._checked_call(x, weight, bias, masks, task_ids, task_grads, segments, relu, dropout_p, seed)
        dev = key[2].type
        if dev in _AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(dev):
            return self._checked_call(x, weight, bias, masks, task_ids, task_grads, segments, relu, dropout_p, seed)
        if not known:
            self._check(x, weight, bias, masks, task_ids, task_grads, segments, dropout_p, seed, key)
        elif type(seed) is not int or not 0 <= seed < 2**63:  # (per call: the seed changes every step)
            check_dropout("masked_linear", 0.0, seed)
        linear = self.backend.impls["masked_linear"]
        if not relu and dropout_p == 0.0:
            return linear(x, weight, bias, masks, task_ids, task_grads, segments)
        return linear(x, weight, bias, masks, task_ids, task_grads, segments, bool(relu), float(dropout_p),
                      seed_arg(seed))

    def _check(self, x, weight, bias, masks, task_ids, task_grads, segments, dropout_p, seed, key) -> None:
        b = self.backend
        check(x, weight, bias, masks, task_ids, task_grads, segments, dtypes=b.linear_dtypes, devices=b.devices,
              bool_masks=b.bool_masks)
        check_dropout("masked_linear", dropout_p, seed)
        if key is not None:
            remember(self.checked, key)
            if segments is not None:
                remember(self.checked, (segments, x.shape[0]))

    def _checked_call(self, x, weight, bias, masks, task_ids, task_grads, segments, relu, dropout_p,
                      seed) -> torch.Tensor:
        """The call under autocast (the operands cast to its dtype first), under torch.compile, or
        with arguments that make no key: the checks every time."""
        linear = self.backend.impls["masked_linear"]
        if (isinstance(x, torch.Tensor) and x.device.type in _AUTOCAST_DEVICE_TYPES
                and torch.is_autocast_enabled(x.device.type)):
            x, weight, bias = _autocast_operands(x, weight, bias)
            with torch.autocast(x.device.type, enabled=False):
                self._check(x, weight, bias, masks, task_ids, task_grads, segments, dropout_p, seed, None)
                return linear(x, weight, bias, masks, task_ids, task_grads, segments, bool(relu), float(dropout_p),
                              seed_arg(seed))
        self._check(x, weight, bias, masks, task_ids, task_grads, segments, dropout_p, seed, None)
        return linear(x, weight, bias, masks, task_ids, task_grads, segments, bool(relu), float(dropout_p),
                      seed_arg(seed))


@dataclass(frozen=True)
class CachedMaskedLinearOp:
    """``masked_linear`` for repeated calls without gradients on fixed weights and masks (an
    evaluation): each task's ``W ⊙ M_t`` is made once, ``[T, N, K]`` per layer, and kept in
    ``workspace`` (a dict the caller owns and drops afterwards), keyed by the weight's and the
    masks' storage and version counter, so an in-place change of either makes a fresh one. A
    call then costs the GEMMs alone: one batched GEMM when the rows hold every task in order in
    equal runs, else one GEMM per run of ``segments``. Calls that need gradients or
    ``task_grads``, or come without ``segments``, go to ``op``. Results equal the reference's
    with ``segments`` up to the summation order of the GEMM."""

    op: MaskedLinearOp
    workspace: dict

    @property
    def backend(self) -> Backend:
        return self.op.backend

    @property
    def takes_bool_masks(self) -> bool:
        return self.op.takes_bool_masks

    def __call__(self, x, weight, bias, masks, task_ids, task_grads=None, segments=None) -> torch.Tensor:
        if (segments is None or task_grads is not None
                or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
            return self.op(x, weight, bias, masks, task_ids, task_grads, segments)
        b = self.backend
        dev = x.device.type
        autocast = torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)
        dt = torch.get_autocast_dtype(dev) if autocast else x.dtype
        check(x.to(dt), weight.to(dt), None if bias is None else bias.to(dt), masks, task_ids, None, segments,
              dtypes=b.linear_dtypes, devices=b.devices, bool_masks=True)
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), masks.data_ptr(), masks._version,
               tuple(masks.shape), dt)
        w_eff = self.workspace.get(key)
        if w_eff is None:
            with torch.no_grad():
                m = masks if masks.dtype == torch.bool else reference.unpack_masks(masks, weight.shape[1])
                w_eff = self.workspace[key] = torch.where(m, weight.detach().unsqueeze(0), 0.0).to(dt)  # (T, N, K)
        x, bias = x.to(dt), None if bias is None else bias.to(dt)
        with torch.autocast(dev, enabled=False):
            runs = [(int(t), int(c)) for t, c in segments]
            # (T, R/T, K) @ (T, K, N)
            if [t for t, _ in runs] == list(range(w_eff.shape[0])) and len({c for _, c in runs}) == 1:
                xs = x.reshape(w_eff.shape[0], runs[0][1], x.shape[1])
                wt = w_eff.transpose(1, 2)
                y = torch.bmm(xs, wt) if bias is None else torch.baddbmm(bias, xs, wt)
                return y.reshape(x.shape[0], -1)
            parts, start = [], 0
            for t, c in runs:
                parts.append(torch.nn.functional.linear(x[start : start + c], w_eff[t], bias))
                start += c
            return torch.cat(parts)


class NativeMaskedLinear(torch.autograd.Function):
    """The C++ forward and backward as one autograd node; task_grads (kept on ctx, not saved, as
    the backward writes into it) receives each task's unmasked dY_t^T X_t. With ``relu`` the
    output is saved too (its gradient passes where the output is > 0); dropout's bits are
    recomputed from ``seed``."""

    @staticmethod
    def forward(ctx, x, weight, bias, masks, task_ids, task_grads, relu, dropout_p, seed):
        y = torch.ops.harmodt_kernels.masked_linear_forward(x, weight, bias, masks, task_ids, relu, dropout_p, seed)
        ctx.save_for_backward(x, weight, masks, task_ids, y if relu else None)
        ctx.has_bias = bias is not None
        ctx.task_grads = task_grads
        ctx.epilogue = (relu, dropout_p, seed)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, masks, task_ids, out = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.needs_input_grad[2] and ctx.has_bias
        dx, dw, db = torch.ops.harmodt_kernels.masked_linear_backward(
            grad_y, x, weight, masks, task_ids, need_x, need_w, need_b, ctx.task_grads if need_w else None, out,
            *ctx.epilogue)
        return (dx if need_x else None, dw if need_w else None, db if need_b else None,
                None, None, None, None, None, None)
