"""FusedDreamerV3ModelLoss against torchrl's DreamerV3ModelLoss on torchrl's DreamerV3 world model.

The world model is torchrl's (DreamerV3ImageEncoder, RSSMPriorV3 with its block-GRU core,
RSSMPosteriorV3, RSSMRolloutV3, DreamerV3ImageDecoder, DreamerV3MLP heads, SymExpTwoHot), tiny
(batch 2 × 3, 8×8 images, S = K = 4, 16 reward bins) and in float64, so that the losses and every
parameter gradient compare tightly wherever torchrl computes in float64 (it computes the continue
term, ``reco_symlog=False`` heads and symlogged uint8 targets in float32: fp32 tolerances there).
"""

from __future__ import annotations

import copy
import dataclasses
import doctest
import inspect
import itertools
import os
import subprocess
import sys

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule, TensorDictSequential

import fused_dreamer_loss.models_v3
import fused_dreamer_loss.module_v3
from fused_dreamer_loss import FusedDreamerV3ModelLoss
from fused_dreamer_loss.reference_v3 import categorical_kl_terms, symexp
from tests.helpers import assert_same_state, assert_torchrl_loss_module_api
from tests.helpers import one_thread  # noqa: F401 (autouse: this module runs on one thread)

try:
    from torchrl.modules import (DreamerV3ImageDecoder, DreamerV3ImageEncoder, DreamerV3MLP,
                                 RSSMPosteriorV3, RSSMPriorV3, RSSMRolloutV3, SymExpTwoHot)
    from torchrl.objectives import DreamerV3ModelLoss
except ImportError:
    DreamerV3ModelLoss = None
needs_torchrl = pytest.mark.skipif(DreamerV3ModelLoss is None, reason="torchrl is not installed")

B, T, S, K, HIDDEN, ACTION, BINS, VECTOR = 2, 3, 4, 4, 8, 2, 16, 5
IMAGE = (3, 8, 8)
F64 = torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


BACKENDS = ["torch", "triton"]


# ---- torchrl's DreamerV3 world model -------------------------------------------------------------


def _to_unit(dtype):
    """The encoder's input: uint8 frames / 255 or float frames, in ``dtype`` (torchrl's encoder
    turns uint8 into float32, which a float64 encoder cannot take)."""
    def convert(pixels):
        return (pixels.to(dtype) / 255) if not pixels.is_floating_point() else pixels.to(dtype)
    return convert


def world_model(heads: int = 1, dtype=F64, legacy_reward=False, continue_head=True):
    """torchrl's DreamerV3 world model. Each reconstruction is also written symexp'd
    (``*_symexp``): torchrl's ``reco_symlog=True`` on it is our ``reco_symlog="target"`` on the raw
    one. ``legacy_reward``: the reward logits under ``reward`` (torchrl's deprecated layout)."""
    encoder = DreamerV3ImageEncoder(in_channels=3, depth=2, mults=(1, 2), kernel_size=3)
    embed = encoder.output_features(IMAGE)
    prior = RSSMPriorV3(action_shape=(ACTION,), hidden_dim=HIDDEN, rnn_hidden_dim=HIDDEN,
                        num_categoricals=S, num_classes=K, action_dim=ACTION,
                        recurrent_model="block_gru", num_blocks=2)
    posterior = RSSMPosteriorV3(hidden_dim=HIDDEN, num_categoricals=S, num_classes=K,
                                rnn_hidden_dim=HIDDEN, obs_embed_dim=embed, use_rms_norm=True)
    rollout = RSSMRolloutV3(
        TensorDictModule(prior, in_keys=["state", "belief", "action"],
                         out_keys=[("next", "prior_logits"), ("next", "state"),
                                   ("next", "belief")]),
        TensorDictModule(posterior, in_keys=[("next", "belief"), ("next", "encoded_latents")],
                         out_keys=[("next", "posterior_logits"), ("next", "state")]),
        reset_key="is_init")
    features = [("next", "state"), ("next", "belief")]
    width = S * K + HIDDEN
    modules = [
        TensorDictModule(_to_unit(dtype), in_keys=[("next", "pixels")],
                         out_keys=[("next", "encoder_input")]),
        TensorDictModule(encoder, in_keys=[("next", "encoder_input")],
                         out_keys=[("next", "encoded_latents")]),
        rollout,
        TensorDictModule(DreamerV3ImageDecoder(width, image_shape=IMAGE, depth=2, mults=(1, 2),
                                               kernel_size=3, num_blocks=1),
                         in_keys=features, out_keys=[("next", "reco_pixels")]),
    ]
    if heads == 2:
        modules.append(TensorDictModule(DreamerV3MLP(width, VECTOR, depth=1, num_cells=8),
                                        in_keys=features, out_keys=[("next", "reco_vector")]))
    for name in ["reco_pixels", "reco_vector"][:heads]:
        modules.append(TensorDictModule(symexp, in_keys=[("next", name)],
                                        out_keys=[("next", f"{name}_symexp")]))
    logits_key = ("next", "reward" if legacy_reward else "reward_logits")
    modules.append(TensorDictModule(DreamerV3MLP(width, BINS, depth=1, num_cells=8),
                                    in_keys=features, out_keys=[logits_key]))
    if not legacy_reward:
        modules.append(TensorDictModule(SymExpTwoHot(BINS), in_keys=[logits_key],
                                        out_keys=[("next", "reward")]))
    if continue_head:
        modules.append(TensorDictModule(DreamerV3MLP(width, 1, depth=1, num_cells=8),
                                        in_keys=features, out_keys=[("next", "continue_pred")]))
    return TensorDictSequential(*modules).to(dtype)


def data(seed=1, pixels="uint8", heads=1, dtype=F64, flags=("terminated",)):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (B, T, *IMAGE), generator=g, dtype=torch.uint8)
    nxt = {"pixels": frames if pixels == "uint8" else (frames / 255).to(dtype),
           "reward": (torch.randn(B, T, 1, generator=g) * 3).to(dtype)}
    if heads == 2:
        nxt["vector"] = (torch.randn(B, T, VECTOR, generator=g) * 2).to(dtype)
    for flag in flags:  # terminal at about one step in three
        nxt[flag] = torch.rand(B, T, 1, generator=g) < 0.35
    is_init = torch.zeros(B, T, 1, dtype=torch.bool)
    is_init[:, 0] = True
    return TensorDict({"state": torch.zeros(B, T, S * K, dtype=dtype),
                       "belief": torch.zeros(B, T, HIDDEN, dtype=dtype),
                       "action": torch.randn(B, T, ACTION, generator=g).to(dtype),
                       "is_init": is_init, "next": nxt}, batch_size=[B, T])


def run(loss_module, td, seed=3):
    """Losses and world-model parameter gradients (None where none flowed); the RSSM samples its
    latents, so the seed is set first."""
    loss_module.world_model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    losses, out = loss_module(td)
    sum(loss.double().sum() for loss in losses.values()).backward()
    grads = {n: None if p.grad is None else p.grad.clone()
             for n, p in loss_module.world_model.named_parameters()}
    return losses, out, grads


def assert_parity(theirs, ours, fp32: bool):
    """Same names, shapes, dtypes and values; the same gradient for every parameter."""
    (t_losses, t_out, t_grads), (o_losses, o_out, o_grads) = theirs, ours
    assert o_losses.batch_size == torch.Size([])
    assert list(o_losses.keys()) == list(t_losses.keys())
    rtol, atol = (2e-6, 1e-6) if fp32 else (1e-9, 1e-10)
    for name, want in t_losses.items():
        got = o_losses[name]
        assert got.shape == want.shape == torch.Size([1]) and got.dtype == want.dtype, name
        torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{name}: {m}")
    assert set(o_out.keys(True, True)) == set(t_out.keys(True, True))
    assert o_grads.keys() == t_grads.keys()
    assert sum(g is not None for g in o_grads.values()) > 0
    for name, want in t_grads.items():
        got = o_grads[name]
        assert (got is None) == (want is None), name
        if want is not None:
            # Parameter gradients are sums over the batch in which terms cancel: the loss's own
            # rounding shows up relative to the gradient's scale.
            scale = float(want.abs().max()) or 1.0
            torch.testing.assert_close(got, want, rtol=rtol * 10, atol=atol * 10 * scale,
                                       msg=lambda m: f"grad {name}: {m}")


# ---- the options grid ----------------------------------------------------------------------------

KL = {"balanced": dict(kl_mode="balanced", kl_alpha=0.75),
      "separate": dict(kl_mode="separate", unimix=0.0, lambda_dynamic=0.9,
                       lambda_representation=0.2),
      "separate-unimix": dict(kl_mode="separate", unimix=0.01, lambda_dynamic=0.9,
                              lambda_representation=0.2)}
FACTORS = {
    "kl": list(KL),
    "free_bits": [0.0, "median"],
    "reco_symlog": [True, False, "target"],
    "two_hot": [True, False],
    "continue": [False, True],
    "global_average": [False, True],
    "heads": [1, 2],
    "pixels": ["uint8", "float"],
}
#: Two heads take a list with different transforms per head.
TWO_HEADS = {True: [True, False], False: [False, "target"], "target": ["target", True]}
FULL = [dict(zip(FACTORS, values)) for values in itertools.product(*FACTORS.values())]


def covering_set(cases, factors):
    """A greedy pairwise covering subset of ``cases``: every pair of levels of any two factors
    appears in one case at least."""
    names = list(factors)
    pairs = lambda c: {(a, c[a], b, c[b]) for a, b in itertools.combinations(names, 2)}  # noqa
    missing = set().union(*(pairs(c) for c in cases))
    chosen = []
    while missing:
        best = max(cases, key=lambda c: len(pairs(c) & missing))
        chosen.append(best)
        missing -= pairs(best)
    return chosen


PAIRWISE = covering_set(FULL, FACTORS)


def case_id(case):
    """E.g. ``separate-unimix-fb_median-symlog_target-two_hot-continue-ga-heads2-uint8``."""
    flags = [case["kl"], f"fb_{case['free_bits']}", f"symlog_{case['reco_symlog']}",
             "two_hot" if case["two_hot"] else "scalar_reward",
             "continue" if case["continue"] else "no_continue",
             "ga" if case["global_average"] else "rows", f"heads{case['heads']}", case["pixels"]]
    return "-".join(flags)


_MODELS, _MEDIANS = {}, {}


def cached_model(heads):
    if heads not in _MODELS:
        torch.manual_seed(0)
        _MODELS[heads] = world_model(heads)
    return _MODELS[heads]


def kl_median(model, td, case):
    """A free_bits that clamps about half of what the clamp compares (per categorical in balanced
    mode, per row sum in separate mode), half-way between two of those values."""
    key = (case["kl"], case["heads"], case["pixels"])
    if key not in _MEDIANS:
        with torch.no_grad():
            torch.manual_seed(3)
            out = model(td.copy().rename_key_(("next", "reward"), ("next", "true_reward")))
        kl = KL[case["kl"]]
        values, _ = categorical_kl_terms(out["next", "posterior_logits"],
                                         out["next", "prior_logits"], kl["kl_mode"],
                                         kl.get("unimix", 0.0))
        values = (values if kl["kl_mode"] == "balanced" else values.sum(-1)).flatten().sort()[0]
        mid = len(values) // 2
        _MEDIANS[key] = float(values[mid - 1] + values[mid]) / 2
    return _MEDIANS[key]


def losses_for(case):
    """(torchrl's loss, ours) for ``case``, on the cached world model, and the data."""
    model = cached_model(case["heads"])
    td = data(pixels=case["pixels"], heads=case["heads"])
    symlog = case["reco_symlog"] if case["heads"] == 1 else TWO_HEADS[case["reco_symlog"]]
    entries = symlog if isinstance(symlog, list) else [symlog]
    reco_keys = ["reco_pixels", "reco_vector"][:case["heads"]]
    free_bits = kl_median(model, td, case) if case["free_bits"] == "median" else 0.0
    options = dict(
        lambda_kl=0.7, lambda_reco=1.3, lambda_reward=0.6,
        lambda_continue=0.8 if case["continue"] else 0.0,
        continue_target_scale=1 - 1 / 333 if case["kl"] != "balanced" else 1.0,
        free_bits=free_bits, reward_two_hot=case["two_hot"], num_reward_bins=BINS,
        reco_loss="l1" if case["global_average"] == (case["pixels"] == "float") else "l2",
        global_average=case["global_average"], **KL[case["kl"]])
    # torchrl has no "target": its symlog of the symexp'd prediction is the same loss
    theirs = DreamerV3ModelLoss(model, reco_symlog=(
        [e is not False for e in entries] if case["heads"] == 2 else entries[0] is not False),
        **options)
    ours = FusedDreamerV3ModelLoss(model, reco_symlog=symlog, **options)
    pixels_keys = ["pixels", "vector"][:case["heads"]]
    their_reco = [f"{k}_symexp" if e == "target" else k for k, e in zip(reco_keys, entries)]
    if case["heads"] == 2:
        theirs.set_keys(pixels=pixels_keys, reco_pixels=their_reco)
        ours.set_keys(pixels=pixels_keys, reco_pixels=reco_keys)
    else:
        theirs.set_keys(reco_pixels=their_reco[0])
    # torchrl computes these in float32: its continue term, heads without symlog, uint8 symlog
    fp32 = case["continue"] or case["pixels"] == "uint8" or False in entries
    return theirs, ours, td, fp32


@needs_torchrl
@pytest.mark.parametrize("case", FULL, ids=case_id)
def test_parity_with_torchrl_torch_backend(case):
    theirs, ours, td, fp32 = losses_for(case)
    ours.backend = "torch"
    assert_parity(run(theirs, td), run(ours, td), fp32)


@needs_torchrl
@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("case", PAIRWISE, ids=case_id)
def test_parity_with_torchrl_triton_backend(case, backend):
    """A pairwise covering subset of the grid (every two options' values meet once at least):
    Triton's interpreter is slow."""
    theirs, ours, td, _ = losses_for(case)
    ours.backend = backend
    # The kernels accumulate in float32: fp32 tolerances whatever the dtype.
    assert_parity(run(theirs, td), run(ours, td), fp32=True)


def test_the_covering_set_covers_every_pair():
    names = list(FACTORS)
    for a, b in itertools.combinations(names, 2):
        for va, vb in itertools.product(FACTORS[a], FACTORS[b]):
            assert any(c[a] == va and c[b] == vb for c in PAIRWISE), (a, va, b, vb)
    assert len(PAIRWISE) < len(FULL) // 20


# ---- torchrl's module behaviour ------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return cached_model(1)


@needs_torchrl
def test_is_a_torchrl_loss_module_with_its_api(model):
    ours, theirs = FusedDreamerV3ModelLoss(model), DreamerV3ModelLoss(model)
    assert ours.set_keys(pixels="pixels") is None
    assert_torchrl_loss_module_api(ours, theirs, model[-1])


@needs_torchrl
def test_defaults_and_attributes_match_torchrl(model):
    ours, theirs = FusedDreamerV3ModelLoss(model), DreamerV3ModelLoss(model)
    their_params = inspect.signature(DreamerV3ModelLoss.__init__).parameters
    our_params = inspect.signature(FusedDreamerV3ModelLoss.__init__).parameters
    for name, param in their_params.items():
        assert name in our_params, name
        assert our_params[name].default == param.default, name
        assert our_params[name].kind == param.kind, name
        if name not in ("self", "world_model"):
            assert getattr(ours, name) == getattr(theirs, name), name
    extras = set(our_params) - set(their_params)
    assert extras == {"reward_bins", "two_hot_space", "pixels_scale", "pixels_offset", "backend"}
    assert dataclasses.asdict(ours.tensor_keys) == dataclasses.asdict(theirs.tensor_keys)
    assert dataclasses.asdict(ours.default_keys()) == dataclasses.asdict(theirs.default_keys())
    assert torch.equal(ours.reward_bins, theirs.reward_bins)
    assert ours.reward_bins.dtype == theirs.reward_bins.dtype
    assert ours.backend == "auto" and ours.world_model is theirs.world_model


@needs_torchrl
def test_state_dict_names_and_strict_loading_both_ways(model):
    theirs = DreamerV3ModelLoss(model, num_reward_bins=BINS)
    torch.manual_seed(5)
    ours = FusedDreamerV3ModelLoss(world_model(1), num_reward_bins=BINS)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert "reward_bins" in ours.state_dict()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert_same_state(ours, theirs)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(1.0)
        ours.reward_bins.mul_(2)
    again = DreamerV3ModelLoss(copy.deepcopy(model), num_reward_bins=BINS)
    again.load_state_dict(ours.state_dict(), strict=True)
    assert_same_state(ours, again)


@needs_torchrl
def test_reset_parameters_recursive_as_torchrl(model):
    """torchrl's LossModule resets the modules a loss keeps outside its registered submodules;
    DreamerV3ModelLoss keeps none, so nothing changes, for either."""
    changed = {}
    for cls in (DreamerV3ModelLoss, FusedDreamerV3ModelLoss):
        wm = copy.deepcopy(model)
        before = {n: p.clone() for n, p in wm.named_parameters()}
        torch.manual_seed(7)
        cls(wm).reset_parameters_recursive()
        changed[cls] = {n for n, p in wm.named_parameters() if not torch.equal(p, before[n])}
    assert changed[FusedDreamerV3ModelLoss] == changed[DreamerV3ModelLoss] == set()


@needs_torchrl
def test_from_torchrl(model):
    theirs = DreamerV3ModelLoss(
        model, lambda_kl=0.3, lambda_continue=0.5, kl_mode="separate", unimix=0.01,
        continue_target_scale=0.9, free_bits=0.0, reco_loss="l1", reco_symlog=False,
        num_reward_bins=BINS, global_average=True, detach_output=False)
    theirs.set_keys(terminated="done")
    with torch.no_grad():
        theirs.reward_bins.mul_(0.5)  # a support of its own, in the buffer
    ours = FusedDreamerV3ModelLoss.from_torchrl(theirs, backend="torch")
    assert ours.world_model is theirs.world_model and ours.backend == "torch"
    for name in inspect.signature(DreamerV3ModelLoss.__init__).parameters:
        if name not in ("self", "world_model"):
            assert getattr(ours, name) == getattr(theirs, name), name
    assert torch.equal(ours.reward_bins, theirs.reward_bins)
    assert dataclasses.asdict(ours.tensor_keys) == dataclasses.asdict(theirs.tensor_keys)
    td = data(flags=("done",))
    assert_parity(run(theirs, td), run(ours, td), fp32=True)


@needs_torchrl
def test_set_keys(model):
    ours, theirs = FusedDreamerV3ModelLoss(model), DreamerV3ModelLoss(model)
    for loss in (ours, theirs):
        assert loss.set_keys(pixels=["a", ("b", "c")], reward=("r", "x")) is None
    assert dataclasses.asdict(ours.tensor_keys) == dataclasses.asdict(theirs.tensor_keys)
    for loss in (ours, theirs):
        loss.set_keys(pixels=None)  # back to the default
    assert ours.tensor_keys.pixels == theirs.tensor_keys.pixels == "pixels"
    with pytest.raises(ValueError, match="'pixel' is not an accepted tensordict key"):
        ours.set_keys(pixel="rgb")
    with pytest.raises(TypeError, match=r"set_keys\(reward=\.\.\.\)"):
        ours.set_keys(reward=["a", "b"])  # lists only for the reconstruction heads
    with pytest.raises(TypeError, match=r"set_keys\(pixels=\.\.\.\)"):
        ours.set_keys(pixels=[])


@needs_torchrl
def test_reward_key_is_renamed_and_the_input_is_left_alone(model):
    td = data()
    td["next", "env", "r"] = td["next"].pop("reward")
    before = {k: v.clone() for k, v in td.items(True, True)}
    results = []
    for cls in (DreamerV3ModelLoss, FusedDreamerV3ModelLoss):
        loss = cls(model, num_reward_bins=BINS)
        loss.set_keys(reward=("env", "r"), true_reward="target_reward")
        losses, out = run(loss, td)[:2]
        assert torch.equal(out["next", "target_reward"], td["next", "env", "r"])
        assert ("next", "env", "r") not in out.keys(True, True)
        results.append(losses)
    assert set(td.keys(True, True)) == set(before)
    assert all(torch.equal(td[k], v) for k, v in before.items())
    for name in results[0].keys():
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-6, atol=1e-7)


@needs_torchrl
def test_legacy_reward_logits_fallback_warns_as_torchrl():
    torch.manual_seed(0)
    model = world_model(1, legacy_reward=True)
    td = data(pixels="float")
    results = []
    for cls in (DreamerV3ModelLoss, FusedDreamerV3ModelLoss):
        with pytest.warns(DeprecationWarning, match="reward"):
            results.append(run(cls(model, num_reward_bins=BINS, free_bits=0.0), td))
    assert_parity(*results, fp32=False)


@needs_torchrl
@pytest.mark.parametrize("flags, continue_head, computed", [
    (("terminated",), True, True),
    (("done",), True, True),           # torchrl reads done when terminated is missing
    (("terminated", "done"), True, True),
    ((), True, False),                 # no flag: torchrl skips the term silently
    (("terminated",), False, False),   # no continue_pred: skipped too
])
def test_continue_term_computed_or_skipped_as_torchrl(flags, continue_head, computed):
    torch.manual_seed(0)
    model = world_model(1, continue_head=continue_head)
    td = data(pixels="float", flags=flags)
    if len(flags) == 2:  # different flags: the terminated one must win
        td["next", "done"] = ~td["next", "terminated"]
    theirs = run(DreamerV3ModelLoss(model, lambda_continue=1.0, num_reward_bins=BINS), td)
    ours = run(FusedDreamerV3ModelLoss(model, lambda_continue=1.0, num_reward_bins=BINS), td)
    assert ("loss_model_continue" in ours[0].keys()) is computed
    assert_parity(theirs, ours, fp32=True)


@needs_torchrl
def test_continue_inputs_without_their_trailing_dim(model):
    td = data(pixels="float")
    td["next", "terminated"] = td["next", "terminated"].squeeze(-1)
    theirs = run(DreamerV3ModelLoss(model, lambda_continue=1.0, num_reward_bins=BINS), td)
    ours = run(FusedDreamerV3ModelLoss(model, lambda_continue=1.0, num_reward_bins=BINS), td)
    assert "loss_model_continue" in ours[0].keys()
    assert_parity(theirs, ours, fp32=True)


@needs_torchrl
@pytest.mark.parametrize("detach_output", [True, False])
def test_detach_output(model, detach_output):
    td = data(pixels="float")
    outs = [cls(model, num_reward_bins=BINS, detach_output=detach_output)(td)[1]
            for cls in (DreamerV3ModelLoss, FusedDreamerV3ModelLoss)]
    for out in outs:
        assert out["next", "posterior_logits"].requires_grad is (not detach_output)
    assert set(outs[0].keys(True, True)) == set(outs[1].keys(True, True))


@needs_torchrl
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_mode", ["balanced", "separate"])
@pytest.mark.parametrize("reco_symlog", [True, False])
def test_autocast_dtypes_as_torchrl(backend, kl_mode, reco_symlog):
    """Under CPU bf16 autocast torchrl's KL terms are bfloat16 (softmax and log stay bf16 on the
    CPU), the others float32: ours has the same dtypes, and values within bf16 rounding."""
    torch.manual_seed(0)
    model = world_model(2, dtype=torch.float32)
    td = data(pixels="uint8", heads=2, dtype=torch.float32)
    options = dict(kl_mode=kl_mode, free_bits=0.0, lambda_continue=1.0, num_reward_bins=BINS,
                   reco_symlog=reco_symlog)
    theirs, ours = DreamerV3ModelLoss(model, **options), FusedDreamerV3ModelLoss(
        model, backend=backend, **options)
    for loss in (theirs, ours):
        loss.set_keys(pixels=["pixels", "vector"], reco_pixels=["reco_pixels", "reco_vector"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t_losses, o_losses = run(theirs, td)[0], run(ours, td)[0]
    assert list(o_losses.keys()) == list(t_losses.keys())
    kl_names = {"loss_model_kl", "loss_model_dynamic", "loss_model_representation"}
    for name, want in t_losses.items():
        assert want.dtype == (torch.bfloat16 if name in kl_names else torch.float32), name
        assert o_losses[name].dtype == want.dtype, name
        torch.testing.assert_close(o_losses[name].float(), want.float(), rtol=3e-2, atol=1e-2,
                                   msg=lambda m: f"{name}: {m}")


@needs_torchrl
def test_where_torchrl_is_nan_ours_is_finite():
    """``unimix=0``, separate mode, a class whose softmax underflows: torchrl's KL is 0·log 0 =
    NaN; ours is the right, finite value (as documented)."""
    logits = torch.zeros(B, T, S, K)
    logits[..., 0] = -200.0  # exp(-200) underflows in float32

    class Stub(torch.nn.Module):
        def forward(self, pixels):
            reco = pixels + 0.1
            return logits, logits.flip(-1), reco, torch.zeros(B, T, BINS)

    stub = TensorDictModule(Stub(), in_keys=[("next", "pixels")],
                            out_keys=[("next", k) for k in ("posterior_logits", "prior_logits",
                                                             "reco_pixels", "reward_logits")])
    td = data(pixels="float", dtype=torch.float32)
    options = dict(kl_mode="separate", unimix=0.0, free_bits=0.0, num_reward_bins=BINS)
    theirs = DreamerV3ModelLoss(stub, **options)(td)[0]
    ours = FusedDreamerV3ModelLoss(stub, backend="torch", **options)(td)[0]
    assert torch.isnan(theirs["loss_model_dynamic"]).all()
    assert torch.isfinite(ours["loss_model_dynamic"]).all()


# ---- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value, error", [
    ("kl_mode", "both", ValueError), ("reco_loss", "smooth_l1", ValueError),
    ("reco_symlog", "prediction", ValueError), ("unimix", 1.0, ValueError),
    ("continue_target_scale", 0.0, ValueError), ("free_bits", "1", TypeError),
    ("backend", "cuda", ValueError), ("detach_output", 1, TypeError),
    ("two_hot_space", "log", ValueError), ("reward_bins", [3.0, 1.0], ValueError),
])
def test_bad_options_fail_at_construction(option, value, error):
    world = TensorDictModule(torch.nn.Identity(), in_keys=["x"], out_keys=["y"])
    with pytest.raises(error, match=option):
        FusedDreamerV3ModelLoss(world, **{option: value})


def test_reward_bins_of_your_own():
    world = TensorDictModule(torch.nn.Identity(), in_keys=["x"], out_keys=["y"])
    loss = FusedDreamerV3ModelLoss(world, reward_bins=[-1.0, 0.0, 2.0])
    assert loss.num_reward_bins == 3 and loss.reward_bins.tolist() == [-1.0, 0.0, 2.0]
    with pytest.raises(ValueError, match="num_reward_bins=16 but reward_bins holds 3"):
        FusedDreamerV3ModelLoss(world, reward_bins=[-1.0, 0.0, 2.0], num_reward_bins=16)


@needs_torchrl
def test_errors_name_the_key(model):
    td = data(pixels="float")
    loss = FusedDreamerV3ModelLoss(model, num_reward_bins=BINS)
    loss.set_keys(pixels=["pixels", "pixels"])
    with pytest.raises(ValueError, match="pixels lists 2 keys, tensor_keys.reco_pixels 1"):
        loss(td)
    loss.set_keys(pixels="pixels", prior_logits="prior")
    with pytest.raises(KeyError, match=r"\('next', 'prior'\).*world model's output"):
        loss(td)
    del td["next", "reward"]
    with pytest.raises(KeyError, match=r"\('next', 'reward'\).*input tensordict"):
        loss(td)
    wide = FusedDreamerV3ModelLoss(model)  # 255 bins for a 16-logit head
    with pytest.raises(ValueError, match="logits over 255 bins"):
        wide(data(pixels="float"))


# ---- without torchrl, and the docstrings ---------------------------------------------------------

NO_TORCHRL = r"""
import sys
class HideTorchrl:
    def find_spec(self, name, path=None, target=None):
        if name == "torchrl" or name.startswith("torchrl."):
            raise ImportError("torchrl is hidden for this test")
sys.meta_path.insert(0, HideTorchrl())
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule, TensorDictModuleBase
import fused_dreamer_loss
from fused_dreamer_loss import (FusedDreamerModelLoss, FusedDreamerV3ModelLoss,
                                dreamer_v3_model_loss)
from fused_dreamer_loss.core import torchrl_module as module
from fused_dreamer_loss.models import make_world_model
from fused_dreamer_loss.models_v3 import make_world_model_v3
assert "torchrl" not in sys.modules and not module.HAS_TORCHRL
for cls in (FusedDreamerModelLoss, FusedDreamerV3ModelLoss):
    assert module.LossModuleBase is TensorDictModuleBase and issubclass(cls, TensorDictModuleBase)
    assert all(base.__module__.split(".")[0] != "torchrl" for base in cls.__mro__)
losses = dreamer_v3_model_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4),
                               torch.rand(2, 3, 5), torch.rand(2, 3, 5), torch.randn(2, 3, 1),
                               torch.randn(2, 3, 255), backend="torch")
assert sorted(losses) == ["loss_model_kl", "loss_model_reco", "loss_model_reward"]
v3 = FusedDreamerV3ModelLoss(make_world_model_v3((3, 8, 8), num_categoricals=4, num_classes=4,
                                                 num_reward_bins=16),
                             num_reward_bins=16, lambda_continue=1.0, backend="torch")
assert v3.set_keys(terminated="done") is None
td = TensorDict({"next": {"pixels": torch.randint(0, 256, (2, 3, 3, 8, 8), dtype=torch.uint8),
                          "reward": torch.rand(2, 3, 1),
                          "done": torch.zeros(2, 3, 1, dtype=torch.bool)}}, [2, 3])
out, _ = v3(td)
sum(out.values()).sum().backward()
assert "loss_model_continue" in out.keys()
v1 = FusedDreamerModelLoss(make_world_model((3, 8, 8), latent_dim=4), backend="torch")
out, _ = v1(TensorDict({"next": {"pixels": torch.rand(2, 3, 3, 8, 8),
                                 "reward": torch.randn(2, 3, 1)}}, [2, 3]))
sum(out.values()).sum().backward()
print("ok without torchrl")
"""


def test_package_works_without_torchrl():
    """torchrl hidden (a meta path finder raising ImportError): the package imports, both loss
    modules are tensordict modules and compute, the functional API works."""
    result = subprocess.run([sys.executable, "-c", NO_TORCHRL], capture_output=True, text=True,
                            timeout=120, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok without torchrl" in result.stdout


@pytest.mark.parametrize("module", [fused_dreamer_loss.module_v3, fused_dreamer_loss.models_v3],
                         ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
