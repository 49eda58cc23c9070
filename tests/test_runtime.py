"""harmodt.runtime: the bf16 note follows the CPU's bf16 matrix instructions."""

from __future__ import annotations

import torch

from harmodt.runtime import bf16_matmul_note


def test_bf16_note_only_without_bf16_matrix_instructions(monkeypatch):
    for bf16, amx, expect_note in ((False, False, True), (True, False, False), (False, True, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        note = bf16_matmul_note()
        assert (note is not None) == expect_note
        if note:
            assert "--precision bf16" in note and "slower than --precision fp32" in note
