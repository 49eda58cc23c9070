"""The run harness (harmodt/run/): flags built from the config fields, the atomic writer, the
metrics reader, RNG capture, signal handling and the stdout of torchrun ranks."""

import dataclasses

import io
import json
import os
import random
import signal
import sys

import numpy as np
import pytest
import torch

from harmodt.methods import METHODS
from harmodt.config import RESUME_RULES, ConfigError, MaskConfig, ModelConfig, TrainConfig, flat_keys, to_dict
from harmodt.run import distributed, rng, signals
from harmodt.run.cli import build_parser, flag, parse_args
from harmodt.run.outputs import read_metrics, write_atomic


def test_every_config_field_is_a_flag_with_help():
    """A field added to a config dataclass is a flag at once; each field says what it is."""
    help_text = build_parser().format_help()
    for cls in (TrainConfig, ModelConfig, MaskConfig):
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory):
                continue
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
            if f.name == "method_options":  # a flag per field of each method's own options (harmodt.methods)
                for method in METHODS.values():
                    for opt in dataclasses.fields(method.options) if method.options is not None else ():
                        assert opt.metadata.get("help") and flag(opt.name) in help_text, opt.name
                continue
            assert flag(f.name) in help_text, f.name


def test_flags_set_their_dotted_keys():
    cfg = parse_args(["--steps", "7", "--n-layer", "2", "--sparsity", "0.4", "--no-progress", "--allow-changed", "steps", "--resume"])
    assert (cfg.steps, cfg.model.n_layer, cfg.masks.sparsity, cfg.progress, cfg.allow_changed) == (7, 2, 0.4, False, ["steps"])


def test_resume_rules_name_real_keys_and_ignored_keys_may_be_allowed():
    keys = flat_keys(to_dict(TrainConfig()))
    assert set(RESUME_RULES) <= set(keys) and set(RESUME_RULES.values()) == {"changeable", "ignored"}
    assert parse_args(["--resume", "--allow-changed", "progress", "steps"]).allow_changed == ["progress", "steps"]
    with pytest.raises(ConfigError, match="--allow-changed: seed cannot change"):
        parse_args(["--resume", "--allow-changed", "seed"])


def test_bad_flag_value_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--steps", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: argument --steps")


def test_write_atomic_replaces_whole_files(tmp_path):
    path = tmp_path / "f.json"
    write_atomic(path, "first")
    write_atomic(path, b"second")
    assert path.read_text() == "second" and not list(tmp_path.glob("f.json.tmp*"))


def test_read_metrics_skips_torn_lines_and_keeps_the_last_record_of_a_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [{"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.9}, {"step": 4, "harmony_score": 0.5}, {"step": 2, "loss": 0.7},
            {"step": 4, "loss": 0.6}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + "not json\n" + '{"step": 6, "lo')
    assert read_metrics(path) == [{"step": 2, "loss": 0.7}, {"step": 4, "harmony_score": 0.5}, {"step": 4, "loss": 0.6}]
    assert read_metrics(tmp_path / "none.jsonl") == []


def test_rng_capture_restores_every_stream_through_a_checkpoint(tmp_path):
    state = rng.capture(torch.device("cpu"))
    torch.save(state, tmp_path / "rng.pt")
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    rng.restore(torch.load(tmp_path / "rng.pt", weights_only=True), torch.device("cpu"))
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    with rng.preserved(torch.device("cpu")):
        torch.rand(5), np.random.rand(5), random.random()
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2]


def test_stop_requests_first_signal_asks_second_interrupts_and_handlers_come_back():
    before = signal.getsignal(signal.SIGINT)
    asked = []
    with signals.stop_requests(lambda: asked.append(True)):
        os.kill(os.getpid(), signal.SIGINT)
        assert asked == [True]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_stop_request_of_one_process_and_of_ranks_that_must_agree():
    alone = signals.StopRequest()
    assert not alone
    alone.ask()
    assert alone and alone.asked
    ranks = signals.StopRequest(agreed_by_ranks=True)
    ranks.ask()
    assert not ranks  # asked here, but the ranks have not summed their requests yet
    ranks.agreed = torch.tensor(0.0)
    assert not ranks
    ranks.agreed = torch.tensor(1.0)  # some rank asked at the last step: every rank stops
    assert ranks


def test_rank_output_silences_other_ranks_and_gives_stdout_back(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)

    class Rank1(distributed.Single):
        rank, is_main = 1, False

    with distributed.rank_output(Rank1()):
        print("hidden")
        assert sys.stdout is not out
    assert sys.stdout is out
    with distributed.rank_output(distributed.Single()):
        print("shown")
    assert out.getvalue() == "shown\n"
