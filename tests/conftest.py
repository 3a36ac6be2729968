"""Run the Triton kernels through Triton's interpreter when there is no CUDA device.

TRITON_INTERPRET must be set before triton is imported, so this happens at collection, before any
test module imports the package's kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def small_blocks(monkeypatch):
    """Shrink every tile so that small test shapes span many programs, latent chunks and
    finalize steps, as large inputs do on a GPU."""
    from fused_dreamer_loss.world_model_v1 import kernels as k
    from fused_dreamer_loss.core import machinery

    monkeypatch.setattr(k, "IMAGE_TILE_BYTES", 256)
    monkeypatch.setattr(k, "REWARD_BLOCK", 4)
    monkeypatch.setattr(k, "LATENT_TILE", 16)
    monkeypatch.setattr(k, "MAX_LATENT_BLOCK_D", 4)
    monkeypatch.setattr(machinery, "FINALIZE_BLOCK", 4)
