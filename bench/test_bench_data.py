"""Offline data generation (``harmodt.data.generate``: Meta-World v3's scripted experts with the
curriculum, 500-step episodes plus 2 prompt episodes per task) in parallel over processes,
``--workers W`` against one worker, on the CPU (the simulator runs there on any machine).

Each round generates the same tasks afresh into a new folder with each worker count, in
alternating order; the figure is task-episodes per second (tasks x curriculum episodes / wall
time, the prompt episodes and the process start-up included) and the scaling over one worker.
"""

from __future__ import annotations

import itertools
import os

import pytest

from .common import call_runner, figure, interleave, paired_ratio, record, rounds, time_figure

DATA_TASKS = ["reach-v3", "push-v3", "door-open-v3", "drawer-close-v3"]
DATA_EPISODES = int(os.environ.get("HARMODT_BENCH_DATA_EPISODES", "2"))


def data_workers() -> list[int]:
    """One worker, and one per core (at most one per task), when there is more than one core."""
    cores = min(os.cpu_count() or 1, len(DATA_TASKS))
    return [1] if cores == 1 else [1, cores]


def test_generate_workers(benchmark, tmp_path):
    """Task-episodes/s of ``generate(DATA_TASKS, DATA_EPISODES, workers=W)`` for W = 1 and W =
    one per core (up to the 4 tasks), interleaved round by round. Target: W workers >= 0.8 W x
    one worker's rate (the tasks split evenly over the workers)."""
    from harmodt.data import generate

    counter = itertools.count()

    def gen(w):
        return lambda: generate(DATA_TASKS, DATA_EPISODES, str(tmp_path / f"w{w}-{next(counter)}"), seed=0, workers=w,
                                progress=False)

    workers = data_workers()
    if len(workers) == 1:
        pytest.skip("one core: nothing to compare one worker with")
    names = {w: f"workers={w}" for w in workers}
    # the most workers first: pytest-benchmark times it
    variants = {names[w]: call_runner(gen(w), "cpu") for w in reversed(workers)}
    times = interleave(benchmark, variants, rounds(1), calls=1, warmup=0)
    task_episodes = len(DATA_TASKS) * DATA_EPISODES
    rate = {k: [task_episodes / (ms / 1e3) for ms in v] for k, v in times.items()}
    figs = [time_figure(f"generate {len(DATA_TASKS)} tasks x {DATA_EPISODES} episodes, {k}", times, k) for k in times]
    figs += [time_figure(f"task-episodes/s, {k}", rate, k, unit="task-episodes/s") for k in rate]
    w = workers[-1]
    derived = {"scaling": paired_ratio(times, names[1], names[w])}
    figs.append(figure(f"{w} workers over one worker (task-episodes/s)", derived["scaling"], "x",
                       target=(">=", 0.8 * w)))
    record(benchmark, "parallel data generation", "cpu", times, figs, derived,
           {"tasks": DATA_TASKS, "episodes": DATA_EPISODES, "workers": workers, "cores": os.cpu_count()})
