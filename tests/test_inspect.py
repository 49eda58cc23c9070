"""Ahead-of-time compilation for sm_90a and sm_80 (no GPU) of every kernel and every tile the
autotuner may pick: tensor-core GEMMs, no spills, shared memory that fits the smallest target of
the family (sm_80 family: an RTX 3090, sm_86, 99 KB per block; sm_90: an H100, 227 KB)."""

import json
import os
import subprocess
import sys

import pytest

SMEM_LIMIT = {"sm_80": 99 * 1024, "sm_90a": 227 * 1024}


def _inspect(*args) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "harmodt_kernels.inspect", "--json", *args], capture_output=True, text=True, env=env,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _check_rows(arch: str, rows: list) -> None:
    for r in rows:
        assert r["local"] == 0, r  # no spills
        assert 0 < r["registers"] <= 255, r
        assert max(r["static_shared"], r["dynamic_shared"]) <= SMEM_LIMIT[arch], r
        gemm = r["kernel"].startswith("masked_linear")
        tensor_core = r["hgmma"] if arch == "sm_90a" else r["hmma"]
        assert (tensor_core > 0) == gemm, r  # tensor-core instructions in every GEMM kernel, only there


def test_inspect_one_gemm_per_arch():
    """The 64 x 128 bf16 forward tile, a config of both families: HGMMA on sm_90a, HMMA on sm_80."""
    out = _inspect("--arch", "all", "--only", "fwd one task bf16 64x128x64")
    assert set(out) == {"sm_90a", "sm_80"}
    for arch, rows in out.items():
        assert len(rows) == 1
        _check_rows(arch, rows)


@pytest.mark.slow
def test_inspect_every_kernel_both_arches():
    """Every kernel and every config the autotuner may pick (several minutes of ptxas on 2 cores)."""
    from harmodt_kernels.triton_tiles import tile_configs

    out = _inspect("--arch", "all")
    for arch, rows in out.items():
        names = [r["kernel"] for r in rows]
        cap = {"sm_90a": 90, "sm_80": 80}[arch]
        n_tiles = {kind: sum(len(tile_configs(kind, size, cap)) for size in (2, 4)) for kind in ("fwd", "dx", "dw")}
        assert sum(n.startswith("masked_linear fwd") for n in names) == 2 * n_tiles["fwd"]  # one task and mixed
        assert sum(n.startswith("masked_linear dX") for n in names) == n_tiles["dx"]
        assert sum(n.startswith("masked_linear dW") for n in names) == n_tiles["dw"]
        assert sum(n.startswith("masked_adamw") for n in names) == 3
        assert sum(n.startswith("harmony_select") for n in names) == 3
        _check_rows(arch, rows)
