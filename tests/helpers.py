"""Tolerances, comparisons and spies every family's tests use."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.utils._python_dispatch

# (rtol, atol as a fraction of the reference's largest magnitude) per input dtype; the oracle is
# the reference in float64 on the same values.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (2e-2, 1e-2),
    torch.float16: (5e-3, 2e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str):
    """``actual`` (computed from ``dtype`` inputs) against the float64 ``expected``."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    rtol, atol_frac = TOLERANCES[dtype]
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    atol = atol_frac * scale if math.isfinite(scale) and scale > 0 else atol_frac
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


class LaunchSpy:
    """Wraps a Triton kernel's ``kernel[grid](...)`` launches, recording grid and keyword args."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.calls.append((grid, kwargs))
            return launch(*args, **kwargs)

        return run


class Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the sizes of the tensors torch allocates while active."""

    def __init__(self):
        super().__init__()
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.empty, torch.ops.aten.empty_strided,
                                   torch.ops.aten.empty_like, torch.ops.aten.zeros,
                                   torch.ops.aten.clone, torch.ops.aten.contiguous):
            self.numels.append(out.numel())
        return out


def assert_torchrl_loss_module_api(ours, theirs, extra_net: torch.nn.Module) -> None:
    """What every fused loss module shares with its torchrl twin ``theirs``: a ``LossModule``,
    the same ``functional`` and ``vmap_randomness``, no value estimator, and the same parameters
    and state-dict names after ``convert_to_functional`` of a copy of ``extra_net``."""
    from torchrl.objectives.common import LossModule

    assert isinstance(ours, LossModule)
    assert ours.functional is theirs.functional is True
    assert ours.vmap_randomness == theirs.vmap_randomness
    for loss in (ours, theirs):
        with pytest.raises(NotImplementedError):
            loss.make_value_estimator()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "not part of the annotations"
            loss.convert_to_functional(copy.deepcopy(extra_net), "extra_net")
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert (set(ours.extra_net_params.keys(True, True))
            == set(theirs.extra_net_params.keys(True, True)))


def assert_same_state(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """The same state-dict names, in the same order, holding equal tensors."""
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and does not spin against other processes.
    A test module that imports it runs on one thread."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def module_losses_and_grads(loss_module, td):
    """A world-model loss module's losses on ``td`` and the gradient of each world-model
    parameter of their sum."""
    loss_module.world_model.zero_grad(set_to_none=True)
    losses, _ = loss_module(td)
    sum(losses.values()).sum().backward()
    return losses, {n: p.grad.clone() for n, p in loss_module.world_model.named_parameters()}


def assert_module_matches(ours, theirs, td, loss_atol: float) -> None:
    """Two world-model loss modules on ``td`` (:func:`module_losses_and_grads`): the same loss
    names in the same order, the same losses (``rtol`` 2e-5, ``loss_atol``) and the same
    parameter gradients (``rtol`` 1e-4, ``atol`` 1e-5 of the largest)."""
    (t_losses, t_grads) = module_losses_and_grads(theirs, td)
    (o_losses, o_grads) = module_losses_and_grads(ours, td)
    assert list(o_losses.keys()) == list(t_losses.keys())
    for name, want in t_losses.items():
        torch.testing.assert_close(o_losses[name], want, rtol=2e-5, atol=loss_atol,
                                   msg=lambda m: f"{name}: {m}")
    for name, want in t_grads.items():
        scale = float(want.abs().max()) or 1.0
        torch.testing.assert_close(o_grads[name], want, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m: f"grad {name}: {m}")
