"""Data-parallel training under torchrun (Gloo on the CPU, 2 ranks on this machine).

- 2 ranks x 1 task per batch for 30 steps with one mask update equal one process that trains the
  same global batches (2 tasks, 8 rows: each rank's rows drawn from that rank's data stream) in
  one forward: losses within 1e-5 and identical masks. Dropout is 0: with dropout the one process
  would draw its dropout masks for 8 rows at once, the ranks for 4 rows each from their own
  streams, so the draws (not the algorithm) would differ.
- A 2-rank run resumed with 2 ranks ends as the uninterrupted one (bit for bit).
- A checkpoint written by 2 ranks, continued in one process: with the two ranks' data streams
  (which it holds) the continuation equals the 2-rank run's (losses within 1e-5, same masks); the
  CLI in one process with the same global batch reseeds the data streams (announced in one line),
  so its batches differ and only the loss level and the mask update can be compared.
- SIGKILL of one rank ends the run with a clear line and a non-zero exit, found by the broken
  connection (well before --dist-timeout); a stopped (hung) rank ends it after --dist-timeout.

Timeouts are generous (--dist-timeout 300 for the runs that must succeed): on a loaded 2-core
machine a rank can wait long for the other at a collective without anything being wrong.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data_folders import write_ours  # noqa: E402

from harmodt.run import distributed, resume  # noqa: E402
from harmodt.run.cli import parse_args  # noqa: E402
from harmodt.data.batches import PromptDTBatcher  # noqa: E402
from harmodt.masks import TaskMasks  # noqa: E402
from harmodt.train import Trainer  # noqa: E402

TASKS = ("reach-v3", "push-v3", "door-open-v3")
WORLD, K, B = 2, 1, 4  # ranks, tasks per batch and rows per rank
UPDATE_AT = 25  # the one mask update of a 30-step run (after the resume point 20)
ARGS = ["--tasks", ",".join(TASKS), "--method", "harmodt-f", "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--context-len", "5",
        "--prompt-len", "2", "--dropout", "0", "--update-every", str(UPDATE_AT), "--eta-max", "40", "--eval-episodes", "0",
        "--log-every", "1", "--checkpoint-every", "10", "--warmup-steps", "2", "--lr", "1e-3", "--device", "cpu", "--threads", "1",
        "--no-progress", "--dist-timeout", "300"]
PER_RANK = ["--batch-size", str(B), "--tasks-per-batch", str(K)]
GLOBAL = ["--batch-size", str(WORLD * B), "--tasks-per-batch", str(WORLD * K)]


def torchrun(*args, out: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD), "-m", "harmodt.train",
           *args, "--out", str(out)]
    return ok(subprocess.run(cmd, capture_output=True, text=True, timeout=timeout))


def single(*args, out: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "harmodt.train", *args, "--out", str(out)], capture_output=True, text=True, timeout=300)
    return ok(proc) if check else proc


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def losses(out: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def final(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)


def masks_equal(a: dict, b: dict) -> bool:
    """Two checkpoints' masks (harmodt.masks.TaskMasks.state) hold the same tasks and bits."""
    return a["tasks"] == b["tasks"] and torch.equal(*(TaskMasks.from_state(m).snapshot() for m in (a, b)))


class RankStreams:
    """The data streams of a WORLD-rank run inside one process: rank r's batcher (seed + r)
    draws rank r's rows of a training batch and the mask-update batch of every task i with
    i mod WORLD = r, in the order the ranks draw them."""

    generator = None  # no task draws from a data stream: the ranks' task stream or round-robin gives them

    def __init__(self, tr: Trainer):
        mc, cfg = tr.cfg.model, tr.cfg
        self.batchers = [PromptDTBatcher(tr.datasets, tr.tasks, mc.context_len, mc.prompt_len, cfg.rtg_scale, mc.max_ep_len,
                                         seed=cfg.seed + r) for r in range(WORLD)]

    def sample(self, task_ids: list[int], batch_size: int) -> dict:
        if len(task_ids) == 1:  # a mask-update batch of one task
            return self.batchers[task_ids[0] % WORLD].sample(task_ids, B)
        parts = [self.batchers[r].sample(task_ids[r * K : (r + 1) * K], B) for r in range(WORLD)]
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def reference(data: Path, tmp: Path, steps: int = 30, ck: dict | None = None, extra: tuple = ()) -> tuple[dict[int, float], Trainer]:
    """One process training the 2-rank run's global batches (``--tasks-per-batch 2 --batch-size 8``
    with the ranks' task stream, or their round-robin order, and data streams), from step 0 or
    from the 2-rank checkpoint ``ck``, with the flags ``extra``; returns {step: loss} and the trainer."""
    cfg = parse_args([*extra, *ARGS, *GLOBAL, "--data", str(data), "--steps", str(steps), "--out", str(tmp)])
    tr = Trainer(cfg)
    streams = RankStreams(tr)
    task_stream = torch.Generator().manual_seed(cfg.seed + distributed.TASK_STREAM_OFFSET)
    if ck is not None:
        resume.restore(tr, ck, tmp / "unused.pt")
        for r, b in enumerate(streams.batchers):
            b.load_state_dict(ck["rng"]["ranks"][r]["batcher"])
        task_stream.set_state(ck["rng"]["tasks"])
    tr.batcher = streams
    if cfg.task_order == "random":  # (round-robin: the trainer's own order, the same for one process and the ranks)
        tr.sample_tasks = lambda: distributed.draw_tasks(task_stream, len(tr.tasks), WORLD * K)
    out = {}
    while tr.step < steps:
        if tr.step > 0 and tr.step % UPDATE_AT == 0:
            tr.mask_updater()
        loss = float(tr.train_step(tr.sample_tasks()))
        out[tr.step] = loss
    return out, tr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-rank runs: 30 steps, and 20 steps (its last checkpoint at 20, then an evaluation of
    one episode per task, split over the ranks); the data folder."""
    base = tmp_path_factory.mktemp("dist")
    data = write_ours(base / "data", TASKS, episodes=4, length=30)
    full, part = base / "full", base / "part"
    t = time.perf_counter()
    proc = torchrun(*ARGS, *PER_RANK, "--data", str(data), "--steps", "30", out=full)
    seconds = time.perf_counter() - t
    assert "distributed: 2 ranks on 1 node(s) (gloo)" in proc.stdout
    proc = torchrun(*ARGS, *PER_RANK, "--data", str(data), "--steps", "20", "--eval-episodes", "1", out=part)
    res = json.loads((part / "results.json").read_text())  # rank 0 evaluated reach and door-open, rank 1 push
    assert list(res["tasks"]) == list(TASKS) and res["mean_success"] == sum(r["success"] for r in res["tasks"].values()) / 3
    assert "door-open-v3" in proc.stdout and "eval_mean_success" in (part / "metrics.jsonl").read_text().splitlines()[-1]
    return {"data": data, "full": full, "part": part, "seconds": seconds}


def test_two_ranks_equal_one_process_with_the_same_global_batches(runs, tmp_path):
    got = losses(runs["full"])
    want, tr = reference(runs["data"], tmp_path)
    assert sorted(got) == list(range(1, 31))
    diff = max(abs(got[s] - want[s]) for s in want)
    print(f"2 ranks vs one process: max loss difference {diff:.2e} over 30 steps ({runs['seconds']:.0f} s for the 2-rank run)")
    assert diff <= 1e-5, (got, want)
    ck = final(runs["full"])
    assert ck["world_size"] == WORLD and ck["step"] == 30 and len(ck["rng"]["ranks"]) == WORLD
    ref_masks = tr.task_masks.state(tr.tasks)
    assert masks_equal(ck["masks"], ref_masks)
    assert not masks_equal(ck["masks"], final(runs["part"])["masks"])  # the update at step 25 did change the masks
    for n, p in tr.model.state_dict().items():
        torch.testing.assert_close(ck["model"][n], p, rtol=1e-5, atol=1e-6, msg=n)
    recs = [json.loads(line) for line in (runs["full"] / "metrics.jsonl").read_text().splitlines()]
    assert sum("harmony_score" in r for r in recs) == 1


def test_preset_reference_with_two_ranks_equals_one_process(tmp_path):
    """--preset reference under torchrun: the ranks' W*k tasks of step t are t*W*k, ... mod T
    (round-robin over the global batch), the clip norm sums every rank's gradient before masking,
    every parameter decays, and the Bernoulli ERK masks and the reference initialisation are rank
    0's; it equals one process training the same global batches."""
    data = write_ours(tmp_path / "data", TASKS, episodes=4, length=30)
    out = tmp_path / "ranks"
    torchrun("--preset", "reference", *ARGS, *PER_RANK, "--data", str(data), "--steps", "30", out=out)
    got = losses(out)
    want, tr = reference(data, tmp_path / "one", extra=("--preset", "reference"))
    assert tr.cfg.clip_scope == "unmasked" and tr.cfg.task_order == "round-robin" and tr.cfg.masks.erk_draw == "bernoulli"
    assert sorted(got) == list(range(1, 31))
    diff = max(abs(got[s] - want[s]) for s in want)
    assert diff <= 1e-5, (got, want)
    ck = final(out)
    assert ck["config"]["clip_scope"] == "unmasked" and masks_equal(ck["masks"], tr.task_masks.state(tr.tasks))
    for n, p in tr.model.state_dict().items():
        torch.testing.assert_close(ck["model"][n], p, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.slow
def test_resume_with_two_ranks_ends_as_the_uninterrupted_run(runs, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["part"], resumed)
    proc = torchrun(*ARGS, *PER_RANK, "--data", str(runs["data"]), "--steps", "30", "--resume", "--allow-changed", "steps", "eval_episodes", out=resumed)
    assert "resumed from" in proc.stdout and "reseeded" not in proc.stdout
    a, b = final(runs["full"]), final(resumed)
    for n in a["model"]:
        assert torch.equal(a["model"][n], b["model"][n]), n
    assert masks_equal(a["masks"], b["masks"])
    for r in range(WORLD):
        assert torch.equal(a["rng"]["ranks"][r]["batcher"]["generator"], b["rng"]["ranks"][r]["batcher"]["generator"])
    assert losses(runs["full"]) == losses(resumed)


def test_two_rank_checkpoint_continues_in_one_process(runs, tmp_path):
    """With the ranks' data streams from the checkpoint, one process continues exactly as the 2
    ranks did; the CLI reseeds them (another world size) and keeps the algorithm and state."""
    ck = final(runs["part"])
    want = losses(runs["full"])
    got, tr = reference(runs["data"], tmp_path, ck=ck)
    assert sorted(got) == list(range(21, 31))
    assert max(abs(got[s] - want[s]) for s in got) <= 1e-5
    assert masks_equal(tr.task_masks.state(tr.tasks), final(runs["full"])["masks"])

    # the CLI in one process: the per-rank flags would halve the global batch
    out = tmp_path / "one"
    shutil.copytree(runs["part"], out)
    proc = single(*ARGS, *PER_RANK, "--data", str(runs["data"]), "--steps", "30", "--resume", "--allow-changed", "steps", "eval_episodes", out=out,
                  check=False)
    assert proc.returncode == 2 and "batch_size (8 -> 4)" in proc.stderr and "tasks_per_batch (2 -> 1)" in proc.stderr, proc.stderr
    proc = single(*ARGS, *GLOBAL, "--data", str(runs["data"]), "--steps", "30", "--resume", "--allow-changed", "steps", "eval_episodes", out=out)
    line = [x for x in proc.stdout.splitlines() if "reseeded" in x]
    assert len(line) == 1 and "written by 2 rank(s), this run has 1" in line[0], proc.stdout
    one, two = losses(out), losses(runs["full"])
    assert [one[s] for s in range(1, 21)] == [two[s] for s in range(1, 21)]  # metric lines up to the checkpoint kept
    late_one, late_two = sum(one[s] for s in range(21, 31)) / 10, sum(two[s] for s in range(21, 31)) / 10
    print(f"steps 21-30, mean loss: 2 ranks {late_two:.4f}, one process after the reseed {late_one:.4f}")
    assert abs(late_one - late_two) <= 0.15 * late_two
    c1, c2, c0 = final(out), final(runs["full"]), ck
    assert c1["world_size"] == 1 and c1["step"] == 30
    # the same mask update at step 25 (alpha from the same schedule) on other batches: each task's
    # mask moved away from the checkpoint's by the same number of weights as in the 2-rank run
    before, *after = (TaskMasks.from_state(c["masks"], list(TASKS)).masks for c in (c0, c1, c2))
    for i, t in enumerate(TASKS):
        moved = [sum(int((a[n][i] != m[i]).sum()) for n, m in before.items()) for a in after]
        assert moved[0] == moved[1] > 0, (t, moved)


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def _rank_pid(launcher: int, rank: int) -> int:
    for pid in _children(launcher):
        try:
            env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if env.get(b"RANK") == str(rank).encode():
            return pid
    raise AssertionError(f"no rank {rank} among the children of {launcher}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks' processes through /proc (Linux)")
@pytest.mark.parametrize("how", ["killed", pytest.param("hung", marks=pytest.mark.slow)])
def test_a_rank_that_dies_or_hangs_stops_the_run(runs, tmp_path, how):
    """Rank 1 SIGKILLed: rank 0's next collective (whichever it is) fails at once (connection
    reset), long before --dist-timeout (60 s); it prints one line and exits, and torchrun stops.
    Rank 1 stopped (SIGSTOP, a hang): rank 0 gives up after --dist-timeout (10 s), and torchrun
    SIGKILLs the hung rank after its 30 s grace period."""
    timeout = 60 if how == "killed" else 10
    out = tmp_path / how
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD), "-m", "harmodt.train", *ARGS,
           *PER_RANK, "--data", str(runs["data"]), "--steps", "100000", "--dist-timeout", str(timeout), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.2)
        victim = _rank_pid(proc.pid, 1)
        t = time.monotonic()
        os.kill(victim, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        text, _ = proc.communicate(timeout=timeout + 150)
        seconds = time.monotonic() - t
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print(f"rank 1 {how}: exit {proc.returncode} after {seconds:.1f} s")
    assert proc.returncode != 0
    # the collective that fails depends on where rank 0 was: a step's all_reduce, or a checkpoint's all_gather_object
    line = rf"error: rank 0 of 2: \w+ failed: another rank stopped, crashed or did not answer within --dist-timeout {timeout} s"
    assert len(re.findall(line, text)) == 1, text[-3000:]  # printed once: where the collective failed, not again by the CLI
    if how == "killed":  # found by the broken connection, not by the timeout
        assert seconds < timeout and "Timed out" not in text, text[-3000:]
        assert "Signal 9 (SIGKILL)" in text  # torchrun's summary names the rank that died
    else:
        assert "Timed out" in text and timeout <= seconds < timeout + 30 + 60


def test_a_failed_collective_prints_its_line_at_once(capsys):
    """torchrun may SIGTERM a rank as soon as another has died, so the rank whose collective failed
    prints its one line where the collective fails, and the CLI does not print it again."""
    rank = distributed.Distributed(0, 2, 0, "gloo", 10, torch.device("cpu"))

    def reset(*args, **kwargs):
        raise RuntimeError("Read error [127.0.0.1]:6040: Connection reset by peer")

    with pytest.raises(distributed.DistributedError) as info:
        rank._run("all_reduce", reset)
    err = capsys.readouterr().err
    assert err == f"error: {info.value}\n" and info.value.reported
    assert "rank 0 of 2: all_reduce failed" in err and "Connection reset by peer" in err
