"""Ahead-of-time compilation for sm_90a (no GPU): tensor-core GEMMs without spills."""

import os
import subprocess
import sys


def test_inspect_sm90a_reports_hgmma_and_no_local_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kernels.inspect", "--arch", "sm_90a"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("masked_linear", "harmony_select"))]
    gemms = [r for r in rows if r[0] == "masked_linear"]
    assert len(gemms) == 12 and len(rows) == 13
    for r in rows:
        regs, smem, local, hgmma, hmma, warps = map(int, r[-6:])
        assert local == 0, r  # no spills
        assert 0 < regs <= 255
    for r in gemms:
        assert int(r[-3]) > 0, r  # HGMMA tensor-core instructions in every GEMM kernel
