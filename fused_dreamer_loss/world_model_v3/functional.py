"""The functional DreamerV3 model loss: validation, then the one place that picks a backend."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.dispatch import (NO_KEY, bins_key, cacheable, call_key, calls_table, remember,
                             require_triton, resolve_backend, values_key)
from ..core.validation import check_backend, kernels_can_take
from . import reference
from .validation import (
    DEFAULT_NUM_REWARD_BINS,
    V3Options,
    V3Shapes,
    as_heads,
    validate_v3_inputs,
)


#: Where ``reco_symlog`` and ``reward_bins`` are in the options (:class:`V3Options`' order); the
#: others are keyed as values.
_SYMLOG, _BINS = 12, 16
#: Prepared calls by signature (see :func:`fused_dreamer_loss.core.dispatch.call_key`).
_CALLS = calls_table()


def _heads_of(value) -> tuple:
    """The heads of a ``pixels`` or ``reco_pixels`` argument, unchecked (:func:`as_heads`
    checks them when the call is prepared)."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _symlog_key(reco_symlog) -> tuple:
    entries = reco_symlog if isinstance(reco_symlog, (list, tuple)) else (reco_symlog,)
    return type(reco_symlog), values_key(entries)


def _fused_v3(opts: V3Options, shapes: V3Shapes, posterior_logits, prior_logits, pixels,
              reco_pixels, true_reward, reward_pred, continue_pred, terminated):
    """The fused Triton kernels prepared for inputs checked as for
    :func:`fused_dreamer_loss.reference.checked_dreamer_v3_model_loss`: a function of those
    inputs that returns the losses."""
    if opts.reward_two_hot and torch.is_grad_enabled():
        for name, t in (("true_reward", true_reward), ("reward_bins", opts.reward_bins)):
            if t is not None and t.requires_grad:
                raise ValueError(
                    f"{name} requires grad, but the fused two-hot reward loss has no gradient "
                    f"for it (torch's runs through the two-hot weights): detach {name}, or use "
                    "backend='torch'"
                )
    kernels = _triton_kernels()
    bins = (kernels.reward_support(opts, true_reward.device, shapes.reward_dtype)
            if opts.reward_two_hot else None)
    prepared = kernels.Prepared(opts, shapes, kernels.kernel_inputs(
        posterior_logits, prior_logits, pixels, reco_pixels, true_reward, reward_pred,
        continue_pred, terminated, bins, opts))

    def run(*args):
        return prepared(kernels.kernel_inputs(*args, bins, opts))

    return run


def _prepare(args: tuple, options: tuple, backend: str):
    """Validate a call (``args``: :func:`dreamer_v3_model_loss`'s) and pick its backend: a
    function of the call's tensors (the heads as tuples) that computes the losses, for every call
    of the same signature. Raises on bad input."""
    opts = V3Options(*options)
    posterior_logits, prior_logits, pixels, reco_pixels, *rest = args
    pixels, reco_pixels = as_heads("pixels", pixels), as_heads("reco_pixels", reco_pixels)
    args = (posterior_logits, prior_logits, pixels, reco_pixels, *rest)
    shapes = validate_v3_inputs(*args, opts)
    check_backend(backend)
    tensors = (posterior_logits, prior_logits, *pixels, *reco_pixels, *rest)
    if kernels_can_take(tensors) and resolve_backend(backend, posterior_logits.device) != "torch":
        return _fused_v3(opts, shapes, *args)
    return lambda *a: reference.checked_dreamer_v3_model_loss(*a, opts, shapes)


def _triton_kernels():
    """The fused V3 kernel module (importing triton), or a RuntimeError saying why it cannot run."""
    require_triton()
    from . import kernels
    return kernels


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
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """The DreamerV3 world-model loss: categorical KL, reconstruction, reward and continue terms.

    The numbers of torchrl's ``DreamerV3ModelLoss``, whose option names and defaults these are;
    :data:`fused_dreamer_loss.V3_CONVENTIONS` holds the options of other implementations. The math
    of each term is in :mod:`fused_dreamer_loss.reference_v3`.

    Args:
        posterior_logits, prior_logits: the RSSM's categorical logits, shape ``[*B, S, K]``: ``*B``
            the batch dims (at least one, e.g. ``[batch, time]``), S categoricals of K classes.
        pixels, reco_pixels: target and prediction of each reconstruction head, shape
            ``[*B, *I]`` with at least one event dim: a tensor each, or lists of equal length (one
            pair per head; the heads' losses are summed). Targets may be float or integer (e.g.
            uint8); predictions are float.
        true_reward: the raw reward, shape ``[*B, 1]``.
        reward_pred: reward logits ``[*B, R]`` with ``reward_two_hot`` (R = ``len(reward_bins)``
            if given, else ``num_reward_bins``), else a scalar prediction ``[*B, 1]``.
        continue_pred, terminated: continue logits and the terminal flag (bool or float), shape
            ``[*B, 1]``; needed when ``lambda_continue > 0``.
        lambda_kl, lambda_reco, lambda_reward, lambda_continue: weights of the terms; the continue
            term is computed only when ``lambda_continue > 0``.
        kl_mode: ``"balanced"`` (``kl_alpha·KL(sg(q)‖p) + (1 − kl_alpha)·KL(q‖sg(p))`` with
            ``free_bits`` per categorical, probabilities floored at 1e-8, no unimix) or
            ``"separate"`` (dynamics and representation terms, weighted ``lambda_kl ·
            lambda_dynamic`` and ``lambda_kl · lambda_representation``, with ``free_bits`` on the
            KL summed over the categoricals of a row, when non-zero).
        unimix: uniform mixture of the separate mode's categoricals, in [0, 1).
        continue_target_scale: the continue target is ``(1 − terminated)·continue_target_scale``;
            in (0, 1].
        kl_alpha: the balance of the balanced mode, in [0, 1].
        free_bits: free nats (non-negative).
        reco_loss: ``"l2"`` (squared error) or ``"l1"`` (absolute error).
        reco_symlog: ``True`` (symlog of target and prediction), ``False`` (no transform; integer
            targets become ``x·pixels_scale + pixels_offset``), ``"target"`` (symlog of the target
            only), or a list of these, one per head.
        reward_two_hot: two-hot cross-entropy over the bins, or symlog squared error of a scalar.
        num_reward_bins: the size of torchrl's default support (``symexp`` of a uniform grid of
            [−20, 20]), used when ``reward_bins`` is None.
        global_average: average the reconstruction over all elements instead of summing each row
            over its event dims and averaging over the rows.
        reward_bins: a support of your own: 1-D, strictly ascending (checked only for a Python
            sequence or a CPU tensor, since reading a device tensor would synchronise). Bins
            given as a sequence or on the CPU are copied to the inputs' device at every call (a
            host-to-device copy, which a CUDA graph cannot capture): for a training step, put
            them on the inputs' device (``FusedDreamerV3ModelLoss`` keeps its bins as a buffer
            on its device).
        two_hot_space: ``"raw"`` (interpolate between bins in raw values, as torchrl) or
            ``"symlog"`` (after symlog of the reward and of the bins: the 2023 reference,
            dreamerv3-torch, SheepRL).
        pixels_scale, pixels_offset: the normalisation of integer targets of heads without symlog.
        backend: ``"auto"`` (the fused kernels for CUDA tensors, the reference otherwise),
            ``"triton"`` (the fused kernels; CPU tensors only with ``TRITON_INTERPRET=1`` set
            before triton is imported) or ``"torch"`` (the pure-torch reference). ``meta``
            tensors and those of ``torch.func`` transforms always run the reference. The fused
            kernels keep torch's autograd contract as the Dreamer loss's do (see the README).

    Returns:
        A dict of 0-dim losses, each with its lambdas applied, under torchrl's names:
        ``loss_model_kl`` (balanced) or ``loss_model_dynamic`` and ``loss_model_representation``
        (separate), ``loss_model_reco``, ``loss_model_reward``, and ``loss_model_continue`` when
        ``lambda_continue > 0``. Each is computed and returned in float32, or float64 when one of
        its term's floating inputs is float64 (float16/bfloat16 inputs are upcast); gradients take
        the dtype of their input. Where torchrl returns NaN (``unimix=0`` with a class whose
        softmax underflows) the loss is the finite, right value.

    Raises:
        TypeError: non-tensor inputs, dtypes outside those above, options of the wrong type.
        ValueError: shapes, batch dims, head counts or devices that disagree, an empty batch,
            categorical or head, a missing continue input, option values out of range (the message
            names the argument and lists the allowed values); with the fused kernels, a
            ``true_reward`` or ``reward_bins`` that requires grad under ``reward_two_hot``.
        RuntimeError: ``backend="triton"`` where Triton cannot run.

    Example:
        >>> import torch
        >>> from fused_dreamer_loss import V3_CONVENTIONS, dreamer_v3_model_loss
        >>> B, T, S, K = 2, 4, 4, 4
        >>> posterior = torch.randn(B, T, S, K, requires_grad=True)
        >>> prior = torch.randn(B, T, S, K, requires_grad=True)
        >>> pixels = torch.randint(0, 256, (B, T, 3, 8, 8), dtype=torch.uint8)
        >>> reco_pixels = torch.rand(B, T, 3, 8, 8, requires_grad=True)
        >>> reward, reward_logits = torch.randn(B, T, 1), torch.randn(B, T, 255)
        >>> continue_logits = torch.randn(B, T, 1)
        >>> terminated = torch.zeros(B, T, 1, dtype=torch.bool)
        >>> losses = dreamer_v3_model_loss(
        ...     posterior, prior, pixels, reco_pixels, reward, reward_logits, continue_logits,
        ...     terminated, **V3_CONVENTIONS["dreamerv3-2024"], backend="torch")
        >>> for name, loss in losses.items():
        ...     print(name, tuple(loss.shape), loss.dtype)
        loss_model_reco () torch.float32
        loss_model_reward () torch.float32
        loss_model_dynamic () torch.float32
        loss_model_representation () torch.float32
        loss_model_continue () torch.float32
        >>> sum(losses.values()).backward()
        >>> prior.grad.shape
        torch.Size([2, 4, 4, 4])
    """
    options = (lambda_kl, lambda_reco, lambda_reward, lambda_continue, kl_mode, lambda_dynamic,
               lambda_representation, unimix, continue_target_scale, kl_alpha, free_bits,
               reco_loss, reco_symlog, reward_two_hot, num_reward_bins, global_average,
               reward_bins, two_hot_space, pixels_scale, pixels_offset)
    targets, predictions = _heads_of(pixels), _heads_of(reco_pixels)
    bins = bins_key(reward_bins) if cacheable() else NO_KEY
    key = None if bins is NO_KEY else call_key(
        (posterior_logits, prior_logits, *targets, *predictions, true_reward, reward_pred,
         continue_pred, terminated),
        (values_key(options[:_SYMLOG] + options[_SYMLOG + 1:_BINS] + options[_BINS + 1:]),
         _symlog_key(reco_symlog), bins, len(targets), len(predictions)), backend)
    prepared = _CALLS.get(key) if key is not None else None
    if prepared is None:
        prepared = _prepare((posterior_logits, prior_logits, pixels, reco_pixels, true_reward,
                             reward_pred, continue_pred, terminated), options, backend)
        remember(_CALLS, key, prepared)
    return prepared(posterior_logits, prior_logits, targets, predictions, true_reward,
                    reward_pred, continue_pred, terminated)
