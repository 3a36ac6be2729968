"""Fused Triton kernels for the Dreamer world-model loss, a drop-in for torchrl's DreamerModelLoss.

- :func:`dreamer_model_loss`: the functional loss (fused kernels on CUDA, pure torch elsewhere).
- :class:`FusedDreamerModelLoss`: the tensordict module, a drop-in for torchrl's loss.
- :class:`FusedDreamerV3ModelLoss`: the same for torchrl's DreamerV3ModelLoss.
- :mod:`fused_dreamer_loss.reference`: the pure-torch reference, the spec of the math.
- :func:`dreamer_v3_model_loss`: the DreamerV3 world-model loss (torchrl's DreamerV3ModelLoss), with
  :data:`V3_CONVENTIONS`, the options of other implementations, and its pure-torch reference
  :mod:`fused_dreamer_loss.reference_v3`.
"""

from .conventions import V3_CONVENTIONS
from .functional import dreamer_model_loss
from .functional_v3 import dreamer_v3_model_loss
from .module import FusedDreamerModelLoss
from .module_v3 import FusedDreamerV3ModelLoss

__all__ = ["V3_CONVENTIONS", "FusedDreamerModelLoss", "FusedDreamerV3ModelLoss",
           "dreamer_model_loss", "dreamer_v3_model_loss"]
__version__ = "0.1.0"
