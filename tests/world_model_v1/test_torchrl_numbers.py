"""The loss terms against torchrl's own code: DreamerModelLoss.kl_loss and distance_loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from tests.world_model_v1.helpers_v1 import free_nats_for, make_inputs

from fused_dreamer_loss import dreamer_model_loss

torchrl_objectives = pytest.importorskip("torchrl.objectives")
torchrl_utils = pytest.importorskip("torchrl.objectives.utils")


def torchrl_terms(inputs, reco_loss, reward_loss, free_nats, delayed_clamp, global_average):
    """The three terms as torchrl's DreamerModelLoss.forward computes them from its tensors."""
    pm, ps, qm, qs, pixels, reco, true_reward, pred_reward = inputs
    # kl_loss reads only the options; the world model is a stand-in with torchrl's indexing.
    stand_in = nn.ModuleList([nn.Sequential(nn.Identity()), nn.Identity()])
    loss = torchrl_objectives.DreamerModelLoss(stand_in, free_nats=free_nats,
                                               delayed_clamp=delayed_clamp,
                                               global_average=global_average)
    kl = loss.kl_loss(pm, ps, qm, qs)
    reco_term = torchrl_utils.distance_loss(pixels, reco, reco_loss)
    if not global_average:
        reco_term = reco_term.sum((-3, -2, -1))
    reward_term = torchrl_utils.distance_loss(true_reward, pred_reward, reward_loss)
    if not global_average:
        reward_term = reward_term.squeeze(-1)
    return kl, reco_term.mean(), reward_term.mean()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("global_average", [False, True])
@pytest.mark.parametrize("delayed_clamp", [False, True])
@pytest.mark.parametrize("reco_loss, reward_loss", [("l2", "l2"), ("l1", "smooth_l1"),
                                                    ("smooth_l1", "l1")])
def test_matches_torchrl(device, backend, reco_loss, reward_loss, delayed_clamp, global_average):
    inputs = make_inputs((3, 4), 6, (3, 5, 5), torch.float32, device, seed=31)
    free_nats = free_nats_for(inputs, global_average and not delayed_clamp, "some")
    options = dict(reco_loss=reco_loss, reward_loss=reward_loss, free_nats=free_nats,
                   delayed_clamp=delayed_clamp, global_average=global_average)
    ours = dreamer_model_loss(*inputs, backend=backend, **options)
    theirs = torchrl_terms(inputs, **options)
    for name, a, b in zip(("kl", "reco", "reward"), ours, theirs):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
    grads_ours = torch.autograd.grad(ours, inputs)
    grads_theirs = torch.autograd.grad(theirs, inputs)
    for a, b in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
