"""Inputs, the float64 oracle and comparisons shared by the tests."""

from __future__ import annotations

import math

import torch
import torch.utils._python_dispatch

from fused_dreamer_loss import reference

NAMES = ("prior_mean", "prior_std", "posterior_mean", "posterior_std", "pixels", "reco_pixels",
         "true_reward", "pred_reward")

# (rtol, atol as a fraction of the reference's largest magnitude) per input dtype; the oracle is
# the reference in float64 on the same values.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (2e-2, 1e-2),
    torch.float16: (5e-3, 2e-3),
}


def make_inputs(batch_shape=(2, 3), latent_dim=5, image_shape=(3, 4, 5), dtype=torch.float32,
                device="cpu", seed=0, requires_grad=True) -> list[torch.Tensor]:
    """Random inputs in torchrl's order; stds in [0.5, 1.5], images in [0, 1), predictions spread
    wide enough that smooth_l1 sees both of its branches."""
    g = torch.Generator().manual_seed(seed)
    B, D = tuple(batch_shape), latent_dim

    def rand(*shape, lo=0.0, hi=1.0):
        return torch.rand(*shape, generator=g, dtype=torch.float64) * (hi - lo) + lo

    tensors = [
        torch.randn(*B, D, generator=g, dtype=torch.float64),
        rand(*B, D, lo=0.5, hi=1.5),
        torch.randn(*B, D, generator=g, dtype=torch.float64),
        rand(*B, D, lo=0.5, hi=1.5),
        rand(*B, *image_shape),
        rand(*B, *image_shape, lo=-1.0, hi=2.0),
        torch.randn(*B, 1, generator=g, dtype=torch.float64),
        torch.randn(*B, 1, generator=g, dtype=torch.float64) * 2,
    ]
    return [t.to(dtype=dtype, device=device).requires_grad_(requires_grad) for t in tensors]


def kl_values(inputs, global_average: bool) -> torch.Tensor:
    """What the free-nats clamp compares: KL row sums, or elements with global_average."""
    with torch.no_grad():
        kl = reference.kl_divergence(*(t.double() for t in inputs[:4]))
    return kl.flatten() if global_average else kl.sum(-1).flatten()


def free_nats_for(inputs, global_average: bool, clamp: str) -> float:
    """A free-nats value that clamps "some", "all" or "none" of the compared values, never closer
    than half a gap to any of them (so rounding cannot flip a decision)."""
    values = kl_values(inputs, global_average).sort().values.cpu()
    if clamp == "all":
        return float(values[-1]) + 1.0
    if clamp == "none":
        return float(values[0]) - 1.0
    gaps = values[1:] - values[:-1]
    mid = len(values) // 2
    i = max(range(max(mid - 2, 0), min(mid + 2, len(gaps))), key=lambda j: float(gaps[j]))
    return float(values[i] + values[i + 1]) / 2


def oracle(inputs, grad_outputs=None, **options):
    """Losses and input gradients of the reference in float64 on the same values."""
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    losses = reference.dreamer_model_loss(*leaves, **options)
    wanted = [t for t in leaves if t.requires_grad]
    grads = []
    if wanted:
        weights = grad_outputs or [torch.ones((), dtype=torch.float64)] * 3
        grads = torch.autograd.grad(losses, wanted, [w.double().cpu().to(leaves[0].device)
                                                    for w in weights], allow_unused=True)
    return [loss.detach() for loss in losses], grads


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
