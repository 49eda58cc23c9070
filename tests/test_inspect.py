"""Ahead-of-time compilation for sm_90a and sm_80 (no GPU): tensor-core GEMMs, no spills, shared
memory that fits the smallest target (an RTX 3090, sm_86: 99 KB per block)."""

import json
import os
import subprocess
import sys

import pytest

SMEM_LIMIT = 99 * 1024


def _inspect(*args) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kernels.inspect", "--json", *args], capture_output=True, text=True, env=env,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _check_rows(arch: str, rows: list) -> None:
    for r in rows:
        assert r["local"] == 0, r  # no spills
        assert 0 < r["registers"] <= 255, r
        assert max(r["static_shared"], r["dynamic_shared"]) <= SMEM_LIMIT, r
        gemm = r["kernel"].startswith("masked_linear")
        tensor_core = r["hgmma"] if arch == "sm_90a" else r["hmma"]
        assert (tensor_core > 0) == gemm, r  # tensor-core instructions in every GEMM kernel, only there


def test_inspect_one_gemm_per_arch():
    """The qkv/fc forward (the widest tile) on both targets: HGMMA on sm_90a, HMMA on sm_80."""
    out = _inspect("--arch", "all", "--only", "fwd one task bf16 N=768")
    assert set(out) == {"sm_90a", "sm_80"}
    for arch, rows in out.items():
        assert len(rows) == 1
        _check_rows(arch, rows)


@pytest.mark.slow
def test_inspect_every_kernel_both_arches():
    """Every kernel and config (several minutes of ptxas on 2 cores)."""
    out = _inspect("--arch", "all")
    for arch, rows in out.items():
        names = [r["kernel"] for r in rows]
        assert sum(n.startswith("masked_linear fwd") for n in names) == 8
        assert sum(n.startswith("masked_linear dX") for n in names) == 2
        assert sum(n.startswith("masked_linear dW") for n in names) == 2
        assert sum(n.startswith("masked_adamw") for n in names) == 3
        assert sum(n.startswith("harmony_select") for n in names) == 3
        _check_rows(arch, rows)
