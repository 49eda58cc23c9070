"""The values a setting may take, declared beside it, and the one check of them.

Every field of the config dataclasses (harmodt/config.py) names its :class:`Domain`: numbers in a
range (always finite), or one of a few choices, with ``special`` values outside the range that have
a meaning of their own (``--validation-seed -1``: off). The field's type is its default's. The
CLI, ``--config`` files, presets and the study's runs all go through :func:`check_fields`, which
returns the first bad value as one line naming the flag, the value and what it may be.

A leaf module: it imports nothing of harmodt but the flag name rule.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import MISSING, dataclass

SEED_MAX = 2**31 - 1  # seeds go to numpy, torch and the simulator; this fits every one of them


@dataclass(frozen=True)
class Domain:
    """Numbers in [lo, hi] (``lo_open``/``hi_open``: that end excluded; None: unbounded; never inf
    or nan), or (``choices``) one of those strings; ``special``: ((value, meaning), ...) allowed
    outside the range; ``note``: what a value inside the range means, for the error line."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple | dict = ()
    special: tuple = ()
    note: str = ""

    def allows(self, value) -> bool:
        if any(value == v and type(value) is type(v) for v, _ in self.special):
            return True
        if self.choices:
            return value in self.choices
        if isinstance(value, str):
            return True
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        return self.hi is None or (value < self.hi or (not self.hi_open and value == self.hi))

    def parse(self, kind: type):
        """An argparse ``type=``: text -> a value of ``kind`` in this domain (else the parser's one-line error)."""

        def convert(text: str):
            try:
                value = kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be {self.describe(kind)}, got {text!r}") from None
            if not self.allows(value):
                raise argparse.ArgumentTypeError(f"must be {self.describe(kind)}, got {value!r}")
            return value

        return convert

    def describe(self, kind: type) -> str:
        """What the values are, e.g. ``>= 1 (an integer)``, ``in [0, 1) (a finite number)``, ``a or b``,
        ``one of a, b, c``."""
        if self.choices:
            names = list(map(str, self.choices))
            return " or ".join(names) if len(names) == 2 else "one of " + ", ".join(names)
        if self.lo is not None and self.hi is not None:
            rng = f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            rng = f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        elif self.hi is not None:
            rng = f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        else:
            rng = "any"
        kinds = {int: "an integer", float: "a finite number", str: "text"}
        what = kinds.get(kind, kind.__name__) + ("; " + self.note if self.note else "")
        text = what if rng == "any" else f"{rng} ({what})"
        return text + "".join(f" or {v!r} ({meaning})" for v, meaning in self.special)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def at_least(lo: float, note: str = "", special: tuple = ()) -> Domain:
    return Domain(lo=lo, note=note, special=special)


def above(lo: float, note: str = "") -> Domain:
    return Domain(lo=lo, lo_open=True, note=note)


def between(lo: float, hi: float, hi_open: bool = False, note: str = "") -> Domain:
    return Domain(lo=lo, hi=hi, hi_open=hi_open, note=note)


def one_of(choices, special: tuple = ()) -> Domain:
    """One of ``choices``: a sequence, or a registry (a dict) read when checked, so a name registered later counts."""
    return Domain(choices=choices if isinstance(choices, dict) else tuple(choices), special=special)


ANY_NUMBER = Domain()
SEED = between(0, SEED_MAX)


def kind_of(f: dataclasses.Field) -> type:
    """The type of a field's values: its default's (a list for a list factory, the dataclass for a nested one)."""
    if f.default is not MISSING:
        return type(f.default)
    return f.default_factory if dataclasses.is_dataclass(f.default_factory) else type(f.default_factory())


def type_error(name: str, kind: type, value) -> str | None:
    """One line when ``value`` is not of ``kind`` (an int is a number; a bool is not an integer)."""
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          list: lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
          dict: lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v)}[kind](value)
    if ok:
        return None
    want = {bool: "true or false", int: "an integer", float: "a number", str: "text", list: "a list of names",
            dict: "a table of named values"}[kind]
    return f"{name} must be {want}, got {value!r} ({type(value).__name__})"


def value_error(name: str, kind: type, domain: Domain | None, value) -> str | None:
    """One line naming ``name``, ``value`` and its domain when ``value`` is of the wrong type or outside it."""
    if (bad := type_error(name, kind, value)) is not None:
        return bad
    if domain is None or kind in (bool, list) or domain.allows(value):
        return None
    return f"{name} must be {domain.describe(kind)}, got {value!r}"


def check_fields(obj, flag, prefix: str = "") -> str | None:
    """The first field of dataclass ``obj`` (nested ones included) whose value is of the wrong type
    or outside its domain, as one line (``flag``: dotted key -> flag name); None when all fit."""
    for f in dataclasses.fields(obj):
        value, kind = getattr(obj, f.name), kind_of(f)
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, kind):
                return f"{prefix + f.name}: must be a group of settings, got {value!r}"
            if (bad := check_fields(value, flag, prefix + f.name + ".")) is not None:
                return bad
        elif (bad := value_error(flag(prefix + f.name), kind, f.metadata.get("domain"), value)) is not None:
            return bad
    return None
