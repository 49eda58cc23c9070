"""`python -m harmodt.evaluate CHECKPOINT`: batched evaluation on Meta-World v3.

Every task x episode runs together: one vector env with one env per (task, episode) on the CPU
(16 or more episodes split over two processes that step concurrently, ``sim_workers``; results
are the same), and one model forward per timestep for all running episodes, each row through its
own task's mask (Algorithm 1's inference stage, batched), with one transfer of the observations
and one of the actions per step. Each task's masked weights ``W * M_t`` are made once
(``harmodt_kernels.CachedMaskedLinearOp``): a forward is GEMMs alone. The prompt's keys and values are
computed once per task, and the last block runs for the last state token only
(:meth:`harmodt.model.PromptDT.act`). Unseen tasks act through the voted mask of Eq. 13.
Episodes last 500 steps (``--stop-at-success``: until their first success); an episode succeeds
if it succeeds at any step; goals are random per episode but seeded.

At most ``MAX_EPISODES_AT_ONCE`` episodes run together (each live Meta-World env holds about
21 MB: MT50 x 20 at once would need about 21 GB); more run in chunks of that many, each episode
with its own seeded goal as if all ran at once.

Every task's prompt, mask row and state normalization come from
:func:`harmodt.policy_inputs.task_inputs` (which prompt window, and unseen tasks' prompts and
normalization, are described there); :class:`harmodt.agent.HarmoDTAgent` acts through the same
inputs.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

import harmodt_kernels

from .checkpoint import CheckpointError
from .config import EVALUATION_GOALS_SEED, selection_goals_problem
from .files import FolderLock, OutputError, finite_json, read_json, unwritable_file, write_atomic
from .flags import field_flag
from .oneline import OneLineParser, interruptible
from .ownership import check_output_file, run_files
from .policy_inputs import EvalError, task_inputs
from .runtime import bf16_matmul_note, return_freed_memory
from .tasks import TASKS_HELP


MAX_EPISODES_AT_ONCE = 250  # live environments at a time, about 5 GB of simulators


def evaluate(model, task_masks, eval_info: dict, tasks: list[str], episodes: int, seed: int, *,
             backend: str | harmodt_kernels.MaskedLinearOp = "reference",
             vote_threshold: int | None = None, batch_size: int | None = None, max_steps: int = 500,
             progress: bool = True,
             precision: str = "fp32", target_return: float | None = None, sim_workers: int | None = None,
             prompt_segment: str | None = None, stop_at_success: bool = False) -> dict:
    """Run ``episodes`` episodes of every task in ``tasks`` on the model's device (module docstring).
    ``backend``: the ``masked_linear`` op the masked layers run on (a field of
    ``harmodt_kernels.select_backends(...)``), or the name of a concrete backend.
    ``batch_size``: episodes run together (rows per forward); None = all at once up to
    ``MAX_EPISODES_AT_ONCE``, 1 = one episode at a time at batch 1 (the official code's way, kept
    as a baseline). ``env_steps_per_s`` counts stepping
    time (model + simulator); building the envs is reported separately as ``setup_seconds``.
    ``sim_workers``: processes the simulator is split over (:class:`harmodt.envs.ShardedVectorEnv`);
    None = 2 when a chunk has at least 16 episodes and the machine has 2 cores, else 1. Results do
    not depend on it. ``prompt_segment``: "last", "first" or "random" (see the module docstring); None = the
    one training used (``eval_info``; "random" for checkpoints written before the option existed).
    ``stop_at_success``: an episode's simulation ends at its first success, and the policy computes
    the running episodes' rows alone, so their actions equal full episodes' up to the GEMMs'
    rounding (a batch of fewer rows) and success rates are those of full episodes up to it; returns
    stop there too (``returns_truncated``); ``env_steps``: steps simulated."""
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
    bar = tqdm(total=horizon * ((n_rows + chunk - 1) // chunk), disable=not progress, desc="evaluate", unit="step",
               dynamic_ncols=True)
    for c0 in range(0, n_rows, chunk):
        r = rows[c0 : c0 + chunk]
        b = len(r)
        t_setup = time.perf_counter()
        shards = sim_workers if sim_workers is not None else (2 if b >= 16 and (os.cpu_count() or 1) >= 2 else 1)
        env_tasks, env_seeds = [tasks[i] for i in r.tolist()], [seed * 100_003 + c0 + j for j in range(b)]
        envs = (ShardedVectorEnv(env_tasks, env_seeds, shards) if shards > 1 or stop_at_success
                else make_vector_env(env_tasks, env_seeds))
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
        sel = None  # the rows the policy computes: None = all; with stop_at_success, the live ones once some finished
        for t in range(horizon):
            s_now = (torch.from_numpy(np.asarray(obs, dtype=np.float32)) - m_rows) / s_rows
            # (B, S + 1): one transfer
            sent = torch.cat([s_now, rtg_now.unsqueeze(1)], dim=1).to(device, non_blocking=True)
            states[:, t], rtg[:, t, 0] = sent[:, :-1], sent[:, -1]
            lo = max(0, t - cfg.context_len + 1)
            with torch.inference_mode(), inputs.autocast():
                if sel is None:
                    act = model.act(states[:, lo : t + 1], actions[:, lo : t + 1], rtg[:, lo : t + 1],
                                    steps[lo : t + 1].expand(b, -1),
                                    ids, ctx, kv, pvalid)
                else:  # the live rows alone (a finished episode's action is never stepped)
                    act = torch.zeros(b, cfg.act_dim, device=device, dtype=torch.float32)
                    act[sel] = model.act(states[sel, lo : t + 1], actions[sel, lo : t + 1], rtg[sel, lo : t + 1],
                                         steps[lo : t + 1].expand(len(sel), -1), sel_ids, sel_ctx, sel_kv,
                                         sel_pvalid).float()
            act = act.float()
            actions[:, t] = act
            act_np = act.cpu().numpy()  # one transfer back
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
            # some finished: the policy drops their rows
            if stop_at_success and int(live.sum()) != (b if sel is None else len(sel)):
                keep = torch.from_numpy(np.flatnonzero(live))
                sel = keep.to(device)
                sel_ids, sel_ctx = ids[sel], inputs.ctx(r[keep])
                sel_kv, sel_pvalid = inputs.prompt(r[keep])
        seconds += time.perf_counter() - t_run
        envs.close()
        del envs
        return_freed_memory()  # the chunk's simulators: the next chunk (or training) does not grow on top of them
    bar.close()
    model.train(was_training)
    per_task = {}
    for i, t in enumerate(tasks):
        sel = (rows == i).numpy()
        per_task[t] = {"success": float(success[sel].mean()), "return": float(returns[sel].mean()),
                       "episodes": int(sel.sum()),
                       "mask": inputs.mask_kind[t]}
        if t in inputs.sources:
            per_task[t]["prompt"] = inputs.sources[t]
    return {"tasks": per_task, "mean_success": float(np.mean([v["success"] for v in per_task.values()])),
            "env_steps": env_steps, "returns_truncated": stop_at_success, "seconds": seconds,
            "setup_seconds": setup_seconds,
            "backend": inputs.masked_linear.backend.name, "device": str(device),
            "env_steps_per_s": env_steps / max(seconds, 1e-9)}


def load_checkpoint(path: str, device: torch.device | str = "cpu", target_return: float | None = None):
    """Model, masks (its method's mask kind, harmodt.mask_kinds.MaskKind; None for a dense method),
    eval_info, config dict and step from a training checkpoint,
    loaded safely (``weights_only=True``), checked (:func:`harmodt.checkpoint_contents.check_checkpoint`;
    ``target_return``: the one evaluation uses instead of the checkpoint's) and placed on ``device``."""
    from . import checkpoint
    from .checkpoint_contents import CheckpointContentError, check_checkpoint
    from .config import ModelConfig
    from .masks import TaskMasks
    from .methods import METHODS, build_model

    try:
        ck = checkpoint.load(path)
        cfg = check_checkpoint(ck, path, target_return)
    except (CheckpointError, CheckpointContentError) as exc:
        raise EvalError(str(exc)) from None
    try:
        tasks = list(ck["eval_info"]["tasks"])
        model = build_model(ModelConfig(**cfg["model"]), len(tasks), cfg["method"], cfg.get("conditioning", "auto"))
        model.load_state_dict(ck["model"])
        kind = METHODS[cfg["method"]].mask_kind or TaskMasks  # (binary masks of a dense method: read as they are)
        masks = kind.from_state(ck["masks"], tasks, device, model.masked_weights()) if ck.get("masks") else None
    except (TypeError, RuntimeError, KeyError, ValueError, IndexError) as exc:
        raise EvalError(f"{path}: the weights do not fit the model its config describes "
                        f"({checkpoint.one_line(exc)})") from None
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
    p = OneLineParser(prog="python -m harmodt.evaluate",
                      description="Evaluate a harmodt checkpoint on Meta-World v3 (batched).")
    p.add_argument("checkpoint", help="checkpoint.pt written by harmodt.train")
    field_flag(p, "tasks", default=None,
               help=f"tasks to evaluate (default: the checkpoint's; unseen tasks use the voted mask): {TASKS_HELP}")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task")
    p.add_argument("--out", default=None, help="write results JSON here (a new file, or one this command wrote)")
    p.add_argument("--overwrite", action="store_true",
                   help="let --out replace a file of a run, data set or study, or a checkpoint (never the checkpoint "
                        "evaluated)")
    field_flag(p, "seed", default=EVALUATION_GOALS_SEED,
               help="seed for goals and prompts (not its run's --validation-seed)")
    p.add_argument("--allow-validation-goals", action="store_true",
                   help="score a checkpoint on the goals its run was validated on (biased)")
    field_flag(p, "device")
    field_flag(p, "fused", help="masked linears on the kernels of --backend (default: the plain-PyTorch reference)")
    field_flag(p, "backend")
    field_flag(p, "masks.vote_threshold", type=int, default=None,
               help="Eq. 13 threshold for unseen tasks (default: the training config's)")
    field_flag(p, "target_return", default=None, help="initial return-to-go (default: the training config's, 4500)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="episodes run together (default: all at once, up to 250; 1 = sequential)")
    field_flag(p, "precision", choices=["fp32", "bf16"], help=None)
    field_flag(p, "prompt_segment", default=None,
               help="prompt of each task: last = the best prompt episode's last K* steps before its final step; "
                    "random = a window drawn from --seed (default: the training config's)")
    p.add_argument("--sim-workers", type=int, default=None,
                   help="processes the simulator steps in (default: 2 for 16+ episodes on 2+ cores, else 1)")
    field_flag(p, "stop_at_success", action="store_true",
               help="end each episode's simulation at its first success: the same success rates, less simulation; "
                    "returns are then truncated there (recorded in --out)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        return _evaluate_command(args)
    except (EvalError, OutputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _evaluate_command(args) -> int:
    """``main``'s work on the parsed flags: every check, then (holding the lock of the run folder
    ``--out`` writes into, if any) the evaluation and its outputs."""
    from .config import ConfigError, resolve_device
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
    if args.out and (bad := unwritable_file(args.out)):
        raise EvalError(f"--out {args.out}: {bad}")
    if args.out:
        check_output_file(args.out, "--out", [args.checkpoint], args.overwrite, own=is_evaluation_file)
    try:
        named = args.device in ("auto", "cpu", "cuda") or args.device.startswith("cuda:")
        device = resolve_device(args.device) if named else None
    except ConfigError as exc:
        raise EvalError(str(exc)) from None
    if device is None:
        raise EvalError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    try:
        backends = harmodt_kernels.select_backends(device, args.fused, args.backend)
    except (harmodt_kernels.BackendUnavailable, ValueError) as exc:
        raise EvalError(str(exc)) from None
    with run_lock(args.out):  # evaluating into a run's folder: its one writer meanwhile
        model, masks, info, cfg, step = load_checkpoint(args.checkpoint, device, args.target_return)
        if not args.allow_validation_goals and (bad := selection_goals_problem(cfg, args.seed)):
            raise EvalError(f"--seed {args.seed}: {args.checkpoint} {bad}; choose another --seed or pass "
                            "--allow-validation-goals")
        print(f"[harmodt] device={device} precision={args.precision} fused={args.fused} kernels: "
              f"masked_linear={backends.masked_linear.backend.name}",
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
        write_results(args, res, cfg, step)
    return 0


def write_results(args, res: dict, cfg: dict, step: int) -> None:
    """The table and, with ``--out``, the results file of an evaluation."""
    print_table(res)
    print(f"{res['env_steps']} env steps in {res['seconds']:.1f} s ({res['env_steps_per_s']:.0f} env-steps/s, "
          f"masks on {res['backend']}, model on {res['device']}; building the envs took {res['setup_seconds']:.1f} s)")
    if args.out:
        out = {"method": cfg["method"], "tasks": {t: result_entry(r) for t, r in res["tasks"].items()},
               "mean_success": res["mean_success"], "steps": step,
               **({"returns_truncated": True} if args.stop_at_success else {})}
        write_atomic(args.out, finite_json(out, indent=2))  # (its folder was found writable before the evaluation)


# what an --out file of this command holds
EVALUATION_KEYS = {"method", "tasks", "mean_success", "steps", "returns_truncated"}


def is_evaluation_file(path) -> bool:
    """Whether ``path`` is a results file this command wrote (its keys and no others: a run's
    results.json holds more), which ``--out`` may replace."""
    try:
        res = read_json(path)
    except (OSError, ValueError):
        return False
    return isinstance(res, dict) and {"tasks", "mean_success"} <= set(res) <= EVALUATION_KEYS


def run_lock(out: str | None):
    """The lock of the run folder ``--out`` writes into (:class:`harmodt.files.FolderLock`), or a lock of nothing."""
    from contextlib import nullcontext

    folder = os.path.dirname(os.path.abspath(out)) if out else None
    return FolderLock(folder, "--out: the run folder") if folder and run_files(folder) else nullcontext()


if __name__ == "__main__":
    sys.exit(interruptible(main, "evaluation interrupted: nothing written"))
