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
instead. Under ``torch.compile`` the same happens in the custom ops: a traced backward cannot know
whether it runs for the first time, but the op it calls, ``fused_dreamer_loss::gradients``, runs
at run time and can. The forward op holds the gradients it makes outside the graph, keyed by its
``keep`` tensor (which the backward gets), and the gradients op hands them over as eager mode does.
"""

# No `from __future__ import annotations`: Triton reads the "fp64" annotations as written.
import contextlib
import functools
import os
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch.autograd import forward_ad
from triton import knobs
from triton.runtime.driver import driver as triton_driver
from triton.runtime.jit import JITFunction

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
#: Triton specialises a pointer argument on its 16-byte alignment.
ALIGNMENT_MASK = 15


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


def cdiv(n: int, d: int) -> int:
    """``⌈n / d⌉`` on the host (``triton.cdiv`` is a constexpr function in Triton 3.5 to 3.9:
    about 1.5 µs a call on this project's CPU VM, against 0.02)."""
    return -(-n // d)


def next_power_of_2(n: int) -> int:
    """The least power of 2 at or above ``n`` (``n >= 1``), on the host (as :func:`cdiv`)."""
    return 1 << (n - 1).bit_length()


def bits(flags) -> int:
    """Flags as the bits of one integer (flag ``i`` is bit ``i``), for a constexpr argument."""
    return sum(int(bool(f)) << i for i, f in enumerate(flags))


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
    if pair_as_is(target, prediction):
        return target, prediction
    return target.contiguous(), prediction.contiguous()


def pair_as_is(target: torch.Tensor, prediction: torch.Tensor) -> bool:
    """Whether :func:`flat_pair` reads the pair as it is (no copy)."""
    return target.stride() == prediction.stride() and is_dense(target)


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def empty_pair_grad(t: torch.Tensor, target: torch.Tensor,
                    prediction: torch.Tensor) -> torch.Tensor:
    """An unwritten gradient of ``t`` (``target`` or ``prediction``), in the layout
    :func:`flat_pair` reads the pair in: theirs when they are read as they are, else contiguous."""
    if pair_as_is(target, prediction):
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


@functools.lru_cache(maxsize=None)
def backward_programs(device: torch.device) -> int:
    """Programs of a grid-striding backward launch."""
    if device.type != "cuda":
        return INTERPRETER_BACKWARD_PROGRAMS
    return BACKWARD_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


class Finalize:
    """The finalize launch of one plan: ``outs[t] = multipliers[t] × Σ partials[ranges[t]]``
    (see :func:`finalize_kernel`), ranges, multipliers and clamp fixed; call it with
    ``(partials, outs, keep)``."""

    __slots__ = ("scalars", "launch")

    def __init__(self, ranges: Sequence[tuple[int, int]], multipliers: Sequence[float],
                 acc: tl.dtype, clamp: int = NO_CLAMP, clamp_value: float = 0.0):
        m = [*multipliers, *[0.0] * (5 - len(multipliers))]
        self.scalars = (tuple(tuple(r) for r in ranges), *m, clamp_value)
        self.launch = Launch(sys.modules[__name__], "finalize_kernel", 1, dict(
            N_OUT=len(multipliers), CLAMP=clamp, BLOCK=FINALIZE_BLOCK, ACC=acc))

    def __call__(self, partials: torch.Tensor, outs: Sequence[torch.Tensor],
                 keep: torch.Tensor) -> None:
        self.launch(partials, tuple(outs), keep, *self.scalars)


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


def empty_partials_and_keep(programs: int, n_out: int, dtype: torch.dtype,
                            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One allocation for a forward's partial sums (``programs``, the main kernel's) and its keep
    flags (``n_out``, the finalize's): ``(partials, keep)``. The flags come first (at offset 0,
    as a tensor of their own would be), the partials at the next 16-byte boundary (their pointer
    aligned, which the compiled kernels assume)."""
    per_line = (ALIGNMENT_MASK + 1) // dtype.itemsize
    start = -(-n_out // per_line) * per_line
    small = torch.empty(start + programs, dtype=dtype, device=device)
    return small[start:], small[:n_out]


def by_input(made: Sequence[torch.Tensor], needs: Sequence[bool]) -> list[Optional[torch.Tensor]]:
    """The gradients the forward made, one per input: None where ``needs`` asked for none."""
    made_iter = iter(made)
    return [next(made_iter) if n else None for n in needs]


# ---------------------------------------------------------------------------------------------
# Launches
# ---------------------------------------------------------------------------------------------


def _launch_hooks_set() -> bool:
    """Whether a launch hook (a profiler's) is registered: then every launch goes through
    Triton's dispatch, which builds the launch metadata the hooks read. (Triton 3.5 and later
    keep the hooks in chains, never None; earlier releases a hook or None.)"""
    runtime = knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    return (enter is not None and getattr(enter, "calls", True)) or \
        (leave is not None and getattr(leave, "calls", True))


class Launch:
    """``kernel[(programs,)](*args, **constexprs)`` with the grid and the constexprs of one plan.

    The first call goes through Triton's dispatch (its binder, its cache lookup, compiling if
    need be). Later calls launch the compiled kernel it returned directly, with the argument
    values Triton's dispatch would pass (its ``src.signature`` names them: the runtime
    arguments, tensors as data pointers, and the constexprs), when nothing that dispatch would
    decide differently has changed: the kernel object (tests replace it), every pointer 16-byte
    aligned as it was when compiled (the one property of an argument Triton specialises on that
    a plan does not fix: sizes, strides and flags are the plan's), no launch hook, the same
    device. Anything else takes Triton's dispatch. Under Triton's interpreter every call does.

    Attributes:
        owner, name: where the kernel is looked up at each call (``getattr(owner, name)``).
    """

    __slots__ = ("owner", "name", "programs", "constexprs", "_direct")

    def __init__(self, owner: Any, name: str, programs: int, constexprs: dict):
        self.owner, self.name, self.programs, self.constexprs = owner, name, programs, constexprs
        self._direct = None  # (kernel, compiled, device, tensor slots, tuple slots, tail)

    def __call__(self, *args) -> None:
        kernel = getattr(self.owner, self.name)
        direct = self._direct
        if direct is not None and direct[0] is kernel and not _launch_hooks_set():
            _, compiled, device, tensors, tuples, tail = direct
            values = list(args)
            misaligned = 0
            for i in tensors:
                ptr = values[i] = values[i].data_ptr()
                misaligned |= ptr
            for i in tuples:
                ptrs = values[i] = tuple([t.data_ptr() for t in values[i]])
                for ptr in ptrs:
                    misaligned |= ptr
            active = triton_driver.active
            if not misaligned & ALIGNMENT_MASK and active.get_current_device() == device:
                compiled.run(self.programs, 1, 1, active.get_current_stream(device),
                             compiled.function, compiled.packed_metadata, None, None, None,
                             *values, *tail)
                return
        compiled = kernel[(self.programs,)](*args, **self.constexprs)
        self._direct = self._direct_entry(kernel, compiled, args)

    def _direct_entry(self, kernel, compiled, args):
        """What a direct launch of ``compiled`` needs, or None where it cannot take one: not a
        compiled kernel (the interpreter, a test's spy), or a pointer that was not aligned."""
        if not isinstance(kernel, JITFunction) or not hasattr(compiled, "packed_metadata"):
            return None
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        tuples = [i for i, a in enumerate(args)
                  if isinstance(a, tuple) and any(isinstance(t, torch.Tensor) for t in a)]
        if not all(isinstance(t, torch.Tensor) for i in tuples for t in args[i]):
            return None
        pointers = [args[i] for i in tensors] + [t for i in tuples for t in args[i]]
        if any(t.data_ptr() & ALIGNMENT_MASK for t in pointers):
            return None
        names = list(compiled.src.signature)
        params = kernel.arg_names
        order = [n if isinstance(n, int) else params.index(n) for n in names]
        if order[:len(args)] != list(range(len(args))):
            return None
        tail = tuple(self.constexprs[params[i]] for i in order[len(args):])
        return kernel, compiled, triton_driver.active.get_current_device(), tensors, tuples, tail


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
            differentiable twice; used for ``create_graph=True`` and forward-mode AD.
        plan: ``(inputs, floats, ints) -> plan``: what ``forward`` and ``backward``
            launch for inputs of this signature (shapes, strides, dtypes, device), worked out
            once: ``plan.forward(inputs, needs) -> (losses, keep, grads)`` (``grads`` one per
            input, None where ``needs`` asks for none) and ``plan.backward(inputs, keep,
            grad_outputs, grads, skip_if_one)`` do what ``forward`` and ``backward`` do. Eager
            calls prepared once per signature (:class:`FusedCall`) reuse it.
        input_names: ``(ints, n_inputs) -> names``, optional: the inputs' argument names, for
            error messages.
    """

    name: str
    terms: Callable[[Sequence[int], int], tuple[int, ...]]
    forward: Callable[..., list[torch.Tensor]]
    forward_fake: Callable[..., list[torch.Tensor]]
    backward: Callable[..., None]
    empty_grad: Callable[[Sequence[Optional[torch.Tensor]], int], torch.Tensor]
    encode: Callable[[Any, Any], tuple[list[float], list[int]]]
    reference: Callable[..., Sequence[torch.Tensor]]
    plan: Callable[..., Any]
    input_names: Optional[Callable[[Sequence[int], int], Sequence[str]]] = None


LOSSES: dict[str, LossKernels] = {}


def register(kernels: LossKernels) -> LossKernels:
    """Make ``kernels`` reachable from the custom ops, by name."""
    LOSSES[kernels.name] = kernels
    return kernels


def on_device(t: torch.Tensor):
    """A context in which Triton launches on ``t``'s GPU (it launches on the current device, which
    need not be the tensors'); nothing to switch when it is the current one."""
    device = t.device
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return _NO_SWITCH
    return torch.cuda.device(device)


_NO_SWITCH = contextlib.nullcontext()


#: What a compiled forward made for its backward: the gradients (one entry per input, None where
#: none was made or once handed out), keyed by the storage of the forward's ``keep`` tensor, which
#: the backward gets as a saved tensor. An entry goes with that storage: when the autograd graph
#: is freed, backward or not.
_HELD: "weakref.WeakKeyDictionary[torch.UntypedStorage, list]" = weakref.WeakKeyDictionary()


def _gradients(loss: str, inputs: list[Optional[torch.Tensor]], floats: list[float],
               ints: list[int], keep: torch.Tensor, grad_outputs: list[Optional[torch.Tensor]],
               wanted: list[bool]) -> list[torch.Tensor]:
    """``factor × d loss / d input`` of the inputs in ``wanted``: the gradients the forward held
    the first time a term asks (left as they are when its factor is 1, fixed in place otherwise),
    fresh ones after that."""
    kernels = LOSSES[loss]
    held = _HELD.get(keep.untyped_storage(), [None] * len(inputs))
    terms = kernels.terms(ints, len(inputs))
    grads = [held[i] if w else None for i, w in enumerate(wanted)]
    skip_if_one = [all(g is not None for g, w, t in zip(grads, wanted, terms) if w and t == term)
                   for term in range(len(grad_outputs))]
    for i, w in enumerate(wanted):
        if w:
            held[i] = None
            if grads[i] is None:
                grads[i] = kernels.empty_grad(inputs, i)
    with on_device(keep):
        kernels.backward(inputs, floats, ints, keep, grad_outputs, grads, skip_if_one)
    return [g for g in grads if g is not None]


def _gradients_fake(loss, inputs, floats, ints, keep, grad_outputs, wanted):
    kernels = LOSSES[loss]
    return [kernels.empty_grad(inputs, i) for i, w in enumerate(wanted) if w]


def _forward(loss: str, inputs: list[Optional[torch.Tensor]], floats: list[float],
             ints: list[int], needs: list[bool]) -> list[torch.Tensor]:
    with on_device(inputs[0]):
        return LOSSES[loss].forward(inputs, floats, ints, needs)


def _forward_holding(loss: str, inputs: list[Optional[torch.Tensor]], floats: list[float],
                     ints: list[int], needs: list[bool]) -> list[torch.Tensor]:
    """The forward for the compiler: ``[*losses, keep]``. The gradients it makes (of the inputs in
    ``needs``, for a ``grad_output`` of 1) are held for :func:`_gradients`, not returned."""
    outs = _forward(loss, inputs, floats, ints, needs)
    n_made = sum(needs)
    kept = outs[:len(outs) - n_made]
    if n_made:
        _HELD[kept[-1].untyped_storage()] = by_input(outs[len(outs) - n_made:], needs)
    return kept


def _forward_holding_fake(loss, inputs, floats, ints, needs):
    return LOSSES[loss].forward_fake(inputs, floats, ints, [False] * len(needs))


# Custom ops: how torch.compile sees the fused loss. Dynamo cannot trace a Triton launch (nor
# Triton's interpreter), so under torch.compile the Function calls these: opaque to the tracer,
# with fake implementations for shapes. To the compiler both are functional: no argument is
# written, every output is a tensor it has not seen. The gradients the forward makes travel
# outside the graph (:data:`_HELD`), so that the backward can hand them over, as eager mode does.
# Memory the compiler does not see must not come from a pool it manages: CUDA graph trees
# (``mode="reduce-overhead"``) account for every live block of their pool as a graph output, so
# there the ops run between the captured partitions (``cudagraph_unsafe``). A capture of the whole
# step (``torch.cuda.graph``) replays them like any kernel. In eager mode the Function calls the
# launchers directly and skips the dispatcher (about 20 µs of host time per call, measured on this
# project's CPU VM).
forward_op = torch.library.custom_op("fused_dreamer_loss::forward", _forward_holding,
                                     mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
forward_op.register_fake(_forward_holding_fake)
gradients_op = torch.library.custom_op("fused_dreamer_loss::gradients", _gradients,
                                       mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
gradients_op.register_fake(_gradients_fake)


def planned_forward(plan, inputs: Sequence[Optional[torch.Tensor]],
                    needs: Sequence[bool]) -> list[torch.Tensor]:
    """A plan's forward in the form of :attr:`LossKernels.forward`: ``[*losses, keep, *grads]``,
    the gradients of the inputs in ``needs``."""
    losses, keep, grads = plan.forward(inputs, needs)
    return [*losses, keep, *(t for t in grads if t is not None)]


class TunedPlan:
    """What a loss's plan shares: it notices that the module constants it was worked out from
    changed since (the tests shrink them), and it allocates its forward's outputs. A plan sets
    ``floats``, ``ints`` and ``tuning`` (the constants' values when it was made), ``o`` (with
    ``loss_dtypes``), ``acc`` (the accumulation dtype), ``grad_specs`` (each input's gradient's
    shape, strides and dtype, None for an absent input) and ``device``; its class sets
    ``tunables`` (a function giving the constants' values now) and is built as
    ``type(plan)(inputs, floats, ints)``."""

    def current(self, inputs) -> "TunedPlan":
        """This plan, or a new one for ``inputs`` where the module constants changed (see
        :meth:`FusedCall.current_plan`)."""
        if self.tuning == self.tunables():
            return self
        return type(self)(inputs, self.floats, self.ints)

    def empty_forward(self, n_partials: int, needs: Sequence[bool]) -> tuple:
        """A forward's outputs, unwritten: ``(losses, partials, keep, grads)``, a 0-dim loss per
        loss dtype, ``n_partials`` partial sums and the keep flags (one allocation, see
        :func:`empty_partials_and_keep`), a gradient per input in ``needs`` (None for the
        others)."""
        device = self.device
        losses = [torch.empty_strided((), (), dtype=d, device=device) for d in self.o.loss_dtypes]
        partials, keep = empty_partials_and_keep(n_partials, len(losses), self.acc, device)
        grads = [torch.empty_strided(spec[0], spec[1], dtype=spec[2], device=device) if n
                 else None for n, spec in zip(needs, self.grad_specs)]
        return losses, partials, keep, grads


class FusedCall:
    """One fused loss on inputs of one signature, its options checked: what
    :class:`FusedLossFunction` needs, worked out once. The functional entry points keep one per
    signature (shapes, strides, dtypes, device, ``requires_grad``, grad mode, options) and reuse
    it, forward and backward; it holds no tensor.

    Args:
        kernels, options, shapes: the loss, its checked options and the inputs' summary.
        inputs: inputs of the signature (the plan is worked out from them; under
            ``torch.compile`` none is, the custom ops plan for themselves).
        grad_enabled: the grad mode the calls run in.
    """

    __slots__ = ("kernels", "options", "shapes", "floats", "ints", "terms", "needs", "saved",
                 "live", "held", "names", "plan")

    def __init__(self, kernels: LossKernels, options, shapes,
                 inputs: Sequence[Optional[torch.Tensor]], grad_enabled: bool):
        self.kernels, self.options, self.shapes = kernels, options, shapes
        self.floats, self.ints = kernels.encode(options, shapes)
        self.terms = kernels.terms(self.ints, len(inputs))
        #: The inputs whose gradient the forward makes: those that require grad, in grad mode.
        self.needs = tuple(bool(grad_enabled and t is not None and t.requires_grad)
                           for t in inputs)
        #: Saved for backward (autograd checks they are not modified in place): the inputs that
        #: get a gradient. The others (targets) the backward reads only to recompute, so they
        #: are held without a check (see :meth:`FusedLossFunction.backward`).
        self.saved = tuple(i for i, n in enumerate(self.needs) if n)
        self.held = tuple(i for i, (t, n) in enumerate(zip(inputs, self.needs))
                          if t is not None and not n)
        #: The outputs (terms) some input's gradient flows from; the others are marked
        #: non-differentiable, as torch's outputs that depend on no input requiring grad.
        self.live = _live_terms(self.needs, self.terms)
        names = kernels.input_names(self.ints, len(inputs)) if kernels.input_names else None
        self.names = tuple(names or (f"input {i}" for i in range(len(inputs))))
        self.plan = None
        if not torch.compiler.is_compiling():
            self.plan = kernels.plan(inputs, self.floats, self.ints)


    def current_plan(self, inputs: Sequence[Optional[torch.Tensor]]) -> TunedPlan:
        """The plan, made again for ``inputs`` (and kept) where the module constants it was
        worked out from changed since (the tests shrink them): what every eager launch of the
        call goes through."""
        plan = self.plan = self.plan.current(inputs)
        return plan


def _live_terms(needs: Sequence[bool], terms: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted({term for n, term in zip(needs, terms) if n}))


def _mark_dead(ctx, losses: Sequence[torch.Tensor], live: Sequence[int]) -> None:
    """Outputs that depend on no input getting a gradient do not require grad (torch's)."""
    if len(live) < len(losses):
        ctx.mark_non_differentiable(*(t for i, t in enumerate(losses) if i not in live))


def _version(t: torch.Tensor) -> Optional[int]:
    """``t``'s version counter; None for an inference tensor, which has none (and cannot be
    modified outside inference mode)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _differentiable_gradients(call: FusedCall, needs, inputs, grad_outputs,
                              create_graph: bool):
    """``create_graph=True`` (or batched ``grad_outputs``): the gradients as a torch computation on
    the saved inputs (which carry their autograd history), with respect to the inputs in
    ``needs``; differentiable again (with respect to them and to ``grad_outputs``) with
    ``create_graph``, as torch's are."""
    wanted = [t for t, n in zip(inputs, needs) if n]
    with torch.enable_grad():
        losses = call.kernels.reference(inputs, call.options, call.shapes)
        pairs = [(loss, g.to(loss.dtype)) for loss, g in zip(losses, grad_outputs)
                 if g is not None and loss.requires_grad]
        if not pairs:
            return [None] * len(inputs)
        grads = torch.autograd.grad([p[0] for p in pairs], wanted, [p[1] for p in pairs],
                                    create_graph=create_graph, allow_unused=True)
    return by_input(grads, needs)


class FusedLossFunction(torch.autograd.Function):
    """Autograd over one fused loss (see the module docstring for the contract it keeps).

    ``apply(call, grad_enabled, *inputs)`` returns the loss's outputs for a :class:`FusedCall`
    of the inputs' signature. Inputs may be None (an absent optional tensor). ``grad_enabled`` is
    the caller's grad mode: under ``torch.no_grad()`` autograd still reports
    ``needs_input_grad``, but no backward can follow, so the forward writes no gradient.

    Saved for backward: the inputs that get a gradient (autograd's in-place check applies to
    them, as the torch backend's ops save them too) and the keep flags. The other inputs
    (targets: frames, rewards, flags, bins) are held without a saved-tensor check, so that targets
    made under ``torch.inference_mode()`` train, and a target rewritten in place between forward
    and backward (a replay buffer's uint8 frames) does not fail a backward that does not read it:
    with a grad output of 1 the first backward reads no input. A backward that would read a
    rewritten target instead rescales the forward's gradients by the factor on the device (one
    more rounding where the factor is not 1), and a later one, which must recompute, raises a
    RuntimeError naming it. Under ``torch.compile`` every input is saved.
    """

    @staticmethod
    def forward(ctx, call: FusedCall, grad_enabled: bool, *inputs):
        ctx.set_materialize_grads(False)
        if torch.compiler.is_compiling():
            needs = [bool(grad_enabled and n and t is not None)
                     for n, t in zip(ctx.needs_input_grad[2:], inputs)]
            # Compiled: the forward op holds its gradients for the gradients op (see _HELD).
            outs = forward_op(call.kernels.name, list(inputs), call.floats, call.ints, needs)
            losses, keep = outs[:-1], outs[-1]
            grads = [None] * len(needs)
            if any(needs):
                ctx.save_for_backward(*inputs, keep)
            live = _live_terms(needs, call.terms)
        else:
            needs = call.needs
            with on_device(inputs[0]):
                losses, keep, grads = call.current_plan(inputs).forward(inputs, needs)
            if call.saved:
                ctx.save_for_backward(*[inputs[i] for i in call.saved], keep)
                ctx.held = [(i, inputs[i], _version(inputs[i])) for i in call.held]
            live = call.live
        _mark_dead(ctx, losses, live)
        if any(needs):
            # The gradient buffers are not saved tensors: a user may modify one in place once it
            # is handed out (torch allows that), which a saved tensor's version check would refuse.
            ctx.forward_grads = grads
            ctx.call, ctx.needs, ctx.n_inputs, ctx.live = call, needs, len(inputs), live
            ctx.handed_out = [False] * len(losses)
            ctx.handed_out_any = False
        return tuple(losses)

    @staticmethod
    def backward(ctx, *grad_outputs):
        call = ctx.call
        saved = ctx.saved_tensors  # raises if a saved input was modified in place since forward
        compiling = torch.compiler.is_compiling()
        if compiling:
            inputs, keep, rewritten = list(saved[:-1]), saved[-1], ()
        else:
            inputs, keep, rewritten = _eager_inputs(ctx, call, saved)
        differentiable = torch.is_grad_enabled() or (
            not kernels_can_take(grad_outputs) if compiling else _storageless(grad_outputs))
        if differentiable:
            _refuse_rewritten(call, rewritten, "to differentiate the loss again")
            grads = _differentiable_gradients(call, ctx.needs, inputs, grad_outputs,
                                              torch.is_grad_enabled())
        elif not (compiling or rewritten or ctx.handed_out_any
                  or _any_none([grad_outputs[t] for t in ctx.live])):
            grads = _first_gradients(ctx, call, inputs, keep, grad_outputs)
        else:
            active = [g is not None for g in grad_outputs]
            wanted = [need and active[term] for need, term in zip(ctx.needs, call.terms)]
            if compiling:
                fresh = gradients_op(call.kernels.name, inputs, call.floats, call.ints, keep,
                                     list(grad_outputs), wanted)
                grads = by_input(fresh, wanted)
            else:
                grads = _eager_gradients(ctx, call, inputs, keep, grad_outputs, wanted,
                                         rewritten)
        return (None, None, *grads)


def _eager_inputs(ctx, call: FusedCall, saved):
    """The inputs as the forward saw them, the keep flags, and the held inputs that were
    rewritten in place since."""
    inputs = [None] * ctx.n_inputs
    for i, t in zip(call.saved, saved):
        inputs[i] = t
    rewritten = []
    for i, t, version in ctx.held:
        inputs[i] = t
        if version is not None and t._version != version:
            rewritten.append(i)
    return inputs, saved[-1], rewritten


def _refuse_rewritten(call: FusedCall, rewritten: Sequence[int], why: str) -> None:
    if rewritten:
        names = ", ".join(call.names[i] for i in rewritten)
        raise RuntimeError(
            f"{names} was modified in place after the fused loss's forward, and the backward "
            f"needs its values {why}; leave it unchanged until the backward, modify a clone, "
            "or use backend='torch'")


def _storageless(grad_outputs) -> bool:
    """Whether a grad output has no storage (batched by a ``torch.func`` transform): in eager
    mode the one case of :func:`kernels_can_take` a grad output can hit."""
    for g in grad_outputs:
        if g is not None and not _has_storage(g):
            return True
    return False


_has_storage = torch._C._has_storage


def _any_none(values) -> bool:
    for v in values:
        if v is None:
            return True
    return False


def _first_gradients(ctx, call: FusedCall, inputs, keep, grad_outputs):
    """The common backward: the first, a grad output for every live term, no target rewritten.
    The forward's buffers, each term's left as it is when its factor is 1 and fixed in place
    otherwise (what :func:`_eager_gradients` does in that case, without its bookkeeping)."""
    grads, ctx.forward_grads = ctx.forward_grads, None
    ctx.handed_out = [True] * len(grad_outputs)
    ctx.handed_out_any = True
    with on_device(keep):
        call.current_plan(inputs).backward(inputs, keep, grad_outputs, grads,
                                           (True,) * len(grad_outputs))
    return grads


def _eager_gradients(ctx, call: FusedCall, inputs, keep, grad_outputs, wanted, rewritten):
    """The first backward that needs a term gets the forward's buffers, fixed in place when the
    factor is not 1; later ones get fresh buffers (see the module docstring). The context lets go
    of a buffer it hands out, so that autograd may keep it as ``.grad`` without a copy. A term
    with a rewritten input is rescaled on the device the first time, and refused after."""
    kernels, terms = call.kernels, call.terms
    stale = {terms[i] for i in rewritten}
    grads, rescaled = [], []
    for i, (w, term) in enumerate(zip(wanted, terms)):
        if not w:
            grads.append(None)
        elif ctx.handed_out[term]:
            if term in stale:
                _refuse_rewritten(call, [j for j in rewritten if terms[j] == term],
                                  "to recompute the gradients (a second backward)")
            grads.append(kernels.empty_grad(inputs, i))
        else:
            buffer, ctx.forward_grads[i] = ctx.forward_grads[i], None
            if term in stale:
                rescaled.append((i, buffer, term))
            grads.append(None if term in stale else buffer)
    if any(g is not None for g in grads):
        with on_device(keep):
            call.current_plan(inputs).backward(inputs, keep, list(grad_outputs), grads,
                                               [not h for h in ctx.handed_out])
    for i, buffer, term in rescaled:
        # the factor term_factor reads on the device, as a tensor: no host sync
        factor = torch.where(keep[term] != 0, grad_outputs[term].to(keep.dtype), 0.0)
        grads[i] = buffer.mul_(factor)
    for w, term in zip(wanted, terms):
        if w:
            ctx.handed_out[term] = ctx.handed_out_any = True
    return grads


def _has_tangent(inputs: Sequence[Optional[torch.Tensor]]) -> bool:
    """Whether forward-mode AD (``torch.autograd.forward_ad``) carries a tangent on an input."""
    if forward_ad._current_level < 0:  # no dual level entered: no tangent anywhere
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in inputs)


#: ``FusedLossFunction.apply`` without its Python wrapper, whose work (binding default arguments,
#: routing ``torch.func`` transforms, unwrapping dead transform wrappers) :func:`run` does only
#: where it is needed: about 2 µs per call on this project's CPU VM.
_apply_function = torch._C._FunctionBase.__dict__["apply"].__get__(FusedLossFunction,
                                                                    FusedLossFunction)
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def run(call: FusedCall, inputs: Sequence[Optional[torch.Tensor]]):
    """Run a prepared fused loss: its outputs, differentiable. Under forward-mode AD (an input
    with a tangent) the loss's reference computes them, with their tangents: an
    ``autograd.Function`` without ``jvp`` cannot carry one. In eager mode a call whose inputs get
    no gradient (none requires grad, or grad mode is off) runs its plan without autograd."""
    if _has_tangent(inputs) or torch._C._are_functorch_transforms_active():
        # A transform's own tensors take the reference before this (they have no storage);
        # plain tensors a transformed function captures take it here.
        return tuple(call.kernels.reference(list(inputs), call.options, call.shapes))
    if call.plan is None or torch.compiler.is_compiling():
        return FusedLossFunction.apply(call, torch.is_grad_enabled(), *inputs)
    inputs = [t if t is None else _unwrap_if_dead(t) for t in inputs]
    if not call.saved:
        with on_device(inputs[0]):
            return tuple(call.current_plan(inputs).forward(inputs, call.needs)[0])
    return _apply_function(call, True, *inputs)


class KeptCall:
    """A fused loss whose :class:`FusedCall` is made from the first inputs it runs on and reused
    by later calls, which must have their signature and grad mode (an entry point keeps one per
    signature, see :mod:`fused_dreamer_loss.core.dispatch`); under ``torch.compile`` it is made
    at every call. Call it with the inputs: the outputs, as :func:`run`."""

    __slots__ = ("kernels", "options", "shapes", "call")

    def __init__(self, kernels: LossKernels, options, shapes):
        self.kernels, self.options, self.shapes = kernels, options, shapes
        self.call: Optional[FusedCall] = None

    def __call__(self, inputs: Sequence[Optional[torch.Tensor]]):
        if self.call is None or torch.compiler.is_compiling():
            self.call = FusedCall(self.kernels, self.options, self.shapes, inputs,
                                  torch.is_grad_enabled())
        return run(self.call, inputs)


def apply(kernels: LossKernels, options, shapes, inputs: Sequence[Optional[torch.Tensor]]):
    """Run a fused loss on validated inputs: its outputs, differentiable (the call is prepared
    here; the functional entry points keep prepared calls and use :func:`run`)."""
    return run(FusedCall(kernels, options, shapes, inputs, torch.is_grad_enabled()), inputs)
