"""Checkpoints that are safe to open: only tensors and plain Python types, loaded with
``torch.load(..., weights_only=True)``, written atomically.

``python -m harmodt.checkpoint convert OLD NEW`` rewrites a checkpoint of the older pickled
format (numpy arrays inside) into this one; it unpickles OLD, so run it only on files you trust.
"""

from __future__ import annotations

import io
import os
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
            raise CheckpointError(f"{path}: holds pickled Python objects, which are not loaded (unsafe); if you trust the file, "
                                  f"convert it with `python -m harmodt.checkpoint convert {path} NEW.pt`") from None
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
    return CheckpointError(f"{path}: cannot read checkpoint: truncated, or not a torch checkpoint ({type(exc).__name__}: {first})")


def convert(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Unpickle an older checkpoint (``weights_only=False``: trusted files only) and write it in the
    safe format."""
    if not Path(src).is_file():
        raise CheckpointError(f"{src}: checkpoint not found")
    try:
        ck = torch.load(src, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise _unreadable(Path(src), exc) from None
    if not isinstance(ck, dict) or "model" not in ck:
        raise CheckpointError(f"{src}: not a harmodt training checkpoint")
    rng = ck.get("rng", {})
    if isinstance(rng.get("numpy"), tuple):  # np.random.get_state(): (name, keys, pos, has_gauss, gauss)
        name, keys, pos, has_gauss, gauss = rng["numpy"]
        rng["numpy"] = {"name": str(name), "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "gauss": float(gauss)}
    save(ck, dst)


def main(argv: list[str] | None = None) -> int:
    from .config import OneLineParser

    p = OneLineParser(prog="python -m harmodt.checkpoint", description="Checkpoint tools.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="rewrite an older (pickled) checkpoint in the safe format; unpickles it: trusted files only")
    c.add_argument("src")
    c.add_argument("dst")
    args = p.parse_args(argv)
    try:
        convert(args.src, args.dst)
        load(args.dst)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the destination cannot be written
        print(f"error: {args.dst}: cannot write ({exc.strerror or exc})", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
