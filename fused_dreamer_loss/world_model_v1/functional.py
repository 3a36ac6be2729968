"""The functional Dreamer model loss: validation, then the one place that picks a backend."""

from __future__ import annotations

import dataclasses

import torch

from ..core.dispatch import (cacheable, call_key, calls_table, remember, require_triton,
                             resolve_backend, values_key)
from ..core.validation import check_backend, kernels_can_take
from . import reference
from .validation import LossOptions, check_options_fit, validate_inputs


def _triton_kernels():
    """The fused V1 kernel module (importing triton), or a RuntimeError saying why it cannot run."""
    require_triton()
    from . import kernels
    return kernels


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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Dreamer world-model loss: KL with free nats, reconstruction and reward terms.

    The same numbers as torchrl's ``DreamerModelLoss`` (``kl_loss`` plus ``distance_loss``), computed
    on CUDA by fused Triton kernels that produce the loss and the gradients in one pass.

    Args:
        prior_mean, prior_std: the RSSM prior p, shape ``[*B, D]`` (``*B`` the batch dims, at least
            one, e.g. ``[batch, time]``; ``D`` the latent size).
        posterior_mean, posterior_std: the RSSM posterior q, shape ``[*B, D]``.
        pixels, reco_pixels: target and decoded observation, shape ``[*B, *I]`` with any number of
            image dims (torchrl: ``C, H, W``). Dense tensors sharing a layout (e.g. both
            ``channels_last``) are read without a copy.
        true_reward, pred_reward: target and predicted reward, shape ``[*B, 1]``.
        lambda_kl, lambda_reco, lambda_reward: weights of the three terms.
        reco_loss, reward_loss: ``"l2"``, ``"l1"`` or ``"smooth_l1"`` (beta 1).
        free_nats: the KL is clamped from below at this value (torch's ``clamp_min``).
        delayed_clamp: clamp the averaged KL instead of each row sum (or element).
        global_average: average every term over all its elements instead of summing the KL over
            ``D`` and the reconstruction over ``*I`` and averaging over the rows.
        backend: ``"auto"`` (Triton for CUDA tensors, the reference otherwise), ``"triton"`` (the
            fused kernels; CPU tensors only with ``TRITON_INTERPRET=1`` set before triton is
            imported) or ``"torch"`` (the pure-torch reference). ``meta`` tensors and the
            tensors of ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ...) always run
            the reference: no kernel can read them.

    Returns:
        ``(loss_kl, loss_reco, loss_reward)``: 0-dim tensors, each with its lambda applied and the
        dtype of its term's inputs (promoted, as torch's arithmetic does, where they differ);
        accumulation is in float32 (float64 when an input is float64). Under ``torch.autocast``
        the losses are at least float32, as autocast makes torch's losses. Gradients take the
        dtype of their input.

    Raises:
        TypeError: non-tensor inputs, or dtypes other than float16/bfloat16/float32/float64.
        ValueError: shapes or batch dims that disagree, an empty batch, inputs on several devices,
            an unknown ``reco_loss``, ``reward_loss`` or ``backend``, a lambda or ``free_nats``
            that is not finite or does not fit in its term's dtype.
        RuntimeError: ``backend="triton"`` where Triton cannot run.

    Example:
        >>> import torch
        >>> from fused_dreamer_loss import dreamer_model_loss
        >>> B, T, D = 4, 5, 30
        >>> prior_mean, posterior_mean = torch.randn(B, T, D), torch.randn(B, T, D)
        >>> prior_std = torch.rand(B, T, D) + 0.1
        >>> posterior_std = torch.rand(B, T, D) + 0.1
        >>> pixels = torch.rand(B, T, 3, 16, 16)
        >>> reco_pixels = torch.rand(B, T, 3, 16, 16, requires_grad=True)
        >>> reward, pred_reward = torch.randn(B, T, 1), torch.randn(B, T, 1)
        >>> loss_kl, loss_reco, loss_reward = dreamer_model_loss(
        ...     prior_mean, prior_std, posterior_mean, posterior_std,
        ...     pixels, reco_pixels, reward, pred_reward, free_nats=3.0)
        >>> (loss_kl + loss_reco + loss_reward).backward()
        >>> reco_pixels.grad.shape
        torch.Size([4, 5, 3, 16, 16])
    """
    tensors = (prior_mean, prior_std, posterior_mean, posterior_std, pixels, reco_pixels,
               true_reward, pred_reward)
    options = (lambda_kl, lambda_reco, lambda_reward, free_nats, reco_loss, reward_loss,
               delayed_clamp, global_average)
    key = (call_key(tensors, values_key(options), backend, _autocast_state(prior_mean))
           if cacheable() else None)
    prepared = _CALLS.get(key) if key is not None else None
    if prepared is None:
        prepared = _prepare(tensors, options, backend)
        remember(_CALLS, key, prepared)
    return prepared(tensors)


#: Prepared calls by signature (see :func:`fused_dreamer_loss.core.dispatch.call_key`).
_CALLS = calls_table()


def _autocast_state(t: torch.Tensor) -> bool:
    """Whether autocast is on for ``t``'s device type (it changes the fused losses' dtypes);
    False for a device type without autocast (``meta``)."""
    try:
        return torch.is_autocast_enabled(t.device.type)
    except RuntimeError:
        return False


def _prepare(tensors: tuple[torch.Tensor, ...], options: tuple, backend: str):
    """Validate a call and pick its backend: a function of the call's tensors that computes the
    losses, for every call of the same signature. Raises on bad input."""
    shapes = validate_inputs(*tensors)
    lambda_kl, lambda_reco, lambda_reward, free_nats, reco_loss, reward_loss, delayed_clamp, \
        global_average = options
    opts = LossOptions(lambda_kl, lambda_reco, lambda_reward, reco_loss, reward_loss, free_nats,
                       delayed_clamp, global_average)
    check_options_fit(opts, shapes)
    check_backend(backend)
    batch_dims = len(shapes.batch_shape)
    if not kernels_can_take(tensors) or resolve_backend(backend, tensors[0].device) == "torch":
        return lambda t: reference.checked_dreamer_model_loss(*t, opts, batch_dims)
    if _autocast_state(tensors[0]):
        # Autocast computes losses (mse_loss, l1_loss, smooth_l1_loss) in float32: so do we.
        shapes = dataclasses.replace(shapes, loss_dtypes=tuple(
            torch.promote_types(d, torch.float32) for d in shapes.loss_dtypes))
    kernels = _triton_kernels()
    call = kernels.prepare(opts, shapes, tensors)
    return lambda t: kernels.run(call, t)
