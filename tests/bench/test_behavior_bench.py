"""``--loss v3-behavior`` (fused_dreamer_loss.bench.behavior): launches and host syncs per step,
fused against torchrl's math, measured on this machine; the command line's checks."""

from __future__ import annotations

import pytest

from fused_dreamer_loss.bench import behavior
from fused_dreamer_loss.bench.cli import parse_args


def test_fused_is_four_launches_and_no_sync_where_torchrl_syncs():
    pytest.importorskip("torchrl")
    rows = {r.impl: r for r in behavior.rows(["behavior-tiny"], ["float32"],
                                             ["fused", "torchrl"], ["fwd+bwd"], "cpu")}
    fused, torchrl = rows["fused"], rows["torchrl"]
    assert fused.status.startswith("correct"), fused.status
    kernels = {k: v for k, v in fused.extra["launched"].items() if k.startswith("triton::")}
    assert kernels == {"triton::_returns_kernel": 1, "triton::_terms_fwd_kernel": 1,
                       "triton::finalize_kernel": 1, "triton::_terms_bwd_kernel": 1}
    assert fused.launches == 4 + 3  # and torch.autograd.grad's three grad-output fills
    assert fused.extra["host_syncs"] == 0
    assert torchrl.status == "ok" and torchrl.launches > 30 * fused.launches
    assert torchrl.extra["host_syncs"] > 0  # the replay target's nonzero / .item()


def test_the_phases_row_computes_the_objectives_losses():
    """``--workload host``'s ``fused phases`` row times the objective's math: its chain of phase
    functions gives the objective's losses and gradients (the reference, at the tiny preset)."""
    import torch

    options = dict(behavior.BEHAVIOR_CONVENTIONS[behavior.DEFAULT_BEHAVIOR_CONVENTION])
    results = []
    for step in (behavior._call, behavior._phases):
        inputs = behavior.make_inputs("behavior-tiny", torch.float64, "cpu", 0, options)
        losses = step(inputs, options, "torch")
        leaves = [t for t in inputs if t.requires_grad]
        grads = torch.autograd.grad(sum(losses.values()), leaves)
        results.append(({k: v.detach() for k, v in losses.items()}, grads))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grads, want_grads)


@pytest.mark.parametrize("argv, error", [
    (["--loss", "v3", "--convention", "dreamerv3-torch"], "behaviour-loss convention"),
    (["--loss", "v3-behavior", "--convention", "v3"], "invalid choice"),
    (["--loss", "v3-behavior", "--reco-loss", "l1"], "--reco-loss"),
    (["--loss", "v3-behavior", "--preset", "v3"], "not a preset of --loss v3-behavior"),
])
def test_command_line_refuses(argv, error, capsys):
    with pytest.raises(SystemExit):
        parse_args([*argv, "--device", "cpu"])
    assert error in capsys.readouterr().err


def test_command_line_defaults():
    args = parse_args(["--loss", "v3-behavior", "--device", "cpu"])
    assert args.convention == behavior.DEFAULT_CONVENTION and args.preset == ["behavior-tiny"]


def test_not_applicable_to_torchrl():
    assert behavior.BehaviorCase("sheeprl").not_applicable("torchrl")
    assert behavior.BehaviorCase("torchrl-recipe").not_applicable("torchrl") is None
