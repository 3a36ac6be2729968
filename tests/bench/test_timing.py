"""Launch counting and why an implementation cannot run here."""

from __future__ import annotations

import pytest

from fused_dreamer_loss.bench import cli, timing


def test_compiled_launches_are_inductor_kernels():
    """On a CPU, torch.compile's C++ kernels are counted (named for the profiler while compiling);
    the forward under no_grad is one fused kernel and nothing else."""
    report = cli.run(["--preset", "tiny", "--device", "cpu", "--impl", "compiled",
                      "--mode", "fwd"])
    (row,) = report["results"]
    assert row["status"] == "ok" and row["compile_s"] > 0
    launched = row["extra"]["launched"]
    assert row["launches"] == sum(launched.values()) >= 1
    assert all("cpp_fused" in name for name in launched), launched


@pytest.mark.parametrize("slowest,noisy", [(5.0, True), (1.5, False)])
def test_cpu_timing_has_a_spread_and_flags_a_noisy_step(monkeypatch, slowest, noisy):
    """On a CPU: the median, fastest and slowest of the repeats (the warm-up call not among them),
    and the step noisy where the slowest took more than NOISY_SPREAD times the fastest. A clock
    that the step moves: a 100 ms warm-up, then 1 ms a repeat but one."""
    clock = [0.0]
    durations = iter([100.0] + [1.0] * (timing.CPU_REPEATS - 1) + [slowest])

    def step():
        clock[0] += next(durations) / 1e3

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    got = timing.timed([step], cuda=False)
    assert next(durations, None) is None  # the warm-up and every repeat ran
    assert got.median_ms == pytest.approx(1.0)
    assert (got.min_ms, got.max_ms) == (pytest.approx(1.0), pytest.approx(slowest))
    assert got.noisy is noisy
    assert timing.NOISY_SPREAD == 2.0


def test_without_the_interpreter_fused_says_why_it_is_skipped(monkeypatch):
    from fused_dreamer_loss.core import machinery

    monkeypatch.setattr(machinery, "INTERPRET", False)
    reason = timing.skip_reason("fused", cuda=False)
    assert reason.startswith("skipped") and "TRITON_INTERPRET=1" in reason
