"""Fused Triton kernels for the Dreamer world-model loss, a drop-in for torchrl's DreamerModelLoss.

- :func:`dreamer_model_loss`: the functional loss (fused kernels on CUDA, pure torch elsewhere).
- :class:`FusedDreamerModelLoss`: the tensordict module, a drop-in for torchrl's loss.
- :mod:`fused_dreamer_loss.reference`: the pure-torch reference, the spec of the math.
"""

from .functional import dreamer_model_loss
from .module import FusedDreamerModelLoss

__all__ = ["FusedDreamerModelLoss", "dreamer_model_loss"]
__version__ = "0.1.0"
