"""Every setting checked at the door, generated from the config dataclasses: each numeric field is
driven with 0, a negative, inf, nan and a value of the wrong type, each choice field with an unknown
value, through the flags and through a ``--config`` file. A value is accepted only where the field's
declared domain says so (and then kept, or resolved as its domain's note says); every other one
stops ``python -m harmodt.train`` with one line naming the flag and the value, exit code 2, before
any file is written. A field added tomorrow is in these tables the day it is added."""

import dataclasses
import json
import math

import pytest

from harmodt import train
from harmodt.config import ConfigError, TrainConfig, apply_overrides, flag, validate
from harmodt.presets import PRESETS
from harmodt.domains import kind_of
from harmodt.methods import METHODS
from harmodt.run.cli import parse_args

# str fields without a list of choices: checked by their own rule (a task list, a device name) or any path
FREE_TEXT = {"tasks": "a task list (parse_tasks)", "data": "a folder", "out": "a folder", "device": "auto | cpu | cuda | cuda:N"}
BASE = ["--tasks", "reach-v3,push-v3"]


def leaf_fields(cls=TrainConfig, prefix=""):
    """(dotted key, field, kind) of every setting, nested groups walked."""
    for f in dataclasses.fields(cls):
        kind = kind_of(f)
        if dataclasses.is_dataclass(kind):
            yield from leaf_fields(kind, prefix + f.name + ".")
        else:
            yield prefix + f.name, f, kind


FIELDS = list(leaf_fields())
NUMERIC = [(k, f, kind) for k, f, kind in FIELDS if kind in (int, float)]
CHOICE = [(k, f, kind) for k, f, kind in FIELDS if kind is str and f.metadata.get("domain") is not None]
HOSTILE = {"zero": 0, "negative": -3, "inf": math.inf, "nan": math.nan}


def cli_value(v) -> str:
    return {math.inf: "inf"}.get(v, "nan" if isinstance(v, float) and math.isnan(v) else str(v))


def value_of(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def run_main(argv, capsys, tmp_path) -> tuple[int, str]:
    """``python -m harmodt.train ARGV`` in this process: (exit code, stderr)."""
    try:
        code = train.main(argv + ["--out", str(tmp_path / "run")])
    except SystemExit as exc:  # the flag parser's own errors
        code = exc.code
    return code, capsys.readouterr().err


def test_every_field_declares_its_domain():
    """A numeric or text setting without a declared domain fails here (bool and list settings have their type alone)."""
    for key, f, kind in FIELDS:
        if kind in (bool, list, dict):  # dict: method_options, whose fields are the methods' own (below)
            continue
        if kind is str and key in FREE_TEXT:
            continue
        assert f.metadata.get("domain") is not None, f"{key} declares no domain"
    assert NUMERIC and CHOICE and len(FIELDS) > 50


@pytest.mark.parametrize("name", list(HOSTILE))
@pytest.mark.parametrize("key", [k for k, _, _ in NUMERIC])
def test_numeric_flag(key, name, capsys, tmp_path):
    f, kind = next((f, kind) for k, f, kind in NUMERIC if k == key)
    value = HOSTILE[name]
    argv = BASE + [flag(key), cli_value(value)]
    domain = f.metadata["domain"]
    accepted = domain.allows(value) if not (kind is int and isinstance(value, float)) else False
    if name in ("inf", "nan"):
        assert not accepted, f"{key}: the domain of a setting never holds {value}"
    if accepted:
        try:
            cfg = parse_args(argv)
        except ConfigError as exc:  # in the domain, but a relation with another setting refuses it: named too
            assert flag(key) in str(exc) and "\n" not in str(exc), str(exc)
            return
        got = value_of(cfg, key)
        # kept as given, or resolved as the domain's note says (--tasks-per-batch 0: auto)
        assert got == value or f"{value}:" in domain.note, (key, value, got)
        return
    code, err = run_main(argv, capsys, tmp_path)
    assert code == 2, (key, value, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag(key) in lines[0], lines
    if kind is float or name not in ("inf", "nan"):  # (an int flag refuses "inf" at the parser, naming the text)
        assert cli_value(value) in lines[0], lines
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", [k for k, _, _ in NUMERIC])
def test_numeric_flag_of_the_wrong_type(key, capsys, tmp_path):
    code, err = run_main(BASE + [flag(key), "abc"], capsys, tmp_path)
    assert code == 2 and err.count("\n") == 1 and flag(key) in err and "'abc'" in err, err


@pytest.mark.parametrize("key", [k for k, _, _ in CHOICE])
def test_choice_flag_with_an_unknown_value(key, capsys, tmp_path):
    code, err = run_main(BASE + [flag(key), "no-such-value"], capsys, tmp_path)
    assert code == 2 and err.count("\n") == 1 and f"{flag(key)} must be " in err and "'no-such-value'" in err, err


def config_file(tmp_path, key, value):
    d = {"tasks": "reach-v3,push-v3"}
    target = d
    parts = key.split(".")
    for p in parts[:-1]:
        target = target.setdefault(p, {})
    target[parts[-1]] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("key", [k for k, f, kind in FIELDS if kind is not list])
def test_config_file_value_of_the_wrong_type(key, tmp_path):
    """``--config`` goes through the same check: a value of the wrong JSON type is named with the file."""
    kind = next(kind for k, _, kind in FIELDS if k == key)
    wrong = {int: "20", float: "0.5", str: 5, bool: "yes", dict: ["cagrad_c"]}[kind]
    path = config_file(tmp_path, key, wrong)
    with pytest.raises(ConfigError, match=f"--config {path}: {flag(key)} must be") as exc:
        parse_args(["--config", str(path)])
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("key", [k for k, _, _ in NUMERIC])
def test_config_file_non_finite_value(key, tmp_path):
    path = config_file(tmp_path, key, math.nan)
    with pytest.raises(ConfigError, match=f"{flag(key)} must be"):
        parse_args(["--config", str(path)])


def test_config_file_steps_as_text_is_one_line(capsys, tmp_path):
    """The reported case: ``"steps": "20"`` in a --config file (was a TypeError deep in the trainer)."""
    path = config_file(tmp_path, "steps", "20")
    code, err = run_main(["--config", str(path)], capsys, tmp_path)
    assert code == 2 and err == f"error: --config {path}: --steps must be an integer, got '20' (str)\n"


@pytest.mark.parametrize("argv, line", [
    (["--tasks-per-batch", "5"], "--tasks-per-batch cannot exceed the number of tasks of --tasks (5 > 2)"),
    (["--n-embd", "30", "--n-head", "4"], "--n-embd must be divisible by --n-head, got 30 and 4"),
    (["--eta-min", "5", "--eta-max", "4"], "need --eta-min <= --eta-max, got 5 > 4"),
    (["--seed", "1", "--validation-seed", "12346"], "--validation-seed 12346 draws the final evaluation's test goals"),
    (["--validation-seed", "3", "--eval-episodes", "0"], "--validation-seed needs --eval-episodes > 0"),
])
def test_relations_between_fields(argv, line, capsys, tmp_path):
    code, err = run_main(BASE + argv, capsys, tmp_path)
    assert code == 2 and err.count("\n") == 1 and line in err, err


def test_presets_pass_the_same_check():
    for name, values in PRESETS.items():
        validate(apply_overrides(TrainConfig(), values))  # every shipped preset is valid
    with pytest.raises(ConfigError, match="--update-every must be >= 1"):
        validate(apply_overrides(TrainConfig(), {"masks.update_every": 0}))  # a preset's values meet the field's domain
    with pytest.raises(ConfigError, match="--lam-on must be importance or agreement, got 'both'"):
        validate(apply_overrides(TrainConfig(), {"masks.lam_on": "both"}))


METHOD_OPTIONS = [(name, f) for name, m in METHODS.items() if m.options is not None for f in dataclasses.fields(m.options)]


def test_every_method_option_declares_its_domain():
    """A method's own hyper-parameters (harmodt.methods, e.g. cagrad's --cagrad-c) declare theirs too."""
    assert METHOD_OPTIONS
    for name, f in METHOD_OPTIONS:
        assert f.metadata.get("domain") is not None, f"{name}: {f.name} declares no domain"


@pytest.mark.parametrize("name", list(HOSTILE))
@pytest.mark.parametrize("method,key", [(m, f.name) for m, f in METHOD_OPTIONS])
def test_method_option_flag(method, key, name):
    f = next(f for m, f in METHOD_OPTIONS if m == method and f.name == key)
    value, option = HOSTILE[name], "--" + key.replace("_", "-")
    argv = BASE + ["--method", method, option, cli_value(value)]
    if f.metadata["domain"].allows(value):
        assert parse_args(argv).method_options[key] == value
    else:
        with pytest.raises(ConfigError) as exc:
            parse_args(argv)
        assert option in str(exc.value) and "\n" not in str(exc.value)
