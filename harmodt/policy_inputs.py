"""What a policy needs per task besides its history, built once from a checkpoint: state
normalization, the MTDT task-ID row, the mask row (the voted mask of Eq. 13 for an unseen task) and
the prompt's keys/values. :func:`harmodt.evaluate.evaluate` and :class:`harmodt.agent.HarmoDTAgent`
both act through :func:`task_inputs`.

Prompts (prompt-conditioned models): with ``prompt_segment="last"`` every task's prompt is the last
K* steps before the final step of its highest-return prompt episode (Prompt-DT's window), the same
for every episode, seed and method (``"first"``: that episode's first K* steps); with ``"random"``
one window per task drawn from the seed.
Which prompt episode and which of its timesteps were used is recorded per task. An unseen task's
prompt episodes are a noise-free scripted-expert episode pair rolled out here (seeded), cut the
same way, and its states are normalized with the mean of the training tasks' statistics.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

import harmodt_kernels

from .data.batches import PROMPT_SEGMENTS
from .data.batches import prompt_segment as cut_prompt
from .model import MaskContext


class EvalError(ValueError):
    """A bad checkpoint, task list or option; printed as one line by the CLI."""


def expert_prompts(task: str, n: int, seed: int) -> list:
    from .data.generator import rollout
    from .envs import ScriptedExpert, make_env

    env, expert, rng = make_env(task, seed), ScriptedExpert(task), np.random.default_rng(seed)
    return [SimpleNamespace(**rollout(env, expert, rng, 0.0, 0.0)) for _ in range(n)]


def _as_traj(d):
    return d if hasattr(d, "observations") else SimpleNamespace(**{k: np.asarray(v) for k, v in d.items()})


@dataclass
class TaskInputs:
    """What a policy needs per task besides its history, built once from a checkpoint: state
    normalization, the MTDT task-ID row, the mask row, and the prompt's cached keys/values.
    Shared by :func:`evaluate` and :class:`harmodt.agent.HarmoDTAgent`, so both act through the
    same inputs; every per-task array is indexed like ``tasks``."""

    tasks: list
    mean: np.ndarray  # (n_tasks, S) state mean (an unseen task: the training tasks' average)
    std: np.ndarray  # (n_tasks, S)
    embed_ids: torch.Tensor  # (n_tasks,) the task-ID row of a task-ID model (unseen tasks: 0)
    masks: dict | None  # parameter name -> the masks of the rows in mask_row (the mask kind's rows()), on the device
    mask_row: dict  # task -> its row in ``masks``
    mask_kind: dict  # task -> "trained" | "voted" | "none"
    prompt_kv: list | None  # per layer (k, v) of every task's prompt, each (n_tasks, nh, 3K*, hd)
    prompt_valid: torch.Tensor | None  # (n_tasks, 3K*)
    sources: dict  # task -> which prompt episode and timesteps its prompt is
    rtg_scale: float
    target: float  # initial return-to-go, unscaled
    masked_linear: harmodt_kernels.MaskedLinearOp  # the masked layers' op (the mask kind's), each task's W * M cached
    precision: str

    def ctx(self, rows: torch.Tensor) -> MaskContext | None:
        """The mask context of a batch whose row i acts on task ``tasks[rows[i]]``."""
        if self.masks is None:
            return None
        device = self.embed_ids.device
        mrows = [self.mask_row[self.tasks[i]] for i in rows.tolist()]
        # ((mask row, sequences), ...), known on the host
        runs = tuple((r, len(list(g))) for r, g in itertools.groupby(mrows))
        return MaskContext(self.masks, torch.tensor(mrows, device=device), self.masked_linear, segments=runs)

    def prompt(self, rows: torch.Tensor):
        """The cached prompt keys/values and validity of rows ``rows`` (task indices); (None, None)
        for a task-ID model."""
        if self.prompt_kv is None:
            return None, None
        rd = rows.to(self.prompt_valid.device)
        return [(k[rd], v[rd]) for k, v in self.prompt_kv], self.prompt_valid[rd]

    def autocast(self):
        device = self.embed_ids.device
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")


# an unseen task's voted mask below this density is refused: it would act through (nearly) no weight
MIN_VOTED_DENSITY = 0.01


def task_inputs(model, task_masks, eval_info: dict, tasks: list[str], seed: int, *,
                backend: str | harmodt_kernels.MaskedLinearOp = "reference",
                vote_threshold: int | None = None, precision: str = "fp32", target_return: float | None = None,
                prompt_segment: str | None = None) -> TaskInputs:
    """Every task's normalization, mask row and prompt (keys/values computed here, once, with the
    model in eval mode); arguments as :func:`evaluate`'s. Raises EvalError for an unseen task a
    task-ID model cannot act on, unseen tasks without a vote threshold, or a bad segment."""
    device = next(model.parameters()).device
    op = harmodt_kernels.backend_ops(backend, device).masked_linear if isinstance(backend, str) else backend
    op = op.cached({})  # each task's W * M made once: the weights do not change while a policy acts
    trained = list(eval_info["tasks"])
    cfg = model.cfg
    unseen = [t for t in tasks if t not in trained]
    if unseen and model.reads_task_id:
        raise EvalError(f"a model conditioned on the task ID (--conditioning {model.conditioning}) knows only the "
                        f"tasks it was trained on and cannot act on unseen tasks: {', '.join(unseen)}")
    segment = prompt_segment or eval_info.get("prompt_segment", "random")
    if segment not in PROMPT_SEGMENTS:
        raise EvalError(f"prompt segment must be one of {', '.join(PROMPT_SEGMENTS)}, got {segment!r}")
    rtg_scale = float(eval_info.get("rtg_scale", 1000.0))
    target = float(target_return if target_return is not None else eval_info.get("target_return", 4500.0))

    layers = None
    vote_row = None
    mask_row = {t: trained.index(t) if t in trained else None for t in tasks}
    if task_masks is not None:  # a mask kind (harmodt.mask_kinds.MaskKind)
        task_masks = task_masks.to(device)
        vote = None
        if unseen:
            if vote_threshold is None:
                raise EvalError("unseen tasks need --vote-threshold (Eq. 13)")
            vote = task_masks.vote(vote_threshold)
            kept, total = sum(int((v != 0).sum()) for v in vote.values()), sum(v.numel() for v in vote.values())
            if kept < MIN_VOTED_DENSITY * total:
                raise EvalError(f"--vote-threshold {vote_threshold}: with {len(trained)} training tasks the voted mask "
                                f"keeps {kept / total:.2%} of the masked weights (Eq. 13 keeps a weight more than "
                                f"{vote_threshold} tasks keep); choose a threshold below {len(trained)}")
            vote_row = len(trained)
            mask_row = {t: (r if r is not None else vote_row) for t, r in mask_row.items()}
        used = sorted(set(mask_row.values()))  # only the mask rows of the evaluated tasks
        layers = task_masks.rows(used, vote)
        mask_row = {t: used.index(r) for t, r in mask_row.items()}
        op = task_masks.linear_op(op)
    mask_kind = {t: "trained" if t in trained else ("voted" if vote_row is not None else "none") for t in tasks}
    means = {t: np.asarray(eval_info["state_mean"][t], np.float32) for t in trained}
    stds = {t: np.asarray(eval_info["state_std"][t], np.float32) for t in trained}
    pooled_mean, pooled_std = np.mean(list(means.values()), 0), np.mean(list(stds.values()), 0)
    mean = np.stack([means.get(t, pooled_mean) for t in tasks])  # (n_tasks, S)
    std = np.stack([stds.get(t, pooled_std) for t in tasks])
    # MTDT task-ID rows
    embed_ids = torch.tensor([trained.index(t) if t in trained else 0 for t in tasks], device=device)
    inputs = TaskInputs(list(tasks), mean, std, embed_ids, layers, mask_row, mask_kind, None, None, {}, rtg_scale,
                        target, op, precision)
    if model.use_prompt:
        g = torch.Generator().manual_seed(seed)
        segs = []
        for i, t in enumerate(tasks):
            trajs = ([_as_traj(p) for p in eval_info["prompts"][t]] if t in trained
                     else expert_prompts(t, 2, seed + 7919 * (i + 1)))
            seg, src = cut_prompt(trajs, mean[i], std[i], cfg.prompt_len, rtg_scale, cfg.max_ep_len, g, segment)
            segs.append(seg)
            inputs.sources[t] = {"segment": segment,
                                 "episodes": "training prompts" if t in trained else "expert rollouts", **src}
        prompt = {k: torch.cat([s[k] for s in segs]).to(device) for k in segs[0]}
        was_training = model.training
        model.eval()
        with torch.inference_mode(), inputs.autocast():
            inputs.prompt_kv, inputs.prompt_valid = model.encode_prompt(prompt, inputs.ctx(torch.arange(len(tasks))))
        model.train(was_training)
    return inputs
