"""Bad input to the DreamerV3 loss gets a clear Python exception naming the argument; inputs are
never modified; the backends dispatch as documented."""

from __future__ import annotations

import pytest
import torch
from tests.world_model_v3.helpers_v3 import make_v3_inputs

from fused_dreamer_loss import dreamer_v3_model_loss, functional_v3, reference_v3
from fused_dreamer_loss.world_model_v3.validation import V3Options, validate_v3_inputs


def call(inputs: dict, **options):
    return dreamer_v3_model_loss(**inputs, backend="torch", **options)


# ---- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value, match", [
    ("lambda_kl", float("nan"), "lambda_kl must be finite"),
    ("lambda_continue", float("inf"), "lambda_continue must be finite"),
    ("pixels_offset", -float("inf"), "pixels_offset must be finite"),
    ("kl_mode", "mixed", r"kl_mode must be one of \('balanced', 'separate'\), got 'mixed'"),
    ("reco_loss", "smooth_l1", r"reco_loss must be one of \('l2', 'l1'\)"),
    ("two_hot_space", "log", r"two_hot_space must be one of \('raw', 'symlog'\)"),
    ("reco_symlog", "both", r"reco_symlog must be one of \(True, False, 'target'\).*'both'"),
    ("reco_symlog", [True, "none"], r"reco_symlog must be one of .*got 'none'"),
    ("reco_symlog", [], "reco_symlog must not be an empty list"),
    ("unimix", 1.0, r"unimix must be in \[0, 1\)"),
    ("unimix", -0.01, r"unimix must be in \[0, 1\)"),
    ("kl_alpha", 1.5, r"kl_alpha must be in \[0, 1\]"),
    ("continue_target_scale", 0.0, r"continue_target_scale must be in \(0, 1\]"),
    ("continue_target_scale", 1.01, r"continue_target_scale must be in \(0, 1\]"),
    ("free_bits", -1.0, "free_bits must be non-negative"),
    ("num_reward_bins", 1, "num_reward_bins must be at least 2"),
    ("reward_bins", [0.0, 2.0, 1.0], r"reward_bins must be finite and strictly ascending, got \[0"),
    ("reward_bins", torch.linspace(1, -1, 255), r"strictly ascending \(255 values\)"),
    ("reward_bins", torch.tensor([0.0, 1.0, 1.0]), "reward_bins must be finite and strictly"),
    ("reward_bins", [0.0, float("nan"), 1.0], "reward_bins must be finite and strictly"),
    ("reward_bins", torch.ones(2, 3), "reward_bins must be 1-D with at least 2 values"),
    ("reward_bins", [1.0], "reward_bins must be 1-D with at least 2 values"),
])
def test_bad_option_values(option, value, match):
    with pytest.raises(ValueError, match=match):
        V3Options(**{option: value})


@pytest.mark.parametrize("option, value", [
    ("lambda_reco", "1"), ("free_bits", torch.tensor(1.0)), ("unimix", True),
    ("reward_two_hot", 1), ("global_average", None), ("reco_symlog", 1),
    ("reco_symlog", [True, None]), ("num_reward_bins", 255.0), ("num_reward_bins", True),
    ("reward_bins", "0 1 2"), ("reward_bins", torch.tensor([False, True])),
    ("reward_bins", [0.0, "1"]),
])
def test_bad_option_types(option, value):
    with pytest.raises(TypeError, match=option):
        V3Options(**{option: value})


def test_reward_bins_need_two_hot():
    with pytest.raises(ValueError, match="reward_bins is used only with reward_two_hot=True"):
        V3Options(reward_two_hot=False, reward_bins=[0.0, 1.0])


def test_device_bins_are_not_read():
    """Reading bins on a device would synchronise: their order is not checked there."""
    opts = V3Options(reward_bins=torch.tensor([3.0, 2.0, 1.0], device="meta"))
    assert opts.reward_width == 3


def test_options_are_normalised():
    opts = V3Options(lambda_kl=2, reco_symlog=[True, "target"], reward_bins=[-1, 0, 1])
    assert opts.lambda_kl == 2.0 and isinstance(opts.lambda_kl, float)
    assert opts.reco_symlog == (True, "target")
    assert opts.reward_bins.dtype == torch.float64 and opts.reward_width == 3


# ---- tensors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, shape, match", [
    ("prior_logits", (2, 3, 5, 4), r"prior_logits has shape \(2, 3, 5, 4\) but posterior_logits"),
    ("prior_logits", (2, 3, 4, 6), "prior_logits has shape"),
    ("posterior_logits", (4, 4), r"posterior_logits must have shape \[\*B, S, K\]"),
    ("true_reward", (2, 3), r"true_reward must have shape \[\*B, 1\]"),
    ("true_reward", (3, 2, 1), r"true_reward must have shape \[\*B, 1\] = \(2, 3, 1\)"),
    ("reward_pred", (2, 3, 254), r"reward_pred must have shape \[\*B, R\] \(R = 255 reward bins\)"),
    ("reco_pixels", (2, 3, 3, 4, 5), r"reco_pixels has shape \(2, 3, 3, 4, 5\) but pixels"),
    ("pixels", (3, 2, 3, 4, 4), r"pixels must have shape \[\*B, \*I\].*B=\(2, 3\)"),
    ("pixels", (2, 3), "at least one event dim"),
    ("continue_pred", (2, 3), r"continue_pred must have shape \[\*B, 1\]"),
    ("terminated", (2, 3, 2), r"terminated must have shape \[\*B, 1\]"),
])
def test_bad_shapes(name, shape, match):
    inputs = make_v3_inputs()
    dtype = inputs[name].dtype
    inputs[name] = (torch.rand(shape) < 0.5) if dtype == torch.bool else torch.rand(shape)
    if name == "pixels" and len(shape) == 2:
        inputs["reco_pixels"] = torch.rand(shape)
    with pytest.raises(ValueError, match=match):
        call(inputs, lambda_continue=1.0)


def test_scalar_reward_must_be_one_wide():
    with pytest.raises(ValueError, match=r"reward_pred must have shape \[\*B, 1\]"):
        call(make_v3_inputs(reward_width=255), reward_two_hot=False)


def test_reward_width_follows_user_bins():
    inputs = make_v3_inputs(reward_width=255)
    with pytest.raises(ValueError, match=r"reward_pred.*\(R = 5 reward bins\)"):
        call(inputs, reward_bins=[-2.0, -1.0, 0.0, 1.0, 2.0])


def test_second_head_shape_named_by_index():
    inputs = make_v3_inputs(head_shapes=[(3, 4, 4), (6,)])
    inputs["reco_pixels"][1] = torch.rand(2, 3, 7)
    with pytest.raises(ValueError, match=r"reco_pixels\[1\] has shape \(2, 3, 7\)"):
        call(inputs)


@pytest.mark.parametrize("heads, match", [
    ((1, 2), "pixels holds 1 heads but reco_pixels holds 2"),
    ((2, 1), "pixels holds 2 heads but reco_pixels holds 1"),
])
def test_unequal_head_counts(heads, match):
    inputs = make_v3_inputs(head_shapes=[(3, 4, 4), (6,)])
    inputs["pixels"] = inputs["pixels"][:heads[0]]
    inputs["reco_pixels"] = inputs["reco_pixels"][:heads[1]]
    with pytest.raises(ValueError, match=match):
        call(inputs)


def test_reco_symlog_list_per_head():
    with pytest.raises(ValueError, match="reco_symlog lists 3 entries for 2 reconstruction heads"):
        call(make_v3_inputs(head_shapes=[(3, 4, 4), (6,)]), reco_symlog=[True, False, True])


def test_no_heads():
    inputs = make_v3_inputs()
    inputs["pixels"], inputs["reco_pixels"] = [], []
    with pytest.raises(ValueError, match="pixels must hold at least one reconstruction head"):
        call(inputs)


@pytest.mark.parametrize("batch, S, K, match", [
    ((0, 3), 4, 4, "the batch is empty"),
    ((2, 3), 0, 4, r"the latent is empty.*S = 0"),
    ((2, 3), 4, 0, r"the latent is empty.*K = 0"),
])
def test_empty(batch, S, K, match):
    with pytest.raises(ValueError, match=match):
        call(make_v3_inputs(batch, S, K))


def test_empty_head():
    inputs = make_v3_inputs(head_shapes=[(3, 0, 4)])
    with pytest.raises(ValueError, match="the head is empty: pixels"):
        call(inputs)


@pytest.mark.parametrize("name, dtype", [
    ("posterior_logits", torch.int64), ("prior_logits", torch.bool),
    ("reco_pixels", torch.uint8), ("pixels", torch.bool), ("pixels", torch.complex64),
    ("true_reward", torch.int32), ("reward_pred", torch.float8_e4m3fn),
    ("continue_pred", torch.int64), ("terminated", torch.int64),
], ids=str)
def test_bad_dtypes(name, dtype):
    inputs = make_v3_inputs()
    inputs[name] = torch.ones(inputs[name].shape).to(dtype)
    with pytest.raises(TypeError, match=f"{name} has dtype {dtype}"):
        call(inputs, lambda_continue=1.0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.float16], ids=str)
def test_integer_and_float_targets_accepted(dtype):
    inputs = make_v3_inputs()
    inputs["pixels"] = inputs["pixels"].to(dtype)
    assert torch.isfinite(call(inputs, reco_symlog=False)["loss_model_reco"])


@pytest.mark.parametrize("name, value, match", [
    ("true_reward", [[1.0]], "true_reward must be a torch.Tensor"),
    ("pixels", "image", "pixels must be a torch.Tensor or a list of them"),
    ("reco_pixels", [None], "reco_pixels must be a torch.Tensor, got NoneType"),
])
def test_not_a_tensor(name, value, match):
    inputs = make_v3_inputs()
    inputs[name] = value
    with pytest.raises(TypeError, match=match):
        call(inputs)


@pytest.mark.parametrize("missing", ["continue_pred", "terminated"])
def test_continue_inputs_required_when_on(missing):
    inputs = make_v3_inputs()
    inputs[missing] = None
    with pytest.raises(ValueError, match=f"lambda_continue > 0 .* needs {missing}"):
        call(inputs, lambda_continue=1.0)
    assert "loss_model_continue" not in call(inputs)


def test_different_devices():
    inputs = make_v3_inputs()
    inputs["reward_pred"] = inputs["reward_pred"].detach().to("meta")
    with pytest.raises(ValueError, match="one device.*reward_pred on meta"):
        call(inputs)


def test_bins_on_another_device():
    with pytest.raises(ValueError, match="reward_bins must be on the inputs' device"):
        call(make_v3_inputs(reward_width=3),
             reward_bins=torch.tensor([-1.0, 0.0, 1.0], device="meta"))


@pytest.mark.parametrize("option", ["lambda_reco", "free_bits", "pixels_scale"])
def test_option_must_fit_the_term_dtype(option):
    with pytest.raises(ValueError, match=f"{option}=1e\\+39 does not fit in torch.float32"):
        call(make_v3_inputs(), **{option: 1e39})
    inputs = make_v3_inputs(dtype=torch.float64)
    call(inputs, **{option: 1e39})


def test_validation_returns_the_shape_summary():
    inputs = make_v3_inputs((2, 1, 3), 5, 7, [(3, 4, 4), (6,)], reward_width=9)
    opts = V3Options(reward_bins=torch.linspace(-1, 1, 9), reco_symlog=[False, "target"],
                     lambda_continue=1.0)
    shapes = validate_v3_inputs(*inputs.values(), opts)
    assert (shapes.batch_shape, shapes.rows, shapes.num_categoricals, shapes.num_classes,
            shapes.reward_width, shapes.heads) == ((2, 1, 3), 6, 5, 7, 9, 2)
    assert shapes.head_numels == (6 * 48, 6 * 6)
    assert shapes.head_symlog == ("none", "target")
    assert (shapes.kl_dtype, shapes.reco_dtype, shapes.reward_dtype, shapes.continue_dtype) == (
        torch.float32,) * 4


# ---- no side effects, no host sync ---------------------------------------------------------------


def test_inputs_never_modified():
    inputs = make_v3_inputs(head_shapes=[(3, 4, 4), (6,)])
    bins = torch.linspace(-3, 3, 255)
    inputs["true_reward"] = inputs["true_reward"].detach() * 100  # clamped to the bins inside
    heads = (list(inputs["pixels"]), list(inputs["reco_pixels"]))
    before = {k: [t.clone() for t in v] if isinstance(v, list) else v.clone()
              for k, v in inputs.items()}
    bins_before = bins.clone()
    losses = call(inputs, kl_mode="separate", unimix=0.01, lambda_continue=1.0, reward_bins=bins,
                  two_hot_space="symlog", reco_symlog=[True, "target"])
    sum(losses.values()).backward()
    for key, value in inputs.items():
        for a, b in zip(value if isinstance(value, list) else [value],
                        before[key] if isinstance(value, list) else [before[key]]):
            assert a.dtype == b.dtype and torch.equal(a.detach(), b), key
    assert torch.equal(bins, bins_before)
    assert (inputs["pixels"], inputs["reco_pixels"]) == heads


def test_nan_in_gives_nan_out():
    inputs = make_v3_inputs()
    for name in ("posterior_logits", "reco_pixels", "true_reward", "continue_pred"):
        poisoned = dict(inputs)
        poisoned[name] = inputs[name].detach().clone()
        poisoned[name].view(-1)[0] = float("nan")
        losses = call(poisoned, lambda_continue=1.0)
        assert any(torch.isnan(v) for v in losses.values()), name


# ---- backends ------------------------------------------------------------------------------------


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\)"):
        dreamer_v3_model_loss(**make_v3_inputs(), backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_torch_and_auto_on_cpu_run_the_reference(backend):
    inputs = make_v3_inputs()
    ours = dreamer_v3_model_loss(**inputs, backend=backend)
    expected = reference_v3.dreamer_v3_model_loss(**inputs)
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[k], expected[k]) for k in ours)


def test_fused_two_hot_has_no_target_gradient(device):
    """The fused two-hot loss computes no gradient for the reward target or the bins: asking for
    one is an error that names it, not a silent zero."""
    inputs = make_v3_inputs(device=device)
    with pytest.raises(ValueError, match="true_reward requires grad"):
        dreamer_v3_model_loss(**inputs, backend="triton")
    inputs["true_reward"] = inputs["true_reward"].detach()
    bins = torch.linspace(-3, 3, 255, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="reward_bins requires grad"):
        dreamer_v3_model_loss(**inputs, reward_bins=bins, backend="triton")
    with torch.no_grad():  # no backward can follow: nothing to refuse
        dreamer_v3_model_loss(**make_v3_inputs(device=device), backend="triton")


def test_triton_without_cuda_or_interpreter(monkeypatch):
    from fused_dreamer_loss.core import machinery

    monkeypatch.setattr(machinery, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        dreamer_v3_model_loss(**make_v3_inputs(), backend="triton")


def test_validation_before_dispatch(monkeypatch):
    """Bad input raises before any backend runs."""
    def no_kernels(*args):
        raise AssertionError("a backend ran")

    monkeypatch.setattr(functional_v3, "_fused_v3", no_kernels)
    monkeypatch.setattr(reference_v3, "checked_dreamer_v3_model_loss", no_kernels)
    inputs = make_v3_inputs()
    inputs["prior_logits"] = torch.rand(2, 3, 4, 5)
    for backend in ("torch", "triton", "auto"):
        with pytest.raises(ValueError, match="prior_logits"):
            dreamer_v3_model_loss(**inputs, backend=backend)
