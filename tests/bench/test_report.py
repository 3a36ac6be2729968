"""The report's table."""

from __future__ import annotations

from fused_dreamer_loss.bench.report import markdown


def test_absent_figures_show_as_a_dash_not_zero():
    report = {"device": "CPU", "torch": "x", "triton": None, "copy_gbps": None, "results": [
        {"impl": "eager", "preset": "tiny", "dtype": "float32", "mode": "fwd", "median_ms": 0.5,
         "launches": 7, "gbps": 0.42, "frac_copy": None, "peak_mem_mb": None,
         "speedup_vs_eager": 1.0, "status": "ok"}]}
    table = markdown(report)
    assert "| eager | tiny | float32 | fwd | 0.500 | — | 7 | 0.42 | — | — | 1.00× | ok |" in table
    assert "copy" in table.splitlines()[0] and "0 GB/s" not in table


def test_the_spread_and_the_noisy_flag_are_in_the_table():
    row = {"impl": "eager", "preset": "tiny", "dtype": "float32", "mode": "fwd", "median_ms": 0.5,
           "launches": 7, "gbps": 0.42, "frac_copy": None, "peak_mem_mb": None,
           "speedup_vs_eager": 1.0, "status": "ok"}
    report = {"device": "CPU", "torch": "x", "triton": None, "copy_gbps": None, "results": [
        {**row, "min_ms": 0.45, "max_ms": 0.61, "noisy": False},
        {**row, "mode": "fwd+bwd", "min_ms": 0.41, "max_ms": 1.9, "noisy": True}]}
    table = markdown(report)
    assert "| eager | tiny | float32 | fwd | 0.500 | 0.450–0.610 | 7 |" in table
    assert "| eager | tiny | float32 | fwd+bwd | 0.500 | 0.410–1.900 noisy | 7 |" in table
    assert "| median ms | min–max ms |" in table
