"""The DreamerV3 behaviour losses: λ-returns and discount weights, return normalisation, the actor,
the critic with its slow regulariser, and the replay value (torchrl's ``DreamerV3ActorLoss``,
``DreamerV3ValueLoss`` and the replay term of ``DreamerV3Loss``) and the other codebases'
conventions.

- :mod:`.reference`: the pure-torch spec; :mod:`.validation`: its argument checks;
- :mod:`.functional`: :func:`lambda_returns`, :func:`return_scale`, :func:`dreamer_v3_actor_loss`,
  :func:`dreamer_v3_value_loss`, :func:`replay_value_loss`, and all of them at once,
  :func:`dreamer_v3_behavior_loss`;
- :mod:`.conventions`: :data:`BEHAVIOR_CONVENTIONS`.
"""

from .conventions import BEHAVIOR_CONVENTIONS
from .functional import (
    dreamer_v3_actor_loss,
    dreamer_v3_behavior_loss,
    dreamer_v3_value_loss,
    lambda_returns,
    replay_value_loss,
    return_scale,
)

__all__ = [
    "BEHAVIOR_CONVENTIONS",
    "dreamer_v3_actor_loss",
    "dreamer_v3_behavior_loss",
    "dreamer_v3_value_loss",
    "lambda_returns",
    "replay_value_loss",
    "return_scale",
]
