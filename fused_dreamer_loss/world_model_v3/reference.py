"""The pure-torch DreamerV3 world-model loss: the spec of the fused V3 kernels and their oracle.

It computes what torchrl's ``DreamerV3ModelLoss`` computes (Hafner et al., 2023), term by term, in
the order the kernels compute them: KL rows, reward rows, continue rows, image heads. A row is one
element of the batch dims ``*B``. Per categorical, ``s = softmax(l)``; q is the posterior, p the
prior.

KL rows, ``kl_mode="separate"`` (the reference DreamerV3)::

    q, p = (1 − u)·s + u/K,   their logs: log_softmax(l) if u = 0 else log((1 − u)·s + u/K)
    kl_row = Σ_{S,K} q·(log q − log p)
    dyn = mean(max(kl_row, free_bits)), gradient to the prior logits only
    rep = mean(max(kl_row, free_bits)), gradient to the posterior logits only

The free nats apply to the sum over the S categoricals, and only when ``free_bits`` is non-zero
(as torchrl: ``free_bits=0`` leaves tiny negative rounding of a KL unclamped).

KL rows, ``kl_mode="balanced"`` (torchrl's default; ``unimix`` is not used)::

    q, p = clamp(s, min=1e-8),   kl_cat = Σ_K q·(log q − log p)    per categorical
    kl = α·mean(max(kl_cat(sg(q) ‖ p), free_bits)) + (1 − α)·mean(max(kl_cat(q ‖ sg(p)), free_bits))

Reward rows: two-hot cross-entropy ``logsumexp(l) − (w_lo·l_lo + w_hi·l_hi)`` against the reward
spread linearly over the two bins around it (in raw space, or with ``two_hot_space="symlog"`` after
symlog of the reward and of the bins), or ``(symlog(r) − symlog(r̂))²`` for a scalar head.

Continue rows: BCE with logits against ``c = (1 − terminated)·continue_target_scale``.

Image heads: ``d = target − prediction`` after the head's transform (symlog of both, of the target
only, or none: integer targets become ``x·pixels_scale + pixels_offset``), ``d²`` or ``|d|``
summed over each row's event dims and averaged over the rows (``global_average``: averaged over all
elements); the heads' losses are summed.

Numerics: every term is computed in float32, or float64 when one of its floating inputs is
float64; float16/bfloat16 inputs are upcast, and each loss is returned in its term's dtype. The
log-probabilities are computed stably: where torchrl returns NaN (``unimix=0`` and a class whose
softmax underflows to 0, so ``0·log 0``), this returns the finite, right value (log-softmax);
where an underflowing prior class makes torchrl's KL inf, the true, large but finite KL.
Everywhere else the numbers are torchrl's, up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..core.math import symexp, symlog, two_hot, two_hot_cross_entropy
from ..core.math import default_bins as default_reward_bins
from .validation import (
    DEFAULT_NUM_REWARD_BINS,
    SYMLOG_BOTH,
    SYMLOG_NONE,
    V3Options,
    V3Shapes,
    as_heads,
    validate_v3_inputs,
)

# Balanced mode floors each probability at this value before its log, as torchrl does.
BALANCED_PROB_FLOOR = 1e-8

# ---- KL rows -------------------------------------------------------------------------------------


def categorical_log_probs(logits: torch.Tensor, kl_mode: str,
                          unimix: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs, log_probs)`` over the last dim, as the KL of ``kl_mode`` uses them.

    ``"balanced"``: ``clamp(softmax, min=1e-8)`` and its log. ``"separate"``: the unimix mixture
    ``(1 − u)·softmax + u/K`` and its log; with ``u = 0``, the softmax and the log-softmax (finite
    where the softmax underflows).
    """
    probs = torch.softmax(logits, dim=-1)
    if kl_mode == "balanced":
        probs = probs.clamp(min=BALANCED_PROB_FLOOR)
        return probs, probs.log()
    if not unimix:
        return probs, torch.log_softmax(logits, dim=-1)
    probs = (1 - unimix) * probs + unimix / logits.shape[-1]
    return probs, probs.log()


def categorical_kl_terms(posterior_logits: torch.Tensor, prior_logits: torch.Tensor, kl_mode: str,
                         unimix: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(q ‖ p) per categorical, shape ``[*B, S]``, twice: ``(dynamics, representation)``.

    The two have the same values; the dynamics term's gradient goes to the prior logits only
    (``sg(q)``), the representation term's to the posterior logits only (``sg(p)``).
    """
    q, log_q = categorical_log_probs(posterior_logits, kl_mode, unimix)
    p, log_p = categorical_log_probs(prior_logits, kl_mode, unimix)
    dynamics = (q.detach() * (log_q.detach() - log_p)).sum(-1)
    representation = (q * (log_q - log_p.detach())).sum(-1)
    return dynamics, representation


def kl_losses(posterior_logits: torch.Tensor, prior_logits: torch.Tensor,
              opts: V3Options) -> dict[str, torch.Tensor]:
    """``{"loss_model_kl"}`` (balanced) or ``{"loss_model_dynamic", "loss_model_representation"}``
    (separate), each with its lambdas applied."""
    dynamics, representation = categorical_kl_terms(posterior_logits, prior_logits, opts.kl_mode,
                                                    opts.unimix)
    if opts.kl_mode == "balanced":
        dynamics = dynamics.clamp_min(opts.free_bits).mean()
        representation = representation.clamp_min(opts.free_bits).mean()
        kl = opts.kl_alpha * dynamics + (1.0 - opts.kl_alpha) * representation
        return {"loss_model_kl": opts.lambda_kl * kl}
    dynamics, representation = dynamics.sum(-1), representation.sum(-1)
    if opts.free_bits:
        dynamics = dynamics.clamp_min(opts.free_bits)
        representation = representation.clamp_min(opts.free_bits)
    return {
        "loss_model_dynamic": (opts.lambda_kl * opts.lambda_dynamic) * dynamics.mean(),
        "loss_model_representation": (opts.lambda_kl * opts.lambda_representation)
        * representation.mean(),
    }


# ---- reward rows ---------------------------------------------------------------------------------


def reward_rows(true_reward: torch.Tensor, reward_pred: torch.Tensor, bins: torch.Tensor | None,
                two_hot_space: str) -> torch.Tensor:
    """The reward loss per row, shape ``[*B]``: two-hot cross-entropy over ``bins`` (the support
    in raw space, same dtype as the inputs), or symlog squared error when ``bins`` is None."""
    reward = true_reward.squeeze(-1)
    if bins is None:
        return (symlog(reward) - symlog(reward_pred.squeeze(-1))).square()
    if two_hot_space == "symlog":
        reward, bins = symlog(reward), symlog(bins)
    return two_hot_cross_entropy(reward_pred, *two_hot(reward, bins))


# ---- continue rows -------------------------------------------------------------------------------


def continue_rows(continue_pred: torch.Tensor, terminated: torch.Tensor,
                  target_scale: float) -> torch.Tensor:
    """BCE with logits per row, shape ``[*B]``, against ``c = (1 − terminated)·target_scale``:
    ``softplus(l) − c·l``, computed stably (gradient ``sigmoid(l) − c``)."""
    target = (1 - terminated.to(continue_pred.dtype)) * target_scale
    return F.binary_cross_entropy_with_logits(continue_pred.squeeze(-1), target.squeeze(-1),
                                              reduction="none")


# ---- image heads ---------------------------------------------------------------------------------


def reconstruction_head(target: torch.Tensor, prediction: torch.Tensor, head_symlog: str,
                        opts: V3Options, batch_dims: int, dtype: torch.dtype) -> torch.Tensor:
    """One head's reconstruction loss (0-dim, in ``dtype``) before ``lambda_reco``.

    ``head_symlog``: ``"both"`` compares ``symlog(target)`` with ``symlog(prediction)``,
    ``"target"`` ``symlog(target)`` with ``prediction``, ``"none"`` the target (integer targets
    normalised to ``x·pixels_scale + pixels_offset``) with ``prediction``. Symlogged integer
    targets are not normalised (torchrl symlogs raw uint8 values).
    """
    integer_target = not target.is_floating_point()
    target, prediction = target.to(dtype), prediction.to(dtype)
    if head_symlog == SYMLOG_NONE:
        if integer_target:
            target = target * opts.pixels_scale + opts.pixels_offset
    else:
        target = symlog(target)
        if head_symlog == SYMLOG_BOTH:
            prediction = symlog(prediction)
    error = target - prediction
    distance = error.square() if opts.reco_loss == "l2" else error.abs()
    if not opts.global_average:
        distance = distance.flatten(batch_dims).sum(-1)
    return distance.mean()


# ---- the loss ------------------------------------------------------------------------------------


def dreamer_v3_model_loss(
    posterior_logits: torch.Tensor,
    prior_logits: torch.Tensor,
    pixels: torch.Tensor | Sequence[torch.Tensor],
    reco_pixels: torch.Tensor | Sequence[torch.Tensor],
    true_reward: torch.Tensor,
    reward_pred: torch.Tensor,
    continue_pred: torch.Tensor | None = None,
    terminated: torch.Tensor | None = None,
    *,
    lambda_kl: float = 1.0,
    lambda_reco: float = 1.0,
    lambda_reward: float = 1.0,
    lambda_continue: float = 0.0,
    kl_mode: str = "balanced",
    lambda_dynamic: float = 1.0,
    lambda_representation: float = 0.1,
    unimix: float = 0.0,
    continue_target_scale: float = 1.0,
    kl_alpha: float = 0.8,
    free_bits: float = 1.0,
    reco_loss: str = "l2",
    reco_symlog: bool | str | Sequence[bool | str] = True,
    reward_two_hot: bool = True,
    num_reward_bins: int = DEFAULT_NUM_REWARD_BINS,
    global_average: bool = False,
    reward_bins: torch.Tensor | Sequence[float] | None = None,
    two_hot_space: str = "raw",
    pixels_scale: float = 1.0 / 255.0,
    pixels_offset: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The DreamerV3 world-model loss in plain torch ops; arguments as in
    :func:`fused_dreamer_loss.dreamer_v3_model_loss` (which has ``backend`` besides).

    Returns:
        A dict of 0-dim losses with their lambdas applied, under torchrl's names:
        ``loss_model_kl`` (balanced) or ``loss_model_dynamic`` and ``loss_model_representation``
        (separate), ``loss_model_reco``, ``loss_model_reward``, and ``loss_model_continue`` when
        ``lambda_continue > 0``.

    Example:
        >>> import torch
        >>> from fused_dreamer_loss.reference_v3 import dreamer_v3_model_loss
        >>> B, T, S, K = 2, 4, 4, 4
        >>> posterior, prior = torch.randn(B, T, S, K), torch.randn(B, T, S, K)
        >>> pixels = torch.randint(0, 256, (B, T, 3, 8, 8), dtype=torch.uint8)
        >>> reco_pixels = torch.rand(B, T, 3, 8, 8)
        >>> reward, reward_logits = torch.randn(B, T, 1), torch.randn(B, T, 255)
        >>> losses = dreamer_v3_model_loss(posterior, prior, pixels, reco_pixels, reward,
        ...                                reward_logits, kl_mode="separate", unimix=0.01,
        ...                                reco_symlog=False)
        >>> sorted(losses)
        ['loss_model_dynamic', 'loss_model_reco', 'loss_model_representation', 'loss_model_reward']
    """
    opts = V3Options(lambda_kl, lambda_reco, lambda_reward, lambda_continue, kl_mode,
                     lambda_dynamic, lambda_representation, unimix, continue_target_scale,
                     kl_alpha, free_bits, reco_loss, reco_symlog, reward_two_hot, num_reward_bins,
                     global_average, reward_bins, two_hot_space, pixels_scale, pixels_offset)
    pixels, reco_pixels = as_heads("pixels", pixels), as_heads("reco_pixels", reco_pixels)
    shapes = validate_v3_inputs(posterior_logits, prior_logits, pixels, reco_pixels, true_reward,
                                reward_pred, continue_pred, terminated, opts)
    return checked_dreamer_v3_model_loss(posterior_logits, prior_logits, pixels, reco_pixels,
                                         true_reward, reward_pred, continue_pred, terminated,
                                         opts, shapes)


def checked_dreamer_v3_model_loss(
    posterior_logits: torch.Tensor,
    prior_logits: torch.Tensor,
    pixels: tuple[torch.Tensor, ...],
    reco_pixels: tuple[torch.Tensor, ...],
    true_reward: torch.Tensor,
    reward_pred: torch.Tensor,
    continue_pred: torch.Tensor | None,
    terminated: torch.Tensor | None,
    opts: V3Options,
    shapes: V3Shapes,
) -> dict[str, torch.Tensor]:
    """:func:`dreamer_v3_model_loss` on inputs and options already checked by the caller: one
    tensor per head in ``pixels`` and ``reco_pixels``, ``shapes`` from ``validate_v3_inputs``."""
    dtype = shapes.kl_dtype
    kl = kl_losses(posterior_logits.to(dtype), prior_logits.to(dtype), opts)

    dtype = shapes.reward_dtype
    bins = None
    if opts.reward_two_hot:
        support = opts.reward_bins
        if support is None:
            support = default_reward_bins(opts.num_reward_bins, true_reward.device)
        bins = support.to(device=true_reward.device, dtype=dtype)
    reward = reward_rows(true_reward.to(dtype), reward_pred.to(dtype), bins,
                         opts.two_hot_space).mean()

    cont = {}
    if opts.has_continue:
        dtype = shapes.continue_dtype
        rows = continue_rows(continue_pred.to(dtype), terminated, opts.continue_target_scale)
        cont["loss_model_continue"] = opts.lambda_continue * rows.mean()

    batch_dims = len(shapes.batch_shape)
    reco = sum(reconstruction_head(target, prediction, mode, opts, batch_dims, shapes.reco_dtype)
               for target, prediction, mode in zip(pixels, reco_pixels, shapes.head_symlog))

    return {"loss_model_reco": opts.lambda_reco * reco,
            "loss_model_reward": opts.lambda_reward * reward, **kl, **cont}
