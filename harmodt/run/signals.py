"""Ctrl-C and SIGTERM as a stop request: the training loop finishes its step, saves a consistent
checkpoint and stops; a second signal stops at once (the last checkpoint stays valid, as every
write is atomic)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from contextlib import contextmanager


class StopRequest:
    """A stop asked for by SIGINT/SIGTERM (:meth:`ask`). One process: true once asked for. Several
    ranks (``agreed_by_ranks``): true once ``agreed``, every rank's ``asked`` summed by the last
    training step's all-reduce, is positive, so that every rank stops at the same step."""

    def __init__(self, agreed_by_ranks: bool = False):
        self.agreed_by_ranks = agreed_by_ranks
        self.asked = False  # asked for in this process
        self.agreed = None  # several ranks: the requests of every rank at the last step (a 0-dim tensor)

    def ask(self) -> None:
        self.asked = True

    def __bool__(self) -> bool:
        if self.agreed_by_ranks:
            return self.agreed is not None and bool(self.agreed > 0)
        return self.asked


@contextmanager
def stop_requests(request_stop: Callable[[], None], signals=(signal.SIGINT, signal.SIGTERM)):
    """While inside: the first of ``signals`` calls ``request_stop()``, the next raises
    KeyboardInterrupt. The previous handlers are back on leaving. Outside the main thread (where
    Python cannot take signals) nothing is installed."""
    asked = False

    def handler(signum, frame):
        nonlocal asked
        if asked:
            raise KeyboardInterrupt
        asked = True
        request_stop()

    previous = {}
    for sig in signals:
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


class Stopped(KeyboardInterrupt):
    """A stop request answered: the checkpoint is saved and its line printed (the CLI exits with 130)."""


def stopped(step: int):
    """Leave the loop after a stop request, its checkpoint saved at ``step`` (:class:`Stopped`:
    the CLI exits with 130)."""
    print(f"\n[harmodt] stopped: checkpoint saved at step {step}; continue with --resume", file=sys.stderr)
    raise Stopped
