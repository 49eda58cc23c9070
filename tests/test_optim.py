"""MaskedAdamW: weights outside the mask never move; native and plain paths agree."""

import pytest
import torch

from harmodt.optim import MaskedAdamW, clip_coefficient


def run(native, steps=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(37, 29, generator=g))
    b = torch.nn.Parameter(torch.randn(29, generator=g))
    opt = MaskedAdamW([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=1e-2, native=native)
    masks = [torch.rand(37, 29, generator=g) > 0.3 for _ in range(2)]
    history = []
    for s in range(steps):
        keep = masks[s % 2]
        before = w.detach().clone()
        w.grad = torch.randn(37, 29, generator=g) * keep  # masked gradient (Eq. 4)
        b.grad = torch.randn(29, generator=g)
        opt.masked_step({w: keep})
        assert torch.equal(w.detach()[~keep], before[~keep])  # bit-for-bit
        assert not torch.equal(w.detach()[keep], before[keep])
        history.append((w.detach().clone(), b.detach().clone()))
    return history, opt


@pytest.mark.parametrize("native", [False, True])
def test_outside_mask_unchanged(native):
    run(native)


def test_native_matches_plain_path():
    plain, opt_p = run(False)
    native, opt_n = run(True)
    for (wp, bp), (wn, bn) in zip(plain, native):
        torch.testing.assert_close(wn, wp, rtol=1e-5, atol=1e-6)  # updates are ~1e-2: float reordering only
        torch.testing.assert_close(bn, bp, rtol=1e-5, atol=1e-6)  # unmasked too: the native op steps the whole group
    sp = opt_p.state_dict()["state"][0]
    sn = opt_n.state_dict()["state"][0]
    torch.testing.assert_close(sn["exp_avg"], sp["exp_avg"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sn["exp_avg_sq"], sp["exp_avg_sq"], rtol=1e-4, atol=1e-7)
    assert float(sn["step"]) == float(sp["step"]) == 6


def test_native_state_loads_into_plain_optimizer():
    _, opt_n = run(True, steps=2)
    w = opt_n.param_groups[0]["params"][0]
    b = opt_n.param_groups[1]["params"][0]
    opt_p = MaskedAdamW([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=1e-2, native=False)
    opt_p.load_state_dict(opt_n.state_dict())
    w.grad = torch.ones_like(w)
    b.grad = torch.ones_like(b)
    opt_p.masked_step({w: torch.ones_like(w, dtype=torch.bool)})


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("cols", [29, 32, 48, 256])
def test_packed_keep_matches_bool_keep(native, cols):
    """A bit-packed keep mask gives bit-for-bit the step of the bool mask (native: AVX-512 and
    scalar lanes round alike; plain: unpacked first)."""
    import kernels

    results = []
    for packed in (False, True):
        g = torch.Generator().manual_seed(cols)
        w = torch.nn.Parameter(torch.randn(7, cols, generator=g))
        opt = MaskedAdamW([{"params": [w], "weight_decay": 0.1}], lr=1e-2, native=native)
        for _ in range(3):
            keep = torch.rand(7, cols, generator=g) > 0.4
            before = w.detach().clone()
            w.grad = torch.randn(7, cols, generator=g) * keep
            opt.masked_step({w: kernels.pack_masks(keep) if packed else keep})
            assert torch.equal(w.detach()[~keep], before[~keep])
        results.append((w.detach().clone(), opt.state[w]["exp_avg"].clone(), opt.state[w]["exp_avg_sq"].clone()))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_clip_coefficient_is_torch_clip_grad_norm():
    """The coefficient equals what clip_grad_norm_ multiplies by, with some squared norms given
    (as the masked weights' backward provides them) or all read from the gradients."""
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(40, 30), (30,), (7,)]]
    for scale in (10.0, 1e-3):  # clipped and not
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * scale
        grads = [p.grad.clone() for p in params]
        known = {params[0]: float(params[0].grad.double().square().sum())}
        coefs = [clip_coefficient(params, 0.25), clip_coefficient(params, 0.25, known)]
        torch.nn.utils.clip_grad_norm_(params, 0.25)
        want = float(params[1].grad[0] / grads[1][0])
        for c in coefs:
            assert c == pytest.approx(want, rel=1e-5)
        assert (coefs[0] < 1.0) == (scale == 10.0)


@pytest.mark.parametrize("native", [False, True])
def test_grad_scale_is_scaling_the_gradients_first(native):
    """masked_step(keep, grad_scale=c) gives bit for bit the step after multiplying every
    gradient by c (the native op scales while reading; other parameters are scaled in place)."""
    results = []
    for inside in (True, False):
        g = torch.Generator().manual_seed(4)
        w = torch.nn.Parameter(torch.randn(9, 40, generator=g))
        b = torch.nn.Parameter(torch.randn(40, generator=g))
        opt = MaskedAdamW([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=1e-2, native=native)
        for _ in range(3):
            keep = torch.rand(9, 40, generator=g) > 0.4
            w.grad = torch.randn(9, 40, generator=g) * keep
            b.grad = torch.randn(40, generator=g)
            if inside:
                opt.masked_step({w: keep}, grad_scale=0.3)
            else:
                w.grad.mul_(0.3)
                b.grad.mul_(0.3)
                opt.masked_step({w: keep})
        results.append((w.detach().clone(), b.detach().clone(), opt.state[w]["exp_avg_sq"].clone()))
    for x, y in zip(*results):
        assert torch.equal(x, y)


def test_native_group_step_matches_plain_path_over_awkward_params():
    """One native call steps a whole group: empty, 1-element, odd-sized and large parameters,
    masked (bool and packed, rows split between threads) and unmasked, each with its own step
    count; it matches the plain path and leaves masked-out weights bit for bit."""
    import kernels

    def make(seed):
        g = torch.Generator().manual_seed(seed)
        shapes = [(0, 5), (1,), (7, 3), (301, 257), (129, 64), (33,)]
        ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        return ps, g

    results = []
    for native in (False, True):
        ps, g = make(0)
        opt = MaskedAdamW([{"params": ps[:4], "weight_decay": 0.05}, {"params": ps[4:], "weight_decay": 0.0}], lr=3e-3, native=native)
        for step in range(4):
            keeps = {ps[3]: torch.rand(301, 257, generator=g) > 0.5, ps[4]: torch.rand(129, 64, generator=g) > 0.2}
            for i, p in enumerate(ps):
                p.grad = None if (i == 2 and step == 1) else torch.randn(p.shape, generator=g)  # one step without a gradient
            before = {p: p.detach().clone() for p in keeps}
            keep_arg = {ps[3]: kernels.pack_masks(keeps[ps[3]]), ps[4]: keeps[ps[4]]}
            opt.masked_step(keep_arg, grad_scale=0.7)
            for p, k in keeps.items():
                assert torch.equal(p.detach()[~k], before[p][~k])
        results.append(([p.detach().clone() for p in ps], [float(opt.state[p]["step"]) for p in ps]))
    (wp, sp), (wn, sn) = results
    assert sp == sn == [4.0, 4.0, 3.0, 4.0, 4.0, 4.0]
    for a, b in zip(wn, wp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
