"""Tile configurations of the masked-linear kernels, per kernel and GPU target, and the
``triton.autotune`` decorator that picks among them at the first launch of each layer shape.

Under the interpreter (``TRITON_INTERPRET=1``) there is one small tile and nothing is timed.
``python -m harmodt_kernels.inspect`` compiles every config of :func:`tile_configs` for sm_90a and sm_80
ahead of time (registers, shared memory, spills), and the interpreter tests run every tile shape.
"""

from __future__ import annotations

import torch
import triton

from .backends import triton_interpreted

__all__ = ["INTERPRET_TILE", "autotune_tiles", "target_family", "tile_configs"]

# Tiles the autotuner chooses among, per kernel and target family, as (BM, BN, BK, num_warps,
# num_stages) with the reduction tile written "red": K for fwd (BK), N for dX (BN), rows for dW
# (BM). The reduction tile depends only on the element size (32 for fp32, 64 for 16-bit inputs:
# one packed mask word per 32 columns, three stages of operands in shared memory) and is the same
# in every config, so the pick changes how the output is tiled, not the order of any sum.
# sm_80 family (sm_80 to sm_89): shared memory within 99 KB (an RTX 3090, sm_86). sm_90: up to
# 227 KB, wider tiles and four stages.
_RED = "red"
_TILES = {
    "sm_80": {
        "fwd": [(64, 64, _RED, 4, 3), (64, 128, _RED, 8, 3), (32, 64, _RED, 4, 3), (128, 64, _RED, 8, 3)],
        "dx": [(64, _RED, 64, 4, 3), (32, _RED, 64, 4, 3), (64, _RED, 128, 8, 3), (128, _RED, 64, 8, 3)],
        "dw": [(_RED, 64, 64, 4, 3), (_RED, 32, 64, 4, 3), (_RED, 128, 64, 8, 3), (_RED, 64, 128, 8, 3)],
    },
    "sm_90": {
        "fwd": [(64, 64, _RED, 4, 3), (64, 128, _RED, 8, 3), (128, 128, _RED, 8, 3), (64, 64, _RED, 4, 4)],
        "dx": [(64, _RED, 64, 4, 3), (64, _RED, 128, 8, 3), (128, _RED, 128, 8, 3), (64, _RED, 64, 4, 4)],
        "dw": [(_RED, 64, 64, 4, 3), (_RED, 128, 64, 8, 3), (_RED, 128, 128, 8, 3), (_RED, 64, 64, 4, 4)],
    },
}
INTERPRET_TILE = (32, 32, 32, 4, 1)  # under the interpreter: small tiles run fastest there


def target_family(capability: int) -> str:
    """"sm_90" for compute capability 9.0 and later (given as 90, 100, ...), else "sm_80"."""
    return "sm_90" if capability >= 90 else "sm_80"


def tile_configs(kernel: str, element_size: int, capability: int | None) -> list[triton.Config]:
    """The autotuner's candidates for ``kernel`` ("fwd", "dx" or "dw") with inputs of
    ``element_size`` bytes on a GPU of compute ``capability`` (e.g. 90 for an H100); ``None``: the
    interpreter's one tile."""
    if kernel not in _TILES["sm_80"]:
        raise ValueError(f"tile_configs: unknown kernel {kernel!r}")
    if capability is None:
        tiles = [INTERPRET_TILE]
    else:
        red = 32 if element_size >= 4 else 64
        tiles = [tuple(red if v == _RED else v for v in t) for t in _TILES[target_family(capability)][kernel]]
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s) for bm, bn, bk, w, s in tiles]


def _all_configs(kernel: str) -> list[triton.Config]:
    """Every config ``kernel`` may run with, on any target (the autotuner's list before pruning)."""
    out = []
    for cfg in [c for cap in (None, 80, 90) for size in (2, 4) for c in tile_configs(kernel, size, cap)]:
        if all(str(cfg) != str(c) for c in out):
            out.append(cfg)
    return out


def _capability(t: torch.Tensor) -> int | None:
    """The compute capability of ``t``'s GPU as 10 * major + minor; ``None`` under the interpreter."""
    if triton_interpreted() or t.device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


def _pruner(kernel: str, tensor_arg: str):
    """``early_config_prune`` for ``kernel``: the configs of the launch's element size and device."""

    def prune(configs, named_args, **kwargs):
        t = named_args[tensor_arg]
        want = {str(c) for c in tile_configs(kernel, t.element_size(), _capability(t))}
        return [c for c in configs if str(c) in want]

    return prune


def autotune_tiles(kernel: str, tensor_arg: str, restore: tuple = ()):
    """``triton.autotune`` over :func:`tile_configs`, keyed by the layer's shape (N, K), the row
    layout and the dtypes (Triton adds those), not by R: the first batch of a layer's shape picks
    its tile, and later batches of any R reuse it."""
    return triton.autotune(configs=_all_configs(kernel), key=["N", "K", "SINGLE"], restore_value=list(restore),
                           prune_configs_by={"early_config_prune": _pruner(kernel, tensor_arg)})
