"""Bad input gets a clear Python exception naming the argument, on every backend, before any launch."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import LaunchSpy
from tests.world_model_v1.helpers_v1 import make_inputs

from fused_dreamer_loss import dreamer_model_loss

BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def no_launch(monkeypatch):
    """Every test here must fail before a kernel runs."""
    from fused_dreamer_loss.world_model_v1 import kernels as k

    spy = LaunchSpy(k._dreamer_loss_fwd_kernel)
    monkeypatch.setattr(k, "_dreamer_loss_fwd_kernel", spy)
    yield
    assert spy.calls == []


def call(inputs, backend, **options):
    return dreamer_model_loss(*inputs, backend=backend, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index, name, shape", [
    (1, "prior_std", (2, 3, 6)),
    (3, "posterior_std", (2, 4, 5)),
    (5, "reco_pixels", (2, 3, 3, 4, 4)),
    (7, "pred_reward", (2, 3, 2)),
])
def test_mismatched_shapes(device, backend, index, name, shape):
    inputs = make_inputs(device=device)
    inputs[index] = torch.rand(shape, device=device)
    with pytest.raises(ValueError, match=name):
        call(inputs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_batch_dims_must_match_latents(device, backend):
    inputs = make_inputs(device=device)
    inputs[4], inputs[5] = torch.rand(3, 2, 3, 4, 5), torch.rand(3, 2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"pixels must have shape \[\*B, \*I\].*\(2, 3\)"):
        call([t.to(device) for t in inputs], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_images_need_an_image_dim(device, backend):
    inputs = make_inputs(device=device)
    inputs[4], inputs[5] = torch.rand(2, 3, device=device), torch.rand(2, 3, device=device)
    with pytest.raises(ValueError, match="at least one image dim"):
        call(inputs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reward_batch_dims_must_match_latents(device, backend):
    inputs = make_inputs(device=device)
    inputs[6], inputs[7] = torch.rand(6, 1, device=device), torch.rand(6, 1, device=device)
    with pytest.raises(ValueError, match=r"true_reward must have shape \[\*B, 1\]"):
        call(inputs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reward_needs_a_trailing_one(device, backend):
    inputs = make_inputs(device=device)
    inputs[6], inputs[7] = torch.rand(2, 3, device=device), torch.rand(2, 3, device=device)
    with pytest.raises(ValueError, match="true_reward"):
        call(inputs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_latents_need_a_batch_dim(device, backend):
    inputs = make_inputs(device=device)
    inputs[:4] = [torch.rand(5, device=device) for _ in range(4)]
    with pytest.raises(ValueError, match="at least one batch dim"):
        call(inputs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(device, backend):
    inputs = make_inputs((0, 3), device=device)
    with pytest.raises(ValueError, match="batch is empty"):
        call(inputs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_latent_dim(device, backend):
    inputs = make_inputs((2, 3), 0, device=device)
    with pytest.raises(ValueError, match="latent dim is empty"):
        call(inputs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64], ids=str)
def test_non_floating_point(device, backend, dtype):
    inputs = make_inputs(device=device)
    inputs[4] = torch.ones(inputs[4].shape, dtype=dtype, device=device)
    with pytest.raises(TypeError, match=f"pixels has dtype {dtype}"):
        call(inputs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_not_a_tensor(device, backend):
    inputs = make_inputs(device=device)
    inputs[6] = [[1.0]]
    with pytest.raises(TypeError, match="true_reward must be a torch.Tensor"):
        call(inputs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_different_devices(backend):
    inputs = make_inputs()
    inputs[5] = inputs[5].detach().to("meta")
    with pytest.raises(ValueError, match="one device.*reco_pixels on meta"):
        call(inputs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option, value, match", [
    ("reco_loss", "l3", r"reco_loss must be one of \('l2', 'l1', 'smooth_l1'\), got 'l3'"),
    ("reward_loss", "mse", r"reward_loss must be one of \('l2', 'l1', 'smooth_l1'\)"),
    ("free_nats", float("nan"), "free_nats must be finite"),
    ("lambda_kl", float("inf"), "lambda_kl must be finite"),
])
def test_bad_option_values(device, backend, option, value, match):
    with pytest.raises(ValueError, match=match):
        call(make_inputs(device=device), backend, **{option: value})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option, value", [
    ("free_nats", torch.tensor(3.0)), ("lambda_reco", "1"), ("delayed_clamp", 1),
    ("global_average", None),
])
def test_bad_option_types(device, backend, option, value):
    with pytest.raises(TypeError, match=option):
        call(make_inputs(device=device), backend, **{option: value})


def test_unknown_backend(device):
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\)"):
        call(make_inputs(device=device), "cuda")


def test_triton_on_cpu_without_interpreter(monkeypatch):
    from fused_dreamer_loss.core import machinery

    monkeypatch.setattr(machinery, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        call(make_inputs(device="cpu"), "triton")


def test_auto_on_cpu_uses_the_reference(monkeypatch):
    from fused_dreamer_loss.core import machinery

    monkeypatch.setattr(machinery, "INTERPRET", False)
    losses = call(make_inputs(device="cpu"), "auto")
    assert all(loss.grad_fn is not None and "Fused" not in type(loss.grad_fn).__name__
               for loss in losses)
