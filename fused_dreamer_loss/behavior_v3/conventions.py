"""The DreamerV3 behaviour-loss conventions of the implementations people use, as options.

``BEHAVIOR_CONVENTIONS[name]`` is a read-only dict of keyword arguments for
:func:`fused_dreamer_loss.behavior_v3.dreamer_v3_behavior_loss` reproducing that implementation's
actor, critic and replay-value losses (DESIGN-BEHAVIOR §3); options not listed keep their
defaults (λ = 0.95, the 5th/95th percentiles at EMA rate 0.01 with a floor of 1, η = 3e-4, the
mean reduction). The same keys, split by phase, are the options of the five phase functions.

==============  =======  ===============  ===========  =========  =========  =======  ======
name            γ        weights          estimator    advantage  entropy    two-hot  replay
==============  =======  ===============  ===========  =========  =========  =======  ======
torchrl         0.99     ĉ_0 Π γ ĉ_i      reparam.     —          weighted   (mse)    0.3
torchrl-recipe  1        ĉ_0 Π γ ĉ_i      REINFORCE    / scale    weighted   raw      0.3
dreamerv3-2024  1        ĉ_0 Π γ ĉ_i      REINFORCE    / scale    weighted   raw      0.3
dreamerv3-2023  1−1/333  ĉ_0 Π γ ĉ_i      REINFORCE    / scale    weighted   symlog   —
r2dreamer       0.997    Π γ ĉ_i          REINFORCE    / scale    weighted   raw      0.3
dreamerv3-torch 0.997    Π_{i<t} γ ĉ_i    reparam.     —          unweighted symlog   —
sheeprl         1−1/333  ĉ_0 Π γ ĉ_i      REINFORCE    / scale    weighted   symlog   —
==============  =======  ===============  ===========  =========  =========  =======  ======

Every convention but torchrl's library defaults trains a two-hot critic with the slow-critic
regulariser at weight 1 (torchrl: ``value_loss="symlog_mse"``, no regulariser). What the
continuation is stays the caller's choice, as in each codebase: the predicted probability
(torchrl, the 2024 reference and r2dreamer train it on ``0.997·(1 − terminal)`` or
``1 − terminal``), the Bernoulli mode for t ≥ 1 with ``ĉ_0`` from the data (the 2023 reference,
SheepRL). dreamerv3-torch forms 14 returns from 15 states: pass H = 14. The 2023 reference and
SheepRL use REINFORCE for discrete actions and backpropagation for continuous ones, dreamerv3-torch
backpropagation by default (its REINFORCE option takes ``normalize_advantage=False``): set
``use_reinforce`` to the action space's choice. Backpropagating codebases subtract the baseline
with its gradient (dreamerv3-torch's ``(R − v)/scale``): pass ``baseline`` there too.

Example:
    >>> from fused_dreamer_loss.behavior_v3 import BEHAVIOR_CONVENTIONS
    >>> sorted(BEHAVIOR_CONVENTIONS)  # doctest: +NORMALIZE_WHITESPACE
    ['dreamerv3-2023', 'dreamerv3-2024', 'dreamerv3-torch', 'r2dreamer', 'sheeprl', 'torchrl',
     'torchrl-recipe']
    >>> BEHAVIOR_CONVENTIONS["dreamerv3-torch"]["discount_weights"]
    'exclusive'
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

#: The discount of the codebases that derive it from a horizon of 333 steps.
HORIZON_DISCOUNT = 1.0 - 1.0 / 333.0
#: The discount of dreamerv3-torch and r2dreamer.
PORT_DISCOUNT = 0.997
#: torchrl's ``DreamerV3Loss`` replay-value weight, and the 2024 reference's.
REPLAY_WEIGHT = 0.3
#: torchrl's default TD(λ) discount (its value estimator's).
TORCHRL_GAMMA = 0.99


def _two_hot(gamma: float, weights: str, reinforce: bool, space: str, replay: float,
             normalize_advantage: bool = True, weight_entropy: bool = True) -> dict:
    """A convention with a two-hot critic and the slow-critic regulariser at weight 1."""
    return {
        "gamma": gamma,
        "discount_weights": weights,
        "use_reinforce": reinforce,
        "normalize_advantage": normalize_advantage,
        "weight_entropy": weight_entropy,
        "value_loss": "two_hot",
        "two_hot_space": space,
        "slow_critic_regularization": 1.0,
        "replay_value_weight": replay,
    }


_TORCHRL = {
    "gamma": TORCHRL_GAMMA,
    "discount_weights": "inclusive",
    "use_reinforce": False,
    "normalize_advantage": True,
    "weight_entropy": True,
    "value_loss": "symlog_mse",
    "two_hot_space": "raw",
    "slow_critic_regularization": 0.0,
    "replay_value_weight": REPLAY_WEIGHT,
}

BEHAVIOR_CONVENTIONS: Mapping[str, Mapping[str, object]] = MappingProxyType({
    name: MappingProxyType(options) for name, options in {
        "torchrl": _TORCHRL,
        "torchrl-recipe": _two_hot(1.0, "inclusive", True, "raw", REPLAY_WEIGHT),
        "dreamerv3-2024": _two_hot(1.0, "inclusive", True, "raw", REPLAY_WEIGHT),
        "dreamerv3-2023": _two_hot(HORIZON_DISCOUNT, "inclusive", True, "symlog", 0.0),
        "r2dreamer": _two_hot(PORT_DISCOUNT, "inclusive_gamma", True, "raw", REPLAY_WEIGHT),
        "dreamerv3-torch": _two_hot(PORT_DISCOUNT, "exclusive", False, "symlog", 0.0,
                                    normalize_advantage=False, weight_entropy=False),
        "sheeprl": _two_hot(HORIZON_DISCOUNT, "inclusive", True, "symlog", 0.0),
    }.items()
})
