"""What the benchmark's tests share: the row schema, the CPU path and the V3 tiny preset's bytes by
hand."""

from __future__ import annotations

import torch


ROW_KEYS = {"impl", "preset", "frames", "image_shape", "latent_dim", "dtype", "mode", "median_ms",
            "gbps", "peak_mem_mb", "frac_copy", "speedup_vs_eager", "compile_s", "status", "extra",
            "launches", "model_bytes", "loss", "convention", "latent_shape", "min_ms", "max_ms",
            "noisy"}
CPU = not torch.cuda.is_available()


def numbers(row):
    return [row[k] for k in ("median_ms", "gbps", "peak_mem_mb", "frac_copy", "speedup_vs_eager",
                             "compile_s", "launches", "model_bytes", "min_ms", "max_ms")]


# The minimal-traffic model of DESIGN-V3 §5 for v3-tiny, by hand: 8 rows of a 3x8x8 uint8 frame,
# 4x4 posterior and prior logits, 255 reward logits, a continue logit (dreamerv3-2024 has the
# continue term); float32 outputs. Per row, reads: frame target 192 x 1 B + prediction 192 x 4 B
# + logits 2 x 16 x 4 B + reward logits 255 x 4 B + continue logit 4 B + reward target 4 B
# + terminal flag 1 B = 192 + 768 + 128 + 1020 + 4 + 4 + 1 = 2117 B; fwd+bwd also writes the
# gradients of the outputs: 768 + 128 + 1020 + 4 = 1920 B more, 4037 B.
V3_TINY_BYTES = {"fwd": 8 * 2117, "fwd+bwd": 8 * 4037}
