"""The autograd-contract tests of both losses, again with the losses compiled.

The tests are the families' own (imported below, so that pytest collects them here too); a
fixture swaps the loss function their steps call for one compiled with ``fullgraph=True``:
``backend="triton"`` by ``aot_eager`` or ``inductor``, and the oracle, ``backend="torch"``, by
``aot_eager``. Compiled, torch's own rules differ from eager mode's in one place: a leaf that no
differentiated output depends on gets a zero ``.grad`` instead of None
(:func:`test_compiled_torch_gives_zeros_where_eager_gives_none`), so the oracle is compiled too.
Options are compile-time constants: each new combination compiles a graph, which later calls of
the same test reuse. Left out: ``create_graph`` and the tests built on it (AOTAutograd refuses
double backward through a compiled graph:
:func:`test_compiled_double_backward_is_refused_by_torch`), and the tests that are not about the
contract (validation, torch.func, meta tensors).
"""

from __future__ import annotations

import functools

import pytest
import torch

import tests.world_model_v1.test_autograd_contract as contract_v1
import tests.world_model_v3.test_fused_v3 as contract_v3
from tests.world_model_v1.helpers_v1 import make_inputs
from tests.world_model_v1.test_autograd_contract import (  # noqa: F401 (collected here)
    test_a_hook_sees_a_gradient_that_stays,
    test_a_returned_gradient_is_never_written_again,
    test_a_returned_gradient_may_be_modified_in_place,
    test_a_tiny_grad_output_then_one_is_exact,
    test_delayed_clamp_that_clamps_passes_no_gradient,
    test_float64_beside_bfloat16,
    test_grad_accumulates_over_backward_calls,
    test_grad_scaler_step_in_float16,
    test_input_modified_in_place_after_forward,
    test_loss_scaled_gradients_are_rounded_once,
    test_one_term_at_a_time_then_all,
    test_random_sequences_of_backward_calls,
    test_special_grad_output_then_one,
)
from tests.world_model_v3.test_fused_v3 import (  # noqa: F401 (collected here)
    test_contract_gradients_stay_and_accumulate,
    test_contract_one_term_at_a_time,
    test_contract_special_grad_output_then_one,
)

COMPILERS = ("aot_eager", "inductor")


def compiled_loss(loss, compiler: str):
    """``loss`` (a functional loss, or any function of tensors with a ``backend`` argument)
    compiled: by ``compiler`` for the Triton backend, by ``aot_eager`` for the torch backend
    (AOTAutograd makes torch's compiled rules whichever compiler follows; Inductor would only
    round differently, and spend minutes building C++ kernels for every reference graph)."""
    def run(*tensors, backend, **kwargs):
        named = {k: v for k, v in kwargs.items() if isinstance(v, (torch.Tensor, list))}
        options = {k: v for k, v in kwargs.items() if k not in named}
        compiled = torch.compile(functools.partial(loss, backend=backend, **options),
                                 fullgraph=True,
                                 backend=compiler if backend == "triton" else "aot_eager")
        return compiled(*tensors, **named)

    return run


@pytest.fixture
def dtype():
    """float32 only, compiled: the kernels round the same whoever launches them (both dtypes run
    eagerly in the family's tests)."""
    return torch.float32


#: Graphs one loss function may compile to in one test (options, dtypes, shapes and which inputs
#: require grad are compile-time constants), above Dynamo's default limit of 8, past which it
#: would fall back to eager mode.
RECOMPILE_LIMIT = 64


@pytest.fixture(autouse=True, params=COMPILERS)
def compiled(request, monkeypatch):
    """The contract tests' loss calls, compiled by each compiler in turn, from scratch in each
    test: a graph whose first backward let go of the graph does not take ``retain_graph`` later
    (AOTAutograd donates its saved buffers to that backward, and says so)."""
    torch._dynamo.reset()
    monkeypatch.setattr(contract_v1, "dreamer_model_loss",
                        compiled_loss(contract_v1.dreamer_model_loss, request.param))
    monkeypatch.setattr(contract_v3, "dreamer_v3_model_loss",
                        compiled_loss(contract_v3.dreamer_v3_model_loss, request.param))
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        yield request.param


def test_compiled_torch_gives_zeros_where_eager_gives_none(compiled):
    """Why the compiled contract tests compare with the compiled torch backend: a plain torch
    function, compiled, gives a leaf that only an undifferentiated output depends on a zero
    ``.grad``; eager mode leaves it None."""
    a, b = (torch.randn(3, requires_grad=True) for _ in range(2))
    compiled_pair = compiled_loss(lambda a, b, backend: ((a * a).sum(), (b * b).sum()), compiled)
    compiled_pair(a, b, backend="torch")[1].backward()
    assert torch.equal(a.grad, torch.zeros(3))
    a.grad = None
    ((a * a).sum(), (b * b).sum())[1].backward()
    assert a.grad is None


def test_compiled_double_backward_is_refused_by_torch(device, compiled):
    """Why ``create_graph`` is not among the compiled contract tests: AOTAutograd itself refuses
    to differentiate a compiled graph's backward, for a plain torch function too."""
    inputs = make_inputs((2, 3), 4, (2, 3, 3), torch.float64, device, seed=8)
    for backend in ("triton", "torch"):
        total = sum(contract_v1.dreamer_model_loss(*inputs, backend=backend))
        with pytest.raises(RuntimeError, match="double backward"):
            grads = torch.autograd.grad(total, inputs[5], create_graph=True)
            torch.autograd.grad(grads[0].sum(), inputs[5])
