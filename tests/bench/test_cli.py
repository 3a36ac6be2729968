"""The benchmark CLI on a CPU, for both losses: it runs, checks the fused kernels through Triton's
interpreter, counts launches, writes the documented JSON, exits 0 only on success and rejects bad
arguments."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from fused_dreamer_loss import V3_CONVENTIONS
from fused_dreamer_loss.bench import cli, peers, presets, timing, workloads
from fused_dreamer_loss.bench.report import failures
from tests.bench.helpers_bench import CPU, ROW_KEYS, V3_TINY_BYTES, numbers

SCRIPT = pathlib.Path(sys.executable).parent / "fused-dreamer-loss-bench"


@pytest.mark.skipif(not CPU, reason="the CPU path: fused through Triton's interpreter")
def test_tiny_preset_on_cpu(tmp_path, capsys):
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    report = cli.run(["--preset", "tiny", "--device", "cpu", "--impl", "fused", "eager",
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
        assert row["model_bytes"] == presets.minimal_bytes(32, 768, 30, 4, row["mode"])
        # A figure that was not measured is None, never 0.
        assert all(v is None or v > 0 for v in numbers(row)), row
        if row["impl"] == "fused":
            assert row["status"].startswith("correct (interpreter)")
            assert row["median_ms"] is None and row["gbps"] is None
            assert row["min_ms"] is None and row["max_ms"] is None and row["noisy"] is None
        else:
            assert row["status"] == "ok" and row["median_ms"] > 0 and row["gbps"] > 0
            # The spread over the CPU repeats, and whether it is too wide to trust the median.
            assert row["min_ms"] <= row["median_ms"] <= row["max_ms"]
            assert row["noisy"] == (row["max_ms"] > timing.NOISY_SPREAD * row["min_ms"])
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
    assert "| fused | tiny | float32 | fwd+bwd | — | — | 6 | — |" in table
    assert "0 GB/s" not in table and "| 0 |" not in table
    out = capsys.readouterr().out
    assert "fused: correct (interpreter) on tiny float32" in out
    assert "need a CUDA GPU" in out
    assert "modelled bytes per step" in out and "fwd+bwd 0.326 MB" in out


def test_main_returns_0_on_success(capsys):
    assert cli.main(["--preset", "tiny", "--device", "cpu", "--impl", "eager",
                     "--mode", "fwd"]) == 0
    assert capsys.readouterr().err == ""


def test_a_wrong_fused_result_exits_1_with_the_reason(monkeypatch, capsys):
    monkeypatch.setattr(peers, "check_fused", lambda inputs, reco_loss: "loss_kl: relative error 1")
    # The default device: cuda when there is one (the compiled kernels), else the interpreter.
    argv = ["--preset", "tiny", "--impl", "fused", "eager", "--mode", "fwd"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "1 of 2 failed" in err and "fused tiny float32 fwd: wrong: loss_kl: relative error 1" in err


def test_a_crashing_implementation_exits_1_and_the_others_still_run(monkeypatch, capsys):
    real = peers.loss_fn

    def loss_fn(impl, reco_loss):
        if impl == "torchrl":
            raise RuntimeError("boom")
        return real(impl, reco_loss)

    monkeypatch.setattr(peers, "loss_fn", loss_fn)
    argv = ["--preset", "tiny", "--device", "cpu", "--impl", "torchrl", "eager", "--mode", "fwd"]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert "torchrl tiny float32 fwd: failed: RuntimeError: boom" in captured.err
    assert "| eager | tiny | float32 | fwd |" in captured.out  # the run went on


def test_a_forward_only_run_prints_no_fwd_bwd_footnote(capsys):
    cli.run(["--preset", "tiny", "--device", "cpu", "--impl", "eager", "--mode", "fwd"])
    out = capsys.readouterr().out
    assert "launches: kernels per step" in out and "fwd+bwd" not in out


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
        cli.main(argv)
    assert exc.value.code == 2
    assert "usage: fused-dreamer-loss-bench" in capsys.readouterr().err


def readme_bench_options() -> list[list[str]]:
    """The options the README's benchmark paragraph shows with values, as written: ``--mode fwd
    fwd+bwd`` (a list: the option takes them all at once), ``--device cuda|cpu`` (one choice)."""
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    paragraph = readme[readme.index("The benchmark CLI ("):]
    paragraph = paragraph[:paragraph.index("\n\n")]
    return [span.split() for span in re.findall(r"`(--[a-z-]+ [^`]+)`", paragraph)]


def test_the_readme_writes_each_option_as_the_parser_takes_it(monkeypatch):
    """An option shown with several values takes them together (a list); one that takes one value
    shows its choices as a|b, each of which it takes alone."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device cuda parses
    shown = readme_bench_options()
    assert {words[0] for words in shown} >= {"--loss", "--preset", "--dtype", "--mode", "--impl",
                                              "--device", "--workload"}
    for option, *values in shown:
        if len(values) == 1 and "|" in values[0]:
            for value in values[0].split("|"):
                cli.parse_args([option, value])
        else:
            cli.parse_args([option, *values])


def test_loss_is_one_choice(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--loss", "v1", "v3"])
    assert exc.value.code == 2
    (loss,) = [a for a in cli.make_parser()._actions if "--loss" in a.option_strings]
    assert loss.help.startswith("one per run: v1: the Dreamer loss")


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
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
    monkeypatch.setattr(workloads, "run_config", must_not_run)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--preset", "tiny", "--device", "cpu", "--impl", "eager", "--mode", "fwd",
                  "--plot", str(tmp_path / "p.png")])
    assert exc.value.code == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


@pytest.mark.skipif(not CPU, reason="the CPU path: fused through Triton's interpreter")
def test_v3_tiny_on_cpu(tmp_path, capsys):
    """--loss v3 on a CPU: v3-tiny and dreamerv3-2024 by default, exit 0, the fused kernels checked
    (losses and gradients), launches counted for every implementation, the documented JSON."""
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    assert cli.main(["--loss", "v3", "--device", "cpu", "--impl", "fused", "eager", "torchrl",
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
    assert "| fused | v3-tiny | float32 | fwd+bwd | — | — | 8 | — |" in out_md.read_text()
    out = capsys.readouterr().out
    assert ("fused: correct (interpreter) on v3-tiny float32: the 5 losses and the 5 gradients "
            "agree") in out
    assert "DreamerV3 loss, dreamerv3-2024 options" in out
    assert "fwd+bwd 0.0323 MB" in out  # 32,296 bytes


@pytest.mark.parametrize("argv,message", [
    (["--preset", "v3"], "not a preset of --loss v1 (tiny, small, default, large, "
                         "v1-wide-latents); the V1 loss's 16x64 preset with 1024 latents is now "
                         "v1-wide-latents"),
    (["--loss", "v3", "--preset", "v3", "small"], "--preset small: not a preset of --loss v3"),
])
def test_a_preset_of_the_other_loss_is_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--device", "cpu"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_torchrl_rows_are_na_where_torchrl_lacks_the_options(capsys):
    """A convention that torchrl cannot compute gets a torchrl row "n/a" with the reason, not a
    number and not a failure; the others run."""
    report = cli.run(["--loss", "v3", "--device", "cpu", "--convention", "sheeprl", "--impl",
                      "torchrl", "eager", "--mode", "fwd"])
    torchrl, eager = report["results"]
    assert torchrl["status"] == ("n/a: torchrl's DreamerV3ModelLoss has no two_hot_space='symlog', "
                                 "pixels_offset=-0.5 (it computes two_hot_space='raw', "
                                 "pixels_offset=0.0)")
    assert torchrl["median_ms"] is None and torchrl["launches"] is None
    assert torchrl["model_bytes"] > 0 and eager["status"] == "ok"
    assert failures(report) == []
    assert "| torchrl | v3-tiny | float32 | fwd | — | — | — | — |" in capsys.readouterr().out
    lacking = {name for name, options in V3_CONVENTIONS.items() if peers.torchrl_v3_gap(options)}
    assert lacking == {"dreamerv3-2023", "sheeprl"}
