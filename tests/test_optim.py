"""MaskedAdamW: torch.optim.AdamW's arithmetic, weights outside the mask bit-for-bit unchanged, on
every kernel backend; clipping as torch's clip_grad_norm_."""

import pytest
import torch

import harmodt_kernels
from harmodt.optim import MaskedAdamW, clip_coefficient

BACKENDS = [b for b in ("reference", "cpu", "triton") if b in harmodt_kernels.available_backends("cpu")]


def params_and_grads(seed=0, shapes=((6, 40), (3, 33), (7,))):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    grads = [[torch.randn(*s, generator=g) for s in shapes] for _ in range(3)]
    return ps, grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_unmasked_step_is_torch_adamw(backend):
    ps, grads = params_and_grads()
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = MaskedAdamW(ps, lr=1e-2, weight_decay=0.1)
    topt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False)
    for gs in grads:
        for p, q, g in zip(ps, ref, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt.masked_step(op=harmodt_kernels.backend_ops(backend).masked_adamw)
        topt.step()
    for p, q in zip(ps, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    for p, q in zip(ps, ref):  # the state has AdamW's layout
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], topt.state[q][key], rtol=1e-5, atol=1e-8)
        assert float(opt.state[p]["step"]) == float(topt.state[q]["step"]) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_outside_mask_unchanged_inside_as_adamw(backend):
    ps, grads = params_and_grads(1)
    masks = {ps[0]: torch.rand(6, 40) > 0.4, ps[1]: torch.rand(3, 33) > 0.6}
    opt = MaskedAdamW(ps, lr=1e-2, weight_decay=0.1)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    topt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False)
    for gs in grads:
        before = [p.detach().clone() for p in ps]
        for p, q, g in zip(ps, ref, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt.masked_step({p: harmodt_kernels.pack_masks(m) for p, m in masks.items()}, op=harmodt_kernels.backend_ops(backend).masked_adamw)
        topt.step()
        for p, b in zip(ps, before):
            if p in masks:
                assert torch.equal(p.detach()[~masks[p]], b[~masks[p]])  # bit for bit
        with torch.no_grad():  # the reference model keeps the same weights outside the masks
            for p, q, b in zip(ps, ref, before):
                if p in masks:
                    q[~masks[p]] = b[~masks[p]]
    for p, q in zip(ps, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_scales_the_gradients_first(backend):
    for scale in (0.25, torch.tensor(0.25)):
        ps, grads = params_and_grads(2)
        scaled = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        a, b = MaskedAdamW(ps, lr=1e-2), MaskedAdamW(scaled, lr=1e-2)
        for gs in grads[:2]:
            for p, q, g in zip(ps, scaled, gs):
                p.grad, q.grad = g.clone(), g * 0.25
            a.masked_step(grad_scale=scale, op=harmodt_kernels.backend_ops(backend).masked_adamw)
            b.masked_step(op=harmodt_kernels.backend_ops(backend).masked_adamw)
        # 0.25 is a power of two: g * 0.25 is exact, and so is every product the scale enters
        # (lr * m_hat, (1 - beta1) * g, g * g * scale^2) wherever the kernel applies it, so the two
        # optimizers see the same numbers: the same bits on any processor.
        for p, q in zip(ps, scaled):
            assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trips_through_torch_adamw(backend):
    ps, grads = params_and_grads(3)
    opt = MaskedAdamW(ps, lr=1e-2)
    for p, g in zip(ps, grads[0]):
        p.grad = g
    opt.masked_step(op=harmodt_kernels.backend_ops(backend).masked_adamw)
    state = opt.state_dict()
    topt = torch.optim.AdamW(ps, lr=1e-2)
    topt.load_state_dict(state)
    again = MaskedAdamW(ps, lr=1e-2)
    again.load_state_dict(topt.state_dict())
    again.masked_step(op=harmodt_kernels.backend_ops(backend).masked_adamw)
    assert float(again.state[ps[0]]["step"]) == 2


def test_clip_coefficient_is_torch_clip_grad_norm():
    ps, grads = params_and_grads(4)
    for p, g in zip(ps, grads[0]):
        p.grad = g.clone()
    coef = clip_coefficient(ps, 0.5)
    assert coef.shape == () and coef.dtype == torch.float32
    norm = torch.nn.utils.clip_grad_norm_(ps, 0.5)
    torch.testing.assert_close(coef, torch.clamp(0.5 / (norm + 1e-6), max=1.0))
    for p, g in zip(ps, grads[0]):
        torch.testing.assert_close(p.grad, g * coef)
    assert float(clip_coefficient(ps, 1e6)) == 1.0
