"""Inputs of the V1 loss and its float64 oracle."""

from __future__ import annotations

import torch

from fused_dreamer_loss.world_model_v1 import reference

NAMES = ("prior_mean", "prior_std", "posterior_mean", "posterior_std", "pixels", "reco_pixels",
         "true_reward", "pred_reward")


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
