"""One-line errors for every command-line tool of harmodt: a flag parser whose errors are one line
with exit code 2, and a Ctrl-C that stops a tool with one line and exit code 130."""

from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_tool(body, interrupted: str, errors: tuple = ()) -> int:
    """``body()``'s exit code; an exception of ``errors`` is one line ``error: ...`` on stderr with exit
    code 2, a Ctrl-C the line ``interrupted`` with exit code 130."""
    try:
        return body()
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        return 130


def interruptible(main, note: str) -> int:
    """``main()``'s exit code; a Ctrl-C stops it with one line on stderr (``note``) and exit code 130."""
    return run_tool(main, f"[harmodt] {note}")
