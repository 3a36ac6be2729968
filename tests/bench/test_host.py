"""The host-overhead workload (``fused_dreamer_loss.bench.host``) with Triton's real compiler
and a driver that launches nothing, in a child process without the interpreter: its rows, its
breakdown, and the direct launches it times handing the launcher what Triton's dispatch would."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fused_dreamer_loss.bench import host

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMPLS = ("fused functional", "autograd floor", "fused module", "torchrl module", "torchrl math",
         "eager reference")


def _compiler_env() -> dict:
    pytest.importorskip("torchrl")
    triton = pytest.importorskip("triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton's NVIDIA backend (ptxas) is not installed")
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", *args], env=_compiler_env(),
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("host") / "host.json"
    _run(["fused_dreamer_loss.bench.host", "--rounds", "2", "--steps", "2", "--json",
          str(path), "--quiet"])
    return json.loads(path.read_text())


def test_every_row_with_its_spread_and_the_fused_rows_with_their_ratio(report):
    rows = {(r["loss"], r["impl"]): r for r in report["rows"]}
    assert set(rows) == {(loss, impl) for loss in ("v1", "v3") for impl in IMPLS} | {
        ("behavior", impl) for impl in ("fused functional", "fused phases", "torchrl math",
                                        "eager reference")}
    for impl in ("fused functional", "fused phases"):
        r = rows[("behavior", impl)]
        assert r["baseline"] == "torchrl math"
        assert r["meets_target"] == (r["ratio"] <= host.TARGET_RATIO)
    for r in rows.values():
        assert 0 < r["min_us"] <= r["median_us"] <= r["max_us"], r
    for loss in ("v1", "v3"):
        for impl, base in (("fused functional", "torchrl math"),
                           ("fused module", "torchrl module"),
                           ("autograd floor", "torchrl math")):
            r = rows[(loss, impl)]
            assert r["baseline"] == base
            assert r["ratio"] == pytest.approx(r["median_us"] / rows[(loss, base)]["median_us"])
            if impl == "autograd floor":
                assert "meets_target" not in r  # a bound, not an implementation
            else:
                assert r["meets_target"] == (r["ratio"] <= host.TARGET_RATIO)
    assert "no GPU" in report["machine"]


def test_breakdown_of_the_fused_rows(report):
    parts = report["breakdown"]
    assert {(p["loss"], p["impl"]) for p in parts} == {
        (loss, impl) for loss in ("v1", "v3") for impl in ("fused functional", "fused module")} | {
        ("behavior", impl) for impl in ("fused functional", "fused phases")}
    for p in parts:
        measured = [p[c] for c in host.CATEGORIES if c != "rest"]
        assert all(v > 0 for v in measured), p  # each category is reached
        assert sum(measured) + p["rest"] == pytest.approx(p["total_us"])


def test_the_floor_hands_over_gradients_of_the_fused_calls_shapes():
    """The floor row's step makes what the fused step makes: one gradient per input that
    requires grad, of its shape and dtype, and as many losses."""
    import torch

    from fused_dreamer_loss.bench import peers

    for loss in ("v1", "v3"):
        forward, leaves = host._floor(loss)("cpu")
        inputs = host._inputs(loss, True, "cpu")  # the fused call's losses, at tiny shapes
        if loss == "v1":
            fused = peers.loss_fn("fused", "l2")(*inputs)
        else:
            fused = peers.loss_fn_v3("fused", host._v3_options(), "cpu")(*inputs)
        losses = forward()
        assert len(losses) == len(peers.loss_terms(fused))
        assert all(isinstance(x, torch.Tensor) and x.dim() == 0 for x in losses)
        host.make_step(forward, [])()
        assert leaves and all(t.grad is not None and t.grad.shape == t.shape
                              and t.grad.dtype == t.dtype for t in leaves)


def test_direct_launches_hand_the_launcher_what_tritons_dispatch_does():
    done = _run(["tests.bench.direct_launch_check"])
    launches = [json.loads(line) for line in done.stdout.splitlines()]
    kernels = {line["kernel"] for line in launches}
    assert kernels == {"_dreamer_loss_fwd_kernel", "_dreamer_loss_bwd_kernel", "_v3_fwd_kernel",
                       "_v3_bwd_kernel", "finalize_kernel", "_returns_kernel",
                       "_terms_fwd_kernel", "_terms_bwd_kernel"}
    assert all(line["same"] for line in launches), launches
