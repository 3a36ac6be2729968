"""FusedDreamerV3ModelLoss reduces as torchrl's DreamerV3ModelLoss for every tensordict batch size.

torchrl sums each reconstruction row over everything after the **tensordict's** batch dims (a
tensordict of ``batch_size=[B]`` holding ``[B, T, C, H, W]`` frames has B rows of T·C·H·W values;
``batch_size=[]`` one row), and averages every other term over all its elements. The same data is
given here with 0, 1, 2 and 3 batch dims (a ``[B, T]`` clip and a ``[A, B, T]`` one), to a
stand-in world model that works on any leading dims, and every loss and parameter gradient is
compared with torchrl's module.
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

from fused_dreamer_loss import FusedDreamerV3ModelLoss
from tests.helpers import assert_module_matches

torchrl_objectives = pytest.importorskip("torchrl.objectives")

S, K, BINS, VECTOR = 4, 4, 16, 5
IMAGE = (3, 4, 4)
#: (data shape, tensordict batch dims): a [B, T] clip and an [A, B, T] one, each under every
#: prefix of its dims as the tensordict's batch size.
SHAPES = [((4, 3), dims) for dims in (2, 1, 0)] + [((2, 2, 3), dims) for dims in (3, 2, 1, 0)]
OPTIONS = {
    "defaults": {},
    "separate-continue-uint8/255": dict(kl_mode="separate", unimix=0.01, lambda_continue=0.7,
                                        continue_target_scale=1 - 1 / 333, reco_symlog=False,
                                        lambda_reco=1.3),
    "l1-two-heads": dict(reco_loss="l1", reco_symlog=[True, False], heads=2, free_bits=0.0),
    "global-average": dict(global_average=True, reward_two_hot=False),
}


class StandIn(torch.nn.Module):
    """Logits, reconstructions, reward and continue heads from the frames, for any leading dims."""

    def __init__(self):
        super().__init__()
        width = IMAGE[0] * IMAGE[1] * IMAGE[2]
        self.encoder = torch.nn.Linear(width, 2 * S * K)
        self.decoder = torch.nn.Linear(S * K, width + VECTOR)
        self.heads = torch.nn.Linear(S * K, BINS + 2)

    def forward(self, pixels):
        post, prior = self.encoder(pixels.flatten(-3).float() / 255).chunk(2, -1)
        reco, vector = self.decoder(post.softmax(-1)).split([IMAGE[0] * IMAGE[1] * IMAGE[2],
                                                             VECTOR], -1)
        reward_logits, reward, cont = self.heads(post).split([BINS, 1, 1], -1)
        return (post.unflatten(-1, (S, K)), prior.unflatten(-1, (S, K)),
                reco.unflatten(-1, IMAGE) * 255, vector, reward_logits, reward, cont)


def world_model():
    torch.manual_seed(0)
    return TensorDictModule(StandIn(), in_keys=[("next", "pixels")], out_keys=[
        ("next", k) for k in ("posterior_logits", "prior_logits", "reco_pixels", "reco_vector",
                              "reward_logits", "reward", "continue_pred")])


def data(shape, batch_dims):
    g = torch.Generator().manual_seed(1)
    return TensorDict({"next": {
        "pixels": torch.randint(0, 256, (*shape, *IMAGE), generator=g, dtype=torch.uint8),
        "vector": torch.randn(*shape, VECTOR, generator=g),
        "reward": torch.randn(*shape, 1, generator=g) * 3,
        "terminated": torch.rand(*shape, 1, generator=g) < 0.3,
    }}, batch_size=shape[:batch_dims])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("shape, batch_dims", SHAPES, ids=lambda v: str(v))
def test_every_batch_size_reduces_as_torchrl(shape, batch_dims, options, backend):
    options = dict(options, num_reward_bins=BINS)
    heads = options.pop("heads", 1)
    model = world_model()
    theirs = torchrl_objectives.DreamerV3ModelLoss(model, **options)
    ours = FusedDreamerV3ModelLoss(model, backend=backend, **options)
    if heads == 2:
        for loss in (theirs, ours):
            loss.set_keys(pixels=["pixels", "vector"], reco_pixels=["reco_pixels", "reco_vector"])
    td = data(shape, batch_dims)
    assert_module_matches(ours, theirs, td, loss_atol=1e-5)
