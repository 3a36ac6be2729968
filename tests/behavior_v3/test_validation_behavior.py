"""Bad inputs to the behaviour losses: a clear exception naming the argument, on every backend."""

from __future__ import annotations

import pytest
import torch
from tests.behavior_v3.helpers_behavior import replay, rollout

from fused_dreamer_loss.behavior_v3 import (
    dreamer_v3_actor_loss,
    dreamer_v3_value_loss,
    lambda_returns,
    replay_value_loss,
    return_scale,
)


@pytest.fixture
def x():
    return rollout((3,), 4, R=5)


def _returns(x, **kwargs):
    return lambda_returns(x["reward"], x["next_value"], x["continuation"],
                          x["root_continuation"], backend="torch", **kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"gamma": 1.5}, ValueError, r"gamma must be in \[0, 1\]"),
    ({"gamma": True}, TypeError, "gamma must be a real number"),
    ({"lmbda": float("nan")}, ValueError, "lmbda must be finite"),
    ({"discount_loss": 1}, TypeError, "discount_loss must be a bool"),
    ({"discount_weights": "first"}, ValueError, "discount_weights must be one of"),
    ({"backend": "cuda"}, ValueError, "backend must be one of"),
])
def test_lambda_returns_options(x, kwargs, error, match):
    with pytest.raises(error, match=match):
        lambda_returns(x["reward"], x["next_value"], **{"backend": "torch", **kwargs})


def test_lambda_returns_tensors(x):
    with pytest.raises(TypeError, match="reward must be a torch.Tensor"):
        lambda_returns([1.0], x["next_value"], backend="torch")
    with pytest.raises(TypeError, match="next_value has dtype torch.int64"):
        lambda_returns(x["reward"], torch.zeros(3, 4, 1, dtype=torch.long), backend="torch")
    with pytest.raises(ValueError, match=r"reward must have shape \[\*B, H, 1\]"):
        lambda_returns(x["reward"].squeeze(-1), x["next_value"], backend="torch")
    with pytest.raises(ValueError, match=r"next_value must have shape \[\*B, H, 1\] = \(3, 4, 1\)"):
        lambda_returns(x["reward"], x["next_value"][:, :3], backend="torch")
    with pytest.raises(ValueError, match="continuation must have shape"):
        lambda_returns(x["reward"], x["next_value"], x["continuation"][:2], backend="torch")
    with pytest.raises(ValueError, match="reward is empty"):
        lambda_returns(torch.zeros(0, 4, 1), torch.zeros(0, 4, 1), backend="torch")
    with pytest.raises(ValueError, match="one device"):
        lambda_returns(x["reward"], x["next_value"].to("meta"), backend="torch")


@pytest.mark.parametrize("kwargs, error, match", [
    ({"quantiles": (0.9, 0.1)}, ValueError, "quantiles must satisfy"),
    ({"quantiles": 0.5}, TypeError, "quantiles must be a pair"),
    ({"rate": 2.0}, ValueError, r"rate must be in \[0, 1\]"),
    ({"min_scale": 0.0}, ValueError, "min_scale must be positive"),
    ({"update": "yes"}, TypeError, "update must be a bool"),
])
def test_return_scale_options(x, kwargs, error, match):
    low, high = torch.zeros(1), torch.zeros(1)
    with pytest.raises(error, match=match):
        return_scale(x["reward"], low, high, backend="torch", **kwargs)
    assert low.item() == 0.0 and high.item() == 0.0


def test_return_scale_buffers(x):
    with pytest.raises(ValueError, match="low must hold one value"):
        return_scale(x["reward"], torch.zeros(2), torch.zeros(1), backend="torch")
    with pytest.raises(ValueError, match="high requires grad"):
        return_scale(x["reward"], torch.zeros(1), torch.zeros(1, requires_grad=True),
                     backend="torch")
    with pytest.raises(TypeError, match="low and high must have one dtype"):
        return_scale(x["reward"], torch.zeros(1), torch.zeros(1, dtype=torch.float64),
                     backend="torch")
    with pytest.raises(ValueError, match="returns is empty"):
        return_scale(torch.zeros(0), torch.zeros(1), torch.zeros(1), backend="torch")


def test_actor_inputs(x):
    returns, w = _returns(x)
    scale = torch.tensor(1.0)
    with pytest.raises(ValueError, match="scale must hold one value"):
        dreamer_v3_actor_loss(returns, w, torch.ones(2), backend="torch")
    with pytest.raises(ValueError, match=r"weights must have shape"):
        dreamer_v3_actor_loss(returns, w[:, :2], scale, backend="torch")
    with pytest.raises(ValueError, match=r"entropy must have shape \[\*B, H, 1\] = \(3, 4, 1\) "
                                         r"or \(3, 4\)"):
        dreamer_v3_actor_loss(returns, w, scale, entropy=torch.zeros(3, 4, 2), backend="torch")
    with pytest.raises(TypeError, match="entropy_bonus must be a real number"):
        dreamer_v3_actor_loss(returns, w, scale, entropy_bonus="0.1", backend="torch")
    with pytest.raises(TypeError, match="use_reinforce must be a bool"):
        dreamer_v3_actor_loss(returns, w, scale, use_reinforce=None, backend="torch")


def test_value_inputs(x):
    returns, w = _returns(x)
    logits = x["value_logits"]
    with pytest.raises(ValueError, match="value_loss must be one of"):
        dreamer_v3_value_loss(logits, returns, w, value_loss="mse", backend="torch")
    with pytest.raises(ValueError, match="reduction must be one of"):
        dreamer_v3_value_loss(logits, returns, w, value_loss="two_hot", reduction="max",
                              backend="torch")
    with pytest.raises(ValueError, match="slow_critic_regularization must be non-negative"):
        dreamer_v3_value_loss(logits, returns, w, slow_critic_regularization=-1.0,
                              backend="torch")
    with pytest.raises(ValueError, match="needs slow_value"):
        dreamer_v3_value_loss(logits, returns, w, value_loss="two_hot",
                              slow_critic_regularization=1.0, backend="torch")
    with pytest.raises(ValueError, match=r"value_pred must have shape \[\*B, H, 1\]"):
        dreamer_v3_value_loss(logits, returns, w, backend="torch")
    with pytest.raises(ValueError, match="value_pred has 5 logits per step but value_bins holds 3"):
        dreamer_v3_value_loss(logits, returns, w, value_loss="two_hot", value_bins=[0, 1, 2],
                              backend="torch")
    with pytest.raises(ValueError, match="value_bins must be finite and strictly ascending"):
        dreamer_v3_value_loss(logits, returns, w, value_loss="two_hot",
                              value_bins=[0, 1, 1, 2, 3], backend="torch")
    with pytest.raises(ValueError, match="value_bins is used only with value_loss='two_hot'"):
        dreamer_v3_value_loss(returns, returns, w, value_bins=[0, 1], backend="torch")
    with pytest.raises(ValueError, match="slow_value must have shape"):
        dreamer_v3_value_loss(logits, returns, w, value_loss="two_hot", slow_value=returns[:1],
                              slow_critic_regularization=1.0, backend="torch")


def test_replay_inputs():
    r = replay(2, 5, R=5)
    args = [r["value_pred"], r["reward"], r["done"], r["terminated"], r["bootstrap"]]
    with pytest.raises(ValueError, match="horizon must be at least 1"):
        replay_value_loss(*args, horizon=0.5, backend="torch")
    with pytest.raises(ValueError, match="with T >= 2"):
        replay_value_loss(r["value_pred"][:, :1], r["reward"][:, :1], r["done"][:, :1],
                          r["terminated"][:, :1], r["bootstrap"][:, :1], backend="torch")
    bad = list(args)
    bad[4] = r["bootstrap"][:, :3]
    with pytest.raises(ValueError, match="bootstrap must have shape"):
        replay_value_loss(*bad, backend="torch")
    bad = list(args)
    bad[2] = torch.zeros(2, 5, 1, dtype=torch.complex64)
    with pytest.raises(TypeError, match="done has dtype torch.complex64"):
        replay_value_loss(*bad, backend="torch")


def test_inputs_are_not_modified(x):
    before = {k: v.detach().clone() for k, v in x.items()}
    returns, w = _returns(x, gamma=0.9)
    dreamer_v3_actor_loss(returns, w, torch.tensor(2.0), baseline=x["baseline"],
                          log_prob=x["log_prob"], entropy=x["entropy"], use_reinforce=True,
                          backend="torch")
    dreamer_v3_value_loss(x["value_logits"], returns, w, value_loss="two_hot",
                          slow_value=x["slow_logits"], slow_critic_regularization=1.0,
                          backend="torch")
    for k, v in x.items():
        assert torch.equal(v, before[k]), k
