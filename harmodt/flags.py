"""The command-line flags of config fields (harmodt/config.py), one source for every command:
training has a flag per field (:func:`add_config_flags`) and per method option
(:func:`add_method_flags`); ``python -m harmodt.evaluate`` and ``python -m harmodt.study`` declare
the flags they share with it by field (:func:`field_flag`), saying only where theirs differ."""

from __future__ import annotations

import argparse
import dataclasses

from .config import RESUME_RULES, TrainConfig, flag
from .domains import kind_of
from .methods import METHODS


def field_help(f: dataclasses.Field) -> str:
    """A field's help text, as argparse prints it."""
    return f.metadata.get("help", "").replace("%", "%%")


def add_config_flags(parser: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    """One training flag per field of dataclass ``cls`` (dest: the dotted key; default None, so a
    flag given is told from one not given); a field that is itself a config dataclass becomes a
    group of flags titled by its help. Values are checked with the config (harmodt.config.validate)."""
    group = parser
    for f in dataclasses.fields(cls):
        dest = prefix + f.name
        help_text = field_help(f)
        if f.default_factory is dict:  # method_options: the flags of every method's options (add_method_flags)
            continue
        if dataclasses.is_dataclass(f.default_factory):
            add_config_flags(parser.add_argument_group(f"{f.name} ({help_text})"), f.default_factory, dest + ".")
        elif f.default_factory is list:
            choices = [k for k, rule in RESUME_RULES.items()
                       if rule == "changeable"] if f.name == "allow_changed" else None
            extra = f" (any of {', '.join(choices)})" if choices else ""
            group.add_argument(flag(f.name), dest=dest, nargs="+", default=None, metavar="KEY", help=help_text + extra)
        elif isinstance(f.default, bool):
            group.add_argument(flag(f.name), dest=dest, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            domain = f.metadata.get("domain")
            allowed = f"; {domain.describe(kind_of(f))}" if domain is not None and not domain.choices else ""
            group.add_argument(flag(f.name), dest=dest, type=type(f.default), default=None, metavar=f.name.upper(),
                               help=f"{help_text} (default {f.default}{allowed})" if f.default != "" else help_text)


def add_method_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field of each registered method's options (harmodt.methods; dest
    ``method_options.NAME``), in a group per method; the default is the field's."""
    for method in METHODS.values():
        if method.options is None:
            continue
        group = parser.add_argument_group(f"--method {method.name}")
        for f in dataclasses.fields(method.options):
            group.add_argument(flag(f.name), dest="method_options." + f.name, type=type(f.default), default=None,
                               metavar=f.name.upper(), help=f"{field_help(f)} (default {f.default})")


def config_field(key: str) -> dataclasses.Field:
    """The field of TrainConfig (or of a nested config) named by dotted ``key`` ('masks.vote_threshold')."""
    cls, parts = TrainConfig, key.split(".")
    for part in parts[:-1]:
        cls = {f.name: f for f in dataclasses.fields(cls)}[part].default_factory
    return {f.name: f for f in dataclasses.fields(cls)}[parts[-1]]


def field_flag(parser: argparse.ArgumentParser, key: str, *names: str, **overrides) -> argparse.Action:
    """The flag of config field ``key`` on a command other than training, parsed at once: its name
    (or ``names``), default and help text as the field declares them, a value one of its domain's
    choices or checked by its domain (harmodt.domains), a switch for a bool. ``overrides``
    (add_argument's keywords) say where the command's flag differs from training's."""
    f = config_field(key)
    kind, domain = kind_of(f), f.metadata.get("domain")
    options = {"default": f.default, "help": field_help(f)}
    if kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif domain is not None and domain.choices:
        options["choices"] = list(domain.choices)
    elif domain is not None:
        options["type"] = domain.parse(kind)
    return parser.add_argument(*(names or (flag(key),)), **{**options, **overrides})
