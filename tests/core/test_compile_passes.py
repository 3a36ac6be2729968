"""Compiled, the common training step moves and launches what eager mode does.

The common step: the sum of the loss terms, one backward (grad output 1 for every term), the
target frames not requiring grad. Eager mode moves three passes over the image tensors (the
forward kernel reads target and prediction and writes the prediction's gradient; the backward
hands it over). Under ``torch.compile`` the custom ops do the same: the forward op holds its
gradients for the gradients op (:data:`fused_dreamer_loss.core.machinery._HELD`).
"""

from __future__ import annotations

import gc

import pytest
import torch
from tests.core import traffic
from tests.world_model_v1.helpers_v1 import make_inputs
from tests.world_model_v3.helpers_v3 import make_v3_inputs

from fused_dreamer_loss import dreamer_model_loss, dreamer_v3_model_loss
from fused_dreamer_loss.core import machinery

COMPILERS = ("aot_eager", "inductor")
#: Read target and prediction, write the prediction's gradient.
COMMON_STEP_PASSES = 3


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.skipif(not machinery.INTERPRET, reason="counts the loads and stores of Triton's "
                                                    "interpreter")
@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("loss", traffic.STEPS)
def test_compiled_common_step_moves_and_launches_what_eager_does(loss, compiler):
    """Passes over the image tensors, Triton launches and image-sized allocations of one step,
    measured, compiled against eager (see :mod:`tests.core.traffic`)."""
    eager = traffic.measure_step(loss, None)
    compiled = traffic.measure_step(loss, compiler)
    assert eager.passes == COMMON_STEP_PASSES, eager.row()
    assert compiled.passes == eager.passes, compiled.row()
    assert compiled.triton_launches == eager.triton_launches, compiled.row()
    assert sorted(compiled.allocations) == sorted(eager.allocations), compiled.row()


def _v1_loss(backend):
    inputs = make_inputs((3, 4), 5, (3, 8, 8), torch.float32, seed=10)
    inputs[4].requires_grad_(False)
    loss = torch.compile(lambda *t: sum(dreamer_model_loss(*t, backend="triton")),
                         fullgraph=True, backend=backend)
    return (lambda: loss(*inputs)), inputs[5]


def _v3_loss(backend):
    inputs = make_v3_inputs((3, 4), head_shapes=((3, 8, 8),), seed=10)
    inputs["true_reward"].requires_grad_(False)
    loss = torch.compile(lambda t: sum(dreamer_v3_model_loss(**t, backend="triton").values()),
                         fullgraph=True, backend=backend)
    return (lambda: loss(inputs)), inputs["reco_pixels"]


def _held_now() -> list[list]:
    gc.collect()  # Triton's interpreter keeps the storages of its last arguments in a cycle
    return list(machinery._HELD.values())


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("make_loss", [_v1_loss, _v3_loss], ids=["V1", "V3"])
@pytest.mark.parametrize("weight,untouched", [(1.0, True), (2.0, False)])
def test_compiled_backward_hands_over_the_forward_gradient(make_loss, compiler, weight,
                                                           untouched):
    """The compiled backward's gradient of the prediction is the buffer the compiled forward
    wrote, kept as ``.grad`` without a copy: a sentinel written into it after the forward comes
    out unchanged with grad output 1, and is overwritten with 2 (the test can fail both ways)."""
    loss, reco = make_loss(compiler)
    loss()  # compiles
    before = _held_now()
    total = loss()
    (held,) = [h for h in _held_now() if not any(h is b for b in before)]
    (buffer,) = [g for g in held if g is not None and g.shape == reco.shape]
    buffer.fill_(123.0)
    address = buffer.data_ptr()
    del buffer  # else .grad would be a copy: autograd keeps a gradient nobody else holds as it is
    reco.grad = None
    (weight * total).backward()
    assert reco.grad.data_ptr() == address
    assert torch.equal(reco.grad, torch.full_like(reco.grad, 123.0)) == untouched
    assert all(g is None for g in held), "a handed-out gradient is still held"


@pytest.mark.parametrize("compiler", COMPILERS)
def test_held_gradients_go_with_the_graph(compiler):
    """A compiled forward whose backward never runs holds its gradients only as long as its
    autograd graph lives."""
    loss, reco = _v1_loss(compiler)
    loss().backward()
    total = loss()
    assert any(g is not None and g.shape == reco.shape for h in _held_now() for g in h)
    del total
    assert not any(g is not None for h in _held_now() for g in h)


@pytest.mark.skipif(not machinery.INTERPRET, reason="counts the loads and stores of Triton's "
                                                    "interpreter")
@pytest.mark.parametrize("compiler", (None, *COMPILERS))
def test_the_count_sees_torch_operators_on_the_images(compiler):
    """The measurement can fail: doubling the prediction before the loss adds four passes (read
    and write forward, and the same for its backward), counted from the dispatcher in eager mode
    and from the compiled graphs otherwise."""
    def make_step(backend):
        inputs = make_inputs(traffic.BATCH_SHAPE, 5, traffic.IMAGE_SHAPE, seed=1)
        inputs[4].requires_grad_(False)

        def doubled(*t):
            return sum(dreamer_model_loss(*t[:5], 2 * t[5], *t[6:], backend="triton"))

        loss = traffic.compiled(doubled, backend)
        return traffic.training_step(lambda: loss(*inputs),
                                     [t for t in inputs if t.requires_grad])

    numel = traffic.image_numel()
    measured = traffic.measure(make_step, compiler, numel, 4 * numel)
    assert measured.passes == COMMON_STEP_PASSES + 4, measured.row()
