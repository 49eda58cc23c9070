"""Prompt-DT batches, vectorized: context K, prompt K*, scaled returns-to-go, state normalization
(per task, or pooled over the tasks), left padding with an attention mask, trajectories sampled in proportion to length.

Each task's trajectories are concatenated once into flat tensors on the training device; a batch
is then one gather per field there (no Python loop per sample). Which steps to gather is drawn on
the CPU from a seeded generator, so a seed gives the same batches on every device. Prompts are
the last K* steps of a prompt episode drawn per row, ending one step before its final step
(``prompt_segment="last"``, exactly as Prompt-DT's code cuts them), its first K* steps
(``"first"``: the episode's start, where the states tell the tasks apart) or windows drawn
anywhere in one (``"random"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .formats import DataError

PROMPT_SEGMENTS = ("last", "random", "first")  # how a row's prompt is cut (--prompt-segment)
STATE_NORMS = ("per-task", "pooled")  # states normalised per task or over every task (--state-norm)



def returns_to_go(rewards: np.ndarray) -> np.ndarray:
    """Undiscounted return from each step to the end of the trajectory."""
    return np.cumsum(rewards[::-1], dtype=np.float64)[::-1].astype(np.float32)


@dataclass
class _Flat:
    """Trajectories concatenated for sampling: the per-step fields on the device, and where each
    trajectory starts and how long it is (numpy, on the host: a batch's indices are computed there)."""

    states: torch.Tensor  # (N, S) normalized, on the device
    actions: torch.Tensor  # (N, A), on the device
    rtg: torch.Tensor  # (N,) scaled, on the device
    timesteps: torch.Tensor  # (N,) int64, on the device
    starts: np.ndarray  # (n_traj,) int64, row of each trajectory's first step
    lengths: np.ndarray  # (n_traj,) int64
    probs: torch.Tensor  # (n_traj,) float64 (CPU), sampling probability, proportional to length

    def to(self, device) -> "_Flat":
        """The per-step tensors on ``device`` (the sampling tables stay on the host)."""
        return _Flat(self.states.to(device), self.actions.to(device), self.rtg.to(device), self.timesteps.to(device),
                     self.starts, self.lengths, self.probs)


def _flatten(trajs, mean, std, rtg_scale, max_ep_len) -> _Flat:
    states = np.concatenate([(t.observations - mean) / std for t in trajs]).astype(np.float32)
    actions = np.concatenate([t.actions for t in trajs]).astype(np.float32)
    rtg = np.concatenate([returns_to_go(t.rewards) for t in trajs]) / rtg_scale
    ts = np.concatenate([np.minimum(np.arange(len(t.rewards)), max_ep_len - 1) for t in trajs])
    lengths = np.array([len(t.rewards) for t in trajs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return _Flat(
        torch.from_numpy(states), torch.from_numpy(actions), torch.from_numpy(rtg.astype(np.float32)),
        torch.from_numpy(ts.astype(np.int64)), starts, lengths, torch.from_numpy(lengths / lengths.sum()),
    )


def _concatenate(flats: list[_Flat]) -> tuple[_Flat, list[_Flat]]:
    """One table of every task's steps, and per task a view of it (its trajectories' ``starts``
    moved to their rows in the table): a batch of any tasks is then one gather per field."""
    table = _Flat(*(torch.cat([getattr(f, k) for f in flats]) for k in ("states", "actions", "rtg", "timesteps")),
                  np.zeros(0, np.int64), np.zeros(0, np.int64), torch.zeros(0, dtype=torch.float64))
    offsets = np.cumsum([0] + [f.states.shape[0] for f in flats[:-1]])
    return table, [_Flat(table.states, table.actions, table.rtg, table.timesteps, f.starts + off, f.lengths, f.probs)
                   for f, off in zip(flats, offsets)]


def _windows(flat: _Flat, traj: np.ndarray, si: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of the windows of ``length`` steps starting at step ``si`` of trajectories ``traj``
    (both (n,)), cut at the trajectory end and left-padded: (rows (n, length) int64, valid (n,
    length) int64, 0 on padding; a padding position holds the window's first row)."""
    real = np.minimum(flat.lengths[traj] - si, length)  # steps available (n,)
    off = np.arange(length)[None, :] - (length - real)[:, None]  # (n, length), <0 = padding
    rows = flat.starts[traj][:, None] + si[:, None] + np.maximum(off, 0)
    return rows, (off >= 0).astype(np.int64)


def _draw_starts(flat: _Flat, n: int, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n (trajectory, start step) pairs: trajectories drawn in proportion to their length, the start
    step uniform in the trajectory (float32 products, truncated). (n,) each."""
    traj = torch.multinomial(flat.probs, n, replacement=True, generator=generator).numpy()
    u = torch.rand(n, generator=generator).numpy()
    return traj, (u * flat.lengths[traj].astype(np.float32)).astype(np.int64)


def _draw_segments(flat: _Flat, n: int, length: int, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n windows of ``length`` steps at :func:`_draw_starts`, as :func:`_windows`."""
    return _windows(flat, *_draw_starts(flat, n, generator), length)


def _draw_cut(flat: _Flat, n: int, length: int, generator: torch.Generator,
              segment: str) -> tuple[np.ndarray, np.ndarray]:
    """n prompts as Prompt-DT trains with them: the window ``segment`` cuts (:data:`_CUTS`) of a
    trajectory drawn uniformly per row (left-padded when it is shorter), as :func:`_windows`."""
    traj = torch.randint(len(flat.lengths), (n,), generator=generator).numpy()  # (n,)
    return _windows(flat, traj, _CUTS[segment](flat, traj, length), length)


def _last_start(flat: _Flat, traj: np.ndarray, length: int) -> np.ndarray:
    """The start step of each trajectory's prompt window, as Prompt-DT's ``get_prompt`` cuts it:
    ``max(0, len - length - 1)``, so a trajectory longer than ``length`` gives the ``length`` steps
    that end one step before its final step; one of at most ``length + 1`` steps starts at 0 (cut
    at its end, left-padded when shorter than ``length``). (n,)"""
    return np.maximum(flat.lengths[traj] - length - 1, 0)


def _first_start(flat: _Flat, traj: np.ndarray, length: int) -> np.ndarray:
    """Step 0 of each trajectory: its first ``length`` steps (all of it, left-padded, when shorter). (n,)"""
    return np.zeros(len(traj), np.int64)


_CUTS = {"last": _last_start, "first": _first_start}  # the deterministic cuts of an episode (not "random")
FIELDS = ("states", "actions", "rtg", "timesteps", "mask")  # a window's fields (a prompt's: "prompt_" + field)


def _fill_rows(table: _Flat, rows: torch.Tensor, valid: torch.Tensor, dst: dict) -> None:
    """Gathers the table's ``rows`` ((R,) int64, on the device) into ``dst``'s matrices, zero where
    ``valid`` ((R,) int64) is 0: states (R, S), actions (R, A), rtg (R,), timesteps (R,), mask (R,)
    bool."""
    keep = valid.to(table.states.dtype)  # (R,) 1.0 or 0.0
    column = keep.unsqueeze(-1)
    for key in ("states", "actions"):  # x * 1.0 or x * 0.0: padding is 0 (-0.0 for a negative value, as always)
        torch.index_select(getattr(table, key), 0, rows, out=dst[key]).mul_(column)
    torch.index_select(table.rtg, 0, rows, out=dst["rtg"]).mul_(keep)
    torch.index_select(table.timesteps, 0, rows, out=dst["timesteps"]).mul_(valid)
    dst["mask"].copy_(valid)


def _matrices(n_rows: int, table: _Flat) -> dict:
    """One (rows, features) tensor per field, on the table's device, for :func:`_fill_rows`."""
    dev = table.states.device
    return {"states": torch.empty(n_rows, table.states.shape[1], device=dev),
            "actions": torch.empty(n_rows, table.actions.shape[1], device=dev),
            "rtg": torch.empty(n_rows, device=dev),
            "timesteps": torch.empty(n_rows, dtype=torch.int64, device=dev),
            "mask": torch.empty(n_rows, dtype=torch.bool, device=dev)}


def _windows_of(matrices: dict, n: int, lengths: dict) -> dict:
    """Batch tensors as views of ``matrices``' rows: ``lengths`` = {prefix: window length}, in row
    order ("" the history, "prompt_" the prompt); each prefix's n windows take n * length rows.
    states (n, L, S), actions (n, L, A), rtg (n, L, 1), timesteps (n, L), mask (n, L)."""
    out, first = {}, 0
    for prefix, length in lengths.items():
        for key, m in matrices.items():
            tail = (1,) if key == "rtg" else m.shape[1:]
            out[prefix + key] = m[first: first + n * length].view(n, length, *tail)
        first += n * length
    return out


def _gather(flat: _Flat, rows: np.ndarray, valid: np.ndarray) -> dict:
    """The windows of :func:`_windows` as new tensors on the data's device."""
    (n, length), dev = rows.shape, flat.states.device
    matrices = _matrices(n * length, flat)
    _fill_rows(flat, torch.from_numpy(rows.reshape(-1)).to(dev), torch.from_numpy(valid.reshape(-1)).to(dev), matrices)
    return _windows_of(matrices, n, {"": length})


def episode_segments(flat: _Flat, length: int, segment: str, generator: torch.Generator) -> dict:
    """One ``length``-step window of every trajectory of ``flat``, in order, cut as a prompt is:
    "last" = the window of :func:`_last_start`; "first" = its first ``length`` steps; "random" = a
    start step uniform in the trajectory (drawn from ``generator``), cut at its end and left-padded."""
    if segment not in PROMPT_SEGMENTS:
        raise ValueError(f"segment must be one of {', '.join(PROMPT_SEGMENTS)}, got {segment!r}")
    traj = np.arange(len(flat.lengths))  # (n_traj,)
    if segment in _CUTS:
        si = _CUTS[segment](flat, traj, length)
    else:  # (float32 products, truncated, as _draw_starts)
        si = (torch.rand(len(traj), generator=generator).numpy() * flat.lengths.astype(np.float32)).astype(np.int64)
    return _gather(flat, *_windows(flat, traj, si, length))


def first_states(flat: _Flat) -> torch.Tensor:
    """The first (normalized) state of every trajectory of ``flat``. (n_traj, S)"""
    return flat.states[torch.from_numpy(flat.starts).to(flat.states.device)]


def best_prompt_choice(trajs) -> int:
    """The index of the highest-return trajectory (ties: the lowest index)."""
    returns = [float(np.sum(t.rewards, dtype=np.float64)) for t in trajs]
    return int(np.argmax(returns))  # argmax returns the first of equal maxima


def prompt_segment(trajs, mean, std, prompt_len: int, rtg_scale: float, max_ep_len: int, generator: torch.Generator,
                   segment: str = "random") -> tuple[dict, dict]:
    """One K*-step prompt (batch of 1) from prompt trajectories, normalized like training data, and
    where it came from: ``{"episode": index in trajs, "timesteps": [its steps]}``.

    ``segment``: "last" = the highest-return trajectory's last K* steps before its final step
    (:func:`_last_start`; deterministic, as the official evaluation); "first" = the same episode's
    first K* steps; "random" = a window drawn from ``generator`` as in :func:`_draw_starts`.
    """
    flat = _flatten(trajs, mean, std, rtg_scale, max_ep_len)
    if segment in _CUTS:
        traj = np.array([best_prompt_choice(trajs)])
        si = _CUTS[segment](flat, traj, prompt_len)
    else:
        traj, si = _draw_starts(flat, 1, generator)
    seg = _gather(flat, *_windows(flat, traj, si, prompt_len))
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
        raise DataError(f"the data of {tasks}: the observations' mean or spread exceeds the float32 range (largest "
                        f"magnitude {np.abs(wide).max():.3g}); states cannot be normalized")
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
    (Prompt-DT's code); "first" = the first K* steps of such an episode (its start);
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
        norm = [(self.state_mean[t], self.state_std[t]) for t in self.tasks]
        # one table of every task's history steps, then every task's prompt steps: a batch is one gather per field
        flats = [_flatten(getattr(datasets[t], part), m, sd, rtg_scale, max_ep_len)
                 for part in ("trajectories", "prompts") for t, (m, sd) in zip(self.tasks, norm)]
        self.table, views = _concatenate([f.to(device) for f in flats])
        self.data, self.prompts = views[:len(self.tasks)], views[len(self.tasks):]
        self.device = torch.device(device)

    def sample(self, task_ids: list[int], batch_size: int) -> dict:
        """A batch of ``batch_size`` rows spread evenly over ``task_ids`` (one id = Algorithm 1),
        laid out as :func:`batch_segments` says: new tensors on the device."""
        return self.sample_into(task_ids, self.empty_batch(batch_size))

    def empty_batch(self, batch_size: int) -> dict:
        """Tensors for :meth:`sample_into`: :meth:`sample`'s keys, shapes and dtypes, each field's history and
        prompt windows views of one matrix (so that a batch is one gather per field)."""
        lengths = {"": self.k, "prompt_": self.kp} if self.kp > 0 else {"": self.k}
        out = _windows_of(_matrices(batch_size * sum(lengths.values()), self.table), batch_size, lengths)
        out["task_ids"] = torch.empty(batch_size, dtype=torch.int64, device=self.device)
        return out

    def sample_into(self, task_ids: list[int], out: dict) -> dict:
        """:meth:`sample` written into ``out`` (a batch of :meth:`empty_batch`; its batch size is
        ``out["task_ids"]``'s): the same draws from the generator, the same values. On the host only
        the draws and the rows' indices (numpy, a few small arrays); one copy to the device, then one
        gather and one multiply per field there."""
        b = out["task_ids"].shape[0]
        hist, prompt, ids = [], [], []
        for tid, n in batch_segments(task_ids, b):
            hist.append(_draw_segments(self.data[tid], n, self.k, self.generator))
            if self.prompt_segment == "random" and self.kp > 0:
                prompt.append(_draw_segments(self.prompts[tid], n, self.kp, self.generator))
            elif self.kp > 0:
                prompt.append(_draw_cut(self.prompts[tid], n, self.kp, self.generator, self.prompt_segment))
            ids.append(np.full(n, tid, np.int64))
        # one copy to the device: rows (history, then prompt), valid (the same), task ids
        parts = [h[0] for h in hist] + [p[0] for p in prompt] + [h[1] for h in hist] + [p[1] for p in prompt] + ids
        dev = torch.from_numpy(np.concatenate([a.reshape(-1) for a in parts])).to(self.device)
        r = b * (self.k + self.kp)
        matrices = {key: out[key]._base for key in FIELDS}  # (empty_batch's layout: history rows, then prompt rows)
        if any(m is None or m.shape[0] != r for m in matrices.values()):
            raise ValueError("sample_into: out must be a batch of empty_batch (one matrix per field)")
        _fill_rows(self.table, dev[:r], dev[r: 2 * r], matrices)
        out["task_ids"].copy_(dev[2 * r:])
        return out

    def normalize(self, tid: int, obs: np.ndarray) -> np.ndarray:
        name = self.tasks[tid]
        return (obs - self.state_mean[name]) / self.state_std[name]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, d: dict) -> None:
        self.generator.set_state(d["generator"])
