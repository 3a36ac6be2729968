"""GPU-only checks of the compiled kernels (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import assert_close
from tests.world_model_v1.helpers_v1 import NAMES, free_nats_for, make_inputs, oracle

from fused_dreamer_loss import dreamer_model_loss
from fused_dreamer_loss.bench.timing import capture

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def poison_allocator(nbytes: int) -> None:
    """Fill the caching allocator's free memory with NaN so that unwritten outputs show."""
    torch.cuda.synchronize()
    block = torch.full((nbytes // 4,), float("nan"), device="cuda")
    del block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
def test_every_output_element_is_written(dtype):
    inputs = make_inputs((16, 50), 30, (3, 64, 64), dtype, "cuda", seed=1)
    poison_allocator(4 * sum(t.numel() * t.element_size() for t in inputs))
    losses = dreamer_model_loss(*inputs, free_nats=free_nats_for(inputs, False, "some"))
    grads = torch.autograd.grad(losses, inputs, [torch.tensor(1.5, device="cuda", dtype=dtype)] * 3)
    for name, t in zip(("loss_kl", "loss_reco", "loss_reward", *NAMES), (*losses, *grads)):
        assert torch.isfinite(t).all(), f"{name} has unwritten (NaN) elements"


@pytest.mark.parametrize("dtype", [torch.float16], ids=str)
def test_float16(dtype):
    inputs = make_inputs((4, 10), 30, (3, 16, 16), dtype, "cuda", seed=2)
    losses = dreamer_model_loss(*inputs, free_nats=free_nats_for(inputs, False, "some"))
    grads = torch.autograd.grad(losses, inputs)
    ref_losses, ref_grads = oracle(inputs, free_nats=free_nats_for(inputs, False, "some"))
    for name, a, b in zip(("kl", "reco", "reward", *NAMES), (*losses, *grads),
                          (*ref_losses, *ref_grads)):
        assert_close(a, b, dtype, name)


def test_more_than_2_31_image_elements():
    """int64 offsets: 2 rows of 1.1e9 float32 elements each, checked against a float64 sum taken
    slice by slice, and the gradient checked past element 2**31."""
    rows, per_row = 2, 1_100_000_000
    assert rows * per_row > 2**31
    g = torch.Generator("cuda").manual_seed(0)
    pixels = torch.rand(rows, per_row, device="cuda", generator=g)
    reco = torch.rand(rows, per_row, device="cuda", generator=g).requires_grad_()
    latents = [torch.rand(rows, 3, device="cuda", generator=g) + 0.5 for _ in range(4)]
    rewards = [torch.randn(rows, 1, device="cuda", generator=g) for _ in range(2)]
    _, loss_reco, _ = dreamer_model_loss(*latents, pixels, reco, *rewards)
    (grad,) = torch.autograd.grad(loss_reco, reco)
    expected = torch.zeros((), dtype=torch.float64, device="cuda")
    with torch.no_grad():
        for start in range(0, per_row, 1 << 27):
            d = reco[:, start:start + (1 << 27)].double() - pixels[:, start:start + (1 << 27)]
            expected += (d * d).sum()
            del d
    expected /= rows
    torch.testing.assert_close(loss_reco.double(), expected, rtol=1e-5, atol=0)
    tail = slice(per_row - 1000, per_row)  # row 1's tail: flat offsets beyond 2**31
    with torch.no_grad():
        want = 2 * (reco[1, tail] - pixels[1, tail]) / rows
    torch.testing.assert_close(grad[1, tail], want, rtol=1e-6, atol=1e-7)
    del pixels, reco, grad
    torch.cuda.empty_cache()


@pytest.mark.parametrize("delayed_clamp", [False, True])
def test_bitwise_identical_over_20_calls(delayed_clamp):
    inputs = make_inputs((16, 50), 30, (3, 64, 64), torch.float32, "cuda", seed=3)
    weight = [torch.tensor(0.7, device="cuda")] * 3
    first = None
    for _ in range(20):
        losses = dreamer_model_loss(*inputs, delayed_clamp=delayed_clamp)
        outs = [*losses, *torch.autograd.grad(losses, inputs, weight)]
        if first is None:
            first = outs
        else:
            assert all(torch.equal(a, b) for a, b in zip(first, outs))


def test_cuda_graph_capture_and_replay():
    """Forward + backward captured once, replayed with new inputs copied in, matching eager."""
    static = [t.detach().clone().requires_grad_(t.requires_grad)
              for t in make_inputs((8, 10), 30, (3, 32, 32), torch.float32, "cuda", seed=4)]

    def step():
        losses = dreamer_model_loss(*static, free_nats=2.0)
        grads = torch.autograd.grad(losses, static)
        return [*losses, *grads]

    graph, outs = capture(step)
    for seed in (5, 6):
        fresh = make_inputs((8, 10), 30, (3, 32, 32), torch.float32, "cuda", seed=seed)
        with torch.no_grad():
            for s, f in zip(static, fresh):
                s.copy_(f)
        graph.replay()
        losses = dreamer_model_loss(*fresh, free_nats=2.0)
        expected = [*losses, *torch.autograd.grad(losses, fresh)]
        for a, b in zip(outs, expected):
            assert torch.equal(a, b)


def test_no_memory_growth_over_200_steps():
    inputs = make_inputs((16, 50), 30, (3, 64, 64), torch.float32, "cuda", seed=7)
    want = [t for t in inputs if t.requires_grad]

    def step():
        losses = dreamer_model_loss(*inputs)
        sum(losses).backward()
        for t in want:
            t.grad = None

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(200):
        step()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


def test_launch_counts_with_the_profiler():
    """Forward: the main kernel and the finalize; backward: one kernel."""
    from torch.profiler import ProfilerActivity, profile

    inputs = make_inputs((16, 50), 30, (3, 64, 64), torch.float32, "cuda", seed=8)
    ones = [torch.ones((), device="cuda") for _ in range(3)]
    dreamer_model_loss(*inputs)  # compile outside the profile
    torch.cuda.synchronize()

    def kernels(prof):
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    with profile(activities=[ProfilerActivity.CUDA]) as fwd:
        losses = dreamer_model_loss(*inputs)
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as bwd:
        torch.autograd.backward(losses, ones)
        torch.cuda.synchronize()
    assert sorted(kernels(fwd)) == ["_dreamer_loss_fwd_kernel", "finalize_kernel"]
    assert kernels(bwd) == ["_dreamer_loss_bwd_kernel"]
