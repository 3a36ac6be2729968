"""The fused DreamerV3 losses composed in torchrl's learner, against torchrl's own.

torchrl's ``DreamerV3Loss`` over ``FusedDreamerV3ModelLoss``, ``FusedDreamerV3ActorLoss`` and
``FusedDreamerV3ValueLoss`` (replay value included, weight 0.3), trained by torchrl's
``DreamerV3OptimizationStepper`` with its ``DreamerV3Optimizer`` and a ``SoftUpdate`` of the slow
critic, against the same learner over torchrl's three losses: the losses and metrics of every
step and the whole state dict before and after each (every parameter, the return-percentile EMA,
the slow critic, the bins), over several steps, eager and with ``compile_train_step=True``.

The world is torchrl's DreamerV3 example, tiny and in float64: RSSMPriorV3 (with the block GRU:
torchrl runs its GRU in float32) and RSSMPosteriorV3 in an RSSMRolloutV3, an observation encoder
and decoder, a reward head and a continue head shared between the world model and the imagination
(the continue head through a sigmoid is the actor's continuation model), a TanhNormal actor
trained by REINFORCE and a 255-bin critic decoded by SymExpTwoHot.
"""

from __future__ import annotations

import copy
import warnings
from unittest import mock

import pytest
import torch

torchrl = pytest.importorskip("torchrl")

from tensordict import TensorDict  # noqa: E402
from tensordict.nn import (NormalParamExtractor, ProbabilisticTensorDictModule,  # noqa: E402
                           ProbabilisticTensorDictSequential, TensorDictModule,
                           TensorDictSequential)
from torchrl.data import Bounded, Composite, Unbounded  # noqa: E402
from torchrl.envs.model_based import DreamerEnv  # noqa: E402
from torchrl.modules import (MLP, RSSMPosteriorV3, RSSMPriorV3, RSSMRolloutV3,  # noqa: E402
                             SymExpTwoHot, TanhNormal, WorldModelWrapper)
from torchrl.objectives import dreamer_v3 as torchrl_dreamer_v3  # noqa: E402
from torchrl.objectives import (DreamerV3ActorLoss, DreamerV3Loss, DreamerV3ModelLoss,  # noqa: E402
                                DreamerV3ValueLoss, SoftUpdate)
from torchrl.trainers.algorithms import (DreamerV3OptimizationStepper,  # noqa: E402
                                         DreamerV3Optimizer)

from fused_dreamer_loss import FusedDreamerV3ModelLoss  # noqa: E402
from fused_dreamer_loss.behavior_v3.module import (FusedDreamerV3ActorLoss,  # noqa: E402
                                                   FusedDreamerV3ValueLoss)
from tests.behavior_v3.test_module_behavior import BACKENDS, F64, one_thread  # noqa: E402, F401

STATE, BELIEF, OBS, EMBED, HIDDEN, BINS = 4, 8, 3, 8, 8, 255
B, T, HORIZON, STEPS = 2, 3, 2, 3
FEATURES = STATE + BELIEF
#: Against torchrl's learner with its TD(λ) loop (what torchrl runs under torch.compile): float64
#: results to rounding (torchrl computes the world model's continue term in float32: that
#: metric to float32's tolerance).
EXACT = {"rtol": 1e-12, "atol": 1e-14}
#: Against torchrl's eager learner, whose vectorised TD(λ) for the replay value is off by ≈1e-8
#: relative in float64 (test_module_behavior), through the optimizer's float32 moments.
LOOSE = {"rtol": 1e-6, "atol": 1e-9}


class Sigmoid(torch.nn.Module):
    """The continuation probability from the shared continue head's logit."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head = head

    def forward(self, state, belief):
        return torch.sigmoid(self.head(torch.cat([state, belief], -1)))


class Concat(torch.nn.Module):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, state, belief):
        return self.net(torch.cat([state, belief], -1))


def learner(fused: bool, seed: int = 0, compiled: bool = False, backend: str = "torch"):
    """(loss module, stepper) of torchrl's learner over torchrl's losses or ours, the networks
    initialised from ``seed`` (the same for both). ``compiled``: ``compile_train_step=True``,
    with the RSSM's explicit loop (``rssm_scan_unroll=None``: the scan is torchrl's world-model
    business and only lengthens the compile)."""
    torch.manual_seed(seed)
    prior_net = RSSMPriorV3(action_shape=(1,), hidden_dim=HIDDEN, rnn_hidden_dim=BELIEF,
                            num_categoricals=2, num_classes=2, action_dim=1,
                            recurrent_model="block_gru", num_blocks=2)
    posterior_net = RSSMPosteriorV3(hidden_dim=HIDDEN, rnn_hidden_dim=BELIEF, num_categoricals=2,
                                    num_classes=2, obs_embed_dim=EMBED)
    reward_net = Concat(MLP(in_features=FEATURES, out_features=1, num_cells=HIDDEN, depth=1))
    continue_net = MLP(in_features=FEATURES, out_features=1, num_cells=HIDDEN, depth=1)
    prior = TensorDictModule(prior_net, in_keys=["state", "belief", "action"],
                             out_keys=[("next", "prior_logits"), ("next", "state"),
                                       ("next", "belief")])
    posterior = TensorDictModule(posterior_net, in_keys=[("next", "belief"), ("next", "encoded")],
                                 out_keys=[("next", "posterior_logits"), ("next", "state")])
    latent = [("next", "state"), ("next", "belief")]
    world_model = TensorDictSequential(
        TensorDictModule(torch.nn.Linear(OBS, EMBED), in_keys=[("next", "observation")],
                         out_keys=[("next", "encoded")]),
        RSSMRolloutV3(prior, posterior, reset_key="is_init"),
        TensorDictModule(Concat(MLP(in_features=FEATURES, out_features=OBS, num_cells=HIDDEN,
                                    depth=1)), in_keys=latent, out_keys=[("next", "reco_pixels")]),
        TensorDictModule(reward_net, in_keys=latent, out_keys=[("next", "reward")]),
        TensorDictModule(Concat(continue_net), in_keys=latent,
                         out_keys=[("next", "continue_pred")]))
    env = DreamerEnv(WorldModelWrapper(
        TensorDictModule(prior_net, in_keys=["state", "belief", "action"],
                         out_keys=["_", "state", "belief"]),
        TensorDictModule(reward_net, in_keys=["state", "belief"], out_keys=["reward"])),
        prior_shape=(STATE,), belief_shape=(BELIEF,))
    env.observation_spec = Composite(state=Unbounded(STATE), belief=Unbounded(BELIEF))
    env.state_spec = env.observation_spec.clone()
    env.action_spec = Bounded(-1, 1, (1,))
    env.reward_spec = Unbounded((1,))
    continuation = TensorDictModule(Sigmoid(continue_net), in_keys=["state", "belief"],
                                    out_keys=["continuation"])
    actor = ProbabilisticTensorDictSequential(
        TensorDictModule(Concat(MLP(in_features=FEATURES, out_features=2, num_cells=HIDDEN,
                                    depth=1)), in_keys=["state", "belief"], out_keys=["params"]),
        TensorDictModule(NormalParamExtractor(), in_keys=["params"], out_keys=["loc", "scale"]),
        ProbabilisticTensorDictModule(in_keys=["loc", "scale"], out_keys=["action"],
                                      distribution_class=TanhNormal, return_log_prob=True))
    value_head = Concat(MLP(in_features=FEATURES, out_features=BINS, num_cells=HIDDEN, depth=1))
    with torch.no_grad():  # logits peaked around the bin of 0: moderate decoded values
        value_head.net[-1].bias.copy_(-0.4 * (torch.arange(BINS) - BINS // 2).abs())
    value = TensorDictSequential(
        TensorDictModule(value_head, in_keys=["state", "belief"],
                         out_keys=["state_value_logits"]),
        TensorDictModule(SymExpTwoHot(BINS), in_keys=["state_value_logits"],
                         out_keys=["state_value"]))
    for module in (world_model, actor, value):
        module.to(F64)

    backend = {"backend": backend} if fused else {}
    model_loss = (FusedDreamerV3ModelLoss if fused else DreamerV3ModelLoss)(
        world_model, reward_two_hot=False, detach_output=False, lambda_continue=1.0, **backend)
    model_loss.set_keys(pixels="observation")
    actor_loss = (FusedDreamerV3ActorLoss if fused else DreamerV3ActorLoss)(
        actor, value, env, continuation_model=continuation, imagination_horizon=HORIZON,
        use_reinforce=True, **backend)
    value_loss = (FusedDreamerV3ValueLoss if fused else DreamerV3ValueLoss)(
        value, value_loss="two_hot", actor_loss=actor_loss, slow_critic_regularization=1.0,
        **backend)
    loss_module = DreamerV3Loss(model_loss, actor_loss, value_loss).to(F64)
    optimizer = DreamerV3Optimizer(loss_module.parameters(), lr=1e-3, warmup_steps=0)
    stepper = DreamerV3OptimizationStepper(
        loss_module, optimizer, SoftUpdate(value_loss, tau=0.02),
        compile_train_step=compiled, cudagraph=False, warmup_steps=1,
        rssm_scan_unroll=None)
    return loss_module, stepper


def sample(seed: int = 1) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    done = torch.zeros(B, T, 1, dtype=torch.bool)
    done[0, 1] = True
    return TensorDict({
        "state": torch.zeros(B, T, STATE, dtype=F64),
        "belief": torch.zeros(B, T, BELIEF, dtype=F64),
        "action": torch.rand(B, T, 1, generator=g, dtype=F64) * 2 - 1,
        "is_init": torch.zeros(B, T, 1, dtype=torch.bool),
        "next": {"observation": torch.randn(B, T, OBS, generator=g, dtype=F64),
                 "reward": torch.randn(B, T, 1, generator=g, dtype=F64),
                 "done": done, "terminated": done.clone()}}, [B, T])


def tolerance(tensor: torch.Tensor, tol: dict) -> dict:
    return tol if tensor.dtype == F64 else {}


def train(fused: bool, compiled: bool, torchrl_loop: bool = True, backend: str = "torch"):
    """The learner, its metrics after each of ``STEPS`` updates (from fixed seeds) and copies of
    its state dict before the first and after each."""
    torch._dynamo.reset()
    loss_module, stepper = learner(fused, compiled=compiled, backend=backend)
    data = sample()
    states = [copy.deepcopy(loss_module.state_dict())]
    if compiled:
        stepper.warmup(data.clone())
    metrics = []
    with mock.patch.object(torchrl_dreamer_v3, "_is_dynamo_compiling", lambda: torchrl_loop):
        for step in range(STEPS):
            torch.manual_seed(100 + step)
            metrics.append(stepper.step(None, data.clone()))
            states.append(copy.deepcopy(loss_module.state_dict()))
    torch._dynamo.reset()
    return loss_module, metrics, states


def assert_same_training(ours, theirs, tol) -> None:
    (_, got_metrics, got_states), (_, want_metrics, want_states) = ours, theirs
    for step, (got, want) in enumerate(zip(got_metrics, want_metrics)):
        assert sorted(got.keys()) == sorted(want.keys())
        for key in want.keys():
            torch.testing.assert_close(got[key], want[key], **tolerance(want[key], tol),
                                       msg=lambda m: f"step {step}, {key}: {m}")
    for step, (got, want) in enumerate(zip(got_states, want_states)):
        assert list(got) == list(want)
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, **tolerance(value, tol),
                                       msg=lambda m: f"after {step} steps, {name}: {m}")
    loss_module = ours[0]
    low = loss_module.actor_loss.retnorm.low
    assert low.item() != 0 and torch.equal(low, loss_module.actor_loss.return_low.unsqueeze(-1))
    assert not torch.equal(got_states[-1]["value_loss.target_value_model_params.module.0.module."
                                          "net.0.bias"],
                           got_states[0]["value_loss.target_value_model_params.module.0.module."
                                         "net.0.bias"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("torchrl_loop,tol", [(True, EXACT), (False, LOOSE)],
                         ids=["torchrl_loop_td_lambda", "torchrl_vectorised_td_lambda"])
@pytest.mark.filterwarnings("ignore:No target network updater:UserWarning")
def test_eager_learner_matches_torchrl(torchrl_loop, tol, backend):
    assert_same_training(train(True, False, backend=backend), train(False, False, torchrl_loop),
                         tol)


@pytest.fixture(scope="module")
def aot_eager():
    """The stepper's ``torch.compile`` with the ``aot_eager`` backend: Dynamo traces the whole
    step and AOTAutograd its forward and backward, as with Inductor, without Inductor's C++ code
    generation (minutes more on a 2-core CPU)."""
    compile_ = torch.compile
    with mock.patch.object(torch, "compile", lambda fn, **kwargs: compile_(
            fn, **{**kwargs, "backend": "aot_eager"})):
        yield


@pytest.fixture(scope="module")
def torchrl_compiled(aot_eager):
    """torchrl's learner compiled, trained once for the compiled tests."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "No target network updater", UserWarning)
        return train(False, True)


@pytest.mark.filterwarnings("ignore:No target network updater:UserWarning")
def test_compiled_learner_matches_torchrl(torchrl_compiled, aot_eager):
    """Both learners with ``compile_train_step=True`` (warmed up, as torchrl asks); torchrl's
    compiled step is not its eager step (its TanhNormal, among others, takes other paths under
    torch.compile), so ours compiled is compared with torchrl's compiled (see ``aot_eager``).
    Ours on the triton backend, what a compiled CUDA step runs (its custom ops in the traced
    step, the EMA buffers mutated in place); each compile takes a minute or more here, so the
    torch backend's traced math is left to test_module_behavior.test_return_scale_compiles and
    the functional API's compile tests."""
    assert_same_training(train(True, True, backend="triton"), torchrl_compiled, EXACT)
