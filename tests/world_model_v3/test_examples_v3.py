"""examples/train_world_model_v3.py runs, as a user runs it: a subprocess, a few steps."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "train_world_model_v3.py")


def run_example(*args: str, env: dict | None = None) -> str:
    result = subprocess.run(
        [sys.executable, EXAMPLE, "--steps", "3", "--batch", "2", "--time", "4", "--size", "16",
         "--bins", "32", *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def step_terms(output: str, step: int) -> dict[str, float]:
    line = next(line for line in output.splitlines() if line.startswith(f"step {step:5d}"))
    return {name: float(value) for name, value in re.findall(r"(\w+) (-?[\d.]+(?:e-?\d+)?)",
                                                             line.split("(")[0])}


@pytest.mark.parametrize("convention, terms", [
    ("dreamerv3-2024", {"reco", "reward", "dynamic", "representation", "continue"}),
    ("torchrl", {"reco", "reward", "kl"}),
])
def test_example_trains_three_steps(convention, terms):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = run_example("--device", device, "--convention", convention)
    assert re.search(r"^backend: (torch|triton) \(.+\)$", out, re.M), out
    if device == "cpu":
        assert "backend: torch (the pure-torch reference; no CUDA device" in out
    for step in (1, 2, 3):
        values = step_terms(out, step)
        assert set(values) - {"step"} == terms, out
        assert all(math.isfinite(v) for v in values.values()), out
    assert re.search(r"[\d.]+ steps/s over steps 2-3; the first step took [\d.]+ s", out), out


def test_example_says_when_the_fused_backend_runs():
    """--backend triton on a CPU: the kernels through Triton's interpreter."""
    out = run_example("--device", "cpu", "--backend", "triton", env={"TRITON_INTERPRET": "1"})
    line = next(line for line in out.splitlines() if line.startswith("backend: "))
    assert "backend: triton (the fused kernels, through Triton's interpreter" in line, out
