"""The masked-linear kernels' autotuned tiles (harmodt_kernels/triton_tiles.py): every tile the autotuner
may pick on sm_80 or sm_90, for fp32 or 16-bit inputs, run by Triton's interpreter against the
reference; and the config lists themselves (targets, reduction tiles, shared memory)."""

import os

import pytest
import torch

import harmodt_kernels
import harmodt_kernels.triton_masked_linear as tml
import harmodt_kernels.triton_tiles as tt
from harmodt_kernels import reference as R

KERNELS = {"fwd": tml._fwd_kernel, "dx": tml._dx_kernel, "dw": tml._dw_kernel}


def _tiles(kind: str) -> list[tuple]:
    """Distinct (BM, BN, BK) of every config ``kind`` may run with on a GPU."""
    out = []
    for cap in (80, 86, 90, 100):
        for size in (2, 4):
            for c in tt.tile_configs(kind, size, cap):
                t = (c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"])
                if t not in out:
                    out.append(t)
    return out


CASES = [(kind, tile) for kind in KERNELS for tile in _tiles(kind)]


def test_every_gpu_config_is_in_the_autotuners_list():
    for kind, kernel in KERNELS.items():
        listed = {str(c) for c in kernel.configs}
        for cap in (80, 90):
            for size in (2, 4):
                cfgs = tt.tile_configs(kind, size, cap)
                assert len(cfgs) >= 2, (kind, cap, size)
                assert {str(c) for c in cfgs} <= listed, (kind, cap, size)


@pytest.mark.parametrize("kind", list(KERNELS))
def test_reduction_tile_is_fixed_per_element_size(kind):
    """The tile along the reduced dimension is the same in every config of an element size."""
    red = {"fwd": "BK", "dx": "BN", "dw": "BM"}[kind]
    for size, want in ((4, 32), (2, 64)):
        for cap in (80, 90):
            assert {c.kwargs[red] for c in tt.tile_configs(kind, size, cap)} == {want}, (kind, size, cap)


def test_families_and_interpreter_tile():
    assert tt.target_family(80) == tt.target_family(86) == tt.target_family(89) == "sm_80"
    assert tt.target_family(90) == tt.target_family(100) == "sm_90"
    (c,) = tt.tile_configs("fwd", 4, None)
    assert (c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"]) == tt.INTERPRET_TILE[:3]
    with pytest.raises(ValueError, match="unknown kernel 'bwd'"):
        tt.tile_configs("bwd", 4, 90)


def test_sm80_tiles_fit_99_kb_of_shared_memory():
    """Operand tiles of all pipeline stages (x/dY, W and the mask words) within an RTX 3090's
    99 KB per block: an upper bound on what Triton allocates (harmodt_kernels.inspect reads the real one)."""
    for kind in KERNELS:
        for size in (2, 4):
            for c in tt.tile_configs(kind, size, 86):
                bm, bn, bk = c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"]
                a, b = {"fwd": (bm * bk, bn * bk), "dx": (bm * bn, bn * bk), "dw": (bn * bm, bm * bk)}[kind]
                words = bn * bk // 32 * 4
                assert c.num_stages * ((a + b) * size + words) <= 99 * 1024, (kind, size, c)


@pytest.fixture
def one_tile(monkeypatch):
    """Makes the autotuner of ``kind`` pick ``tile`` (and the other kernels the interpreter's
    tile), with the autotuners' caches emptied before and after."""

    def clear():
        for k in KERNELS.values():
            k.cache.clear()

    def use(kind, tile):
        real = tt.tile_configs
        chosen = next(c for cap in (80, 90) for size in (2, 4) for c in real(kind, size, cap)
                      if (c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"]) == tile)

        def configs(kernel, element_size, capability):
            return [chosen] if kernel == kind else real(kernel, element_size, None)

        monkeypatch.setattr(tt, "tile_configs", configs)
        clear()

    yield use
    clear()


@pytest.mark.interpreter
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)")
@pytest.mark.parametrize("kind,tile", CASES, ids=[f"{k}-{'x'.join(map(str, t))}" for k, t in CASES])
def test_every_tile_matches_reference(kind, tile, one_tile):
    """Forward, dX, dW and task gradients with ``kind`` on ``tile``: one task ([1]) and mixed
    tasks ([R], one task absent), with R, N and K not multiples of the tile."""
    one_tile(kind, tile)
    g = torch.Generator().manual_seed(sum(tile))
    r, k, n, t = 150, 100, 140, 4
    x, w, b = torch.randn(r, k, generator=g), torch.randn(n, k, generator=g) * 0.1, torch.randn(n, generator=g)
    m = R.pack_masks(torch.rand(t, n, k, generator=g) > 0.3)
    mixed = torch.randint(0, t - 1, (r,), generator=g)
    dy = torch.randn(r, n, generator=g)
    for ids in (torch.tensor([2]), mixed):
        out = {}
        for backend in ("triton", "reference"):
            xx, ww, bb = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
            tg = torch.zeros(t, n, k)
            y = harmodt_kernels.masked_linear(xx, ww, bb, m, ids, task_grads=tg, backend=backend)
            y.backward(dy)
            out[backend] = (y.detach(), xx.grad, ww.grad, bb.grad, tg)
        for name, a, e in zip(("y", "dx", "dw", "db", "task_grads"), out["triton"], out["reference"]):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=f"{name}, task_ids {tuple(ids.shape)}")
    assert KERNELS[kind].best_config.kwargs == dict(zip(("BM", "BN", "BK"), tile))
