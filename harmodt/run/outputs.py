"""The metrics a run writes: metrics.jsonl with its TensorBoard copy, one reader, one rewinder.
Every file is written through harmodt.files.write_atomic, JSON through harmodt.files.finite_json
(both imported here for the harness)."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

from ..files import appends_to, finite_json, loads_json, write_atomic


def _records(raw: bytes) -> list[tuple[bytes, dict]]:
    """(line, record) for every line of a metrics.jsonl that holds a JSON object; a line cut by a
    crash (not JSON) is skipped."""
    out = []
    for line in raw.splitlines():
        try:
            rec = loads_json(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append((line, rec))
    return out


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl (none when it does not exist), in step order. Lines cut by a
    crash are skipped; a step logged more than once with the same keys (as by a run resumed
    without cutting its metrics back) keeps its last record."""
    path = Path(path)
    if not path.exists():
        return []
    last: dict = {}
    for _, rec in _records(path.read_bytes()):
        key = (rec.get("step"), tuple(sorted(rec)))
        last.pop(key, None)  # the later record takes the place of the earlier one
        last[key] = rec
    return sorted(last.values(), key=lambda r: r.get("step", 0))


def last_per_step(recs: list[dict], key: str) -> list[tuple[int, float]]:
    """``[(step, value)]`` of ``key`` in step order, the last record of each step winning."""
    by_step = {}
    for r in recs:
        if key in r and "step" in r:
            by_step[r["step"]] = r[key]
    return sorted(by_step.items())


def rewind_metrics(path: Path, keep_bytes: int | None, step: int) -> list[dict]:
    """Cut ``metrics.jsonl`` back to what it held when the checkpoint being continued was written
    (its first ``keep_bytes`` bytes; when the checkpoint does not record them or the file no longer
    matches, the records of steps <= ``step``), rewriting it atomically. Returns the kept records
    of ``step`` itself (TensorBoard's purge from ``step`` on drops them; :class:`MetricsLog`
    writes them there again)."""
    raw = path.read_bytes() if path.exists() else b""
    if (keep_bytes is not None and len(raw) >= keep_bytes
            and (keep_bytes == 0 or raw[keep_bytes - 1 : keep_bytes] == b"\n")):
        kept = raw[:keep_bytes]
        recs = [loads_json(line) for line in kept.splitlines() if line.strip()]
    else:
        pairs = [(line, rec) for line, rec in _records(raw) if rec.get("step", 0) <= step]
        kept = b"".join(line + b"\n" for line, _ in pairs)
        recs = [rec for _, rec in pairs]
    if kept != raw:
        write_atomic(path, kept)
    return [r for r in recs if r.get("step") == step]


class MetricsLog:
    """``OUT/metrics.jsonl`` (one JSON object per line, flushed as written) and the same numbers
    as TensorBoard scalars in ``OUT/tb``, continued from ``step``: the file is cut back by
    :func:`rewind_metrics` (``keep_bytes``: its size when the checkpoint was written; 0 starts
    afresh) and TensorBoard purged from ``step`` on."""

    def __init__(self, out: Path, step: int, keep_bytes: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.path, self.tb_dir = Path(out) / "metrics.jsonl", Path(out) / "tb"
        kept = rewind_metrics(self.path, keep_bytes, step)
        self.tb = SummaryWriter(str(self.tb_dir), purge_step=step)
        self._thread_hook, threading.excepthook = threading.excepthook, self._quiet_disk_full
        self.file = open(self.path, "ab")
        for rec in kept:  # purged from TensorBoard with the lost steps, but kept in metrics.jsonl
            self._scalars(rec)

    def _quiet_disk_full(self, args) -> None:
        """TensorBoard's writer thread re-raises a full disk where this thread reports it in one line
        (:meth:`_scalars`, :meth:`flush`); every other thread error is printed as usual."""
        if not (isinstance(args.exc_value, OSError) and args.exc_value.errno in (errno.ENOSPC, errno.EDQUOT)):
            self._thread_hook(args)

    def _scalars(self, rec: dict) -> None:
        with appends_to(self.tb_dir / "events"):  # (TensorBoard's writer thread raises its errors here)
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(k, v, rec["step"])

    def log(self, rec: dict) -> None:
        line = (finite_json(rec) + "\n").encode()
        with appends_to(self.path, len(line)):
            self.file.write(line)
            self.file.flush()
        self._scalars(rec)

    def tell(self) -> int:
        """The size of metrics.jsonl so far (a checkpoint records it)."""
        return self.file.tell()

    def flush(self) -> None:
        """The TensorBoard events so far on disk (before a checkpoint)."""
        with appends_to(self.tb_dir / "events"):
            self.tb.flush()

    def close(self) -> None:
        self.file.close()
        try:
            with appends_to(self.tb_dir / "events"):
                self.tb.close()
        finally:
            threading.excepthook = self._thread_hook


class NoLog:
    """What ranks other than 0 log into: a :class:`MetricsLog` that keeps nothing."""

    def log(self, rec: dict) -> None:
        pass

    def tell(self) -> int:
        return 0

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
