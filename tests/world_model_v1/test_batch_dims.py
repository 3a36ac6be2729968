"""FusedDreamerModelLoss reduces as torchrl's DreamerModelLoss for every tensordict batch size.

torchrl's DreamerModelLoss sums the reconstruction over the frame's last three dims and the KL over
the latent dim, whatever the tensordict's batch size, and averages over the rest: the same data
under ``batch_size`` of 0 to 3 dims gives the same losses. Checked on a stand-in world model that
works on any leading dims, laid out as torchrl indexes it (``world_model[0][-1]`` the decoder,
``world_model[1]`` the reward model).
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule, TensorDictSequential

from fused_dreamer_loss import FusedDreamerModelLoss
from tests.helpers import assert_module_matches

torchrl_objectives = pytest.importorskip("torchrl.objectives")

LATENT = 5
IMAGE = (3, 4, 4)
SHAPES = [((4, 3), dims) for dims in (2, 1, 0)] + [((2, 2, 3), dims) for dims in (3, 2, 1, 0)]
OPTIONS = {
    "defaults": {},
    "l1-smooth_l1-delayed": dict(reco_loss="l1", reward_loss="smooth_l1", delayed_clamp=True,
                                 free_nats=0.5),
    "global-average": dict(global_average=True, free_nats=0.1),
}


class Latents(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(IMAGE[0] * IMAGE[1] * IMAGE[2], 4 * LATENT)

    def forward(self, pixels):
        pm, ps, qm, qs = self.encoder(pixels.flatten(-3)).chunk(4, -1)
        return pm, ps.exp(), qm, qs.exp(), qm


def world_model():
    torch.manual_seed(0)
    latents = TensorDictModule(Latents(), in_keys=[("next", "pixels")], out_keys=[
        ("next", k) for k in ("prior_mean", "prior_std", "posterior_mean", "posterior_std",
                              "state")])
    decoder = TensorDictModule(
        torch.nn.Sequential(torch.nn.Linear(LATENT, IMAGE[0] * IMAGE[1] * IMAGE[2]),
                            torch.nn.Unflatten(-1, IMAGE)),
        in_keys=[("next", "state")], out_keys=[("next", "reco_pixels")])
    reward = TensorDictModule(torch.nn.Linear(LATENT, 1), in_keys=[("next", "state")],
                              out_keys=[("next", "reward")])
    return TensorDictSequential(TensorDictSequential(latents, decoder), reward)


def data(shape, batch_dims):
    g = torch.Generator().manual_seed(1)
    return TensorDict({"next": {"pixels": torch.rand(*shape, *IMAGE, generator=g),
                                "reward": torch.randn(*shape, 1, generator=g)}},
                      batch_size=shape[:batch_dims])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("shape, batch_dims", SHAPES, ids=lambda v: str(v))
def test_every_batch_size_reduces_as_torchrl(shape, batch_dims, options, backend):
    model = world_model()
    theirs = torchrl_objectives.DreamerModelLoss(model, **options)
    ours = FusedDreamerModelLoss(model, backend=backend, **options)
    td = data(shape, batch_dims)
    assert_module_matches(ours, theirs, td, loss_atol=1e-6)
