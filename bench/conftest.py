"""Fused-vs-reference summary table for bench/test_bench_kernels.py (printed at session end)."""

from __future__ import annotations

import pytest

from harmodt.runtime import keep_freed_memory

_KEY = "_harmodt_kernel_results"


def pytest_configure(config):
    """Every benchmark runs with the allocator setting the CLIs use (``harmodt.train`` and
    ``harmodt.evaluate`` apply it first): glibc keeps freed blocks instead of unmapping them. The
    setting is process-wide and cannot be undone, so it is applied once here, before any benchmark
    module is imported: a benchmark then measures the same whether it runs alone or in the suite.
    (When only some files set it at import, ``test_bench_kernels.py`` measured the reference
    masked_linear's evaluation forward, whose 280 MB workspace page-faults in on every call without
    it, at 285.8 ms alone and 143.9 ms in the suite.)"""
    keep_freed_memory()


@pytest.fixture
def kernel_results(request):
    """A session-wide list; each kernel benchmark appends one row of its extra_info."""
    if not hasattr(request.config, _KEY):
        setattr(request.config, _KEY, [])
    return getattr(request.config, _KEY)


def _mib(row, key):
    v = row.get(key)
    return "" if v is None else f"{v:.1f}"


def pytest_terminal_summary(terminalreporter, config):
    rows = getattr(config, _KEY, [])
    if not rows:
        return
    tr = terminalreporter
    tr.section("native CPU kernels vs reference")
    head = (f"{'benchmark':56s} {'fused ms':>9s} {'ref ms':>9s} {'speedup':>8s} "
            f"{'fused MiB':>10s} {'ref MiB':>9s} {'mem ratio':>9s}  targets")
    tr.write_line(head)
    tr.write_line("-" * len(head))
    for r in rows:
        ratio = r.get("workspace_ratio")
        tr.write_line(
            f"{r['name']:56s} {r['fused_ms']:9.1f} {r['reference_ms']:9.1f} {r['speedup']:7.2f}x "
            f"{_mib(r, 'fused_workspace_MiB'):>10s} {_mib(r, 'reference_workspace_MiB'):>9s} "
            f"{'' if ratio is None else f'{ratio:.1f}x':>9s}  {r.get('targets', '')}"
        )
    tr.write_line("MiB = peak extra resident memory besides the returned outputs (see bench/test_bench_kernels.py)")
