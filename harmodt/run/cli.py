"""The flags of ``python -m harmodt.train``, built from the config dataclasses (harmodt/config.py):
every field is a flag (``model.n_layer`` is ``--n-layer``), its help text the field's, so a new
field is a new flag; so is each field of a method's options (harmodt.methods; both in harmodt/flags.py). Bad flags are
one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys

from ..config import ConfigError, TrainConfig, apply_overrides, config_from_dict, flag, validate
from ..oneline import OneLineParser
from ..domains import check_fields
from ..files import read_json
from ..flags import add_config_flags, add_method_flags
from ..presets import PRESETS

# Flags that say how and where a run goes, not what it trains: given alone (no --preset, no
# --config, no other flag) they keep the embedded default run.
CONFIG_LIMIT = 1 << 20  # bytes of a --config file read at most

RUN_ONLY = ("out", "fused", "backend", "dropout_rng", "precision", "threads", "progress", "seed", "resume", "device",
            "compile", "cuda_graph",
            "allow_changed", "dist_timeout")


def build_parser(prog: str = "python -m harmodt.train") -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=prog,
        description="Train HarmoDT or a baseline on offline Meta-World data. With no arguments, runs the embedded "
                    "default.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), nargs="+", default=None, metavar="NAME",
                   help=f"named sets of defaults ({', '.join(sorted(PRESETS))}), applied left to right; flags given "
                        "override them")
    p.add_argument("--config", default=None, help="a config.json (e.g. from a previous run) to start from")
    add_config_flags(p, TrainConfig)
    add_method_flags(p)
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """CLI -> validated TrainConfig. No arguments at all (or only those of RUN_ONLY) selects the
    embedded default."""
    argv = sys.argv[1:] if argv is None else argv
    ns = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(ns).items() if v is not None and k not in ("preset", "config")}
    cfg = TrainConfig()
    if ns.config:
        try:
            # (a stream such as /dev/zero: refused at the limit)
            cfg = config_from_dict(read_json(ns.config, limit=CONFIG_LIMIT))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise ConfigError(f"--config {ns.config}: {exc}") from None
        if (bad := check_fields(cfg, flag)) is not None:  # the file's own values, named as the file's
            raise ConfigError(f"--config {ns.config}: {bad}")
    presets = ns.preset or []
    if not presets and not ns.config and all(k in RUN_ONLY for k in given):
        presets = ["embedded-default"]
    for name in presets:  # left to right, each over the config so far
        cfg = apply_overrides(cfg, PRESETS[name])
    cfg = apply_overrides(cfg, given)
    return validate(cfg)
