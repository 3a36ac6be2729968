"""The Dreamer (V1) world-model loss, torchrl's ``DreamerModelLoss``: Gaussian KL with free nats,
reconstruction and reward.

- :mod:`.reference`: the pure-torch spec; :mod:`.validation`: its argument checks;
- :mod:`.kernels`: the fused Triton kernels (imports triton);
- :mod:`.functional`: :func:`dreamer_model_loss`; :mod:`.module`: :class:`FusedDreamerModelLoss`;
- :mod:`.models`: a small conv world model for examples and benchmarks; :mod:`.example`.
"""

from .functional import dreamer_model_loss
from .module import FusedDreamerModelLoss

__all__ = ["FusedDreamerModelLoss", "dreamer_model_loss"]
