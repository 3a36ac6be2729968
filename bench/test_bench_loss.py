"""pytest-benchmark suite: ``pytest bench/ --benchmark-only``.

The same implementations and inputs as the CLI (``fused_dreamer_loss.bench``), for both losses: the
Dreamer loss on tiny on a CPU, small and default on a GPU; the DreamerV3 loss (its default
convention, dreamerv3-2024) on v3-tiny on a CPU, v3 and v3-large on a GPU. Not part of the default
test run (``testpaths`` is ``tests``).
"""

from __future__ import annotations

import pytest
import torch

from fused_dreamer_loss.bench.losses import V1Case, V3Case
from fused_dreamer_loss.bench.presets import DEFAULT_CONVENTION, IMPLS, MODES
from fused_dreamer_loss.bench.timing import step_fn

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CASES = [
    (V1Case("l2"), ["small", "default"] if CUDA else ["tiny"]),
    (V3Case(DEFAULT_CONVENTION, "l2"), ["v3", "v3-large"] if CUDA else ["v3-tiny"]),
]
PARAMS = [(case, preset) for case, presets in CASES for preset in presets]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case,preset", PARAMS, ids=[f"{c.loss}-{p}" for c, p in PARAMS])
def test_loss(benchmark, case, preset, impl, mode):
    if impl == "fused" and not CUDA:
        pytest.skip("speed figures for the fused kernels need a CUDA GPU")
    if impl == "torchrl":
        pytest.importorskip("torchrl")
    inputs = case.inputs(preset, torch.float32, DEVICE, seed=0)
    step = step_fn(case.fn(impl, DEVICE), inputs, mode)
    step()  # compile / warm up outside the timing

    def run():
        step()
        if CUDA:
            torch.cuda.synchronize()

    benchmark(run)
