"""Prompt-DT / MTDT model: shapes, causality, padding, dropout, masked linear paths."""

import pytest
import torch

from _synthetic import datasets
from harmodt.config import ModelConfig
from harmodt.data.batches import PromptDTBatcher
from harmodt.model import MaskContext, _keep_mask, build_model
from harmodt.masks import TaskMasks

CFG = ModelConfig(n_layer=2, n_head=2, n_embd=32, context_len=6, prompt_len=3, dropout=0.0)
TASKS = ["a", "b"]


def setup(method="prompt-dt"):
    torch.manual_seed(0)
    b = PromptDTBatcher(datasets(TASKS), TASKS, CFG.context_len, CFG.prompt_len if method != "mtdt" else 0, 100.0, seed=1)
    return b, build_model(CFG, 2, method).eval()


@pytest.mark.parametrize("method", ["prompt-dt", "mtdt"])
def test_forward_shapes(method):
    b, m = setup(method)
    batch = b.sample([0, 1], 5)
    assert m(batch).shape == (5, CFG.context_len, CFG.act_dim)
    assert m(batch).abs().max() <= 1.0  # tanh head


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


def test_prompt_cache_matches_full_sequence():
    b, m = setup()
    batch = b.sample([0], 2)
    batch["mask"][:] = True
    kvs, valid = m.encode_prompt(batch)
    act = m.act(batch["states"], batch["actions"], batch["rtg"], batch["timesteps"], batch["task_ids"], None, kvs, valid)
    torch.testing.assert_close(act, m(batch)[:, -1], rtol=1e-5, atol=1e-6)


def _untrimmed_forward(m, batch, ctx=None):
    """Every block on every token, then the history's state tokens: what the trimmed forward skips."""
    from harmodt.model import Attention

    x = m._tokens(batch["states"], batch["actions"], batch["rtg"], batch["timesteps"], batch["task_ids"], m.embed)
    valid = batch["mask"].repeat_interleave(3, dim=1)
    if m.use_prompt:
        p = m.prompt_embed(batch["prompt_states"], batch["prompt_actions"], batch["prompt_rtg"], batch["prompt_timesteps"])
        x = torch.cat([p, x], dim=1)
        valid = torch.cat([batch["prompt_mask"].repeat_interleave(3, dim=1), valid], dim=1)
    x = m.embed_ln(x)
    attn = Attention.causal(valid, x.shape[1])
    for blk in m.blocks:
        x = blk(x, attn, ctx)
    k = batch["states"].shape[1]
    return torch.tanh(m.predict_action(m.ln_f(x[:, -3 * k :][:, 1::3])))


def _erk_context(m, method, task_ids, **kw):
    """ERK masks (S = 0.3) for the two tasks and a mask context over ``task_ids`` (None for the
    unmasked methods)."""
    if not method.startswith("harmodt"):
        return None
    shapes = {n: tuple(w.shape) for n, w in m.masked_weights().items()}
    tm = TaskMasks.erk(shapes, 2, 0.3, torch.Generator().manual_seed(0))
    if kw.get("fused"):
        import kernels

        kw["packed"] = {n: kernels.pack_masks(x) for n, x in tm.masks.items()}
    return MaskContext.for_tasks(tm.masks, task_ids, **kw)


@pytest.mark.parametrize("method", ["prompt-dt", "mtdt", "harmodt-f"])
def test_last_block_on_state_tokens_only_matches_full_forward(method):
    b, m = setup(method)
    batch = b.sample([0, 1], 4)
    batch["mask"][0, :2] = False  # a left-padded row
    ctx = _erk_context(m, method, batch["task_ids"])
    out = m(batch, ctx)
    ref = _untrimmed_forward(m, batch, ctx)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # the gradients agree too (the loss reads only the state tokens)
    ga = torch.autograd.grad(out.square().sum(), list(m.parameters()), allow_unused=True)
    gb = torch.autograd.grad(_untrimmed_forward(m, batch, ctx).square().sum(), list(m.parameters()), allow_unused=True)
    for x, y in zip(ga, gb):
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_keep_mask_rate_and_determinism():
    torch.manual_seed(3)
    k = _keep_mask(torch.Size([200_000]), 0.1)
    assert abs((~k).float().mean().item() - 0.1) < 0.005
    torch.manual_seed(3)
    assert torch.equal(k, _keep_mask(torch.Size([200_000]), 0.1))


def test_masked_weights_are_block_matrices_only():
    _, m = setup()
    names = set(m.masked_weights())
    assert len(names) == 4 * CFG.n_layer
    assert all(n.startswith("blocks.") and n.endswith(".weight") for n in names)


def test_fused_reference_backend_matches_plain_path():
    b, m = setup()
    shapes = {n: tuple(w.shape) for n, w in m.masked_weights().items()}
    tm = TaskMasks.erk(shapes, 2, 0.3, torch.Generator().manual_seed(0))
    batch = b.sample([0, 1], 4)
    plain = m(batch, MaskContext.for_tasks(tm.masks, batch["task_ids"]))
    fused = m(batch, MaskContext.for_tasks(tm.masks, batch["task_ids"], packed=tm.packed(), fused=True, backend="reference"))
    torch.testing.assert_close(plain, fused, rtol=1e-5, atol=1e-6)


def test_reused_masked_weight_buffer_is_safe():
    """The single-task path writes W*M into a reused buffer: gradients match a fresh computation,
    and a second forward before the first backward is caught, not silently wrong."""
    b, m = setup()
    m.train()
    shapes = {n: tuple(w.shape) for n, w in m.masked_weights().items()}
    tm = TaskMasks.erk(shapes, 2, 0.3, torch.Generator().manual_seed(0))
    batch = b.sample([1], 3)
    ctx = MaskContext.for_tasks(tm.masks, batch["task_ids"])
    for _ in range(2):  # the second round reuses the buffers
        m.zero_grad()
        m(batch, ctx).square().sum().backward()
        grads = {n: w.grad.clone() for n, w in m.masked_weights().items()}
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    m2 = build_model(CFG, 2, "prompt-dt").train()
    m2.load_state_dict(ref)
    with torch.no_grad():
        for n, w in m2.masked_weights().items():
            w.mul_(tm.masks[n][1])
    m2(batch).square().sum().backward()
    for n, w in m2.masked_weights().items():
        torch.testing.assert_close(grads[n], w.grad * tm.masks[n][1], rtol=1e-5, atol=1e-7)
    first = m(batch, ctx).sum()
    m(batch, ctx).sum()  # overwrites the buffers the first graph saved
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.backward()


@pytest.mark.parametrize("method", ["prompt-dt", "mtdt", "harmodt-f"])
def test_native_block_ops_match_plain_path(method, monkeypatch):
    """The native block ops -- fused attention (with attention dropout in training) and the GEMM
    epilogues (bias + ReLU, bias + dropout + residual) -- against the plain path (explicit softmax
    + kernels.dropout, sdpa without dropout, addmm + relu + dropout + add): same outputs and
    gradients for the same torch seed, in training, and in evaluation with the cached prompt."""
    import harmodt.model as model_mod

    assert model_mod._native_ops(), "the native library is built for the tests"
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, context_len=6, prompt_len=3, dropout=0.3)
    torch.manual_seed(0)
    b = PromptDTBatcher(datasets(TASKS), TASKS, cfg.context_len, cfg.prompt_len if method != "mtdt" else 0, 100.0, seed=1)
    m = build_model(cfg, 2, method).train()
    batch = b.sample([0, 1], 4)
    batch["mask"][0, :2] = False  # a left-padded row
    ctx = _erk_context(m, method, batch["task_ids"])
    runs = []
    for native in (True, False):
        monkeypatch.setattr(model_mod, "_NATIVE_BLOCK_OPS", native)
        torch.manual_seed(5)  # the same dropout seeds on both paths
        out = m(batch, ctx)
        grads = torch.autograd.grad(out.square().sum(), list(m.parameters()), allow_unused=True)
        m.eval()
        act = None
        if method != "mtdt":
            kvs, valid = m.encode_prompt(batch, ctx)
            act = m.act(batch["states"], batch["actions"], batch["rtg"], batch["timesteps"], batch["task_ids"], ctx, kvs, valid)
        m.train()
        runs.append((out, grads, act))
    (out_n, g_n, act_n), (out_p, g_p, act_p) = runs
    torch.testing.assert_close(out_n, out_p, rtol=1e-5, atol=1e-6)
    for x, y in zip(g_n, g_p):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    if act_n is not None:
        torch.testing.assert_close(act_n, act_p, rtol=1e-5, atol=1e-6)


def _runs_under(monkeypatch, m, batch, ctx, setting: str, values: tuple, counted: list) -> list:
    """(output, parameter gradients, entries appended to ``counted``, the masked weights' gradient
    sums of squares the model recorded for clipping) of one seeded training forward/backward per
    value of the ``harmodt.model`` switch ``setting``."""
    import harmodt.model as model_mod

    runs = []
    for value in values:
        monkeypatch.setattr(model_mod, setting, value)
        counted.clear()
        torch.manual_seed(5)
        out = m(batch, ctx)
        grads = torch.autograd.grad(out.square().sum(), list(m.parameters()), allow_unused=True)
        norms = None if m.grad_sq_norms is None else m.grad_sq_norms.by_param()
        runs.append((out, grads, len(counted), None if norms is None else [norms.get(p) for p in m.parameters()]))
    return runs


@pytest.mark.parametrize("method", ["prompt-dt", "harmodt-f"])
def test_block_gemms_on_kernels_linear_match_f_linear(method, monkeypatch):
    """The fp32 block GEMMs through kernels.linear (oneDNN; the default with the native ops built)
    against F.linear (MKL) on the same forward: outputs and every gradient agree to fp32 rounding,
    on the single-task masked training path (W * M for the step) and the dense one."""
    import harmodt.model as model_mod

    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, context_len=6, prompt_len=3, dropout=0.3)
    torch.manual_seed(0)
    b = PromptDTBatcher(datasets(TASKS), TASKS, cfg.context_len, cfg.prompt_len, 100.0, seed=1)
    m = build_model(cfg, 2, method).train()
    batch = b.sample([1], 4)
    ctx = _erk_context(m, method, batch["task_ids"], fused=True) if method != "prompt-dt" else None
    monkeypatch.setattr(model_mod, "_FUSED_BLOCK", False)  # the per-op path (the fused blocks call the GEMM op raw)
    calls = []
    monkeypatch.setattr(model_mod.kernels, "linear", lambda *a, _f=model_mod.kernels.linear, **k: calls.append(1) or _f(*a, **k))
    (out_n, g_n, calls_n, _), (out_p, g_p, calls_p, _) = _runs_under(monkeypatch, m, batch, ctx, "_GEMM_ENGINE", ("auto", "blas"), calls)
    assert calls_n == 4 * cfg.n_layer and calls_p == 0  # every block GEMM on kernels.linear, then none
    torch.testing.assert_close(out_n, out_p, rtol=1e-5, atol=1e-6)
    for x, y in zip(g_n, g_p):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["prompt-dt", "mtdt", "harmodt-f"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_block_nodes_equal_the_unfused_blocks(method, dropout, monkeypatch):
    """Each block's fp32 training step as one autograd node (_fused_block: every block, the last
    one on the state tokens only) against the unfused native path: the same ops and dropout draws,
    so the output and every gradient are bit-identical; a left-padded row included."""
    import harmodt.model as model_mod

    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=32, context_len=6, prompt_len=3, dropout=dropout)
    torch.manual_seed(0)
    b = PromptDTBatcher(datasets(TASKS), TASKS, cfg.context_len, cfg.prompt_len if method != "mtdt" else 0, 100.0, seed=1)
    m = build_model(cfg, 2, method).train()
    batch = b.sample([1], 4)
    batch["mask"][0, :2] = False
    ctx = _erk_context(m, method, batch["task_ids"], fused=True)
    applied = []
    monkeypatch.setattr(model_mod, "_fused_block", lambda *a, _f=model_mod._fused_block: applied.append(1) or _f(*a))
    (out_f, g_f, n_f, sq_f), (out_u, g_u, n_u, sq_u) = _runs_under(monkeypatch, m, batch, ctx, "_FUSED_BLOCK", (None, False), applied)
    assert (n_f, n_u) == (cfg.n_layer, 0)
    assert torch.equal(out_f, out_u)
    assert sq_f == sq_u  # the clipping norms: from the fused nodes' in-cache masking vs the one pass over all gradients
    if method == "harmodt-f":
        assert sum(v is not None for v in sq_f) == 4 * cfg.n_layer
    for x, y in zip(g_f, g_u):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y)


@pytest.mark.parametrize("method", ["prompt-dt", "harmodt-f"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_block_nodes_under_bf16_autocast_match_the_per_op_blocks(method, dropout, monkeypatch):
    """Under CPU bf16 autocast (``--precision bf16``) the block nodes run their GEMMs in bf16
    themselves (W * M rounded once, fp32 residual stream, layer norms, biases and gradients; on the
    AVX512-BF16 kernel the bias, ReLU, dropout, residual add and gradient masking inside the GEMMs,
    unrounded). Against the same model in fp32, the gradients as a whole are no further off than
    the per-op blocks' under autocast (which round each GEMM's output to bf16 first) and within 2 %;
    each parameter's within 20 % (a ReLU unit near 0 may switch on one path and not the other: that
    moves single gradients a lot, whichever path rounds where); the gradients come back fp32; with
    masks the nodes record the per-op blocks' clipping norms to bf16 precision."""
    import harmodt.model as model_mod

    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=32, context_len=6, prompt_len=3, dropout=dropout)
    torch.manual_seed(0)
    b = PromptDTBatcher(datasets(TASKS), TASKS, cfg.context_len, cfg.prompt_len, 100.0, seed=1)
    m = build_model(cfg, 2, method).train()
    with torch.no_grad():  # biases start at zero: give them values, so a bias the GEMM epilogues drop shows
        for name, prm in m.named_parameters():
            if name.endswith("bias"):
                prm.normal_(0.0, 0.1)
    batch = b.sample([1], 4)
    batch["mask"][0, :2] = False
    ctx = _erk_context(m, method, batch["task_ids"], fused=True) if method != "prompt-dt" else None
    applied = []
    monkeypatch.setattr(model_mod, "_fused_block", lambda *a, _f=model_mod._fused_block: applied.append(a[-1]) or _f(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (out_f, g_f, n_f, sq_f), (out_u, g_u, n_u, sq_u) = _runs_under(monkeypatch, m, batch, ctx, "_FUSED_BLOCK", (None, False), applied)
    ((out_r, g_r, _, _),) = _runs_under(monkeypatch, m, batch, ctx, "_FUSED_BLOCK", (None,), applied)  # fp32
    assert (n_f, n_u) == (cfg.n_layer, 0)
    torch.testing.assert_close(out_f.float(), out_u.float(), rtol=2e-2, atol=2e-2)
    assert (out_f.float() - out_r).abs().max() <= max(1.5 * (out_u.float() - out_r).abs().max().item(), 2e-2)
    sq_fused = sq_per_op = sq_ref = 0.0
    for p, x, y, r in zip(m.parameters(), g_f, g_u, g_r):
        assert (x is None) == (y is None) == (r is None)
        if x is not None:
            assert x.dtype == p.dtype == torch.float32
            ref = r.norm().item() + 1e-12
            assert (x - r).norm().item() <= 0.2 * ref and (y - r).norm().item() <= 0.2 * ref
            sq_fused, sq_per_op, sq_ref = sq_fused + (x - r).square().sum().item(), sq_per_op + (y - r).square().sum().item(), sq_ref + ref**2
    err_fused, err_per_op = (sq_fused / sq_ref) ** 0.5, (sq_per_op / sq_ref) ** 0.5
    assert err_fused <= min(1.5 * err_per_op + 0.005, 0.02), (err_fused, err_per_op)
    if method == "harmodt-f":
        got = [v for v in sq_f if v is not None]
        assert len(got) == 4 * cfg.n_layer and all(v > 0 for v in got)
        for v, w in zip(sq_f, sq_u):
            if v is not None:
                assert abs(v - w) <= 0.05 * w


@pytest.mark.parametrize("method", ["prompt-dt", "harmodt-f"])
def test_act_layer0_cache_matches_recomputing(method):
    """Evaluation's cache of the first block's q/k/v (kept per token, the window sliding) gives the
    actions of a full recomputation at every step, before and after the window fills."""
    b, m = setup(method)
    batch = b.sample([0, 1], 3)
    kvs, valid = m.encode_prompt(batch)
    ctx = _erk_context(m, method, batch["task_ids"], fused=True)
    g = torch.Generator().manual_seed(1)
    steps, k = 14, CFG.context_len
    states, actions = torch.randn(3, steps, CFG.state_dim, generator=g), torch.randn(3, steps, CFG.act_dim, generator=g)
    rtg = torch.randn(3, steps, 1, generator=g)
    cache = {}
    with torch.no_grad():
        for t in range(steps):
            lo = max(0, t - k + 1)
            cache["drop"] = 3 if lo > max(0, t - k) else 0
            ts = torch.arange(lo, t + 1).expand(3, -1)
            args = (states[:, lo : t + 1], actions[:, lo : t + 1], rtg[:, lo : t + 1], ts, batch["task_ids"], ctx, kvs, valid)
            torch.testing.assert_close(m.act(*args, cache=cache), m.act(*args), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cache"):
        m.act(*args, cache={"qkv": cache["qkv"].repeat(1, 2, 1, 1, 1)})


def test_embeddings_and_action_head_stay_fp32_under_autocast():
    """Under CPU bf16 autocast the input embeddings and the action head compute in fp32
    (``harmodt.model._full_precision``): the tokens equal the fp32 ones bit for bit, the prediction
    is fp32, and the head's fp32 output equals the head applied outside autocast."""
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, context_len=6, prompt_len=3, dropout=0.0)
    torch.manual_seed(0)
    b = PromptDTBatcher(datasets(TASKS), TASKS, cfg.context_len, cfg.prompt_len, 100.0, seed=1)
    m = build_model(cfg, 2, "prompt-dt").eval()
    batch = b.sample([0], 3)
    args = (batch["states"], batch["actions"], batch["rtg"], batch["timesteps"])
    want = m.embed(*args)
    x = torch.randn(3, 6, cfg.n_embd)
    head = m._action_head(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m.embed(*args)
        got_head = m._action_head(x)
        pred = m(batch)
        plain = m.predict_action(m.ln_f(x))  # an nn.Linear outside the helper does run in bf16
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert got_head.dtype == pred.dtype == torch.float32 and torch.equal(got_head, head)
    assert plain.dtype == torch.bfloat16
