"""Fused Triton kernels for the Dreamer losses, drop-ins for torchrl's Dreamer loss modules.

- :func:`dreamer_model_loss`: the functional loss (fused kernels on CUDA, pure torch elsewhere).
- :class:`FusedDreamerModelLoss`: the tensordict module, a drop-in for torchrl's loss.
- :class:`FusedDreamerV3ModelLoss`: the same for torchrl's DreamerV3ModelLoss.
- :mod:`fused_dreamer_loss.reference`: the pure-torch reference, the spec of the math.
- :func:`dreamer_v3_model_loss`: the DreamerV3 world-model loss (torchrl's DreamerV3ModelLoss), with
  :data:`V3_CONVENTIONS`, the options of other implementations, and its pure-torch reference
  :mod:`fused_dreamer_loss.reference_v3`.
- The DreamerV3 behaviour losses: :func:`lambda_returns`, :func:`return_scale`,
  :func:`dreamer_v3_actor_loss`, :func:`dreamer_v3_value_loss`, :func:`replay_value_loss`, all at
  once :func:`dreamer_v3_behavior_loss`, with :data:`BEHAVIOR_CONVENTIONS`; and, with torchrl,
  :class:`FusedDreamerV3ActorLoss` and :class:`FusedDreamerV3ValueLoss`, drop-ins for torchrl's.

The code lives in one package per loss family (:mod:`.world_model_v1`, :mod:`.world_model_v3`,
:mod:`.behavior_v3`)
over a shared :mod:`.core`; :mod:`.bench` is the benchmark.
"""

import importlib as _importlib
import sys as _sys

from .behavior_v3 import (BEHAVIOR_CONVENTIONS, dreamer_v3_actor_loss, dreamer_v3_behavior_loss,
                          dreamer_v3_value_loss, lambda_returns, replay_value_loss, return_scale)
from .core.torchrl_module import HAS_TORCHRL as _HAS_TORCHRL
from .world_model_v1 import FusedDreamerModelLoss, dreamer_model_loss
from .world_model_v3 import V3_CONVENTIONS, FusedDreamerV3ModelLoss, dreamer_v3_model_loss

if _HAS_TORCHRL:  # the behaviour drop-ins subclass torchrl's own loss modules
    from .behavior_v3.module import FusedDreamerV3ActorLoss, FusedDreamerV3ValueLoss

#: The modules of the flat layout (0.1.0) and where they live now: ``import
#: fused_dreamer_loss.reference_v3`` and pickles naming the old paths keep working.
_FORMER_MODULES = {
    "reference": "world_model_v1.reference",
    "functional": "world_model_v1.functional",
    "module": "world_model_v1.module",
    "models": "world_model_v1.models",
    "reference_v3": "world_model_v3.reference",
    "functional_v3": "world_model_v3.functional",
    "module_v3": "world_model_v3.module",
    "models_v3": "world_model_v3.models",
    "conventions": "world_model_v3.conventions",
}
for _old, _new in _FORMER_MODULES.items():
    _sys.modules[f"{__name__}.{_old}"] = globals()[_old] = _importlib.import_module(f".{_new}",
                                                                                    __name__)

__all__ = ["BEHAVIOR_CONVENTIONS", "V3_CONVENTIONS", "FusedDreamerModelLoss",
           "FusedDreamerV3ModelLoss", "dreamer_model_loss", "dreamer_v3_actor_loss",
           "dreamer_v3_behavior_loss", "dreamer_v3_model_loss", "dreamer_v3_value_loss",
           "lambda_returns", "replay_value_loss", "return_scale"]
if _HAS_TORCHRL:
    __all__ += ["FusedDreamerV3ActorLoss", "FusedDreamerV3ValueLoss"]
__version__ = "0.1.0"
