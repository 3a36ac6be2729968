"""Infinite and NaN inputs give torch's inf and NaN where that costs the kernels nothing: an
infinite continue logit (torch's ``(1 − c)·l − log sigmoid(l)``), a +inf reward logit (torch's
``logsumexp``, which shifts by 0 where a row's max is infinite), a NaN under the L1 distance
(torch's ``sign(NaN) = 0``). The differences that remain are listed in the README."""

from __future__ import annotations

import pytest
import torch
from tests.world_model_v3.helpers_v3 import leaves, make_v3_inputs

from fused_dreamer_loss import dreamer_v3_model_loss

INF = float("inf")
BINS = 9


def both(change, **options):
    """Losses and gradients of the sum, on both backends, after ``change(inputs)``."""
    out = {}
    for backend in ("triton", "torch"):
        inputs = make_v3_inputs((2, 3), 3, 4, ((3, 2, 2),), reward_width=BINS, seed=0)
        inputs["true_reward"] = inputs["true_reward"].detach()
        with torch.no_grad():
            change(inputs)
        losses = dreamer_v3_model_loss(**inputs, num_reward_bins=BINS, lambda_continue=1.0,
                                       backend=backend, **options)
        grads = torch.autograd.grad(sum(losses.values()), leaves(inputs), allow_unused=True)
        out[backend] = losses, grads
    return out["triton"], out["torch"]


def assert_same_specials(got: torch.Tensor, want: torch.Tensor, what: str):
    """Same NaN and ±inf positions; the finite values close."""
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN at other places"
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)), f"{what}: +inf elsewhere"
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"{what}: -inf elsewhere"
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-5)


def compare(got, want):
    for name, loss in want[0].items():
        assert_same_specials(got[0][name].detach(), loss.detach(), name)
    for i, (g, w) in enumerate(zip(got[1], want[1])):
        assert (g is None) == (w is None)
        if w is not None:
            assert_same_specials(g, w, f"gradient {i}")


@pytest.mark.parametrize("scale", [1.0, 0.997])
@pytest.mark.parametrize("row", [0, 1])  # terminated, not terminated (make_v3_inputs)
@pytest.mark.parametrize("logit", [INF, -INF])
def test_infinite_continue_logit(logit, row, scale):
    def change(inputs):
        inputs["continue_pred"].view(-1)[row] = logit

    compare(*both(change, continue_target_scale=scale))


@pytest.mark.parametrize("index", [0, 4, 8])
@pytest.mark.parametrize("logit", [INF, -INF])
def test_infinite_reward_logit(logit, index):
    def change(inputs):
        inputs["reward_pred"][0, 1, index] = logit

    compare(*both(change))


def test_reward_row_all_minus_infinity():
    def change(inputs):
        inputs["reward_pred"][1, 0].fill_(-INF)

    compare(*both(change))


def test_nan_frame_under_l1():
    """|e|'s gradient at a NaN is torch's sign(NaN) = 0."""
    def change(inputs):
        inputs["reco_pixels"].view(-1)[0] = float("nan")

    compare(*both(change, reco_loss="l1", reco_symlog="target"))
