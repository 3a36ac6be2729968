"""The DreamerV3 reference against torchrl's functions and DreamerV3ModelLoss, against float64, and
the conventions table against an independent float64 computation written from DESIGN-V3."""

from __future__ import annotations

import doctest
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import assert_close
from tests.world_model_v3.helpers_v3 import (compare, free_bits_for, kl_values, leaves, make_v3_inputs,
                        torchrl_losses)

import fused_dreamer_loss.conventions
import fused_dreamer_loss.functional_v3
import fused_dreamer_loss.reference_v3
from fused_dreamer_loss import V3_CONVENTIONS, dreamer_v3_model_loss
from fused_dreamer_loss import reference_v3 as ref
from tests.helpers import one_thread  # noqa: F401 (autouse: this module runs on one thread)

# (batch dims, S, K) in the cases that cycle through shapes: 1-3 batch dims, K in {4, 16, 32}.
LATENT_SHAPES = [((5,), 3, 4), ((2, 3), 4, 16), ((2, 1, 3), 2, 32)]


@pytest.fixture(scope="module")
def torchrl_v3():
    """torchrl's DreamerV3 objectives module (skips where torchrl is missing)."""
    return pytest.importorskip("torchrl.objectives.dreamer_v3")


# ---- the helpers against torchrl's own functions ------------------------------------------------


def test_symlog_symexp_match_torchrl(torchrl_v3):
    x = torch.tensor([-1e6, -3.5, -1e-3, 0.0, -0.0, 2e-7, 0.7, 12.0, 1e30], dtype=torch.float64,
                     requires_grad=True)
    for ours, theirs in ((ref.symlog, torchrl_v3.symlog), (ref.symexp, torchrl_v3.symexp)):
        value = ours(x)
        torch.testing.assert_close(value, theirs(x), rtol=0, atol=0)
        torch.testing.assert_close(torch.autograd.grad(value.sum(), x)[0],
                                   torch.autograd.grad(theirs(x).sum(), x)[0], rtol=0, atol=0)
    slope = torch.autograd.grad(ref.symlog(x).sum(), x)[0]
    assert slope[3] == 1.0 and slope[4] == 1.0  # 1/(1 + |x|) at 0, not sign's 0


@pytest.mark.parametrize("num_bins", [2, 3, 4, 41, 255, 256])
def test_default_bins_equal_torchrl(torchrl_v3, num_bins):
    theirs = torchrl_v3._default_bins(num_bins)
    ours = ref.default_reward_bins(num_bins)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, theirs)
    assert torch.equal(ours, -ours.flip(0))


@pytest.mark.parametrize("unimix", [0.0, 0.01])
@pytest.mark.parametrize("clamp", ["none", "some", "all"])
@pytest.mark.parametrize("kl_mode", ["balanced", "separate"])
@pytest.mark.parametrize("latent", LATENT_SHAPES, ids=lambda s: f"B{len(s[0])}-K{s[2]}")
def test_kl_matches_torchrl_functions(torchrl_v3, kl_mode, clamp, unimix, latent):
    """KL rows: values and gradients of categorical_kl_terms / categorical_kl_balanced."""
    batch, S, K = latent
    inputs = make_v3_inputs(batch, S, K, seed=K + len(batch))
    post, prior = inputs["posterior_logits"], inputs["prior_logits"]
    free = free_bits_for(kl_values(inputs, kl_mode, unimix), clamp)
    opts = ref.V3Options(kl_mode=kl_mode, unimix=unimix, free_bits=free, lambda_kl=1.3,
                         lambda_dynamic=0.7, lambda_representation=0.2, kl_alpha=0.7)
    ours = ref.kl_losses(post, prior, opts)
    if kl_mode == "balanced":
        kl = torchrl_v3.categorical_kl_balanced(post, prior, alpha=0.7, free_bits=free)
        theirs = {"loss_model_kl": 1.3 * kl}
    else:
        dyn, rep = torchrl_v3.categorical_kl_terms(post, prior, free_nats=free, unimix=unimix)
        theirs = {"loss_model_dynamic": 1.3 * 0.7 * dyn,
                  "loss_model_representation": 1.3 * 0.2 * rep}
    compare(ours, theirs, [post, prior], torch.float32, f"{kl_mode} {clamp} u={unimix}")


@pytest.mark.parametrize("space", ["raw", "symlog"])
@pytest.mark.parametrize("bins", ["default", "user"])
def test_two_hot_matches_torchrl(torchrl_v3, space, bins):
    """Encoding (against the dense two_hot_encode) and cross-entropy, at bins, between them, out of
    range and at 0; the symlog space is torchrl's encoding of symlog(x) over symlog(bins)."""
    support = (ref.default_reward_bins(255) if bins == "default"
               else torch.tensor([-7.0, -2.0, -0.5, 0.0, 0.25, 1.0, 3.0, 10.0]))
    x = torch.cat([support[[0, 3, -1]], torch.tensor([-1e9, -3.3, -0.1, 0.0, 0.6, 2.2, 1e9]),
                   torch.randn(20, generator=torch.Generator().manual_seed(3)) * 4])
    x.requires_grad_()
    logits = torch.randn(x.numel(), support.numel(), generator=torch.Generator().manual_seed(4),
                         requires_grad=True)
    tx, tb = (x, support) if space == "raw" else (ref.symlog(x), ref.symlog(support))
    lower, w_lower, w_upper = ref.two_hot(tx, tb)
    dense = torch.zeros(x.numel(), support.numel()).scatter(-1, lower[:, None], w_lower[:, None])
    dense = dense.scatter(-1, lower[:, None] + 1, w_upper[:, None])
    torch.testing.assert_close(dense, torchrl_v3.two_hot_encode(tx, tb), rtol=1e-6, atol=1e-7)
    ours = ref.reward_rows(x[:, None], logits, support, space)
    theirs = torchrl_v3.two_hot_cross_entropy(logits, tx, tb)
    compare({"loss_model_reward": ours.mean()}, {"loss_model_reward": theirs.mean()},
            [x, logits], torch.float32, f"two-hot {space} {bins}")


def test_two_hot_weights_of_design_example():
    """DESIGN-V3: at r = 1 the raw space gives 0.617/0.383, the symlog space 0.599/0.401."""
    bins = ref.default_reward_bins(255)
    one = torch.tensor([1.0])
    for (x, b), expected in (((one, bins), (0.617, 0.383)),
                             ((ref.symlog(one), ref.symlog(bins)), (0.599, 0.401))):
        _, w_lower, w_upper = ref.two_hot(x, b)
        assert (round(float(w_lower), 3), round(float(w_upper), 3)) == expected


# ---- the whole loss against torchrl's DreamerV3ModelLoss ----------------------------------------


@pytest.mark.parametrize("clamp", ["none", "some", "all"])
@pytest.mark.parametrize("kl_mode, unimix", [("balanced", 0.0), ("balanced", 0.01),
                                             ("separate", 0.0), ("separate", 0.01)])
def test_matches_torchrl_module(torchrl_v3, kl_mode, unimix, clamp):
    """Values and gradients against DreamerV3ModelLoss, over reco_symlog × two-hot × continue ×
    global_average × 1 or 2 heads × uint8 or float targets (shapes cycling through 1-3 batch dims
    and K in {4, 16, 32}). torchrl's balanced mode takes no unimix: neither do we."""
    combos = itertools.product([True, False], [True, False], [False, True], [False, True],
                               [1, 2], [True, False])
    for n, (reco_symlog, two_hot, cont, global_average, heads, uint8) in enumerate(combos):
        batch, S, K = LATENT_SHAPES[n % len(LATENT_SHAPES)]
        inputs = make_v3_inputs(batch, S, K, [(3, 2, 2), (5,)][:heads], uint8=uint8,
                                reward_width=255 if two_hot else 1, seed=n)
        options = dict(kl_mode=kl_mode, unimix=unimix, reco_symlog=reco_symlog,
                       reward_two_hot=two_hot, global_average=global_average,
                       free_bits=free_bits_for(kl_values(inputs, kl_mode, unimix), clamp),
                       lambda_continue=0.8 if cont else 0.0, continue_target_scale=0.9,
                       lambda_reco=1.1, lambda_reward=0.9, lambda_kl=1.2, kl_alpha=0.75,
                       lambda_dynamic=0.6, lambda_representation=0.15)
        what = (f"symlog={reco_symlog} two_hot={two_hot} continue={cont} "
                f"global_average={global_average} heads={heads} uint8={uint8}")
        ours = dreamer_v3_model_loss(**inputs, **options, backend="torch")
        theirs = torchrl_losses(torchrl_v3, inputs, **options)
        compare(ours, theirs, leaves(inputs), torch.float32, what)


def test_finite_where_torchrl_is_nan(torchrl_v3):
    """unimix=0 with posterior classes whose softmax underflows in float32: torchrl's 0·log 0 is
    NaN; ours is the finite value, that of a float64 log-softmax computation, gradients included."""
    g = torch.Generator().manual_seed(5)
    post = torch.randn(2, 3, 4, 8, generator=g) * 2
    post[..., 1, 3] = -150.0
    post[0, 2, :, 0] = 120.0
    post.requires_grad_()
    prior = (torch.randn(2, 3, 4, 8, generator=g) * 2).requires_grad_()
    assert (torch.softmax(post.detach(), -1) == 0).any()
    dyn, rep = torchrl_v3.categorical_kl_terms(post, prior, free_nats=0.0, unimix=0.0)
    assert dyn.isnan() and rep.isnan()

    ours = ref.kl_losses(post, prior, ref.V3Options(kl_mode="separate", free_bits=0.0,
                                                    lambda_representation=0.3))
    p64, q64 = (t.detach().double().requires_grad_() for t in (prior, post))
    log_q, log_p = torch.log_softmax(q64, -1), torch.log_softmax(p64, -1)
    q = log_q.exp()
    expected = {
        "loss_model_dynamic": (q.detach() * (log_q.detach() - log_p)).sum((-1, -2)).mean(),
        "loss_model_representation": 0.3 * (q * (log_q - log_p.detach())).sum((-1, -2)).mean(),
    }
    assert all(torch.isfinite(v) for v in ours.values())
    compare(ours, expected, [post, prior], torch.float32, "underflow", [q64, p64])


def test_finite_where_torchrl_is_inf(torchrl_v3):
    """A prior class that underflows under a posterior that does not: torchrl's KL is inf, ours
    the true KL, 50 + log(3/4) for uniform q and prior logits (0, 0, 0, −200)."""
    post, prior = torch.zeros(1, 1, 4), torch.tensor([[[0.0, 0.0, 0.0, -200.0]]])
    dyn, _ = torchrl_v3.categorical_kl_terms(post, prior, free_nats=0.0, unimix=0.0)
    assert dyn == math.inf
    ours = ref.kl_losses(post, prior, ref.V3Options(kl_mode="separate", free_bits=0.0))
    assert math.isclose(float(ours["loss_model_dynamic"]), 50 + math.log(0.75), rel_tol=1e-6)


# ---- dtypes --------------------------------------------------------------------------------------


def _float64_twin(inputs: dict) -> dict:
    def twin(t):
        if not t.is_floating_point():
            return t
        return t.detach().double().requires_grad_(t.requires_grad)
    return {k: [twin(t) for t in v] if isinstance(v, list) else twin(v) for k, v in inputs.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64],
                         ids=str)
@pytest.mark.parametrize("kl_mode", ["balanced", "separate"])
def test_dtypes_against_float64(dtype, kl_mode):
    """Low-precision inputs are upcast: losses in float32 (float64 for float64 inputs) matching the
    float64 computation on the same values to float32 accuracy; gradients in the input's dtype."""
    inputs = make_v3_inputs((2, 3), 4, 16, [(3, 4, 4), (6,)], uint8=False, dtype=dtype, seed=8)
    options = dict(kl_mode=kl_mode, unimix=0.01, free_bits=0.3, lambda_continue=1.0,
                   reco_symlog=[False, "target"])
    ours = dreamer_v3_model_loss(**inputs, **options, backend="torch")
    twin = _float64_twin(inputs)
    expected = dreamer_v3_model_loss(**twin, **options, backend="torch")
    for key, value in ours.items():
        assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), key
    compare(ours, expected, leaves(inputs), dtype, str(dtype), leaves(twin))


def test_each_term_takes_its_own_dtype():
    """A float64 reward makes only the reward term float64."""
    inputs = make_v3_inputs(seed=9)
    inputs["true_reward"] = inputs["true_reward"].detach().double()
    losses = dreamer_v3_model_loss(**inputs, lambda_continue=1.0, backend="torch")
    dtypes = {key: value.dtype for key, value in losses.items()}
    assert dtypes == {"loss_model_kl": torch.float32, "loss_model_reco": torch.float32,
                      "loss_model_reward": torch.float64, "loss_model_continue": torch.float32}


# ---- options torchrl does not have --------------------------------------------------------------


def test_float_terminated_equals_bool():
    inputs = make_v3_inputs(seed=10)
    as_float = dict(inputs, terminated=inputs["terminated"].float())
    a = dreamer_v3_model_loss(**inputs, lambda_continue=1.0, continue_target_scale=0.7)
    b = dreamer_v3_model_loss(**as_float, lambda_continue=1.0, continue_target_scale=0.7)
    assert torch.equal(a["loss_model_continue"], b["loss_model_continue"])


@pytest.mark.parametrize("space", ["raw", "symlog"])
def test_user_reward_bins(torchrl_v3, space):
    """R = len(reward_bins) whatever num_reward_bins; a tensor and a list give the same loss."""
    support = [-20.0, -4.0, -1.0, -0.2, 0.0, 0.3, 1.5, 6.0, 30.0]
    inputs = make_v3_inputs(reward_width=len(support), seed=11)
    logits, reward = inputs["reward_pred"], inputs["true_reward"]
    bins = torch.tensor(support)
    from_tensor = dreamer_v3_model_loss(**inputs, reward_bins=bins, two_hot_space=space)
    from_list = dreamer_v3_model_loss(**inputs, reward_bins=support, two_hot_space=space)
    assert torch.equal(from_tensor["loss_model_reward"], from_list["loss_model_reward"])
    tx, tb = (reward, bins) if space == "raw" else (ref.symlog(reward), ref.symlog(bins))
    theirs = torchrl_v3.two_hot_cross_entropy(logits, tx, tb).mean()
    assert_close(from_tensor["loss_model_reward"].detach(), theirs.detach(), torch.float32,
                 "reward")


def test_pixels_scale_and_offset_apply_to_integer_targets_only():
    inputs = make_v3_inputs(head_shapes=[(3, 4, 4), (6,)], seed=12)
    inputs["pixels"][1] = inputs["pixels"][1].float().detach()
    options = dict(reco_symlog=False, pixels_scale=0.5 / 255, pixels_offset=-0.25)
    ours = dreamer_v3_model_loss(**inputs, **options)["loss_model_reco"]
    image = inputs["pixels"][0].double() * (0.5 / 255) - 0.25
    expected = sum(((target - pred.detach().double()) ** 2).flatten(2).sum(-1).mean()
                   for target, pred in zip((image, inputs["pixels"][1].double()),
                                           inputs["reco_pixels"]))
    assert_close(ours, expected, torch.float32, "reco")


# ---- the conventions table, against DESIGN-V3 §4 written out independently ---------------------

# Per convention: KL (mode, dyn or α, rep), unimix, image target, vector target, two-hot space,
# continue (on, target scale). Free nats are 1 everywhere.
DESIGN_TABLE = {
    "torchrl": (("balanced", 0.8, None), 0.0, "symlog both", "symlog both", "raw", (False, 1.0)),
    "torchrl-recipe": (("separate", 1.0, 0.1), 0.01, "symlog both", "symlog both", "raw",
                       (True, 1 - 1 / 333)),
    "dreamerv3-2024": (("separate", 1.0, 0.1), 0.01, "/255", "symlog target", "raw",
                       (True, 1 - 1 / 333)),
    "dreamerv3-2023": (("separate", 0.5, 0.1), 0.01, "/255", "symlog target", "symlog",
                       (True, 1.0)),
    "r2dreamer": (("separate", 1.0, 0.1), 0.0, "/255", "symlog target", "raw", (True, 1.0)),
    "sheeprl": (("separate", 0.5, 0.1), 0.01, "/255 - 0.5", "symlog target", "symlog",
                (True, 1.0)),
}


def design_losses(inputs: dict, row: tuple) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The convention ``row`` computed from DESIGN-V3's formulas in float64, independently of the
    package (searchsorted for the two-hot index, logsigmoid for the BCE, explicit softmax); returns
    the losses and the float64 leaves they were computed from."""
    (kl_mode, first, second), unimix, image, vector, space, (cont, scale) = row
    x = _float64_twin(inputs)

    def sym(v):
        return torch.sign(v) * torch.log1p(v.abs())

    def probs(logits):
        e = (logits - logits.amax(-1, keepdim=True)).exp()
        s = e / e.sum(-1, keepdim=True)
        if kl_mode == "balanced":
            return torch.maximum(s, torch.full_like(s, 1e-8))
        return (1 - unimix) * s + unimix / s.shape[-1]

    q, p = probs(x["posterior_logits"]), probs(x["prior_logits"])
    dyn = (q.detach() * (q.detach().log() - p.log())).sum(-1)
    rep = (q * (q.log() - p.detach().log())).sum(-1)
    def free_nats(kl):
        return torch.maximum(kl, torch.ones_like(kl)).mean()

    if kl_mode == "balanced":
        out = {"loss_model_kl": first * free_nats(dyn) + (1 - first) * free_nats(rep)}
    else:
        out = {"loss_model_dynamic": first * free_nats(dyn.sum(-1)),
               "loss_model_representation": second * free_nats(rep.sum(-1))}

    reco = 0
    for (target, pred), kind in zip(zip(x["pixels"], x["reco_pixels"]), (image, vector)):
        target = target.double()
        if kind == "symlog both":
            target, pred = sym(target), sym(pred)
        elif kind == "symlog target":
            target = sym(target)
        else:
            target = target / 255 - (0.5 if kind == "/255 - 0.5" else 0.0)
        reco = reco + ((target - pred) ** 2).flatten(2).sum(-1).mean()
    out["loss_model_reco"] = reco

    grid = torch.linspace(-20, 20, 255, dtype=torch.float64)
    bins = torch.sign(grid) * torch.expm1(grid.abs())
    r = x["true_reward"].squeeze(-1)
    if space == "symlog":
        r, bins = sym(r), sym(bins)
    r = torch.minimum(torch.maximum(r, bins[0]), bins[-1])
    lo = (torch.searchsorted(bins, r.detach(), right=True) - 1).clamp(0, 253)
    w_hi = (r - bins[lo]) / (bins[lo + 1] - bins[lo])
    log_probs = torch.log_softmax(x["reward_pred"], -1)
    picked = (1 - w_hi) * log_probs.gather(-1, lo[..., None]).squeeze(-1) \
        + w_hi * log_probs.gather(-1, lo[..., None] + 1).squeeze(-1)
    out["loss_model_reward"] = -picked.mean()

    if cont:
        logit = x["continue_pred"].squeeze(-1)
        c = (1 - x["terminated"].squeeze(-1).double()) * scale
        out["loss_model_continue"] = -(c * F.logsigmoid(logit)
                                       + (1 - c) * F.logsigmoid(-logit)).mean()
    return out, leaves(x)


@pytest.mark.parametrize("name", list(DESIGN_TABLE))
def test_conventions_match_design_table(name):
    """Each convention (an image head of uint8 targets and a vector head with the table's vector
    setting) against DESIGN-V3 §4 computed independently in float64: values and gradients."""
    assert set(V3_CONVENTIONS) == set(DESIGN_TABLE)
    row = DESIGN_TABLE[name]
    inputs = make_v3_inputs((3, 4), 4, 16, [(3, 4, 4), (7,)], seed=13)
    inputs["pixels"][1] = (inputs["pixels"][1].float() * 0.1 - 12).requires_grad_()
    vector = True if row[3] == "symlog both" else "target"
    options = dict(V3_CONVENTIONS[name], reco_symlog=[V3_CONVENTIONS[name]["reco_symlog"], vector])
    ours = dreamer_v3_model_loss(**inputs, **options)
    expected, wrt64 = design_losses(inputs, row)
    compare(ours, expected, leaves(inputs), torch.float32, name, wrt64)


def test_conventions_are_read_only():
    with pytest.raises(TypeError):
        V3_CONVENTIONS["mine"] = {}
    with pytest.raises(TypeError):
        V3_CONVENTIONS["torchrl"]["unimix"] = 0.5
    assert math.isclose(V3_CONVENTIONS["dreamerv3-2024"]["continue_target_scale"], 1 - 1 / 333)


@pytest.mark.parametrize("module", [fused_dreamer_loss.reference_v3,
                                    fused_dreamer_loss.functional_v3,
                                    fused_dreamer_loss.conventions], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
