"""Per-step values held in device tensors (what a captured CUDA graph needs, harmodt/graphed_step.py)
give the bits of the same values passed as Python numbers, on every backend that runs here: a
dropout seed in an int64 0-dim tensor (``harmodt_kernels.dropout``, the masked linear's epilogue, forward
and backward), a learning rate in a float64 0-dim tensor (``harmodt_kernels.masked_adamw_``), and the
per-site seeds computed on the device (``harmodt_kernels.reference.site_seed``)."""

import random

import pytest
import torch

import harmodt_kernels
from harmodt_kernels import reference as R

BACKENDS = harmodt_kernels.available_backends("cpu")


def test_site_seed_on_tensors_equals_the_host_arithmetic():
    rng = random.Random(0)
    for _ in range(300):
        seed, site = rng.randrange(2**63), rng.randrange(2**40)
        want = R.site_seed(seed, site)
        assert int(R.site_seed(torch.tensor(seed), site)) == want
        assert int(R.site_seed(seed, torch.tensor(site))) == want
    sites = torch.arange(13)
    assert R.site_seed(torch.tensor(12345), sites).tolist() == [R.site_seed(12345, s) for s in range(13)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_seed_in_a_tensor(backend):
    x = torch.randn(37, 70, generator=torch.Generator().manual_seed(1), requires_grad=True)
    seed = R.site_seed(7, 3)
    outs = []
    for s in (seed, torch.tensor(seed)):
        x.grad = None
        y = harmodt_kernels.dropout(x, 0.3, s, backend=backend)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), x.grad.clone()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ids", ["one", "mixed"])
def test_masked_linear_epilogue_seed_in_a_tensor(backend, ids):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 40, generator=g, requires_grad=True)
    w = torch.randn(24, 40, generator=g, requires_grad=True)
    b = torch.randn(24, generator=g, requires_grad=True)
    masks = R.pack_masks(torch.rand(3, 24, 40, generator=g) > 0.3)
    task_ids = torch.tensor([1]) if ids == "one" else torch.randint(3, (12,), generator=g)
    seed = R.site_seed(11, 5)
    outs = []
    for s in (seed, torch.tensor(seed)):
        for p in (x, w, b):
            p.grad = None
        y = harmodt_kernels.masked_linear(x, w, b, masks, task_ids, backend=backend, relu=True, dropout_p=0.2, seed=s)
        y.backward(torch.ones_like(y))
        outs.append([y.detach()] + [p.grad.clone() for p in (x, w, b)])
    for a, c in zip(*outs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_adamw_lr_in_a_tensor(backend):
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(24, 40, generator=g), torch.randn(24, generator=g)]
    grads = [torch.randn(p.shape, generator=g) for p in params]
    masks = [R.pack_masks(torch.rand(24, 40, generator=g) > 0.3), None]
    results = []
    for lr in (3e-4, torch.tensor(3e-4, dtype=torch.float64)):
        ps = [p.clone() for p in params]
        m, v = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
        steps = [torch.zeros(()) for _ in ps]
        for _ in range(3):
            harmodt_kernels.masked_adamw_(ps, grads, m, v, masks, steps, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                                  grad_scale=torch.tensor(0.7), backend=backend)
        results.append(ps + m + v)
    for a, c in zip(*results):
        assert torch.equal(a, c)


def test_bad_seed_and_lr_tensors_are_named():
    x = torch.randn(4, 8)
    with pytest.raises(harmodt_kernels.KernelArgumentError, match="a seed tensor must be int64 0-dim"):
        harmodt_kernels.dropout(x, 0.1, torch.tensor([1, 2]))
    p = [torch.randn(3)]
    with pytest.raises(harmodt_kernels.KernelArgumentError, match="a learning-rate tensor must be float64 0-dim"):
        harmodt_kernels.masked_adamw_(p, [torch.randn(3)], [torch.zeros(3)], [torch.zeros(3)], [None], [torch.zeros(())],
                              lr=torch.tensor(1e-3), beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
