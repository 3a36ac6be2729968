"""The small math that several loss families share, in pure torch: symlog and its inverse, and the
two-hot encoding over a support of bins with its cross-entropy (the DreamerV3 reward head and the
DreamerV3 critic both use them).
"""

from __future__ import annotations

import torch

#: torchrl's default number of two-hot bins (its reward and value supports).
DEFAULT_NUM_BINS = 255
# The default two-hot support spans symexp(−BIN_RANGE) … symexp(BIN_RANGE).
BIN_RANGE = 20.0


def symlog(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)·log(1 + |x|)``, with the derivative ``1/(1 + |x|)`` everywhere, 1 at 0 included."""
    compressed = torch.sign(x) * torch.log1p(torch.abs(x))
    return torch.where(x != 0, compressed, x)


def symexp(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)·(exp(|x|) − 1)``, the inverse of :func:`symlog`."""
    expanded = torch.sign(x) * torch.expm1(torch.abs(x))
    return torch.where(x != 0, expanded, x)


def default_bins(num_bins: int = DEFAULT_NUM_BINS,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """torchrl's default two-hot support (its reward and value bins): ``symexp`` of ``num_bins``
    evenly spaced points of [−20, 20], built in float32 (the dtype of torchrl's buffer) and exactly
    antisymmetric.

    Odd ``num_bins`` put a bin at 0; the negative half is computed and mirrored.

    Example:
        >>> default_bins(5)
        tensor([-4.8517e+08, -2.2025e+04,  0.0000e+00,  2.2025e+04,  4.8517e+08])
    """
    half = num_bins // 2
    if num_bins % 2:
        negative = symexp(torch.linspace(-BIN_RANGE, 0.0, half + 1, device=device,
                                         dtype=torch.float32))
        return torch.cat((negative, -negative[:-1].flip(0)))
    step = 2 * BIN_RANGE / (num_bins - 1)
    grid = torch.arange(half, device=device, dtype=torch.float32) * step - BIN_RANGE
    negative = symexp(grid)
    return torch.cat((negative, -negative.flip(0)))


def two_hot(x: torch.Tensor, bins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lower, w_lower, w_upper)``: ``x`` spread over bins ``lower`` and ``lower + 1``.

    ``x`` is clamped to ``[bins[0], bins[-1]]``; ``lower = #(bins <= x) − 1`` clamped to
    ``[0, R − 2]``; the weights interpolate linearly between the two bins and sum to 1.
    """
    x = x.clamp(min=bins[0], max=bins[-1])
    lower = ((x.unsqueeze(-1) >= bins).sum(-1) - 1).clamp(0, bins.numel() - 2)
    below, above = bins[lower], bins[lower + 1]
    w_upper = (x - below) / (above - below)
    return lower, 1 - w_upper, w_upper


def two_hot_cross_entropy(logits: torch.Tensor, lower: torch.Tensor, w_lower: torch.Tensor,
                          w_upper: torch.Tensor) -> torch.Tensor:
    """``logsumexp(l) − (w_lower·l[lower] + w_upper·l[lower + 1])`` per row: the cross-entropy of
    ``softmax(logits)`` against the two-hot target (gradient ``softmax(l) − two_hot``)."""
    index = lower.unsqueeze(-1)
    at_lower = logits.gather(-1, index).squeeze(-1)
    at_upper = logits.gather(-1, index + 1).squeeze(-1)
    return torch.logsumexp(logits, dim=-1) - (w_lower * at_lower + w_upper * at_upper)
