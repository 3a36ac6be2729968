"""``dreamer_v3_behavior_loss`` prepares a call once per input signature and reuses it (its
validated options and shapes, the fused terms' prepared call): a change of any part of the
signature between calls gets a call of its own (the reference's numbers), and bad input raises
the same error at every call, before and after good ones."""

from __future__ import annotations

import pytest
import torch
from tests.behavior_v3.test_fused_behavior import (_behavior, _behavior_inputs, _cast,
                                                   _check_behavior, _compare, _run_behavior)
from tests.helpers import LaunchSpy

from fused_dreamer_loss.behavior_v3 import BEHAVIOR_CONVENTIONS, dreamer_v3_behavior_loss

#: The base call's convention, and a value of each option other than its value there.
BASE = "dreamerv3-2024"
CHANGED = {"gamma": 0.9, "lmbda": 0.8, "discount_loss": False, "discount_weights": "exclusive",
           "return_normalization": False, "quantiles": (0.1, 0.9), "rate": 0.5,
           "min_scale": 10.0, "update": False, "entropy_bonus": 1e-2, "use_reinforce": False,
           "normalize_advantage": False, "weight_entropy": False,
           "slow_critic_regularization": 0.5, "two_hot_space": "symlog",
           "replay_value_weight": 0.0, "horizon": 100.0, "replay_lmbda": 0.5}


def _check(x, rep, what, dtype=torch.float32, **options):
    _check_behavior(_run_behavior(x, rep, dtype, **options), dtype, what)


@pytest.mark.parametrize("option", sorted(CHANGED))
def test_each_option_changed_between_calls(option):
    x, rep = _behavior_inputs("two_hot", (2, 6), 4, seed=1)  # replay T = 6: λ counts
    base = dict(BEHAVIOR_CONVENTIONS[BASE])
    _check(x, rep, "base", **base)
    _check(x, rep, f"{option} changed", **{**base, option: CHANGED[option]})
    _check(x, rep, "base again", **base)


def test_shape_dtype_requires_grad_and_grad_mode_changed_between_calls():
    base = dict(BEHAVIOR_CONVENTIONS[BASE])
    x, rep = _behavior_inputs("two_hot", (2, 3), 4, seed=2)
    _check(x, rep, "base", **base)
    _check(*_behavior_inputs("two_hot", (2, 3), 5, seed=2), "another horizon", **base)
    _check(x, rep, "float64", torch.float64, **base)
    frozen = {**x, "value_logits": x["value_logits"].detach()}
    runs = _run_behavior(frozen, rep, torch.float32, **base)
    _compare(runs["triton"][2], runs["torch"][2], torch.float32, "value logits without grad")
    assert not runs["triton"][2]["loss_value"].requires_grad
    low, high = torch.tensor([-2.0]), torch.tensor([3.0])
    with torch.no_grad():
        losses = _behavior(x, rep, "triton", low, high, **dict(base))
    low64, high64 = torch.tensor([-2.0]), torch.tensor([3.0])
    want = _behavior(_cast(x, torch.float64), _cast(rep, torch.float64), "torch", low64,
                     high64, **dict(base))
    assert not losses["loss_value"].requires_grad
    torch.testing.assert_close(losses["loss_value"].double(), want["loss_value"].detach(),
                               rtol=1e-5, atol=1e-6)
    _check(x, rep, "grad mode back on", **base)


def test_tile_sizes_changed_between_calls(monkeypatch):
    """The tests shrink the tiles: a returns launch or terms plan made before must not be
    reused with the old ones."""
    from fused_dreamer_loss.behavior_v3 import kernels
    x, rep = _behavior_inputs("two_hot", (2, 3), 4, seed=5)  # 9 bins: a 16-wide bins block
    options = dict(BEHAVIOR_CONVENTIONS[BASE])
    _check(x, rep, "default tiles", **options)
    spy, returns_spy = LaunchSpy(kernels._terms_fwd_kernel), LaunchSpy(kernels._returns_kernel)
    monkeypatch.setattr(kernels, "_terms_fwd_kernel", spy)
    monkeypatch.setattr(kernels, "_returns_kernel", returns_spy)
    for name, value in (("ACTOR_BLOCK", 2), ("CRITIC_TILE", 32), ("SCAN_BLOCK", 2),
                        ("SELECT_BLOCK", 4)):
        monkeypatch.setattr(kernels, name, value)
    _check(x, rep, "small tiles", **options)
    assert [(kw["ACTOR_BLOCK"], kw["ROWS"]) for _, kw in spy.calls] == [(2, 32 // 16)]
    assert [(kw["SCAN_BLOCK"], kw["SELECT_BLOCK"]) for _, kw in returns_spy.calls] == [(2, 4)]


def test_value_bins_changed_in_place_between_calls():
    """Bins given as a tensor are keyed by identity and version: modified in place, the next
    call is checked and prepared again."""
    x, rep = _behavior_inputs("two_hot", (2, 3), 4, seed=3)
    bins = torch.linspace(-6.0, 6.0, x["value_logits"].shape[-1])
    options = dict(BEHAVIOR_CONVENTIONS[BASE], value_bins=bins)
    _check(x, rep, "bins", **options)
    with torch.no_grad():
        bins.mul_(2.0)
    _check(x, rep, "bins doubled in place", **options)
    with torch.no_grad():
        bins[0] = bins[1]  # no longer strictly ascending: the check runs again
    with pytest.raises(ValueError, match="value_bins"):
        _check(x, rep, "bins not ascending", **options)


def test_bad_input_raises_at_every_call():
    x, rep = _behavior_inputs("two_hot", (2, 3), 4, seed=4)
    options = dict(BEHAVIOR_CONVENTIONS[BASE])

    def call(low):
        return dreamer_v3_behavior_loss(
            x["reward"], x["next_value"], x["value_logits"], low, torch.zeros(1),
            x["continuation"], x["root_continuation"], baseline=x["baseline"],
            log_prob=x["log_prob"],
            entropy=x["entropy"], slow_value=x["slow_logits"], replay_value_pred=rep["value_pred"],
            replay_reward=rep["reward"], replay_done=rep["done"],
            replay_terminated=rep["terminated"], replay_slow_value=rep["slow_value"],
            **options, backend="triton")

    for _ in range(2):
        with pytest.raises(ValueError, match="low must be a one-element buffer"):
            call(torch.zeros(2))
        call(torch.zeros(1))
