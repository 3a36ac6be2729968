"""torch.autograd.gradcheck of the fused autograd.Function in float64."""

from __future__ import annotations

import pytest
import torch
from tests.world_model_v1.helpers_v1 import free_nats_for, make_inputs

from fused_dreamer_loss.world_model_v1.validation import LossOptions, validate_inputs
from fused_dreamer_loss.core import machinery
from fused_dreamer_loss.world_model_v1 import kernels as dreamer_loss


def check(device, reco_loss, reward_loss, delayed_clamp, global_average, fast_mode):
    inputs = make_inputs((2, 3), 4, (2, 3, 3), torch.float64, device, seed=21)
    per_element = global_average and not delayed_clamp
    opts = LossOptions(lambda_kl=0.7, lambda_reco=1.3, lambda_reward=0.9, reco_loss=reco_loss,
                       reward_loss=reward_loss, delayed_clamp=delayed_clamp,
                       global_average=global_average,
                       free_nats=free_nats_for(inputs, per_element, "some"))
    shapes = validate_inputs(*inputs)

    def fn(*tensors):
        return machinery.apply(dreamer_loss.KERNELS, opts, shapes, tensors)

    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=fast_mode)


@pytest.mark.parametrize("global_average", [False, True])
@pytest.mark.parametrize("delayed_clamp", [False, True])
@pytest.mark.parametrize("reco_loss, reward_loss", [("l2", "l1"), ("l1", "smooth_l1"),
                                                    ("smooth_l1", "l2")])
def test_gradcheck_fast_mode(device, reco_loss, reward_loss, delayed_clamp, global_average):
    """Every option combination, through random projections of the Jacobian."""
    check(device, reco_loss, reward_loss, delayed_clamp, global_average, fast_mode=True)


def test_gradcheck_full_jacobian(device):
    """The whole Jacobian, entry by entry, for torchrl's default options."""
    check(device, "l2", "l2", delayed_clamp=False, global_average=False, fast_mode=False)
