"""The Dreamer loss prepares a call once per input signature and reuses it: a change of any part
of the signature between calls gets a call of its own (the reference's numbers), and bad input
raises the same error at every call, before and after good ones."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import LaunchSpy, assert_close
from tests.world_model_v1.helpers_v1 import make_inputs

from fused_dreamer_loss import dreamer_model_loss
from fused_dreamer_loss.world_model_v1 import reference

#: A value of each option other than its default, for the call that changes it.
CHANGED = {"lambda_kl": 0.7, "lambda_reco": 1.3, "lambda_reward": 0.4, "reco_loss": "l1",
           "reward_loss": "smooth_l1", "free_nats": 0.5, "delayed_clamp": True,
           "global_average": True}


def check(inputs, **options):
    """The fused loss and its gradients against the reference on the same inputs."""
    losses = dreamer_model_loss(*inputs, backend="triton", **options)
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    want = reference.dreamer_model_loss(*leaves, **options)
    for got, ref in zip(losses, want):
        assert_close(got.detach(), ref.detach().to(got.dtype), got.dtype, f"loss, {options}")
    wanted = [i for i, t in enumerate(inputs) if t.requires_grad]
    if wanted and torch.is_grad_enabled():
        grads = torch.autograd.grad(sum(losses), [inputs[i] for i in wanted])
        refs = torch.autograd.grad(sum(want), [leaves[i] for i in wanted])
        for i, g, r in zip(wanted, grads, refs):
            assert_close(g, r.to(g.dtype), g.dtype, f"gradient {i}, {options}")


@pytest.mark.parametrize("option", sorted(CHANGED))
def test_each_option(device, option):
    inputs = make_inputs(device=device, seed=1)
    check(inputs)
    check(inputs, **{option: CHANGED[option]})
    check(inputs)


def test_shape_stride_dtype_requires_grad_and_grad_mode(device):
    base = make_inputs(device=device, seed=2)
    check(base)
    check(make_inputs((3, 2), 5, (3, 4, 5), device=device, seed=3))  # shape
    check(make_inputs((2, 3), 5, (3, 4, 7), device=device, seed=4))  # image shape
    strided = list(base)
    for i in (0, 4, 5):  # latents and images in another layout
        strided[i] = base[i].detach().transpose(0, 1).contiguous().transpose(0, 1)
        strided[i].requires_grad_(base[i].requires_grad)
    check(strided)
    check(make_inputs(device=device, dtype=torch.float64, seed=5))  # dtype
    mixed = list(base)
    mixed[4] = base[4].detach().to(torch.bfloat16)
    mixed[5] = base[5].detach().to(torch.bfloat16).requires_grad_()
    assert dreamer_model_loss(*mixed, backend="triton")[1].dtype == torch.bfloat16
    check([t.detach() for t in base])  # requires_grad
    frozen = list(base)
    frozen[0] = base[0].detach()
    check(frozen)
    with torch.no_grad():  # grad mode
        check(base)
    check(base)


def test_device(device):
    """A meta call between two real ones takes the reference (no kernel reads meta tensors)."""
    inputs = make_inputs(device=device, seed=6)
    check(inputs)
    meta = [t.detach().to("meta").requires_grad_(t.requires_grad) for t in inputs]
    assert all(loss.device.type == "meta" for loss in dreamer_model_loss(*meta, backend="triton"))
    check(inputs)


def test_negative_zero_lambda(device):
    """``-0.0 == 0.0``, but a lambda of -0.0 makes a -0.0 loss: another call (the torch backend's
    prepared calls are kept by the same signature)."""
    inputs = make_inputs(device=device, seed=7)
    for zero in (0.0, -0.0, 0.0):
        loss = dreamer_model_loss(*inputs, backend="torch", lambda_reco=zero)[1]
        assert bool(torch.signbit(loss)) == (str(zero) == "-0.0"), zero


@pytest.mark.parametrize("kind", ["float64", "float32"])
def test_negative_zero_of_numpys_floats(device, kind):
    """numpy's floats (float64 a float subclass, float32 not) are real numbers the checks take:
    their -0.0 gets a call of its own too."""
    np = pytest.importorskip("numpy")
    inputs = make_inputs(device=device, seed=7)
    for zero in (0.0, -0.0, 0.0):
        loss = dreamer_model_loss(*inputs, backend="torch", lambda_reco=getattr(np, kind)(zero))[1]
        assert bool(torch.signbit(loss)) == (str(zero) == "-0.0"), zero


def test_tile_sizes_changed_between_calls(device, request):
    """The tests shrink the tiles (a plan made before must not be reused with the old ones): a
    call at the default tiles, then the same signature with the tiles shrunk."""
    from fused_dreamer_loss.world_model_v1 import kernels as k

    spy = LaunchSpy(k._dreamer_loss_fwd_kernel)
    check(make_inputs(device=device, seed=8))
    request.getfixturevalue("small_blocks")
    k._dreamer_loss_fwd_kernel, original = spy, k._dreamer_loss_fwd_kernel
    try:
        check(make_inputs(device=device, seed=8))
    finally:
        k._dreamer_loss_fwd_kernel = original
    assert spy.calls and spy.calls[-1][1]["IMAGE_BLOCK"] == 256 // 4


#: Good values equal (``==``) to the bad ones below, or of their option.
GOOD = {"lambda_kl": 1, "free_nats": 1.0, "reco_loss": "l2", "delayed_clamp": False,
        "lambda_reward": 1.0}


@pytest.mark.parametrize("bad, error, match", [
    (dict(lambda_kl=True), TypeError, "lambda_kl must be a real number"),
    (dict(free_nats=1), None, None),
    (dict(reco_loss="l3"), ValueError, "reco_loss must be one of"),
    (dict(free_nats=float("nan")), ValueError, "free_nats must be finite"),
    (dict(delayed_clamp=1), TypeError, "delayed_clamp must be a bool"),
    (dict(lambda_reward=1e39), ValueError, "lambda_reward=.*does not fit"),
])
def test_bad_options_raise_at_every_call(device, bad, error, match):
    """Between good calls of equal values (``True == 1``, ``1 == 1.0``): a bad option raises
    each time, and a good one of another type (``free_nats=1``) is still good."""
    inputs = make_inputs(device=device, seed=9)
    good = {k: GOOD[k] for k in bad}
    for _ in range(2):
        check(inputs, **good)
        if error is None:
            check(inputs, **bad)
        else:
            with pytest.raises(error, match=match):
                dreamer_model_loss(*inputs, backend="triton", **bad)


def test_bad_shapes_raise_at_every_call(device):
    inputs = make_inputs(device=device, seed=10)
    bad = list(inputs)
    bad[1] = torch.rand(2, 3, 6, device=device)
    for _ in range(2):
        with pytest.raises(ValueError, match="prior_std has shape"):
            dreamer_model_loss(*bad, backend="triton")
        check(inputs)
    with pytest.raises(TypeError, match="pixels must be a torch.Tensor"):
        dreamer_model_loss(*inputs[:4], inputs[4].tolist(), *inputs[5:], backend="triton")
