"""`python -m harmodt.train`: train HarmoDT (R/M/F), Prompt-DT, MTDT, or Prompt-DT with PCGrad or
CAGrad gradient surgery, on offline Meta-World data.

Algorithm 1: every step samples one task (``--tasks-per-batch 1``), a batch of its data, and
updates theta with ``grad L_i(theta * M_i) * M_i``; every ``t_m`` steps Algorithm 2 updates the
masks (HarmoDT-M/F; HarmoDT-R keeps its random ERK masks). Model, masks, optimizer state and
batches live on ``--device``; the kernels of each op are chosen once (``kernels.select_backends``).
Writes into ``--out``: config.json, metrics.jsonl, TensorBoard events, checkpoint.pt (atomic,
device-free, safe to load with ``weights_only=True``; resumable), results.json.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

import kernels

from . import baselines, checkpoint, distributed
from .config import (RESUME_CHANGEABLE, RESUME_IGNORED, SURGERY_METHODS, ConfigError, TrainConfig, flat_keys, parse_args, resolve_device,
                     to_dict, upgrade_saved_config)
from .data.batches import PromptDTBatcher
from .evaluate import result_entry
from .masks import TaskMasks, alpha_schedule, harmony_score
from .model import MaskContext, build_model, resolve_conditioning
from .optim import MaskedAdamW, clip_coefficient
from .runtime import bf16_matmul_note, keep_freed_memory
from .tasks import parse_tasks


def cache_dir() -> Path:
    return Path(os.environ.get("HARMODT_CACHE", Path.home() / ".cache" / "harmodt"))


def _current_cache(path: Path) -> bool:
    """A cached data folder that is complete and written by the current generator (an older
    generator's folder is generated again)."""
    from .data.formats import generator_version
    from .data.generator import GENERATOR_VERSION

    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return generator_version(manifest) == GENERATOR_VERSION


def load_training_data(cfg: TrainConfig, tasks: list[str], may_generate: bool = True) -> dict:
    """Load ``--data``, or generate our Meta-World data into the cache when no folder is given
    (``may_generate=False``, as under torchrun: ConfigError instead when the cache lacks it)."""
    from .data import generate, load_dataset

    path = cfg.data
    if not path:
        key = f"{'_'.join(t.replace('-v3', '') for t in tasks)}_e{cfg.gen_episodes}_s{cfg.seed}"
        if len(key) > 120:
            import hashlib

            key = hashlib.sha1(key.encode()).hexdigest()[:16] + f"_e{cfg.gen_episodes}_s{cfg.seed}"
        path = str(cache_dir() / "data" / key)
        if not _current_cache(Path(path)):
            if not may_generate:
                raise ConfigError(f"no --data given and no generated data in {path}: under torchrun the ranks do not generate data; "
                                  f"write it first (python -m harmodt.data generate --out FOLDER ...) and pass --data FOLDER")
            print(f"[harmodt] generating offline data for {len(tasks)} tasks x {cfg.gen_episodes} episodes into {path}", flush=True)
            generate(tasks, cfg.gen_episodes, path, seed=cfg.seed, progress=cfg.progress)
    return load_dataset(path, tasks=tasks, quality=cfg.quality, episodes_per_task=cfg.episodes_per_task or None)


def clip_factor(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The factor ``torch.nn.utils.clip_grad_norm_`` would multiply ``grads`` by:
    ``min(1, max_norm / (norm + 1e-6))``, ``norm`` the 2-norm over all of them (a 0-dim tensor)."""
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def action_loss(pred: torch.Tensor, batch: dict, count: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 2: mean squared error over the real (non-padding) history steps. ``count``: the real
    steps to divide by instead of the batch's own (all ranks' steps in a distributed run)."""
    m = batch["mask"].unsqueeze(-1).to(pred.dtype)  # (B, K, 1)
    return ((pred.float() - batch["actions"]) ** 2 * m).sum() / ((m.sum() if count is None else count) * pred.shape[-1])


def batch_segments(task_ids: list[int], batch_size: int) -> tuple:
    """``((task, sequences), ...)`` of a batch of ``task_ids`` as ``PromptDTBatcher.sample`` lays
    it out: the sequences split evenly over the tasks in order, the first ones one more."""
    n = len(task_ids)
    counts = [batch_size // n + (1 if i < batch_size % n else 0) for i in range(n)]
    return tuple((t, c) for t, c in zip(task_ids, counts) if c)


class Trainer:
    """Holds the model, masks, optimizer and data on one device; drives training and checkpoints."""

    def __init__(self, cfg: TrainConfig, datasets: dict | None = None, dist: distributed.Single | None = None):
        self.cfg = cfg
        self.tasks = parse_tasks(cfg.tasks)
        self.out = Path(cfg.out)
        self.dist = dist or distributed.Single()  # the ranks of a torchrun run (harmodt.distributed), or one process
        self.device = self.dist.device(resolve_device(cfg.device))
        if self.dist.active and cfg.method in SURGERY_METHODS:
            raise ConfigError(f"--method {cfg.method} runs in one process (its per-task gradients are not split over torchrun ranks)")
        try:
            self.backends = kernels.select_backends(self.device, cfg.fused, cfg.backend)
        except kernels.BackendUnavailable as exc:
            raise ConfigError(str(exc)) from None
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.datasets = datasets if datasets is not None else load_training_data(cfg, self.tasks, may_generate=not self.dist.active)
        mc = cfg.model
        prompted = cfg.method != "mtdt" or resolve_conditioning(cfg.method, cfg.conditioning) == "prompt"
        self.batcher = PromptDTBatcher(self.datasets, self.tasks, mc.context_len, mc.prompt_len if prompted else 0,
                                       cfg.rtg_scale, mc.max_ep_len, seed=cfg.seed + self.dist.rank, device=self.device,
                                       prompt_segment=cfg.prompt_segment)
        self.model = build_model(mc, len(self.tasks), cfg.method, cfg.conditioning).to(self.device)
        self.forward = torch.compile(self.model) if cfg.compile else self.model  # training forwards go through this
        self.params = list(self.model.parameters())
        self.weights = self.model.masked_weights()  # name -> Parameter
        shapes = {n: tuple(w.shape) for n, w in self.weights.items()}
        self.task_masks = None
        if cfg.method.startswith("harmodt"):
            self.task_masks = TaskMasks.erk(shapes, len(self.tasks), cfg.masks.sparsity, torch.Generator().manual_seed(cfg.seed + 1),
                                            device=self.device)
        self.task_stream = None  # with several ranks: the task draws every rank shares (harmodt.distributed)
        self.step_tasks: list[int] = []  # with several ranks: every rank's tasks of the current step
        self._stop_flag = None  # with several ranks: the stop requests of every rank, summed each step
        if self.dist.active:
            self.dist.broadcast_tensors_(list(self.model.state_dict().values())
                                         + (list(self.task_masks.masks.values()) if self.task_masks is not None else []))
            self.task_stream = torch.Generator().manual_seed(cfg.seed + distributed.TASK_STREAM_OFFSET)
            torch.manual_seed(cfg.seed + self.dist.rank)  # this rank's dropout stream
        self.initial_masks = None if self.task_masks is None else self.task_masks.flat_packed()  # ERK draw (seeded): the reference for mask_changed_fraction
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            (decay if p.dim() >= 2 and "embed" not in n.split(".")[0] else no_decay).append(p)
        self.opt = MaskedAdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min((s + 1) / max(cfg.warmup_steps, 1), 1.0))
        self.step = 0
        self.last_harmony = None
        self.stop_requested = False  # set by SIGINT/SIGTERM; the loop saves and stops at the next step

    @property
    def stop_requested(self) -> bool:
        """A stop was asked for (SIGINT/SIGTERM); with several ranks: on any rank, as of the last
        step, so that every rank stops at the same step."""
        if self.dist.active:
            return self._stop_flag is not None and bool(self._stop_flag > 0)
        return self._stop_local

    @stop_requested.setter
    def stop_requested(self, value: bool) -> None:
        self._stop_local = value

    def describe(self) -> str:
        """One line: device, precision, compile and the backend of each kernel op."""
        dev = str(self.device) + (f" ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda" else "")
        line = (f"[harmodt] device={dev} precision={self.cfg.precision} compile={self.cfg.compile} "
                f"fused={self.cfg.fused} kernels: {self.backends.describe()}")
        if self.cfg.fused and self.backends.fallback is not None:
            line += f"\n[harmodt] note: --fused runs on the plain-PyTorch reference here: {self.backends.fallback}"
        return line

    # ---- one step -------------------------------------------------------------------------
    def context(self, task_ids: torch.Tensor, single_task: bool = False, segments: tuple | None = None) -> MaskContext | None:
        """The masks a forward on rows of ``task_ids`` runs through (None without masks);
        ``single_task``: every row is ``task_ids[0]`` (one mask, no grouping of rows);
        ``segments``: the batch's ``((task, sequences), ...)`` layout when known on the host. The
        reference backend reads the bool masks as they are (no unpacking per call)."""
        if self.task_masks is None:
            return None
        masks = self.task_masks.masks if self.backends.masked_linear.takes_bool_masks else self.task_masks.packed()
        return MaskContext(masks, task_ids[:1] if single_task else task_ids, self.backends.masked_linear, segments=segments)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    def sample_tasks(self) -> list[int]:
        """This step's task ids (one process: from the data stream; several ranks: this rank's
        ``tasks_per_batch`` of the ``world_size * tasks_per_batch`` drawn from the shared task
        stream, all of which are kept in ``step_tasks``)."""
        if self.dist.active:
            k = self.cfg.tasks_per_batch
            self.step_tasks = distributed.draw_tasks(self.task_stream, len(self.tasks), k * self.dist.world_size)
            return self.step_tasks[self.dist.rank * k : (self.dist.rank + 1) * k]
        g = self.batcher.generator
        if self.cfg.tasks_per_batch == 1:
            return torch.randint(len(self.tasks), (1,), generator=g).tolist()  # (a host generator: nothing to wait for)
        n = min(self.cfg.tasks_per_batch, len(self.tasks))
        return torch.randperm(len(self.tasks), generator=g)[:n].tolist()

    def keep_masks(self, task_ids: list[int]) -> dict | None:
        """{weight: packed mask of what this step may change}: the task's mask, or for a batch of
        several tasks the union of theirs (Eq. 11)."""
        if self.task_masks is None:
            return None
        packed = not self.backends.masked_adamw.takes_bool_masks  # the reference takes bool masks as they are
        if len(task_ids) == 1:
            masks = self.task_masks.packed() if packed else self.task_masks.masks
            return {w: masks[n][task_ids[0]] for n, w in self.weights.items()}
        masks = self.task_masks.masks
        idx = torch.tensor(task_ids, device=self.device)
        union = {w: masks[n].index_select(0, idx).any(0) for n, w in self.weights.items()}
        return {w: kernels.pack_masks(m) for w, m in union.items()} if packed else union

    def train_step(self, task_ids: list[int]) -> torch.Tensor:
        """One step of Algorithm 1 on a batch of ``task_ids``; returns the loss (a 0-dim tensor on
        the device: reading it is the caller's choice, so a GPU step need not wait)."""
        if not self.model.training:  # (train() walks every module: skip it when already set)
            self.model.train()
        if self.cfg.method in SURGERY_METHODS:
            return self.surgery_step(task_ids)
        batch = self.batcher.sample(task_ids, self.cfg.batch_size)
        ctx = self.context(batch["task_ids"], single_task=len(task_ids) == 1, segments=batch_segments(task_ids, self.cfg.batch_size))
        count = None
        if self.dist.active:  # all ranks' real steps (the loss's divisor) and stop requests
            agreed = torch.stack([batch["mask"].sum().double(), torch.tensor(float(self._stop_local), device=self.device).double()])
            self.dist.all_reduce_sum_(agreed)
            count, self._stop_flag = agreed[0].float(), agreed[1]
        with self.autocast():
            pred = self.forward(batch, ctx)
        loss = action_loss(pred, batch, count)
        for p in self.params:  # zero_grad(set_to_none=True) without Optimizer.zero_grad's per-call overhead
            p.grad = None
        loss.backward()
        loss = self.dist.reduce_gradients(self.params, loss)  # several ranks: summed gradients and the global loss
        coef = clip_coefficient(self.params, self.cfg.grad_clip)
        keep = self.keep_masks(self.step_tasks if self.dist.active else task_ids)  # several ranks: the union of all ranks' tasks
        self.opt.masked_step(keep, grad_scale=coef, op=self.backends.masked_adamw)
        self.sched.step()
        self.step += 1
        return loss.detach()

    def surgery_step(self, task_ids: list[int]) -> torch.Tensor:
        """One PCGrad/CAGrad step (dense Prompt-DT, no masks): ``batch_size`` rows spread over
        ``task_ids`` as in :meth:`train_step`, one forward and backward per task on its own rows,
        the task gradients ``[T, P]`` combined by :func:`harmodt.baselines.combine` (at the scale of
        the mean task gradient), then the usual clip and AdamW step. Returns the mean task loss.
        PCGrad's projection orders come from the data stream (saved in the checkpoint)."""
        n = len(task_ids)
        rows = [self.cfg.batch_size // n + (1 if i < self.cfg.batch_size % n else 0) for i in range(n)]  # as batcher.sample spreads them
        params = [p for p in self.params if p.requires_grad]
        grads = torch.empty(n, sum(p.numel() for p in params), device=self.device)  # (T, P)
        losses = []
        for i, (tid, k) in enumerate(zip(task_ids, rows)):
            batch = self.batcher.sample([tid], k)
            with self.autocast():
                pred = self.forward(batch, None)
            loss = action_loss(pred, batch)
            g = torch.autograd.grad(loss, params, allow_unused=True)
            torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1) for x, p in zip(g, params)], out=grads[i])
            losses.append(loss.detach())
        used = [x is not None for x in g]  # parameters off the graph keep no gradient (AdamW skips them, as in train_step)
        combined = baselines.combine(self.cfg.method, grads, self.cfg.cagrad_c, self.batcher.generator)  # (P,)
        for p, chunk, on in zip(params, combined.split([p.numel() for p in params]), used):
            p.grad = chunk.view_as(p) if on else None
        coef = clip_coefficient(params, self.cfg.grad_clip)
        self.opt.masked_step(None, grad_scale=coef, backend=self.backends.masked_adamw)
        self.sched.step()
        self.step += 1
        return torch.stack(losses).mean()

    # ---- Algorithm 2 ----------------------------------------------------------------------
    def task_gradients(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[T, P]`` gradients of every task on one fresh batch each: gbar_i = grad L_i(theta*M_i) * M_i
        (Eq. 4) and g_i (Alg. 2: grad L_i(theta) by default; None without masks), in ``self.weights``
        order. With several ranks, task i is computed on rank i mod W (on a batch of its data
        stream) and the zero-filled rows are summed over the ranks.

        ``--mask-grads paper``: dropout off, unclipped. ``official`` (see :meth:`official_task_gradient`):
        dropout on and each task's gradient clipped to ``--grad-clip``, as the official code does.
        """
        names = list(self.weights)
        params = [self.weights[n] for n in names]
        p_total = sum(w.numel() for w in params)
        t = len(self.tasks)
        masked = torch.zeros(t, p_total, device=self.device)
        dense = torch.zeros(t, p_total, device=self.device) if self.task_masks is not None else None
        official = self.cfg.masks.mask_grads == "official"
        was_training = self.model.training
        self.model.train(official)
        for i in range(t):
            if i % self.dist.world_size != self.dist.rank:
                continue
            batch = self.batcher.sample([i], self.cfg.batch_size)
            if official:
                masked[i], g = self.official_task_gradient(i, batch)
                if dense is not None:
                    dense[i] = g
                continue
            if self.task_masks is None:
                g = torch.autograd.grad(action_loss(self.model(batch), batch), params)
                masked[i] = torch.cat([x.reshape(-1) for x in g])
                continue
            ctx = self.context(batch["task_ids"], single_task=True)
            if self.cfg.masks.recovery_grad == "masked":
                ctx.task_grads = {n: torch.zeros(t, *w.shape, device=self.device) for n, w in self.weights.items()}
            gb = torch.autograd.grad(action_loss(self.model(batch, ctx), batch), params)
            masked[i] = torch.cat([x.reshape(-1) for x in gb])
            if self.cfg.masks.recovery_grad == "masked":
                dense[i] = torch.cat([ctx.task_grads[n][i].reshape(-1) for n in names])
            else:
                g = torch.autograd.grad(action_loss(self.model(batch), batch), params)
                dense[i] = torch.cat([x.reshape(-1) for x in g])
        self.model.train(was_training)
        self.dist.all_reduce_sum_(masked)
        if dense is not None:
            self.dist.all_reduce_sum_(dense)
        return masked, dense

    def official_task_gradient(self, task: int, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Task ``task``'s ``[P]`` gradients (gbar_i, g_i) as the official code's mask update takes
        them: the model in train mode, so dropout is on (drawn from the run's torch RNG, which the
        checkpoint keeps), and each gradient clipped as ``clip_grad_norm_(model.parameters(),
        --grad-clip)`` would clip it before it is stored, so ghat averages equal-norm task gradients.

        The clip norm is the official code's: over every parameter of the model (embeddings, layer
        norms, biases, head and the masked matrices), with the masked matrices' gradient taken
        before the mask is applied, i.e. the full gradient w.r.t. the effective weight theta * M_i
        (captured from the same backward). gbar_i is then that gradient times M_i, times the
        clip factor. g_i (recovery): ``--recovery-grad masked``: the captured unmasked gradient
        with the same factor; ``dense``: grad L_i(theta) on the same batch with the same dropout
        draw (the RNG is rewound for it), clipped by its own norm over every parameter. Without
        masks (Prompt-DT, MTDT) gbar_i is the clipped plain gradient and g_i is None.
        """
        if self.task_masks is None:
            return self._clipped_gradient(batch, None)[0], None
        rng = self._rng_state()
        gbar, unmasked = self._clipped_gradient(batch, task)
        if self.cfg.masks.recovery_grad == "masked":
            return gbar, unmasked
        after = self._rng_state()
        self._set_rng_state(rng)  # the dense forward draws the same dropout as the masked one
        g, _ = self._clipped_gradient(batch, None)
        self._set_rng_state(after)
        return gbar, g

    def _clipped_gradient(self, batch: dict, task: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward and backward on ``batch`` through task ``task``'s masks (None: unmasked);
        returns the masked matrices' gradients ``[P]`` and, with a task, their unmasked gradients
        w.r.t. theta * M_task ``[P]``, both times the clip factor of :meth:`official_task_gradient`."""
        names = list(self.weights)
        ctx = None
        if task is not None:  # a one-task context whose backward also captures the unmasked gradients
            packed = self.task_masks.packed()
            ctx = MaskContext({n: packed[n][task : task + 1] for n in names}, torch.zeros(1, dtype=torch.int64, device=self.device),
                              self.backends.masked_linear, {n: torch.zeros(1, *w.shape, device=self.device) for n, w in self.weights.items()})
        grads = torch.autograd.grad(action_loss(self.model(batch, ctx), batch), self.params, allow_unused=True)
        by_param = {id(p): g for p, g in zip(self.params, grads)}
        mats = [by_param[id(self.weights[n])] for n in names]  # grad * M_task (or the plain gradient)
        full = mats if ctx is None else [ctx.task_grads[n][0] for n in names]  # what the clip norm sees
        matrix_ids = {id(w) for w in self.weights.values()}
        others = [g for p, g in zip(self.params, grads) if id(p) not in matrix_ids and g is not None]
        coef = clip_factor(full + others, self.cfg.grad_clip)
        gbar = torch.cat([g.reshape(-1) for g in mats]) * coef
        return gbar, None if ctx is None else torch.cat([g.reshape(-1) for g in full]) * coef

    def _rng_state(self) -> tuple:
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    def _set_rng_state(self, state: tuple) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    def mask_update(self) -> dict:
        masked, dense = self.task_gradients()
        info = {"harmony_score": harmony_score(masked)}
        self.last_harmony = info["harmony_score"]
        m = self.cfg.masks
        if self.task_masks is not None and self.cfg.method in ("harmodt-m", "harmodt-f"):
            k = alpha_schedule(self.step, self.cfg.steps, m.eta_min, m.eta_max)
            params = torch.cat([w.detach().reshape(-1) for w in self.weights.values()])
            importance = "fisher" if self.cfg.method == "harmodt-f" else "magnitude"
            changed = self.task_masks.update(masked, dense, params, k, m.lam, importance, m.lam_on, select=self.backends.harmony_select)
            info.update({"alpha": k, "masked_per_task": changed["masked"], "density": self.task_masks.density(),
                         "mask_changed_fraction": self.mask_changed_fraction()})
        self.dist.check_identical({"masks": [] if self.task_masks is None else [self.task_masks.flat_packed()],
                                   "weights": list(self.model.state_dict().values())})
        return info

    def mask_changed_fraction(self) -> list[float]:
        """Per task, the fraction of its active weights that are not active in its initial ERK mask."""
        p = sum(m[0].numel() for m in self.task_masks.masks.values())
        now = kernels.unpack_masks(self.task_masks.flat_packed(), p)
        init = kernels.unpack_masks(self.initial_masks, p)
        return ((now & ~init).sum(1) / now.sum(1).clamp(min=1)).tolist()

    # ---- checkpoints ----------------------------------------------------------------------
    def eval_info(self) -> dict:
        """What evaluation needs besides the weights: task names, state normalization, prompt
        trajectories and how prompts are cut from them, return scaling (tensors and plain types only)."""
        b = self.batcher
        prompts = {
            name: [{"observations": torch.as_tensor(tr.observations), "actions": torch.as_tensor(tr.actions),
                    "rewards": torch.as_tensor(tr.rewards)} for tr in self.datasets[name].prompts]
            for name in self.tasks
        }
        return {"tasks": list(self.tasks), "state_mean": {t: torch.as_tensor(v) for t, v in b.state_mean.items()},
                "state_std": {t: torch.as_tensor(v) for t, v in b.state_std.items()}, "prompts": prompts,
                "rtg_scale": self.cfg.rtg_scale, "target_return": self.cfg.target_return, "prompt_segment": self.cfg.prompt_segment}

    def state(self) -> dict:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        rng = {"torch": torch.get_rng_state(), "batcher": self.batcher.state_dict(), "python": random.getstate(),
               "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                         "has_gauss": int(has_gauss), "gauss": float(gauss)}}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.dist.active:  # every rank's data and dropout streams (rank r at [r]) and the shared task stream
            rng["ranks"] = self.dist.all_gather_object({k: rng[k] for k in ("torch", "batcher", "cuda") if k in rng})
            rng["tasks"] = self.task_stream.get_state()
        return {
            "world_size": self.dist.world_size,
            "model": self.model.state_dict(),
            "masks": None if self.task_masks is None else self.task_masks.per_task(self.tasks),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "step": self.step,
            "config": to_dict(self.cfg),
            "rng": rng,
            "eval_info": self.eval_info(),
            "last_harmony": self.last_harmony,
        }

    def save(self, path: Path, run_state: dict | None = None, on_partial_write=None) -> None:
        """Write :meth:`state` (plus ``run_state``: what :func:`run` needs to continue its metric
        lines exactly) atomically; ``on_partial_write``: see :func:`checkpoint.save`. With several
        ranks every rank calls it (the RNG streams are gathered) and rank 0 writes."""
        state = self.state()
        if run_state is not None:
            state["run"] = run_state
        if self.dist.is_main:
            checkpoint.save(state, path, on_partial_write=on_partial_write)

    def load(self, path: Path, ck: dict | None = None) -> dict:
        """Continue from the checkpoint at ``path`` (``ck``: its contents, already read): weights,
        masks, optimizer, scheduler, step and every RNG stream. Returns its run state ({} when it
        has none). A checkpoint that does not fit this model raises ConfigError (one line)."""
        if ck is None:
            try:
                ck = checkpoint.load(path)
            except checkpoint.CheckpointError as exc:
                raise ConfigError(f"--resume: {exc}") from None
        try:
            self.model.load_state_dict(ck["model"])
            if ck["masks"] is not None:
                masks = TaskMasks.from_per_task(ck["masks"], self.tasks, device=self.device)
                for n, w in self.weights.items():
                    if tuple(masks.masks[n].shape) != (len(self.tasks), *w.shape):
                        raise ValueError(f"mask of {n} has shape {tuple(masks.masks[n].shape)}, the model needs "
                                         f"{(len(self.tasks), *w.shape)}")
                self.task_masks = masks
            self.opt.load_state_dict(ck["optimizer"])
            self.sched.load_state_dict(ck["scheduler"])
            self.step = int(ck["step"])
            rng = ck["rng"]
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
            self.batcher.load_state_dict(rng["batcher"])
            random.setstate(_as_tuples(rng["python"]))
            npr = rng["numpy"]
            np.random.set_state((npr["name"], npr["keys"].numpy().astype(np.uint32), npr["pos"], npr["has_gauss"], npr["gauss"]))
            self._load_rank_streams(ck, path)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
            raise ConfigError(f"--resume: {path} does not fit this model ({checkpoint.one_line(exc)})") from None
        self.last_harmony = ck.get("last_harmony")
        return dict(ck.get("run") or {})

    def _load_rank_streams(self, ck: dict, path: Path) -> None:
        """This rank's data and dropout streams and the task stream from a checkpoint written by as
        many ranks; from one written by another number of ranks, reseeded from (seed, step, rank)."""
        saved, rng = int(ck.get("world_size", 1)), ck["rng"]
        if saved == self.dist.world_size:
            if self.dist.active:
                mine = rng["ranks"][self.dist.rank]
                torch.set_rng_state(mine["torch"])
                self.batcher.load_state_dict(mine["batcher"])
                if "cuda" in mine and self.device.type == "cuda":
                    torch.cuda.set_rng_state(mine["cuda"], self.device)
                self.task_stream.set_state(rng["tasks"])
            return
        seed, step, rank = self.cfg.seed, self.step, self.dist.rank
        self.batcher.generator.manual_seed(distributed.derived_seed(seed, step, "data", rank))
        torch.manual_seed(distributed.derived_seed(seed, step, "dropout", rank))
        if self.task_stream is not None:
            self.task_stream.manual_seed(distributed.derived_seed(seed, step, "tasks"))
        if self.dist.is_main:
            print(f"[harmodt] --resume: {path} was written by {saved} rank(s), this run has {self.dist.world_size}: "
                  f"data, dropout and task streams reseeded from (seed, step {step}, rank)", flush=True)

    # ---- evaluation -----------------------------------------------------------------------
    def evaluate(self, during=None) -> dict:
        """Evaluate on every training task (harmodt.evaluate). The training RNG streams (torch,
        CUDA, numpy, python) are left as they were, so evaluating or not never changes training.
        With several ranks, rank r evaluates tasks r, r+W, ... and the results are gathered (a
        task's episodes then depend on W, as their environment seeds follow its place in the list).
        ``during``: a testing hook called once at the tenth action of the evaluation."""
        from .evaluate import evaluate

        rngs = (torch.get_rng_state(), np.random.get_state(), random.getstate(),
                torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        if during is not None:
            act, calls = self.model.act, itertools.count(1)

            def counted_act(*args, **kwargs):
                if next(calls) == 10:
                    during()
                return act(*args, **kwargs)

            self.model.act = counted_act  # an instance attribute over the method, removed below
        try:
            mine = self.dist.shard(self.tasks)
            res = evaluate(self.model, self.task_masks, self.eval_info(), mine, self.cfg.eval_episodes, self.cfg.seed + 12345,
                           backend=self.backends.masked_linear, progress=self.cfg.progress and self.dist.is_main,
                           precision=self.cfg.precision) if mine else {"tasks": {}, "env_steps": 0, "seconds": 0.0}
            return distributed.merge_evaluations(self.dist.all_gather_object(res), self.tasks) if self.dist.active else res
        finally:
            self.model.__dict__.pop("act", None)
            torch.set_rng_state(rngs[0])
            np.random.set_state(rngs[1])
            random.setstate(rngs[2])
            if rngs[3] is not None:
                torch.cuda.set_rng_state(rngs[3], self.device)


def _as_tuples(x):
    """random.setstate wants the tuples that a checkpoint's round trip may have kept as lists."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


KILL_PHASES = ("step", "checkpoint-write", "mask-update", "eval")


class KillPoint:
    """A testing hook: SIGKILL this process when training reaches ``phase`` at ``step`` (see
    :func:`run`, which makes one from ``HARMODT_TEST_KILL_AT``)."""

    def __init__(self, spec: str):
        phase, _, step = spec.rpartition(":")
        if phase not in KILL_PHASES or not step.isdigit():
            raise ConfigError(f"HARMODT_TEST_KILL_AT must be PHASE:STEP with PHASE one of {', '.join(KILL_PHASES)}, got {spec!r}")
        self.phase, self.step = phase, int(step)

    def at(self, phase: str, step: int):
        """A no-argument function that kills the process when (phase, step) is this point, else None."""
        if (phase, step) != (self.phase, self.step):
            return None

        def kill() -> None:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        return kill


def changed_settings(saved: dict, cfg: TrainConfig) -> dict:
    """{dotted key: (the checkpoint's value, cfg's value)} for every setting of ``cfg`` that differs
    from the checkpoint's config ``saved`` (read as it was meant when written: a checkpoint from
    before ``prompt_segment`` existed ran with ``random``, see :func:`upgrade_saved_config`; any other
    key the checkpoint lacks counts as its default); the keys of RESUME_IGNORED are not compared."""
    new, old, default = flat_keys(to_dict(cfg)), flat_keys(upgrade_saved_config(saved)), flat_keys(to_dict(TrainConfig()))
    return {k: (old.get(k, default[k]), v) for k, v in new.items() if k not in RESUME_IGNORED and old.get(k, default[k]) != v}


def check_resume_settings(saved: dict, cfg: TrainConfig, path: Path) -> None:
    """ConfigError (one line naming every differing key) unless each setting that differs from the
    checkpoint's is named by ``--allow-changed``."""
    diff = changed_settings(saved, cfg)
    refused = [k for k in diff if k not in cfg.allow_changed]
    if not refused:
        return
    listing = ", ".join(f"{k} ({diff[k][0]!r} -> {diff[k][1]!r})" for k in refused)
    fixed = [k for k in refused if k not in RESUME_CHANGEABLE]
    free = [k for k in refused if k in RESUME_CHANGEABLE]
    hints = []
    if fixed:
        keep = " ".join(f"{_flag_of(k)} {shlex.quote(str(diff[k][0]))}" for k in fixed)
        hints.append(f"{', '.join(fixed)} cannot change on --resume (pass {keep} to continue the checkpoint as it was, "
                     f"or train a new run into another --out)")
    if free:
        hints.append(f"pass --allow-changed {' '.join(free)} to continue with the new value{'s' if len(free) > 1 else ''}")
    raise ConfigError(f"--resume: settings differ from those of {path}: {listing}; {'; '.join(hints)}")


def _flag_of(key: str) -> str:
    """The CLI flag of a dotted config key ('model.n_layer' -> '--n-layer')."""
    return "--" + key.split(".")[-1].replace("_", "-")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def rewind_metrics(path: Path, keep_bytes: int | None, step: int) -> list[dict]:
    """Cut ``metrics.jsonl`` back to what it held when the checkpoint being continued was written
    (its first ``keep_bytes`` bytes; when the checkpoint does not record them or the file no longer
    matches, the records of steps <= ``step``), rewriting it atomically. Returns the kept records
    of ``step`` itself (TensorBoard's purge from ``step`` on drops them; :func:`run` writes them again)."""
    raw = path.read_bytes() if path.exists() else b""
    if keep_bytes is not None and len(raw) >= keep_bytes and (keep_bytes == 0 or raw[keep_bytes - 1 : keep_bytes] == b"\n"):
        kept = raw[:keep_bytes]
        recs = [json.loads(line) for line in kept.splitlines() if line.strip()]
    else:
        lines, recs = [], []
        for line in raw.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by a crash
                continue
            if isinstance(rec, dict) and rec.get("step", 0) <= step:
                lines.append(line + b"\n")
                recs.append(rec)
        kept = b"".join(lines)
    if kept != raw:
        _write_atomic(path, kept)
    return [r for r in recs if r.get("step") == step]


def run(cfg: TrainConfig, datasets: dict | None = None) -> dict:
    """Train as ``cfg`` says (on ``datasets`` when given, else ``cfg.data`` or generated data) and
    write the run's files into ``cfg.out``; returns the results (also in results.json).

    ``cfg.resume`` continues ``OUT/checkpoint.pt`` (or starts at step 0 when there is none yet);
    every setting that differs from the checkpoint's must be named by ``cfg.allow_changed``. A
    resumed run ends as the uninterrupted one would, whenever the earlier process stopped (even
    SIGKILL): the checkpoint holds every RNG stream, the losses since the last metric line and the
    size of metrics.jsonl, which is cut back to that size (TensorBoard purged from the
    checkpoint's step) before the lost steps are trained again. Per step the order is: mask update
    (when due), training step, metric line, evaluation (``eval_every``), checkpoint.

    Testing hook: the environment variable ``HARMODT_TEST_KILL_AT="PHASE:STEP"``, read once here,
    makes the process SIGKILL itself at that point: ``step`` (right after training step STEP),
    ``mask-update`` (after the mask update at STEP changed the masks, before its metric line),
    ``eval`` (at the tenth action of the evaluation at STEP; STEP = ``steps`` for the final one),
    ``checkpoint-write`` (inside the checkpoint write at STEP, with half of the temporary file
    written). The crash tests (tests/test_resume.py) use it; it has no other use.
    """
    spec = os.environ.get("HARMODT_TEST_KILL_AT")
    kill = KillPoint(spec) if spec else None

    def kill_at(phase: str, step: int):
        return kill.at(phase, step) if kill is not None else None

    keep_freed_memory()
    if cfg.precision == "bf16" and resolve_device(cfg.device).type == "cpu" and (note := bf16_matmul_note()):
        print(note, file=sys.stderr, flush=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = distributed.init(cfg.device, cfg.dist_timeout)  # under torchrun: this rank; else one process
    if not dist.is_main:  # rank 0 alone prints (and writes files); the others keep stderr
        sys.stdout = open(os.devnull, "w")
    try:  # a device or kernel backend that cannot run fails before any file is written
        kernels.select_backends(resolve_device(cfg.device), cfg.fused, cfg.backend)
    except kernels.BackendUnavailable as exc:
        raise ConfigError(str(exc)) from None
    out = Path(cfg.out)
    ck_path = out / "checkpoint.pt"
    if ck_path.exists() and not cfg.resume:
        raise ConfigError(f"{ck_path} exists: pass --resume to continue it or choose another --out")
    ck = None
    if cfg.resume and dist.is_main and ck_path.exists():  # rank 0 reads it and sends it to the other ranks
        try:
            ck = checkpoint.load(ck_path)
        except checkpoint.CheckpointError as exc:
            raise ConfigError(f"--resume: {exc}") from None
        check_resume_settings(distributed.comparable_config(ck, dist.world_size), cfg, ck_path)
    ck = dist.broadcast_object(ck)
    if dist.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--out {out}: cannot make the folder ({exc.strerror or exc})") from None
    trainer = Trainer(cfg, datasets, dist)
    if dist.active:
        print(dist.describe(), flush=True)
    print(trainer.describe(), flush=True)
    run_state = {}
    if ck is not None:
        run_state = trainer.load(ck_path, ck)
        del ck
        print(f"[harmodt] resumed from {ck_path} at step {trainer.step}", flush=True)
    elif cfg.resume:
        print(f"[harmodt] --resume: no checkpoint in {out} yet; starting at step 0", flush=True)
    if dist.is_main:
        ck_path.with_name(ck_path.name + ".tmp").unlink(missing_ok=True)  # left by a write that was killed
        _write_atomic(out / "config.json", json.dumps(to_dict(cfg), indent=2).encode())
    metrics_path = out / "metrics.jsonl"
    # a run from step 0 starts its metric lines afresh; a resumed one keeps those before its checkpoint
    kept = rewind_metrics(metrics_path, run_state.get("metrics_bytes", None if trainer.step else 0), trainer.step) if dist.is_main else []
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tb"), purge_step=trainer.step) if dist.is_main else distributed.Discard()
    metrics = open(metrics_path, "ab") if dist.is_main else distributed.Discard()

    def scalars(rec: dict) -> None:
        for k, v in rec.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                writer.add_scalar(k, v, rec["step"])

    for rec in kept:  # purged from TensorBoard with the lost steps, but kept in metrics.jsonl
        scalars(rec)

    def log(rec: dict) -> None:
        metrics.write((json.dumps(rec) + "\n").encode())
        metrics.flush()
        scalars(rec)

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=trainer.step, disable=not cfg.progress or not dist.is_main, desc=f"train {cfg.method}", dynamic_ncols=True)
    # the losses since the last metric line (device tensors: read once per line)
    losses = [x.to(trainer.device) for x in run_state.get("losses", torch.zeros(0))]
    t0, s0 = time.perf_counter(), trainer.step
    # the evaluation with the highest mean success so far ({"step", "mean_success", "tasks"}) and the
    # number of evaluations made: kept in the checkpoint, so a resumed run reports the same best
    best, n_evals = run_state.get("best"), int(run_state.get("evaluations", 0))

    def save() -> None:
        writer.flush()  # the TensorBoard events up to the checkpoint are on disk with it
        state = {"metrics_bytes": metrics.tell(), "losses": torch.stack(losses) if losses else torch.zeros(0),
                 "best": best, "evaluations": n_evals}
        trainer.save(ck_path, state, on_partial_write=kill_at("checkpoint-write", trainer.step))

    def evaluate() -> dict:
        """Evaluate now; returns this evaluation's results entry and keeps the best one."""
        nonlocal best, n_evals
        res = trainer.evaluate(during=kill_at("eval", trainer.step))
        entry = {"step": trainer.step, "mean_success": res["mean_success"],
                 "tasks": {n: result_entry(r) for n, r in res["tasks"].items()}}
        n_evals += 1
        if best is None or entry["mean_success"] > best["mean_success"]:  # ties: the earliest
            best = entry
        return {**res, "entry": entry}

    # Ctrl-C / SIGTERM: finish the current step, save a consistent checkpoint, then stop.
    # A second Ctrl-C stops at once (the last periodic checkpoint stays valid: writes are atomic).
    def request_stop(signum, frame):
        if trainer.stop_requested:
            raise KeyboardInterrupt
        trainer.stop_requested = True

    old_handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old_handlers[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread
            pass
    saved_at = None  # the step of the last checkpoint this process wrote
    try:
        while trainer.step < cfg.steps:
            if trainer.stop_requested:
                save()
                print(f"\n[harmodt] stopped: checkpoint saved at step {trainer.step}; continue with --resume", file=sys.stderr)
                raise KeyboardInterrupt
            if trainer.step > 0 and trainer.step % cfg.masks.update_every == 0:
                tu = time.perf_counter()
                info = trainer.mask_update()
                if (k := kill_at("mask-update", trainer.step)) is not None:
                    k()
                info.update(step=trainer.step, mask_update_s=time.perf_counter() - tu)
                log(info)
                t0 += time.perf_counter() - tu
            losses.append(trainer.train_step(trainer.sample_tasks()))
            bar.update(1)
            if (k := kill_at("step", trainer.step)) is not None:
                k()
            if trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps:
                sps = (trainer.step - s0) / max(time.perf_counter() - t0, 1e-9)
                rec = {"step": trainer.step, "loss": float(torch.stack(losses).float().mean()), "lr": trainer.sched.get_last_lr()[0],
                       "steps_per_s": sps}
                log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", sps=f"{sps:.1f}")
                losses, t0, s0 = [], time.perf_counter(), trainer.step
            if cfg.eval_every and trainer.step % cfg.eval_every == 0 and trainer.step < cfg.steps and cfg.eval_episodes:
                te = time.perf_counter()
                res = evaluate()
                log({"step": trainer.step, "eval_mean_success": res["mean_success"]})
                t0 += time.perf_counter() - te
            if trainer.step % cfg.checkpoint_every == 0:
                save()
                saved_at = trainer.step
    finally:
        bar.close()
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
    if saved_at != trainer.step:
        save()
    # top level (tasks, mean_success): the final checkpoint's evaluation, repeated as "final"; "best":
    # the evaluation with the highest mean success among the periodic ones (--eval-every) and the final
    results = {"method": cfg.method, "tasks": {}, "mean_success": float("nan"), "steps": trainer.step, "final": None, "best": None}
    if cfg.eval_episodes:
        res = evaluate()
        results.update(tasks=res["entry"]["tasks"], mean_success=res["mean_success"], final=res["entry"],
                       best={**best, "evaluations": n_evals})
        log({"step": trainer.step, "eval_mean_success": res["mean_success"], "eval_env_steps_per_s": res.get("env_steps_per_s", 0.0)})
        from .evaluate import print_table

        print_table(results)
        if n_evals > 1:
            print(f"best of {n_evals} evaluations: mean success {best['mean_success']:.2f} at step {best['step']} "
                  f"(final: {res['mean_success']:.2f})")
    metrics.close()
    writer.close()
    if not dist.is_main:
        return results
    _write_atomic(out / "results.json", json.dumps(results, indent=2).encode())
    try:
        from .plots import plot_run

        plot_run(out)
    except ImportError:  # matplotlib missing: curves stay in metrics.jsonl and TensorBoard
        pass
    return results


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        t = time.perf_counter()
        run(cfg)
        print(f"[harmodt] done in {time.perf_counter() - t:.0f} s; outputs in {cfg.out}")
        distributed.shutdown()
        return 0
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except distributed.DistributedError as exc:
        if not exc.reported:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return distributed.EXIT_CODE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # data errors etc. are ValueErrors with a clear message
        from .data import DataError

        if isinstance(exc, DataError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
