"""examples/train_world_model_v3.py as a user meets it: its decoder matches the convention it runs
(with ``--convention torchrl``, which symlogs raw uint8 frames, the reconstruction loss falls), it
compiles with ``--compile``, and it refuses bad arguments with a usage line and exit status 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "train_world_model_v3.py")
SMALL = ("--batch", "2", "--time", "4", "--size", "16", "--bins", "32", "--device", "cpu")


def run_example(*args: str, env: dict | None = None, timeout: int = 300):
    return subprocess.run([sys.executable, EXAMPLE, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})


def reco_by_step(output: str) -> dict[int, float]:
    return {int(step): float(reco) for step, reco in
            re.findall(r"^step +(\d+) +reco ([\d.]+)", output, re.M)}


@pytest.mark.parametrize("convention", ["torchrl", "dreamerv3-2024"])  # each decoder space
def test_the_reconstruction_loss_falls_under_each_image_convention(convention):
    done = run_example(*SMALL, "--steps", "100", "--convention", convention)
    assert done.returncode == 0, done.stderr[-3000:]
    reco = reco_by_step(done.stdout)
    assert sorted(reco)[0] == 1 and sorted(reco)[-1] == 100, done.stdout
    assert reco[100] < 0.5 * reco[1], done.stdout


def test_compile_runs_the_compiled_loss_module():
    done = run_example(*SMALL, "--steps", "2", "--compile", "--convention", "torchrl")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compilation included" in done.stdout and "(torch.compile included)" in done.stdout


@pytest.mark.parametrize("args, env, message", [
    (("--backend", "triton"), {"TRITON_INTERPRET": "0"}, "--backend triton: backend='triton' needs"),
    (("--device", "cuda"), {}, "--device cuda: no CUDA device here"),
    (("--device", "meta"), {}, "--device must be cpu or cuda"),
    (("--device", "nonsense"), {}, "--device 'nonsense'"),
    (("--size", "30"), {}, "--size must be divisible by 4"),
    (("--steps", "0"), {}, "--steps must be at least 1"),
    (("--bins", "1"), {}, "--bins must be at least 2"),
])
def test_bad_arguments_get_a_usage_line_and_exit_2(args, env, message):
    if args == ("--device", "cuda") and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    done = run_example("--device", "cpu", *args, env=env, timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("usage: train_world_model_v3.py"), done.stderr
    assert message in done.stderr, done.stderr
