"""The pure-torch Dreamer model loss: the spec, the CPU path and the oracle of the tests.

It computes what torchrl's ``DreamerModelLoss`` computes (Hafner et al., 2019), term by term and in
the same order as the fused kernels in :mod:`fused_dreamer_loss.kernels.dreamer_loss`:

    kl   = log(ps / qs) + (qs² + (pm − qm)²) / (2 ps²) − 1/2          KL(q ‖ p) per latent element
    reco = distance(pixels, reco_pixels)                            per image element
    rew  = distance(true_reward, pred_reward)                       per reward

``global_average=False`` sums ``kl`` over the latent dim and ``reco`` over the image dims of each row
(a row is one element of the batch dims ``*B``), then averages over rows; ``global_average=True``
averages every term over all its elements. The free-nats clamp ``clamp_min(free_nats)`` applies to
each row sum (or element) before the average, or to the average with ``delayed_clamp=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .validation import LossOptions, check_options_fit, validate_inputs


def distance(target: torch.Tensor, prediction: torch.Tensor, kind: str) -> torch.Tensor:
    """Elementwise ``l2`` (x − y)², ``l1`` |x − y| or ``smooth_l1`` (beta 1) distance, in the
    promoted dtype of the two (explicitly: some torch releases fail the backward of a mixed-dtype
    ``mse_loss``)."""
    dtype = torch.promote_types(target.dtype, prediction.dtype)
    target, prediction = target.to(dtype), prediction.to(dtype)
    if kind == "l2":
        return F.mse_loss(target, prediction, reduction="none")
    if kind == "l1":
        return F.l1_loss(target, prediction, reduction="none")
    return F.smooth_l1_loss(target, prediction, reduction="none")


def kl_divergence(
    prior_mean: torch.Tensor,
    prior_std: torch.Tensor,
    posterior_mean: torch.Tensor,
    posterior_std: torch.Tensor,
) -> torch.Tensor:
    """KL(q ‖ p) of diagonal Gaussians, per latent element (q: posterior, p: prior)."""
    return (
        torch.log(prior_std / posterior_std)
        + (posterior_std**2 + (prior_mean - posterior_mean) ** 2) / (2 * prior_std**2)
        - 0.5
    )


def dreamer_model_loss(
    prior_mean: torch.Tensor,
    prior_std: torch.Tensor,
    posterior_mean: torch.Tensor,
    posterior_std: torch.Tensor,
    pixels: torch.Tensor,
    reco_pixels: torch.Tensor,
    true_reward: torch.Tensor,
    pred_reward: torch.Tensor,
    *,
    lambda_kl: float = 1.0,
    lambda_reco: float = 1.0,
    lambda_reward: float = 1.0,
    reco_loss: str = "l2",
    reward_loss: str = "l2",
    free_nats: float = 3.0,
    delayed_clamp: bool = False,
    global_average: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Dreamer world-model loss in plain torch ops; arguments as in
    :func:`fused_dreamer_loss.dreamer_model_loss` (which has ``backend`` besides).

    Returns:
        ``(loss_kl, loss_reco, loss_reward)``, 0-dim tensors with their lambdas applied.

    Example:
        >>> import torch
        >>> from fused_dreamer_loss.reference import dreamer_model_loss
        >>> B, T, D = 4, 5, 30
        >>> pm, qm = torch.randn(B, T, D), torch.randn(B, T, D)
        >>> ps, qs = torch.rand(B, T, D) + 0.1, torch.rand(B, T, D) + 0.1
        >>> x, y = torch.rand(B, T, 3, 8, 8), torch.rand(B, T, 3, 8, 8)
        >>> r, r_hat = torch.randn(B, T, 1), torch.randn(B, T, 1)
        >>> kl, reco, reward = dreamer_model_loss(pm, ps, qm, qs, x, y, r, r_hat)
        >>> kl.shape
        torch.Size([])
    """
    shapes = validate_inputs(prior_mean, prior_std, posterior_mean, posterior_std,
                             pixels, reco_pixels, true_reward, pred_reward)
    opts = LossOptions(lambda_kl, lambda_reco, lambda_reward, reco_loss, reward_loss, free_nats,
                       delayed_clamp, global_average)
    check_options_fit(opts, shapes)
    return checked_dreamer_model_loss(prior_mean, prior_std, posterior_mean, posterior_std,
                                      pixels, reco_pixels, true_reward, pred_reward, opts,
                                      len(shapes.batch_shape))


def checked_dreamer_model_loss(
    prior_mean: torch.Tensor,
    prior_std: torch.Tensor,
    posterior_mean: torch.Tensor,
    posterior_std: torch.Tensor,
    pixels: torch.Tensor,
    reco_pixels: torch.Tensor,
    true_reward: torch.Tensor,
    pred_reward: torch.Tensor,
    opts: LossOptions,
    batch_dims: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`dreamer_model_loss` on inputs and options already checked by the caller."""
    kl = kl_divergence(prior_mean, prior_std, posterior_mean, posterior_std)
    if not opts.global_average:
        kl = kl.sum(-1)
    if opts.delayed_clamp:
        kl = kl.mean().clamp_min(opts.free_nats)
    else:
        kl = kl.clamp_min(opts.free_nats).mean()

    reco = distance(pixels, reco_pixels, opts.reco_loss)
    if not opts.global_average:
        reco = reco.flatten(batch_dims).sum(-1)
    reco = reco.mean()

    # The reward's last dim is 1, so the per-row and the global average are the same mean.
    reward = distance(true_reward, pred_reward, opts.reward_loss).mean()

    return opts.lambda_kl * kl, opts.lambda_reco * reco, opts.lambda_reward * reward
