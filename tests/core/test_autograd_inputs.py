"""What the fused loss keeps of its inputs for the backward, on both loss families and both
backends: inference-mode batches and a first inference-mode call, targets rewritten in place
between forward and backward, forward-mode AD.

The fused Function saves for backward only the inputs that get a gradient; the targets are held
without autograd's saved-tensor check and read only when a backward recomputes (see
``fused_dreamer_loss.core.machinery.FusedLossFunction``).
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from tests.helpers import assert_close
from tests.world_model_v1.helpers_v1 import make_inputs
from tests.world_model_v3.helpers_v3 import leaves, make_v3_inputs

from fused_dreamer_loss import dreamer_model_loss, dreamer_v3_model_loss

BACKENDS = ("triton", "torch")
#: The V3 convention these tests run: every term, the continue one included.
V3_OPTIONS = dict(kl_mode="separate", unimix=0.01, lambda_continue=1.0, reco_symlog=False)
V3_TARGETS = ("pixels", "true_reward", "terminated")


def v3_inputs(device, seed=0, **kwargs):
    inputs = make_v3_inputs((2, 3), 4, 4, ((3, 4, 4),), device=device, seed=seed, **kwargs)
    inputs["true_reward"] = inputs["true_reward"].detach()  # a target: no gradient (two-hot)
    return inputs


def v3_step(inputs, backend, weight=1.0, **options):
    """Losses and the gradients of their weighted sum with respect to the network's outputs."""
    losses = dreamer_v3_model_loss(**inputs, **V3_OPTIONS, **options, backend=backend)
    wrt = leaves(inputs)
    grads = torch.autograd.grad(weight * sum(losses.values()), wrt)
    return losses, grads


def compare(got, want, what):
    (losses, grads), (ref_losses, ref_grads) = got, want
    for name in ref_losses:
        assert_close(losses[name].detach(), ref_losses[name].detach(), torch.float32,
                     f"{what} {name}")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close(g, r, torch.float32, f"{what} gradient {i}")


# ---------------------------------------------------------------------------------------------
# torch.inference_mode()
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_call_under_inference_mode_then_training(device, backend):
    """An evaluation pass first, with a bin count no other test uses: the default bins made then
    (and anything else the first call keeps) must not be inference tensors, or every later
    training call fails in backward."""
    inputs = v3_inputs(device)
    with torch.inference_mode():
        dreamer_v3_model_loss(**inputs, **V3_OPTIONS, num_reward_bins=255, backend=backend)
        evaluated = dreamer_v3_model_loss(**v3_inputs(device, reward_width=37), **V3_OPTIONS,
                                          num_reward_bins=37, backend=backend)
    assert all(loss.is_inference() for loss in evaluated.values())
    trained = v3_inputs(device, seed=1, reward_width=37)
    compare(v3_step(trained, backend, num_reward_bins=37),
            v3_step(trained, "torch", num_reward_bins=37), f"{backend} after inference mode")


@pytest.mark.parametrize("backend", BACKENDS)
def test_v3_targets_made_under_inference_mode(device, backend):
    """A replay buffer's batch sampled under inference mode: frames, rewards, flags."""
    inputs = v3_inputs(device, seed=2)
    want = v3_step(inputs, "torch")
    with torch.inference_mode():
        targets = {name: inputs[name].clone() for name in V3_TARGETS}
    assert all(t.is_inference() for t in targets.values())
    compare(v3_step({**inputs, **targets}, backend), want, f"{backend}, inference targets")


def test_v1_targets_made_under_inference_mode(device):
    """The fused loss trains on float targets made under inference mode (torch's own
    ``mse_loss`` saves its target, so the torch backend cannot)."""
    inputs = make_inputs((2, 3), 5, (3, 4, 4), torch.float32, device, seed=3)
    for i in (4, 6):
        inputs[i] = inputs[i].detach()
    wrt = [t for t in inputs if t.requires_grad]
    want = torch.autograd.grad(sum(dreamer_model_loss(*inputs, backend="torch")), wrt)
    with torch.inference_mode():
        pixels, true_reward = inputs[4].clone(), inputs[6].clone()
    fed = [*inputs[:4], pixels, inputs[5], true_reward, inputs[7]]
    got = torch.autograd.grad(sum(dreamer_model_loss(*fed, backend="triton")), wrt)
    for i, (g, r) in enumerate(zip(got, want)):
        assert_close(g, r, torch.float32, f"gradient {i}")


# ---------------------------------------------------------------------------------------------
# Targets rewritten in place between forward and backward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [1.0, 2.5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_frames_rewritten_before_backward(device, backend, weight):
    """The replay buffer reuses its uint8 frame buffer for the next batch before the backward
    ran: the backward gives the gradients of the frames the forward saw, as the torch backend
    (which works on a float copy) does."""
    inputs = v3_inputs(device, seed=4)
    want = v3_step(inputs, "torch", weight)
    frames = inputs["pixels"].clone()
    losses = dreamer_v3_model_loss(**{**inputs, "pixels": frames}, **V3_OPTIONS, backend=backend)
    frames.copy_(torch.randint_like(frames, 0, 256))
    grads = torch.autograd.grad(weight * sum(losses.values()), leaves(inputs))
    compare((losses, grads), want, f"{backend}, frames rewritten, weight {weight}")


def test_rewritten_frames_refused_where_the_backward_must_read_them(device):
    """A second backward through the graph recomputes from the inputs: with the frames
    rewritten, a clear error naming them instead of gradients of other frames."""
    inputs = v3_inputs(device, seed=5)
    frames = inputs["pixels"].clone()
    losses = dreamer_v3_model_loss(**{**inputs, "pixels": frames}, **V3_OPTIONS,
                                   backend="triton")
    total = sum(losses.values())
    torch.autograd.grad(total, leaves(inputs), retain_graph=True)
    frames.add_(1)
    with pytest.raises(RuntimeError, match="pixels was modified in place"):
        torch.autograd.grad(total, leaves(inputs))


def test_v1_float_frames_rewritten_before_backward(device):
    inputs = make_inputs((2, 3), 5, (3, 4, 4), torch.float32, device, seed=6)
    inputs[4] = inputs[4].detach()
    wrt = [t for t in inputs if t.requires_grad]
    want = torch.autograd.grad(sum(dreamer_model_loss(*inputs, backend="torch")), wrt)
    frames = inputs[4].clone()
    losses = dreamer_model_loss(*inputs[:4], frames, *inputs[5:], backend="triton")
    frames.zero_()
    got = torch.autograd.grad(sum(losses), wrt)
    for i, (g, r) in enumerate(zip(got, want)):
        assert_close(g, r, torch.float32, f"gradient {i}")


# ---------------------------------------------------------------------------------------------
# Forward-mode AD
# ---------------------------------------------------------------------------------------------


def test_v3_forward_mode_ad(device):
    inputs = v3_inputs(device, seed=7)
    plain = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    tangent = torch.randn_like(plain["reco_pixels"])
    out = {}
    for backend in BACKENDS:
        with fwAD.dual_level():
            dual = {**plain, "reco_pixels": fwAD.make_dual(plain["reco_pixels"], tangent)}
            losses = dreamer_v3_model_loss(**dual, **V3_OPTIONS, backend=backend)
            out[backend] = {k: [None if t is None else t.clone() for t in fwAD.unpack_dual(v)]
                            for k, v in losses.items()}
    assert out["torch"]["loss_model_reco"][1] is not None
    for name, (primal, tan) in out["torch"].items():
        value, got = out["triton"][name]
        assert_close(value, primal, torch.float32, f"{name} value")
        assert (got is None) == (tan is None), f"{name}: a tangent on one backend only"
        if tan is not None:
            assert_close(got, tan, torch.float32, f"{name} tangent")


def test_v1_forward_mode_ad(device):
    inputs = [t.detach() for t in make_inputs((2, 3), 5, (3, 4, 4), torch.float64, device,
                                              seed=8)]
    tangents = [torch.randn_like(t) for t in inputs]
    out = {}
    for backend in BACKENDS:
        with fwAD.dual_level():
            duals = [fwAD.make_dual(t, d) for t, d in zip(inputs, tangents)]
            out[backend] = [[t.clone() for t in fwAD.unpack_dual(loss)]
                            for loss in dreamer_model_loss(*duals, backend=backend)]
    for (value, tangent), (ref_value, ref_tangent) in zip(out["triton"], out["torch"]):
        assert_close(value, ref_value, torch.float64, "value")
        assert_close(tangent, ref_tangent, torch.float64, "tangent")
