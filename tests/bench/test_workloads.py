"""The train-step workloads on a CPU, V1 and V3: they run, check the fused kernels where they say
so, and report rows of the loss workload's schema."""

from __future__ import annotations

import json

import pytest
import torch

from fused_dreamer_loss.bench import cli, peers, presets, workloads
from fused_dreamer_loss.bench.losses import V3Case
from fused_dreamer_loss.bench.report import failures
from fused_dreamer_loss.models_v3 import CategoricalWorldModel
from tests.bench.helpers_bench import CPU, ROW_KEYS, numbers


@pytest.mark.skipif(not CPU, reason="the CPU path: fused through Triton's interpreter")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_train_step_workload_on_cpu(tmp_path, capsys, dtype):
    """--workload train-step (V1) on a CPU: the fused loss of the world model's outputs in the
    first step checked through the interpreter (as the V3 train step does), not timed; eager
    timed."""
    out = tmp_path / "train.json"
    assert cli.main(["--workload", "train-step", "--preset", "tiny", "--device", "cpu",
                     "--dtype", dtype, "--impl", "fused", "eager", "--json", str(out)]) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    assert rows.keys() == {"fused", "eager"}
    assert rows["fused"]["status"] == ("correct (interpreter) on the world model's outputs; not "
                                       "timed (needs a CUDA GPU)")
    assert rows["fused"]["median_ms"] is None and rows["fused"]["extra"]["interpreter"] is True
    assert rows["eager"]["status"] == "ok" and rows["eager"]["median_ms"] > 0
    assert rows["eager"]["mode"] == "train-step" and rows["eager"]["dtype"] == dtype
    assert (f"fused: correct (interpreter) on tiny {dtype}: the three losses and the six "
            "gradients agree") in capsys.readouterr().out


@pytest.mark.skipif(not CPU, reason="the CPU path: fused through Triton's interpreter")
def test_train_step_reports_a_wrong_fused_loss(monkeypatch, capsys):
    """The V1 fused train-step row is the check of the step's world-model outputs: a loss 0.1%
    off makes it wrong and the exit status 1."""
    real = peers.dreamer_model_loss

    def off(*args, **kwargs):  # what check_fused calls: the KL 0.1% off
        kl, reco, reward = real(*args, **kwargs)
        return kl * 1.001, reco, reward

    monkeypatch.setattr(peers, "dreamer_model_loss", off)
    assert cli.main(["--workload", "train-step", "--preset", "tiny", "--device", "cpu",
                     "--impl", "fused"]) == 1
    assert ("fused tiny float32 train-step: wrong: loss_kl: relative error 1.00e-03"
            in capsys.readouterr().err)


@pytest.mark.parametrize("argv", [["--preset", "tiny"], ["--loss", "v3"]])
def test_train_step_prints_no_fwd_bwd_footnote(argv, capsys):
    """A train step has no fwd+bwd rows and counts no launches: no footnote about either."""
    cli.run(["--workload", "train-step", "--device", "cpu", "--impl", "eager", *argv])
    out = capsys.readouterr().out
    assert "| eager |" in out
    assert "fwd+bwd" not in out and "launches:" not in out


@pytest.mark.skipif(not CPU, reason="the CPU path: fused through Triton's interpreter")
def test_v3_train_step_on_cpu(tmp_path, capsys):
    """--workload train-step --loss v3 on a CPU (v3-tiny, dreamerv3-2024 by default), float32 and
    under bf16 autocast: exit 0; the fused module's step checked through the interpreter, not
    timed; eager and torchrl's module timed; the rows of the loss workload's schema."""
    out = tmp_path / "train.json"
    assert cli.main(["--workload", "train-step", "--loss", "v3", "--device", "cpu",
                     "--dtype", "float32", "bfloat16", "--impl", "fused", "eager", "torchrl",
                     "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert (data["loss"], data["convention"], data["interpreter"]) == ("v3", "dreamerv3-2024", True)
    rows = {(r["impl"], r["dtype"]): r for r in data["results"]}
    assert len(rows) == len(data["results"]) == 3 * 2
    assert {impl for impl, _ in rows} == {"fused", "eager", "torchrl"}
    widths = presets.V3_WORLD_MODELS["v3-tiny"]
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
    report = cli.run(["--workload", "train-step", "--loss", "v3", "--device", "cpu",
                      "--convention", "sheeprl", "--impl", "compiled", "torchrl"])
    compiled, torchrl = report["results"]
    assert compiled["status"] == "skipped: the V3 train-step compares fused, eager, torchrl"
    assert torchrl["status"].startswith("n/a: torchrl's DreamerV3ModelLoss has no two_hot_space=")
    assert compiled["median_ms"] is None and torchrl["median_ms"] is None
    assert failures(report) == []


@pytest.mark.skipif(not CPU, reason="the CPU path: fused through Triton's interpreter")
def test_v3_train_step_reports_a_wrong_fused_loss(monkeypatch, capsys):
    """The fused row's status is the check of the step's world-model outputs: a loss 0.1% off
    makes it wrong and the exit status 1."""
    real = peers.dreamer_v3_model_loss

    def off(*args, **kwargs):  # what check_fused_v3 calls: one loss 0.1% off
        losses = real(*args, **kwargs)
        return {**losses, "loss_model_reward": losses["loss_model_reward"] * 1.001}

    monkeypatch.setattr(peers, "dreamer_v3_model_loss", off)
    assert cli.main(["--workload", "train-step", "--loss", "v3", "--device", "cpu",
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

    case = V3Case(convention, "l2")
    options = {**case.options, "free_bits": 0.0}
    torch.manual_seed(0)
    module = FusedDreamerV3ModelLoss(
        make_world_model_v3((3, 8, 8), num_categoricals=4, num_classes=4,
                            **presets.V3_WORLD_MODELS["v3-tiny"]), **options, backend="torch")
    losses, outputs = module(presets.make_v3_batch("v3-tiny", "cpu", 0))
    inputs = workloads.world_model_loss_inputs(outputs, case.opts)
    assert [t.requires_grad for t in inputs] == list(presets.V3_NEEDS_GRAD[:len(inputs)])
    want = reference_v3.dreamer_v3_model_loss(*inputs, **options)
    assert set(want) == set(losses.keys())
    for name in want:
        torch.testing.assert_close(losses[name], want[name].unsqueeze(0), rtol=0, atol=0)
