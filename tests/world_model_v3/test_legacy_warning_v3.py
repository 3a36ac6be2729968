"""The legacy reward-logits fallback warns with torchrl's category and text, word for word, so
that ``pytest.warns(..., match=...)`` and warning filters written for torchrl's module catch ours.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

from fused_dreamer_loss import FusedDreamerV3ModelLoss

torchrl_objectives = pytest.importorskip("torchrl.objectives")

S, K, BINS = 4, 4, 16


class LegacyHeads(torch.nn.Module):
    """Writes the reward logits under the decoded-reward key, torchrl's deprecated layout."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(3 * 4 * 4, 2 * S * K + BINS)

    def forward(self, pixels):
        post, prior, reward_logits = self.net(pixels.flatten(-3)).split([S * K, S * K, BINS], -1)
        return (post.unflatten(-1, (S, K)), prior.unflatten(-1, (S, K)), pixels * 0.5,
                reward_logits)


def caught(loss_module, td):
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        loss_module(td)
    return [(r.category, str(r.message)) for r in records
            if issubclass(r.category, DeprecationWarning)]


@pytest.mark.parametrize("reward_key", ["reward", ("env", "reward")])
def test_the_fallback_warns_as_torchrl_word_for_word(reward_key):
    model = TensorDictModule(LegacyHeads(), in_keys=[("next", "pixels")], out_keys=[
        ("next", k) for k in ("posterior_logits", "prior_logits", "reco_pixels", reward_key)])
    td = TensorDict({"next": {"pixels": torch.rand(2, 3, 3, 4, 4),
                              reward_key: torch.randn(2, 3, 1)}}, batch_size=[2, 3])
    losses = []
    for cls in (torchrl_objectives.DreamerV3ModelLoss, FusedDreamerV3ModelLoss):
        loss = cls(model, num_reward_bins=BINS)
        loss.set_keys(reward=reward_key)
        losses.append(loss)
    theirs, ours = (caught(loss, td) for loss in losses)
    assert len(theirs) == 1 and ours == theirs
    with pytest.warns(DeprecationWarning, match="is deprecated and will be removed in v0.16"):
        losses[1](td)
