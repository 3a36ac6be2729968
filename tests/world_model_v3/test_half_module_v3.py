"""FusedDreamerV3ModelLoss cast to float16 or bfloat16 (``loss_module.to(torch.float16)``).

torchrl's default support reaches ±4.9e8: in a float16 buffer its ends overflow to ±inf, in a
bfloat16 one every bin is rounded to 3 significant digits. The losses are computed in float32
whatever the world model's dtype, so the ``reward_bins`` buffer keeps its dtype through a module
cast to a 16-bit float (it still follows the device): the loss keeps working, with the exact bins,
and gives torchrl's finite numbers up to the half-precision rounding of its own computation.
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

from fused_dreamer_loss import FusedDreamerV3ModelLoss
from fused_dreamer_loss.reference_v3 import default_reward_bins

torchrl_objectives = pytest.importorskip("torchrl.objectives")

B, T, S, K, BINS = 2, 3, 4, 4, 255
IMAGE = (3, 4, 4)
HALF = [torch.float16, torch.bfloat16]


class StandIn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        width = IMAGE[0] * IMAGE[1] * IMAGE[2]
        self.encoder = torch.nn.Linear(width, 2 * S * K)
        self.decoder = torch.nn.Linear(S * K, width)
        self.heads = torch.nn.Linear(S * K, BINS + 1)

    def forward(self, pixels):
        x = pixels.flatten(-3).to(self.encoder.weight.dtype) / 255
        post, prior = self.encoder(x).chunk(2, -1)
        reco = self.decoder(post.softmax(-1)).unflatten(-1, IMAGE)
        reward_logits, cont = self.heads(post).split([BINS, 1], -1)
        return post.unflatten(-1, (S, K)), prior.unflatten(-1, (S, K)), reco, reward_logits, cont


def world_model():
    torch.manual_seed(0)
    return TensorDictModule(StandIn(), in_keys=[("next", "pixels")], out_keys=[
        ("next", k) for k in ("posterior_logits", "prior_logits", "reco_pixels", "reward_logits",
                              "continue_pred")])


def data():
    g = torch.Generator().manual_seed(1)
    return TensorDict({"next": {
        "pixels": torch.randint(0, 256, (B, T, *IMAGE), generator=g, dtype=torch.uint8),
        "reward": torch.randn(B, T, 1, generator=g) * 3,
        "terminated": torch.rand(B, T, 1, generator=g) < 0.3,
    }}, batch_size=[B, T])


OPTIONS = dict(kl_mode="separate", unimix=0.01, lambda_continue=1.0, reco_symlog=False)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_module_keeps_its_bins_and_gives_torchrls_numbers(dtype, backend):
    ours = FusedDreamerV3ModelLoss(world_model(), backend=backend, **OPTIONS).to(dtype)
    theirs = torchrl_objectives.DreamerV3ModelLoss(world_model(), **OPTIONS).to(dtype)
    assert ours.world_model.module.encoder.weight.dtype == dtype
    assert ours.reward_bins.dtype == torch.float32
    assert torch.equal(ours.reward_bins, default_reward_bins(BINS))
    o_losses, t_losses = ours(data())[0], theirs(data())[0]
    assert list(o_losses.keys()) == list(t_losses.keys())
    for name, want in t_losses.items():
        got = o_losses[name]
        assert torch.isfinite(want).all() and torch.isfinite(got).all(), name
        assert got.dtype == want.dtype, name
        # torchrl computes in half precision (and with rounded bins): its rounding, not ours
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2,
                                   msg=lambda m: f"{name}: {m}")
    sum(o_losses.values()).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.world_model.parameters())


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_a_round_trip_through_half_keeps_the_exact_bins(dtype):
    loss = FusedDreamerV3ModelLoss(world_model(), reward_bins=[-1e6, 0.0, 1.0 + 2**-20, 7e5 + 1])
    before = loss.reward_bins.clone()
    loss.to(dtype).float()
    assert loss.reward_bins.dtype == torch.float32 and torch.equal(loss.reward_bins, before)
    loss.double()  # a dtype that holds them: the buffer follows
    assert loss.reward_bins.dtype == torch.float64 and torch.equal(loss.reward_bins.float(), before)
