"""FusedDreamerModelLoss against torchrl's DreamerModelLoss on a real torchrl world model."""

from __future__ import annotations

import copy

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn

from fused_dreamer_loss import FusedDreamerModelLoss
from tests.helpers import assert_same_state, assert_torchrl_loss_module_api

torchrl = pytest.importorskip("torchrl")
from torchrl.data import Unbounded  # noqa: E402
from torchrl.modules import MLP, SafeSequential, WorldModelWrapper  # noqa: E402
from torchrl.modules.models.model_based import (  # noqa: E402
    ObsDecoder, ObsEncoder, RSSMPosterior, RSSMPrior, RSSMRollout)
from torchrl.objectives import DreamerModelLoss  # noqa: E402

HIDDEN, STATE, ACTION = 10, 5, 4
BATCH, TIME = 2, 3
LOSS_NAMES = ("loss_model_kl", "loss_model_reco", "loss_model_reward")


def world_model(device, pixels_key="pixels", reco_key="reco_pixels"):
    """torchrl's Dreamer world model: encoder, RSSM rollout (prior + posterior), decoder, reward."""
    prior = RSSMPrior(hidden_dim=HIDDEN, rnn_hidden_dim=HIDDEN, state_dim=STATE,
                      action_spec=Unbounded(shape=(ACTION,)))
    posterior = RSSMPosterior(hidden_dim=HIDDEN, state_dim=STATE)
    rollout = RSSMRollout(
        TensorDictModule(prior, in_keys=["state", "belief", "action"],
                         out_keys=[("next", "prior_mean"), ("next", "prior_std"), "_",
                                   ("next", "belief")]),
        TensorDictModule(posterior, in_keys=[("next", "belief"), ("next", "encoded_latents")],
                         out_keys=[("next", "posterior_mean"), ("next", "posterior_std"),
                                   ("next", "state")]),
    )
    model = WorldModelWrapper(
        SafeSequential(
            TensorDictModule(ObsEncoder(channels=3, num_layers=2), in_keys=[("next", pixels_key)],
                             out_keys=[("next", "encoded_latents")]),
            rollout,
            TensorDictModule(ObsDecoder(channels=3, num_layers=4),
                             in_keys=[("next", "state"), ("next", "belief")],
                             out_keys=[("next", reco_key)]),
        ),
        TensorDictModule(MLP(out_features=1, depth=2, num_cells=13, activation_class=nn.ELU),
                         in_keys=[("next", "state"), ("next", "belief")],
                         out_keys=[("next", "reward")]),
    ).to(device)
    with torch.no_grad():  # materialise the lazy layers
        model(data(device, seed=0, pixels_key=pixels_key))
    return model


def data(device, seed, pixels_key="pixels"):
    g = torch.Generator().manual_seed(seed)
    return TensorDict({
        "state": torch.zeros(BATCH, TIME, STATE),
        "belief": torch.zeros(BATCH, TIME, HIDDEN),
        "action": torch.randn(BATCH, TIME, ACTION, generator=g),
        "next": {
            pixels_key: torch.rand(BATCH, TIME, 3, 64, 64, generator=g),
            "reward": torch.randn(BATCH, TIME, 1, generator=g),
        },
    }, batch_size=[BATCH, TIME]).to(device)


def run(loss_module, td, seed):
    """Losses and world-model parameter gradients; the posterior samples, so seed first."""
    loss_module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    losses, model_out = loss_module(td)
    sum(losses[name] for name in LOSS_NAMES).sum().backward()
    grads = {n: p.grad.clone() for n, p in loss_module.world_model.named_parameters()
             if p.grad is not None}
    return losses, model_out, grads


def assert_parity(theirs, ours):
    (t_losses, t_out, t_grads), (o_losses, o_out, o_grads) = theirs, ours
    assert o_losses.batch_size == torch.Size([])
    for name in LOSS_NAMES:
        assert o_losses[name].shape == torch.Size([1])
        torch.testing.assert_close(o_losses[name], t_losses[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
    assert set(o_out.keys(True, True)) == set(t_out.keys(True, True))
    assert not any(t.requires_grad for t in o_out.values(True, True))
    assert o_grads.keys() == t_grads.keys() and o_grads
    for name in t_grads:
        scale = float(t_grads[name].abs().max()) or 1.0
        # Parameter gradients are sums over the batch in which terms cancel; the loss's own rounding
        # (a different reduction order) shows up relative to the gradient's scale.
        torch.testing.assert_close(o_grads[name], t_grads[name], rtol=1e-4, atol=5e-5 * scale,
                                   msg=lambda m: f"grad {name}: {m}")


@pytest.fixture(autouse=True)
def no_tf32():
    """On CUDA, cuDNN convolutions default to TF32, whose 1e-3 rounding swamps the loss-level
    differences these tests compare; the world model runs in full float32 here."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def model(device):
    torch.manual_seed(0)
    return world_model(device)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("free_nats", [0.0, "median", 1000.0])
@pytest.mark.parametrize("global_average", [False, True])
@pytest.mark.parametrize("delayed_clamp", [False, True])
@pytest.mark.parametrize("reco_loss, reward_loss", [("l2", "l2"), ("l1", "smooth_l1"),
                                                    ("smooth_l1", "l1")])
def test_parity_with_torchrl(device, model, reco_loss, reward_loss, delayed_clamp,
                             global_average, free_nats, backend):
    td = data(device, seed=1)
    if free_nats == "median":  # clamp some rows (or elements) and not others
        with torch.no_grad():
            torch.manual_seed(2)
            out = model(td.copy().rename_key_(("next", "reward"), ("next", "true_reward")))
            n = out["next"]
            from fused_dreamer_loss.reference import kl_divergence
            kl = kl_divergence(n["prior_mean"], n["prior_std"], n["posterior_mean"],
                               n["posterior_std"])
            free_nats = float((kl if global_average else kl.sum(-1)).median())
    options = dict(lambda_kl=0.5, lambda_reco=1.5, lambda_reward=2.0, reco_loss=reco_loss,
                   reward_loss=reward_loss, free_nats=free_nats, delayed_clamp=delayed_clamp,
                   global_average=global_average)
    theirs = run(DreamerModelLoss(model, **options), td, seed=2)
    ours = run(FusedDreamerModelLoss(model, backend=backend, **options), td, seed=2)
    assert_parity(theirs, ours)


def test_defaults_match_torchrl(model):
    ours, theirs = FusedDreamerModelLoss(model), DreamerModelLoss(model)
    for name in ("lambda_kl", "lambda_reco", "lambda_reward", "reco_loss", "reward_loss",
                 "free_nats", "delayed_clamp", "global_average"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.backend == "auto"
    import dataclasses
    assert dataclasses.asdict(ours.tensor_keys) == dataclasses.asdict(theirs.tensor_keys)
    assert dataclasses.asdict(ours.default_keys()) == dataclasses.asdict(theirs.default_keys())


def test_from_torchrl(device, model):
    theirs = DreamerModelLoss(model, lambda_kl=0.3, reco_loss="smooth_l1", reward_loss="l1",
                              free_nats=1, delayed_clamp=True, global_average=True)
    ours = FusedDreamerModelLoss.from_torchrl(theirs, backend="triton")
    assert ours.world_model is theirs.world_model
    assert (ours.lambda_kl, ours.reco_loss, ours.reward_loss, ours.free_nats,
            ours.delayed_clamp, ours.global_average) == (0.3, "smooth_l1", "l1", 1, True, True)
    td = data(device, seed=3)
    assert_parity(run(theirs, td, seed=4), run(ours, td, seed=4))


def test_set_keys_custom_and_nested(device):
    torch.manual_seed(0)
    model = world_model(device, pixels_key=("obs", "rgb"), reco_key="decoded")
    td = data(device, seed=5, pixels_key=("obs", "rgb"))
    theirs = DreamerModelLoss(model, free_nats=0.5)
    theirs.set_keys(pixels=("obs", "rgb"), reco_pixels="decoded")
    ours = FusedDreamerModelLoss(model, free_nats=0.5)
    assert ours.set_keys(pixels=("obs", "rgb"), reco_pixels="decoded") is None  # as torchrl
    assert ours.tensor_keys.pixels == ("obs", "rgb")
    assert_parity(run(theirs, td, seed=6), run(ours, td, seed=6))
    from_theirs = FusedDreamerModelLoss.from_torchrl(theirs)
    assert from_theirs.tensor_keys.pixels == ("obs", "rgb")
    assert from_theirs.tensor_keys.reco_pixels == "decoded"


def test_unknown_key_name_or_bad_key(model):
    with pytest.raises(ValueError, match="'pixel' is not an accepted tensordict key"):
        FusedDreamerModelLoss(model).set_keys(pixel="rgb")
    with pytest.raises(TypeError, match=r"set_keys\(pixels=\.\.\.\)"):
        FusedDreamerModelLoss(model).set_keys(pixels=["a", "b"])  # one head only in V1


def test_key_the_world_model_did_not_write(device, model):
    loss = FusedDreamerModelLoss(model)
    loss.set_keys(posterior_std="posterior_scale")
    with pytest.raises(KeyError, match=r"\('next', 'posterior_scale'\).*world model's output"):
        loss(data(device, seed=7))


def test_missing_reward_in_the_input(device, model):
    td = data(device, seed=7)
    del td["next", "reward"]
    with pytest.raises(KeyError, match=r"\('next', 'reward'\).*input tensordict"):
        FusedDreamerModelLoss(model)(td)


def test_input_tensordict_is_not_modified(device, model):
    td = data(device, seed=8)
    keys = set(td.keys(True, True))
    reward = td["next", "reward"].clone()
    FusedDreamerModelLoss(model)(td)
    assert set(td.keys(True, True)) == keys
    assert torch.equal(td["next", "reward"], reward)


@pytest.mark.parametrize("option, value, error", [
    ("reco_loss", "l3", ValueError), ("backend", "cuda", ValueError),
    ("free_nats", "3", TypeError), ("delayed_clamp", "yes", TypeError),
])
def test_bad_options_fail_at_construction(model, option, value, error):
    with pytest.raises(error, match=option):
        FusedDreamerModelLoss(model, **{option: value})


def test_works_with_a_deep_copied_world_model(device, model):
    """The module holds the world model as a submodule: copies, state dicts and .to() work."""
    loss = FusedDreamerModelLoss(model)
    clone = copy.deepcopy(loss)
    assert clone.world_model is not loss.world_model
    assert set(loss.state_dict()) == {f"world_model.{k}" for k in model.state_dict()}


# ---- torchrl's LossModule behaviour --------------------------------------------------------------


def test_is_a_torchrl_loss_module_with_its_api(model):
    ours, theirs = FusedDreamerModelLoss(model), DreamerModelLoss(model)
    for loss in (ours, theirs):
        with pytest.raises(NotImplementedError):
            loss.set_vmap_randomness("different")  # no vmap caller in either
    ours.set_keys(pixels="rgb")
    ours.set_keys(pixels=None)  # None restores the default, as torchrl
    assert ours.tensor_keys.pixels == "pixels"
    assert_torchrl_loss_module_api(ours, theirs, model[1])


def test_decoder_reward_model_kl_loss_and_log_probability_as_torchrl(device, model):
    ours, theirs = FusedDreamerModelLoss(model, free_nats=0.2), DreamerModelLoss(model,
                                                                                  free_nats=0.2)
    assert ours.decoder is theirs.decoder is model[0][-1]
    assert ours.reward_model is theirs.reward_model is model[1]
    assert {n for n, _ in ours.named_children()} == {n for n, _ in theirs.named_children()}
    g = torch.Generator().manual_seed(9)
    pm, qm, x = (torch.randn(BATCH, TIME, STATE, generator=g).to(device) for _ in range(3))
    ps, qs = (torch.rand(BATCH, TIME, STATE, generator=g).to(device) + 0.2 for _ in range(2))
    for global_average in (False, True):
        for delayed_clamp in (False, True):
            for loss in (ours, theirs):
                loss.global_average, loss.delayed_clamp = global_average, delayed_clamp
            torch.testing.assert_close(ours.kl_loss(pm, ps, qm, qs),
                                       theirs.kl_loss(pm, ps, qm, qs))
    torch.testing.assert_close(ours.normal_log_probability(x, qm, qs),
                               theirs.normal_log_probability(x, qm, qs))


def test_a_world_model_without_torchrls_layout(device):
    """torchrl indexes world_model[0][-1] and world_model[1] (TypeError for other world models);
    ours accepts any world model, with decoder and reward_model None."""
    from fused_dreamer_loss.models import make_world_model

    world = make_world_model((3, 8, 8), latent_dim=4)
    with pytest.raises(TypeError):
        DreamerModelLoss(world)
    loss = FusedDreamerModelLoss(world)
    assert loss.decoder is None and loss.reward_model is None
    assert loss.in_keys == [("next", "pixels")]
    assert loss.out_keys == ["loss_model_kl", "loss_model_reco", "loss_model_reward"]
    assert "FusedDreamerModelLoss" in repr(loss)  # torchrl's repr raises (no in_keys)


def test_state_dict_names_and_strict_loading_both_ways(device, model):
    theirs = DreamerModelLoss(model)
    torch.manual_seed(5)
    ours = FusedDreamerModelLoss(world_model(device))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert_same_state(ours, theirs)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(1.0)
    again = DreamerModelLoss(copy.deepcopy(model))
    again.load_state_dict(ours.state_dict(), strict=True)
    assert_same_state(ours, again)


def test_reset_parameters_recursive_as_torchrl(model):
    """torchrl's LossModule resets the modules a loss holds in its __dict__ rather than as
    registered submodules: DreamerModelLoss holds its decoder and reward model there, so those
    16 of the 34 parameters are reset, the encoder's and the RSSM's are not. Ours: the same ones,
    to the same values."""
    after, changed = {}, {}
    for cls in (DreamerModelLoss, FusedDreamerModelLoss):
        wm = copy.deepcopy(model)
        before = {n: p.clone() for n, p in wm.named_parameters()}
        torch.manual_seed(7)
        cls(wm).reset_parameters_recursive()
        after[cls] = dict(wm.named_parameters())
        changed[cls] = {n for n, p in wm.named_parameters() if not torch.equal(p, before[n])}
    assert changed[FusedDreamerModelLoss] == changed[DreamerModelLoss]
    assert len(changed[DreamerModelLoss]) == 16 and len(after[DreamerModelLoss]) == 34
    assert all(n.startswith(("module.0.module.2.", "module.1.")) for n in changed[DreamerModelLoss])
    for name, p in after[DreamerModelLoss].items():
        assert torch.equal(after[FusedDreamerModelLoss][name], p), name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_dtypes_as_torchrl(device, model, backend):
    """Under CPU bf16 autocast torchrl's KL is bfloat16 (log and pow stay bf16 on the CPU) and the
    reconstruction and reward float32 (mse_loss runs in float32): ours has the same dtypes, the
    fused KL being its float32 value rounded once to bfloat16."""
    td = data(device, seed=11)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        theirs = run(DreamerModelLoss(model, free_nats=0.0), td, seed=12)[0]
        ours = run(FusedDreamerModelLoss(model, free_nats=0.0, backend=backend), td, seed=12)[0]
    if device.type == "cpu":
        assert theirs["loss_model_kl"].dtype == torch.bfloat16
    for name in LOSS_NAMES:
        assert ours[name].dtype == theirs[name].dtype, name
        torch.testing.assert_close(ours[name].float(), theirs[name].float(), rtol=2e-2,
                                   atol=1e-2, msg=lambda m: f"{name}: {m}")
