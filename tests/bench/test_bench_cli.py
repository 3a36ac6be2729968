"""The benchmark CLI on a CPU, for both losses: it runs, checks the fused kernels through Triton's
interpreter, counts launches, writes the documented JSON, exits 0 only on success and rejects bad
arguments. And the GPU script, bench/run_gpu_all.sh, without a GPU: its commands (--dry-run) and its
logic (with python3 stubbed)."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys
import types

import pytest
import torch

from fused_dreamer_loss import V3_CONVENTIONS
from fused_dreamer_loss.bench import workloads as bench
from fused_dreamer_loss.models_v3 import CategoricalWorldModel

ROW_KEYS = {"impl", "preset", "frames", "image_shape", "latent_dim", "dtype", "mode", "median_ms",
            "gbps", "peak_mem_mb", "frac_copy", "speedup_vs_eager", "compile_s", "status", "extra",
            "launches", "model_bytes", "loss", "convention", "latent_shape"}
SCRIPT = pathlib.Path(sys.executable).parent / "fused-dreamer-loss-bench"
GPU_SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "bench" / "run_gpu_all.sh"
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
        assert row["loss"] == "v1" and row["convention"] is None and row["latent_shape"] is None
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
    from fused_dreamer_loss.core import machinery

    monkeypatch.setattr(machinery, "INTERPRET", False)
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
    ["--loss", "v2"], ["--convention", "dreamerv3-2024"], ["--loss", "v3", "--convention", "x"],
    ["--loss", "v3", "--reco-loss", "smooth_l1"],
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


# ---- --loss v3 -----------------------------------------------------------------------------------

# The minimal-traffic model of DESIGN-V3 §5 for v3-tiny, by hand: 8 rows of a 3x8x8 uint8 frame,
# 4x4 posterior and prior logits, 255 reward logits, a continue logit (dreamerv3-2024 has the
# continue term); float32 outputs. Per row, reads: frame target 192 x 1 B + prediction 192 x 4 B
# + logits 2 x 16 x 4 B + reward logits 255 x 4 B + continue logit 4 B + reward target 4 B
# + terminal flag 1 B = 192 + 768 + 128 + 1020 + 4 + 4 + 1 = 2117 B; fwd+bwd also writes the
# gradients of the outputs: 768 + 128 + 1020 + 4 = 1920 B more, 4037 B.
V3_TINY_BYTES = {"fwd": 8 * 2117, "fwd+bwd": 8 * 4037}


@pytest.mark.skipif(not CPU, reason="the CPU path: fused through Triton's interpreter")
def test_v3_tiny_on_cpu(tmp_path, capsys):
    """--loss v3 on a CPU: v3-tiny and dreamerv3-2024 by default, exit 0, the fused kernels checked
    (losses and gradients), launches counted for every implementation, the documented JSON."""
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    assert bench.main(["--loss", "v3", "--device", "cpu", "--impl", "fused", "eager", "torchrl",
                       "--json", str(out_json), "--markdown", str(out_md)]) == 0
    data = json.loads(out_json.read_text())
    assert {"device", "torch", "triton", "copy_gbps", "results"} <= data.keys()
    assert data["loss"] == "v3" and data["convention"] == "dreamerv3-2024"
    assert data["interpreter"] is True
    rows = {(r["impl"], r["mode"]): r for r in data["results"]}
    assert len(rows) == len(data["results"]) == 3 * 2
    for row in data["results"]:
        assert ROW_KEYS <= row.keys()
        assert (row["preset"], row["frames"], row["image_shape"]) == ("v3-tiny", 8, [3, 8, 8])
        assert (row["latent_dim"], row["latent_shape"]) == (16, [4, 4])
        assert (row["loss"], row["convention"]) == ("v3", "dreamerv3-2024")
        assert row["model_bytes"] == V3_TINY_BYTES[row["mode"]]
        assert all(v is None or v > 0 for v in numbers(row)), row
        assert row["launches"] == sum(row["extra"]["launched"].values())
        if row["impl"] == "fused":
            assert row["status"].startswith("correct (interpreter)") and row["median_ms"] is None
        else:
            assert row["status"] == "ok" and row["median_ms"] > 0 and row["gbps"] > 0
    # Fused: the main kernel and the finalize, and one backward kernel; fwd+bwd also fills one
    # grad output per loss (5: reco, reward, dynamic, representation, continue).
    fwd, both = rows["fused", "fwd"], rows["fused", "fwd+bwd"]
    assert sum(n for k, n in fwd["extra"]["launched"].items() if k.startswith("triton::")) == 2
    assert fwd["launches"] == 2
    assert sum(n for k, n in both["extra"]["launched"].items() if k.startswith("triton::")) == 3
    assert both["extra"]["launched"].get("aten::fill_") == 5 and both["launches"] == 8
    for impl in ("eager", "torchrl"):
        assert rows[impl, "fwd"]["launches"] > 2 and rows[impl, "fwd+bwd"]["launches"] > 8
    assert "| fused | v3-tiny | float32 | fwd+bwd | — | 8 | — |" in out_md.read_text()
    out = capsys.readouterr().out
    assert ("fused: correct (interpreter) on v3-tiny float32: the 5 losses and the 5 gradients "
            "agree") in out
    assert "DreamerV3 loss, dreamerv3-2024 options" in out
    assert "fwd+bwd 0.0323 MB" in out  # 32,296 bytes


def test_v3_modelled_bytes_by_hand():
    assert bench.minimal_bytes_v3(8, 192, 16, 255, True, 4, "fwd") == V3_TINY_BYTES["fwd"]
    assert bench.minimal_bytes_v3(8, 192, 16, 255, True, 4, "fwd+bwd") == V3_TINY_BYTES["fwd+bwd"]
    # No continue term (torchrl's defaults): no continue logit, no terminal flag.
    assert bench.minimal_bytes_v3(8, 192, 16, 255, False, 4, "fwd+bwd") == 8 * (4037 - 8 - 1)
    # bfloat16 outputs: 2 bytes an element, the targets' bytes unchanged.
    assert bench.minimal_bytes_v3(8, 192, 16, 255, True, 2, "fwd+bwd") == 8 * (1920 + 197)
    # DESIGN-V3 §5: B x T = 1024, 3x64x64 uint8 frames, 32x32 fp32 logits: about 132 MB.
    assert round(bench.minimal_bytes_v3(1024, 12288, 1024, 255, True, 4, "fwd+bwd") / 1e6) == 132
    assert bench.V3Case("dreamerv3-2024", "l2").model_bytes("v3-tiny", 4, "fwd+bwd") == 8 * 4037


def test_presets_of_each_loss():
    """The V1 preset with 1024 latents was called v3: now v1-wide-latents, and v3 is the DreamerV3
    loss's; a preset of the other loss is an argparse error that says so."""
    assert bench.PRESETS["v1-wide-latents"] == (16, 64, (3, 64, 64), 1024)
    assert set(bench.PRESETS).isdisjoint(bench.V3_PRESETS)
    assert bench.V3_PRESETS == {"v3-tiny": (2, 4, (3, 8, 8), 4, 4),
                                "v3": (16, 64, (3, 64, 64), 32, 32),
                                "v3-r2": (16, 64, (3, 64, 64), 32, 16),
                                "v3-large": (256, 64, (3, 64, 64), 32, 64)}
    args = bench.parse_args(["--preset", "v1-wide-latents", "--device", "cpu"])
    assert args.loss == "v1" and args.convention is None
    args = bench.parse_args(["--loss", "v3", "--device", "cpu"])
    assert args.preset == ["v3-tiny"] and args.convention == "dreamerv3-2024"


@pytest.mark.parametrize("argv,message", [
    (["--preset", "v3"], "not a preset of --loss v1 (tiny, small, default, large, "
                         "v1-wide-latents); the V1 loss's 16x64 preset with 1024 latents is now "
                         "v1-wide-latents"),
    (["--loss", "v3", "--preset", "v3", "small"], "--preset small: not a preset of --loss v3"),
])
def test_a_preset_of_the_other_loss_is_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main([*argv, "--device", "cpu"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_torchrl_rows_are_na_where_torchrl_lacks_the_options(capsys):
    """A convention that torchrl cannot compute gets a torchrl row "n/a" with the reason, not a
    number and not a failure; the others run."""
    report = bench.run(["--loss", "v3", "--device", "cpu", "--convention", "sheeprl", "--impl",
                        "torchrl", "eager", "--mode", "fwd"])
    torchrl, eager = report["results"]
    assert torchrl["status"] == ("n/a: torchrl's DreamerV3ModelLoss has no two_hot_space='symlog', "
                                 "pixels_offset=-0.5 (it computes two_hot_space='raw', "
                                 "pixels_offset=0.0)")
    assert torchrl["median_ms"] is None and torchrl["launches"] is None
    assert torchrl["model_bytes"] > 0 and eager["status"] == "ok"
    assert bench.failures(report) == []
    assert "| torchrl | v3-tiny | float32 | fwd | — | — | — |" in capsys.readouterr().out
    lacking = {name for name, options in V3_CONVENTIONS.items() if bench.torchrl_v3_gap(options)}
    assert lacking == {"dreamerv3-2023", "sheeprl"}


@pytest.mark.parametrize("convention", ["torchrl", "torchrl-recipe", "dreamerv3-2024", "r2dreamer"])
def test_torchrl_v3_row_computes_what_torchrls_module_computes(convention):
    """The torchrl row's functions, called as DreamerV3ModelLoss's forward calls them, give its
    module's losses and gradients (on a stand-in world model that writes the same tensors)."""
    torchrl_v3 = pytest.importorskip("torchrl.objectives.dreamer_v3")
    from tests.world_model_v3.helpers_v3 import torchrl_losses

    case = bench.V3Case(convention, "l2")
    with_continue = bench.V3Case("dreamerv3-2024", "l2").opts
    inputs = dict(zip(bench.V3_ARGS, bench.make_v3_inputs("v3-tiny", torch.float32, "cpu", 0,
                                                           with_continue)))
    ours = bench.loss_fn_v3("torchrl", case.options, "cpu")(
        *list(inputs.values())[:8 if case.opts.has_continue else 6])
    options = {k: v for k, v in case.options.items() if k not in bench.TORCHRL_V3_FIXED}
    theirs = torchrl_losses(torchrl_v3, inputs, **options)
    assert ours.keys() == theirs.keys()
    wanted = [t for t in inputs.values() if t.requires_grad]
    for name in ours:
        torch.testing.assert_close(ours[name].squeeze(0), theirs[name], rtol=0, atol=0)
        for a, b in zip(torch.autograd.grad(ours[name], wanted, allow_unused=True),
                        torch.autograd.grad(theirs[name], wanted, allow_unused=True)):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_check_fused_v3_catches_a_wrong_loss_or_gradient(monkeypatch):
    case = bench.V3Case("dreamerv3-2024", "l2")
    inputs = bench.make_v3_inputs("v3-tiny", torch.float32, "cpu", 0, case.opts)
    assert case.check(inputs) is None
    real = bench.dreamer_v3_model_loss

    def off(*args, **kwargs):  # one loss 0.1% off: its value and its gradient disagree
        losses = real(*args, **kwargs)
        return {**losses, "loss_model_reward": losses["loss_model_reward"] * 1.001}

    monkeypatch.setattr(bench, "dreamer_v3_model_loss", off)
    assert case.check(inputs).startswith("loss_model_reward: relative error 1.00e-03 > 1e-04")


@pytest.mark.skipif(not CPU, reason="the CPU path: fused through Triton's interpreter")
def test_v3_train_step_on_cpu(tmp_path, capsys):
    """--workload train-step --loss v3 on a CPU (v3-tiny, dreamerv3-2024 by default), float32 and
    under bf16 autocast: exit 0; the fused module's step checked through the interpreter, not
    timed; eager and torchrl's module timed; the rows of the loss workload's schema."""
    out = tmp_path / "train.json"
    assert bench.main(["--workload", "train-step", "--loss", "v3", "--device", "cpu",
                       "--dtype", "float32", "bfloat16", "--impl", "fused", "eager", "torchrl",
                       "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert (data["loss"], data["convention"], data["interpreter"]) == ("v3", "dreamerv3-2024", True)
    rows = {(r["impl"], r["dtype"]): r for r in data["results"]}
    assert len(rows) == len(data["results"]) == 3 * 2
    assert {impl for impl, _ in rows} == {"fused", "eager", "torchrl"}
    widths = bench.V3_WORLD_MODELS["v3-tiny"]
    parameters = sum(p.numel()
                     for p in CategoricalWorldModel((3, 8, 8), 4, 4, **widths).parameters())
    for row in rows.values():
        assert ROW_KEYS <= row.keys()
        assert (row["preset"], row["frames"], row["image_shape"]) == ("v3-tiny", 8, [3, 8, 8])
        assert (row["latent_dim"], row["latent_shape"]) == (16, [4, 4])
        assert (row["loss"], row["convention"], row["mode"]) == ("v3", "dreamerv3-2024",
                                                                 "train-step")
        assert row["extra"]["world_model"] == {**widths, "parameters": parameters}
        assert all(v is None or v > 0 for v in numbers(row)), row
    for dtype in ("float32", "bfloat16"):
        fused = rows["fused", dtype]
        assert fused["status"] == ("correct (interpreter) on the world model's outputs; not timed "
                                   "(needs a CUDA GPU)")
        assert fused["median_ms"] is None and fused["extra"]["interpreter"] is True
        for impl in ("eager", "torchrl"):
            assert rows[impl, dtype]["status"] == "ok" and rows[impl, dtype]["median_ms"] > 0
        assert rows["eager", dtype]["speedup_vs_eager"] == 1.0
        assert rows["torchrl", dtype]["speedup_vs_eager"] > 0
    out = capsys.readouterr().out
    assert "v3-tiny float32: one training step (world model forward, loss, backward, Adam)" in out
    assert ("fused: correct (interpreter) on v3-tiny bfloat16, v3-tiny float32: the 5 losses and "
            "the 5 gradients agree") in out


def test_v3_train_step_rows_not_run(capsys):
    """compiled is not a V3 train-step row; torchrl's module is n/a where it lacks the options.
    Neither is a failure."""
    report = bench.run(["--workload", "train-step", "--loss", "v3", "--device", "cpu",
                        "--convention", "sheeprl", "--impl", "compiled", "torchrl"])
    compiled, torchrl = report["results"]
    assert compiled["status"] == "skipped: the V3 train-step compares fused, eager, torchrl"
    assert torchrl["status"].startswith("n/a: torchrl's DreamerV3ModelLoss has no two_hot_space=")
    assert compiled["median_ms"] is None and torchrl["median_ms"] is None
    assert bench.failures(report) == []


@pytest.mark.skipif(not CPU, reason="the CPU path: fused through Triton's interpreter")
def test_v3_train_step_reports_a_wrong_fused_loss(monkeypatch, capsys):
    """The fused row's status is the check of the step's world-model outputs: a loss 0.1% off
    makes it wrong and the exit status 1."""
    real = bench.dreamer_v3_model_loss

    def off(*args, **kwargs):  # what check_fused_v3 calls: one loss 0.1% off
        losses = real(*args, **kwargs)
        return {**losses, "loss_model_reward": losses["loss_model_reward"] * 1.001}

    monkeypatch.setattr(bench, "dreamer_v3_model_loss", off)
    assert bench.main(["--workload", "train-step", "--loss", "v3", "--device", "cpu",
                       "--impl", "fused"]) == 1
    assert ("fused v3-tiny float32 train-step: wrong: loss_model_reward: relative error 1.00e-03"
            in capsys.readouterr().err)


@pytest.mark.parametrize("convention", ["dreamerv3-2024", "torchrl"])
def test_world_model_loss_inputs_are_what_the_module_read(convention):
    """The fused row is checked on the loss's arguments taken from the world model's output: the
    reference loss of them is the module's loss of that step. (No free nats here: at
    initialisation they clamp the KL terms, which would hide posterior and prior swapped.)"""
    from fused_dreamer_loss import FusedDreamerV3ModelLoss, reference_v3
    from fused_dreamer_loss.models_v3 import make_world_model_v3

    case = bench.V3Case(convention, "l2")
    options = {**case.options, "free_bits": 0.0}
    torch.manual_seed(0)
    module = FusedDreamerV3ModelLoss(
        make_world_model_v3((3, 8, 8), num_categoricals=4, num_classes=4,
                            **bench.V3_WORLD_MODELS["v3-tiny"]), **options, backend="torch")
    losses, outputs = module(bench.make_v3_batch("v3-tiny", "cpu", 0))
    inputs = bench.world_model_loss_inputs(outputs, case.opts)
    assert [t.requires_grad for t in inputs] == list(bench.V3_NEEDS_GRAD[:len(inputs)])
    want = reference_v3.dreamer_v3_model_loss(*inputs, **options)
    assert set(want) == set(losses.keys())
    for name in want:
        torch.testing.assert_close(losses[name], want[name].unsqueeze(0), rtol=0, atol=0)


# ---- bench/run_gpu_all.sh ------------------------------------------------------------------------


def test_gpu_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(GPU_SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_gpu_script_dry_run_prints_commands_the_cli_accepts(tmp_path, monkeypatch):
    """``--dry-run`` prints each command, runs none; every benchmark it would run parses with the
    CLI's own argparse (as on a GPU machine with matplotlib), and together they cover the tables:
    V1 and V3 presets, float32 and bfloat16, all four implementations, as CUDA-graph replays and
    launched from Python, and the train-step workload of each loss; the test suite first, each step
    timed out."""
    folder = tmp_path / "results"
    proc = subprocess.run(["bash", str(GPU_SCRIPT), "--dry-run", str(folder)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not folder.exists(), "a dry run created the output folder"
    commands = [shlex.split(line) for line in proc.stdout.splitlines()]
    assert commands and all(c[:3] == ["timeout", "-k", "10"] and int(c[3]) > 0 for c in commands)
    commands = [c[4:] for c in commands]
    runs = [c[3:] for c in commands if c[:3] == ["python3", "-m", "fused_dreamer_loss.bench"]]
    first_bench = commands.index(["python3", "-m", "fused_dreamer_loss.bench", *runs[0]])
    assert ["python3", "-m", "pytest", "-q", "-rs"] == commands[first_bench - 1][:5]
    assert commands[first_bench - 1][-1] == "tests"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "matplotlib", types.ModuleType("matplotlib"))
    parsed = [bench.parse_args(argv) for argv in runs]  # SystemExit(2) on any error
    for args in parsed:
        for path in (args.json, args.markdown, args.plot):
            assert pathlib.Path(path).parent == folder and "DEVICE" in path
    assert len({args.json for args in parsed}) == len(parsed)
    loss_runs = [(args.loss, args.cuda_graph) for args in parsed if args.workload == "loss"]
    assert loss_runs == [("v3", True), ("v1", True), ("v3", False), ("v1", False)]
    for args in parsed:
        if args.workload == "loss":
            assert set(args.preset) == ({"v3", "v3-r2", "v3-large"} if args.loss == "v3" else
                                        {"small", "default", "large"})
            assert args.dtype == ["float32", "bfloat16"] and args.impl == list(bench.IMPLS)
            assert args.mode == (["fwd+bwd"] if args.cuda_graph else list(bench.MODES))
    train_steps = [args for args in parsed if args.workload == "train-step"]
    assert [(args.loss, args.preset) for args in train_steps] == [("v1", ["small", "default"]),
                                                                  ("v3", ["v3"])]
    assert train_steps[1].convention == bench.DEFAULT_CONVENTION
    for args in train_steps:
        assert args.dtype == ["float32", "bfloat16"]
    assert train_steps[0].impl == ["fused", "eager"]
    assert train_steps[1].impl == list(bench.V3_TRAIN_STEP_IMPLS)


# A stand-in for python3 on the GPU machine: names a device, prints its arguments and a table row,
# writes the Markdown file it is given; sleeps $FAKE_SLEEP s as the test suite; fails as the
# train-step benchmarks.
FAKE_PYTHON = """#!/usr/bin/env bash
[[ $1 == -c ]] && { echo Fake-GPU; exit 0; }
echo "ran: $*"
echo "| table row |"
[[ $* == *pytest* ]] && sleep "${FAKE_SLEEP:-0}"
[[ $* == *train-step* ]] && exit 3
while (($#)); do [[ $1 == --markdown ]] && echo "| table $2 |" >"$2"; shift; done
exit 0
"""


def run_gpu_script(tmp_path, folder, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    (bin_dir / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env}
    return subprocess.run(["bash", str(GPU_SCRIPT), str(folder)], capture_output=True, text=True,
                          env=env, timeout=60)


def test_gpu_script_runs_every_step_and_reports_the_failed_ones(tmp_path):
    """The script's own logic, with python3 stubbed: every step runs, its output (table rows
    included) in its log and on the screen less the table rows; the tables are printed at the end;
    a failed step makes the exit status 1 and is named; a second run starts its logs afresh."""
    folder = tmp_path / "results"
    for _ in range(2):
        proc = run_gpu_script(tmp_path, folder)
    assert proc.returncode == 1
    failed = proc.stderr.splitlines()
    assert len(failed) == 2
    assert failed[0].startswith("failed: python3 -m fused_dreamer_loss.bench --workload "
                                "train-step --preset small")
    assert failed[1].startswith("failed: python3 -m fused_dreamer_loss.bench --workload "
                                "train-step --loss v3")
    assert all(line.endswith(": exit status 3") for line in failed)
    assert "ran: -m pytest" in proc.stdout and "| table row |" not in proc.stdout
    assert proc.stdout.count("| table ") == 4  # the loss benchmarks' Markdown tables
    kernel_times = (folder / "kernel-times-Fake-GPU.txt").read_text()
    assert kernel_times.count("ran: bench/kernel_times.py") == 6
    assert kernel_times.count("| table row |") == 6
    assert {p.name for p in folder.glob("*.md")} == {
        f"{name}-Fake-GPU.md" for name in ("bench-v3-graph", "bench-graph", "bench-v3", "bench")}
    assert (folder / "tests-Fake-GPU.log").read_text().startswith("ran: -m pytest")


def test_gpu_script_stops_starting_steps_when_the_budget_is_spent(tmp_path):
    """With 21 s of budget and a test suite that takes 2, fewer than the 20 s a step needs are
    left: the benchmarks are not started, each is reported, and the exit status is 1."""
    folder = tmp_path / "results"
    proc = run_gpu_script(tmp_path, folder, BUDGET_S="21", FAKE_SLEEP="2")
    assert proc.returncode == 1
    assert sorted(p.name for p in folder.iterdir()) == ["setup-Fake-GPU.log", "tests-Fake-GPU.log"]
    failed = proc.stderr.splitlines()
    assert len(failed) == 6 + 6 + 1  # the benchmark runs, the kernel times, the sweep
    assert all(line.endswith("s of the 21 s budget spent") for line in failed)
