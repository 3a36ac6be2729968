"""examples/train_world_model.py refuses bad arguments with a usage line and exit status 2, never a
traceback: a backend that cannot run, a device the torch build lacks, sizes the world model cannot
take."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "train_world_model.py")


@pytest.mark.parametrize("args, env, message", [
    (("--backend", "triton"), {"TRITON_INTERPRET": "0"}, "--backend triton: backend='triton' needs"),
    (("--device", "cuda"), {}, "--device cuda: no CUDA device here"),
    (("--device", "cuda:0", "--compile"), {}, "--device cuda:0: no CUDA device here"),
    (("--size", "30"), {}, "--size must be divisible by 4"),
    (("--batch", "-1"), {}, "--batch must be at least 1"),
    (("--time", "0"), {}, "--time must be at least 1"),
])
def test_bad_arguments_get_a_usage_line_and_exit_2(args, env, message):
    if args[:2] in (("--device", "cuda"), ("--device", "cuda:0")) and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    done = subprocess.run([sys.executable, EXAMPLE, "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT, **env})
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("usage: train_world_model.py"), done.stderr
    assert message in done.stderr, done.stderr
