"""The DreamerV3 world-model loss, torchrl's ``DreamerV3ModelLoss`` and the other codebases'
conventions: categorical KL, symlog / uint8 reconstruction heads, two-hot reward, continue.

- :mod:`.reference`: the pure-torch spec; :mod:`.validation`: its argument checks;
- :mod:`.kernels`: the fused Triton kernels (imports triton);
- :mod:`.functional`: :func:`dreamer_v3_model_loss`; :mod:`.module`: :class:`FusedDreamerV3ModelLoss`;
- :mod:`.conventions`: :data:`V3_CONVENTIONS`; :mod:`.models`: a small categorical world model.
"""

from .conventions import V3_CONVENTIONS
from .functional import dreamer_v3_model_loss
from .module import FusedDreamerV3ModelLoss

__all__ = ["V3_CONVENTIONS", "FusedDreamerV3ModelLoss", "dreamer_v3_model_loss"]
