"""The DreamerV3 loss prepares a call once per input signature and reuses it: a change of any
part of the signature between calls (every option, the bins' values, the heads) gets a call of
its own (the reference's numbers), and bad input raises the same error at every call."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import assert_close
from tests.world_model_v3.helpers_v3 import leaves, make_v3_inputs

from fused_dreamer_loss import dreamer_v3_model_loss
from fused_dreamer_loss.world_model_v3 import reference

BINS = 9
#: The base options (every term on) and a value of each option other than the base's.
BASE = dict(lambda_continue=1.0, num_reward_bins=BINS)
CHANGED = {"lambda_kl": 0.7, "lambda_reco": 1.3, "lambda_reward": 0.4, "lambda_continue": 0.0,
           "kl_mode": "separate", "lambda_dynamic": 0.6, "lambda_representation": 0.2,
           "unimix": 0.01, "continue_target_scale": 0.9, "kl_alpha": 0.6, "free_bits": 0.0,
           "reco_loss": "l1", "reco_symlog": False, "reward_two_hot": False,
           "num_reward_bins": 7, "global_average": True, "two_hot_space": "symlog",
           "pixels_scale": 0.5, "pixels_offset": -0.25,
           "reward_bins": [-3.0, -1.0, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 9.0]}
#: Options that are read only with another option set.
NEEDS = {"lambda_dynamic": dict(kl_mode="separate"),
         "lambda_representation": dict(kl_mode="separate"), "unimix": dict(kl_mode="separate"),
         "pixels_scale": dict(reco_symlog=False), "pixels_offset": dict(reco_symlog=False)}


def inputs_for(device, seed=0, **options):
    width = (1 if options.get("reward_two_hot") is False
             else len(options["reward_bins"]) if "reward_bins" in options
             else options.get("num_reward_bins", BINS))
    inputs = make_v3_inputs((2, 3), 3, 4, ((3, 2, 2),), reward_width=width, device=device,
                            seed=seed)
    inputs["true_reward"] = inputs["true_reward"].detach()
    return inputs


def check(inputs, **options):
    """The fused loss and its gradients against the reference on the same inputs."""
    options = {**BASE, **options}
    if options.get("reward_two_hot") is False:
        options.pop("num_reward_bins")
    losses = dreamer_v3_model_loss(**inputs, **options, backend="triton")
    want = reference.dreamer_v3_model_loss(**inputs, **options)
    assert set(losses) == set(want)
    for name in want:
        assert_close(losses[name].detach(), want[name].detach(), torch.float32, name)
    wrt = leaves(inputs)
    weights = {name: 1.0 + 0.3 * i for i, name in enumerate(sorted(want))}
    got = torch.autograd.grad(sum(weights[k] * v for k, v in losses.items()), wrt,
                              allow_unused=True)
    ref = torch.autograd.grad(sum(weights[k] * v for k, v in want.items()), wrt,
                              allow_unused=True)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert (g is None) == (r is None), i
        if g is not None:
            assert_close(g, r, torch.float32, f"gradient {i}, {options}")


@pytest.mark.parametrize("option", sorted(CHANGED))
def test_each_option(device, option):
    base = NEEDS.get(option, {})
    changed = {**base, option: CHANGED[option]}
    check(inputs_for(device, **base), **base)
    check(inputs_for(device, **changed), **changed)
    check(inputs_for(device, **base), **base)


def test_reward_bins_values(device):
    """Bins as a sequence (keyed by value), as a tensor modified in place between calls (checked
    again), another tensor of the same values, and 0-dim tensors modified in place."""
    values = [-3.0, -1.0, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 9.0]
    inputs = inputs_for(device, reward_bins=values)
    check(inputs, reward_bins=values)
    check(inputs, reward_bins=[v * 2 for v in values])
    bins = torch.tensor(values, device=device)
    check(inputs, reward_bins=bins)
    bins.mul_(0.5)
    check(inputs, reward_bins=bins)
    check(inputs, reward_bins=torch.tensor(values, device=device))
    cpu = torch.tensor(values)
    check(inputs, reward_bins=cpu)
    cpu[3] = -10.0  # no longer ascending: the bins are checked again
    with pytest.raises(ValueError, match="reward_bins must be finite and strictly ascending"):
        dreamer_v3_model_loss(**inputs, **BASE, reward_bins=cpu, backend="triton")
    scalars = list(torch.tensor(values).unbind())  # a sequence of 0-dim tensors: not keyed
    check(inputs, reward_bins=scalars)
    for s in scalars:
        s.mul_(2.0)
    check(inputs, reward_bins=scalars)


def test_heads_layouts_and_grad_mode(device):
    inputs = inputs_for(device, seed=1)
    check(inputs)
    two = make_v3_inputs((2, 3), 3, 4, ((3, 2, 2), (5,)), reward_width=BINS, device=device,
                         seed=2)
    two["true_reward"] = two["true_reward"].detach()
    check(two)
    check(two, reco_symlog=[True, "target"])
    swapped = dict(inputs, posterior_logits=inputs["posterior_logits"].detach()
                   .transpose(0, 1).contiguous().transpose(0, 1).requires_grad_())
    check(swapped)
    check(dict(inputs, terminated=inputs["terminated"].float()))
    with torch.no_grad():
        losses = dreamer_v3_model_loss(**inputs, **BASE, backend="triton")
    assert not any(loss.requires_grad for loss in losses.values())
    check(inputs)


@pytest.mark.parametrize("bad, error, match", [
    (dict(lambda_kl=True), TypeError, "lambda_kl must be a real number"),
    (dict(global_average=0), TypeError, "global_average must be a bool"),
    (dict(reco_symlog=[1]), TypeError, "reco_symlog must be one of"),
    (dict(reward_bins=[0.0, 1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]), ValueError,
     "strictly ascending"),
    (dict(num_reward_bins=True), TypeError, "num_reward_bins must be an int"),
    (dict(kl_alpha=float("nan")), ValueError, "kl_alpha must be finite"),
])
def test_bad_options_raise_at_every_call(device, bad, error, match):
    """Each next to a good call of equal values (``True == 1``, ``[1] == [True]``)."""
    good = {"lambda_kl": 1, "global_average": False, "reco_symlog": [True],
            "reward_bins": [float(v) for v in range(BINS)], "num_reward_bins": 1,
            "kl_alpha": 0.8}
    inputs = inputs_for(device, seed=3)
    name = next(iter(bad))
    for _ in range(2):
        if name != "num_reward_bins":
            check(inputs, **{name: good[name]})
        with pytest.raises(error, match=match):
            dreamer_v3_model_loss(**inputs, **{**BASE, **bad}, backend="triton")
