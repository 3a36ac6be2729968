"""Launch counting and why an implementation cannot run here."""

from __future__ import annotations

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


def test_without_the_interpreter_fused_says_why_it_is_skipped(monkeypatch):
    from fused_dreamer_loss.core import machinery

    monkeypatch.setattr(machinery, "INTERPRET", False)
    reason = timing.skip_reason("fused", cuda=False)
    assert reason.startswith("skipped") and "TRITON_INTERPRET=1" in reason
