"""The DreamerV3 loss conventions of the implementations people use, as options.

``V3_CONVENTIONS[name]`` is a read-only dict of keyword arguments for
:func:`fused_dreamer_loss.dreamer_v3_model_loss` reproducing that implementation's world-model loss
for **image** observations (uint8 or float pixel targets); options not listed keep their defaults
(``lambda_kl = lambda_reco = lambda_reward = 1``, ``reco_loss="l2"``, ``reward_two_hot=True`` over
torchrl's 255 default bins, ``global_average=False``):

==============  ===================  ======  ===========================  =======  =====================
name            kl_mode, dyn / rep   unimix  image target                 two-hot  continue target
==============  ===================  ======  ===========================  =======  =====================
torchrl         balanced, α 0.8      0       symlog of raw uint8 (0…255)  raw      1 − term (term off)
torchrl-recipe  separate, 1.0 / 0.1  0.01    symlog of raw uint8 (0…255)  raw      (1 − term)(1 − 1/333)
dreamerv3-2024  separate, 1.0 / 0.1  0.01    uint8 / 255                  raw      (1 − term)(1 − 1/333)
dreamerv3-2023  separate, 0.5 / 0.1  0.01    uint8 / 255                  symlog   1 − term
r2dreamer       separate, 1.0 / 0.1  0       uint8 / 255                  raw      1 − term
sheeprl         separate, 0.5 / 0.1  0.01    uint8 / 255 − 0.5            symlog   1 − term
==============  ===================  ======  ===========================  =======  =====================

The two torchrl conventions symlog target and prediction (``reco_symlog=True``), and torchrl
symlogs uint8 frames as they are, 0…255, not divided by 255: the decoder must predict raw pixel
values (best: predict in symlog space and write the ``symexp``, as
``make_world_model_v3(reco_symlog=True)`` does), and its loss is on another scale than the others'
(a prediction in [0, 1] against raw frames gives a reconstruction loss about a hundred times that of
``dreamerv3-2024``). The loss warns once when a head symlogs integer targets.

Free nats are 1 everywhere: per categorical in balanced mode, on the sum over the categoricals in
separate mode. ``dreamerv3-2023`` is the 2023 reference code and dreamerv3-torch;
``dreamerv3-2024`` the current reference. torchrl's library defaults train no continue head
(``lambda_continue=0``); every other convention does, with weight 1 (pass ``continue_pred`` and
``terminated``). The torchrl recipe runs
on vector observations, so its image setting is the library's (``reco_symlog=True``).

Vector observations: torchrl (library and recipe) symlogs target and prediction
(``reco_symlog=True``); the references, dreamerv3-torch, r2dreamer and SheepRL symlog the target
only: use ``reco_symlog="target"`` for those heads (a list gives one entry per head, e.g.
``[False, "target"]`` for an image head and a vector head).

Precision (not an option here: the losses are always computed in float32 or float64): torchrl runs
fp32 or bf16 autocast, the reference bf16 networks with f32 losses, dreamerv3-torch fp32 or fp16,
r2dreamer fp16 with a GradScaler, SheepRL fp32 or bf16.

Example:
    >>> from fused_dreamer_loss import V3_CONVENTIONS
    >>> sorted(V3_CONVENTIONS)
    ['dreamerv3-2023', 'dreamerv3-2024', 'r2dreamer', 'sheeprl', 'torchrl', 'torchrl-recipe']
    >>> V3_CONVENTIONS["sheeprl"]["pixels_offset"]
    -0.5
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

# The reference's continue target encodes its discount horizon of 333 steps.
REFERENCE_CONTINUE_SCALE = 1.0 - 1.0 / 333.0
_FREE_NATS = 1.0
_UNIMIX = 0.01
_IMAGE_SCALE = 1.0 / 255.0
_SHEEPRL_IMAGE_OFFSET = -0.5


def _separate(dynamic: float, unimix: float, two_hot_space: str, continue_target_scale: float,
              reco_symlog: bool = False, pixels_offset: float = 0.0) -> dict:
    """A convention of the reference's family: separate dynamics and representation terms."""
    return {
        "kl_mode": "separate",
        "lambda_dynamic": dynamic,
        "lambda_representation": 0.1,
        "unimix": unimix,
        "free_bits": _FREE_NATS,
        "reco_symlog": reco_symlog,
        "pixels_scale": _IMAGE_SCALE,
        "pixels_offset": pixels_offset,
        "reward_two_hot": True,
        "two_hot_space": two_hot_space,
        "lambda_continue": 1.0,
        "continue_target_scale": continue_target_scale,
    }


_TORCHRL = {
    "kl_mode": "balanced",
    "kl_alpha": 0.8,
    "unimix": 0.0,
    "free_bits": _FREE_NATS,
    "reco_symlog": True,
    "pixels_scale": _IMAGE_SCALE,
    "pixels_offset": 0.0,
    "reward_two_hot": True,
    "two_hot_space": "raw",
    "lambda_continue": 0.0,
    "continue_target_scale": 1.0,
}

V3_CONVENTIONS: Mapping[str, Mapping[str, object]] = MappingProxyType({
    name: MappingProxyType(options) for name, options in {
        "torchrl": _TORCHRL,
        "torchrl-recipe": _separate(1.0, _UNIMIX, "raw", REFERENCE_CONTINUE_SCALE,
                                    reco_symlog=True),
        "dreamerv3-2024": _separate(1.0, _UNIMIX, "raw", REFERENCE_CONTINUE_SCALE),
        "dreamerv3-2023": _separate(0.5, _UNIMIX, "symlog", 1.0),
        "r2dreamer": _separate(1.0, 0.0, "raw", 1.0),
        "sheeprl": _separate(0.5, _UNIMIX, "symlog", 1.0, pixels_offset=_SHEEPRL_IMAGE_OFFSET),
    }.items()
})
