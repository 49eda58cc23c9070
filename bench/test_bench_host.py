"""The host's work per graphed training step outside the graph (harmodt/graphed_step.py), at MT50
and the paper's size (K = 20, K* = 5, batch 8, one task per step), on the CPU: the step's task
(``Trainer.sample_tasks``), its batch drawn and gathered into the graph's static buffers
(``PromptDTBatcher.sample_into``) and the per-step values (``StepValues.set``), interleaved with
the eager step's batch (``PromptDTBatcher.sample``: new tensors). Target: <= 0.3 ms per step. On a
GPU the same calls queue the gathers (one copy of the row indices to the device, a gather and a
multiply per field), so the host's share is at most this.
"""

from __future__ import annotations

from .common import call_runner, figure, interleave, make_trainer, record, rounds, time_figure


def test_host_work_per_graphed_step(benchmark):
    from harmodt.tasks import MT50

    tr = make_trainer("harmodt-f", "cpu", True, "fp32", tasks=MT50, cuda_graph="on")
    tr.train_step(tr.sample_tasks())  # the first step makes the static buffers
    g = tr.graphed

    def graphed_host_work():
        g.values.set(tr.step, [grp["lr"] for grp in tr.opt.param_groups])
        tr.batcher.sample_into(tr.sample_tasks(), g.batch)

    def eager_batch():
        tr.batcher.sample(tr.sample_tasks(), tr.cfg.batch_size)

    variants = {"graphed": call_runner(graphed_host_work, "cpu"), "eager batch": call_runner(eager_batch, "cpu")}
    times = interleave(benchmark, variants, rounds(20), calls=200, warmup=50)
    figs = [time_figure("host work per graphed step outside the graph, MT50", times, "graphed", target=("<=", 0.3)),
            time_figure("eager step's batch (sample: new tensors), MT50", times, "eager batch")]
    record(benchmark, "host work per graphed step, MT50, paper size", "cpu", times, figs, {},
           {"tasks": 50, "batch_size": tr.cfg.batch_size, "context_len": tr.cfg.model.context_len,
            "prompt_len": tr.cfg.model.prompt_len})
