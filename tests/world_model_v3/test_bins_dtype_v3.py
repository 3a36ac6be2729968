"""``reward_bins`` are checked in the dtype the loss uses them in.

``[0, 1, 1e8, 1e8 + 1]`` is strictly ascending in float64, but 1e8 and 1e8 + 1 are one float32:
the two-hot weights would divide by zero (a NaN loss). The reward term is computed in float32
(float64 for float64 rewards), so that is the dtype the bins must be distinct in.
"""

from __future__ import annotations

import pytest
import torch
from tensordict.nn import TensorDictModule
from tests.world_model_v3.helpers_v3 import make_v3_inputs

from fused_dreamer_loss import FusedDreamerV3ModelLoss, dreamer_v3_model_loss

COLLIDING = [0.0, 1.0, 1e8, 1e8 + 1]


def inputs(dtype):
    values = make_v3_inputs(reward_width=len(COLLIDING), dtype=dtype)
    values["true_reward"] = (values["true_reward"].detach() + 1e8).to(dtype)
    return values


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["sequence", "float64 tensor"])
def test_bins_that_collide_in_float32_are_refused(backend, as_tensor):
    bins = torch.tensor(COLLIDING, dtype=torch.float64) if as_tensor else COLLIDING
    with pytest.raises(ValueError, match=r"reward_bins must be finite and strictly ascending in "
                                         r"torch\.float32, the dtype of the reward loss, got "
                                         r"\[0\.0, 1\.0, 100000000\.0, 100000000\.0\]"):
        dreamer_v3_model_loss(**inputs(torch.float32), reward_bins=bins, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_same_bins_serve_a_float64_reward(backend):
    losses = dreamer_v3_model_loss(**inputs(torch.float64), reward_bins=COLLIDING,
                                   backend=backend)
    assert all(torch.isfinite(loss) for loss in losses.values())


def test_the_module_checks_its_buffer_at_construction():
    world = TensorDictModule(torch.nn.Identity(), in_keys=["x"], out_keys=["y"])
    with pytest.raises(ValueError, match=r"reward_bins .* in torch\.float32"):
        FusedDreamerV3ModelLoss(world, reward_bins=COLLIDING)  # a float32 buffer
    # a float64 buffer holds them; float32 rewards are refused at the call (the functional's check)
    loss = FusedDreamerV3ModelLoss(world, reward_bins=torch.tensor(COLLIDING, dtype=torch.float64))
    assert loss.reward_bins.dtype == torch.float64
