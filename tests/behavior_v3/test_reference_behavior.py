"""The behaviour losses' reference (``backend="torch"``) against torchrl's own code on random
tensors: ``DreamerV3ActorLoss.lambda_target`` and ``_return_scale``, ``PercentileValueNorm``,
``DreamerV3ValueLoss.forward`` and ``replay_value_loss`` with a stub critic; the actor and the
discount weights against independent float64 computations of torchrl's formulas."""

from __future__ import annotations

import doctest
import itertools
from types import SimpleNamespace

import pytest
import torch
from tests.behavior_v3.helpers_behavior import replay, rollout
from tests.helpers import assert_close
from torch import nn

import fused_dreamer_loss.behavior_v3.conventions
import fused_dreamer_loss.behavior_v3.functional
from fused_dreamer_loss.behavior_v3 import (
    dreamer_v3_actor_loss,
    dreamer_v3_value_loss,
    lambda_returns,
    replay_value_loss,
    return_scale,
)

# The slow critic is set by hand, without torchrl's target-network updater.
pytestmark = pytest.mark.filterwarnings("ignore:No target network updater")

SHAPES = [((4,), 5), ((3,), 1), ((2, 3), 4), ((7,), 15)]


@pytest.fixture(scope="module")
def trl():
    """torchrl's DreamerV3 objectives module (skips where torchrl is missing)."""
    return pytest.importorskip("torchrl.objectives.dreamer_v3")


def _actor_stub(trl, gamma, lmbda):
    """What ``DreamerV3ActorLoss.lambda_target`` reads of its instance: a TD(λ) estimator."""
    from torchrl.objectives.value import TDLambdaEstimator
    estimator = TDLambdaEstimator(gamma=gamma, lmbda=lmbda, value_network=None)
    return SimpleNamespace(value_estimator=estimator, tensor_keys=trl.DreamerV3ActorLoss._AcceptedKeys())


# ---- λ-returns -----------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma, lmbda", [(0.99, 0.95), (1.0, 0.95), (0.997, 1.0), (0.9, 0.0)])
@pytest.mark.parametrize("batch, H", SHAPES, ids=str)
def test_lambda_returns_match_torchrl(trl, batch, H, gamma, lmbda):
    x = rollout(batch, H, R=2, seed=H)
    theirs = trl.DreamerV3ActorLoss.lambda_target(_actor_stub(trl, gamma, lmbda), x["reward"],
                                                  x["next_value"], x["continuation"])
    ours, _ = lambda_returns(x["reward"], x["next_value"], x["continuation"],
                             gamma=gamma, lmbda=lmbda, backend="torch")
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-5)
    leaves = [x["reward"], x["next_value"], x["continuation"]]
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, leaves, g), torch.autograd.grad(theirs, leaves, g)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


def test_torchrl_without_continuation_takes_one_step(trl):
    """Without a continuation model torchrl's lambda_target goes through its TD(λ) estimator on a
    0-dim tensordict, which takes the trailing singleton dim as the time dim: one-step targets
    ``r + γ v``, which this function gives with lmbda=0 (continuation None is 1 everywhere)."""
    x = rollout((3,), 5, R=2)
    theirs = trl.DreamerV3ActorLoss.lambda_target(_actor_stub(trl, 0.9, 0.95), x["reward"],
                                                  x["next_value"], None)
    one_step, _ = lambda_returns(x["reward"], x["next_value"], gamma=0.9, lmbda=0.0,
                                 backend="torch")
    torch.testing.assert_close(one_step, theirs)
    ours, _ = lambda_returns(x["reward"], x["next_value"], gamma=0.9, backend="torch")
    assert not torch.allclose(ours, theirs)


def _weights64(root, gamma, mode):
    """The discount weights by explicit products over float64 Python floats."""
    rows = root.double().reshape(-1, root.shape[-2]).tolist()
    out = []
    for row in rows:
        w, acc = [], 1.0
        for t, c in enumerate(row):
            if mode == "exclusive":
                w.append(acc)
                acc *= gamma * c
            else:
                acc *= c if (t == 0 and mode == "inclusive") else gamma * c
                w.append(acc)
        out.append(w)
    return torch.tensor(out, dtype=torch.float64).reshape(root.shape)


@pytest.mark.parametrize("mode", ["inclusive", "inclusive_gamma", "exclusive"])
@pytest.mark.parametrize("batch, H", SHAPES, ids=str)
def test_discount_weights(batch, H, mode):
    x = rollout(batch, H, R=2, seed=3)
    _, w = lambda_returns(x["reward"], x["next_value"], x["continuation"],
                          x["root_continuation"], gamma=0.99, discount_weights=mode,
                          backend="torch")
    assert not w.requires_grad
    assert_close(w, _weights64(x["root_continuation"], 0.99, mode), torch.float32, "weights")
    _, ones = lambda_returns(x["reward"], x["next_value"], discount_loss=False, backend="torch")
    assert torch.equal(ones, torch.ones_like(ones))


def test_weights_without_roots_are_powers_of_gamma():
    x = rollout((2,), 4, R=2)
    _, w = lambda_returns(x["reward"], x["next_value"], gamma=0.5, backend="torch")
    assert torch.equal(w[0, :, 0], torch.tensor([1.0, 0.5, 0.25, 0.125]))


def test_terminal_state_zeroes_later_weights_and_cuts_the_return():
    x = rollout((1,), 6, R=2)
    c = x["continuation"].detach()
    returns, w = lambda_returns(x["reward"], x["next_value"], c, x["root_continuation"],
                                backend="torch")
    t = 6 // 2  # the terminal step (continuation 0)
    assert torch.all(w[0, t + 1:] == 0) and torch.all(w[0, :t + 1] > 0)
    assert returns[0, t, 0] == x["reward"][0, t, 0]


# ---- return normalisation ------------------------------------------------------------------------


def _returns_cases():
    g = torch.Generator().manual_seed(0)
    yield "normal", torch.randn(64, 15, 1, generator=g) * 30
    yield "all-equal", torch.full((10, 3, 1), 2.5)
    yield "magnitudes", (torch.randn(16, 15, 1, generator=g)
                         * 10.0 ** torch.randint(-20, 20, (16, 15, 1), generator=g))
    yield "odd", torch.randn(7, 3, 1, generator=g)
    yield "one", torch.randn(1, 1, 1, generator=g)


@pytest.mark.parametrize("rate, quantiles", [(0.01, (0.05, 0.95)), (0.5, (0.0, 1.0)),
                                             (1.0, (0.1, 0.7))])
def test_return_scale_matches_percentile_value_norm(trl, rate, quantiles):
    from torchrl.modules.value_norm import PercentileValueNorm
    norm = PercentileValueNorm(quantiles=quantiles, rate=rate)
    low, high = torch.zeros(1), torch.zeros(1)
    ptrs = low.data_ptr(), high.data_ptr()
    for name, returns in _returns_cases():
        norm.update(returns)
        scale = return_scale(returns, low, high, quantiles=quantiles, rate=rate, backend="torch")
        assert torch.equal(low, norm.low) and torch.equal(high, norm.high), name
        assert scale.shape == () and torch.equal(scale, norm.scale().squeeze(-1)), name
    assert (low.data_ptr(), high.data_ptr()) == ptrs


@pytest.mark.parametrize("training", [True, False])
def test_return_scale_updates_only_in_training(trl, training):
    """torchrl's ``_return_scale`` updates only in training mode; ``update=training`` does too."""
    from torchrl.modules.value_norm import PercentileValueNorm
    returns = torch.randn(8, 5, 1, requires_grad=True) * 10
    stub = SimpleNamespace(return_normalization=True, training=training,
                           retnorm=PercentileValueNorm())
    stub.retnorm.low.fill_(-3.0)
    stub.retnorm.high.fill_(4.0)
    theirs = trl.DreamerV3ActorLoss._return_scale(stub, returns)
    low, high = torch.tensor([-3.0]), torch.tensor([4.0])
    ours = return_scale(returns, low, high, update=training, backend="torch")
    assert torch.equal(ours, theirs) and not ours.requires_grad
    assert torch.equal(low, stub.retnorm.low) and torch.equal(high, stub.retnorm.high)
    assert training or (low.item(), high.item()) == (-3.0, 4.0)


def test_return_scale_of_bfloat16_returns_in_float32_buffers(trl):
    from torchrl.modules.value_norm import PercentileValueNorm
    norm = PercentileValueNorm(rate=0.3)
    returns = (torch.randn(32, 15, 1) * 5).to(torch.bfloat16)
    norm.update(returns)
    low, high = torch.zeros(1), torch.zeros(1)
    scale = return_scale(returns, low, high, rate=0.3, min_scale=0.01, backend="torch")
    assert torch.equal(low, norm.low) and torch.equal(high, norm.high)
    assert scale.dtype == torch.float32 and torch.equal(scale, (high - low)[0])


# ---- actor ---------------------------------------------------------------------------------------


def _actor64(x, returns, w, scale, *, reinforce, bonus, entropy=True, normalize=True,
             weight_entropy=True, baseline=None):
    """torchrl's actor objective, written out in float64 from the rollout tensors."""
    d = {k: v.double() for k, v in x.items()}
    R, w = returns.double(), w.double()
    b = d["baseline"] if reinforce else (baseline.double() if baseline is not None else 0.0)
    if reinforce:
        adv = (R - b).detach() / (scale if normalize else 1.0)
        loss = -(w * d["log_prob"] * adv).mean()
    else:
        loss = -(w * (R - b) / scale).mean()
    ent = torch.zeros((), dtype=torch.float64)
    if entropy and bonus > 0:
        ent = ((w if weight_entropy else 1.0) * d["entropy"]).mean()
        loss = loss - bonus * ent
    return loss, ent


@pytest.mark.parametrize("reinforce", [False, True])
@pytest.mark.parametrize("bonus", [3e-4, 0.0, 0.5])
@pytest.mark.parametrize("normalize, weight_entropy", [(True, True), (False, False)])
@pytest.mark.parametrize("batch, H", SHAPES[:3], ids=str)
def test_actor_loss(batch, H, reinforce, bonus, normalize, weight_entropy):
    x = rollout(batch, H, R=2, seed=H + len(batch))
    returns, w = lambda_returns(x["reward"], x["next_value"], x["continuation"],
                                x["root_continuation"], gamma=0.99, backend="torch")
    scale = torch.tensor(2.5)
    squeeze = len(batch) == 2  # [*B, H] log-probs and entropies, as distributions give them
    log_prob, entropy = ((t.squeeze(-1) if squeeze else t) for t in (x["log_prob"], x["entropy"]))
    ours = dreamer_v3_actor_loss(returns, w, scale, baseline=x["baseline"], log_prob=log_prob,
                                 entropy=entropy, entropy_bonus=bonus, use_reinforce=reinforce,
                                 normalize_advantage=normalize, weight_entropy=weight_entropy,
                                 backend="torch")
    loss, ent = _actor64(x, returns, w, 2.5, reinforce=reinforce, bonus=bonus,
                         normalize=normalize, weight_entropy=weight_entropy,
                         baseline=x["baseline"])
    assert_close(ours["loss_actor"].detach(), loss.detach(), torch.float32, "loss_actor")
    assert_close(ours["actor_entropy"], ent.detach(), torch.float32, "actor_entropy")
    assert not ours["actor_entropy"].requires_grad
    leaves = [x["reward"], x["next_value"], x["continuation"], x["baseline"], x["log_prob"],
              x["entropy"]]
    got = torch.autograd.grad(ours["loss_actor"], leaves, allow_unused=True, retain_graph=True)
    want = torch.autograd.grad(loss, leaves, allow_unused=True)
    names = ["reward", "next_value", "continuation", "baseline", "log_prob", "entropy"]
    for name, a, b in zip(names, got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close(a, b.detach(), torch.float32, f"d loss_actor / d {name}")
    if reinforce:
        assert got[0] is None and got[3] is None  # the advantage is a stopped gradient


def test_actor_needs_log_prob_and_baseline_with_reinforce():
    x = rollout((2,), 3, R=2)
    for missing in ("log_prob", "baseline"):
        kwargs = {"log_prob": x["log_prob"], "baseline": x["baseline"]}
        kwargs[missing] = None
        with pytest.raises(ValueError, match=missing):
            dreamer_v3_actor_loss(x["reward"], x["reward"], torch.tensor(1.0),
                                  use_reinforce=True, backend="torch", **kwargs)


# ---- critic --------------------------------------------------------------------------------------


class _Critic(nn.Module):
    """A stub value network: its features times a gain are the logits (or, as one feature, the
    value); the decoded value is torchrl's two_hot_decode of the logits."""

    def __init__(self, decode, bins):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))
        self.register_buffer("bins", bins)
        self.decode = decode

    def forward(self, features):
        logits = features * self.gain
        if logits.shape[-1] == 1:
            return logits, logits
        return logits, self.decode(logits, self.bins).unsqueeze(-1)


SLOW_GAIN = 0.5


def _torchrl_value_loss(trl, value_loss, reg, reduction, R=255):
    from tensordict.nn import TensorDictModule
    bins = trl._default_bins(max(R, 2))
    critic = TensorDictModule(_Critic(trl.two_hot_decode, bins), in_keys=["features"],
                              out_keys=["state_value_logits", "state_value"])
    loss = trl.DreamerV3ValueLoss(critic, value_loss=value_loss, num_value_bins=bins.numel(),
                                  slow_critic_regularization=reg, reduction=reduction)
    if reg:
        loss.target_value_model_params["module", "gain"].data.fill_(SLOW_GAIN)
    return loss


def _close_grads(ours, theirs):
    """float32 gradients of two computations of one loss (softmax from a log-sum-exp or from a
    log-softmax): within a few float32 units of the largest."""
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-5 * float(theirs.abs().max()))


CRITIC_CASES = list(itertools.product(["two_hot", "symlog_mse"], [0.0, 1.0, 0.3],
                                      ["mean", "sum", "none"]))


# A two-hot critic's slow target may be given as logits or as the decoded value.
SLOW_CASES = [(*case, slow_as) for case in CRITIC_CASES
              for slow_as in (("logits", "value") if case[0] == "two_hot" else ("value",))]


@pytest.mark.parametrize("value_loss, reg, reduction, slow_as", SLOW_CASES)
def test_value_loss_matches_torchrl(trl, value_loss, reg, reduction, slow_as):
    from tensordict import TensorDict
    R = 255 if value_loss == "two_hot" else 1
    x = rollout((6,), 5, R=R, seed=R)
    returns, w = lambda_returns(x["reward"], x["next_value"], x["continuation"],
                                x["root_continuation"], gamma=0.99, backend="torch")
    features = x["value_logits"]
    loss = _torchrl_value_loss(trl, value_loss, reg, reduction, R)
    data = TensorDict({"features": features, "lambda_target": returns.detach(),
                       "discount_weight": w}, [6, 5])
    theirs, _ = loss(data)
    slow_logits = SLOW_GAIN * features.detach()
    slow = slow_logits
    if slow_as == "value" and R > 1:
        slow = trl.two_hot_decode(slow_logits, loss.value_bins).unsqueeze(-1)
    ours = dreamer_v3_value_loss(features, returns, w, value_loss=value_loss,
                                 slow_value=slow if reg else None,
                                 slow_critic_regularization=reg, reduction=reduction,
                                 backend="torch")
    for name in ("loss_value", "value_slow_loss"):
        torch.testing.assert_close(ours[name], theirs[name], rtol=2e-5, atol=2e-5)
    assert not ours["value_slow_loss"].requires_grad
    g = torch.randn_like(theirs["loss_value"])
    _close_grads(torch.autograd.grad(ours["loss_value"], features, g)[0],
                 torch.autograd.grad(theirs["loss_value"], features, g)[0])


@pytest.mark.parametrize("value_loss, reg, reduction", CRITIC_CASES[::2])
def test_replay_value_loss_matches_torchrl(trl, value_loss, reg, reduction):
    from tensordict import TensorDict
    R = 255 if value_loss == "two_hot" else 1
    x = replay(3, 7, R=R, seed=1)
    loss = _torchrl_value_loss(trl, value_loss, reg, reduction, R)
    data = TensorDict({"features": x["value_pred"], "bootstrap": x["bootstrap"],
                       "next": {"reward": x["reward"], "done": x["done"],
                                "terminated": x["terminated"]}}, [3, 7])
    theirs = loss.replay_value_loss(data, horizon=50.0, lmbda=0.9)["loss_replay_value"]
    slow = SLOW_GAIN * x["value_pred"].detach()
    ours = replay_value_loss(x["value_pred"], x["reward"], x["done"], x["terminated"],
                             x["bootstrap"], horizon=50.0, lmbda=0.9, value_loss=value_loss,
                             slow_value=slow if reg else None, slow_critic_regularization=reg,
                             reduction=reduction, backend="torch")
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-5)
    g = torch.randn_like(theirs)
    _close_grads(torch.autograd.grad(ours, x["value_pred"], g)[0],
                 torch.autograd.grad(theirs, x["value_pred"], g)[0])


def test_replay_returns_match_torchrl_target(trl):
    """The replay λ-returns (read through a critic that is the target itself: zero symlog error
    exactly where the target is reproduced) against torchrl's ``_replay_value_target``."""
    from fused_dreamer_loss.behavior_v3 import reference
    from fused_dreamer_loss.behavior_v3.validation import ReplayOptions
    x = replay(4, 9, R=2, seed=5)
    theirs = trl._replay_value_target(x["reward"], x["done"], x["terminated"], x["bootstrap"],
                                      30.0, 0.8)
    ours = reference.replay_returns(x["reward"], x["done"], x["terminated"], x["bootstrap"],
                                    ReplayOptions(30.0, 0.8), torch.Size([4, 9]), torch.float32)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("module", [fused_dreamer_loss.behavior_v3.functional,
                                    fused_dreamer_loss.behavior_v3.conventions],
                         ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
