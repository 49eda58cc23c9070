"""Kernel launches of one training step, counted with ``torch.profiler``.

On CUDA the count is exact: the step's ``cudaLaunchKernel``-like runtime events (kernel launches,
``cudaMemcpyAsync``/``cudaMemsetAsync``, CUDA-graph launches). On a CPU it is what the same step
would launch on a GPU, read from the profiled operator tree:

* an operator counts once when it does work (not a view, an allocation or a metadata query, see
  :data:`NO_KERNEL`) and none of the operators it calls counts (``aten::linear`` is its
  ``aten::addmm``; ``aten::to`` is its ``aten::copy_``);
* a kernel-package op (``harmodt_kernels::*`` of the native CPU backend, ``harmodt_triton::*``)
  counts as the Triton launches that replace it on a GPU (:data:`CUSTOM_LAUNCHES`: the masked
  linear's forward is one kernel, its backward a dX and a dW kernel and the bias gradient's sum),
  and nothing inside it counts;
* Python scalars: an ``aten::to``/``aten::scalar_tensor`` inside another operator is the CPU's
  conversion of a Python number to a tensor (a GPU passes it as a kernel argument): not counted;
* a multi-tensor ``aten::_foreach_*`` op counts once (one multi-tensor-apply launch on a GPU;
  a CPU runs it tensor by tensor);
* ``aten::_local_scalar_dense`` (``.item()``, ``float(t)``, ``int(t)``) launches nothing but on a
  GPU makes the host wait for the device; these are counted apart as ``host_syncs``.

Known bias of the CPU estimate: the CPU runs ``scaled_dot_product_attention`` with a mask and
dropout on its math path (about 20 ops per layer, forward and backward, where a GPU runs two or
three attention kernels), and dropout as ``bernoulli_`` plus a multiply: the estimate is high.

The expected eager step time on an H100 is ``launches * US_PER_LAUNCH`` (bench/common.py): at the
paper's batch every kernel's own work is under a microsecond, so the launches set the step time.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

NO_KERNEL = frozenset(f"aten::{n}" for n in (
    "view", "_unsafe_view", "as_strided", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand",
    "expand_as", "unsqueeze", "squeeze", "slice", "select", "alias", "detach", "detach_", "lift_fresh", "resolve_conj",
    "resolve_neg", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "resize_", "result_type",
    "split", "split_with_sizes", "unbind", "chunk", "narrow", "flatten", "unflatten", "contiguous", "to", "_to_copy",
    "clone", "lift", "set_", "is_nonzero", "item", "_local_scalar_dense", "view_as", "numpy_T", "matrix_H", "mT",
    "size", "stride", "is_same_size", "_has_compatible_shallow_copy_type", "record_stream",
    "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full",
))
# (zeros_like/ones_like/full_like/new_*: their fill_/zero_ child is the kernel; clone/to/_to_copy: their copy_.)

SYNC = "aten::_local_scalar_dense"
SCALAR_CONVERSIONS = frozenset({"aten::to", "aten::_to_copy", "aten::scalar_tensor", "aten::lift_fresh"})

# Triton launches that replace one call of a kernel-package op on a GPU.
CUSTOM_LAUNCHES = {
    "harmodt_kernels::masked_linear_forward": 1,  # _fwd_kernel (bias fused)
    "harmodt_kernels::masked_linear_backward": 3,  # _dx_kernel, _dw_kernel, the bias gradient's dY.sum(0)
    # Triton: one update over a pointer table per parameter group, one step increment
    "harmodt_kernels::adamw_group_": 2,
    "harmodt_kernels::harmony_select": 4,  # candidates kernel and the top-k selections (not in a training step)
    "harmodt_triton::masked_linear": 1,
    "harmodt_triton::masked_linear_dx": 1,
    "harmodt_triton::masked_linear_dw": 1,
    "harmodt_triton::masked_linear_dw_task_grads": 1,
}

GPU_LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                     "cudaLaunchCooperativeKernel", "cudaMemcpyAsync", "cudaMemsetAsync", "cudaGraphLaunch")


def _is_custom(name: str) -> bool:
    return "::" in name and not name.startswith(
        ("aten::", "autograd::", "torch::", "profiler::", "prim::", "cuda", "c10d::"))


def count_cpu_tree(events) -> dict:
    """Launch estimate from a CPU profile's operator tree (see the module docstring)."""
    by_op: Counter = Counter()
    syncs = 0

    def visit(e) -> int:  # returns how many launches e's subtree holds
        nonlocal syncs
        name = e.name
        parent = e.cpu_parent
        if name in SCALAR_CONVERSIONS and parent is not None and parent.name.startswith("aten::"):
            return 0
        if name.startswith("aten::_foreach_"):
            by_op[name] += 1
            return 1
        if _is_custom(name):
            n = CUSTOM_LAUNCHES.get(name, 1)
            by_op[name] += n
            return n
        if name == SYNC:
            syncs += 1
        below = sum(visit(c) for c in e.cpu_children)
        if below == 0 and name.startswith("aten::") and name not in NO_KERNEL:
            by_op[name] += 1
            return 1
        return below

    for e in events:
        if e.cpu_parent is None:
            visit(e)
    return {"launches": sum(by_op.values()), "host_syncs": syncs, "by_op": dict(by_op.most_common())}


def count_gpu_events(events) -> dict:
    """Exact counts from a CUDA profile: the runtime's launch events, by name."""
    by = Counter(e.name for e in events if e.name in GPU_LAUNCH_EVENTS)
    syncs = sum(1 for e in events if e.name == SYNC)
    return {"launches": sum(by.values()), "host_syncs": syncs, "by_op": dict(by.most_common())}


def count_step(tr) -> dict:
    """Launches of one ``tr.train_step`` (after the trainer has warmed up): see :func:`count_call`."""
    return count_call(lambda: tr.train_step(tr.sample_tasks()), tr.device)


def count_call(fn, device) -> dict:
    """Launches of one call of ``fn``: on CUDA the runtime's launch events, on a CPU the estimate
    from the operator tree. Adds ``method`` (``"cuda runtime events"`` or ``"cpu operator tree"``)
    and ``expected_h100_ms`` for the CPU estimate."""
    from .common import US_PER_LAUNCH

    cuda = torch.device(device).type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.events()
    out = count_gpu_events(events) if cuda else count_cpu_tree(events)
    out["method"] = "cuda runtime events" if cuda else "cpu operator tree"
    out["expected_h100_ms"] = out["launches"] * US_PER_LAUNCH / 1e3
    return out
