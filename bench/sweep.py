"""Tile-size x warps sweep of the fused fwd+bwd step, timed as CUDA-graph replays (device time).

    python bench/sweep.py            # prints one line per (preset, dtype, tile bytes, warps)
"""

import itertools

import torch
from triton.testing import do_bench

from fused_dreamer_loss import dreamer_model_loss
from fused_dreamer_loss.bench.presets import DTYPES, PRESETS, make_inputs, minimal_bytes
from fused_dreamer_loss.bench.timing import copy_gbps, graphed, step_fn
from fused_dreamer_loss.world_model_v1 import kernels as k

TILE_BYTES = (8192, 16384, 32768)
WARPS = (4, 8, 16)
CASES = (("small", "float32"), ("default", "float32"), ("default", "bfloat16"))

copy = copy_gbps()
print(f"copy {copy:.0f} GB/s")
for preset, dtype in CASES:
    sets = [make_inputs(preset, DTYPES[dtype], "cuda", seed) for seed in range(3)]
    batch, steps, image, latent = PRESETS[preset]
    nbytes = minimal_bytes(batch * steps, 12288, latent, DTYPES[dtype].itemsize, "fwd+bwd")
    for tile, warps in itertools.product(TILE_BYTES, WARPS):
        k.IMAGE_TILE_BYTES, k.NUM_WARPS = tile, warps
        replays = [graphed(step_fn(dreamer_model_loss, s, "fwd+bwd")) for s in sets]
        turn = [0]

        def rotate():
            replays[turn[0] % 3]()
            turn[0] += 1

        ms = do_bench(rotate, warmup=50, rep=300, return_mode="median")
        print(f"{preset:>8} {dtype:>8} tile {tile:>6} B warps {warps:>2}: {ms * 1e3:8.1f} us "
              f"{nbytes / ms / 1e6 / copy:6.1%} of copy", flush=True)
        torch.cuda.synchronize()
