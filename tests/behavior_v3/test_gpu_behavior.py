"""On a CUDA device, at the real shapes (1024 imagination starts = 16 × 64, H = 15, 255 bins):
the fused behaviour losses against the float64 reference, no host synchronisation (CUDA's sync
debug mode set to error), four kernels forward and backward (the profiler), and the step captured
in a CUDA graph, replayed on new inputs, against eager."""

from __future__ import annotations

import pytest
import torch

from fused_dreamer_loss.bench.behavior import BehaviorCase, INPUTS, _call

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LOSSES = ("loss_actor", "loss_value", "loss_replay_value")


@pytest.fixture(params=["torchrl-recipe", "dreamerv3-torch", "torchrl"])
def case(request):
    return BehaviorCase(request.param)


def test_matches_the_reference_at_the_real_shapes(case):
    for dtype in (torch.float32, torch.bfloat16):
        assert case.check(case.inputs("behavior", dtype, "cuda", 0)) is None


def test_no_host_sync_and_four_kernels(case):
    inputs = case.inputs("behavior", torch.float32, "cuda", 0)
    wanted = [t for t in inputs if t.requires_grad]

    def step():
        losses = _call(inputs, case.options, "triton")
        torch.autograd.grad([losses[k] for k in LOSSES], wanted,
                            [torch.full((), 0.5, device="cuda")] * 3)

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and "fill" not in e.name]
    assert sorted(kernels) == sorted(["_returns_kernel", "_terms_fwd_kernel", "finalize_kernel",
                                      "_terms_bwd_kernel"]), kernels


def test_captured_in_a_cuda_graph(case):
    """Forward, backward and the EMA update captured once, replayed on new inputs copied into
    the static ones: the same losses, gradients and statistics as eager steps."""
    static = case.inputs("behavior", torch.float32, "cuda", 0)
    eager_low, eager_high = static[3].clone(), static[4].clone()
    wanted = [t for t in static if t.requires_grad]

    def step(inputs):
        losses = _call(inputs, case.options, "triton")
        grads = torch.autograd.grad([losses[k] for k in LOSSES],
                                    [t for t in inputs if t.requires_grad])
        return [losses[k] for k in LOSSES], grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(static)
    torch.cuda.current_stream().wait_stream(side)
    static[3].zero_()
    static[4].zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(static)
    static[3].zero_()
    static[4].zero_()
    eager_low.zero_()
    eager_high.zero_()
    for seed in range(1, 4):
        fresh = case.inputs("behavior", torch.float32, "cuda", seed)
        with torch.no_grad():
            for s, f, name in zip(static, fresh, INPUTS):
                if name not in ("low", "high"):
                    s.copy_(f)
        graph.replay()
        fresh[3], fresh[4] = eager_low, eager_high
        losses, grads = step(fresh)
        for a, b in zip(static_out[0], losses):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(static_out[1], grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(static[3], eager_low, rtol=0, atol=0)
        torch.testing.assert_close(static[4], eager_high, rtol=0, atol=0)
    assert len(wanted) == len(static_out[1])
