"""Ctrl-C and SIGTERM as a stop request: the training loop finishes its step, saves a consistent
checkpoint and stops; a second signal stops at once (the last checkpoint stays valid, as every
write is atomic)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from contextlib import contextmanager


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


def stopped(step: int):
    """Leave the loop after a stop request, its checkpoint saved at ``step`` (KeyboardInterrupt:
    the CLI exits with 130)."""
    print(f"\n[harmodt] stopped: checkpoint saved at step {step}; continue with --resume", file=sys.stderr)
    raise KeyboardInterrupt
