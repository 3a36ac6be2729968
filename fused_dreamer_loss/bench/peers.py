"""The implementations the fused losses are measured against, and the check of the fused result:
eager torch (the pure-torch reference), ``torch.compile`` of it, and torchrl's own arithmetic
(its loss modules' functions called as their forwards call them, without a world model)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Callable

import torch

from ..world_model_v1 import reference
from ..world_model_v1.functional import dreamer_model_loss
from ..world_model_v3 import reference as reference_v3
from ..world_model_v3.functional import dreamer_v3_model_loss
from ..world_model_v3.validation import V3Options
from .presets import V3_ARGS

#: What torchrl's DreamerV3ModelLoss computes for the options it does not take: a convention that
#: asks for another value has no torchrl row.
TORCHRL_V3_FIXED = {"two_hot_space": "raw", "pixels_scale": 1.0 / 255.0, "pixels_offset": 0.0}


def torchrl_loss_fn(reco_loss: str):
    """torchrl's own path: DreamerModelLoss.kl_loss and distance_loss, reduced as its forward does."""
    from torch import nn
    from torchrl.objectives import DreamerModelLoss
    from torchrl.objectives.utils import distance_loss

    loss = DreamerModelLoss(nn.ModuleList([nn.Sequential(nn.Identity()), nn.Identity()]),
                            reco_loss=reco_loss)

    def fn(pm, ps, qm, qs, pixels, reco, true_reward, pred_reward):
        kl = loss.kl_loss(pm, ps, qm, qs)
        reco_term = distance_loss(pixels, reco, reco_loss).sum((-3, -2, -1)).mean()
        reward = distance_loss(true_reward, pred_reward, "l2").squeeze(-1).mean()
        return kl, reco_term, reward

    return fn


def loss_fn(impl: str, reco_loss: str) -> Callable:
    if impl == "fused":
        return lambda *t: dreamer_model_loss(*t, reco_loss=reco_loss, backend="triton")
    if impl == "eager":
        return lambda *t: reference.dreamer_model_loss(*t, reco_loss=reco_loss)
    if impl == "compiled":
        return torch.compile(lambda *t: reference.dreamer_model_loss(*t, reco_loss=reco_loss))
    return torchrl_loss_fn(reco_loss)


def torchrl_v3_loss_fn(opts: V3Options, device: str) -> Callable:
    """torchrl's DreamerV3ModelLoss without a world model: its functions (categorical_kl_terms or
    categorical_kl_balanced, symlog, two_hot_cross_entropy) and reductions called on the same
    tensors as its forward calls them; the losses under its names."""
    import torch.nn.functional as F
    from torchrl.objectives import dreamer_v3 as trl

    reward_bins = trl._default_bins(opts.num_reward_bins, device=device)  # the module's buffer

    def fn(posterior_logits, prior_logits, pixels, reco_pixels, true_reward, reward_logits,
           continue_pred=None, terminated=None):
        if opts.kl_mode == "separate":
            dynamic, representation = trl.categorical_kl_terms(
                posterior_logits, prior_logits, free_nats=opts.free_bits, unimix=opts.unimix)
            kl = {"loss_model_dynamic":
                  opts.lambda_kl * opts.lambda_dynamic * dynamic.unsqueeze(-1),
                  "loss_model_representation":
                  opts.lambda_kl * opts.lambda_representation * representation.unsqueeze(-1)}
        else:
            kl = {"loss_model_kl": opts.lambda_kl * trl.categorical_kl_balanced(
                posterior_logits, prior_logits, alpha=opts.kl_alpha,
                free_bits=opts.free_bits).unsqueeze(-1)}
        target, prediction = pixels.contiguous(), reco_pixels.contiguous()
        if opts.reco_symlog:
            target, prediction = trl.symlog(target), trl.symlog(prediction)
        else:
            if not target.is_floating_point():
                target = target.float() / 255.0
            prediction = prediction.float()
        error = target - prediction
        reconstruction = error.pow(2) if opts.reco_loss == "l2" else error.abs()
        if not opts.global_average:
            reconstruction = reconstruction.reshape(*true_reward.shape[:-1], -1).sum(-1)
        heads = [reconstruction.mean().unsqueeze(-1)]
        reward = trl.two_hot_cross_entropy(reward_logits, true_reward, reward_bins)
        losses = {"loss_model_reco": opts.lambda_reco * sum(heads),  # its sum over the heads
                  "loss_model_reward": opts.lambda_reward * reward.mean().unsqueeze(-1), **kl}
        if opts.has_continue:
            target = (~terminated).float() * opts.continue_target_scale
            bce = F.binary_cross_entropy_with_logits(continue_pred.squeeze(-1), target.squeeze(-1))
            losses["loss_model_continue"] = opts.lambda_continue * bce.unsqueeze(-1)
        return losses

    return fn


def torchrl_v3_gap(options: Mapping) -> str | None:
    """Why torchrl's DreamerV3ModelLoss cannot compute the loss of ``options`` (keyword arguments
    of :func:`dreamer_v3_model_loss`), or None when it can."""
    asked = [name for name, value in TORCHRL_V3_FIXED.items() if options.get(name, value) != value]
    if not asked:
        return None
    return ("torchrl's DreamerV3ModelLoss has no "
            + ", ".join(f"{name}={options[name]!r}" for name in asked) + " (it computes "
            + ", ".join(f"{name}={TORCHRL_V3_FIXED[name]!r}" for name in asked) + ")")


def loss_fn_v3(impl: str, options: Mapping, device: str) -> Callable:
    """``impl``'s DreamerV3 loss with ``options``: a function of the :data:`V3_ARGS` that returns
    the losses by name."""
    if impl == "fused":
        return lambda *t: dreamer_v3_model_loss(*t, **options, backend="triton")
    if impl == "eager":
        return lambda *t: reference_v3.dreamer_v3_model_loss(*t, **options)
    if impl == "compiled":
        return torch.compile(lambda *t: reference_v3.dreamer_v3_model_loss(*t, **options))
    return torchrl_v3_loss_fn(V3Options(**options), device)


def loss_terms(losses) -> tuple[torch.Tensor, ...]:
    """The losses of one call: the Dreamer loss's tuple, or the values of the DreamerV3 loss's
    dict."""
    return tuple(losses.values()) if isinstance(losses, Mapping) else tuple(losses)


def fused_rtol(dtype: torch.dtype) -> float:
    """The relative error (of each loss, and of each gradient as a whole) :func:`check_fused`
    accepts against the float64 reference."""
    return 1e-4 if dtype == torch.float32 else 2e-2


def _disagreement(pairs, dtype: torch.dtype) -> str | None:
    """The first ``(what, fused, float64 reference)`` of ``pairs`` whose relative error exceeds
    :func:`fused_rtol`, said in words; None when all agree."""
    rtol = fused_rtol(dtype)
    for what, a, b in pairs:
        err = float((a.detach().double() - b.detach()).norm() / b.detach().norm().clamp_min(1e-30))
        if not math.isfinite(err) or err > rtol:
            return f"{what}: relative error {err:.2e} > {rtol:.0e}"
    return None


def check_fused(inputs: list[torch.Tensor], reco_loss: str) -> str | None:
    """Why the fused result differs from the float64 reference, or None when it agrees."""
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    want = [t for t in leaves if t.requires_grad]
    ref = reference.dreamer_model_loss(*leaves, reco_loss=reco_loss)
    ref_grads = torch.autograd.grad(ref, want)
    out = dreamer_model_loss(*inputs, reco_loss=reco_loss, backend="triton")
    grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad])
    return _disagreement([*zip(("loss_kl", "loss_reco", "loss_reward"), out, ref),
                          *zip(("grad",) * 6, grads, ref_grads)], inputs[0].dtype)


def check_fused_v3(inputs: list[torch.Tensor], options: Mapping) -> str | None:
    """Why the fused DreamerV3 result (each loss, and the gradient of each input that needs one)
    differs from the float64 reference, or None when it agrees."""
    leaves = [t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t
              for t in inputs]
    ref = reference_v3.dreamer_v3_model_loss(*leaves, **options)
    ref_grads = torch.autograd.grad(loss_terms(ref), [t for t in leaves if t.requires_grad])
    out = dreamer_v3_model_loss(*inputs, **options, backend="triton")
    grads = torch.autograd.grad(loss_terms(out), [t for t in inputs if t.requires_grad])
    names = [f"grad {name}" for name, t in zip(V3_ARGS, inputs) if t.requires_grad]
    return _disagreement([*((name, out[name], ref[name]) for name in ref),
                          *zip(names, grads, ref_grads)], inputs[0].dtype)

