"""Task masks: ERK initialisation (Appendix C), the alpha_t schedule (Eq. 12), the mask update
(Algorithm 2, Eqs. 8-10) and the vote for unseen tasks (Eq. 13).

Masks are held as bool tensors ``[T, N, K]`` per masked weight (one byte per weight and task;
never float copies), on the run's device; each kernel op gets them in the layout it takes
(:meth:`TaskMasks.for_op`): the bool masks for the reference, else a bit-packed int32 copy made
once per mask update. A checkpoint stores that packed copy, 1 bit per weight (:meth:`TaskMasks.state`).
"""

from __future__ import annotations

import math

import torch

import harmodt_kernels


def erk_densities(shapes: dict[str, tuple[int, int]], density: float) -> dict[str, float]:
    """Per-layer densities by Erdos-Renyi-Kernel (Appendix C) with overall density ``density``.

    A linear layer ``(n_out, n_in)`` gets a density proportional to ``(n_in + n_out) / (n_in * n_out)``;
    the factor is solved so the weighted mean is ``density``. Layers that would exceed 1 are made
    dense and the factor is solved again over the rest.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    numel = {n: s[0] * s[1] for n, s in shapes.items()}
    raw = {n: (s[0] + s[1]) / (s[0] * s[1]) for n, s in shapes.items()}
    dense: set[str] = set()
    total = sum(numel.values())
    while True:
        budget = density * total - sum(numel[n] for n in dense)
        denom = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        eps = budget / denom if denom > 0 else 0.0
        over = [n for n in shapes if n not in dense and eps * raw[n] > 1.0]
        if not over:
            break
        dense.update(over)
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


def alpha_schedule(t: int, total: int, eta_min: float, eta_max: float) -> int:
    """Eq. 12: ``ceil(eta_max + 1/2 (eta_min - eta_max)(1 + cos(2 pi t / E)))``."""
    value = eta_max + 0.5 * (eta_min - eta_max) * (1.0 + math.cos(2.0 * math.pi * t / total))
    return int(math.ceil(value - 1e-12 * max(1.0, abs(eta_max))))  # tolerate float round-off only


def alpha_total(total: int, every: int, eta_min: float, eta_max: float) -> int:
    """The most weights one task can switch off over a run (and as many on): alpha_t of Eq. 12
    summed over the mask updates at steps ``every, 2 every, ...`` before ``total``. A task's
    active weights can change by at most this many, whatever the gradients."""
    return sum(alpha_schedule(t, total, eta_min, eta_max) for t in range(every, total, every))


# The importance I_i of Eq. 8 of each weight for task i, ``[T, P]`` from gbar ``[T, P]`` and theta ``[P]``.
IMPORTANCE = {
    "fisher": lambda gbar, params: gbar * gbar,  # HarmoDT-F: the Fisher information gbar_i^2
    "magnitude": lambda gbar, params: params.float().abs().expand_as(gbar),  # HarmoDT-M: |theta|
}


class TaskMasks:
    """One binary mask per task over every masked weight matrix: the mask kind
    (harmodt.mask_kinds.MaskKind) of HarmoDT-R/M/F, each task's own ERK draw."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = masks  # name -> bool (T, N, K)
        self._packed: dict | None = None

    @property
    def n_tasks(self) -> int:
        return next(iter(self.masks.values())).shape[0]

    @property
    def numel_per_task(self) -> int:
        """The masked weights of one task (active or not)."""
        return sum(m[0].numel() for m in self.masks.values())

    @classmethod
    def build(cls, weights: dict[str, torch.Tensor], n_tasks: int, masks_cfg, seed: int,
              device: torch.device) -> "TaskMasks":
        """A run's initial masks: each task's ERK draw at ``--sparsity`` (``masks_cfg``: a
        harmodt.config.MaskConfig) from ``seed + 1``, for the masked ``weights`` (name -> matrix)."""
        shapes = {n: tuple(w.shape) for n, w in weights.items()}
        return cls.erk(shapes, n_tasks, masks_cfg.sparsity, torch.Generator().manual_seed(seed + 1), device=device,
                       draw=masks_cfg.erk_draw)

    @classmethod
    def erk(cls, shapes: dict[str, tuple[int, int]], n_tasks: int, sparsity: float, generator: torch.Generator,
            device: torch.device | str = "cpu", draw: str = "exact") -> "TaskMasks":
        """ERK densities at ``1 - sparsity``; an independent random draw per task and layer (on the
        CPU, so the masks of a seed do not depend on the device), placed on ``device``. ``draw``:
        "exact", exactly ``round(density * numel)`` active weights; "bernoulli", each weight
        active with probability ``density`` (the official ``ERK_maskinit``), so the counts vary
        around it between layers and tasks."""
        if draw not in ("exact", "bernoulli"):
            raise ValueError(f"draw must be exact or bernoulli, got {draw!r}")
        dens = erk_densities(shapes, 1.0 - sparsity)
        masks = {}
        for name, (n, k) in shapes.items():
            numel = n * k
            if draw == "bernoulli":
                masks[name] = (torch.rand(n_tasks, n, k, generator=generator) < dens[name]).to(device)
                continue
            keep = int(round(dens[name] * numel))
            m = torch.zeros(n_tasks, numel, dtype=torch.bool)
            for t in range(n_tasks):
                m[t, torch.randperm(numel, generator=generator)[:keep]] = True
            masks[name] = m.view(n_tasks, n, k).to(device)
        return cls(masks)

    @classmethod
    def dense(cls, shapes: dict[str, tuple[int, int]], n_tasks: int) -> "TaskMasks":
        return cls({name: torch.ones(n_tasks, n, k, dtype=torch.bool) for name, (n, k) in shapes.items()})

    def density(self, task: int | None = None) -> float:
        num = sum(int(m.sum()) if task is None else int(m[task].sum()) for m in self.masks.values())
        den = sum(m.numel() if task is None else m[task].numel() for m in self.masks.values())
        return num / den

    def to(self, device: torch.device | str) -> "TaskMasks":
        return type(self)({n: m.to(device) for n, m in self.masks.items()})

    def tensors(self) -> list[torch.Tensor]:
        """The bool masks themselves (ranks share them in place)."""
        return list(self.masks.values())

    def linear_op(self, op):
        """The masked-linear op that reads :meth:`for_op`'s masks: the run's ``op`` itself."""
        return op

    def packed(self) -> dict[str, torch.Tensor]:
        """Bit-packed int32 masks ``[T, N, ceil(K/32)]``, what the model reads (cached)."""
        if self._packed is None:
            self._packed = {n: harmodt_kernels.pack_masks(m) for n, m in self.masks.items()}
        return self._packed

    def for_op(self, op) -> dict[str, torch.Tensor]:
        """Every task's masks ``[T, ...]`` per weight in the layout kernel op ``op`` takes: the bool
        masks as stored for an op that reads them (the reference), else the packed copy."""
        return self.masks if op.takes_bool_masks else self.packed()

    def keep(self, task_ids: list[int], op) -> dict[str, torch.Tensor]:
        """{weight name: what a step on ``task_ids`` may change} in ``op``'s layout: the task's
        mask, or for several tasks the union of theirs (Eq. 11)."""
        if len(task_ids) == 1:
            return {n: m[task_ids[0]] for n, m in self.for_op(op).items()}
        idx = torch.tensor(task_ids, device=next(iter(self.masks.values())).device)
        union = {n: m.index_select(0, idx).any(0) for n, m in self.masks.items()}
        return union if op.takes_bool_masks else {n: harmodt_kernels.pack_masks(m) for n, m in union.items()}

    def keep_on_device(self, masks: dict[str, torch.Tensor], task_ids: torch.Tensor,
                       out: dict[str, torch.Tensor]) -> dict:
        """:meth:`keep` of a captured step: the tasks ``task_ids`` (int64 ``(n,)`` on the device)
        selected from ``masks`` (every task's, in the optimizer op's layout: the bool masks or their
        packed words, whose union is a bitwise or either way) into ``out`` ({name: a buffer of one
        task's mask}, whose addresses stay)."""
        for name, m in masks.items():
            union = out[name]
            if task_ids.shape[0] == 1:
                torch.index_select(m, 0, task_ids, out=union.unsqueeze(0))
            else:
                sel = m.index_select(0, task_ids)  # (n, ...)
                torch.bitwise_or(sel[0], sel[1], out=union)
                for j in range(2, sel.shape[0]):
                    union.bitwise_or_(sel[j])
        return {name: out[name] for name in masks}

    def rows(self, rows: list[int], vote: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """An evaluation's masks: the task masks ``rows`` (row ``n_tasks``: ``vote``, a
        :meth:`vote`) packed ``[len(rows), N, ceil(K/32)]`` per weight (every op reads them)."""
        full = self.masks if vote is None else {n: torch.cat([m, vote[n].to(m.device).unsqueeze(0)])
                                                for n, m in self.masks.items()}
        return {n: harmodt_kernels.pack_masks(m[rows]) for n, m in full.items()}

    def snapshot(self) -> torch.Tensor:
        """A compact copy of the masks: all masked weights of each task as one packed row
        ``[T, ceil(P/32)]`` (the layout ``harmodt_kernels.harmony_select`` takes)."""
        flat = torch.cat([m.reshape(m.shape[0], -1) for m in self.masks.values()], dim=1)
        return harmodt_kernels.pack_masks(flat)

    def changed_fraction(self, initial: torch.Tensor) -> list[float]:
        """Per task, the fraction of its active weights not active in ``initial`` (a
        :meth:`snapshot` of earlier masks, such as the ERK draw)."""
        p = sum(m[0].numel() for m in self.masks.values())
        now, before = harmodt_kernels.unpack_masks(self.snapshot(), p), harmodt_kernels.unpack_masks(initial, p)
        return ((now & ~before).sum(1) / now.sum(1).clamp(min=1)).tolist()

    def set_flat(self, words: torch.Tensor) -> None:
        p = sum(m[0].numel() for m in self.masks.values())
        flat = harmodt_kernels.unpack_masks(words, p)
        off = 0
        for name, m in self.masks.items():
            n = m[0].numel()
            self.masks[name] = flat[:, off : off + n].reshape(m.shape).contiguous()
            off += n
        self._packed = None

    def update(self, masked_grads: torch.Tensor, grads: torch.Tensor, params: torch.Tensor, k: int, lam: float,
               importance: str, lam_on: str = "importance",
               select=harmodt_kernels.REFERENCE_OPS.harmony_select) -> dict:
        """Algorithm 2 (Eqs. 8-10) on the flat ``[T, P]`` task gradients (concatenated in
        ``self.masks`` order): ``masked_grads`` gbar_i = grad L_i(theta * M_i) * M_i, ``grads`` g_i
        (harmodt.mask_grads), ``params`` theta ``[P]``. Each task masks the ``k`` active weights of
        lowest harmony and recovers the ``k`` masked weights of highest recovery score (fewer
        when it has fewer); ``select`` is the run's ``harmodt_kernels.harmony_select`` op. Returns the
        per-task counts ``{"masked", "recovered"}``.

        ``lam_on="agreement"``: the official code's ``lam * A + I``, computed as ``A + I / lam``,
        which orders the weights the same (for lam > 0).
        """
        if lam_on == "agreement" and not lam > 0:
            raise ValueError("lam_on='agreement' needs lam > 0")
        gbar, g = masked_grads.float(), grads.float()
        ghat = gbar.mean(0)  # (P,): the mean masked task gradient
        agreement = gbar * ghat  # A_i = gbar_i * ghat
        lam_i = lam if lam_on == "importance" else 1.0 / lam
        harmony = agreement + lam_i * IMPORTANCE[importance](gbar, params)  # H_i = A_i + lam * I_i (Eq. 8)
        recovery = g * ghat  # g_i * ghat (Eq. 10)
        before = self.snapshot()
        # Eqs. 9-10: the k lowest H_i active off, the k highest g_i * ghat masked on
        after = select(harmony, recovery, before, k)
        p = masked_grads.shape[1]
        b = harmodt_kernels.unpack_masks(before, p)
        a = harmodt_kernels.unpack_masks(after, p)
        self.set_flat(after)
        return {"masked": (b & ~a).sum(1).tolist(), "recovered": (a & ~b).sum(1).tolist()}

    def vote(self, threshold: int) -> dict[str, torch.Tensor]:
        """Eq. 13: a weight is active for an unseen task when more than ``threshold`` tasks keep it."""
        return {n: m.sum(0) > threshold for n, m in self.masks.items()}

    def state(self, names: list[str]) -> dict:
        """The checkpoint format: every task's masks bit-packed, 1 bit per weight, in the kernels'
        layout (:func:`harmodt_kernels.pack_masks`: int32 words over a matrix's last dimension, bit
        ``j % 32`` of word ``j // 32`` is column ``j``, padding bits 0), on the CPU:
        ``{"layout": PACKED_LAYOUT, "tasks": [names], "shapes": {weight: [N, K]}, "words": {weight:
        int32 [T, N, ceil(K/32)]}}``, tasks in the order of ``names``."""
        return {"layout": PACKED_LAYOUT, "tasks": list(names),
                "shapes": {n: list(m.shape[1:]) for n, m in self.masks.items()},
                "words": {n: w.cpu() for n, w in self.packed().items()}}

    @classmethod
    def from_state(cls, d: dict, names: list[str] | None = None, device: torch.device | str = "cpu",
                   weights: dict[str, torch.Tensor] | None = None) -> "TaskMasks":
        """The masks of a checkpoint, for the tasks ``names`` in that order (None: all, in the
        checkpoint's order): :meth:`state`'s packed format, or the earlier one, ``{task: {weight:
        bool [N, K]}}``. With the model's masked ``weights`` (name -> parameter), ValueError when a
        mask does not fit its weight; ValueError for a task the checkpoint has no masks of."""
        if isinstance(d.get("layout"), str):
            if d["layout"] != PACKED_LAYOUT:
                raise ValueError(f"masks stored as {d['layout']!r}, which this version does not read "
                                 f"(it reads {PACKED_LAYOUT!r})")
            stored = list(d["tasks"])
            order = _task_order(stored, stored if names is None else names)
            masks = {n: harmodt_kernels.unpack_masks(w[order].to(device), d["shapes"][n][-1])
                     for n, w in d["words"].items()}
        else:  # the earlier format: one bool tensor per task and weight
            names = list(d) if names is None else names
            _task_order(list(d), names)
            masks = {p: torch.stack([d[t][p].bool() for t in names]).to(device) for p in d[names[0]]}
        tm = cls(masks)
        for n, w in (weights or {}).items():
            if n not in masks or tuple(masks[n].shape) != (tm.n_tasks, *w.shape):
                got = tuple(masks[n].shape) if n in masks else "none"
                raise ValueError(f"mask of {n} has shape {got}, the model needs {(tm.n_tasks, *w.shape)}")
        return tm


PACKED_LAYOUT = "int32-words-lsb-first"  # the checkpoint's mask layout (TaskMasks.state): harmodt_kernels.pack_masks


def _task_order(stored: list[str], names: list[str]) -> list[int]:
    """The index in ``stored`` of each of ``names``; ValueError naming the first one missing."""
    missing = [t for t in names if t not in stored]
    if missing:
        raise ValueError(f"the checkpoint holds no masks of task {missing[0]!r} (it has {', '.join(stored)})")
    return [stored.index(t) for t in names]


def harmony_score(grads: torch.Tensor) -> float:
    """Definition 3.2: mean over tasks and weights of cos(g_ij, ghat_j) = sign(g_ij) * sign(ghat_j),
    over the entries where both are non-zero. grads ``[T, P]``."""
    ghat = grads.mean(0)
    s = torch.sign(grads) * torch.sign(ghat)
    nz = (grads != 0) & (ghat != 0)
    return float(s.sum() / nz.sum().clamp(min=1))
