"""Prompt-DT batches, vectorized: context K, prompt K*, scaled returns-to-go, state normalization
(per task, or pooled over the tasks), left padding with an attention mask, trajectories sampled in proportion to length.

Each task's trajectories are concatenated once into flat tensors on the training device; a batch
is then one gather per field there (no Python loop per sample). Which steps to gather is drawn on
the CPU from a seeded generator, so a seed gives the same batches on every device. Prompts are
the last K* steps of a prompt episode drawn per row, ending one step before its final step
(``prompt_segment="last"``, exactly as Prompt-DT's code cuts them) or windows drawn anywhere in
one (``"random"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .formats import DataError

PROMPT_SEGMENTS = ("last", "random")  # how a row's prompt is cut (--prompt-segment)
STATE_NORMS = ("per-task", "pooled")  # states normalised per task or over every task (--state-norm)



def returns_to_go(rewards: np.ndarray) -> np.ndarray:
    """Undiscounted return from each step to the end of the trajectory."""
    return np.cumsum(rewards[::-1], dtype=np.float64)[::-1].astype(np.float32)


@dataclass
class _Flat:
    states: torch.Tensor  # (N, S) normalized, on the device
    actions: torch.Tensor  # (N, A), on the device
    rtg: torch.Tensor  # (N,) scaled, on the device
    timesteps: torch.Tensor  # (N,) int64, on the device
    starts: torch.Tensor  # (n_traj,) offset of each trajectory (CPU)
    lengths: torch.Tensor  # (n_traj,) (CPU)
    probs: torch.Tensor  # (n_traj,) sampling probability, proportional to length (CPU)

    def to(self, device) -> "_Flat":
        """The per-step tensors on ``device`` (the sampling tables stay on the CPU)."""
        return _Flat(self.states.to(device), self.actions.to(device), self.rtg.to(device), self.timesteps.to(device),
                     self.starts, self.lengths, self.probs)


def _flatten(trajs, mean, std, rtg_scale, max_ep_len) -> _Flat:
    states = np.concatenate([(t.observations - mean) / std for t in trajs]).astype(np.float32)
    actions = np.concatenate([t.actions for t in trajs]).astype(np.float32)
    rtg = np.concatenate([returns_to_go(t.rewards) for t in trajs]) / rtg_scale
    ts = np.concatenate([np.minimum(np.arange(len(t.rewards)), max_ep_len - 1) for t in trajs])
    lengths = np.array([len(t.rewards) for t in trajs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return _Flat(
        torch.from_numpy(states), torch.from_numpy(actions), torch.from_numpy(rtg.astype(np.float32)),
        torch.from_numpy(ts.astype(np.int64)), torch.from_numpy(starts), torch.from_numpy(lengths),
        torch.from_numpy(lengths / lengths.sum()),
    )


def _gather(flat: _Flat, traj: torch.Tensor, si: torch.Tensor, length: int) -> dict:
    """The windows of ``length`` steps starting at step ``si`` of trajectories ``traj`` (both (n,),
    CPU), cut at the trajectory end and left-padded."""
    n = traj.shape[0]
    lens = flat.lengths[traj]
    real = torch.minimum(lens - si, torch.full_like(lens, length))  # steps available (n,)
    off = torch.arange(length).unsqueeze(0) - (length - real).unsqueeze(1)  # (n, length), <0 = padding
    valid = off >= 0
    idx = flat.starts[traj].unsqueeze(1) + si.unsqueeze(1) + off.clamp(min=0)  # (n, length)
    dev = flat.states.device
    idx, valid = idx.to(dev, non_blocking=True), valid.to(dev, non_blocking=True)
    vf = valid.unsqueeze(-1).float()
    return {
        "states": flat.states[idx] * vf,  # (n, L, S)
        "actions": flat.actions[idx] * vf,  # (n, L, A); padding actions are 0
        "rtg": (flat.rtg[idx] * valid).unsqueeze(-1),  # (n, L, 1)
        "timesteps": flat.timesteps[idx] * valid,  # (n, L)
        "mask": valid,  # (n, L)
    }


def _last_start(flat: _Flat, traj: torch.Tensor, length: int) -> torch.Tensor:
    """The start step of each trajectory's prompt window, as Prompt-DT's ``get_prompt`` cuts it:
    ``max(0, len - length - 1)``, so a trajectory longer than ``length`` gives the ``length`` steps
    that end one step before its final step; one of at most ``length + 1`` steps starts at 0 (cut
    at its end, left-padded when shorter than ``length``). (n,)"""
    return (flat.lengths[traj] - length - 1).clamp(min=0)


def sample_segments(flat: _Flat, n: int, length: int, generator: torch.Generator) -> dict:
    """n windows of ``length`` steps (trajectories drawn in proportion to their length, start step
    uniform in the trajectory), cut at the trajectory end and left-padded."""
    traj = torch.multinomial(flat.probs, n, replacement=True, generator=generator)  # (n,)
    si = (torch.rand(n, generator=generator) * flat.lengths[traj]).long()  # start step in [0, len)
    return _gather(flat, traj, si, length)


def last_segments(flat: _Flat, n: int, length: int, generator: torch.Generator) -> dict:
    """n prompts as Prompt-DT trains with them: the window of :func:`_last_start` (the last
    ``length`` steps before a trajectory's final step) of a trajectory drawn uniformly per row
    (left-padded when it is shorter)."""
    traj = torch.randint(len(flat.lengths), (n,), generator=generator)  # (n,)
    return _gather(flat, traj, _last_start(flat, traj, length), length)


def best_prompt_choice(trajs) -> int:
    """The index of the highest-return trajectory (ties: the lowest index)."""
    returns = [float(np.sum(t.rewards, dtype=np.float64)) for t in trajs]
    return int(np.argmax(returns))  # argmax returns the first of equal maxima


def prompt_segment(trajs, mean, std, prompt_len: int, rtg_scale: float, max_ep_len: int, generator: torch.Generator,
                   segment: str = "random") -> tuple[dict, dict]:
    """One K*-step prompt (batch of 1) from prompt trajectories, normalized like training data, and
    where it came from: ``{"episode": index in trajs, "timesteps": [its steps]}``.

    ``segment``: "last" = the highest-return trajectory's last K* steps before its final step
    (:func:`_last_start`; deterministic, as the official evaluation); "random" = a window drawn
    from ``generator`` as in :func:`sample_segments`.
    """
    flat = _flatten(trajs, mean, std, rtg_scale, max_ep_len)
    if segment == "last":
        traj = torch.tensor([best_prompt_choice(trajs)])
        si = _last_start(flat, traj, prompt_len)
    else:
        traj = torch.multinomial(flat.probs, 1, replacement=True, generator=generator)
        si = (torch.rand(1, generator=generator) * flat.lengths[traj]).long()
    seg = _gather(flat, traj, si, prompt_len)
    first, real = int(si[0]), int(seg["mask"][0].sum())
    source = {"episode": int(traj[0]), "timesteps": list(range(first, first + real))}
    return {"prompt_" + k: v for k, v in seg.items()}, source


def state_stats(datasets: dict, tasks: list[str], state_norm: str = "per-task") -> tuple[dict, dict]:
    """Each task's state mean and std (std + 1e-6) over its training trajectories' states:
    "per-task" = from the task's own states (HarmoDT's code); "pooled" = one mean and std over
    every task's states concatenated (Prompt-DT's code), the same arrays for every task."""
    if state_norm not in STATE_NORMS:
        raise ValueError(f"state_norm must be one of {', '.join(STATE_NORMS)}, got {state_norm!r}")
    obs = {name: np.concatenate([t.observations for t in datasets[name].trajectories]) for name in tasks}
    if state_norm == "pooled":
        mean, std = _mean_std(np.concatenate([obs[name] for name in tasks]), ", ".join(tasks))
        return dict.fromkeys(tasks, mean), dict.fromkeys(tasks, std)
    stats = {name: _mean_std(o, name) for name, o in obs.items()}
    return {name: m for name, (m, _) in stats.items()}, {name: s for name, (_, s) in stats.items()}


def _mean_std(obs: np.ndarray, tasks: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std + 1e-6 of the states ``obs`` (T, S) as float32. Computed in the data's float32 and,
    where that overflows (finite but huge observations), again in float64; a DataError names
    ``tasks`` when the statistics are still not finite float32 numbers (every state would normalize to 0)."""
    with np.errstate(over="ignore", invalid="ignore"):
        mean, std = obs.mean(0).astype(np.float32), (obs.std(0) + 1e-6).astype(np.float32)
    if np.isfinite(mean).all() and np.isfinite(std).all():
        return mean, std
    wide = obs.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        mean, std = wide.mean(0).astype(np.float32), (wide.std(0) + 1e-6).astype(np.float32)
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise DataError(f"the data of {tasks}: the observations' mean or spread exceeds the float32 range (largest magnitude "
                        f"{np.abs(wide).max():.3g}); states cannot be normalized")
    return mean, std


def batch_segments(task_ids: list[int], batch_size: int) -> tuple:
    """``((task, sequences), ...)``: how a batch of ``batch_size`` sequences of ``task_ids`` is laid
    out, the sequences split evenly over the tasks in order, the first ones one more (tasks that
    get none left out)."""
    n = len(task_ids)
    counts = [batch_size // n + (1 if i < batch_size % n else 0) for i in range(n)]
    return tuple((t, c) for t, c in zip(task_ids, counts) if c)


class PromptDTBatcher:
    """Samples training batches for any set of tasks.

    ``tasks``: ordered task names (index = task id); ``datasets``: name -> TaskData.
    ``prompt_segment``: how each row's K*-step prompt is cut from the task's prompt episodes:
    "last" = the last K* steps before the final step of an episode drawn uniformly per row
    (Prompt-DT's code);
    "random" = a window anywhere, drawn like the history windows.
    ``state_norm``: how states are normalized, see :func:`state_stats`.
    """

    def __init__(self, datasets: dict, tasks: list[str], context_len: int, prompt_len: int, rtg_scale: float,
                 max_ep_len: int = 500, seed: int = 0, device: torch.device | str = "cpu", prompt_segment: str = "last",
                 state_norm: str = "per-task"):
        if prompt_segment not in PROMPT_SEGMENTS:
            raise ValueError(f"prompt_segment must be one of {', '.join(PROMPT_SEGMENTS)}, got {prompt_segment!r}")
        self.tasks = list(tasks)
        self.prompt_segment = prompt_segment
        self.k = context_len
        self.kp = prompt_len
        self.rtg_scale = rtg_scale
        self.generator = torch.Generator().manual_seed(seed)
        self.state_mean, self.state_std = state_stats(datasets, self.tasks, state_norm)
        self.data, self.prompts = [], []
        for name in self.tasks:
            td = datasets[name]
            mean, std = self.state_mean[name], self.state_std[name]
            self.data.append(_flatten(td.trajectories, mean, std, rtg_scale, max_ep_len).to(device))
            self.prompts.append(_flatten(td.prompts, mean, std, rtg_scale, max_ep_len).to(device))
        self.device = torch.device(device)

    def sample(self, task_ids: list[int], batch_size: int) -> dict:
        """A batch of ``batch_size`` rows spread evenly over ``task_ids`` (one id = Algorithm 1),
        laid out as :func:`batch_segments` says."""
        parts = []
        for tid, n in batch_segments(task_ids, batch_size):
            seg = sample_segments(self.data[tid], n, self.k, self.generator)
            if self.kp > 0:
                draw = last_segments if self.prompt_segment == "last" else sample_segments
                pr = draw(self.prompts[tid], n, self.kp, self.generator)
                seg.update({"prompt_" + key: v for key, v in pr.items()})
            seg["task_ids"] = torch.full((n,), tid, dtype=torch.int64, device=self.device)
            parts.append(seg)
        if len(parts) == 1:
            return parts[0]
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    def normalize(self, tid: int, obs: np.ndarray) -> np.ndarray:
        name = self.tasks[tid]
        return (obs - self.state_mean[name]) / self.state_std[name]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, d: dict) -> None:
        self.generator.set_state(d["generator"])
