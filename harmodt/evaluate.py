"""`python -m harmodt.evaluate CHECKPOINT`: batched evaluation on Meta-World v3.

Every task x episode runs together: one vector env with one env per (task, episode) on the CPU
(16 or more episodes split over two processes that step concurrently, ``sim_workers``; results
are the same), and one model forward per timestep for all running episodes, each row through its
own task's mask (Algorithm 1's inference stage, batched), with one transfer of the observations
and one of the actions per step. Each task's masked weights ``W * M_t`` are made once
(``kernels.CachedMaskedLinearOp``): a forward is GEMMs alone. The prompt's keys and values are
computed once per task, and the last block runs for the last state token only
(:meth:`harmodt.model.PromptDT.act`). Unseen tasks act through the voted mask of Eq. 13.
Episodes last 500 steps (``--stop-at-success``: until their first success); an episode succeeds
if it succeeds at any step; goals are random per episode but seeded.

Prompts (prompt-conditioned models): with ``prompt_segment="last"`` (what training used by
default) every task's prompt is the last K* steps before the final step of its highest-return
prompt episode (Prompt-DT's window), the same for every episode, seed and method; with
``"random"`` one window per task drawn from the seed. Which prompt episode and which of its
timesteps were used is recorded per task. :func:`task_inputs` builds every task's prompt, mask
row and normalization; :class:`harmodt.agent.HarmoDTAgent` acts through the same inputs.

Unseen tasks: their prompt episodes are a noise-free scripted-expert episode pair rolled out here
(seeded), cut the same way, and their states are normalized with the mean of the training tasks'
statistics.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

import kernels

from .checkpoint import CheckpointError
from .config import OneLineParser
from .data.batches import prompt_segment as cut_prompt
from .files import write_atomic
from .model import MaskContext
from .runtime import bf16_matmul_note, return_freed_memory
from .tasks import TASKS_HELP


class EvalError(ValueError):
    """A bad checkpoint, task list or option; printed as one line by the CLI."""


def _expert_prompts(task: str, n: int, seed: int) -> list:
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
    masks: dict | None  # parameter name -> packed masks of the rows in mask_row, on the device
    mask_row: dict  # task -> its row in ``masks``
    mask_kind: dict  # task -> "trained" | "voted" | "none"
    prompt_kv: list | None  # per layer (k, v) of every task's prompt, each (n_tasks, nh, 3K*, hd)
    prompt_valid: torch.Tensor | None  # (n_tasks, 3K*)
    sources: dict  # task -> which prompt episode and timesteps its prompt is
    rtg_scale: float
    target: float  # initial return-to-go, unscaled
    masked_linear: kernels.MaskedLinearOp  # the masked layers' op, each task's W * M cached for the evaluation
    precision: str

    def ctx(self, rows: torch.Tensor) -> MaskContext | None:
        """The mask context of a batch whose row i acts on task ``tasks[rows[i]]``."""
        if self.masks is None:
            return None
        device = self.embed_ids.device
        mrows = [self.mask_row[self.tasks[i]] for i in rows.tolist()]
        runs = tuple((r, len(list(g))) for r, g in itertools.groupby(mrows))  # ((mask row, sequences), ...), known on the host
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
                backend: str | kernels.MaskedLinearOp = "reference",
                vote_threshold: int | None = None, precision: str = "fp32", target_return: float | None = None,
                prompt_segment: str | None = None) -> TaskInputs:
    """Every task's normalization, mask row and prompt (keys/values computed here, once, with the
    model in eval mode); arguments as :func:`evaluate`'s. Raises EvalError for an unseen task a
    task-ID model cannot act on, unseen tasks without a vote threshold, or a bad segment."""
    device = next(model.parameters()).device
    op = kernels.backend_ops(backend, device).masked_linear if isinstance(backend, str) else backend
    op = op.cached({})  # each task's W * M made once: the weights do not change while a policy acts
    trained = list(eval_info["tasks"])
    cfg = model.cfg
    unseen = [t for t in tasks if t not in trained]
    if unseen and not model.use_prompt:
        raise EvalError(f"a model conditioned on the task ID (--conditioning {model.conditioning}, as MTDT) knows only the tasks it "
                        f"was trained on and cannot act on unseen tasks: {', '.join(unseen)}")
    segment = prompt_segment or eval_info.get("prompt_segment", "random")
    if segment not in ("last", "random"):
        raise EvalError(f"prompt segment must be last or random, got {segment!r}")
    rtg_scale = float(eval_info.get("rtg_scale", 1000.0))
    target = float(target_return if target_return is not None else eval_info.get("target_return", 4500.0))

    packed = None
    vote_row = None
    mask_row = {t: trained.index(t) if t in trained else None for t in tasks}
    if task_masks is not None:
        bool_masks = {n: m.to(device) for n, m in task_masks.masks.items()}
        if unseen:
            if vote_threshold is None:
                raise EvalError("unseen tasks need --vote-threshold (Eq. 13)")
            vote = task_masks.vote(vote_threshold)
            kept, total = sum(int(v.sum()) for v in vote.values()), sum(v.numel() for v in vote.values())
            if kept < MIN_VOTED_DENSITY * total:
                raise EvalError(f"--vote-threshold {vote_threshold}: with {len(trained)} training tasks the voted mask keeps "
                                f"{kept / total:.2%} of the masked weights (Eq. 13 keeps a weight more than {vote_threshold} "
                                f"tasks keep); choose a threshold below {len(trained)}")
            bool_masks = {n: torch.cat([m, vote[n].to(device).unsqueeze(0)]) for n, m in bool_masks.items()}
            vote_row = len(trained)
            mask_row = {t: (r if r is not None else vote_row) for t, r in mask_row.items()}
        used = sorted(set(mask_row.values()))  # only the mask rows of the evaluated tasks
        packed = {n: kernels.pack_masks(m[used]) for n, m in bool_masks.items()}
        mask_row = {t: used.index(r) for t, r in mask_row.items()}
    mask_kind = {t: "trained" if t in trained else ("voted" if vote_row is not None else "none") for t in tasks}
    means = {t: np.asarray(eval_info["state_mean"][t], np.float32) for t in trained}
    stds = {t: np.asarray(eval_info["state_std"][t], np.float32) for t in trained}
    pooled_mean, pooled_std = np.mean(list(means.values()), 0), np.mean(list(stds.values()), 0)
    mean = np.stack([means.get(t, pooled_mean) for t in tasks])  # (n_tasks, S)
    std = np.stack([stds.get(t, pooled_std) for t in tasks])
    embed_ids = torch.tensor([trained.index(t) if t in trained else 0 for t in tasks], device=device)  # MTDT task-ID rows
    inputs = TaskInputs(list(tasks), mean, std, embed_ids, packed, mask_row, mask_kind, None, None, {}, rtg_scale, target, op,
                        precision)
    if model.use_prompt:
        g = torch.Generator().manual_seed(seed)
        segs = []
        for i, t in enumerate(tasks):
            trajs = [_as_traj(p) for p in eval_info["prompts"][t]] if t in trained else _expert_prompts(t, 2, seed + 7919 * (i + 1))
            seg, src = cut_prompt(trajs, mean[i], std[i], cfg.prompt_len, rtg_scale, cfg.max_ep_len, g, segment)
            segs.append(seg)
            inputs.sources[t] = {"segment": segment, "episodes": "training prompts" if t in trained else "expert rollouts", **src}
        prompt = {k: torch.cat([s[k] for s in segs]).to(device) for k in segs[0]}
        was_training = model.training
        model.eval()
        with torch.inference_mode(), inputs.autocast():
            inputs.prompt_kv, inputs.prompt_valid = model.encode_prompt(prompt, inputs.ctx(torch.arange(len(tasks))))
        model.train(was_training)
    return inputs


MAX_EPISODES_AT_ONCE = 250  # live environments per chunk: MT50 x 20 at once (about 21 GB) would not fit 24 GB


def evaluate(model, task_masks, eval_info: dict, tasks: list[str], episodes: int, seed: int, *,
             backend: str | kernels.MaskedLinearOp = "reference",
             vote_threshold: int | None = None, batch_size: int | None = None, max_steps: int = 500, progress: bool = True,
             precision: str = "fp32", target_return: float | None = None, sim_workers: int | None = None,
             prompt_segment: str | None = None, stop_at_success: bool = False) -> dict:
    """Run ``episodes`` episodes of every task in ``tasks`` on the model's device (module docstring).
    ``backend``: the ``masked_linear`` op the masked layers run on (a field of
    ``kernels.select_backends(...)``), or the name of a concrete backend.
    ``batch_size``: rows (episodes) per forward; None = all at once up to ``MAX_EPISODES_AT_ONCE``
    (each live Meta-World env holds about 21 MB), 1 = one episode at a time at batch 1 (the
    official code's way, kept as a baseline). ``env_steps_per_s`` counts stepping
    time (model + simulator); building the envs is reported separately as ``setup_seconds``.
    ``sim_workers``: processes the simulator is split over (:class:`harmodt.envs.ShardedVectorEnv`);
    None = 2 when a chunk has at least 16 episodes and the machine has 2 cores, else 1. Results do
    not depend on it. ``prompt_segment``: "last" or "random" (see the module docstring); None = the
    one training used (``eval_info``; "random" for checkpoints written before the option existed).
    ``stop_at_success``: an episode's simulation ends at its first success, so success rates are
    those of full episodes (the policy still computes every row: running episodes act bit-for-bit
    as in full ones); returns stop there too (``returns_truncated``); ``env_steps``: steps simulated."""
    from .envs import ShardedVectorEnv, make_vector_env

    device, cfg = next(model.parameters()).device, model.cfg
    inputs = task_inputs(model, task_masks, eval_info, tasks, seed, backend=backend, vote_threshold=vote_threshold,
                         precision=precision, target_return=target_return, prompt_segment=prompt_segment)
    mean, std, rtg_scale, was_training = inputs.mean, inputs.std, inputs.rtg_scale, model.training
    model.eval()

    rows = torch.arange(len(tasks)).repeat_interleave(episodes)  # task index of every episode, task-major
    n_rows = len(rows)
    chunk = min(n_rows, MAX_EPISODES_AT_ONCE) if not batch_size else batch_size
    success, returns = np.zeros(n_rows, bool), np.zeros(n_rows)
    horizon = min(max_steps, 500)
    env_steps, seconds, setup_seconds = 0, 0.0, 0.0
    from tqdm import tqdm
    bar = tqdm(total=horizon * ((n_rows + chunk - 1) // chunk), disable=not progress, desc="evaluate", unit="step", dynamic_ncols=True)
    for c0 in range(0, n_rows, chunk):
        r = rows[c0 : c0 + chunk]
        b = len(r)
        t_setup = time.perf_counter()
        shards = sim_workers if sim_workers is not None else (2 if b >= 16 and (os.cpu_count() or 1) >= 2 else 1)
        env_tasks, env_seeds = [tasks[i] for i in r.tolist()], [seed * 100_003 + c0 + j for j in range(b)]
        envs = ShardedVectorEnv(env_tasks, env_seeds, shards) if shards > 1 or stop_at_success else make_vector_env(env_tasks, env_seeds)
        live = np.ones(b, bool)  # episodes still simulated (all, unless stop_at_success)
        obs, _ = envs.reset(seed=None)
        t_run = time.perf_counter()
        setup_seconds += t_run - t_setup
        ctx = inputs.ctx(r)
        kv, pvalid = inputs.prompt(r)
        m_rows, s_rows = torch.from_numpy(mean[r.numpy()]), torch.from_numpy(std[r.numpy()])
        # the episodes' histories live on the device; each step sends (state, reward) and gets the action back
        states = torch.zeros(b, horizon, cfg.state_dim, device=device)
        actions = torch.zeros(b, horizon, cfg.act_dim, device=device)
        rtg = torch.zeros(b, horizon, 1, device=device)
        rtg_now = torch.full((b,), inputs.target / rtg_scale)
        ids = inputs.embed_ids[r.to(device)]
        steps = torch.arange(horizon, device=device).clamp(max=cfg.max_ep_len - 1)
        for t in range(horizon):
            s_now = (torch.from_numpy(np.asarray(obs, dtype=np.float32)) - m_rows) / s_rows
            sent = torch.cat([s_now, rtg_now.unsqueeze(1)], dim=1).to(device, non_blocking=True)  # (B, S + 1): one transfer
            states[:, t], rtg[:, t, 0] = sent[:, :-1], sent[:, -1]
            lo = max(0, t - cfg.context_len + 1)
            with torch.inference_mode(), inputs.autocast():
                act = model.act(states[:, lo : t + 1], actions[:, lo : t + 1], rtg[:, lo : t + 1], steps[lo : t + 1].expand(b, -1), ids,
                                ctx, kv, pvalid)
            actions[:, t] = act.float()
            act_np = act.float().cpu().numpy()  # one transfer back
            env_steps += int(live.sum())
            if stop_at_success:  # finished episodes keep their last observation, reward 0 and success 0
                obs, rew, succ = envs.step_some(act_np.astype(np.float64), live)
            else:
                obs, rew, _, _, info = envs.step(act_np.astype(np.float64))
                succ = info.get("success", np.zeros(b))
            returns[c0 : c0 + b] += rew
            rtg_now = rtg_now - torch.from_numpy(np.asarray(rew, dtype=np.float32)) / rtg_scale
            success[c0 : c0 + b] |= np.asarray(succ, dtype=float) > 0
            bar.update(1)
            if stop_at_success and not (live := live & ~success[c0 : c0 + b]).any():
                bar.update(horizon - 1 - t)
                break
        seconds += time.perf_counter() - t_run
        envs.close()
        del envs
        return_freed_memory()
    bar.close()
    model.train(was_training)
    per_task = {}
    for i, t in enumerate(tasks):
        sel = (rows == i).numpy()
        per_task[t] = {"success": float(success[sel].mean()), "return": float(returns[sel].mean()), "episodes": int(sel.sum()),
                       "mask": inputs.mask_kind[t]}
        if t in inputs.sources:
            per_task[t]["prompt"] = inputs.sources[t]
    return {"tasks": per_task, "mean_success": float(np.mean([v["success"] for v in per_task.values()])),
            "env_steps": env_steps, "returns_truncated": stop_at_success, "seconds": seconds, "setup_seconds": setup_seconds,
            "backend": inputs.masked_linear.backend.name, "device": str(device), "env_steps_per_s": env_steps / max(seconds, 1e-9)}


def load_checkpoint(path: str, device: torch.device | str = "cpu"):
    """Model, TaskMasks (or None), eval_info, config dict and step from a training checkpoint,
    loaded safely (``weights_only=True``) and placed on ``device``."""
    from . import checkpoint
    from .config import ModelConfig, upgrade_saved_config
    from .masks import TaskMasks
    from .model import build_model

    try:
        ck = checkpoint.load(path)
    except CheckpointError as exc:
        raise EvalError(str(exc)) from None
    cfg = upgrade_saved_config(ck["config"])
    try:
        tasks = list(ck["eval_info"]["tasks"])
        model = build_model(ModelConfig(**cfg["model"]), len(tasks), cfg["method"], cfg.get("conditioning", "auto"))
        model.load_state_dict(ck["model"])
        masks = TaskMasks.from_per_task(ck["masks"], tasks, device, model.masked_weights()) if ck.get("masks") else None
    except (TypeError, RuntimeError, KeyError, ValueError, IndexError) as exc:
        raise EvalError(f"{path}: the weights do not fit the model its config describes ({checkpoint.one_line(exc)})") from None
    return model.to(device), masks, ck["eval_info"], cfg, int(ck.get("step", 0))


def result_entry(r: dict) -> dict:
    """A task's entry in a results file: success, return and, for a prompted model, its prompt."""
    return {"success": r["success"], "return": r["return"], **({"prompt": r["prompt"]} if "prompt" in r else {})}


def print_table(results: dict, file=sys.stdout) -> None:
    w = max([len(n) for n in results["tasks"]] + [4])
    print(f"{'task':<{w}}  success   return  mask", file=file)
    for name, r in results["tasks"].items():
        print(f"{name:<{w}}  {r['success']:7.2f}  {r['return']:8.1f}  {r.get('mask', '')}", file=file)
    print(f"{'mean':<{w}}  {results['mean_success']:7.2f}", file=file)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m harmodt.evaluate", description="Evaluate a harmodt checkpoint on Meta-World v3 (batched).")
    p.add_argument("checkpoint", help="checkpoint.pt written by harmodt.train")
    p.add_argument("--tasks", default=None,
                   help=f"tasks to evaluate (default: the checkpoint's; unseen tasks use the voted mask): {TASKS_HELP}")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task")
    p.add_argument("--out", default=None, help="write results JSON here")
    p.add_argument("--seed", type=int, default=12345, help="seed for goals and prompts")
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=False,
                   help="masked linears on the kernels of --backend (default: the plain-PyTorch reference)")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "cpu", "reference"],
                   help="kernel backend with --fused: auto (triton on CUDA, cpu on CPU) | triton | cpu | reference")
    p.add_argument("--vote-threshold", type=int, default=None, help="Eq. 13 threshold for unseen tasks (default: the training config's)")
    p.add_argument("--target-return", type=float, default=None, help="initial return-to-go (default: the training config's, 4500)")
    p.add_argument("--batch-size", type=int, default=None, help="episodes per forward (default: all at once, up to 250; 1 = sequential)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--prompt-segment", default=None, choices=["last", "random"],
                   help="prompt of each task: last = the best prompt episode's last K* steps before its final step; random = a window drawn from --seed "
                        "(default: the training config's)")
    p.add_argument("--sim-workers", type=int, default=None,
                   help="processes the simulator steps in (default: 2 for 16+ episodes on 2+ cores, else 1)")
    p.add_argument("--stop-at-success", action="store_true",
                   help="end each episode's simulation at its first success: the same success rates, less simulation; "
                        "returns are then truncated there (recorded in --out)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        from .runtime import keep_freed_memory
        from .tasks import parse_tasks

        keep_freed_memory()

        if args.episodes < 1:
            raise EvalError("--episodes must be at least 1")
        if args.sim_workers is not None and args.sim_workers < 1:
            raise EvalError("--sim-workers must be at least 1")
        if args.batch_size is not None and args.batch_size < 1:
            raise EvalError("--batch-size must be at least 1")
        if args.vote_threshold is not None and args.vote_threshold < 0:
            raise EvalError("--vote-threshold must be >= 0")
        if args.out:
            folder = os.path.dirname(os.path.abspath(args.out))
            if not os.path.isdir(folder):
                raise EvalError(f"--out {args.out}: the folder {folder} does not exist")
        from .config import ConfigError, resolve_device

        try:
            device = resolve_device(args.device) if args.device in ("auto", "cpu", "cuda") or args.device.startswith("cuda:") else None
        except ConfigError as exc:
            raise EvalError(str(exc)) from None
        if device is None:
            raise EvalError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
        try:
            backends = kernels.select_backends(device, args.fused, args.backend)
        except (kernels.BackendUnavailable, ValueError) as exc:
            raise EvalError(str(exc)) from None
        model, masks, info, cfg, step = load_checkpoint(args.checkpoint, device)
        print(f"[harmodt] device={device} precision={args.precision} fused={args.fused} kernels: masked_linear={backends.masked_linear.backend.name}",
              flush=True)
        try:
            tasks = parse_tasks(args.tasks) if args.tasks else list(info["tasks"])
        except ValueError as exc:
            raise EvalError(f"--tasks: {exc}") from None
        threshold = args.vote_threshold if args.vote_threshold is not None else cfg["masks"]["vote_threshold"]
        if args.precision == "bf16" and device.type == "cpu" and (note := bf16_matmul_note()):
            print(note, file=sys.stderr, flush=True)
        res = evaluate(model, masks, info, tasks, args.episodes, args.seed, backend=backends.masked_linear,
                       vote_threshold=threshold, batch_size=args.batch_size, progress=not args.no_progress,
                       precision=args.precision, target_return=args.target_return, sim_workers=args.sim_workers,
                       prompt_segment=args.prompt_segment, stop_at_success=args.stop_at_success)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_table(res)
    print(f"{res['env_steps']} env steps in {res['seconds']:.1f} s ({res['env_steps_per_s']:.0f} env-steps/s, "
          f"masks on {res['backend']}, model on {res['device']}; building the envs took {res['setup_seconds']:.1f} s)")
    if args.out:
        out = {"method": cfg["method"], "tasks": {t: result_entry(r) for t, r in res["tasks"].items()},
               "mean_success": res["mean_success"], "steps": step, **({"returns_truncated": True} if args.stop_at_success else {})}
        write_atomic(args.out, json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
