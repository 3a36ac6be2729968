"""The report's table."""

from __future__ import annotations

from fused_dreamer_loss.bench.report import markdown


def test_absent_figures_show_as_a_dash_not_zero():
    report = {"device": "CPU", "torch": "x", "triton": None, "copy_gbps": None, "results": [
        {"impl": "eager", "preset": "tiny", "dtype": "float32", "mode": "fwd", "median_ms": 0.5,
         "launches": 7, "gbps": 0.42, "frac_copy": None, "peak_mem_mb": None,
         "speedup_vs_eager": 1.0, "status": "ok"}]}
    table = markdown(report)
    assert "| eager | tiny | float32 | fwd | 0.500 | 7 | 0.42 | — | — | 1.00× | ok |" in table
    assert "copy" in table.splitlines()[0] and "0 GB/s" not in table
