"""Prompt-DT / MTDT model: shapes, causality, padding, the prompt cache, and the one seam where
masks enter (MaskedLinear -> harmodt_kernels.masked_linear) against an explicit W * M model."""

import pytest
import torch
import torch.nn.functional as F

import harmodt_kernels
from _synthetic import datasets
from harmodt.config import ModelConfig
from harmodt.data.batches import PromptDTBatcher
from harmodt.masks import TaskMasks
from harmodt.methods import build_model
from harmodt.model import MaskContext, MaskedLinear

CFG = ModelConfig(n_layer=2, n_head=2, n_embd=32, context_len=6, prompt_len=3, dropout=0.0)
TASKS = ["a", "b"]


def setup(method="prompt-dt", cfg=CFG):
    torch.manual_seed(0)
    b = PromptDTBatcher(datasets(TASKS), TASKS, cfg.context_len, cfg.prompt_len if method != "mtdt" else 0, 100.0, seed=1)
    return b, build_model(cfg, 2, method).eval()


def erk_context(m, task_ids, backend="reference"):
    shapes = {n: tuple(w.shape) for n, w in m.masked_weights().items()}
    tm = TaskMasks.erk(shapes, 2, 0.3, torch.Generator().manual_seed(0))
    return tm, MaskContext(tm.packed(), task_ids, harmodt_kernels.backend_ops(backend).masked_linear)


@pytest.mark.parametrize("method", ["prompt-dt", "mtdt"])
def test_forward_shapes(method):
    b, m = setup(method)
    batch = b.sample([0, 1], 5)
    assert m(batch).shape == (5, CFG.context_len, CFG.act_dim)
    assert m(batch).abs().max() <= 1.0  # tanh head


def test_conditioning_choices():
    mtdt = build_model(CFG, 2, "mtdt")
    assert mtdt.conditioning == "task-state" and mtdt.use_prompt is False  # the paper's MTDT by default
    assert mtdt.task_embed is None and mtdt.prompt_embed is None
    assert build_model(CFG, 2, "harmodt-f").use_prompt is True
    assert build_model(CFG, 2, "harmodt-f", "task-embedding").task_embed is not None
    old = build_model(CFG, 2, "mtdt", "task-id")  # the earlier name of task-embedding
    assert old.conditioning == "task-embedding" and old.task_embed is not None
    assert build_model(CFG, 2, "mtdt", "prompt").prompt_embed is not None
    with pytest.raises(ValueError, match="conditioning"):
        build_model(CFG, 2, "mtdt", "task")


def test_mtdt_reads_a_one_hot_task_id_beside_every_state():
    """--conditioning task-state (Appendix D): the state embedding takes S + T inputs, the state
    followed by the row's one-hot task ID; the task ID alone changes the action, in training's
    forward and in evaluation's act alike."""
    b, m = setup("mtdt")
    assert m.embed.state.in_features == CFG.state_dim + 2 and m.embed.ret.in_features == 1
    batch = b.sample([0, 1], 4)
    seen = []
    hook = m.embed.state.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    out = m(batch)
    hook.remove()
    x = seen[0]
    assert x.shape == (4, CFG.context_len, CFG.state_dim + 2)  # (B, K, S + T)
    assert torch.equal(x[..., : CFG.state_dim], batch["states"])  # a concatenation copies the bits
    onehot = F.one_hot(batch["task_ids"], 2).float().unsqueeze(1).expand(-1, CFG.context_len, -1)
    assert torch.equal(x[..., CFG.state_dim :], onehot)
    other = dict(batch, task_ids=1 - batch["task_ids"])
    assert not torch.allclose(out, m(other))
    batch["mask"][:] = True
    args = (batch["states"], batch["actions"], batch["rtg"], batch["timesteps"])
    act = m.act(*args, batch["task_ids"])
    torch.testing.assert_close(act, m(batch)[:, -1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(act, m.act(*args, 1 - batch["task_ids"]))


def test_prediction_is_causal():
    b, m = setup()
    batch = b.sample([0], 3)
    batch["mask"][:] = True
    out = m(batch)
    later = {k: v.clone() for k, v in batch.items()}
    later["states"][:, 4:] += 5.0
    later["actions"][:, 3:] += 1.0  # action j is the token after state j: it may not influence pred j
    out2 = m(later)
    torch.testing.assert_close(out[:, :4], out2[:, :4])
    assert not torch.allclose(out[:, 4:], out2[:, 4:])


def test_left_padding_does_not_change_real_steps():
    b, m = setup()
    batch = b.sample([1], 2)
    batch["mask"][:] = True
    full = m(batch)
    padded = {k: v.clone() for k, v in batch.items()}
    padded["mask"][:, :2] = False
    padded["states"][:, :2] = 123.0  # garbage in padding must be ignored
    short = m(padded)
    # a model fed only the last 4 steps (no padding) agrees with the padded one on them
    trimmed = {k: (v[:, 2:] if k in ("states", "actions", "rtg", "timesteps", "mask") else v) for k, v in batch.items()}
    torch.testing.assert_close(short[:, 2:], m(trimmed), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(full[:, 2:], short[:, 2:])  # it did lose the two early steps


@pytest.mark.parametrize("masked", [False, True])
def test_prompt_cache_matches_full_sequence(masked):
    b, m = setup()
    batch = b.sample([0, 1], 4)
    batch["mask"][:] = True
    ctx = erk_context(m, batch["task_ids"])[1] if masked else None
    kvs, valid = m.encode_prompt(batch, ctx)
    act = m.act(batch["states"], batch["actions"], batch["rtg"], batch["timesteps"], batch["task_ids"], ctx, kvs, valid)
    torch.testing.assert_close(act, m(batch, ctx)[:, -1], rtol=1e-5, atol=1e-6)


def test_act_runs_the_last_block_for_the_last_token_only():
    """Acting reads one action per row: the last block's attention output and MLP run on the last
    state token alone (its keys and values on every token), the other blocks on every token; the
    action equals the full forward's up to the GEMMs' rounding (bound: 1e-5 relative, 1e-6
    absolute), also on evaluation's op with each task's W * M cached."""
    b, m = setup(cfg=ModelConfig(n_layer=3, n_head=2, n_embd=32, context_len=6, prompt_len=3, dropout=0.0))
    batch = b.sample([0, 1], 6)
    batch["mask"][:] = True
    rows = {}
    hooks = [blk.fc.register_forward_hook(lambda mod, args, out, i=i: rows.update({i: args[0].shape[1]}))
             for i, blk in enumerate(m.blocks)]
    _, ctx = erk_context(m, batch["task_ids"])
    cached = MaskContext(ctx.masks, ctx.task_ids, ctx.masked_linear.cached({}), segments=((0, 3), (1, 3)))
    for c in (ctx, cached):
        kvs, valid = m.encode_prompt(batch, c)
        rows.clear()
        act = m.act(batch["states"], batch["actions"], batch["rtg"], batch["timesteps"], batch["task_ids"], c, kvs, valid)
        assert rows == {0: 3 * CFG.context_len - 1, 1: 3 * CFG.context_len - 1, 2: 1}
        torch.testing.assert_close(act, m(batch, ctx)[:, -1], rtol=1e-5, atol=1e-6)
    for h in hooks:
        h.remove()


def test_masked_weights_are_the_block_matrices():
    _, m = setup()
    names = set(m.masked_weights())
    assert names == {f"blocks.{i}.{p}.weight" for i in range(CFG.n_layer) for p in ("attn.qkv", "attn.proj", "fc", "mlp_proj")}


def explicit_masked_model(m, tm, task):
    """A copy of ``m`` whose masked matrices are replaced by W * M_task: what Eq. 4 means."""
    import copy

    ref = copy.deepcopy(m)
    with torch.no_grad():
        for name, w in ref.masked_weights().items():
            w.mul_(tm.masks[name][task])
    return ref


@pytest.mark.parametrize("method", ["harmodt-f", "harmodt-task-id"])
def test_masked_forward_and_gradient_equal_explicit_w_times_m(method):
    b, m = setup("harmodt-f")
    if method == "harmodt-task-id":
        torch.manual_seed(0)
        m = build_model(CFG, 2, "harmodt-f", "task-id").eval()
        b = PromptDTBatcher(datasets(TASKS), TASKS, CFG.context_len, 0, 100.0, seed=1)
    batch = b.sample([1], 4)
    tm, ctx = erk_context(m, torch.tensor([1]))
    ref = explicit_masked_model(m, tm, 1)
    out = m(batch, ctx)
    torch.testing.assert_close(out, ref(batch), rtol=1e-5, atol=1e-6)
    g = torch.autograd.grad(out.square().sum(), list(m.masked_weights().values()))
    g_ref = torch.autograd.grad(ref(batch).square().sum(), list(ref.masked_weights().values()))
    for (name, _), x, y in zip(m.masked_weights().items(), g, g_ref):
        torch.testing.assert_close(x, y * tm.masks[name][1], rtol=1e-4, atol=1e-7)
        assert torch.all(x[~tm.masks[name][1]] == 0)  # grad * M: exactly zero outside the mask


def test_mixed_task_batch_equals_each_task_alone():
    b, m = setup()
    batch = b.sample([0, 1], 6)
    tm, ctx = erk_context(m, batch["task_ids"])
    mixed = m(batch, ctx)
    for t in (0, 1):
        rows = batch["task_ids"] == t
        sub = {k: v[rows] for k, v in batch.items()}
        torch.testing.assert_close(mixed[rows], m(sub, MaskContext(tm.packed(), torch.tensor([t]))), rtol=1e-5, atol=1e-6)


def test_masked_linear_is_f_linear_without_context():
    torch.manual_seed(0)
    lin = MaskedLinear(8, 5)
    x = torch.randn(2, 3, 8)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))  # the very same call: the same bits
    lin.mask_key = "w"
    masks = harmodt_kernels.pack_masks(torch.rand(2, 5, 8) > 0.5)
    y = lin(x, MaskContext({"w": masks}, torch.tensor([0, 1])))
    ref = harmodt_kernels.reference.masked_linear(x.reshape(6, 8), lin.weight, lin.bias, masks, torch.tensor([0, 1]).repeat_interleave(3))
    # the reference op with the batch's row segments against it without: fp32 sums of 8 products,
    # apart by <= 8 * eps32 * sum|x w| ~ 3e-6, inside assert_close's float32 default (atol 1e-5)
    torch.testing.assert_close(y, ref.view(2, 3, 5))


@pytest.mark.skipif("cpu" not in harmodt_kernels.available_backends("cpu"), reason="native CPU ops not built")
def test_native_cpu_backend_matches_reference():
    b, m = setup()
    batch = b.sample([0, 1], 4)
    _, ctx = erk_context(m, batch["task_ids"])
    _, ctx_cpu = erk_context(m, batch["task_ids"], "cpu")
    out, out_cpu = m(batch, ctx), m(batch, ctx_cpu)
    torch.testing.assert_close(out_cpu, out, rtol=1e-5, atol=1e-6)
    g = torch.autograd.grad(out.square().sum(), list(m.parameters()))
    g_cpu = torch.autograd.grad(out_cpu.square().sum(), list(m.parameters()))
    for x, y in zip(g_cpu, g):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_runs_the_masked_layers_in_bf16():
    b, m = setup()
    batch = b.sample([0], 2)
    _, ctx = erk_context(m, torch.tensor([0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(batch, ctx)
        h = m.blocks[0].attn.qkv(torch.randn(1, 3, CFG.n_embd), ctx)
    assert h.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), m(batch, ctx), rtol=0.05, atol=0.02)
    out.float().sum().backward()
    assert m.blocks[0].fc.weight.grad.dtype == torch.float32


def test_model_module_has_no_mutable_switches():
    import harmodt.model as model_mod

    src = open(model_mod.__file__).read()
    assert "global " not in src and "is_available" not in src and "device.type" not in src


@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.long) if b == "triton" else b
                                     for b in ("reference", "cpu", "triton") if b in harmodt_kernels.available_backends("cpu")])
def test_compiled_model_has_no_graph_break(backend):
    """torch.compile sees the whole forward as one graph: the kernel ops are registered custom ops
    (the reference is plain PyTorch; its one-task case has no data-dependent control flow)."""
    import torch._dynamo

    b, m = setup("harmodt-f")
    batch = b.sample([1], 4)
    cases = [torch.tensor([1])] + ([batch["task_ids"], torch.tensor([0, 1, 1, 0])] if backend != "reference" else [])
    for ids in cases:
        torch._dynamo.reset()
        _, ctx = erk_context(m, ids, backend)
        explained = torch._dynamo.explain(m)(batch, ctx)
        assert explained.graph_break_count == 0, (backend, explained.break_reasons)
