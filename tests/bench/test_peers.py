"""The peer implementations: the torchrl V3 row computes what torchrl's module computes; the
check of the fused result catches a wrong loss or gradient."""

from __future__ import annotations

import pytest
import torch

from fused_dreamer_loss.bench import peers, presets
from fused_dreamer_loss.bench.losses import V3Case


@pytest.mark.parametrize("convention", ["torchrl", "torchrl-recipe", "dreamerv3-2024", "r2dreamer"])
def test_torchrl_v3_row_computes_what_torchrls_module_computes(convention):
    """The torchrl row's functions, called as DreamerV3ModelLoss's forward calls them, give its
    module's losses and gradients (on a stand-in world model that writes the same tensors)."""
    torchrl_v3 = pytest.importorskip("torchrl.objectives.dreamer_v3")
    from tests.world_model_v3.helpers_v3 import torchrl_losses

    case = V3Case(convention, "l2")
    with_continue = V3Case("dreamerv3-2024", "l2").opts
    inputs = dict(zip(presets.V3_ARGS, presets.make_v3_inputs("v3-tiny", torch.float32, "cpu", 0,
                                                               with_continue)))
    ours = peers.loss_fn_v3("torchrl", case.options, "cpu")(
        *list(inputs.values())[:8 if case.opts.has_continue else 6])
    options = {k: v for k, v in case.options.items() if k not in peers.TORCHRL_V3_FIXED}
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
    case = V3Case("dreamerv3-2024", "l2")
    inputs = presets.make_v3_inputs("v3-tiny", torch.float32, "cpu", 0, case.opts)
    assert case.check(inputs) is None
    real = peers.dreamer_v3_model_loss

    def off(*args, **kwargs):  # one loss 0.1% off: its value and its gradient disagree
        losses = real(*args, **kwargs)
        return {**losses, "loss_model_reward": losses["loss_model_reward"] * 1.001}

    monkeypatch.setattr(peers, "dreamer_v3_model_loss", off)
    assert case.check(inputs).startswith("loss_model_reward: relative error 1.00e-03 > 1e-04")
