"""FusedDreamerV3ActorLoss and FusedDreamerV3ValueLoss against torchrl's DreamerV3ActorLoss and
DreamerV3ValueLoss on the same networks.

A tiny imagination environment (torchrl's DreamerEnv over a deterministic dynamics net and a
reward MLP, 3 + 4 latent units), a TanhNormal or a one-hot categorical policy (torchrl's
DreamerV3DiscreteActor), a critic with 255-bin logits decoded by torchrl's SymExpTwoHot (or a
scalar critic for ``symlog_mse``) and a continuation model; float64 networks and buffers, so that
the two modules compare to rounding (``EXACT``: they agree bit for bit today, the tolerance only
allows another summation order). Both modules draw from the same seeded RNG: the rollout's
actions and TanhNormal's one-sample entropy are the same draws.
"""

from __future__ import annotations

import copy
import dataclasses
import doctest
import inspect
import warnings
from unittest import mock

import pytest
import torch

torchrl = pytest.importorskip("torchrl")

from tensordict import TensorDict  # noqa: E402
from tensordict.nn import (NormalParamExtractor, ProbabilisticTensorDictModule,  # noqa: E402
                           ProbabilisticTensorDictSequential, TensorDictModule,
                           TensorDictSequential)
from torchrl.data import Bounded, Composite, OneHot, Unbounded  # noqa: E402
from torchrl.envs.model_based import DreamerEnv  # noqa: E402
from torchrl.modules import (MLP, DreamerV3DiscreteActor, SymExpTwoHot, TanhNormal,  # noqa: E402
                             WorldModelWrapper)
from torchrl.objectives import DreamerV3ActorLoss, DreamerV3ValueLoss, SoftUpdate  # noqa: E402
from torchrl.objectives import dreamer_v3 as torchrl_dreamer_v3  # noqa: E402
from torchrl.objectives.common import LossModule  # noqa: E402
from torchrl.objectives.utils import ValueEstimators  # noqa: E402

import fused_dreamer_loss.behavior_v3.module as behavior_module  # noqa: E402
from fused_dreamer_loss.behavior_v3.module import (FusedDreamerV3ActorLoss,  # noqa: E402
                                                   FusedDreamerV3ValueLoss)

STATE, BELIEF, ACTIONS, CATEGORIES, BINS, HIDDEN = 3, 4, 2, 3, 255, 8
FEATURES = STATE + BELIEF
STARTS, HORIZON = 5, 3
F64 = torch.float64
BACKENDS = ["torch", "triton"]
#: float64 on both sides: the modules agree to rounding.
EXACT = {"rtol": 1e-10, "atol": 1e-12}
#: Against torchrl's vectorised TD(λ) estimate, off by ≈1e-8 – 1e-7 relative in float64
#: (its loop, which torchrl runs under torch.compile, agrees with ours to rounding).
VECTORISED = {"rtol": 1e-6, "atol": 1e-6}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and does not spin against other processes."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


#: torchrl warns on every call of a loss with target parameters and no SoftUpdate.
pytestmark = pytest.mark.filterwarnings("ignore:No target network updater:UserWarning")


# ---- the networks --------------------------------------------------------------------------------


class Dynamics(torch.nn.Module):
    """``(state, belief, action) → (state', belief')``, deterministic."""

    def __init__(self, action_dim: int):
        super().__init__()
        self.net = torch.nn.Linear(FEATURES + action_dim, FEATURES)

    def forward(self, state, belief, action):
        return self.net(torch.cat([state, belief, action], -1)).tanh().split([STATE, BELIEF], -1)


class Features(torch.nn.Module):
    """An MLP of ``(state, belief)``, its output scaled and optionally squashed."""

    def __init__(self, out_features: int, scale: float = 1.0, sigmoid: bool = False):
        super().__init__()
        self.net = MLP(in_features=FEATURES, out_features=out_features, num_cells=HIDDEN, depth=1)
        self.scale, self.sigmoid = scale, sigmoid

    def forward(self, state, belief):
        out = self.net(torch.cat([state, belief], -1)) * self.scale
        return torch.sigmoid(out) if self.sigmoid else out


def critic(two_hot: bool = True, value_key="state_value", logits_key="state_value_logits"):
    """A 255-bin critic (logits peaked around the bin of 0, so the decoded values are moderate)
    writing the logits and the SymExpTwoHot-decoded value, or a scalar critic."""
    if not two_hot:
        return TensorDictModule(Features(1, scale=2.0), in_keys=["state", "belief"],
                                out_keys=[value_key])
    head = Features(BINS)
    with torch.no_grad():
        head.net[-1].weight.mul_(3.0)
        head.net[-1].bias.copy_(-0.4 * (torch.arange(BINS) - BINS // 2).abs())
    return TensorDictSequential(
        TensorDictModule(head, in_keys=["state", "belief"], out_keys=[logits_key]),
        TensorDictModule(SymExpTwoHot(BINS), in_keys=[logits_key], out_keys=[value_key]))


def imagination_env(action_dim: int, discrete: bool) -> DreamerEnv:
    env = DreamerEnv(WorldModelWrapper(
        TensorDictModule(Dynamics(action_dim), in_keys=["state", "belief", "action"],
                         out_keys=["state", "belief"]),
        TensorDictModule(Features(1, scale=4.0), in_keys=["state", "belief"],
                         out_keys=["reward"])),
        prior_shape=(STATE,), belief_shape=(BELIEF,))
    env.observation_spec = Composite(state=Unbounded(STATE), belief=Unbounded(BELIEF))
    env.state_spec = env.observation_spec.clone()
    env.action_spec = OneHot(action_dim) if discrete else Bounded(-1, 1, (action_dim,))
    env.reward_spec = Unbounded((1,))
    return env


def policy(kind: str):
    """``"categorical"`` (torchrl's DreamerV3 discrete actor), ``"tanh_normal"`` (no analytic
    entropy: torchrl's one-sample estimate) or ``"normal"`` (a per-action-dim log-probability and
    entropy, which torchrl sums over the action dim)."""
    if kind == "categorical":
        return DreamerV3DiscreteActor(FEATURES, CATEGORIES, depth=1, num_cells=HIDDEN)
    distribution = TanhNormal if kind == "tanh_normal" else torch.distributions.Normal
    return ProbabilisticTensorDictSequential(
        TensorDictModule(Features(2 * ACTIONS), in_keys=["state", "belief"], out_keys=["params"]),
        TensorDictModule(NormalParamExtractor(), in_keys=["params"], out_keys=["loc", "scale"]),
        ProbabilisticTensorDictModule(in_keys=["loc", "scale"], out_keys=["action"],
                                      distribution_class=distribution, return_log_prob=True))


@dataclasses.dataclass
class Networks:
    env: DreamerEnv
    actor: torch.nn.Module
    value: torch.nn.Module
    continuation: torch.nn.Module

    def parameters(self):
        return [p for m in (self.env.world_model, self.actor, self.value, self.continuation)
                for p in m.parameters()]


def networks(kind="tanh_normal", two_hot=True, dtype=F64, seed=0, continuation_key="continuation",
             **critic_keys) -> Networks:
    torch.manual_seed(seed)
    discrete = kind == "categorical"
    nets = Networks(
        imagination_env(CATEGORIES if discrete else ACTIONS, discrete), policy(kind),
        critic(two_hot, **critic_keys),
        TensorDictModule(Features(1, scale=3.0, sigmoid=True), in_keys=["state", "belief"],
                         out_keys=[continuation_key]))
    for module in (nets.env.world_model, nets.actor, nets.value, nets.continuation):
        module.to(dtype)
    return nets


def starts(dtype=F64, seed=1, n=STARTS) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    return TensorDict({"state": torch.randn(n, STATE, generator=g, dtype=dtype),
                       "belief": torch.randn(n, BELIEF, generator=g, dtype=dtype)}, [n])


def actor_pair(nets: Networks, *, continuation=True, dtype=F64, backend="torch", **options):
    """torchrl's actor loss and ours on the same networks (their buffers in ``dtype``)."""
    options = {"imagination_horizon": HORIZON, **options}
    if continuation:
        options["continuation_model"] = nets.continuation
    theirs = DreamerV3ActorLoss(nets.actor, nets.value, nets.env, **options).to(dtype)
    ours = FusedDreamerV3ActorLoss(nets.actor, nets.value, nets.env, backend=backend,
                                   **options).to(dtype)
    return theirs, ours


def run(loss, data, seed=2):
    torch.manual_seed(seed)
    return loss(data.clone())


def assert_close(got, want, what, **tol):
    torch.testing.assert_close(got, want, **(tol or EXACT), msg=lambda m: f"{what}: {m}")


def assert_same_outputs(got: TensorDict, want: TensorDict, what: str, **tol):
    assert sorted(got.keys()) == sorted(want.keys()), what
    for key in want.keys():
        assert got[key].shape == want[key].shape, f"{what}: {key}"
        assert got[key].dtype == want[key].dtype, f"{what}: {key}"
        assert_close(got[key], want[key], f"{what}: {key}", **tol)


def assert_same_grads(got_loss, want_loss, params, what, **tol):
    got = torch.autograd.grad(got_loss, params, allow_unused=True, retain_graph=True)
    want = torch.autograd.grad(want_loss, params, allow_unused=True, retain_graph=True)
    assert any(w is not None for w in want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None), f"{what}: parameter {i}"
        if w is not None:
            assert_close(g, w, f"{what}: gradient of parameter {i}", **tol)


def compare_actor(theirs, ours, nets, data, what, *, steps=2, **tol):
    """``steps`` calls of both losses: outputs, the imagined λ-returns and weights, the EMA
    buffers after each call, and the gradient of every parameter of the networks."""
    for step in range(steps):
        (want, want_data), (got, got_data) = run(theirs, data, step), run(ours, data, step)
        label = f"{what}, call {step}"
        assert_same_outputs(got, want, label, **tol)
        for key in ("lambda_target", "discount_weight", "continuation"):
            if key in want_data.keys():
                assert_close(got_data[key], want_data[key], f"{label}: {key}", **tol)
        assert_close(ours.retnorm.low, theirs.retnorm.low, f"{label}: retnorm.low", **tol)
        assert_close(ours.retnorm.high, theirs.retnorm.high, f"{label}: retnorm.high", **tol)
        assert_same_grads(got["loss_actor"], want["loss_actor"], nets.parameters(), label, **tol)


# ---- the actor: numbers and gradients ------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("continuation", [True, False], ids=["continuation", "no_continuation"])
@pytest.mark.parametrize("use_reinforce", [False, True], ids=["backprop", "reinforce"])
@pytest.mark.parametrize("kind", ["tanh_normal", "categorical", "normal"])
def test_actor_matches_torchrl(kind, use_reinforce, continuation, backend):
    """Two training calls (the EMA moves), values and every parameter's gradient."""
    nets = networks(kind)
    theirs, ours = actor_pair(nets, continuation=continuation, use_reinforce=use_reinforce,
                              backend=backend)
    compare_actor(theirs, ours, nets, starts(), f"{kind}, {use_reinforce=}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [
    {"entropy_bonus": 0.0},
    {"discount_loss": False},
    {"return_normalization": False},
    {"return_normalization_rate": 0.5, "return_normalization_quantiles": (0.2, 0.7),
     "return_normalization_min_scale": 0.1},
    {"entropy_bonus": 0.05, "imagination_horizon": 1},
], ids=lambda o: ",".join(o))
def test_actor_options_match_torchrl(options, backend):
    nets = networks()
    theirs, ours = actor_pair(nets, use_reinforce=True, backend=backend, **options)
    compare_actor(theirs, ours, nets, starts(), str(options))


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_leaves_the_ema_and_still_scales(backend):
    nets = networks()
    theirs, ours = actor_pair(nets, use_reinforce=True, backend=backend)
    for loss in (theirs, ours):
        loss.retnorm.low.fill_(-3.0)
        loss.retnorm.high.fill_(4.0)
        loss.eval()
    compare_actor(theirs, ours, nets, starts(), "eval")
    assert ours.retnorm.low.item() == -3.0 and ours.retnorm.high.item() == 4.0
    assert run(ours, starts())[0]["return_scale"].item() == 7.0
    ours.train()
    run(ours, starts())
    assert ours.retnorm.low.item() != -3.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_terminal_continuations_inside_the_rollout(backend):
    """A continuation model that predicts exact zeros for some imagined states."""
    nets = networks()
    nets.continuation.module.forward = lambda state, belief: (state[..., :1] > 0).to(state.dtype)
    theirs, ours = actor_pair(nets, use_reinforce=True, backend=backend)
    data = starts(n=7)
    compare_actor(theirs, ours, nets, data, "terminal states")
    _, imagined = run(ours, data)
    assert (imagined["discount_weight"] == 0).any() and (imagined["discount_weight"] > 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_matches_torchrl(backend):
    nets = networks(dtype=torch.float32)
    theirs, ours = actor_pair(nets, dtype=torch.float32, use_reinforce=True, backend=backend)
    compare_actor(theirs, ours, nets, starts(torch.float32), "float32", rtol=1e-5, atol=1e-6)
    assert run(ours, starts(torch.float32))[0]["loss_actor"].dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_gives_torchrl_dtypes(backend):
    nets = networks(dtype=torch.float32)
    theirs, ours = actor_pair(nets, dtype=torch.float32, use_reinforce=True, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_data = run(theirs, starts(torch.float32))
        got, got_data = run(ours, starts(torch.float32))
    for key in want.keys():
        assert got[key].dtype == want[key].dtype, key
        assert_close(got[key].float(), want[key].float(), key, rtol=2e-2, atol=2e-2)
    for key in ("lambda_target", "discount_weight"):
        assert got_data[key].dtype == want_data[key].dtype, key


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_scale_compiles(backend):
    """The actor's EMA update and scale under ``torch.compile(fullgraph=True)``, as in a compiled
    learner step: the scale and the updated buffers equal the eager call's."""
    nets = networks()
    _, ours = actor_pair(nets, backend=backend)
    eager = copy.deepcopy(ours)
    returns = torch.randn(STARTS, HORIZON, 1, dtype=F64)
    torch._dynamo.reset()
    try:
        got = torch.compile(ours._return_scale, backend="aot_eager", fullgraph=True)(returns)
    finally:
        torch._dynamo.reset()
    assert_close(got, eager._return_scale(returns), "scale")
    assert_close(ours.retnorm.low, eager.retnorm.low, "retnorm.low")
    assert_close(ours.retnorm.high, eager.retnorm.high, "retnorm.high")
    assert ours.retnorm.low.item() != 0


def test_the_comparison_sees_a_wrong_entropy_weight():
    """The checks above can fail: an entropy weight 1% off is caught."""
    nets = networks()
    theirs, _ = actor_pair(nets)
    wrong = FusedDreamerV3ActorLoss(nets.actor, nets.value, nets.env, backend="torch",
                                    imagination_horizon=HORIZON, entropy_bonus=3.03e-4,
                                    continuation_model=nets.continuation).double()
    with pytest.raises(AssertionError, match="loss_actor"):
        compare_actor(theirs, wrong, nets, starts(), "wrong entropy weight", steps=1)


# ---- the critic evaluations torchrl repeats ------------------------------------------------------


def test_the_baseline_is_the_next_states_values_shifted():
    """The premise of the shared evaluation: the critic's values of the states 1 … H−1 are its
    values of the next states 0 … H−2, bit for bit."""
    nets = networks()
    theirs, _ = actor_pair(nets, use_reinforce=True)
    _, imagined = run(theirs, starts())
    roots = nets.value(imagined.select("state", "belief"))["state_value"]
    nexts = nets.value(imagined["next"].select("state", "belief"))["state_value"]
    assert torch.equal(roots[:, 1:], nexts[:, :-1])


def test_reinforce_values_the_rollout_once():
    """torchrl runs the critic on 2·N·H states for REINFORCE; ours on N·H + N."""
    nets = networks()
    theirs, ours = actor_pair(nets, use_reinforce=True)
    rows = []
    hook = nets.value.module[0].module.register_forward_hook(
        lambda module, args, out: rows.append(out.shape[:-1].numel()))
    run(theirs, starts())
    torchrl_rows, rows[:] = sum(rows), []
    run(ours, starts())
    hook.remove()
    assert (torchrl_rows, sum(rows)) == (2 * STARTS * HORIZON, STARTS * HORIZON + STARTS)


# ---- the value estimator ------------------------------------------------------------------------


@pytest.mark.parametrize("estimator,hyper", [
    (ValueEstimators.TDLambda, {"gamma": 0.9, "lmbda": 0.5}),
    (ValueEstimators.TDLambda, {"gamma": 0.8, "time_dim": -2, "vectorized": False}),
    (ValueEstimators.TDLambda, {"gamma": 0.8, "time_dim": -2}),
    (ValueEstimators.TD1, {"gamma": 0.7, "time_dim": -2}),
    (ValueEstimators.TD1, {}),
    (ValueEstimators.TD0, {"gamma": 0.95}),
], ids=lambda x: x.name if isinstance(x, ValueEstimators)
   else ",".join(f"{k}={v}" for k, v in x.items()))
def test_value_estimators_without_continuation_match_torchrl(estimator, hyper):
    """Without a continuation model torchrl takes its estimator's value estimate; where the
    estimator's ``time_dim`` is unset that is a one-step return ``r + γ·v`` per step. Its
    vectorised TD(λ) along the horizon loses precision (``VECTORISED``)."""
    nets = networks()
    theirs, ours = actor_pair(nets, continuation=False, use_reinforce=True)
    for loss in (theirs, ours):
        loss.make_value_estimator(estimator, **hyper)
    vectorised = estimator == ValueEstimators.TDLambda and hyper.get("time_dim") == -2 \
        and hyper.get("vectorized", True)
    compare_actor(theirs, ours, nets, starts(), estimator.name, steps=1,
                  **(VECTORISED if vectorised else EXACT))


def test_torchrl_without_continuation_takes_one_step_returns():
    """What the test above relies on (if torchrl changes it, this says so)."""
    nets = networks()
    theirs, _ = actor_pair(nets, continuation=False)
    reward, value = torch.randn(2, 4, 1, dtype=F64), torch.randn(2, 4, 1, dtype=F64)
    gamma = theirs.value_estimator.gamma.to(F64)
    torch.testing.assert_close(theirs.lambda_target(reward, value), reward + gamma * value)


def test_gamma_and_lambda_follow_a_new_estimator_and_a_loaded_state_dict():
    nets = networks()
    theirs, ours = actor_pair(nets, use_reinforce=True)
    compare_actor(theirs, ours, nets, starts(), "default estimator", steps=1)
    theirs.make_value_estimator(ValueEstimators.TDLambda, gamma=0.5, lmbda=0.3)
    ours.make_value_estimator(ValueEstimators.TDLambda, gamma=0.5, lmbda=0.3)
    compare_actor(theirs, ours, nets, starts(), "made estimator", steps=1)
    theirs.value_estimator.gamma.fill_(0.7)
    ours.load_state_dict(theirs.state_dict())
    compare_actor(theirs, ours, nets, starts(), "loaded gamma", steps=1)
    estimator = copy.deepcopy(theirs.value_estimator)
    estimator.lmbda.fill_(0.9)
    theirs.make_value_estimator(estimator)
    ours.make_value_estimator(copy.deepcopy(estimator))
    compare_actor(theirs, ours, nets, starts(), "estimator instance", steps=1)


def test_lambda_target_method_matches_torchrl():
    nets = networks()
    theirs, ours = actor_pair(nets)
    g = torch.Generator().manual_seed(3)
    reward, value = (torch.randn(2, 4, 1, generator=g, dtype=F64) for _ in range(2))
    continuation = torch.rand(2, 4, 1, generator=g, dtype=F64)
    for cont in (continuation, None):
        assert_close(ours.lambda_target(reward, value, cont),
                     theirs.lambda_target(reward, value, cont), f"{cont is None=}")


def test_estimators_ours_refuses():
    nets = networks()
    _, ours = actor_pair(nets, continuation=False)
    ours.make_value_estimator(ValueEstimators.TDLambda, average_rewards=True)
    with pytest.raises(NotImplementedError, match="average_rewards"):
        run(ours, starts())
    ours.make_value_estimator(ValueEstimators.TDLambda, time_dim=0)
    with pytest.raises(NotImplementedError, match="time_dim=0"):
        run(ours, starts())


# ---- the critic: numbers and gradients -----------------------------------------------------------


def value_pair(nets: Networks, backend="torch", **options):
    theirs = DreamerV3ValueLoss(nets.value, **options).double()
    ours = FusedDreamerV3ValueLoss(nets.value, backend=backend, **options).double()
    return theirs, ours


def imagined(nets: Networks, seed=4) -> TensorDict:
    """torchrl's imagined trajectory, detached, as DreamerV3Loss hands it to the critic."""
    theirs, _ = actor_pair(nets)
    return run(theirs, starts(), seed)[1].detach()


def critic_params(loss):
    return [p for p in loss.value_model_params.values(True, True) if p.requires_grad]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("slow", [0.0, 1.0], ids=["no_slow", "slow"])
@pytest.mark.parametrize("value_loss", ["two_hot", "symlog_mse"])
def test_value_matches_torchrl(value_loss, slow, reduction, backend):
    nets = networks(two_hot=value_loss == "two_hot")
    theirs, ours = value_pair(nets, backend, value_loss=value_loss, slow_critic_regularization=slow,
                              reduction=reduction)
    if slow:  # a slow critic that differs from the online one
        for loss in (theirs, ours):
            loss.target_value_model_params.apply(lambda p: p.data.mul_(0.7))
    data = imagined(nets)
    (want, _), (got, _) = theirs(data), ours(data)
    assert_same_outputs(got, want, value_loss)
    assert_same_grads(got["loss_value"].sum(), want["loss_value"].sum(), critic_params(ours),
                      value_loss)


def test_value_weights_without_discount_weights_match_torchrl():
    """No discount weights in the data: γ^t, from the actor loss's estimator or ``gamma``."""
    nets = networks()
    actor_theirs, actor_ours = actor_pair(nets)
    for loss in (actor_theirs, actor_ours):
        loss.make_value_estimator(ValueEstimators.TDLambda, gamma=0.6)
    data = imagined(nets).exclude("discount_weight")
    cases = [({"actor_loss": actor_theirs}, {"actor_loss": actor_ours}),
             ({"gamma": 0.8}, {"gamma": 0.8}), ({"discount_loss": False},) * 2]
    for case, (theirs_options, ours_options) in enumerate(cases):
        theirs = DreamerV3ValueLoss(nets.value, value_loss="two_hot", **theirs_options).double()
        ours = FusedDreamerV3ValueLoss(nets.value, value_loss="two_hot", backend="torch",
                                       **ours_options).double()
        assert_same_outputs(ours(data)[0], theirs(data)[0], f"case {case}")
    theirs = DreamerV3ValueLoss(nets.value, value_loss="two_hot", gamma=0.3).double()
    ours = FusedDreamerV3ValueLoss(nets.value, value_loss="two_hot", gamma=0.3).double()
    theirs.sync_gamma_with_actor_loss(actor_theirs)
    ours.sync_gamma_with_actor_loss(actor_ours)
    assert ours.gamma == theirs.gamma
    assert_same_outputs(ours(data)[0], theirs(data)[0], "sync_gamma_with_actor_loss")


def test_legacy_logits_under_the_value_key_warn_as_torchrl():
    """torchrl's deprecated layout: the logits under the decoded-value key (the slow target is
    then decoded from them)."""
    nets = networks()
    nets.value = nets.value.module[0]
    nets.value.out_keys = ["state_value"]
    theirs, ours = value_pair(nets, value_loss="two_hot", slow_critic_regularization=1.0)
    data = imagined(networks())
    with pytest.warns(DeprecationWarning, match="value_logits"):
        want = theirs(data)[0]
    with pytest.warns(DeprecationWarning, match="value_logits"):
        got = ours(data)[0]
    assert_same_outputs(got, want, "legacy logits")


def replay(dtype=F64, seed=5, B=2, T=6) -> TensorDict:
    """A replay batch: features with grad (the world model's path), a terminal and a truncation
    inside the sequences."""
    g = torch.Generator().manual_seed(seed)
    done = torch.zeros(B, T, 1, dtype=torch.bool)
    terminated = done.clone()
    done[0, 2] = terminated[0, 2] = True
    done[1, 3] = True
    return TensorDict({
        "state": torch.randn(B, T, STATE, generator=g, dtype=dtype).requires_grad_(),
        "belief": torch.randn(B, T, BELIEF, generator=g, dtype=dtype).requires_grad_(),
        "bootstrap": 3 * torch.randn(B, T, generator=g, dtype=dtype),
        "next": {"reward": torch.randn(B, T, 1, generator=g, dtype=dtype),
                 "done": done, "terminated": terminated}}, [B, T])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("slow", [0.0, 0.5], ids=["no_slow", "slow"])
@pytest.mark.parametrize("value_loss", ["two_hot", "symlog_mse"])
def test_replay_value_matches_torchrl(value_loss, slow, reduction, backend):
    """Against both of torchrl's TD(λ) paths: the loop it runs under torch.compile, to rounding,
    and the vectorised one it runs eagerly, which loses precision (≈1e-7 relative in float64)."""
    nets = networks(two_hot=value_loss == "two_hot")
    theirs, ours = value_pair(nets, backend, value_loss=value_loss, slow_critic_regularization=slow,
                              reduction=reduction)
    data = replay()
    got = ours.replay_value_loss(data, horizon=20.0, lmbda=0.8)
    inputs = critic_params(ours) + [data["state"], data["belief"]]
    for compiled, tol in ((True, EXACT), (False, VECTORISED)):
        with mock.patch.object(torchrl_dreamer_v3, "_is_dynamo_compiling", lambda: compiled):
            want = theirs.replay_value_loss(data, horizon=20.0, lmbda=0.8)
        what = f"replay, torchrl's {'loop' if compiled else 'vectorised'} TD(λ)"
        assert_same_outputs(got, want, what, **tol)
        assert_same_grads(got["loss_replay_value"].sum(), want["loss_replay_value"].sum(),
                          inputs, what, **tol)


def test_the_comparison_sees_a_wrong_slow_weight():
    nets = networks()
    theirs = DreamerV3ValueLoss(nets.value, value_loss="two_hot",
                                slow_critic_regularization=1.0).double()
    wrong = FusedDreamerV3ValueLoss(nets.value, value_loss="two_hot",
                                    slow_critic_regularization=1.01).double()
    for loss in (theirs, wrong):
        loss.target_value_model_params.apply(lambda p: p.data.mul_(0.7))
    data = imagined(nets)
    with pytest.raises(AssertionError, match="loss_value"):
        assert_same_outputs(wrong(data)[0], theirs(data)[0], "wrong slow weight")


# ---- state dicts, keys and the LossModule API ----------------------------------------------------


def test_signatures_and_defaults_are_torchrl_s():
    for ours, theirs in ((FusedDreamerV3ActorLoss, DreamerV3ActorLoss),
                         (FusedDreamerV3ValueLoss, DreamerV3ValueLoss)):
        params = dict(inspect.signature(ours).parameters)
        assert params.pop("backend").default == "auto"
        want = inspect.signature(theirs).parameters
        assert [(p.name, p.kind, p.default) for p in params.values()] == \
            [(p.name, p.kind, p.default) for p in want.values()]
        assert ours._AcceptedKeys is theirs._AcceptedKeys
        assert issubclass(ours, theirs) and issubclass(ours, LossModule)


def test_attributes_match_torchrl():
    nets = networks()
    theirs, ours = actor_pair(nets, use_reinforce=True, return_normalization_rate=0.2)
    for name in ("imagination_horizon", "discount_loss", "entropy_bonus", "use_reinforce",
                 "return_normalization", "return_normalization_rate",
                 "return_normalization_quantiles", "return_normalization_min_scale",
                 "default_value_estimator", "SUPPORTED_VALUE_ESTIMATORS"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.return_low.shape == theirs.return_low.shape == torch.Size([])
    theirs_value, ours_value = value_pair(nets, value_loss="two_hot")
    for name in ("value_loss", "gamma", "discount_loss", "slow_critic_regularization",
                 "reduction"):
        assert getattr(ours_value, name) == getattr(theirs_value, name), name
    assert torch.equal(ours_value.value_bins, theirs_value.value_bins)


def test_state_dicts_load_strictly_both_ways():
    nets = networks()
    theirs, ours = actor_pair(nets)
    for stage in ("built", "after a call (with the value estimator)"):
        assert list(ours.state_dict()) == list(theirs.state_dict()), stage
        theirs.retnorm.low.fill_(-1.5)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        assert ours.retnorm.low.item() == -1.5
        ours.retnorm.high.fill_(2.5)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        assert theirs.retnorm.high.item() == 2.5
        run(theirs, starts())
        run(ours, starts())
    theirs_value, ours_value = value_pair(nets, value_loss="two_hot",
                                          slow_critic_regularization=1.0)
    assert "value_bins" in ours_value.state_dict()
    assert any(k.startswith("target_value_model_params") for k in ours_value.state_dict())
    ours_value.load_state_dict(theirs_value.state_dict(), strict=True)
    theirs_value.load_state_dict(ours_value.state_dict(), strict=True)


def test_legacy_flat_return_buffers_migrate_as_torchrl():
    nets = networks()
    _, ours = actor_pair(nets)
    legacy = ours.state_dict()
    legacy["return_low"], legacy["return_high"] = legacy.pop("retnorm.low")[0], \
        legacy.pop("retnorm.high")[0]
    legacy["return_low"].fill_(-2.0)
    legacy["return_high"].fill_(5.0)
    ours.load_state_dict(legacy, strict=True)
    assert ours.retnorm.low.tolist() == [-2.0] and ours.return_high.item() == 5.0


def test_set_keys_match_torchrl():
    """Networks writing other keys; both modules told so with set_keys."""
    keys = {"value_key": "critic_v", "logits_key": "critic_logits"}
    nets = networks(continuation_key="cont", **keys)
    theirs, ours = actor_pair(nets, use_reinforce=True)
    for loss in (theirs, ours):
        assert loss.set_keys(value="critic_v", continuation="cont", discount_weight="w") is None
    compare_actor(theirs, ours, nets, starts(), "set_keys", steps=1)
    data = run(theirs, starts())[1].detach()
    theirs_value, ours_value = value_pair(nets, value_loss="two_hot",
                                          slow_critic_regularization=1.0)
    for loss in (theirs_value, ours_value):
        loss.set_keys(value="critic_v", value_logits="critic_logits", discount_weight="w")
    assert_same_outputs(ours_value(data)[0], theirs_value(data)[0], "value set_keys")
    assert ours.tensor_keys == theirs.tensor_keys
    assert ours.value_estimator.tensor_keys.value == "critic_v"
    ours.set_keys(value=None)
    assert ours.tensor_keys.value == "state_value"


def test_set_keys_errors():
    _, ours = actor_pair(networks())
    with pytest.raises(TypeError, match="value"):
        ours.set_keys(value=3)
    with pytest.raises(ValueError, match="not_a_key"):
        ours.set_keys(not_a_key="x")


def test_composes_with_soft_update_and_target_params():
    nets = networks()
    _, ours = value_pair(nets, value_loss="two_hot", slow_critic_regularization=1.0)
    updater = SoftUpdate(ours, tau=0.5)
    online = critic_params(ours)
    target = list(ours.target_value_model_params.values(True, True))
    before = [t.clone() for t in target]
    with torch.no_grad():
        online[0].add_(1.0)
    updater.step()
    assert_close(target[0], 0.5 * before[0] + 0.5 * online[0], "soft update")
    assert all(t not in set(ours.parameters()) for t in target)


@pytest.mark.parametrize("cls,args,match", [
    (FusedDreamerV3ActorLoss, {"imagination_horizon": 0}, "imagination_horizon"),
    (FusedDreamerV3ActorLoss, {"entropy_bonus": -1.0}, "entropy_bonus"),
    (FusedDreamerV3ActorLoss, {"use_reinforce": "yes"}, "use_reinforce"),
    (FusedDreamerV3ActorLoss, {"backend": "cuda"}, "backend"),
    (FusedDreamerV3ActorLoss, {"return_normalization_rate": 2.0}, "rate"),
    (FusedDreamerV3ActorLoss, {"gamma": 0.9}, "gamma"),
    (FusedDreamerV3ValueLoss, {"value_loss": "l2"}, "value_loss"),
    (FusedDreamerV3ValueLoss, {"reduction": "avg"}, "reduction"),
    (FusedDreamerV3ValueLoss, {"slow_critic_regularization": -1.0}, "slow_critic"),
    (FusedDreamerV3ValueLoss, {"discount_loss": 1}, "discount_loss"),
    (FusedDreamerV3ValueLoss, {"backend": "cuda"}, "backend"),
])
def test_bad_options_fail_at_construction(cls, args, match):
    nets = networks()
    with pytest.raises((TypeError, ValueError), match=match):
        if cls is FusedDreamerV3ActorLoss:
            cls(nets.actor, nets.value, nets.env, **args)
        else:
            cls(nets.value, **args)


def test_wrong_number_of_bins_names_it():
    nets = networks()
    ours = FusedDreamerV3ValueLoss(nets.value, value_loss="two_hot", num_value_bins=101)
    with pytest.raises(ValueError, match="101 bins"):
        ours(imagined(nets))


def test_docstring_examples():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = doctest.testmod(behavior_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
