"""The benchmark CLI on a CPU: it runs, checks the fused kernels through Triton's interpreter,
counts launches, writes the documented JSON, exits 0 only on success and rejects bad arguments."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from fused_dreamer_loss import bench

ROW_KEYS = {"impl", "preset", "frames", "image_shape", "latent_dim", "dtype", "mode", "median_ms",
            "gbps", "peak_mem_mb", "frac_copy", "speedup_vs_eager", "compile_s", "status", "extra",
            "launches", "model_bytes"}
SCRIPT = pathlib.Path(sys.executable).parent / "fused-dreamer-loss-bench"
CPU = not torch.cuda.is_available()


def numbers(row):
    return [row[k] for k in ("median_ms", "gbps", "peak_mem_mb", "frac_copy", "speedup_vs_eager",
                             "compile_s", "launches", "model_bytes")]


@pytest.mark.skipif(not CPU, reason="the CPU path: fused through Triton's interpreter")
def test_tiny_preset_on_cpu(tmp_path, capsys):
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    report = bench.run(["--preset", "tiny", "--device", "cpu", "--impl", "fused", "eager",
                        "torchrl", "--json", str(out_json), "--markdown", str(out_md)])
    data = json.loads(out_json.read_text())
    assert data == json.loads(json.dumps(report))
    assert {"device", "torch", "triton", "copy_gbps", "results"} <= data.keys()
    assert data["copy_gbps"] is None and data["interpreter"] is True
    assert len(data["results"]) == 3 * 2  # impls x modes
    rows = {(r["impl"], r["mode"]): r for r in data["results"]}
    for row in data["results"]:
        assert ROW_KEYS <= row.keys()
        assert row["preset"] == "tiny" and row["frames"] == 32 and row["image_shape"] == [3, 16, 16]
        assert row["model_bytes"] == bench.minimal_bytes(32, 768, 30, 4, row["mode"])
        # A figure that was not measured is None, never 0.
        assert all(v is None or v > 0 for v in numbers(row)), row
        if row["impl"] == "fused":
            assert row["status"].startswith("correct (interpreter)")
            assert row["median_ms"] is None and row["gbps"] is None
        else:
            assert row["status"] == "ok" and row["median_ms"] > 0 and row["gbps"] > 0
        assert row["peak_mem_mb"] is None and row["frac_copy"] is None  # CUDA-only figures
    # The fused launches: forward kernel + finalize, and one backward kernel; fwd+bwd also has the
    # three grad-output fills of torch.autograd.grad, as every implementation does.
    fwd, both = rows["fused", "fwd"]["extra"]["launched"], rows["fused", "fwd+bwd"]["extra"]["launched"]
    assert sum(n for k, n in fwd.items() if k.startswith("triton::")) == 2 == rows["fused", "fwd"]["launches"]
    assert sum(n for k, n in both.items() if k.startswith("triton::")) == 3
    assert both.get("aten::fill_") == 3 and rows["fused", "fwd+bwd"]["launches"] == 6
    for impl in ("eager", "torchrl"):
        assert rows[impl, "fwd+bwd"]["launches"] > 6 and rows[impl, "fwd+bwd"]["extra"]["launched"]
    assert all(r["speedup_vs_eager"] == 1.0 for r in data["results"] if r["impl"] == "eager")
    table = out_md.read_text()
    assert "| eager | tiny | float32 | fwd+bwd |" in table
    assert "| fused | tiny | float32 | fwd+bwd | — | 6 | — |" in table
    assert "0 GB/s" not in table and "| 0 |" not in table
    out = capsys.readouterr().out
    assert "fused: correct (interpreter) on tiny float32" in out
    assert "need a CUDA GPU" in out
    assert "modelled bytes per step" in out and "fwd+bwd 0.326 MB" in out


def test_compiled_launches_are_inductor_kernels():
    """On a CPU, torch.compile's C++ kernels are counted (named for the profiler while compiling);
    the forward under no_grad is one fused kernel and nothing else."""
    report = bench.run(["--preset", "tiny", "--device", "cpu", "--impl", "compiled",
                        "--mode", "fwd"])
    (row,) = report["results"]
    assert row["status"] == "ok" and row["compile_s"] > 0
    launched = row["extra"]["launched"]
    assert row["launches"] == sum(launched.values()) >= 1
    assert all("cpp_fused" in name for name in launched), launched


def test_minimal_bytes_counts_each_tensor_once():
    # 2 frames, 10-element images, 3 latents, fp32: reads 4*3 + 2*10 + 2 per frame,
    # fwd+bwd writes 4*3 + 10 + 1 more.
    assert bench.minimal_bytes(2, 10, 3, 4, "fwd") == 2 * (12 + 20 + 2) * 4
    assert bench.minimal_bytes(2, 10, 3, 4, "fwd+bwd") == 2 * (12 + 20 + 2 + 12 + 10 + 1) * 4


def test_absent_figures_show_as_a_dash_not_zero():
    report = {"device": "CPU", "torch": "x", "triton": None, "copy_gbps": None, "results": [
        {"impl": "eager", "preset": "tiny", "dtype": "float32", "mode": "fwd", "median_ms": 0.5,
         "launches": 7, "gbps": 0.42, "frac_copy": None, "peak_mem_mb": None,
         "speedup_vs_eager": 1.0, "status": "ok"}]}
    table = bench.markdown(report)
    assert "| eager | tiny | float32 | fwd | 0.500 | 7 | 0.42 | — | — | 1.00× | ok |" in table
    assert "copy" in table.splitlines()[0] and "0 GB/s" not in table


def test_main_returns_0_on_success(capsys):
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--impl", "eager",
                       "--mode", "fwd"]) == 0
    assert capsys.readouterr().err == ""


def test_a_wrong_fused_result_exits_1_with_the_reason(monkeypatch, capsys):
    monkeypatch.setattr(bench, "check_fused", lambda inputs, reco_loss: "loss_kl: relative error 1")
    # The default device: cuda when there is one (the compiled kernels), else the interpreter.
    argv = ["--preset", "tiny", "--impl", "fused", "eager", "--mode", "fwd"]
    assert bench.main(argv) == 1
    err = capsys.readouterr().err
    assert "1 of 2 failed" in err and "fused tiny float32 fwd: wrong: loss_kl: relative error 1" in err


def test_a_crashing_implementation_exits_1_and_the_others_still_run(monkeypatch, capsys):
    real = bench.loss_fn

    def loss_fn(impl, reco_loss):
        if impl == "torchrl":
            raise RuntimeError("boom")
        return real(impl, reco_loss)

    monkeypatch.setattr(bench, "loss_fn", loss_fn)
    argv = ["--preset", "tiny", "--device", "cpu", "--impl", "torchrl", "eager", "--mode", "fwd"]
    assert bench.main(argv) == 1
    captured = capsys.readouterr()
    assert "torchrl tiny float32 fwd: failed: RuntimeError: boom" in captured.err
    assert "| eager | tiny | float32 | fwd |" in captured.out  # the run went on


def test_without_the_interpreter_fused_says_why_it_is_skipped(monkeypatch):
    class NotInterpreting:
        INTERPRET = False

    monkeypatch.setattr(bench, "_triton_kernels", lambda: NotInterpreting)
    reason = bench.skip_reason("fused", cuda=False)
    assert reason.startswith("skipped") and "TRITON_INTERPRET=1" in reason


@pytest.mark.skipif(not CPU, reason="the CPU path: the command restarts itself with the interpreter")
def test_installed_console_script(tmp_path):
    """The command a newcomer runs, as installed next to this Python: exit 0, the fused kernels
    checked through the interpreter (the command turns it on itself), nothing on stderr."""
    assert SCRIPT.exists(), f"{SCRIPT} is missing: install the project (pip install -e .)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "r.json"
    # compiled is left out to keep CI fast (its compile takes tens of seconds on 2 cores).
    proc = subprocess.run([str(SCRIPT), "--impl", "fused", "eager", "torchrl", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "fused: correct (interpreter)" in proc.stdout
    rows = json.loads(out.read_text())["results"]
    assert {r["impl"] for r in rows} == {"fused", "eager", "torchrl"}
    assert all(r["status"] == "ok" or r["status"].startswith("correct") for r in rows)


@pytest.mark.parametrize("argv", [
    ["--preset", "huge"], ["--dtype", "int8"], ["--mode", "bwd"], ["--impl", "numpy"],
    ["--reco-loss", "l3"], ["--frames", "3"], ["--device", "cpu", "--cuda-graph"],
])
def test_bad_arguments_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    assert "usage: fused-dreamer-loss-bench" in capsys.readouterr().err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = capsys.readouterr().out
    for option in ("--preset", "--dtype", "--mode", "--impl", "--reco-loss", "--device",
                   "--cuda-graph", "--workload", "--json", "--markdown", "--plot"):
        assert option in text


def test_plot_without_matplotlib_refuses_before_the_run(tmp_path, monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the benchmark ran before --plot was refused")

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.setattr(bench, "run_config", must_not_run)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--preset", "tiny", "--device", "cpu", "--impl", "eager", "--mode", "fwd",
                    "--plot", str(tmp_path / "p.png")])
    assert exc.value.code == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_train_step_workload_on_cpu(tmp_path, dtype):
    out = tmp_path / "train.json"
    assert bench.main(["--workload", "train-step", "--preset", "tiny", "--device", "cpu",
                       "--dtype", dtype, "--impl", "fused", "eager", "--json", str(out)]) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    assert rows.keys() == {"fused", "eager"}
    assert rows["fused"]["status"].startswith("skipped")
    assert rows["eager"]["status"] == "ok" and rows["eager"]["median_ms"] > 0
    assert rows["eager"]["mode"] == "train-step" and rows["eager"]["dtype"] == dtype
