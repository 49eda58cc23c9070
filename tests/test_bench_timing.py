"""bench/common.py's GPU-time helpers on a CPU, where they fall back to wall time: the report keeps
the shape it has on a GPU (no timing is asserted)."""

from bench import common


class _FakeBenchmark:
    """pytest-benchmark's ``pedantic`` as ``interleave`` uses it: setup then target, per round."""

    def pedantic(self, target, setup, rounds, warmup_rounds, iterations):
        for _ in range(rounds):
            setup()
            target()


def test_timed_variants_record_one_gpu_time_per_round_and_not_the_warmup():
    calls = {"a": 0, "b": 0}

    def fn(k):
        def run():
            calls[k] += 1
        return run

    variants = {"a": common.Timed(fn("a"), "cpu"), "b": common.Timed(fn("b"), "cpu")}
    times = common.interleave(_FakeBenchmark(), variants, n_rounds=3, calls=2, warmup=4)
    assert calls == {"a": 4 + 3 * 2, "b": 4 + 3 * 2}
    gpu = common.gpu_times(variants)
    assert set(gpu) == {"a", "b"} and all(len(v) == 3 for v in gpu.values())
    assert all(len(v) == 3 for v in times.values())
    assert variants["a"].clock == "wall"
    assert gpu["a"] == times["a"]  # on a CPU the GPU column is the wall time itself


def test_kernel_time_on_cpu_is_wall_time():
    n = []
    k = common.kernel_time(lambda: n.append(1), "cpu", calls=5)
    assert len(n) == 5
    assert set(k) == {"ms", "launches", "clock", "calls"}
    assert k["clock"] == "wall" and k["launches"] is None and k["calls"] == 5 and k["ms"] >= 0


def test_gpu_figures_rows():
    v = common.Timed(lambda: None, "cpu")
    v(1)
    v(1)
    rows = common.gpu_figures("op", {"fused": v, "plain": lambda n: 0.0}, {"fused": {"ms": 1.5, "clock": "wall"}})
    assert [r["label"] for r in rows] == ["op, fused, GPU time (wall)", "op, fused, kernel time (wall)"]
    assert rows[0]["unit"] == "ms" and rows[0]["min"] <= rows[0]["value"] <= rows[0]["max"]
    assert rows[1]["value"] == 1.5
