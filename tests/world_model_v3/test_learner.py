"""FusedDreamerV3ModelLoss inside torchrl's DreamerV3 learner (``DreamerV3Loss`` and
``DreamerV3OptimizationStepper``), against torchrl's DreamerV3ModelLoss in the same learner: from
the same initial weights, data and random streams, the losses the stepper returns at each of
several optimizer steps and every parameter and buffer after them.

The learner is the benchmark's (:func:`fused_dreamer_loss.bench.learner.make_learner`: torchrl's
modules wired as its DreamerV3 recipe wires them for pixels) at the ``v3-tiny`` preset (2 × 4
frames of 3×8×8, 4 × 4 latents, 8-wide networks, imagination 3 steps), with the world-model loss
of two conventions: ``dreamerv3-2024`` (the recipe's: separate KL with unimix, uint8 frames
without symlog, continue) and ``torchrl`` (the library's defaults: balanced KL, symlog frames, no
continue). Three changes from the recipe, all for the comparison:

- the reward and value heads start at output scale 1, not DreamerV3's 0: with heads that predict
  0 the actor's gradient is float32 rounding for the first steps, and ``DreamerV3Optimizer``
  (which divides each gradient by its RMS) turns rounding into full-size updates, so that any two
  float32 implementations of the same loss then disagree by about the learning rate;
- free nats 0.1 (:data:`FREE_NATS`), not 1, which the tiny RSSM's KL does not reach in these
  steps: with 1 the KL terms are clamped, pass no gradient, and a wrong KL weight changes no
  parameter;
- ``DreamerV3Optimizer`` without its warm-up (whose first step has learning rate 0), at 1e-3.

Compiled: ``compile_train_step=True``, with ``torch.compile``'s backend set to ``aot_eager``:
Dynamo and AOTAutograd trace the whole step as torchrl's default does (graph breaks, functional
parameters, our custom ops and their fake kernels, the backward), but Inductor's C++ code
generation, which takes minutes per learner on a 2-core CPU, is left out; and the RSSM runs its
explicit loop (``rssm_scan_unroll=None``, as the recipe does without its scan backend), since
hoptorch's scan, which the stepper selects otherwise, fails its backward health check under
``aot_eager`` (a RuntimeError at the warm-up). Dynamo reuses what it compiled of one learner for
the next, so torchrl's compiled learner runs first and ours then compile only what differs.

float32 only: torchrl's image encoder makes float32 frames, and the stepper's bfloat16 autocast is
for CUDA only.
"""

from __future__ import annotations

import functools
import inspect
from unittest import mock

import pytest
import torch

from fused_dreamer_loss import V3_CONVENTIONS, dreamer_v3_model_loss
from tests.helpers import one_thread  # noqa: F401 (autouse: this module runs on one thread)

pytest.importorskip("torchrl")
from fused_dreamer_loss.bench.learner import make_learner, make_sample, make_stepper  # noqa: E402

pytestmark = [
    # torchrl.trainers, imported by the learner, defines classes that torchrl itself deprecates.
    pytest.mark.filterwarnings("ignore:Creating .* which inherits from WeightUpdaterBase is "
                               "deprecated:DeprecationWarning"),
    # The torchrl convention on uint8 frames: the symlog of raw pixel values, as torchrl's own
    # loss compares them, which our module points out once.
    pytest.mark.filterwarnings("ignore:pixels holds integer frames:UserWarning"),
    # torchrl's stepper still checks a Dynamo option that torch 2.13 deprecates.
    pytest.mark.filterwarnings("ignore:torch._dynamo.config.inline_inbuilt_nn_modules is "
                               "deprecated:FutureWarning"),
]

PRESET = "v3-tiny"
STEPS = 3
FREE_NATS = 0.1
LR = 1e-3
SEED = 5
CONVENTIONS = ("dreamerv3-2024", "torchrl")
BACKENDS = ("torch", "triton")
#: torch.compile's backend for the compiled learner (see the module's docstring).
COMPILE_BACKEND = "aot_eager"
IMPLS = {"torch": "eager", "triton": "fused"}  # the benchmark's names of our two backends

# float32 tolerances. Our loss adds its terms in another order than torchrl's (the Triton kernels
# in tiles, reduced in a fixed order), so a loss and its gradients differ from torchrl's by float32
# rounding, a few ulps (2**-23 ≈ 1.2e-7 relative): LOSS_RTOL leaves about 40 ulps for the sums of
# thousands of terms and the steps after the first, whose inputs carry the earlier differences.
# LOSS_ATOL is for the metrics that cancel to about 0.
LOSS_RTOL, LOSS_ATOL = 5e-6, 1e-8
# A parameter moves by about LR per step (the optimizer divides the gradient by its RMS), and a
# relative gradient difference ε moves it differently by about ε·LR: PARAM_ATOL (1e-3·LR) is far
# above that, and far below the LR-sized differences of a loss that is wrong. PARAM_RTOL covers
# the rounding of the parameter itself (a few ulps of its value).
PARAM_RTOL, PARAM_ATOL = 1e-6, 1e-3 * LR


def train(impl: str, convention: str, compiled: bool, **options):
    """``STEPS`` updates of the learner with ``impl``'s world-model loss (``options`` changed from
    the convention's): the metrics of each update, and every parameter and buffer before and
    after."""
    options = {**V3_CONVENTIONS[convention], "free_bits": FREE_NATS, **options}
    learner = make_learner(PRESET, options, impl, head_outscale=1.0, lr=LR, warmup_steps=0)
    state = lambda: {name: t.detach().clone() for name, t in  # noqa: E731
                     [*learner.loss.named_parameters(), *learner.loss.named_buffers()]}
    before = state()
    samples = [make_sample(PRESET, seed=seed) for seed in range(STEPS)]
    if compiled:
        stepper = make_stepper(learner, "compiled", rssm_scan_unroll=None, warmup_steps=1)
        with mock.patch.object(torch, "compile", functools.partial(torch.compile,
                                                                   backend=COMPILE_BACKEND)):
            stepper.warmup(samples[0])
    else:
        stepper = make_stepper(learner, "eager")
    torch.manual_seed(SEED)
    metrics = [{name: value.clone() for name, value in stepper.step(None, sample).items()}
               for sample in samples]
    return metrics, before, state()


@functools.lru_cache(maxsize=None)
def torchrl_run(convention: str, compiled: bool):
    if compiled:
        torch._dynamo.reset()
    return train("torchrl", convention, compiled)


def assert_same_metrics(ours, theirs):
    """The same metrics, in the same order, at every step."""
    for step, (got, want) in enumerate(zip(ours[0], theirs[0], strict=True)):
        assert list(got) == list(want), f"step {step}: metrics {list(got)} vs {list(want)}"
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=LOSS_RTOL, atol=LOSS_ATOL,
                                       msg=lambda m: f"step {step} {name}: {m}")


def assert_same_state(ours, theirs):
    """The same parameters and buffers before the steps (bitwise) and after them, which moved
    most of them."""
    (_, our_before, our_after), (_, before, after) = ours, theirs
    assert our_before.keys() == before.keys() == after.keys() == our_after.keys()
    for name, value in before.items():
        torch.testing.assert_close(our_before[name], value, rtol=0, atol=0)
    for name, value in after.items():
        torch.testing.assert_close(our_after[name], value, rtol=PARAM_RTOL, atol=PARAM_ATOL,
                                   msg=lambda m: f"{name} after {STEPS} steps: {m}")
    moved = sum(not torch.equal(value, before[name]) for name, value in after.items())
    assert moved > len(after) // 2, f"only {moved} of {len(after)} tensors changed"


def assert_same_training(ours, theirs):
    assert_same_metrics(ours, theirs)
    assert_same_state(ours, theirs)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_learner_trains_as_with_torchrls_loss(backend, convention):
    assert_same_training(train(IMPLS[backend], convention, compiled=False),
                         torchrl_run(convention, compiled=False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_learner_trains_as_with_torchrls_loss(backend):
    """The recipe's convention, ``compile_train_step=True`` (see the module's docstring)."""
    assert_same_training(train(IMPLS[backend], "dreamerv3-2024", compiled=True),
                         torchrl_run("dreamerv3-2024", compiled=True))


@pytest.mark.parametrize("option", ["lambda_kl", "lambda_dynamic", "lambda_representation",
                                    "lambda_reco", "lambda_reward", "lambda_continue"])
def test_a_weight_off_by_one_percent_is_caught(option):
    """The comparison can fail: with one of our loss's weights 1% off, neither the metrics nor
    the parameters after the steps match torchrl's."""
    value = V3_CONVENTIONS["dreamerv3-2024"].get(
        option, inspect.signature(dreamer_v3_model_loss).parameters[option].default)
    wrong = train("eager", "dreamerv3-2024", compiled=False, **{option: value * 1.01})
    theirs = torchrl_run("dreamerv3-2024", compiled=False)
    with pytest.raises(AssertionError, match="step 0"):
        assert_same_metrics(wrong, theirs)
    with pytest.raises(AssertionError, match=f"after {STEPS} steps"):
        assert_same_state(wrong, theirs)
