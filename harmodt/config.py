"""Configuration dataclasses (each field with its help text), presets, the --resume rule of
every setting, and validation. The flags of ``python -m harmodt.train`` are built from these
fields (harmodt/flags.py): a new field is a new flag; evaluate's and the study's flags that
mirror one are declared by it.

Defaults follow the paper (Table 6 and Appendix B) except where a field says otherwise; the
embedded default run (no CLI arguments) shrinks the run so it finishes in minutes on 2 cores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field, fields

from harmodt_kernels import BACKENDS

from .data.batches import PROMPT_SEGMENTS, STATE_NORMS
from .domains import ANY_NUMBER, SEED, Domain, above, at_least, between, check_fields, one_of
from .methods import CONDITIONING_ALIASES, METHODS
from .model import CONDITIONINGS
from .tasks import TASKS_HELP

QUALITIES = ("near-optimal", "sub-optimal")
TEST_GOALS_OFFSET = 12345  # the goals of a run's final evaluation are drawn from --seed + this
# the goals `python -m harmodt.evaluate` and `python -m harmodt.study` score on by default
EVALUATION_GOALS_SEED = 12345
TASK_ORDERS = ("random", "round-robin")
CLIP_SCOPES = ("masked", "unmasked")
WEIGHT_DECAY_SCOPES = ("matrices", "all")
INITS = ("ours", "reference")
ERK_DRAWS = ("exact", "bernoulli")
DROPOUT_RNGS = ("auto", "torch", "counter")
LAM_ONS = ("importance", "agreement")
RECOVERY_GRADS = ("dense", "masked")
MASK_GRADS = ("paper", "official")
MASK_GRADS_PASSES = ("auto", "per-task", "batched")
PRECISIONS = ("fp32", "tf32", "bf16")
CUDA_GRAPHS = ("auto", "on", "off")


def setting(default=MISSING, help: str = "", domain: Domain | None = None, *, factory=MISSING):
    """A config field with its one-line ``--help`` text and the values it may take (``domain``,
    harmodt.domains; its type is the default's); ``factory``: a default made per instance."""
    return field(default=default, default_factory=factory, metadata={"help": help, "domain": domain})


@dataclass
class ModelConfig:
    n_layer: int = setting(6, "transformer blocks (Table 6)", at_least(1))
    n_head: int = setting(8, "attention heads (Table 6)", at_least(1))
    n_embd: int = setting(256, "embedding width (Table 6)", at_least(1))
    dropout: float = setting(0.1, "dropout on embeddings, attention and residuals (Table 6)",
                             between(0, 1, hi_open=True))
    context_len: int = setting(20, "K: timesteps of recent history (Table 6)", at_least(1))
    prompt_len: int = setting(5, "K*: timesteps of the trajectory prompt (Prompt-DT / official code)",
                                  at_least(0, "0: no prompt, for a method without one"))
    max_ep_len: int = setting(500, "Meta-World episode length; size of the timestep embedding table", at_least(1))
    state_dim: int = setting(39, "Meta-World v3 observation size", at_least(1))
    act_dim: int = setting(4, "Meta-World action size", at_least(1))
    init: str = setting("ours", "ours (every linear and embedding weight N(0, 0.02), biases 0) | reference (the "
                        "official code's: the blocks' as ours, embeddings and heads PyTorch's default)", one_of(INITS))


@dataclass
class MaskConfig:
    sparsity: float = setting(0.2, "S: fraction of each task's maskable weights switched off (Table 6)",
                              between(0, 1, hi_open=True))
    eta_min: int = setting(0, "lower bound of weights changed per mask update (Eq. 12, Table 6)", at_least(0))
    eta_max: int = setting(100, "upper bound of weights changed per mask update (Eq. 12, Table 6)", at_least(0))
    lam: float = setting(10.0, "balance factor lambda between agreement and importance (Eq. 8)", at_least(0))
    lam_on: str = setting("importance", '"importance" (paper, Eq. 8) or "agreement" (the official code)',
                          one_of(LAM_ONS))
    update_every: int = setting(5000, "t_m: steps between mask updates (Table 6)", at_least(1))
    vote_threshold: int = setting(25, "'thresh' of Eq. 13 for unseen tasks (Table 6, for MT50)", at_least(0))
    recovery_grad: str = setting("dense",
                                 'g_i of Alg. 2: "dense" = grad of L_i at theta (paper); "masked" = unmasked grad at '
                                 'theta*M_i', one_of(RECOVERY_GRADS))
    mask_grads: str = setting("paper", 'gradients of the mask update: "paper" = dropout off, unclipped; "official" = '
                              "dropout on, each task's clipped to --grad-clip", one_of(MASK_GRADS))
    mask_grads_passes: str = setting("auto",
                                     "how the mask update computes its task gradients: per-task (two forward and "
                                     "backward passes per task, the reference) | batched (all tasks in one mixed-task "
                                     "pass; --mask-grads paper) | auto (batched on CUDA with --mask-grads paper, else "
                                     "per-task)", one_of(MASK_GRADS_PASSES))
    erk_draw: str = setting("exact", "ERK masks: exact (round(density * numel) weights per layer and task) | bernoulli "
                            "(each weight kept with its layer's density, as the official code)", one_of(ERK_DRAWS))


@dataclass
class TrainConfig:
    tasks: str = setting("MT5", TASKS_HELP)
    method: str = setting("harmodt-f", " | ".join(METHODS), one_of(METHODS))
    steps: int = setting(1_000_000, "total training steps E (Table 6)", at_least(1))
    batch_size: int = setting(8, "sequences per step (Appendix B)", at_least(1))
    tasks_per_batch: int = setting(0, "tasks mixed in one batch (0 = auto: 1 = Algorithm 1, one task per step; "
                                   "pcgrad/cagrad: all tasks, at most --batch-size)", at_least(0, "0: auto"))
    lr: float = setting(1e-4, "AdamW learning rate (Appendix B)", above(0))
    weight_decay: float = setting(1e-4, "AdamW decoupled weight decay (official code)", at_least(0))
    warmup_steps: int = setting(10_000, "linear learning-rate warm-up (official code)", at_least(0))
    grad_clip: float = setting(0.25, "gradient-norm clip (official code)", above(0))
    clip_scope: str = setting("masked", "the clip norm's gradient of the masked matrices: masked (grad * M_i, what the "
                              "step applies) | unmasked (before masking, as the official code)", one_of(CLIP_SCOPES))
    weight_decay_scope: str = setting("matrices",
                                      "parameters --weight-decay applies to: matrices (weight matrices outside the "
                                      "embeddings) | all (every parameter, as the official code)",
                                      one_of(WEIGHT_DECAY_SCOPES))
    task_order: str = setting("random", "the tasks of a step: random (drawn uniformly) | round-robin (step t trains "
                              "task t mod T, as the official code; with --tasks-per-batch k, tasks t*k .. t*k+k-1 mod "
                              "T)", one_of(TASK_ORDERS))
    method_options: dict = setting(factory=dict,
                                   help="the hyper-parameters of --method's own ({name: value}; their flags come "
                                   "from the options of its entry in harmodt/methods.py, such as cagrad's --cagrad-c)")
    data: str = setting("", "dataset folder (ours or the original layout); empty = generate into the cache")
    episodes_per_task: int = setting(0, "keep this many episodes per task (0 = all)", at_least(0, "0: all"))
    quality: str = setting("near-optimal", "near-optimal (all episodes) | sub-optimal (first 50% of each task's)",
                           one_of(QUALITIES))
    gen_episodes: int = setting(100, "episodes per task when the data must be generated", at_least(1))
    rtg_scale: float = setting(1000.0, "returns-to-go are divided by this (official code)", above(0))
    target_return: float = setting(4500.0, "initial return-to-go at evaluation (official code)", ANY_NUMBER)
    eval_episodes: int = setting(10, "evaluation episodes per task", at_least(0, "0: no evaluation"))
    eval_every: int = setting(0, "evaluate every N steps (0 = only at the end)", at_least(0, "0: only at the end"))
    validation_seed: int = setting(-1, "goals of the evaluations during training (--eval-every and the last step) "
                                   "drawn from this seed, apart from the final test goals (seed + 12345); the best is "
                                   "saved as OUT/best.pt (-1: they use the test goals, no best.pt)",
                                   Domain(0, SEED.hi, special=((-1, "off"),)))
    stop_at_success: bool = setting(False,
                                    "evaluations (during training and the final one) end an episode's simulation at "
                                    "its first success and stop computing its policy rows: the same success rates, "
                                    "returns truncated there (results.json says so)")
    log_every: int = setting(100, "steps between metric lines", at_least(1))
    checkpoint_every: int = setting(1000, "steps between checkpoints", at_least(1))
    out: str = setting("runs/harmodt", "output folder")
    seed: int = setting(0, "seed for data sampling, initialisation, masks and evaluation goals", SEED)
    resume: bool = setting(False, "continue from OUT/checkpoint.pt")
    conditioning: str = setting("auto", "auto (MTDT: task-state, others: prompt) | prompt | task-state (one-hot task "
                                "ID beside the state, as the paper's MTDT) | task-embedding (a learned task embedding "
                                "added to every token) | prompt-task-state (the prompt and the one-hot task ID beside "
                                "the state)", one_of(("auto", *CONDITIONINGS)))
    prompt_segment: str = setting("last",
                                  "last (the last K* steps before a prompt episode's final step, as Prompt-DT's code) "
                                  "| first (its first K* steps, where the states tell the tasks apart) | random (a "
                                  "window anywhere in one)", one_of(PROMPT_SEGMENTS))
    state_norm: str = setting("per-task",
                              "per-task (each task's states by its own mean and std, as HarmoDT's code) | pooled (one "
                              "mean and std over every task's states, as Prompt-DT's code)", one_of(STATE_NORMS))
    device: str = setting("auto", "auto (CUDA when available) | cpu | cuda | cuda:N")
    fused: bool = setting(False, "masked linear, masked AdamW and mask selection on the kernels of --backend (else the "
                          "plain-PyTorch reference)")
    backend: str = setting("auto", "kernel backend with --fused: auto (triton on CUDA, cpu on CPU) | triton | cpu | "
                           "reference", one_of(BACKENDS))
    precision: str = setting("fp32", "fp32 (exact fp32 matmuls) | tf32 (fp32 storage, TF32 matmuls on CUDA; exact fp32 "
                             "on a CPU) | bf16 (autocast on the device)", one_of(PRECISIONS))
    compile: bool = setting(False, "torch.compile the model for training")
    cuda_graph: str = setting("auto", "the training step captured once as a CUDA graph and replayed "
                              "(harmodt/graphed_step.py): auto (on CUDA where the run can be captured, the start line "
                              "says why not; else eager) | on (a run that cannot be captured is refused; on a CPU the "
                              "same step runs on its static buffers uncaptured) | off",
                              one_of(CUDA_GRAPHS))
    dropout_rng: str = setting("auto", "where training's dropout bits come from: torch (torch's RNG, nn.Dropout) | "
                               "counter (a hash of the seed, step and element, fused into the masked-linear kernels) | "
                               "auto (counter with --fused, else torch; torch under --compile, which would recompile "
                               "for every step's seed)", one_of(DROPOUT_RNGS))
    threads: int = setting(0, "torch intra-op threads (0 = all cores)", at_least(0, "0: all cores"))
    progress: bool = setting(True, "show progress bars")
    dist_timeout: float = setting(300.0, "seconds a torchrun rank waits in a collective for the others before "
                                  "failing (exit 3)", above(0))
    allow_changed: list[str] = setting(factory=list,
                                       help="keys --resume may take from the flags instead of the checkpoint")
    model: ModelConfig = setting(factory=ModelConfig, help="transformer shape")
    masks: MaskConfig = setting(factory=MaskConfig, help="HarmoDT mask settings")


class ConfigError(ValueError):
    """A bad flag or config value; printed as one line by the CLIs."""


def flag(key: str) -> str:
    """The training flag of a config field or dotted key: ``batch_size`` -> ``--batch-size``,
    ``masks.eta_max`` -> ``--eta-max``."""
    return "--" + key.split(".")[-1].replace("_", "-")


# How --resume treats each setting that differs from the checkpoint's (dotted key -> rule):
#   "changeable": compared; --allow-changed KEY continues with the new value (how long, how often
#                 and where the run goes on, not what the checkpoint holds);
#   "ignored":    never compared (it does not change what is computed);
#   every key not named here is "fixed": compared, and a difference is refused.
RESUME_RULES = {
    **dict.fromkeys(("steps", "eval_episodes", "eval_every", "target_return", "log_every", "checkpoint_every",
                     "threads", "device", "compile", "fused", "backend", "dropout_rng", "stop_at_success"),
                    "changeable"),
    # cuda_graph: the graphed step computes the eager step's bits (harmodt/graphed_step.py)
    **dict.fromkeys(("out", "resume", "progress", "allow_changed", "dist_timeout", "cuda_graph"), "ignored"),
    "masks.mask_grads_passes": "changeable",
}


def flat_keys(d: dict, prefix: str = "") -> dict:
    """A nested config dict as {dotted key: value} ('model.n_layer')."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_keys(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def apply_overrides(cfg: TrainConfig, overrides: dict) -> TrainConfig:
    """Set dotted keys ('model.n_layer') on a copy of cfg."""
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model), masks=dataclasses.replace(cfg.masks),
                              method_options=dict(cfg.method_options))
    for key, value in overrides.items():
        target = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            target = getattr(target, p)
        if isinstance(target, dict):  # method_options.NAME: a hyper-parameter of the method's own
            target[parts[-1]] = value
            continue
        if not hasattr(target, parts[-1]):
            raise ConfigError(f"unknown config key {key!r}")
        setattr(target, parts[-1], value)
    return cfg


def goal_seeds(seed: int, validation_seed: int = -1) -> dict:
    """The goal seeds of a run trained with ``--seed seed``, every one derived here: ``test``, the
    goals of its final evaluation (``seed`` + TEST_GOALS_OFFSET); ``validation``, those of its
    evaluations during training, on which OUT/best.pt is chosen (``--validation-seed``; None when
    off: they are the test goals); ``evaluation``, the default goals of ``python -m harmodt.evaluate``
    and the study (EVALUATION_GOALS_SEED). A checkpoint records them (harmodt.run.resume)."""
    return {"test": seed + TEST_GOALS_OFFSET, "validation": validation_seed if validation_seed >= 0 else None,
            "evaluation": EVALUATION_GOALS_SEED}


def selection_goals_problem(saved: dict, seed: int) -> str | None:
    """Why goals of ``seed`` must not score a checkpoint whose config is ``saved``: its run was
    validated on them (its ``--validation-seed``: OUT/best.pt was chosen on them); None otherwise."""
    run = goal_seeds(int(saved.get("seed", 0)), int(saved.get("validation_seed", -1)))
    if run["validation"] is None or seed != run["validation"]:
        return None
    return (f"comes from a run validated on these goals (its --validation-seed {seed}), so its score on them is biased "
            f"(its test goals: --seed {run['test']})")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Raise ConfigError with one clear line for a bad value: every field against its declared
    domain (type, range, finite; harmodt.domains), then the relations between fields. An earlier
    name of a value (``--conditioning task-id``) is replaced by the current one."""
    from .tasks import parse_tasks

    if isinstance(cfg.conditioning, str):
        cfg.conditioning = CONDITIONING_ALIASES.get(cfg.conditioning, cfg.conditioning)
    if (bad := check_fields(cfg, flag)) is not None:
        raise ConfigError(bad)
    try:
        cfg.method_options = METHODS[cfg.method].check_options(cfg.method_options)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None
    try:
        n_tasks = len(parse_tasks(cfg.tasks))
    except ValueError as exc:
        raise ConfigError(f"--tasks: {exc}") from None
    m, method = cfg.model, METHODS[cfg.method]
    prompted = method.draws_prompts(cfg.conditioning)  # (as the trainer's data stream)
    checks = [
        (m.prompt_len > 0 or not prompted,
         f"--prompt-len 0: --method {cfg.method} is conditioned on a prompt of --prompt-len steps; "
                                           "it must be >= 1"),
        (cfg.tasks_per_batch <= cfg.batch_size,
         f"--tasks-per-batch cannot exceed --batch-size ({cfg.tasks_per_batch} > {cfg.batch_size})"),
        (cfg.tasks_per_batch <= n_tasks,
         f"--tasks-per-batch cannot exceed the number of tasks of --tasks ({cfg.tasks_per_batch} > {n_tasks})"),
        (cfg.masks.eta_min <= cfg.masks.eta_max,
         f"need --eta-min <= --eta-max, got {cfg.masks.eta_min} > {cfg.masks.eta_max}"),
        (m.n_embd % m.n_head == 0, f"--n-embd must be divisible by --n-head, got {m.n_embd} and {m.n_head}"),
        (cfg.fused or cfg.backend == "auto",
         "--backend applies to the kernels of --fused: add --fused (without it every op runs on the reference)"),
        (_device_ok(cfg.device), f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}"),
        (cfg.validation_seed < 0 or cfg.eval_episodes > 0, "--validation-seed needs --eval-episodes > 0"),
        (cfg.masks.mask_grads_passes != "batched" or cfg.masks.mask_grads == "paper",
         "--mask-grads-passes batched needs --mask-grads paper (official draws each task's dropout and clips each "
         "task's gradient over every parameter: one pass per task)"),
        (cfg.validation_seed != goal_seeds(cfg.seed)["test"],
         f"--validation-seed {cfg.validation_seed} draws the final evaluation's test goals (--seed + "
         f"{TEST_GOALS_OFFSET}); choose another"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    if cfg.dropout_rng == "auto":
        # counter with --fused, except under --compile: the per-step seed is a Python int the compiled graph would
        # specialize on
        cfg = dataclasses.replace(cfg, dropout_rng="counter" if cfg.fused and not cfg.compile else "torch")
    if cfg.tasks_per_batch == 0:
        cfg = dataclasses.replace(cfg, tasks_per_batch=auto_tasks_per_batch(cfg.method, len(parse_tasks(cfg.tasks)),
                                                                            cfg.batch_size))
    if cfg.cuda_graph == "on" and not (cfg.fused or cfg.tasks_per_batch == 1):
        raise ConfigError("--cuda-graph on needs --fused, or --tasks-per-batch 1 (the reference splits a mixed-task "
                          "batch on the host)")
    if cfg.allow_changed:
        known = flat_keys(to_dict(cfg))
        if not cfg.resume:
            raise ConfigError("--allow-changed applies to --resume only")
        unknown = [k for k in cfg.allow_changed if k not in known]
        if unknown:
            raise ConfigError(f"--allow-changed: unknown config key(s) {', '.join(unknown)}")
        fixed = [k for k in cfg.allow_changed if RESUME_RULES.get(k, "fixed") == "fixed"]
        if fixed:
            changeable = [k for k, rule in RESUME_RULES.items() if rule == "changeable"]
            raise ConfigError(f"--allow-changed: {', '.join(fixed)} cannot change on --resume (the checkpoint was made "
                              f"with the old value); only {', '.join(changeable)} can")
    return cfg


def auto_tasks_per_batch(method: str, n_tasks: int, batch_size: int) -> int:
    """``--tasks-per-batch 0``: all tasks (at most ``batch_size``) for a method that combines per-task
    gradients (gradient surgery), which needs several tasks' gradients per step; 1 (Algorithm 1)
    for the others."""
    return min(n_tasks, batch_size) if METHODS[method].per_task_gradients else 1


def _device_ok(device: str) -> bool:
    if device in ("auto", "cpu", "cuda"):
        return True
    return device.startswith("cuda:") and device[5:].isdigit()


def resolve_device(device: str):
    """The torch device of ``--device`` (auto: CUDA when available); ConfigError when CUDA is asked
    for and absent."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available (torch {torch.__version__}, built for "
                              f"{'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU only'})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    return dev


def upgrade_saved_config(d: dict) -> dict:
    """A saved config (config.json, a checkpoint's) in today's terms, meaning what it meant when it
    was written. A top-level ``cagrad_c`` is CAGrad's option (``method_options``; other methods
    ignored it). A config without ``dropout_rng`` predates that option and drew dropout from torch's
    RNG. A config without ``prompt_segment`` predates that option and ran with random prompt
    windows, and its ``conditioning: auto`` gave MTDT the learned task embedding; ``task-id`` is the
    earlier name of ``task-embedding``. A ``cuda_graph`` of true or false is ``on`` or ``off``."""
    d = dict(d)
    if isinstance(d.get("cuda_graph"), bool):
        d["cuda_graph"] = "on" if d["cuda_graph"] else "off"
    if "cagrad_c" in d:
        c = d.pop("cagrad_c")
        if d.get("method") == "cagrad":
            d.setdefault("method_options", {"cagrad_c": c})
    d.setdefault("dropout_rng", "torch")
    if "conditioning" in d:
        d["conditioning"] = CONDITIONING_ALIASES.get(d["conditioning"], d["conditioning"])
    if "prompt_segment" not in d:
        d["prompt_segment"] = "random"
        if (d.get("conditioning", "auto") == "auto" and d.get("method") in METHODS
                and METHODS[d["method"]].conditioning != "prompt"):
            d["conditioning"] = "task-embedding"
    return d


def config_from_dict(d: dict) -> TrainConfig:
    """A TrainConfig from a saved config dict (see :func:`upgrade_saved_config`)."""
    d = upgrade_saved_config(d)
    model = ModelConfig(**d.pop("model", {}))
    masks = MaskConfig(**d.pop("masks", {}))
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
    return TrainConfig(**d, model=model, masks=masks)


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
