"""The presets of each loss and the minimal-traffic models, by hand."""

from __future__ import annotations

import pytest

from fused_dreamer_loss.bench import cli, presets
from fused_dreamer_loss.bench.losses import V3Case
from tests.bench.helpers_bench import V3_TINY_BYTES


def test_minimal_bytes_counts_each_tensor_once():
    # 2 frames, 10-element images, 3 latents, fp32: reads 4*3 + 2*10 + 2 per frame,
    # fwd+bwd writes 4*3 + 10 + 1 more.
    assert presets.minimal_bytes(2, 10, 3, 4, "fwd") == 2 * (12 + 20 + 2) * 4
    assert presets.minimal_bytes(2, 10, 3, 4, "fwd+bwd") == 2 * (12 + 20 + 2 + 12 + 10 + 1) * 4


def test_v3_modelled_bytes_by_hand():
    assert presets.minimal_bytes_v3(8, 192, 16, 255, True, 4, "fwd") == V3_TINY_BYTES["fwd"]
    assert presets.minimal_bytes_v3(8, 192, 16, 255, True, 4, "fwd+bwd") == V3_TINY_BYTES["fwd+bwd"]
    # No continue term (torchrl's defaults): no continue logit, no terminal flag.
    assert presets.minimal_bytes_v3(8, 192, 16, 255, False, 4, "fwd+bwd") == 8 * (4037 - 8 - 1)
    # bfloat16 outputs: 2 bytes an element, the targets' bytes unchanged.
    assert presets.minimal_bytes_v3(8, 192, 16, 255, True, 2, "fwd+bwd") == 8 * (1920 + 197)
    # DESIGN-V3 §5: B x T = 1024, 3x64x64 uint8 frames, 32x32 fp32 logits: about 132 MB.
    assert round(presets.minimal_bytes_v3(1024, 12288, 1024, 255, True, 4, "fwd+bwd") / 1e6) == 132
    assert V3Case("dreamerv3-2024", "l2").model_bytes("v3-tiny", 4, "fwd+bwd") == 8 * 4037


def test_presets_of_each_loss():
    """The V1 preset with 1024 latents was called v3: now v1-wide-latents, and v3 is the DreamerV3
    loss's; a preset of the other loss is an argparse error that says so."""
    assert presets.PRESETS["v1-wide-latents"] == (16, 64, (3, 64, 64), 1024)
    assert set(presets.PRESETS).isdisjoint(presets.V3_PRESETS)
    assert presets.V3_PRESETS == {"v3-tiny": (2, 4, (3, 8, 8), 4, 4),
                                "v3": (16, 64, (3, 64, 64), 32, 32),
                                "v3-r2": (16, 64, (3, 64, 64), 32, 16),
                                "v3-large": (256, 64, (3, 64, 64), 32, 64)}
    args = cli.parse_args(["--preset", "v1-wide-latents", "--device", "cpu"])
    assert args.loss == "v1" and args.convention is None
    args = cli.parse_args(["--loss", "v3", "--device", "cpu"])
    assert args.preset == ["v3-tiny"] and args.convention == "dreamerv3-2024"
