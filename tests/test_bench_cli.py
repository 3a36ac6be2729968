"""The benchmark CLI on a CPU: it runs, writes the documented JSON, and rejects bad arguments."""

from __future__ import annotations

import json

import pytest

from fused_dreamer_loss import bench

ROW_KEYS = {"impl", "preset", "frames", "image_shape", "latent_dim", "dtype", "mode", "median_ms",
            "gbps", "peak_mem_mb"}


def test_tiny_preset_on_cpu(tmp_path, capsys):
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    report = bench.main(["--preset", "tiny", "--device", "cpu", "--impl", "fused", "eager",
                         "torchrl", "--json", str(out_json), "--markdown", str(out_md)])
    data = json.loads(out_json.read_text())
    assert data == json.loads(json.dumps(report))
    assert {"device", "torch", "triton", "copy_gbps", "results"} <= data.keys()
    assert len(data["results"]) == 3 * 2  # impls x modes
    for row in data["results"]:
        assert ROW_KEYS <= row.keys()
        assert row["preset"] == "tiny" and row["frames"] == 32 and row["image_shape"] == [3, 16, 16]
        if row["impl"] == "fused":
            assert row["status"].startswith("skipped") and row["median_ms"] is None
        else:
            assert row["status"] == "ok" and row["median_ms"] > 0 and row["gbps"] > 0
    eager = [r for r in data["results"] if r["impl"] == "eager"]
    assert all(r["speedup_vs_eager"] == 1.0 for r in eager)
    table = out_md.read_text()
    assert "| eager | tiny | float32 | fwd+bwd |" in table
    assert "tiny" in capsys.readouterr().out


def test_minimal_bytes_counts_each_tensor_once():
    # 2 frames, 10-element images, 3 latents, fp32: reads 4*3 + 2*10 + 2 per frame,
    # fwd+bwd writes 4*3 + 10 + 1 more.
    assert bench.minimal_bytes(2, 10, 3, 4, "fwd") == 2 * (12 + 20 + 2) * 4
    assert bench.minimal_bytes(2, 10, 3, 4, "fwd+bwd") == 2 * (12 + 20 + 2 + 12 + 10 + 1) * 4


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
    for option in ("--preset", "--dtype", "--mode", "--impl", "--reco-loss", "--json",
                   "--markdown", "--plot"):
        assert option in text


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit, match="--plot needs matplotlib"):
        bench.main(["--preset", "tiny", "--device", "cpu", "--impl", "eager", "--mode", "fwd",
                    "--plot", str(tmp_path / "p.png")])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_train_step_workload_on_cpu(tmp_path, dtype):
    out = tmp_path / "train.json"
    bench.main(["--workload", "train-step", "--preset", "tiny", "--device", "cpu", "--dtype",
                dtype, "--impl", "fused", "eager", "--json", str(out)])
    rows = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    assert rows.keys() == {"fused", "eager"}
    assert rows["fused"]["status"].startswith("skipped")
    assert rows["eager"]["status"] == "ok" and rows["eager"]["median_ms"] > 0
    assert rows["eager"]["mode"] == "train-step" and rows["eager"]["dtype"] == dtype
