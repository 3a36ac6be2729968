"""torch.compile(fullgraph=True) of code that calls the loss, both backends; the custom ops.

``fullgraph=True`` makes any graph break an error, so each test that compiles also checks that the
loss traces whole. Without CUDA the Triton backend runs through Triton's interpreter: the custom ops
are opaque to the compiler, so the same graph is traced either way.
"""

from __future__ import annotations

import gc

import pytest
import torch
from tests.world_model_v1.helpers_v1 import NAMES, free_nats_for, make_inputs
from tensordict import TensorDict

from fused_dreamer_loss import FusedDreamerModelLoss, dreamer_model_loss
from fused_dreamer_loss.world_model_v1.validation import LossOptions, validate_inputs
from fused_dreamer_loss.world_model_v1 import kernels
from fused_dreamer_loss.core import machinery
from fused_dreamer_loss.models import make_world_model

BACKENDS = ["triton", "torch"]
#: Grad outputs of the three terms for two backward passes through one graph (retain_graph).
GRAD_OUTPUTS = ([2.0, -0.5, 3.0], [0.25, 4.0, -1.0])


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (no cache entries or recompile limits carried over)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_matches(got: torch.Tensor, want: torch.Tensor, backend: str, what: str):
    """Same kernels in both runs for the Triton backend: bit for bit. The torch backend may be
    fused differently by the compiler: rounding."""
    exact = backend == "triton"
    torch.testing.assert_close(got, want, rtol=0 if exact else None, atol=0 if exact else None,
                               msg=lambda m: f"{what}: {m}")


def stacked_losses(*tensors, backend, **options):
    return torch.stack(dreamer_model_loss(*tensors, backend=backend, **options))


def assert_compiled_matches_eager(compiled, inputs, backend, what, **options):
    """Losses and the gradients of their sum, compiled against eager."""
    got = compiled(*inputs, backend=backend, **options)
    want = stacked_losses(*inputs, backend=backend, **options)
    assert_matches(got, want, backend, f"losses, {what}")
    for name, a, b in zip(NAMES, torch.autograd.grad(got.sum(), inputs),
                          torch.autograd.grad(want.sum(), inputs)):
        assert_matches(a, b, backend, f"grad {name}, {what}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compiler,dtype,delayed_clamp", [
    ("aot_eager", torch.float32, False),
    ("aot_eager", torch.float32, True),
    ("aot_eager", torch.bfloat16, False),
    ("inductor", torch.float32, False),
])
def test_compiled_loss_and_backward_match_eager(device, backend, compiler, dtype, delayed_clamp):
    """Forward and two backward passes through one compiled graph (retain_graph, different grad
    outputs per term: compiled as in eager mode, the first fixes the forward's buffers in place,
    the second recomputes into fresh ones), against eager."""
    inputs = make_inputs((2, 3), 5, (3, 4, 4), dtype, device, seed=41)
    options = {"backend": backend, "free_nats": free_nats_for(inputs, delayed_clamp, "some"),
               "delayed_clamp": delayed_clamp, "global_average": delayed_clamp,
               "lambda_kl": 0.7, "reco_loss": "smooth_l1", "reward_loss": "l1"}
    compiled = torch.compile(stacked_losses, fullgraph=True, backend=compiler)
    got, want = compiled(*inputs, **options), stacked_losses(*inputs, **options)
    assert_matches(got, want, backend, "losses")
    for weights in GRAD_OUTPUTS:
        weights = torch.tensor(weights, dtype=got.dtype, device=device)
        grads_got = torch.autograd.grad(got, inputs, weights, retain_graph=True)
        grads_want = torch.autograd.grad(want, inputs, weights, retain_graph=True)
        for name, a, b in zip(NAMES, grads_got, grads_want):
            assert_matches(a, b, backend, f"grad {name}, grad outputs {weights.tolist()}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_loss_follows_changing_options(device, backend):
    """Free nats and lambdas that change between calls (annealing, say) reach the compiled graph:
    the clamp cuts none, some, then all rows, as eager does."""
    inputs = make_inputs((2, 3), 5, (3, 4, 4), torch.float32, device, seed=43)
    compiled = torch.compile(stacked_losses, fullgraph=True, backend="aot_eager")
    for clamp, lambda_reco in (("none", 1.0), ("some", 0.3), ("all", 2.5)):
        assert_compiled_matches_eager(compiled, inputs, backend, f"clamp {clamp}",
                                      free_nats=free_nats_for(inputs, False, clamp),
                                      lambda_reco=lambda_reco)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_loss_with_dynamic_shapes(device, backend):
    """``dynamic=True``: one graph serves batch shapes it was not traced with."""
    compiled = torch.compile(stacked_losses, fullgraph=True, backend="aot_eager", dynamic=True)
    for seed, batch_shape in enumerate(((2, 3), (4, 5), (3, 7))):
        inputs = make_inputs(batch_shape, 5, (3, 4, 4), torch.float32, device, seed=seed)
        assert_compiled_matches_eager(compiled, inputs, backend, f"batch {batch_shape}",
                                      free_nats=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_loss_under_no_grad(device, backend):
    inputs = make_inputs((2, 3), 5, (3, 4, 4), torch.float32, device, seed=44)
    compiled = torch.compile(stacked_losses, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(*inputs, backend=backend)
        want = stacked_losses(*inputs, backend=backend)
    assert not got.requires_grad
    assert_matches(got, want, backend, "losses")
    gc.collect()  # Triton's interpreter keeps the storages of its last arguments in a cycle
    assert not any(g is not None for held in machinery._HELD.values() for g in held), \
        "no backward can follow: nothing to hold"


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_loss_under_autocast(device, backend):
    """bf16 inputs under bf16 autocast inside the compiled function: float32 losses, as eager."""
    inputs = make_inputs((2, 3), 5, (3, 4, 4), torch.bfloat16, device, seed=46)

    def autocast_losses(*tensors, backend, **options):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return stacked_losses(*tensors, backend=backend, **options)

    compiled = torch.compile(autocast_losses, fullgraph=True, backend="aot_eager")
    got = compiled(*inputs, backend=backend, free_nats=0.5)
    want = autocast_losses(*inputs, backend=backend, free_nats=0.5)
    assert got.dtype == want.dtype == torch.float32
    assert_matches(got, want, backend, "losses")
    for name, a, b in zip(NAMES, torch.autograd.grad(got.sum(), inputs),
                          torch.autograd.grad(want.sum(), inputs)):
        assert_matches(a, b, backend, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_module_training_step_matches_eager(device, backend):
    """World model and FusedDreamerModelLoss compiled together: losses and every parameter
    gradient as in eager."""
    torch.manual_seed(0)
    module = FusedDreamerModelLoss(
        make_world_model((3, 8, 8), latent_dim=6, channels=4, embed_dim=16, stochastic=False),
        free_nats=0.1, lambda_reward=0.5, backend=backend).to(device)
    g = torch.Generator().manual_seed(1)
    data = TensorDict({"next": {"pixels": torch.rand(2, 3, 3, 8, 8, generator=g),
                                "reward": torch.randn(2, 3, 1, generator=g)}},
                      batch_size=[2, 3]).to(device)

    def total(td):
        losses, _ = module(td)
        return sum(losses.values()).sum()

    compiled = torch.compile(total, fullgraph=True, backend="aot_eager")
    got, want = compiled(data), total(data)
    torch.testing.assert_close(got, want)
    params = list(module.parameters())
    for (name, _), a, b in zip(module.named_parameters(), torch.autograd.grad(got, params),
                               torch.autograd.grad(want, params)):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")


NEEDS = {
    "all": [True] * 8,
    "predictions": [False, False, True, True, False, True, False, True],
    "none": [False] * 8,
}


@pytest.mark.parametrize("needs", NEEDS.values(), ids=NEEDS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_custom_ops_pass_opcheck(device, needs, dtype):
    """torch.library.opcheck on the forward op and on the gradients op: schema, fake
    implementations (channels_last_3d layouts included), and AOT dispatch. The ops take inputs
    that do not require grad, as the autograd.Function calls them (its forward runs without
    grad)."""
    inputs = make_inputs((2, 3), 5, (3, 4, 4), dtype, device, seed=45, requires_grad=False)
    inputs[5] = inputs[5].to(memory_format=torch.channels_last_3d)
    inputs[4] = inputs[4].to(memory_format=torch.channels_last_3d)
    options = LossOptions(0.7, 1.3, 0.4, "smooth_l1", "l2", 0.5, False, True)
    floats, ints = kernels.KERNELS.encode(options, validate_inputs(*inputs))
    torch.library.opcheck(machinery.forward_op, ("dreamer", inputs, floats, ints, needs))

    keep = machinery.forward_op("dreamer", inputs, floats, ints, needs)[3]
    grad_outputs = [torch.tensor(2.0, dtype=dtype, device=device), None,
                    torch.tensor(-0.5, dtype=dtype, device=device)]
    wanted = [n and grad_outputs[t] is not None for n, t in zip(needs, kernels.INPUT_TERMS)]
    torch.library.opcheck(machinery.gradients_op,
                          ("dreamer", inputs, floats, ints, keep, grad_outputs, wanted))
