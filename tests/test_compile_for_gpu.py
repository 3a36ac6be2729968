"""The fused kernels compile for an H100 (sm_90) with Triton's real compiler, on this CPU machine,
without register spills at the benchmark presets' dtypes (see ``tests/compile_for_gpu.py``).

Triton's interpreter, which runs the kernels everywhere else in CI, accepts code the compiler
refuses: this is the test that would catch it before a GPU does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import triton

from tests.compile_for_gpu import triton_ptxas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = {"_dreamer_loss_fwd_kernel", "_dreamer_loss_bwd_kernel", "_v3_fwd_kernel",
           "_v3_bwd_kernel", "finalize_kernel", "_returns_kernel", "_terms_fwd_kernel",
           "_terms_bwd_kernel", "_returns_bwd_kernel"}
#: The kernels the behaviour cases take through Triton's dispatch: the whole objective (returns,
#: terms, finalize, then the terms backward for grad outputs 1 and 2, compiled apart), and the
#: phases (scan, select, the adjoint scan; its second launch, the same kernel for the same
#: arguments, is launched directly by the launch the first one kept).
BEHAVIOR_LAUNCHES = [["_returns_kernel", "_terms_fwd_kernel", "finalize_kernel",
                      "_terms_bwd_kernel", "_terms_bwd_kernel"],
                     ["_returns_kernel", "_returns_kernel", "_returns_bwd_kernel"]]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if triton_ptxas() is None:
        pytest.skip(f"triton {triton.__version__}: no NVIDIA backend with a ptxas that "
                    "triton.backends.nvidia.compiler.get_ptxas finds")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    done = subprocess.run([sys.executable, "-m", "tests.compile_for_gpu"], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_every_kernel_compiles(report):
    cases = {r["case"] for r in report}
    assert len(cases) == 10
    for case in cases:
        names = [r["kernel"] for r in report if r["case"] == case]
        if case.startswith("behavior"):
            assert names in BEHAVIOR_LAUNCHES, (case, names)
            continue
        # forward: main + finalize; backward with grad output 1 and with 2: one launch each
        assert len(names) == 4 and names[1] == "finalize_kernel", (case, names)
    assert {r["kernel"] for r in report} == KERNELS


def test_no_register_spills_at_the_presets_dtypes(report):
    spilling = [r for r in report if r["spill_free"] and r["spilled"]]
    assert not spilling, spilling
