"""Named sets of training defaults (`--preset NAME ...`, applied left to right): the paper's runs,
the embedded default, and the official code's choices. Keys are harmodt.config.flat_keys names."""

# The embedded default: what `python -m harmodt.train` with no arguments runs (about 4 minutes
# on 2 cores, data generation and evaluation included).
EMBEDDED_DEFAULT = {
    "tasks": "reach-v3,button-press-topdown-v3,door-open-v3",
    "method": "harmodt-f",
    "steps": 5000,
    "warmup_steps": 300,
    "lr": 3e-4,
    "gen_episodes": 80,
    "eval_episodes": 10,
    "checkpoint_every": 500,
    "model.n_layer": 3,
    "model.n_embd": 128,
    "model.n_head": 4,
    "masks.update_every": 500,
    "masks.eta_max": 100,
    "masks.vote_threshold": 1,
}

PRESETS = {
    # The paper's MT50 run (Table 6, Appendix B).
    "paper-mt50": {"tasks": "MT50", "steps": 1_000_000, "masks.vote_threshold": 25},
    "paper-mt30": {"tasks": "MT30", "steps": 1_000_000, "masks.vote_threshold": 15},
    "paper-mt5": {"tasks": "MT5", "steps": 1_000_000, "masks.vote_threshold": 2},
    "embedded-default": EMBEDDED_DEFAULT,
    # The official code's mask-update choices (charleshsc/HarmoDT main.py and trainer): t_m 500, lambda on
    # the agreement term, task gradients in train mode and clipped per task. Only these three: the rest
    # stays as it is (the paper's defaults, or an earlier preset's values).
    "official": {"masks.update_every": 500, "masks.lam_on": "agreement", "masks.mask_grads": "official"},
    # The official code's training choices outside the mask update (charleshsc/HarmoDT main.py and
    # fl_utils.py, mxu34/prompt-dt trajectory_gpt2.py): round-robin tasks, the clip norm before masking,
    # weight decay on every parameter, its initialisation and its Bernoulli ERK draw. With "official":
    # `--preset official reference`.
    "reference": {"task_order": "round-robin", "clip_scope": "unmasked", "weight_decay_scope": "all",
                  "model.init": "reference", "masks.erk_draw": "bernoulli"},
}
