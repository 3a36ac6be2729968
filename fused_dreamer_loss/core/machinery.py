"""What every fused loss shares: the finalize kernel, the autograd.Function, the custom ops.

A fused loss (V1's Dreamer loss, V3's) adds only its terms: a main forward kernel whose programs
each write one partial sum, a backward kernel that writes gradients, and a :class:`LossKernels`
entry that says how to launch them. Everything around them lives here:

    forward   the loss's main kernel     each program: one tile of one term; its partial sum (already
                                         divided by the term's count) to ``partials[pid]``, and the
                                         tile's gradients, as if ``grad_output`` were 1
              finalize_kernel            one program: each output is ``multiplier × Σ partials`` over
                                         its range, in a fixed order (bitwise deterministic, no
                                         atomics); optionally one output is clamped from below (V1's
                                         delayed clamp), recording in ``keep`` whether it passes
                                         the gradient
    backward  the loss's backward kernel one launch, a few programs per multiprocessor striding
                                         over the tiles; per term the factor is
                                         ``where(keep, grad_output, 0)`` (what the clamp's backward
                                         passes on), read on the device

The autograd contract (:class:`FusedLossFunction`): a tensor handed to autograd is never written
afterwards. The first backward that needs a term's gradients gets the buffers the forward wrote:
when the factor is 1 (a plain ``loss.backward()``) the backward kernel's programs return without
touching memory; otherwise they recompute the gradients from the saved inputs into those buffers,
times the factor, rounding once. A later backward through the same graph (``retain_graph=True``)
gets fresh buffers, always recomputed. ``create_graph=True``, and ``grad_outputs`` batched by a
``torch.func`` transform, differentiate the loss's pure-torch reference on the saved inputs
instead. Under ``torch.compile`` the forward makes no gradients and
the backward recomputes them into fresh tensors (the custom op ``fused_dreamer_loss::gradients``),
because a traced backward cannot know whether it runs for the first time.
"""

# No `from __future__ import annotations`: Triton reads the "fp64" annotations as written.
import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import triton
import triton.language as tl

from .validation import FLOAT_DTYPES, kernels_can_take

#: True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1`` was set before triton was
#: imported); then the kernels accept CPU tensors.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Backward programs per multiprocessor; each strides over tiles, so that a backward with nothing
#: to write is a few hundred programs that return at once, not one per tile.
BACKWARD_PROGRAMS_PER_SM = 4
#: Backward programs under Triton's interpreter (no multiprocessors to count).
INTERPRETER_BACKWARD_PROGRAMS = 4
#: Partials one finalize step reads.
FINALIZE_BLOCK = 4096
#: No output is clamped in the finalize.
NO_CLAMP = -1


# ---------------------------------------------------------------------------------------------
# Triton helpers shared by the losses' kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def scalar(value, ACC: tl.constexpr):
    """A runtime scalar argument (fp64 when compiled, a Python float when interpreted) in ACC."""
    return tl.full([], value, ACC)


@triton.jit
def store(ptr, value, mask):
    """``tl.store`` in the pointer's dtype, narrowing from fp64 through fp32: Triton's interpreter
    converts fp64 to bf16 or fp16 wrongly. (On a GPU the two steps can round a value differently
    from one step, by one unit of the narrow dtype; only a half-precision gradient of an input
    beside a float64 one is stored that way.)"""
    if ptr.dtype.element_ty != tl.float64:
        value = value.to(tl.float32)
    tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def log1p(a):
    """log(1 + a), accurate for small ``a`` (Goldberg's correction; no log1p in Triton's core)."""
    u = 1.0 + a
    exact = tl.log(u) * (a / tl.where(u == 1.0, 1.0, u - 1.0))
    return tl.where(u == 1.0, a, tl.where(u == float("inf"), u, exact))


@triton.jit
def expm1(a):
    """exp(a) − 1, accurate for small ``a`` (Kahan's correction; no expm1 in Triton's core)."""
    u = tl.exp(a)
    exact = (u - 1.0) * (a / tl.log(tl.where(u == 1.0, 2.0, u)))
    return tl.where(u == 1.0, a, tl.where((u - 1.0 == -1.0) | (u == float("inf")), u - 1.0, exact))


@triton.jit
def symlog(v):
    """sign(v) log(1 + |v|) and its derivative 1 / (1 + |v|) (1 at 0, as torchrl's)."""
    a = tl.abs(v)
    out = tl.where(v < 0, -log1p(a), log1p(a))
    return tl.where(v == 0, v, out), 1.0 / (1.0 + a)


@triton.jit
def symexp(v):
    """sign(v) (exp(|v|) − 1), the inverse of :func:`symlog`."""
    e = expm1(tl.abs(v))
    return tl.where(v == 0, v, tl.where(v < 0, -e, e))


@triton.jit
def two_hot_weights(x, bins, cls, n_bins):
    """``x [rows]`` spread over ``bins [BLOCK]`` (classes ``cls``, padding past ``n_bins``) as
    :func:`fused_dreamer_loss.core.math.two_hot`: ``x`` clamped to the support,
    ``lower = #(bins <= x) − 1`` clamped to [0, R − 2]. Returns ``(is_lower, is_upper)`` masks
    ``[rows, BLOCK]`` and the weights ``(w_lower, w_upper)`` ``[rows]``."""
    cls_ok = cls < n_bins
    first = tl.sum(tl.where(cls == 0, bins, 0.0), axis=0)
    last = tl.sum(tl.where(cls == n_bins - 1, bins, 0.0), axis=0)
    x = tl.where(x < first, first, tl.where(x > last, last, x))  # torch's clamp: NaN stays NaN
    count = tl.sum(tl.where(cls_ok[None, :] & (x[:, None] >= bins[None, :]), 1, 0), axis=1)
    lower = tl.minimum(tl.maximum(count - 1, 0), n_bins - 2)
    is_lower = cls[None, :] == lower[:, None]
    is_upper = cls[None, :] == lower[:, None] + 1
    below = tl.sum(tl.where(is_lower, bins[None, :], 0.0), axis=1)
    above = tl.sum(tl.where(is_upper, bins[None, :], 0.0), axis=1)
    w_upper = (x - below) / (above - below)
    return is_lower, is_upper, 1.0 - w_upper, w_upper


@triton.jit
def term_factor(grad_out_ptr, keep_ptr, TERM: tl.constexpr, SKIP_IF_ONE: tl.constexpr,
                ACC: tl.constexpr):
    """The factor a backward call puts on one term's gradients, ``where(keep, grad_output, 0)``,
    and whether its gradients need writing: always, unless ``SKIP_IF_ONE`` and the factor is 1
    (the buffers already hold the forward's gradients, made for a factor of 1)."""
    grad_out = tl.load(grad_out_ptr).to(ACC)
    factor = tl.where(tl.load(keep_ptr + TERM) != 0, grad_out, 0.0)
    work = tl.full([], 1, tl.int1)
    if SKIP_IF_ONE:
        work = factor != 1.0
    return factor, work


@triton.jit
def _sum_range(ptr, lo, hi, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Sum of ``ptr[lo:hi]`` in a fixed order."""
    acc = tl.zeros([BLOCK], ACC)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(ptr + offs, mask=offs < hi, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _pick(t: tl.constexpr, m0, m1, m2, m3, m4):
    if t == 0:
        m = m0
    elif t == 1:
        m = m1
    elif t == 2:
        m = m2
    elif t == 3:
        m = m3
    else:
        m = m4
    return m


@triton.jit
def finalize_kernel(
    partials_ptr, outs, keep_ptr, ranges,
    m0: "fp64", m1: "fp64", m2: "fp64", m3: "fp64", m4: "fp64", clamp_value: "fp64",
    N_OUT: tl.constexpr, CLAMP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """One program: ``outs[t] = m_t × Σ partials[ranges[t]]`` for each output, in a fixed order.
    Output ``CLAMP`` (if any) is ``m × max(Σ, clamp_value)``, and ``keep[t]`` is 1 where the
    output passes its gradient (torch's ``clamp_min`` passes it where ``x >= min``), 0 otherwise."""
    # In ACC first: Triton's interpreter would pass Python floats to a jit function as fp32.
    m0 = scalar(m0, ACC)
    m1 = scalar(m1, ACC)
    m2 = scalar(m2, ACC)
    m3 = scalar(m3, ACC)
    m4 = scalar(m4, ACC)
    for t in tl.static_range(N_OUT):
        total = _sum_range(partials_ptr, ranges[t][0], ranges[t][1], BLOCK, ACC)
        keep = scalar(1.0, ACC)
        if t == CLAMP:
            floor = scalar(clamp_value, ACC)
            keep = tl.where(total >= floor, 1.0, 0.0).to(ACC)
            total = tl.where(total < floor, floor, total)
        tl.store(outs[t], (_pick(t, m0, m1, m2, m3, m4) * total).to(outs[t].dtype.element_ty))
        tl.store(keep_ptr + t, keep)


# ---------------------------------------------------------------------------------------------
# Host helpers
# ---------------------------------------------------------------------------------------------


def acc_dtype(*tensors: Optional[torch.Tensor]) -> tuple[torch.dtype, tl.dtype]:
    """fp64 accumulation when any input is fp64, fp32 otherwise."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def is_dense(t: torch.Tensor) -> bool:
    """True when ``t``'s elements fill a contiguous stretch of memory in some dim order."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def flat_pair(target: torch.Tensor, prediction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two same-shaped tensors, readable as flat arrays in the same element order.

    Dense tensors that share a layout (contiguous, channels_last, any permutation) are used as they
    are: an elementwise loss reduced over everything does not care about the order. Anything else
    is copied once.
    """
    if _read_as_they_are(target, prediction):
        return target, prediction
    return target.contiguous(), prediction.contiguous()


def _read_as_they_are(target: torch.Tensor, prediction: torch.Tensor) -> bool:
    return target.stride() == prediction.stride() and is_dense(target)


def empty_pair_grad(t: torch.Tensor, target: torch.Tensor,
                    prediction: torch.Tensor) -> torch.Tensor:
    """An unwritten gradient of ``t`` (``target`` or ``prediction``), in the layout
    :func:`flat_pair` reads the pair in: theirs when they are read as they are, else contiguous."""
    if _read_as_they_are(target, prediction):
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


@functools.lru_cache(maxsize=None)
def backward_programs(device: torch.device) -> int:
    """Programs of a grid-striding backward launch."""
    if device.type != "cuda":
        return INTERPRETER_BACKWARD_PROGRAMS
    return BACKWARD_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def launch_finalize(partials: torch.Tensor, outs: Sequence[torch.Tensor], keep: torch.Tensor,
                    ranges: Sequence[tuple[int, int]], multipliers: Sequence[float],
                    clamp: int = NO_CLAMP, clamp_value: float = 0.0) -> None:
    """``outs[t] = multipliers[t] × Σ partials[ranges[t]]`` (see :func:`finalize_kernel`)."""
    m = [*multipliers, *[0.0] * (5 - len(multipliers))]
    finalize_kernel[(1,)](
        partials, tuple(outs), keep, tuple(tuple(r) for r in ranges), *m, clamp_value,
        N_OUT=len(outs), CLAMP=clamp, BLOCK=FINALIZE_BLOCK, ACC=acc_dtype(keep)[1],
    )


def dtype_code(dtype: torch.dtype) -> int:
    """A float dtype as an int, for the custom ops' integer arguments."""
    return FLOAT_DTYPES.index(dtype)


def code_dtype(code: int) -> torch.dtype:
    return FLOAT_DTYPES[code]


def empty_outputs(inputs: Sequence[Optional[torch.Tensor]], loss_dtypes: Sequence[torch.dtype],
                  needs: Sequence[bool], empty_grad: Callable) -> list[torch.Tensor]:
    """A forward's outputs, unwritten: ``[*losses, keep, *grads]``, one 0-dim loss per dtype in
    ``loss_dtypes``, the keep flags in the accumulation dtype, and ``empty_grad(inputs, i)`` for
    each input ``i`` in ``needs``. Shared by the launchers and their fake implementations."""
    device = inputs[0].device
    losses = [torch.empty((), dtype=d, device=device) for d in loss_dtypes]
    keep = torch.empty(len(losses), dtype=acc_dtype(*inputs)[0], device=device)
    return [*losses, keep, *(empty_grad(inputs, i) for i, n in enumerate(needs) if n)]


def by_input(made: Sequence[torch.Tensor], needs: Sequence[bool]) -> list[Optional[torch.Tensor]]:
    """The gradients the forward made, one per input: None where ``needs`` asked for none."""
    made_iter = iter(made)
    return [next(made_iter) if n else None for n in needs]


# ---------------------------------------------------------------------------------------------
# One fused loss, as the machinery sees it
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossKernels:
    """How to run one fused loss.

    Attributes:
        name: the loss's name in the custom ops (``"dreamer"``, ``"dreamer_v3"``).
        terms: ``(ints, n_inputs) -> tuple``: for each input tensor, the output (term) whose
            ``grad_output`` scales its gradient; every input's gradient depends on one output only.
        forward: ``(inputs, floats, ints, needs) -> [*losses, keep, *grads]``: launches the main
            kernel and the finalize; ``grads`` holds the gradient of each input in ``needs``, as if
            ``grad_output`` were 1, in the layout :attr:`empty_grad` gives.
        forward_fake: what ``forward`` returns, unwritten (shapes, strides, dtypes), for tracing.
        backward: ``(inputs, floats, ints, keep, grad_outputs, grads, skip_if_one) -> None``: one
            launch writing ``factor × gradient`` into each non-None ``grads[i]``, the factor of
            input ``i``'s term; a term in ``skip_if_one`` whose factor is 1 is left as it is.
        empty_grad: ``(inputs, i) -> tensor``: an unwritten gradient buffer for input ``i``.
        encode: ``(options, shapes) -> (floats, ints)``: the options and loss dtypes as the
            launchers' scalar arguments (so that they are also custom-op arguments).
        reference: ``(inputs, options, shapes) -> losses``: the pure-torch loss on the same inputs,
            differentiable twice; used for ``create_graph=True``.
    """

    name: str
    terms: Callable[[Sequence[int], int], tuple[int, ...]]
    forward: Callable[..., list[torch.Tensor]]
    forward_fake: Callable[..., list[torch.Tensor]]
    backward: Callable[..., None]
    empty_grad: Callable[[Sequence[Optional[torch.Tensor]], int], torch.Tensor]
    encode: Callable[[Any, Any], tuple[list[float], list[int]]]
    reference: Callable[..., Sequence[torch.Tensor]]


LOSSES: dict[str, LossKernels] = {}


def register(kernels: LossKernels) -> LossKernels:
    """Make ``kernels`` reachable from the custom ops, by name."""
    LOSSES[kernels.name] = kernels
    return kernels


def on_device(t: torch.Tensor):
    """A context in which Triton launches on ``t``'s GPU (it launches on the current device, which
    need not be the tensors')."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _gradients(loss: str, inputs: list[Optional[torch.Tensor]], floats: list[float],
               ints: list[int], keep: torch.Tensor, grad_outputs: list[Optional[torch.Tensor]],
               wanted: list[bool]) -> list[torch.Tensor]:
    """Fresh gradients, ``factor × d loss / d input``, of the inputs in ``wanted``."""
    kernels = LOSSES[loss]
    grads = [kernels.empty_grad(inputs, i) if w else None for i, w in enumerate(wanted)]
    with on_device(keep):
        kernels.backward(inputs, floats, ints, keep, grad_outputs, grads,
                         [False] * len(grad_outputs))
    return [g for g in grads if g is not None]


def _gradients_fake(loss, inputs, floats, ints, keep, grad_outputs, wanted):
    kernels = LOSSES[loss]
    return [kernels.empty_grad(inputs, i) for i, w in enumerate(wanted) if w]


def _forward(loss: str, inputs: list[Optional[torch.Tensor]], floats: list[float],
             ints: list[int], needs: list[bool]) -> list[torch.Tensor]:
    with on_device(inputs[0]):
        return LOSSES[loss].forward(inputs, floats, ints, needs)


def _forward_fake(loss, inputs, floats, ints, needs):
    return LOSSES[loss].forward_fake(inputs, floats, ints, needs)


# Custom ops: how torch.compile sees the launchers. Dynamo cannot trace a Triton launch (nor
# Triton's interpreter), so under torch.compile the Function calls these: opaque to the tracer,
# with fake implementations for shapes. Both are functional (no argument is written). In eager
# mode the Function calls the launchers directly and skips the dispatcher (about 20 µs of host
# time per call, measured on this project's CPU VM).
forward_op = torch.library.custom_op("fused_dreamer_loss::forward", _forward, mutates_args=())
forward_op.register_fake(_forward_fake)
gradients_op = torch.library.custom_op("fused_dreamer_loss::gradients", _gradients,
                                       mutates_args=())
gradients_op.register_fake(_gradients_fake)


def _differentiable_gradients(kernels: LossKernels, ctx, inputs, grad_outputs):
    """``create_graph=True`` (or batched ``grad_outputs``): the gradients as a torch computation on
    the saved inputs (which carry their autograd history), differentiable again, with respect to
    the inputs and to ``grad_outputs``."""
    wanted = [t for t, n in zip(inputs, ctx.needs) if n]
    with torch.enable_grad():
        losses = kernels.reference(inputs, ctx.options, ctx.shapes)
        pairs = [(loss, g.to(loss.dtype)) for loss, g in zip(losses, grad_outputs)
                 if g is not None and loss.requires_grad]
        if not pairs:
            return [None] * len(inputs)
        grads = torch.autograd.grad([p[0] for p in pairs], wanted, [p[1] for p in pairs],
                                    create_graph=True, allow_unused=True)
    return by_input(grads, ctx.needs)


class FusedLossFunction(torch.autograd.Function):
    """Autograd over one fused loss (see the module docstring for the contract it keeps).

    ``apply(kernels, options, shapes, grad_enabled, *inputs)`` returns the loss's outputs. Inputs
    may be None (an absent optional tensor). ``grad_enabled`` is the caller's grad mode: under
    ``torch.no_grad()`` autograd still reports ``needs_input_grad``, but no backward can follow, so
    the forward writes no gradient.
    """

    @staticmethod
    def forward(ctx, kernels: LossKernels, options, shapes, grad_enabled: bool, *inputs):
        ctx.set_materialize_grads(False)
        needs = [bool(grad_enabled and n and t is not None)
                 for n, t in zip(ctx.needs_input_grad[4:], inputs)]
        floats, ints = kernels.encode(options, shapes)
        compiling = torch.compiler.is_compiling()
        forward = forward_op if compiling else _forward
        # Compiled: the backward recomputes every gradient, so the forward makes none.
        made_needs = [False] * len(needs) if compiling else needs
        outs = forward(kernels.name, list(inputs), floats, ints, made_needs)
        n_out = len(outs) - 1 - sum(made_needs)
        losses, keep, made = outs[:n_out], outs[n_out], outs[n_out + 1:]
        if any(needs):
            # The gradient buffers are not saved tensors: a user may modify one in place once it
            # is handed out (torch allows that), which a saved tensor's version check would refuse.
            ctx.save_for_backward(*inputs, keep)
            ctx.forward_grads = by_input(made, made_needs)
            ctx.kernels, ctx.options, ctx.shapes = kernels, options, shapes
            ctx.needs, ctx.floats, ctx.ints = needs, floats, ints
            ctx.input_terms = kernels.terms(ints, len(inputs))
            ctx.handed_out = [False] * n_out
        return tuple(losses)

    @staticmethod
    def backward(ctx, *grad_outputs):
        kernels = ctx.kernels
        n = len(ctx.needs)
        saved = ctx.saved_tensors  # raises if an input was modified in place since the forward
        inputs, keep = list(saved[:n]), saved[n]
        if torch.is_grad_enabled() or not kernels_can_take(grad_outputs):
            grads = _differentiable_gradients(kernels, ctx, inputs, grad_outputs)
        else:
            active = [g is not None for g in grad_outputs]
            wanted = [need and active[term] for need, term in zip(ctx.needs, ctx.input_terms)]
            if torch.compiler.is_compiling():
                fresh = gradients_op(kernels.name, inputs, ctx.floats, ctx.ints, keep,
                                     list(grad_outputs), wanted)
                grads = by_input(fresh, wanted)
            else:
                grads = _eager_gradients(ctx, inputs, keep, grad_outputs, wanted)
        return (None, None, None, None, *grads)


def _eager_gradients(ctx, inputs, keep, grad_outputs, wanted):
    """The first backward that needs a term gets the forward's buffers, fixed in place when the
    factor is not 1; later ones get fresh buffers (see the module docstring). The context lets go
    of a buffer it hands out, so that autograd may keep it as ``.grad`` without a copy."""
    kernels = ctx.kernels
    grads = []
    for i, (w, term) in enumerate(zip(wanted, ctx.input_terms)):
        if not w:
            grads.append(None)
        elif ctx.handed_out[term]:
            grads.append(kernels.empty_grad(inputs, i))
        else:
            grads.append(ctx.forward_grads[i])
            ctx.forward_grads[i] = None
    if any(wanted):
        with on_device(keep):
            kernels.backward(inputs, ctx.floats, ctx.ints, keep, list(grad_outputs), grads,
                             [not h for h in ctx.handed_out])
    for w, term in zip(wanted, ctx.input_terms):
        if w:
            ctx.handed_out[term] = True
    return grads


def apply(kernels: LossKernels, options, shapes, inputs: Sequence[Optional[torch.Tensor]]):
    """Run a fused loss on validated inputs: its outputs, differentiable."""
    return FusedLossFunction.apply(kernels, options, shapes, torch.is_grad_enabled(), *inputs)
