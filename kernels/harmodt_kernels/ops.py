"""The op values of :func:`harmodt_kernels.select_backends`: each op bound to one backend, checking its
arguments (``harmodt_kernels.checks``) before it calls the backend's implementation, which trusts them;
``KernelOps`` holds a run's four ops.

The launch path costs about what an ATen op's does. The checks depend only on shapes, dtypes,
devices and host-side flags, so an op runs them once per configuration and keeps the ones that
passed in its own ``checked`` set, keyed on exactly those (a later call with the same key skips
them; a call whose arguments are not tensors fails to make a key and gets the checks, which name
the bad argument). A backend whose op checks every argument itself in its kernel (the native
``cpu`` backend's ``masked_linear``, in C++) is called straight away, and only a call it refuses
takes the checks, which then name the bad argument. Under ``torch.compile`` the checks run every
time and trace away. Autocast's casts and its disabling context are entered only while autocast
is on. Per call there remains the seed's range check (a host value that changes every step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import checks, reference
from .backends import Backend


# Device types with an autocast mode, read once: Dynamo in some torch releases cannot trace
# ``torch.amp.is_autocast_available`` inside a compiled region.
_AUTOCAST_DEVICE_TYPES = frozenset(d for d in ("cpu", "cuda", "xpu", "mps", "hpu", "xla") if torch.amp.is_autocast_available(d))


MAX_CHECKED = 4096  # configurations an op remembers as checked (beyond it the set starts afresh)


def _tensor_key(t) -> tuple | None:
    """(shape, dtype, device) of a tensor, None for None; AttributeError for anything else."""
    return None if t is None else (t.shape, t.dtype, t.device)


def _remember(checked: set, key) -> None:
    if len(checked) >= MAX_CHECKED:
        checked.clear()
    checked.add(key)


def _seed(seed):
    """A seed as the backends take it: an int, or the int64 0-dim tensor that holds it on the
    device (a captured step's; read there, never on the host)."""
    return seed if isinstance(seed, torch.Tensor) else int(seed)


def _autocast_operands(x, weight, bias):
    """Under autocast on the tensors' device, the operands in the autocast dtype (as ``F.linear``
    would get them; the cast is differentiable, so gradients reach the fp32 weight)."""
    dev = x.device.type
    if dev not in _AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(dev):
        return x, weight, bias
    dt = torch.get_autocast_dtype(dev)
    return x.to(dt), weight.to(dt), None if bias is None else bias.to(dt)


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
        fast = self.backend.linear_self_checked
        if task_grads is None and type(seed) is int and fast is not None and not torch.compiler.is_compiling() \
                and not torch.is_autocast_enabled(self.backend.devices[0]):
            try:  # the backend's op checks every argument itself; segments (which it does not read) once per layout
                if segments is None or (segments, x.shape[0]) in self.checked:
                    return fast(x, weight, bias, masks, task_ids, relu, dropout_p, seed)
            except Exception:  # noqa: BLE001 - a refused call: the checked path below names the bad argument
                pass
        if torch.compiler.is_compiling():
            return self._checked_call(x, weight, bias, masks, task_ids, task_grads, segments, relu, dropout_p, seed)
        try:  # what checks.masked_linear reads (inline, hashed once: this is the hot path of every masked layer)
            key = (x.shape, x.dtype, x.device, weight.shape, weight.dtype, weight.device,
                   None if bias is None else (bias.shape, bias.dtype, bias.device), masks.shape, masks.dtype, masks.device,
                   task_ids.shape, task_ids.dtype, task_ids.device,
                   None if task_grads is None else (*_tensor_key(task_grads), task_grads.is_contiguous()), segments, relu, dropout_p)
            known = key in self.checked
        except (AttributeError, TypeError):  # not tensors, or segments not a tuple of pairs: the checks name what is wrong
            return self._checked_call(x, weight, bias, masks, task_ids, task_grads, segments, relu, dropout_p, seed)
        dev = key[2].type
        if dev in _AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(dev):
            return self._checked_call(x, weight, bias, masks, task_ids, task_grads, segments, relu, dropout_p, seed)
        if not known:
            self._check(x, weight, bias, masks, task_ids, task_grads, segments, dropout_p, seed, key)
        elif type(seed) is not int or not 0 <= seed < 2**63:  # (per call: the seed changes every step)
            checks.dropout("masked_linear", 0.0, seed)
        if not relu and dropout_p == 0.0:
            return self.backend.linear(x, weight, bias, masks, task_ids, task_grads, segments)
        return self.backend.linear(x, weight, bias, masks, task_ids, task_grads, segments, bool(relu), float(dropout_p), _seed(seed))

    def _check(self, x, weight, bias, masks, task_ids, task_grads, segments, dropout_p, seed, key) -> None:
        b = self.backend
        checks.masked_linear(x, weight, bias, masks, task_ids, task_grads, segments, dtypes=b.linear_dtypes, devices=b.devices,
                             bool_masks=b.bool_masks)
        checks.dropout("masked_linear", dropout_p, seed)
        if key is not None:
            _remember(self.checked, key)
            if segments is not None:
                _remember(self.checked, (segments, x.shape[0]))

    def _checked_call(self, x, weight, bias, masks, task_ids, task_grads, segments, relu, dropout_p, seed) -> torch.Tensor:
        """The call under autocast (the operands cast to its dtype first), under torch.compile, or
        with arguments that make no key: the checks every time."""
        if isinstance(x, torch.Tensor) and x.device.type in _AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(x.device.type):
            x, weight, bias = _autocast_operands(x, weight, bias)
            with torch.autocast(x.device.type, enabled=False):
                self._check(x, weight, bias, masks, task_ids, task_grads, segments, dropout_p, seed, None)
                return self.backend.linear(x, weight, bias, masks, task_ids, task_grads, segments, bool(relu), float(dropout_p),
                                           _seed(seed))
        self._check(x, weight, bias, masks, task_ids, task_grads, segments, dropout_p, seed, None)
        return self.backend.linear(x, weight, bias, masks, task_ids, task_grads, segments, bool(relu), float(dropout_p), _seed(seed))


@dataclass(frozen=True)
class DropoutOp:
    """Counter-based dropout on one backend (see :func:`harmodt_kernels.dropout`): element i is kept iff
    the hash of (i, seed) clears the threshold of ``p`` (:func:`harmodt_kernels.reference.counter_keep`),
    so the backward recomputes the bits and nothing is stored."""

    backend: Backend
    checked: set = field(default_factory=set, compare=False, repr=False)  # configurations whose checks passed

    def __call__(self, x, p: float, seed: int) -> torch.Tensor:
        b = self.backend
        key = None if torch.compiler.is_compiling() or not isinstance(x, torch.Tensor) or type(p) is not float else (x.dtype, x.device, p)
        if key is None or key not in self.checked:
            checks.tensor("dropout", "x", x, b.linear_dtypes, b.devices)
            checks.dropout("dropout", p, seed)
            if key is not None:
                _remember(self.checked, key)
        elif type(seed) is not int or not 0 <= seed < 2**63:  # (per call: the seed changes every step)
            checks.dropout("dropout", 0.0, seed)
        return b.dropout(x, float(p), _seed(seed))


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
        if segments is None or task_grads is not None or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            return self.op(x, weight, bias, masks, task_ids, task_grads, segments)
        b = self.backend
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev) else x.dtype
        checks.masked_linear(x.to(dt), weight.to(dt), None if bias is None else bias.to(dt), masks, task_ids, None, segments,
                             dtypes=b.linear_dtypes, devices=b.devices, bool_masks=True)
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), masks.data_ptr(), masks._version, tuple(masks.shape), dt)
        w_eff = self.workspace.get(key)
        if w_eff is None:
            with torch.no_grad():
                m = masks if masks.dtype == torch.bool else reference.unpack_masks(masks, weight.shape[1])
                w_eff = self.workspace[key] = torch.where(m, weight.detach().unsqueeze(0), 0.0).to(dt)  # (T, N, K)
        x, bias = x.to(dt), None if bias is None else bias.to(dt)
        with torch.autocast(dev, enabled=False):
            runs = [(int(t), int(c)) for t, c in segments]
            if [t for t, _ in runs] == list(range(w_eff.shape[0])) and len({c for _, c in runs}) == 1:  # (T, R/T, K) @ (T, K, N)
                xs = x.reshape(w_eff.shape[0], runs[0][1], x.shape[1])
                y = torch.bmm(xs, w_eff.transpose(1, 2)) if bias is None else torch.baddbmm(bias, xs, w_eff.transpose(1, 2))
                return y.reshape(x.shape[0], -1)
            parts, start = [], 0
            for t, c in runs:
                parts.append(torch.nn.functional.linear(x[start : start + c], w_eff[t], bias))
                start += c
            return torch.cat(parts)


@dataclass(frozen=True)
class MaskedAdamWOp:
    """One masked AdamW step in place on one backend; see :func:`masked_adamw_`. ``workspace``: a
    dict the caller keeps between steps (an optimizer's), where a backend may keep launch data
    (the Triton one keeps its parameter tables there); None keeps nothing."""

    backend: Backend
    checked: set = field(default_factory=set, compare=False, repr=False)  # configurations whose checks passed

    @property
    def takes_bool_masks(self) -> bool:
        return self.backend.bool_masks

    def __call__(self, params, grads, exp_avgs, exp_avg_sqs, masks, steps, *, lr, beta1, beta2, eps, weight_decay,
                 grad_scale=1.0, workspace: dict | None = None) -> None:
        if not params:
            return
        b = self.backend
        checks.masked_adamw(params, grads, exp_avgs, exp_avg_sqs, masks, steps, grad_scale, dtypes=b.adamw_dtypes, devices=b.devices,
                            max_numel=b.max_numel)
        checks.learning_rate("masked_adamw_", lr, getattr(params[0], "device", None))
        if not b.bool_masks:
            masks = [m if m is None or m.dtype == torch.int32 else reference.pack_masks(m) for m in masks]
        b.adamw(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(masks), list(steps),
                lr if isinstance(lr, torch.Tensor) else float(lr), float(beta1),
                float(beta2), float(eps), float(weight_decay), grad_scale, workspace)


@dataclass(frozen=True)
class HarmonySelectOp:
    """Algorithm 2's selection on one backend, given the scores; see :func:`harmony_select`."""

    backend: Backend

    def __call__(self, harmony, recovery, masks, k) -> torch.Tensor:
        b = self.backend
        checks.harmony_select(harmony, recovery, masks, devices=b.devices, max_numel=b.max_numel)
        return b.select(harmony, recovery, masks, int(k))


@dataclass(frozen=True)
class KernelOps:
    """The op functions of one run (made by :func:`select_backends`), handed down as values:
    ``masked_linear``, ``masked_adamw``, ``harmony_select`` and the counter-based ``dropout``,
    each a callable bound to its backend (``op.backend.name``)."""

    masked_linear: MaskedLinearOp
    masked_adamw: MaskedAdamWOp
    harmony_select: HarmonySelectOp
    dropout: DropoutOp
    fallback: str | None = None  # why "auto" fell back to the reference, when it did

    @classmethod
    def on(cls, backend: Backend, fallback: str | None = None) -> "KernelOps":
        return cls(MaskedLinearOp(backend), MaskedAdamWOp(backend), HarmonySelectOp(backend), DropoutOp(backend), fallback)

    def describe(self) -> str:
        return (f"masked_linear={self.masked_linear.backend.name} masked_adamw={self.masked_adamw.backend.name} "
                f"harmony_select={self.harmony_select.backend.name}")
