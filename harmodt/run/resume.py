"""Checkpoints of a training run and continuing from one.

A checkpoint (:func:`state`) holds the weights, masks, optimizer and scheduler, the step, the
config, every RNG stream (every rank's data and dropout stream and the shared task stream under
torchrun), what evaluation needs, the run's own state (the losses since the last metric line
and the size of metrics.jsonl), the goal seeds of its evaluations (``config.goal_seeds``: which
goals it was validated on) and the fingerprint of its data (``data_cache.data_fingerprint``). :func:`open_checkpoint`
reads one for ``--resume`` and refuses settings that differ from it (``config.RESUME_RULES`` says which may, with
``--allow-changed``);
:func:`restore` puts a trainer back where the checkpoint left it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import torch

from .. import checkpoint
from ..config import RESUME_RULES, ConfigError, TrainConfig, flag, flat_keys, goal_seeds, to_dict, upgrade_saved_config
from . import distributed, rng


def changed_settings(saved: dict, cfg: TrainConfig) -> dict:
    """{dotted key: (the checkpoint's value, cfg's value)} for every setting of ``cfg`` that differs
    from the checkpoint's config ``saved`` (read as it was meant when written: a checkpoint from
    before ``prompt_segment`` existed ran with ``random``, see :func:`upgrade_saved_config`; any other
    key the checkpoint lacks counts as its default, a method's option as absent); the keys RESUME_RULES marks
    ``ignored`` are not compared."""
    new, old = flat_keys(to_dict(cfg)), flat_keys(upgrade_saved_config(saved))
    default = flat_keys(to_dict(TrainConfig()))
    return {k: (old.get(k, default.get(k)), v) for k, v in new.items()
            if RESUME_RULES.get(k) != "ignored" and old.get(k, default.get(k)) != v}


def check_resume_settings(saved: dict, cfg: TrainConfig, path: Path) -> None:
    """ConfigError (one line naming every differing key) unless each setting that differs from the
    checkpoint's is named by ``--allow-changed``."""
    diff = changed_settings(saved, cfg)
    refused = [k for k in diff if k not in cfg.allow_changed]
    if not refused:
        return
    listing = ", ".join(f"{k} ({diff[k][0]!r} -> {diff[k][1]!r})" for k in refused)
    fixed = [k for k in refused if RESUME_RULES.get(k) != "changeable"]
    free = [k for k in refused if RESUME_RULES.get(k) == "changeable"]
    hints = []
    if fixed:
        keep = " ".join(f"{flag(k)} {shlex.quote(str(diff[k][0]))}" for k in fixed)
        hints.append(f"{', '.join(fixed)} cannot change on --resume (pass {keep} to continue the checkpoint as it was, "
                     f"or train a new run into another --out)")
    if free:
        hints.append(f"pass --allow-changed {' '.join(free)} to continue with the new "
                     f"value{'s' if len(free) > 1 else ''}")
    raise ConfigError(f"--resume: settings differ from those of {path}: {listing}; {'; '.join(hints)}")


def open_checkpoint(cfg: TrainConfig, dist: distributed.Single) -> dict | None:
    """The checkpoint ``OUT/checkpoint.pt`` to continue (None: start at step 0), read by rank 0,
    checked against ``cfg`` and sent to the other ranks. ConfigError when one exists without
    ``--resume``, cannot be read, or was made with settings ``cfg`` may not change."""
    path = Path(cfg.out) / "checkpoint.pt"
    if path.exists() and not cfg.resume:
        raise ConfigError(f"{path} exists: pass --resume to continue it or choose another --out")
    if dist.is_main and not path.exists():
        check_files_without_checkpoint(cfg)
    ck = None
    if cfg.resume and dist.is_main and path.exists():
        try:
            ck = checkpoint.load(path)
        except checkpoint.CheckpointError as exc:
            raise ConfigError(f"--resume: {exc}") from None
        check_resume_settings(distributed.comparable_config(ck, dist.world_size), cfg, path)
    return dist.broadcast_object(ck)


def check_files_without_checkpoint(cfg: TrainConfig) -> None:
    """ConfigError when ``--out`` holds a run's files but no checkpoint.pt: refused like a folder with one.
    Only ``--resume`` of the same settings (checked as against a checkpoint) may start such a folder again
    from step 0: a run killed before its first checkpoint, whose files are its own."""
    from ..files import read_json
    from ..ownership import run_files

    out = Path(cfg.out)
    found = run_files(out)
    if not found:
        return
    if not cfg.resume or "results.json" in found or "best.pt" in found or "config.json" not in found:
        raise ConfigError(f"--out {out}: holds the files of a run ({', '.join(found)}) without its checkpoint.pt; "
                          "choose another --out (or remove those files)")
    try:
        saved = read_json(out / "config.json")
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume: {out / 'config.json'}: not a readable config ({exc}); "
                          "choose another --out") from None
    check_resume_settings(saved, cfg, out / "config.json")


def state(tr) -> dict:
    """Everything trainer ``tr`` needs to continue (tensors and plain types): its own state
    (``tr.state_dict()``), the config, every RNG stream and what evaluation needs. With several
    ranks every rank calls it: the ranks' RNG streams are gathered."""
    streams = {**rng.capture(tr.device), "batcher": tr.batcher.state_dict()}
    if tr.dist.active:  # every rank's data and dropout streams (rank r at [r]) and the shared task stream
        streams["ranks"] = tr.dist.all_gather_object({k: streams[k] for k in ("torch", "batcher", "cuda")
                                                      if k in streams})
        streams["tasks"] = tr.dist.task_stream.get_state()
    return {"world_size": tr.dist.world_size, **tr.state_dict(), "config": to_dict(tr.cfg), "rng": streams,
            "eval_info": tr.eval_info(),
            "goals": goal_seeds(tr.cfg.seed, tr.cfg.validation_seed), "data_sha256": tr.data_sha256}


class Diverged(RuntimeError):
    """The training loss or the weights went NaN or infinite; printed as one line (exit code 2)."""


def diverged(out: Path, step: int, what: str) -> Diverged:
    """The error of a run whose ``what`` (e.g. "the training loss is nan") was seen at ``step``,
    naming the last checkpoint in ``out`` (whose weights were finite when written)."""
    path = Path(out) / "checkpoint.pt"
    try:
        last = f"the last checkpoint, {path}, is at step {int(checkpoint.load(path).get('step', 0))}"
    except checkpoint.CheckpointError:
        last = "no checkpoint was written"
    return Diverged(f"{what} at step {step}: training stopped; {last} (a lower --lr, or a look at "
                    "--rtg-scale and the data, may help)")


def all_finite(tensors) -> bool:
    """Whether every floating-point tensor of ``tensors`` holds finite values only (one read of the device)."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point() and t.numel()]
    return bool(torch.stack(flags).all()) if flags else True


def save(tr, path: Path, run_state: dict | None = None) -> None:
    """Write :func:`state` (plus ``run_state``: what the loop needs to continue its metric lines
    exactly) atomically. With several ranks every rank calls it and rank 0 writes. Weights or
    unlogged losses that are not finite raise :class:`Diverged` and write nothing: a checkpoint
    always holds a run that can go on."""
    ck = state(tr)
    if run_state is not None:
        ck["run"] = run_state
    if not all_finite(list(ck["model"].values()) + [(run_state or {}).get("losses", torch.zeros(0))]):
        raise diverged(Path(tr.cfg.out), tr.step, "the weights or the training loss are not finite (nan or inf)")
    if tr.dist.is_main:
        checkpoint.save(ck, path)


def restore(tr, ck: dict, path: Path) -> dict:
    """Put trainer ``tr`` where checkpoint ``ck`` (read from ``path``) left it: the trainer adopts its
    own state (``tr.load_state``: weights, masks, optimizer, scheduler, step), then every RNG stream
    is restored. Returns the checkpoint's run state ({} when it has none). A checkpoint that does
    not fit this model, or whose data differ from the trainer's, raises ConfigError (one line)."""
    saved = ck.get("data_sha256")  # (none in a checkpoint written before it was recorded)
    if saved is not None and saved != tr.data_sha256:
        where = tr.cfg.data or "the generated data in the cache"
        raise ConfigError(f"--resume: the data differ from those {path} was trained on (data sha256 {saved[:16]}... "
                          f"in the checkpoint, {tr.data_sha256[:16]}... in {where}); restore that data set or train "
                          "a new run into another --out")
    try:
        tr.load_state(ck)
        rng.restore(ck["rng"], tr.device)
        tr.batcher.load_state_dict(ck["rng"]["batcher"])
        _restore_rank_streams(tr, ck, path)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
        raise ConfigError(f"--resume: {path} does not fit this model ({checkpoint.one_line(exc)})") from None
    return dict(ck.get("run") or {})


def _restore_rank_streams(tr, ck: dict, path: Path) -> None:
    """This rank's data and dropout streams and the task stream from a checkpoint written by as
    many ranks; from one written by another number of ranks, reseeded from (seed, step, rank)."""
    saved, streams = int(ck.get("world_size", 1)), ck["rng"]
    if saved == tr.dist.world_size:
        if tr.dist.active:
            mine = streams["ranks"][tr.dist.rank]
            torch.set_rng_state(mine["torch"])
            tr.batcher.load_state_dict(mine["batcher"])
            if "cuda" in mine and tr.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], tr.device)
            tr.dist.task_stream.set_state(streams["tasks"])
        return
    seed, step, rank = tr.cfg.seed, tr.step, tr.dist.rank
    tr.batcher.generator.manual_seed(distributed.derived_seed(seed, step, "data", rank))
    torch.manual_seed(distributed.derived_seed(seed, step, "dropout", rank))
    if tr.dist.task_stream is not None:
        tr.dist.task_stream.manual_seed(distributed.derived_seed(seed, step, "tasks"))
    if tr.dist.is_main:
        print(f"[harmodt] --resume: {path} was written by {saved} rank(s), this run has {tr.dist.world_size}: "
              f"data, dropout and task streams reseeded from (seed, step {step}, rank)", flush=True)
