"""pytest-benchmark suite: ``pytest bench/ --benchmark-only``.

The same implementations and inputs as the CLI (``fused_dreamer_loss.bench``); tiny on a CPU, small
and default on a GPU. Not part of the default test run (``testpaths`` is ``tests``).
"""

from __future__ import annotations

import pytest
import torch

from fused_dreamer_loss import bench

CUDA = torch.cuda.is_available()
PRESETS = ["small", "default"] if CUDA else ["tiny"]
DEVICE = "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("impl", bench.IMPLS)
@pytest.mark.parametrize("preset", PRESETS)
def test_loss(benchmark, preset, impl, mode):
    if impl == "fused" and not CUDA:
        pytest.skip("speed figures for the fused kernels need a CUDA GPU")
    if impl == "torchrl":
        pytest.importorskip("torchrl")
    inputs = bench.make_inputs(preset, torch.float32, DEVICE, seed=0)
    step = bench.step_fn(bench.loss_fn(impl, "l2"), inputs, mode)
    step()  # compile / warm up outside the timing

    def run():
        step()
        if CUDA:
            torch.cuda.synchronize()

    benchmark(run)
