"""What the training tests share: three tasks and a tiny validated config."""

from harmodt.config import ModelConfig, TrainConfig, validate


TASKS = ["reach-v3", "push-v3", "door-open-v3"]


def tiny_cfg(tmp_path, **kw) -> TrainConfig:
    model = ModelConfig(n_layer=2, n_head=2, n_embd=32, context_len=5, prompt_len=2, dropout=0.1)
    base = dict(tasks=",".join(TASKS), method="harmodt-f", steps=12, batch_size=4, warmup_steps=2, lr=1e-3,
                eval_episodes=0, log_every=4, checkpoint_every=4, out=str(tmp_path / "run"), progress=False, model=model)
    base.update(kw)
    cfg = TrainConfig(**base)
    cfg.masks.update_every = 5
    cfg.masks.eta_max = 20
    return validate(cfg)
