"""Crash safety of training: a run killed with SIGKILL at any point and continued with --resume
ends as the uninterrupted run with the same seed (weights, masks, optimizer, RNG streams,
results.json, metrics.jsonl and TensorBoard scalars); metrics.jsonl never holds a step twice;
--resume with changed settings names every differing key unless --allow-changed allows it.

The kill points come from tests/_crash.py, a training process that patches harmodt from
outside so that it SIGKILLs itself at ``PHASE:STEP``.
"""

import concurrent.futures
import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data_folders import write_ours  # noqa: E402
from _synthetic import datasets  # noqa: E402

from harmodt.config import ConfigError, ModelConfig, TrainConfig, validate  # noqa: E402
from harmodt.masks import TaskMasks  # noqa: E402
from harmodt.plots import last_per_step, plot_run  # noqa: E402
from harmodt.run.cli import parse_args  # noqa: E402
from harmodt.run.outputs import read_metrics, rewind_metrics  # noqa: E402
from harmodt.train import Trainer, run  # noqa: E402

CRASH = Path(__file__).resolve().parent / "_crash.py"
TASKS = ("reach-v3", "push-v3")
TIMING = ("steps_per_s", "mask_update_s", "eval_env_steps_per_s")  # differ between any two runs
# 12 steps: checkpoints at 3, 6, 9, 12; mask updates at 4 and 8; a metric line every 2 steps
SYNTHETIC = ["--tasks", ",".join(TASKS), "--steps", "12", "--batch-size", "4", "--n-layer", "2", "--n-embd", "32", "--n-head", "2",
             "--context-len", "5", "--prompt-len", "2", "--update-every", "4", "--eval-episodes", "0", "--log-every", "2",
             "--checkpoint-every", "3", "--warmup-steps", "2", "--lr", "1e-3", "--device", "cpu", "--threads", "1", "--no-progress"]
# kill point -> the checkpoint step on disk right after the kill (None: none written yet)
KILL_POINTS = {
    "step:2": None,  # before the first checkpoint: --resume starts again at step 0
    "checkpoint-write:3": None,  # the first checkpoint half written: no checkpoint, a torn .tmp
    "step:5": 3,  # between checkpoints, after the mask update at 4: steps 4-5 and the update replayed
    "mask-update:8": 6,  # inside the mask update at 8 (masks changed, not yet logged)
    "checkpoint-write:9": 6,  # a checkpoint half written over an older one
    "step:12": 9,  # the last step, before the final checkpoint
    "checkpoint-write:12": 9,  # the final checkpoint half written
}
# the mask-update gradients (--mask-grads) a run uses -> its extra flags; official draws dropout in the update;
# counter: training's dropout from the counter-based stream (a hash of seed and step, what --fused selects)
VARIANTS = {"paper": [], "official": ["--mask-grads", "official"], "counter": ["--fused", "--dropout-rng", "counter"],
            "graphed": ["--fused", "--dropout-rng", "counter", "--cuda-graph", "on"]}
# (kill point, variant): every point with the default; official killed after an update that the resume replays;
# counter killed between checkpoints and inside a mask update
CASES = [(p, "paper") for p in KILL_POINTS] + [("step:5", "official"), ("step:5", "counter"), ("mask-update:8", "counter"),
                                               ("step:5", "graphed"), ("mask-update:8", "graphed")]


def train(out: Path, args: list[str], kill: str | None = None, resume: bool = False) -> subprocess.CompletedProcess:
    flags = [*args, "--out", str(out), *(["--resume"] if resume else [])]
    cmd = [sys.executable, str(CRASH), kill, "--", *flags] if kill else [sys.executable, "-m", "harmodt.train", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def checkpoint_step(out: Path):
    path = out / "checkpoint.pt"
    return int(torch.load(path, weights_only=True)["step"]) if path.exists() else None


def records(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in (out / "metrics.jsonl").read_text().splitlines()]


def tb_scalars(out: Path) -> dict:
    """{tag: [(step, value)]} as TensorBoard shows them (purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"), purge_orphaned_data=True)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if tag not in TIMING}


def assert_equal_tree(a, b, where="checkpoint"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, sorted(set(a) ^ set(b)))
        for k in a:
            assert_equal_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), (where, a, b)


def assert_same_run(ref: Path, out: Path) -> None:
    """``out`` ended exactly as the uninterrupted ``ref``: the whole final checkpoint (weights,
    masks, optimizer, scheduler, step, every RNG stream, losses since the last metric line) bit for
    bit, results.json, metrics.jsonl (timings aside, no step twice) and the TensorBoard scalars."""
    a = torch.load(ref / "checkpoint.pt", weights_only=True)
    b = torch.load(out / "checkpoint.pt", weights_only=True)
    for ck in (a, b):
        ck["config"].pop("out")
        ck["config"].pop("resume")
        ck["run"].pop("metrics_bytes")  # the timings' digits differ
    assert_equal_tree(a, b)
    assert (ref / "results.json").read_text() == (out / "results.json").read_text()
    assert records(out) == records(ref)
    assert tb_scalars(out) == tb_scalars(ref)
    assert not list(out.glob("checkpoint.pt.tmp*"))


@pytest.fixture(scope="module")
def synthetic_runs(tmp_path_factory):
    """Per variant the uninterrupted run and, per case, (the killed process, the checkpoint step
    and whether a torn .tmp was on disk after the kill, the resumed process, the folder): two at a time."""
    base = tmp_path_factory.mktemp("resume")
    args = SYNTHETIC + ["--data", str(write_ours(base / "data", TASKS, episodes=4, length=30))]

    def kill_and_resume(case):
        point, variant = case
        out = base / f"{variant}-{point.replace(':', '-')}"
        killed = train(out, args + VARIANTS[variant], kill=point)
        after = (checkpoint_step(out), any(out.glob("checkpoint.pt.tmp*")), len(records(out)))
        return case, (killed, after, train(out, args + VARIANTS[variant], resume=True), out)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        refs = {v: pool.submit(train, base / f"ref-{v}", args + extra) for v, extra in VARIANTS.items()}
        runs = dict(pool.map(kill_and_resume, CASES))
    for ref in refs.values():
        ok(ref.result())
    return {v: base / f"ref-{v}" for v in VARIANTS}, runs


@pytest.mark.parametrize("point,variant", CASES)
def test_sigkill_then_resume_ends_as_uninterrupted(synthetic_runs, point, variant):
    refs, runs = synthetic_runs
    ref = refs[variant]
    killed, (ck_step, torn_tmp, _), resumed, out = runs[(point, variant)]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert ck_step == KILL_POINTS[point]  # the kill came where the point says
    assert torn_tmp == point.startswith("checkpoint-write")
    ok(resumed)
    assert ("resumed from" in resumed.stdout) == (ck_step is not None)
    assert_same_run(ref, out)


def test_graphed_step_run_ends_as_the_eager_run(synthetic_runs):
    """--cuda-graph (its step logic on the CPU, harmodt/graphed_step.py) ends where the eager
    counter-dropout run ends: the same checkpoint bit for bit but for the flag itself."""
    refs, _ = synthetic_runs
    a = torch.load(refs["counter"] / "checkpoint.pt", weights_only=True)
    b = torch.load(refs["graphed"] / "checkpoint.pt", weights_only=True)
    for ck in (a, b):
        for k in ("out", "resume", "cuda_graph"):
            ck["config"].pop(k)
        ck["run"].pop("metrics_bytes")
    assert_equal_tree(a, b)
    assert records(refs["counter"]) == records(refs["graphed"])


def test_official_variant_trains_other_masks(synthetic_runs):
    """The official mask gradients reached the run: its masks and weights differ from the default's."""
    refs, _ = synthetic_runs
    a, b = (torch.load(refs[v] / "checkpoint.pt", weights_only=True) for v in ("paper", "official"))
    assert b["config"]["masks"]["mask_grads"] == "official"
    assert not torch.equal(*(TaskMasks.from_state(c["masks"]).snapshot() for c in (a, b)))


def test_killed_metrics_lines_are_cut_back(synthetic_runs):
    """The run killed at step 5 had logged step 4 and the mask update at 4 after its checkpoint at
    3; the resumed run cut them and wrote them once more, so each step appears once."""
    _, runs = synthetic_runs
    _, (_, _, n_records), _, out = runs[("step:5", "paper")]
    assert n_records == 3  # step 2, step 4, mask update at 4
    recs = records(out)
    keys = [(r["step"], "loss" in r) for r in recs]
    assert len(keys) == len(set(keys)) and [s for s, _ in keys] == sorted(s for s, _ in keys)


# ---- evaluation as the kill point (Meta-World: one task, one episode) -----------------------
# 6 steps: checkpoints at 3 and 6, evaluation at 4 and the final one at 6, a mask update at 3
EVAL = ["--tasks", "reach-v3", "--steps", "6", "--batch-size", "4", "--n-layer", "2", "--n-embd", "32", "--n-head", "2",
        "--context-len", "5", "--prompt-len", "2", "--update-every", "3", "--eval-episodes", "1", "--eval-every", "4",
        "--log-every", "1", "--checkpoint-every", "3", "--warmup-steps", "2", "--lr", "1e-3", "--device", "cpu", "--threads", "1",
        "--no-progress"]


def test_sigkill_during_evaluations_then_resume_ends_as_uninterrupted(tmp_path):
    """Killed inside the evaluation at step 4 (after the checkpoint at 3), resumed and killed
    again inside the final evaluation (after the final checkpoint), resumed again: the same
    weights, results (success and return of the episode) and metric lines as the uninterrupted run."""
    args = EVAL + ["--data", str(write_ours(tmp_path / "data", ("reach-v3",), episodes=4, length=30))]
    out = tmp_path / "killed"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        ref = pool.submit(train, tmp_path / "ref", args)
        first = train(out, args, kill="eval:4")
        assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
        assert checkpoint_step(out) == 3 and not (out / "results.json").exists()
        second = train(out, args, kill="eval:6", resume=True)
        assert second.returncode == -signal.SIGKILL, second.stderr[-3000:]
        assert checkpoint_step(out) == 6 and not (out / "results.json").exists()
        ok(train(out, args, resume=True))
        ok(ref.result())
    assert_same_run(tmp_path / "ref", out)
    evals = [r for r in records(out) if "eval_mean_success" in r]
    assert [r["step"] for r in evals] == [4, 6]
    res = json.loads((out / "results.json").read_text())  # the evaluation at 4 came back from the checkpoint at 6
    assert res["final"]["step"] == 6 and res["best"]["evaluations"] == 2 and res["best"]["step"] in (4, 6)
    assert res["best"]["mean_success"] == max(r["eval_mean_success"] for r in evals)
    assert res["tasks"]["reach-v3"]["prompt"]["segment"] == "last"


def test_evaluation_leaves_the_training_rng_streams(tmp_path):
    """Evaluating in the middle of training changes no RNG stream training draws from, though the
    evaluation itself draws from them."""
    cfg = validate(TrainConfig(tasks="reach-v3", method="harmodt-f", steps=4, batch_size=4, eval_episodes=1, out=str(tmp_path / "run"),
                               progress=False, device="cpu", model=ModelConfig(n_layer=1, n_head=2, n_embd=16, context_len=4, prompt_len=2)))
    tr = Trainer(cfg, datasets(["reach-v3"]))
    tr.train_step([0])
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), __import__("random").getstate(), tr.batcher.state_dict())
    drawn = []
    act = tr.model.act

    def drawing_act(*args, **kwargs):  # draws from every global stream, as an env or a sampler might
        drawn.append((torch.rand(1).item(), np.random.rand(), __import__("random").random()))
        return act(*args, **kwargs)

    tr.model.act = drawing_act
    res = tr.evaluate()
    del tr.model.act
    assert drawn and tr.model.training
    assert res["tasks"]["reach-v3"]["episodes"] == 1
    after = (torch.get_rng_state(), np.random.get_state()[1], __import__("random").getstate(), tr.batcher.state_dict())
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    assert torch.equal(before[3]["generator"], after[3]["generator"])


# ---- --resume with changed settings ---------------------------------------------------------
def tiny(tmp_path, **kw) -> TrainConfig:
    model = ModelConfig(n_layer=2, n_head=2, n_embd=32, context_len=5, prompt_len=2)
    base = dict(tasks=",".join(TASKS), method="harmodt-f", steps=4, batch_size=4, warmup_steps=2, lr=1e-3, eval_episodes=0,
                log_every=2, checkpoint_every=2, out=str(tmp_path / "run"), progress=False, device="cpu", model=model)
    base.update(kw)
    cfg = TrainConfig(**base)
    cfg.masks.update_every = 5
    return validate(cfg)


def test_resume_with_changed_settings_names_every_key(tmp_path):
    run(tiny(tmp_path), datasets(TASKS))
    changed = tiny(tmp_path, resume=True, steps=8, method="harmodt-m", model=ModelConfig(n_layer=3, n_head=2, n_embd=32, context_len=5,
                                                                                       prompt_len=2))
    changed.masks.sparsity = 0.5
    with pytest.raises(ConfigError) as err:
        run(changed, datasets(TASKS))
    msg = str(err.value)
    assert "\n" not in msg
    for key in ("model.n_layer (2 -> 3)", "masks.sparsity (0.2 -> 0.5)", "steps (4 -> 8)", "method ('harmodt-f' -> 'harmodt-m')"):
        assert key in msg, msg
    assert "--allow-changed steps" in msg and "method, model.n_layer, masks.sparsity cannot change" in msg
    # allowing the one safe key leaves the others refused
    with pytest.raises(ConfigError, match="model.n_layer"):
        run(dataclasses.replace(changed, allow_changed=["steps"]), datasets(TASKS))
    # data and tasks are compared too
    with pytest.raises(ConfigError, match=r"tasks \('reach-v3,push-v3' -> 'push-v3,reach-v3'\)"):
        run(tiny(tmp_path, resume=True, tasks="push-v3,reach-v3"), datasets(TASKS))
    with pytest.raises(ConfigError, match=r"data \(''"):
        run(tiny(tmp_path, resume=True, data=str(tmp_path)), datasets(TASKS))


def test_resume_of_a_checkpoint_from_before_prompt_segment_keeps_random_prompts(tmp_path):
    """A checkpoint whose config has no prompt_segment ran with random prompt windows: resuming it
    with today's default (last) is refused in one line naming the flag that continues it as it was."""
    from harmodt import checkpoint

    run(tiny(tmp_path, prompt_segment="random"), datasets(TASKS))
    ck = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    del ck["config"]["prompt_segment"]
    checkpoint.save(ck, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ConfigError) as err:
        run(tiny(tmp_path, resume=True, steps=6, allow_changed=["steps"]), datasets(TASKS))
    msg = str(err.value)
    assert "prompt_segment ('random' -> 'last')" in msg and "pass --prompt-segment random to continue" in msg and "\n" not in msg
    res = run(tiny(tmp_path, resume=True, steps=6, allow_changed=["steps"], prompt_segment="random"), datasets(TASKS))
    assert res["steps"] == 6


def test_allow_changed_steps_continues_as_a_longer_run(tmp_path):
    """A finished 4-step run continued to 8 steps (--allow-changed steps) ends as an 8-step run."""
    run(tiny(tmp_path, out=str(tmp_path / "long"), steps=8), datasets(TASKS))
    run(tiny(tmp_path, out=str(tmp_path / "short")), datasets(TASKS))
    with pytest.raises(ConfigError, match=r"pass --allow-changed steps eval_every to continue with the new values"):
        run(tiny(tmp_path, out=str(tmp_path / "short"), steps=8, eval_every=3, resume=True), datasets(TASKS))
    run(tiny(tmp_path, out=str(tmp_path / "short"), steps=8, resume=True, allow_changed=["steps"]), datasets(TASKS))
    a = torch.load(tmp_path / "long" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "short" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    assert_equal_tree(a["model"], b["model"])
    assert_equal_tree(a["masks"], b["masks"])
    assert records(tmp_path / "long") == records(tmp_path / "short")


@pytest.mark.parametrize("argv,needle", [
    (["--resume", "--allow-changed", "model.n_layer"], "--allow-changed: model.n_layer cannot change on --resume"),
    (["--resume", "--allow-changed", "steps", "method", "tasks"], "--allow-changed: method, tasks cannot change"),
    (["--resume", "--allow-changed", "nope"], "unknown config key(s) nope"),
    (["--allow-changed", "steps"], "--allow-changed applies to --resume only"),
])
def test_allow_changed_refuses_keys_that_would_break_the_checkpoint(argv, needle):
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_allow_changed_flag_takes_several_keys():
    cfg = parse_args(["--resume", "--allow-changed", "steps", "eval_every", "device", "--steps", "9"])
    assert cfg.allow_changed == ["steps", "eval_every", "device"] and cfg.steps == 9


# ---- metrics.jsonl and plots ----------------------------------------------------------------
def write_lines(path: Path, recs: list[dict], tail: str = "") -> bytes:
    raw = "".join(json.dumps(r) + "\n" for r in recs) + tail
    path.write_text(raw)
    return raw.encode()


def test_rewind_metrics_cuts_at_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    head = [{"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.9}, {"step": 4, "harmony_score": 0.5}]
    tail = [{"step": 6, "loss": 0.8}, {"step": 6, "eval_mean_success": 0.0}]
    keep = len(write_lines(path, head))
    write_lines(path, head + tail, tail='{"step": 7, "lo')  # a line cut by the kill
    kept = rewind_metrics(path, keep, 4)
    assert path.read_text().splitlines() == [json.dumps(r) for r in head]
    assert kept == head[1:]  # the records of the checkpoint's step, for TensorBoard
    # a checkpoint that does not record the size (converted from the old format): by step
    write_lines(path, head + tail, tail='{"step": 7, "lo')
    assert rewind_metrics(path, None, 4) == head[1:] and path.read_text().splitlines() == [json.dumps(r) for r in head]
    # the size no longer matches the file (a line boundary is not there): by step as well
    write_lines(path, head + tail)
    rewind_metrics(path, keep + 3, 2)
    assert path.read_text().splitlines() == [json.dumps(head[0])]
    # a run from step 0 starts afresh
    write_lines(path, head)
    assert rewind_metrics(path, 0, 0) == [] and path.read_text() == ""
    assert not list(tmp_path.glob("metrics.jsonl.tmp*"))


def test_plots_take_the_last_record_of_a_step(tmp_path):
    """A metrics.jsonl with a step logged twice (as a resumed run without the cut would leave it)
    is drawn with one point per step, the last one."""
    recs = [{"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.9}, {"step": 4, "harmony_score": 0.5}, {"step": 2, "loss": 0.7},
            {"step": 4, "loss": 0.6}, {"step": 6, "loss": 0.5}]
    assert last_per_step(recs, "loss") == [(2, 0.7), (4, 0.6), (6, 0.5)]
    assert last_per_step(recs, "harmony_score") == [(4, 0.5)]
    write_lines(tmp_path / "metrics.jsonl", recs)
    assert plot_run(tmp_path).stat().st_size > 1000
