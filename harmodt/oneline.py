"""One-line errors for every command-line tool of harmodt: a flag parser whose errors are one line
with exit code 2, and a Ctrl-C that stops a tool with one line and exit code 130."""

from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def interruptible(main, note: str) -> int:
    """``main()``'s exit code; a Ctrl-C stops it with one line on stderr (``note``) and exit code 130."""
    try:
        return main()
    except KeyboardInterrupt:
        print(f"\n[harmodt] {note}", file=sys.stderr)
        return 130
