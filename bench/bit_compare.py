"""The comparison of bench/bit_identity.py: two runs' metrics.jsonl and checkpoints, bit for bit.

Tensors must have the same dtype, shape and bits (floats compared as their integer bit patterns, so
-0.0 differs from 0.0 and equal NaNs are equal); Python floats likewise. Keys are slash paths
(``checkpoint/optimizer/state/0/exp_avg``); ``ignore`` takes fnmatch patterns of them.
"""

from __future__ import annotations

import fnmatch
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

# Not behaviour: the run's own paths, and metrics.jsonl's size in bytes (its timings' digits vary).
DEFAULT_IGNORE = ("checkpoint/config/out", "checkpoint/config/data", "checkpoint/run/metrics_bytes")
CHECKPOINT_ORDER = ("model", "masks", "optimizer", "rng")  # compared first, in this order
TIMING_SUFFIX = "_s"  # steps_per_s, mask_update_s, eval_env_steps_per_s: wall-clock figures


@dataclass(frozen=True)
class Difference:
    """The first place two results differ: ``key`` a slash path (``checkpoint/optimizer/state/3/exp_avg``),
    ``detail`` what differs there."""
    key: str
    detail: str

    def __str__(self):
        return f"{self.key}: {self.detail}"


def _float_bits(x: float) -> bytes:
    return struct.pack("<d", x)


def _bit_view(t: torch.Tensor) -> torch.Tensor:
    """A floating tensor as integers of its width (its bits); other tensors as they are."""
    if t.is_floating_point() or t.is_complex():
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        t = t.contiguous()
        if t.is_complex():
            t = torch.view_as_real(t)
        return t.view(ints[t.element_size()])
    return t


def _tensor_difference(a: torch.Tensor, b: torch.Tensor, key: str) -> Difference | None:
    if a.dtype != b.dtype:
        return Difference(key, f"dtype {a.dtype} vs {b.dtype}")
    if a.shape != b.shape:
        return Difference(key, f"shape {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.detach().cpu(), b.detach().cpu()
    if torch.equal(_bit_view(a), _bit_view(b)):
        return None
    differs = _bit_view(a) != _bit_view(b)
    if differs.dim() > a.dim():  # a complex tensor's real and imaginary halves
        differs = differs.any(-1)
    n = int(differs.sum())
    if a.dtype == torch.bool:
        return Difference(key, f"{n} of {a.numel()} elements differ")
    wide = torch.float64 if (a.is_floating_point() or a.is_complex()) else torch.int64
    gap = (a.to(wide) - b.to(wide)).abs()
    top = float(gap.max()) if gap.numel() else 0.0
    return Difference(key, f"{n} of {a.numel()} elements differ, max |a-b| {top:.3g}")


def first_difference(a, b, key: str = "", ignore: tuple[str, ...] = ()) -> Difference | None:
    """The first difference between two nested results (dicts, lists/tuples, tensors, numbers,
    strings, None), walking ``a``'s order; None when they are bit for bit the same. ``ignore``: slash
    paths not compared (fnmatch patterns: ``metrics.jsonl/*/lr``). A list and a tuple of the same
    items are the same; an int and a float are not."""
    if _ignored(key, ignore):
        return None
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return Difference(key, f"{type(a).__name__} vs {type(b).__name__}")
        return _tensor_difference(a, b, key)
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a:
            sub = f"{key}/{k}" if key else str(k)
            if k not in b:
                return None if _ignored(sub, ignore) else Difference(sub, "missing in the candidate")
            if (d := first_difference(a[k], b[k], sub, ignore)) is not None:
                return d
        for k in b:
            sub = f"{key}/{k}" if key else str(k)
            if k not in a and not _ignored(sub, ignore):
                return Difference(sub, "missing in the baseline")
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return Difference(key, f"length {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            if (d := first_difference(x, y, f"{key}/{i}" if key else str(i), ignore)) is not None:
                return d
        return None
    if type(a) is not type(b):
        return Difference(key, f"{type(a).__name__} {a!r} vs {type(b).__name__} {b!r}")
    if isinstance(a, float):
        if _float_bits(a) == _float_bits(b):
            return None
        gap = abs(a - b) if math.isfinite(a) and math.isfinite(b) else math.inf
        return Difference(key, f"{a!r} vs {b!r}, |a-b| {gap:.3g}")
    if a != b:
        return Difference(key, f"{_short(a)} vs {_short(b)}")
    return None


def _ignored(key: str, ignore: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in ignore)


def _short(x, limit: int = 60) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def metric_records(path: Path) -> dict[str, dict]:
    """metrics.jsonl's records keyed ``line N (step S)``, without their timing keys (``*_s``)."""
    records = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        rec = json.loads(line)
        records[f"line {i} (step {rec.get('step')})"] = {k: v for k, v in rec.items() if not k.endswith(TIMING_SUFFIX)}
    return records


def _checkpoint_in_order(ck: dict) -> dict:
    first = {k: ck[k] for k in CHECKPOINT_ORDER if k in ck}
    return {**first, **{k: v for k, v in ck.items() if k not in first}}


def compare_runs(baseline: Path, candidate: Path, ignore: tuple[str, ...] = DEFAULT_IGNORE) -> Difference | None:
    """The first difference between two run folders: metrics.jsonl, then checkpoint.pt."""
    d = first_difference(metric_records(baseline / "metrics.jsonl"), metric_records(candidate / "metrics.jsonl"),
                         "metrics.jsonl", ignore)
    if d is not None:
        return d
    a, b = (torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True) for run in (baseline, candidate))
    return first_difference(_checkpoint_in_order(a), _checkpoint_in_order(b), "checkpoint", ignore)
