"""Data-parallel training over ``torch.distributed``, started by ``torchrun``.

``torchrun --nproc_per_node W -m harmodt.train ...`` runs W ranks that train one model. Each step
every rank trains ``--tasks-per-batch k`` tasks on ``--batch-size b`` rows of its own; the ranks'
gradients are summed with one all-reduce of a flat buffer, each rank's loss being its rows'
squared errors divided by the valid-element count of *all* ranks' rows, so the reduced gradient is
the gradient of the mean over the global batch (ranks with different padding stay exact), and
clipping sees the global gradient norm. The optimizer then steps every weight through the union of
the W*k tasks' masks. W ranks x k tasks is therefore one process with ``--tasks-per-batch W*k`` and
``--batch-size W*b`` (rows spread evenly over the tasks), up to float summation order.

The mask update (Algorithm 2) computes task i's gradients on rank ``i mod W``; the zero-filled
``[T, P]`` rows are summed with one all-reduce and every rank selects the same masks; a checksum
of the masks and weights is compared across ranks after every update (:class:`DistributedError`
when they differ).

RNG streams (seed = ``--seed``, W ranks):

- model initialisation and ERK masks: ``seed`` on every rank (rank 0's weights and masks are also
  broadcast once at the start);
- task stream: ``seed + TASK_STREAM_OFFSET``, the same on every rank: each step draws W*k task ids
  (a permutation of the tasks, continued with a fresh permutation when W*k exceeds the task count)
  and rank r trains ids ``[r*k, (r+1)*k)``, so the W*k tasks are distinct as with one process;
- data stream of rank r (the rows of its batches and of its mask-update batches): ``seed + r``;
- dropout of rank r (torch's global generator): ``seed + r``, set after initialisation;
- evaluation: ``seed + 12345`` on every rank, each rank over its share of the tasks.

A single process (no torchrun, or W = 1) keeps the plain streams: tasks and rows from one
generator seeded with ``seed``. Checkpoints hold every rank's data and dropout stream and the task
stream; resuming with the same W restores them, with another W each rank's data and dropout
stream and the task stream are reseeded from (seed, step, rank), which is announced in one line.

Every rank loads ``--data`` itself (the ranks do not generate data into the cache); rank 0 alone
prints (:func:`rank_output`), writes the run's files and reads a checkpoint to resume, which it sends to the others.

Failures: ``init_process_group(timeout=--dist-timeout)`` bounds every Gloo collective (NCCL's
watchdog aborts a collective after the same timeout); a collective that fails or times out is a
:class:`DistributedError` naming the rank and the operation (CLI exit 3), and torchrun stops the
other ranks when one exits or dies. The error's line is printed where the collective fails, since
torchrun may terminate the rank before the error reaches the CLI.
"""

from __future__ import annotations

import hashlib
import os
import sys
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from .signals import StopRequest

TASK_STREAM_OFFSET = 1_000_003
EXIT_CODE = 3  # what `python -m harmodt.train` exits with on a DistributedError


class DistributedError(RuntimeError):
    """A collective failed or timed out, or the ranks disagree; printed as one line by the CLI.
    ``reported``: the line is already on stderr (a failed collective prints it where it fails)."""

    reported = False


def derived_seed(*parts) -> int:
    """A 63-bit seed from ``parts`` (sha256 of their text): the reseeded streams of a resume with
    another world size."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def draw_tasks(generator: torch.Generator, n_tasks: int, count: int) -> list[int]:
    """``count`` task ids from ``generator``: a permutation of the ``n_tasks`` tasks, continued
    with fresh permutations while more are needed."""
    ids: list[int] = []
    while len(ids) < count:
        ids += torch.randperm(n_tasks, generator=generator).tolist()
    return ids[:count]


def round_robin(step: int, n_tasks: int, count: int) -> list[int]:
    """``--task-order round-robin``: the ``count`` task ids of ``step``, ``step * count, ...,
    step * count + count - 1`` mod ``n_tasks`` (count 1: task ``step mod n_tasks``)."""
    return [(step * count + j) % n_tasks for j in range(count)]


def checksum(tensors: list[torch.Tensor]) -> int:
    """A 63-bit hash of the bytes of ``tensors`` (on the CPU), equal only for identical contents."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return int.from_bytes(h.digest()[:8], "little") >> 1


class Single:
    """One process: every collective is the identity, so the trainer's code path stays one. The
    trainer and its step rule and mask updater make every call; what differs with several ranks
    (:class:`Distributed`) is here alone: the task draws, the loss divisor, the sums, the checks."""

    rank = 0
    world_size = 1
    local_rank = 0
    backend = None
    timeout_s = None
    active = False  # True with several ranks
    is_main = True  # rank 0: the only rank that writes files and prints
    may_generate_data = True  # missing training data may be generated into the cache (one process only)
    task_stream = None  # several ranks: the generator of the task draws every rank shares

    def share_initial_state(self, tensors: list[torch.Tensor], seed: int) -> None:
        """Make the ranks start alike (rank 0's ``tensors``) and seed the shared task stream and this
        rank's dropout stream (one process: nothing to do)."""

    def stop_request(self) -> StopRequest:
        """The run's stop request (SIGINT/SIGTERM), agreed by the ranks when there are several."""
        return StopRequest(agreed_by_ranks=self.active)

    def tasks_of_step(self, step: int, n_tasks: int, count: int, order: str, generator: torch.Generator) -> list[int]:
        """This rank's ``count`` task ids of ``step`` (``--tasks-per-batch``, ``--task-order``): one
        process draws them from ``generator`` (the data stream), or takes ``round_robin``."""
        if order == "round-robin":
            return round_robin(step, n_tasks, min(count, n_tasks))
        if count == 1:
            return torch.randint(n_tasks, (1,), generator=generator).tolist()  # (a host generator: nothing to wait for)
        return torch.randperm(n_tasks, generator=generator)[: min(count, n_tasks)].tolist()

    def step_tasks_of_all(self, task_ids: list[int]) -> list[int]:
        """The tasks every rank trains at this step, given this rank's (:meth:`tasks_of_step`)."""
        return task_ids

    def sum_tensors(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """``tensors`` summed over the ranks (one all-reduce of one flat buffer)."""
        return tensors

    def gather_evaluation(self, result: dict, tasks: list[str]) -> dict:
        """One evaluation of ``tasks`` from every rank's ``result`` over its :meth:`shard` of them."""
        return result

    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on, given the resolved ``--device``."""
        return device

    def describe(self) -> str:
        return ""

    def shard(self, items: list) -> list:
        """This rank's share of ``items`` (item i goes to rank i mod W)."""
        return list(items)

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def broadcast_tensors_(self, tensors: list[torch.Tensor]) -> None:
        pass

    def all_gather_object(self, obj) -> list:
        return [obj]

    def broadcast_object(self, obj):
        return obj

    def loss_count(self, valid: torch.Tensor, stop) -> torch.Tensor | None:
        """The divisor of the step's loss: None, the loss's own count of ``valid`` elements."""
        return None

    def reduce_gradients(self, params: list, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def check_identical(self, what: dict[str, list[torch.Tensor]]) -> None:
        pass


class Distributed(Single):
    """This process's rank of a ``torch.distributed`` process group (see the module docstring)."""

    active = True
    may_generate_data = False  # the ranks load --data (or what the cache holds) and generate nothing

    def __init__(self, rank: int, world_size: int, local_rank: int, backend: str, timeout_s: float,
                 device: torch.device):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.backend, self.timeout_s, self._device = backend, timeout_s, device
        self.is_main = rank == 0
        self.step_tasks: list[int] = []  # every rank's tasks of the current step

    def share_initial_state(self, tensors: list[torch.Tensor], seed: int) -> None:
        self.broadcast_tensors_(tensors)
        self.task_stream = torch.Generator().manual_seed(seed + TASK_STREAM_OFFSET)
        torch.manual_seed(seed + self.rank)  # this rank's dropout stream

    def tasks_of_step(self, step: int, n_tasks: int, count: int, order: str, generator: torch.Generator) -> list[int]:
        """Ids ``[r*count, (r+1)*count)`` of the ``world_size * count`` drawn from the shared task
        stream (or ``round_robin`` over as many), all of which :meth:`step_tasks_of_all` returns."""
        total = count * self.world_size
        self.step_tasks = (round_robin(step, n_tasks, total) if order == "round-robin"
                           else draw_tasks(self.task_stream, n_tasks, total))
        return self.step_tasks[self.rank * count : (self.rank + 1) * count]

    def step_tasks_of_all(self, task_ids: list[int]) -> list[int]:
        return self.step_tasks

    def sum_tensors(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        flat = self.all_reduce_sum_(torch.cat([t.reshape(-1) for t in tensors]))
        return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def gather_evaluation(self, result: dict, tasks: list[str]) -> dict:
        return merge_evaluations(self.all_gather_object(result), tasks)

    def device(self, device: torch.device) -> torch.device:
        return self._device

    def describe(self) -> str:
        nodes = os.environ.get("GROUP_WORLD_SIZE", "1")
        return (f"[harmodt] distributed: {self.world_size} ranks on {nodes} node(s) ({self.backend}), "
                f"rank 0 on {self._device}; collectives time out after {self.timeout_s:g} s")

    def _fail(self, op: str, exc: BaseException) -> DistributedError:
        """The error of a failed collective, its line already printed: another rank is gone, so
        torchrun may terminate this one at any moment, before the error reaches the CLI."""
        from ..checkpoint import one_line

        err = DistributedError(f"rank {self.rank} of {self.world_size}: {op} failed: another rank stopped, crashed or "
                               f"did not answer within --dist-timeout {self.timeout_s:g} s ({one_line(exc, 240)})")
        print(f"error: {err}", file=sys.stderr, flush=True)
        err.reported = True
        return err

    def _run(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DistributedError:
            raise
        except Exception as exc:  # noqa: BLE001 - Gloo/NCCL errors, timeouts, closed connections
            raise self._fail(what, exc) from None

    def shard(self, items: list) -> list:
        return list(items)[self.rank :: self.world_size]

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        self._run("all_reduce", dist.all_reduce, t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_tensors_(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite ``tensors`` with rank 0's (one broadcast per tensor; bool tensors travel as uint8)."""
        for t in tensors:
            buf = t.view(torch.uint8) if t.dtype == torch.bool else t
            self._run("broadcast", dist.broadcast, buf, src=0)

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        self._run("all_gather_object", dist.all_gather_object, out, obj)
        return out

    def broadcast_object(self, obj):
        box = [obj]
        self._run("broadcast_object", dist.broadcast_object_list, box, src=0)
        return box[0]

    def loss_count(self, valid: torch.Tensor, stop) -> torch.Tensor:
        """The valid elements of every rank's rows (``valid``: this rank's mask), the divisor of the
        step's loss, with one all-reduce that also agrees on the stop requests: ``stop.agreed``
        (a :class:`harmodt.run.signals.StopRequest`) becomes the number of ranks that asked."""
        agreed = torch.stack([valid.sum().double(), torch.tensor(float(stop.asked), device=valid.device).double()])
        self.all_reduce_sum_(agreed)
        stop.agreed = agreed[1]
        return agreed[0].float()

    def reduce_gradients(self, params: list, loss: torch.Tensor) -> torch.Tensor:
        """Sum every parameter's gradient and the loss over the ranks with one all-reduce of one
        flat buffer (a gradient missing on some ranks counts as zero there; one missing on every
        rank stays None). Returns the summed loss."""
        grads = [p.grad for p in params]
        ref = next(g for g in grads if g is not None)
        parts = [(g if g is not None else torch.zeros_like(p)).reshape(-1).to(ref.dtype) for g, p in zip(grads, params)]
        has = torch.tensor([g is not None for g in grads], dtype=ref.dtype, device=ref.device)
        flat = torch.cat(parts + [has, loss.detach().reshape(1).to(ref.dtype)])
        self.all_reduce_sum_(flat)
        off = 0
        for p, part in zip(params, parts):
            n = part.numel()
            p.grad = flat[off : off + n].view_as(p).to(p.dtype)
            off += n
        if any(g is None for g in grads):  # missing on every rank = missing here and summed to zero
            for p, h in zip(params, flat[off : off + len(params)].tolist()):
                if h == 0:
                    p.grad = None
        return flat[-1].to(loss.dtype)

    def check_identical(self, what: dict[str, list[torch.Tensor]]) -> None:
        """All-gather a checksum of each entry's tensors; DistributedError naming the entries
        whose checksums differ between ranks."""
        mine = {k: checksum(v) for k, v in what.items()}
        allr = self.all_gather_object(mine)
        bad = [k for k in what if len({r[k] for r in allr}) > 1]
        if bad:
            detail = "; ".join(f"{k}: " + ", ".join(f"rank {i} {r[k]:016x}" for i, r in enumerate(allr)) for k in bad)
            raise DistributedError(f"rank {self.rank} of {self.world_size}: the ranks' "
                                   f"{' and '.join(bad)} differ ({detail})")


def init(device: str, timeout_s: float) -> Single:
    """The process group of this torchrun worker (from RANK, WORLD_SIZE, LOCAL_RANK and the
    rendezvous variables torchrun sets), or :class:`Single` outside torchrun or with WORLD_SIZE 1.
    ``device``: ``--device``; with CUDA every rank takes ``cuda:LOCAL_RANK`` (NCCL), otherwise the
    CPU (Gloo)."""
    from ..config import ConfigError, resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Single()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if dev.index is not None:
            raise ConfigError(f"--device {device}: under torchrun every rank takes "
                              "cuda:LOCAL_RANK; pass --device cuda or auto")
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local}: only {torch.cuda.device_count()} CUDA device(s) on this node")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        except Exception as exc:  # noqa: BLE001
            from ..checkpoint import one_line

            raise DistributedError(f"rank {rank} of {world}: could not join the process group within --dist-timeout "
                                   f"{timeout_s:g} s ({one_line(exc, 240)})") from None
    return Distributed(rank, world, local, backend, timeout_s, dev)


def comparable_config(ck: dict, world_size: int) -> dict:
    """The checkpoint's config as the flags of a run with ``world_size`` ranks must give it: with
    another world size the per-rank ``batch_size`` and ``tasks_per_batch`` that keep the
    checkpoint's global batch (rows and tasks over all ranks). ConfigError when that global batch
    does not split evenly over ``world_size`` ranks."""
    from ..config import ConfigError

    saved = dict(ck["config"])
    old = int(ck.get("world_size", 1))
    if old == world_size:
        return saved
    rows, tasks = saved.get("batch_size", 8) * old, saved.get("tasks_per_batch", 1) * old
    if rows % world_size or tasks % world_size:
        raise ConfigError(f"--resume: the checkpoint's global batch ({old} ranks x {saved.get('batch_size')} rows x "
                          f"{saved.get('tasks_per_batch')} tasks = {rows} rows over {tasks} tasks) does not split over "
                          f"{world_size} ranks; resume with a world size that divides {rows} and {tasks}")
    saved["batch_size"], saved["tasks_per_batch"] = rows // world_size, tasks // world_size
    return saved


def merge_evaluations(parts: list[dict], tasks: list[str]) -> dict:
    """One evaluation result (harmodt.evaluate's layout) from the ranks' results over their
    shares of ``tasks``: per-task results in ``tasks`` order, the mean success over all tasks,
    environment steps summed and the seconds of the slowest rank."""
    import numpy as np

    per_task = {}
    for part in parts:
        per_task.update(part["tasks"])
    per_task = {t: per_task[t] for t in tasks}
    first = next(p for p in parts if p["tasks"])
    env_steps, seconds = sum(p["env_steps"] for p in parts), max(p["seconds"] for p in parts)
    return {**first, "tasks": per_task, "mean_success": float(np.mean([v["success"] for v in per_task.values()])),
            "env_steps": env_steps, "seconds": seconds, "env_steps_per_s": env_steps / max(seconds, 1e-9)}


@contextmanager
def rank_output(rank: Single):
    """While inside, a rank other than 0 prints nothing (its stdout goes to the null device; stderr
    stays); stdout is back on leaving."""
    if rank.is_main:
        yield
        return
    saved = sys.stdout
    with open(os.devnull, "w") as null:
        sys.stdout = null
        try:
            yield
        finally:
            sys.stdout = saved


def shutdown() -> None:
    """Leave the process group (after a run that ended normally). A barrier first, so that no rank
    tears down its Gloo/NCCL threads while another still talks to it at exit."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a rank already gone: leaving is all that is left to do
            pass
        dist.destroy_process_group()
