"""Checkpoints that are safe to open: only tensors and plain Python types, loaded with
``torch.load(..., weights_only=True)``, written atomically.

``python -m harmodt.checkpoint convert OLD NEW`` rewrites a checkpoint of the older format (numpy
arrays inside) into this one. It unpickles nothing beyond that format: OLD is read with
``weights_only=True`` and an allow-list of the numpy types it holds (:data:`OLD_FORMAT_GLOBALS`); a
file that needs any other Python object is refused, never run.
"""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

from .files import write_atomic


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; printed as one line by the CLIs."""


def plain(obj):
    """``obj`` with every tensor moved to the CPU and every numpy array or scalar turned into a
    tensor or Python number, so that ``weights_only=True`` can load it and no device is baked in."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an exception on one line (its lines joined), at most ``limit`` characters."""
    text = f"{type(exc).__name__}: " + " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def save(state: dict, path: str | os.PathLike) -> None:
    """Write ``plain(state)`` to ``path`` atomically (:func:`harmodt.files.write_atomic`: a
    crash leaves the previous file or the new one, never a torn one)."""
    buf = io.BytesIO()
    torch.save(plain(state), buf)
    write_atomic(path, buf.getbuffer())


def load(path: str | os.PathLike) -> dict:
    """A checkpoint written by :func:`save`, loaded with ``weights_only=True`` onto the CPU.
    Raises :class:`CheckpointError` with one line for a missing, truncated, unsafe or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        msg = str(exc)
        if "Unsupported global" in msg:  # a pickled class or function: only a full unpickle would read it
            raise CheckpointError(f"{path}: holds pickled Python objects, which are not loaded (unsafe); convert it "
                                  f"with `python -m harmodt.checkpoint convert {path} NEW.pt` (it reads the older "
                                  "format's numpy arrays, nothing else)") from None
        raise _unreadable(path, exc) from None
    if not isinstance(ck, dict) or not {"model", "config", "eval_info"} <= set(ck):
        raise CheckpointError(f"{path}: not a harmodt training checkpoint (needs model, config, eval_info)")
    return ck


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    """The one line for a file torch.load cannot read."""
    if path.is_file() and path.stat().st_size == 0:
        return CheckpointError(f"{path}: cannot read checkpoint (empty file)")
    msg = str(exc)
    first = msg.splitlines()[0].split(". ")[0] if msg.strip() else ""
    return CheckpointError(f"{path}: cannot read checkpoint: truncated, or not a torch checkpoint "
                           f"({type(exc).__name__}: {first})")


def _numpy_globals() -> list:
    """(object, pickled name) of every numpy global an older checkpoint's arrays, scalars and RNG state
    are pickled with, under both numpy's 1.x and 2.x module names."""
    from numpy._core import multiarray

    found = []
    for obj, name in ((multiarray._reconstruct, "_reconstruct"), (multiarray.scalar, "scalar")):
        found += [(obj, f"numpy.core.multiarray.{name}"), (obj, f"numpy._core.multiarray.{name}")]
    found += [np.ndarray, np.dtype]
    # the dtype classes (numpy.dtypes.Float32DType, ...)
    found += [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
                                          "uint16", "uint32", "uint64", "bool")]
    return found


OLD_FORMAT_GLOBALS = _numpy_globals()


def convert(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Read an older checkpoint (``weights_only=True`` with numpy's array types allowed:
    :data:`OLD_FORMAT_GLOBALS`; nothing else is unpickled) and write it in the safe format."""
    if not Path(src).is_file():
        raise CheckpointError(f"{src}: checkpoint not found")
    try:
        with torch.serialization.safe_globals(OLD_FORMAT_GLOBALS):
            ck = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        if "Unsupported global" in str(exc) or "Weights only load failed" in str(exc):
            needed = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
            raise CheckpointError(f"{src}: needs Python objects beyond numpy arrays "
                                  f"({needed.group(1) if needed else 'unknown'}) to load; not converted "
                                  "(nothing in it was run)") from None
        raise _unreadable(Path(src), exc) from None
    if not isinstance(ck, dict) or "model" not in ck:
        raise CheckpointError(f"{src}: not a harmodt training checkpoint")
    rng = ck.get("rng", {})
    # np.random.get_state(): (name, keys, pos, has_gauss, gauss)
    if isinstance(rng, dict) and isinstance(rng.get("numpy"), tuple):
        name, keys, pos, has_gauss, gauss = rng["numpy"]
        rng["numpy"] = {"name": str(name), "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "gauss": float(gauss)}
    save(ck, dst)


def main(argv: list[str] | None = None) -> int:
    from .oneline import OneLineParser
    from .files import OutputError
    from .ownership import check_output_file

    p = OneLineParser(prog="python -m harmodt.checkpoint", description="Checkpoint tools.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="rewrite an older checkpoint (numpy arrays inside) in the safe "
                                       "format; unpickles nothing else")
    c.add_argument("src")
    c.add_argument("dst", help="a new file (never SRC)")
    c.add_argument("--overwrite", action="store_true", help="let DST replace an existing checkpoint or "
                                                            "a file of a run or data set")
    args = p.parse_args(argv)
    try:
        check_output_file(args.dst, "DST", [args.src], args.overwrite)
        convert(args.src, args.dst)
        load(args.dst)
    except (CheckpointError, OutputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the destination cannot be written
        print(f"error: {args.dst}: cannot write ({exc.strerror or exc})", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
