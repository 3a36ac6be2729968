"""A NaN under the L1 distance: the fused gradients are torch's (``sign(NaN) = 0``), NaN where
torch's are NaN (smooth L1, L2)."""

from __future__ import annotations

import pytest
import torch
from tests.world_model_v1.helpers_v1 import make_inputs

from fused_dreamer_loss import dreamer_model_loss


@pytest.mark.parametrize("distance", ["l1", "smooth_l1", "l2"])
@pytest.mark.parametrize("where", [5, 7])  # a decoded pixel, a predicted reward
def test_nan_prediction_gradients_as_torch(device, distance, where):
    grads = {}
    for backend in ("triton", "torch"):
        inputs = make_inputs(device=device, seed=0)
        with torch.no_grad():
            inputs[where].view(-1)[0] = float("nan")
        losses = dreamer_model_loss(*inputs, backend=backend, reco_loss=distance,
                                    reward_loss=distance)
        grads[backend] = torch.autograd.grad(sum(losses), inputs[where])[0]
    got, want = grads["triton"], grads["torch"]
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    finite = ~torch.isnan(want)
    torch.testing.assert_close(got[finite], want[finite])
