"""Argument checks of the Dreamer (V1) model loss, shared by every backend.

Everything here looks at shapes, dtypes, devices and Python options only: no tensor value is read,
so validation never synchronises the host with the device.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..core.validation import FLOAT_DTYPES, check_bool, check_choice, check_fit, check_real

DISTANCES = ("l2", "l1", "smooth_l1")

LATENT_NAMES = ("prior_mean", "prior_std", "posterior_mean", "posterior_std")
IMAGE_NAMES = ("pixels", "reco_pixels")
REWARD_NAMES = ("true_reward", "pred_reward")


@dataclass(frozen=True)
class LossOptions:
    """The scalar options of the Dreamer model loss, checked once at construction."""

    lambda_kl: float = 1.0
    lambda_reco: float = 1.0
    lambda_reward: float = 1.0
    reco_loss: str = "l2"
    reward_loss: str = "l2"
    free_nats: float = 3.0
    delayed_clamp: bool = False
    global_average: bool = False

    def __post_init__(self) -> None:
        for name in ("lambda_kl", "lambda_reco", "lambda_reward", "free_nats"):
            object.__setattr__(self, name, check_real(name, getattr(self, name)))
        for name in ("reco_loss", "reward_loss"):
            check_choice(name, getattr(self, name), DISTANCES)
        for name in ("delayed_clamp", "global_average"):
            check_bool(name, getattr(self, name))


@dataclass(frozen=True)
class LossShapes:
    """What the kernels need to know about the inputs: rows = prod(*B), and the dtype of each loss
    (its term's tensors promoted, as torch's arithmetic does)."""

    batch_shape: torch.Size
    rows: int
    latent_dim: int
    image_numel: int
    loss_dtypes: tuple[torch.dtype, torch.dtype, torch.dtype]


def check_options_fit(opts: LossOptions, shapes: LossShapes) -> None:
    """Each free-nats value and lambda must be representable in its term's dtype (as torch's
    ``clamp_min`` requires of its bound): no silent overflow to inf.

    Raises:
        ValueError: naming the option, its value and the dtype it must fit.
    """
    terms = {"lambda_kl": 0, "free_nats": 0, "lambda_reco": 1, "lambda_reward": 2}
    check_fit([(name, getattr(opts, name), shapes.loss_dtypes[term])
               for name, term in terms.items()])


def _check_group(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> torch.dtype:
    """Same shape within one loss term; returns the term's promoted dtype."""
    first_name, first = names[0], tensors[0]
    for name, tensor in zip(names[1:], tensors[1:]):
        if tensor.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but {first_name} has shape "
                f"{tuple(first.shape)}; they must match"
            )
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


def validate_inputs(
    prior_mean: torch.Tensor,
    prior_std: torch.Tensor,
    posterior_mean: torch.Tensor,
    posterior_std: torch.Tensor,
    pixels: torch.Tensor,
    reco_pixels: torch.Tensor,
    true_reward: torch.Tensor,
    pred_reward: torch.Tensor,
) -> LossShapes:
    """Check the eight input tensors and return their shape summary.

    Raises:
        TypeError: a non-tensor, or a dtype that is not float16/bfloat16/float32/float64. Float
            dtypes may differ within a term: its loss takes their promoted dtype.
        ValueError: mismatched shapes, batch dims that disagree, an empty batch or latent dim, a reward
            whose last dim is not 1, or tensors on different devices.
    """
    names = LATENT_NAMES + IMAGE_NAMES + REWARD_NAMES
    tensors = (prior_mean, prior_std, posterior_mean, posterior_std, pixels, reco_pixels,
               true_reward, pred_reward)
    for name, tensor in zip(names, tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} has dtype {tensor.dtype}; expected one of "
                f"{', '.join(str(d) for d in FLOAT_DTYPES)}"
            )
    devices = {tensor.device for tensor in tensors}
    if len(devices) > 1:
        placed = ", ".join(f"{name} on {tensor.device}" for name, tensor in zip(names, tensors))
        raise ValueError(f"all inputs must be on one device, got {placed}")

    loss_dtypes = (_check_group(LATENT_NAMES, tensors[0:4]),
                   _check_group(IMAGE_NAMES, tensors[4:6]),
                   _check_group(REWARD_NAMES, tensors[6:8]))

    if prior_mean.dim() < 2:
        raise ValueError(
            f"prior_mean must have shape [*B, D] with at least one batch dim, got "
            f"{tuple(prior_mean.shape)}"
        )
    batch_shape, latent_dim = prior_mean.shape[:-1], prior_mean.shape[-1]
    rows = math.prod(batch_shape)
    if rows == 0:
        raise ValueError(f"the batch is empty: prior_mean has shape {tuple(prior_mean.shape)}")
    if latent_dim == 0:
        raise ValueError(f"the latent dim is empty: prior_mean has shape {tuple(prior_mean.shape)}")
    nb = len(batch_shape)
    if pixels.dim() <= nb or pixels.shape[:nb] != batch_shape:
        raise ValueError(
            f"pixels must have shape [*B, *I] with the latents' batch dims B={tuple(batch_shape)} "
            f"and at least one image dim, got {tuple(pixels.shape)}"
        )
    if pixels.numel() == 0:
        raise ValueError(f"the images are empty: pixels has shape {tuple(pixels.shape)}")
    if true_reward.shape != (*batch_shape, 1):
        raise ValueError(
            f"true_reward must have shape [*B, 1] = {(*batch_shape, 1)} to match the latents' "
            f"batch dims, got {tuple(true_reward.shape)}"
        )
    return LossShapes(batch_shape, rows, latent_dim, pixels.numel(), loss_dtypes)
