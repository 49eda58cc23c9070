"""bench/bit_identity.py: its comparison on hand-made results (no trainings), its usage errors, and one
end-to-end run of the script with the same revision on both sides (`long`)."""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.bit_compare import DEFAULT_IGNORE, compare_runs, first_difference
from bench.bit_identity import main
from bench.bit_trees import native_sources

REPO = Path(__file__).resolve().parents[1]


def checkpoint() -> dict:
    """A checkpoint-shaped nest: weights, packed masks, optimizer state, RNG state, config."""
    g = torch.Generator().manual_seed(0)
    return {"model": {"fc.weight": torch.randn(4, 3, generator=g), "fc.bias": torch.zeros(4)},
            "masks": {"tasks": ["reach-v3", "push-v3"],
                      "words": {"fc.weight": torch.tensor([[5], [9]], dtype=torch.int32)}},
            "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 3, generator=g)},
                                    1: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, generator=g)}},
                          "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1]}]},
            "rng": {"torch": torch.get_rng_state(), "python": (3, (1, 2, 3), None)},
            "config": {"out": "/tmp/a", "lr": 1e-3, "nan_is_nan": math.nan}, "step": 20}


def test_equal_nests_have_no_difference():
    a = checkpoint()
    b = copy.deepcopy(a)
    b["rng"]["python"] = [3, [1, 2, 3], None]  # a list where the other has a tuple: the same items
    assert first_difference(a, b) is None
    assert first_difference(torch.tensor([math.nan, 1.0]), torch.tensor([math.nan, 1.0])) is None  # the same bits


def test_one_ulp_in_nested_optimizer_state_is_found():
    a = checkpoint()
    b = copy.deepcopy(a)
    x = b["optimizer"]["state"][1]["exp_avg"]
    x[2] = torch.nextafter(x[2], torch.tensor(math.inf))
    d = first_difference(a, b, "checkpoint")
    assert d.key == "checkpoint/optimizer/state/1/exp_avg"
    assert d.detail.startswith("1 of 4 elements differ, max |a-b| ") and float(d.detail.rsplit(" ", 1)[1]) > 0


def test_signed_zero_float_ulp_dtype_and_mask_word_differences():
    assert first_difference(torch.tensor([0.0]), torch.tensor([-0.0])).detail.startswith("1 of 1 elements differ")
    d = first_difference({"lr": 1e-3}, {"lr": math.nextafter(1e-3, 1.0)})
    assert d.key == "lr" and d.detail.endswith(f"|a-b| {math.ulp(1e-3):.3g}")
    wider = first_difference(torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    assert wider.detail == "dtype torch.float32 vs torch.float64"
    assert first_difference(torch.zeros(2), torch.zeros(3)).detail == "shape (2,) vs (3,)"
    a = checkpoint()
    b = copy.deepcopy(a)
    b["masks"]["words"]["fc.weight"][1, 0] = 8
    assert str(first_difference(a, b)) == "masks/words/fc.weight: 1 of 2 elements differ, max |a-b| 1"
    assert first_difference(1, 1.0).detail == "int 1 vs float 1.0"


def test_missing_keys_on_either_side_and_ignored_keys():
    a = checkpoint()
    b = copy.deepcopy(a)
    del b["optimizer"]["state"][0]["step"]
    assert str(first_difference(a, b, "checkpoint")) == "checkpoint/optimizer/state/0/step: missing in the candidate"
    assert str(first_difference(b, a, "checkpoint")) == "checkpoint/optimizer/state/0/step: missing in the baseline"
    c = copy.deepcopy(a)
    c["config"]["out"] = "/tmp/b"
    assert first_difference(a, c, "checkpoint", DEFAULT_IGNORE) is None
    assert first_difference(a, c, "checkpoint").key == "checkpoint/config/out"
    c["optimizer"]["param_groups"][0]["lr"] = 2e-3
    assert first_difference(a, c, "checkpoint", (*DEFAULT_IGNORE, "checkpoint/optimizer/param_groups/*/lr")) is None


def write_run(folder: Path, ck: dict, records: list[dict]) -> Path:
    folder.mkdir()
    torch.save(ck, folder / "checkpoint.pt")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_runs_compare_metrics_numbers_not_timings_then_weights_before_optimizer(tmp_path):
    records = [{"step": 2, "loss": 0.5, "lr": 1e-3, "steps_per_s": 40.0},
               {"step": 4, "loss": 0.25, "mask_update_s": 0.1}]
    a = write_run(tmp_path / "a", checkpoint(), records)
    timings = [{**r, **{k: v * 3 for k, v in r.items() if k.endswith("_s")}} for r in records]
    assert compare_runs(a, write_run(tmp_path / "b", checkpoint(), timings)) is None
    moved = copy.deepcopy(records)
    moved[1]["loss"] = math.nextafter(0.25, 1.0)
    assert compare_runs(a, write_run(tmp_path / "c", checkpoint(), moved)).key == "metrics.jsonl/line 2 (step 4)/loss"
    ck = checkpoint()
    ck["optimizer"]["state"][0]["exp_avg"] += 1
    ck["model"]["fc.bias"][0] = 1e-30
    ck = {k: ck[k] for k in reversed(list(ck))}  # the model is still compared first
    assert compare_runs(a, write_run(tmp_path / "d", ck, records)).key == "checkpoint/model/fc.bias"


def test_native_sources_ignore_cmake_comments_and_output_folder_only(tmp_path):
    """Two trees get one library when their C++ is the same and their CMakeLists.txt differs only in
    comments and where the library goes; a changed compile flag or source line is another library."""
    def tree(name, cmake, cpp="int f() { return 1; }\n"):
        root = tmp_path / name
        (root / "csrc").mkdir(parents=True)
        (root / "csrc" / "op.cpp").write_text(cpp)
        (root / "CMakeLists.txt").write_text(cmake)
        return native_sources(root)

    old = tree("old", 'set(HARMODT_OUTPUT_DIR "${SRC}/kernels/_lib")  # the lib\n'
                      'target_compile_options(x PRIVATE -O3)\n')
    assert tree("moved", '# new layout\nset(HARMODT_OUTPUT_DIR "${SRC}/kernels/harmodt_kernels/_lib")\n'
                         'target_compile_options(x PRIVATE -O3)  # same flags\n') == old
    assert tree("flags", 'set(HARMODT_OUTPUT_DIR "${SRC}/kernels/_lib")\n'
                         'target_compile_options(x PRIVATE -O2)\n') != old
    assert tree("code", 'set(HARMODT_OUTPUT_DIR "${SRC}/kernels/_lib")\ntarget_compile_options(x PRIVATE -O3)\n',
                "int f() { return 2; }\n") != old


def test_unknown_revision_is_exit_2(capsys):
    assert main(["--baseline", "no-such-revision-xyz"]) == 2
    assert "'no-such-revision-xyz' is not a revision" in capsys.readouterr().err


def test_bad_paths_flag_is_exit_2():
    with pytest.raises(SystemExit) as e:
        main(["--paths", "fast"])
    assert e.value.code == 2


@pytest.mark.long
def test_same_revision_twice_is_identical_and_the_control_is_detected(tmp_path):
    """The script end to end on HEAD against HEAD (harmodt-f --fused and the control: 3 trainings):
    exit 0, identical, the control's perturbation found; the temporary worktrees are gone afterwards."""
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    proc = subprocess.run([sys.executable, "-m", "bench.bit_identity", "--baseline", "HEAD",
                           "--candidate", "HEAD", "--methods", "harmodt-f", "--paths", "fused",
                           "--keep", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("harmodt-f"))
    assert row.split()[1:] == ["identical"]
    assert "control: harmodt-f fused (cpu), candidate run with --lr 0.001000001: detected (" in proc.stdout
    assert not (tmp_path / "work" / "baseline-tree").exists() and not (tmp_path / "work" / "candidate-tree").exists()
    listed = subprocess.run(["git", "worktree", "list"], cwd=REPO, capture_output=True, text=True).stdout
    assert str(tmp_path) not in listed
