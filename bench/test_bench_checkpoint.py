"""What a checkpoint costs at MT50 and the paper's size (Table 6: 6 x 256 x 8 heads, HarmoDT-F), on
the CPU: the write time of ``OUT/checkpoint.pt`` (``harmodt.run.resume.save``: the state gathered
on the host, ``torch.save`` into memory, an atomic write to disk, fsync included) and its size, with
the task masks packed, 1 bit per weight (``TaskMasks.state``), against the same checkpoint with the
masks one byte per weight, as they were stored before (``{task: {weight: bool [N, K]}}``),
interleaved. The figures that follow from them: masks MB (target <= 32 MB), and what
``--checkpoint-every`` N costs over a 1e6-step run: 1e6 / N writes, their seconds and the data
written.
"""

from __future__ import annotations

from .common import call_runner, figure, interleave, make_trainer, record, rounds, time_figure

STEPS = 1_000_000
EVERY = 1000  # --checkpoint-every's default


def test_checkpoint_mt50(benchmark, tmp_path):
    from harmodt import checkpoint
    from harmodt.run import resume
    from harmodt.tasks import MT50

    tr = make_trainer("harmodt-f", "cpu", True, "fp32", tasks=MT50, out=str(tmp_path / "run"))
    packed, byte = tmp_path / "packed.pt", tmp_path / "bytes.pt"

    def write_bytes():  # the earlier layout: the masks as bool tensors, one byte per weight and task
        ck = resume.state(tr)
        ck["masks"] = {t: {n: m[i] for n, m in tr.task_masks.masks.items()} for i, t in enumerate(tr.tasks)}
        checkpoint.save(ck, byte)

    variants = {"packed masks": call_runner(lambda: resume.save(tr, packed), "cpu"),
                "byte masks": call_runner(write_bytes, "cpu")}
    times = interleave(benchmark, variants, rounds(5), calls=1, warmup=1)
    size = {"packed masks": packed.stat().st_size / 1e6, "byte masks": byte.stat().st_size / 1e6}
    masks_mb = sum(w.numel() * w.element_size() for w in tr.task_masks.state(tr.tasks)["words"].values()) / 1e6
    byte_masks_mb = sum(m.numel() for m in tr.task_masks.masks.values()) / 1e6
    write_s = sorted(times["packed masks"])[len(times["packed masks"]) // 2] / 1e3
    n_writes = STEPS // EVERY
    figs = [time_figure("checkpoint write, MT50, masks packed", times, "packed masks"),
            time_figure("checkpoint write, MT50, masks one byte per weight", times, "byte masks"),
            figure("checkpoint size, masks packed", size["packed masks"], "MB"),
            figure("checkpoint size, masks one byte per weight", size["byte masks"], "MB"),
            figure("task masks in the checkpoint, packed", masks_mb, "MB", target=("<=", 32)),
            figure("task masks, one byte per weight", byte_masks_mb, "MB"),
            figure(f"checkpoint writes of 1e6 steps at --checkpoint-every {EVERY}", n_writes * write_s, "s"),
            figure(f"data written over 1e6 steps at --checkpoint-every {EVERY}",
                   n_writes * size["packed masks"] / 1e3, "GB")]
    record(benchmark, "checkpoint at MT50, paper size", "cpu", times, figs,
           {"size_mb": size, "masks_mb": masks_mb, "byte_masks_mb": byte_masks_mb, "write_s": write_s,
            "seconds_per_1e6_steps": n_writes * write_s, "gb_per_1e6_steps": n_writes * size["packed masks"] / 1e3},
           {"tasks": 50, "masked_weights": sum(m[0].numel() for m in tr.task_masks.masks.values()),
            "checkpoint_every": EVERY})
