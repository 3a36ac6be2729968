"""Host overhead: what the host spends on one forward + backward of each loss, fused and not.

In the launch-bound regime (a training step at DreamerV3's 16 × 64 frames, whose loss moves about
130 MB: some 44 µs of device time on an H100) the time a step takes is what the host spends
launching it. This workload measures that time for the fused calls and modules next to the
unfused chains they replace, in one run, as ratios:

==================================  =============================================================
row                                 what one step runs
==================================  =============================================================
``v1 fused functional``             :func:`dreamer_model_loss` ``(backend="triton")``, V1 small
                                    preset (16 × 50 frames of 3×64×64, 30 latents)
``v1 autograd floor``               the least a loss behind an ``autograd.Function`` costs: a
                                    Function with the fused call's inputs and outputs that
                                    allocates the outputs and gradients, hands the gradients
                                    over and does nothing else (:class:`_Floor`), same preset
``v1 fused module``                 :class:`FusedDreamerModelLoss` ``(backend="triton")``, same
``v1 torchrl module``               torchrl's ``DreamerModelLoss``, tiny shapes (compute ≈ 0)
``v1 torchrl math``                 its ``kl_loss`` and ``distance_loss``, reduced as its forward
``v1 eager reference``              the pure-torch reference, tiny shapes
``v3 …``                            the same for the DreamerV3 loss, v3 preset (16 × 64 uint8
                                    frames of 3×64×64, 32 × 32 latents, 255 reward bins), with the
                                    ``dreamerv3-2024`` convention, against ``DreamerV3ModelLoss``
``behavior …``                      :func:`dreamer_v3_behavior_loss` ``(backend="triton")`` at the
                                    ``behavior`` preset (1024 starts × 15 steps, 255 bins, its
                                    default convention), against torchrl's code for the same math
                                    and the reference at ``behavior-tiny``; no module row
``behavior fused phases``           the same losses through the five phase functions
                                    (``lambda_returns``, ``return_scale``, the actor, value and
                                    replay losses), chained as the torchrl modules call them
==================================  =============================================================

A step is the loss's forward, ``backward()`` of the sum of its losses and ``.grad`` reset to None,
as in training. The modules run a stand-in world model that writes precomputed outputs into the
tensordict, so that only the loss module's own work is timed. The unfused chains run on tiny
shapes, where their compute is about zero: what is left is their host time.

Without CUDA the fused kernels are compiled for an H100 (sm_90) by Triton's real compiler and
launched as on a GPU: through Triton's own dispatch (its binder, cache lookup and argument
packing) where a launch takes it, the first of each plan, and as the compiled kernel directly
after (:class:`fused_dreamer_loss.core.machinery.Launch`). Only the driver's launch call is a
stub, which reads each pointer argument's data pointer as the CUDA launcher does (not its driver
check of the pointer) and launches nothing (:func:`no_launch_driver`); torch runs on one thread.
This needs triton's compiler, not its interpreter: ``TRITON_INTERPRET`` unset (``--workload
host`` of the benchmark command runs it in a child process so). With CUDA the fused rows launch
their kernels for real, and each row is also timed as a CUDA-graph replay of the same step (the
device time, no host at all).

Each implementation is timed in interleaved rounds (every round times each row once, a batch of
steps), so that a slow spell of a shared machine hits every row alike; the tables give the
minimum, median and maximum over the rounds of the per-step mean (on a CPU this thread's CPU
time, on CUDA wall time); the ratio is of the medians. :func:`breakdown` splits the fused steps'
host time into validation, plan, allocation, Triton dispatch, the Function's Python and torch's
autograd.

Run ``python -m fused_dreamer_loss.bench.host`` (``--rounds``, ``--steps``, ``--json``); from
Python, :func:`run` returns the rows and :func:`breakdown` the breakdown rows.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from . import peers, presets, timing
from .report import Row
from .workloads import Run

#: The fused rows' presets (:data:`.presets.PRESETS`, :data:`.presets.V3_PRESETS`).
V1_PRESET, V3_PRESET = "small", "v3"
#: The behaviour rows' presets (:data:`.presets.BEHAVIOR_PRESETS`): the fused row's, DreamerV3's
#: 1024 starts × 15 steps, and the unfused chains', where their compute is about zero.
BEHAVIOR_PRESET, BEHAVIOR_TINY = "behavior", "behavior-tiny"
#: The unfused chains' shapes: the presets' latents and bins, 2 × 2 rows of 3 × 2 × 2 frames.
TINY_ROWS, TINY_FRAME = 2, 2
#: The GPU the stub driver compiles for when there is none.
NO_LAUNCH_ARCH = 90
#: Shared memory per block the stub driver reports (an H100's).
NO_LAUNCH_SHARED_MEM = 232448
#: Threads per block the stub driver reports.
NO_LAUNCH_MAX_THREADS = 1024
ROUNDS = 15
STEPS = 20
WARMUP_STEPS = 3
#: The target of issue 17: the fused host time at most this fraction of the unfused chain's.
TARGET_RATIO = 0.2


# ---------------------------------------------------------------------------------------------
# A driver that compiles for a GPU that is not there and launches nothing
# ---------------------------------------------------------------------------------------------


def _pointer_slots(signature: dict) -> tuple[list[int], list[int]]:
    """The positions of a compiled kernel's pointer arguments, and of its tuple arguments that
    hold pointers, in the values Triton passes its launcher."""
    types = list(signature.values())
    pointers = [i for i, ty in enumerate(types) if isinstance(ty, str) and ty.startswith("*")]
    tuples = [i for i, ty in enumerate(types) if isinstance(ty, tuple)
              and any(isinstance(t, str) and t.startswith("*") for t in ty)]
    return pointers, tuples


class _NoLaunch:
    """A launcher with the CUDA launcher's call signature that launches nothing. It does what
    the CUDA launcher does in Python's terms with the pointer arguments: reads each tensor's data
    pointer (an int is taken as it is); not its parsing of the other arguments, nor the driver's
    pointer check and launch."""

    def __init__(self, src, metadata):
        self.pointers, self.tuples = _pointer_slots(src.signature)

    def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata,
                 launch_metadata, enter_hook, exit_hook, *args):
        if enter_hook is not None:
            enter_hook(launch_metadata)
        for i in self.pointers:
            if type(args[i]) is not int:
                args[i].data_ptr()
        for i in self.tuples:
            for t in args[i]:
                if type(t) is not int:
                    t.data_ptr()
        if exit_hook is not None:
            exit_hook(launch_metadata)


#: The "module" :meth:`_NoLaunchUtils.load_binary` loads.
_NO_MODULE = object()


class _NoLaunchUtils:
    """The driver utilities Triton calls on a compiled kernel's first launch."""

    @staticmethod
    def load_binary(name, kernel, shared, device):
        # A module that is not None: Triton loads a kernel's binary again, and makes its launcher
        # again, at every launch of a kernel whose module is None (CompiledKernel._init_handles).
        return _NO_MODULE, None, 0, 0, NO_LAUNCH_MAX_THREADS

    @staticmethod
    def get_device_properties(device):
        return {"max_shared_mem": NO_LAUNCH_SHARED_MEM, "multiprocessor_count": 132}


def _make_driver():
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class NoLaunchDriver(DriverBase):
        """CUDA sm_90 as far as Triton's compiler and dispatch can tell; no device behind it."""

        launcher_cls = _NoLaunch
        utils = _NoLaunchUtils()

        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            return "void*"

        def get_current_target(self):
            return GPUTarget("cuda", NO_LAUNCH_ARCH, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError("nothing runs on the no-launch driver")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    return NoLaunchDriver()


@contextlib.contextmanager
def no_launch_driver() -> Iterator[None]:
    """Within: Triton compiles for an H100 and launches nothing; ``backend="triton"`` takes CPU
    tensors. Needs triton's compiler (``TRITON_INTERPRET`` unset when triton was imported)."""
    from triton.runtime.driver import driver

    from ..core import machinery

    if machinery.INTERPRET:
        raise RuntimeError("the host workload needs Triton's compiler, not its interpreter: run "
                           "it with TRITON_INTERPRET unset")
    previous = driver._active  # None where no driver was needed yet (none may be active here)
    driver.set_active(_make_driver())
    machinery.INTERPRET = True
    try:
        yield
    finally:
        machinery.INTERPRET = False
        driver._active = previous


# ---------------------------------------------------------------------------------------------
# Inputs and the implementations
# ---------------------------------------------------------------------------------------------


def _tiny(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``inputs`` cut down to 2 × 2 rows and frames of 3 × 2 × 2 (latents and reward bins kept):
    the unfused chains' shapes, where their compute is about zero."""
    def cut(t):
        index = (slice(0, TINY_ROWS), slice(0, TINY_ROWS))
        if t.dim() == 5:  # [B, T, C, H, W] frames
            index += (slice(None), slice(0, TINY_FRAME), slice(0, TINY_FRAME))
        return t[index].detach().clone().requires_grad_(t.requires_grad)

    return [cut(t) for t in inputs]


def _inputs(loss: str, tiny: bool, device: str) -> list[torch.Tensor]:
    """The arguments of the loss's functional call at its preset (:data:`V1_PRESET`,
    :data:`V3_PRESET`), or cut down by :func:`_tiny`."""
    if loss == "v1":
        inputs = presets.make_inputs(V1_PRESET, torch.float32, device, seed=0)
    else:
        inputs = presets.make_v3_inputs(V3_PRESET, torch.float32, device, 0, _v3_opts())
    return _tiny(inputs) if tiny else inputs


#: The losses of :func:`dreamer_model_loss`, in order.
V1_LOSSES = ("loss_kl", "loss_reco", "loss_reward")
V1_KEYS = ("prior_mean", "prior_std", "posterior_mean", "posterior_std", "pixels",
           "reco_pixels", "true_reward", "reward")
V3_KEYS = ("posterior_logits", "prior_logits", "pixels", "reco_pixels", "true_reward",
           "reward_logits", "continue_pred", "terminated")
#: The keys the environment's data holds (the rest the world model writes).
V1_DATA = ("pixels", "true_reward")
V3_DATA = ("pixels", "true_reward", "terminated")


class _StandIn(torch.nn.ModuleList):
    """A world model that writes precomputed outputs under ``"next"``; indexable as torchrl's
    ``WorldModelWrapper`` (``[0][-1]`` the decoder, ``[1]`` the reward model), as torchrl's
    ``DreamerModelLoss`` requires."""

    def __init__(self, outputs: dict[str, torch.Tensor]):
        super().__init__([torch.nn.Sequential(torch.nn.Identity()), torch.nn.Identity()])
        self.outputs = outputs
        self.in_keys = [("next", "pixels")]

    def forward(self, tensordict):
        for key, value in self.outputs.items():
            tensordict.set(("next", key), value)
        return tensordict


def _module_batch(loss: str, inputs: Sequence[torch.Tensor]):
    """(the data tensordict, the stand-in world model) holding ``inputs``."""
    from tensordict import TensorDict

    keys, data_keys = (V1_KEYS, V1_DATA) if loss == "v1" else (V3_KEYS, V3_DATA)
    named = dict(zip(keys, inputs))
    data = {("reward" if k == "true_reward" else k): named[k] for k in data_keys}
    outputs = {k: v for k, v in named.items() if k not in data_keys}
    return TensorDict({"next": data}, batch_size=inputs[0].shape[:2]), _StandIn(outputs)


def _v3_options() -> dict:
    from ..world_model_v3.conventions import V3_CONVENTIONS

    return dict(V3_CONVENTIONS[presets.DEFAULT_CONVENTION])


def _v3_opts():
    from ..world_model_v3.validation import V3Options

    return V3Options(**_v3_options())


@dataclass(frozen=True)
class Impl:
    """One row: ``build(device)`` returns ``(forward, leaves)``: ``forward()`` the step's losses,
    ``leaves`` the tensors whose ``.grad`` a step resets."""

    loss: str
    name: str
    shape: str
    fused: bool
    build: Callable[[str], tuple[Callable[[], Sequence[torch.Tensor]], list[torch.Tensor]]]


def _functional(loss: str, tiny: bool, make: Callable[[str], Callable]) -> Callable:
    """A row of a functional call: ``make(device)`` is the function of the loss's arguments."""
    def build(device):
        inputs = _inputs(loss, tiny, device)
        fn = make(device)
        return (lambda: peers.loss_terms(fn(*inputs))), [t for t in inputs if t.requires_grad]
    return build


def _module(loss: str, tiny: bool, make: Callable) -> Callable:
    """A row of a loss module: ``make(world_model)`` is the module."""
    def build(device):
        inputs = _inputs(loss, tiny, device)
        data, world_model = _module_batch(loss, inputs)
        module = make(world_model)

        def forward():
            losses, _ = module(data)
            return tuple(losses.values())

        return forward, [t for t in inputs if t.requires_grad]
    return build


class _Floor(torch.autograd.Function):
    """The least a fused loss behind an ``autograd.Function`` can cost the host: a Function with
    the fused call's inputs and outputs that allocates its outputs and the gradients and hands the
    gradients over in its backward, as the fused Function does, but validates, plans and launches
    nothing."""

    @staticmethod
    def forward(ctx, n_outputs: int, *inputs):
        ctx.set_materialize_grads(False)
        ctx.grads = [torch.empty_like(t) if needs else None
                     for t, needs in zip(inputs, ctx.needs_input_grad[1:])]
        return tuple(torch.empty((), device=inputs[0].device) for _ in range(n_outputs))

    @staticmethod
    def backward(ctx, *grad_outputs):
        grads, ctx.grads = ctx.grads, None
        return (None, *grads)


def _loss_count(loss: str) -> int:
    """How many losses the fused functional call returns."""
    if loss == "v1":
        return len(V1_LOSSES)
    from ..world_model_v3.kernels import output_names

    return len(output_names(_v3_opts()))


def _floor(loss: str) -> Callable:
    """The row of :class:`_Floor` on the fused functional call's inputs (the preset's)."""
    def build(device):
        inputs, n_outputs = _inputs(loss, False, device), _loss_count(loss)
        return ((lambda: _Floor.apply(n_outputs, *inputs)),
                [t for t in inputs if t.requires_grad])
    return build


def _fused_functional(loss: str) -> Callable[[str], Callable]:
    if loss == "v1":
        return lambda device: peers.loss_fn("fused", "l2")
    return lambda device: peers.loss_fn_v3("fused", _v3_options(), device)


def _behavior(impl: str, tiny: bool) -> Callable:
    """A row of the DreamerV3 behaviour objective (:func:`dreamer_v3_behavior_loss`, its
    default convention): ``impl`` ``"fused"`` (``backend="triton"``), ``"phases"`` (the five
    phase functions, ``backend="triton"``), ``"eager"`` (the reference) or ``"torchrl"``
    (torchrl's code for the same math), at :data:`BEHAVIOR_PRESET` or, ``tiny``, its tiny
    preset."""
    def build(device):
        from ..behavior_v3 import BEHAVIOR_CONVENTIONS
        from . import behavior

        options = dict(BEHAVIOR_CONVENTIONS[presets.DEFAULT_BEHAVIOR_CONVENTION])
        inputs = behavior.make_inputs(BEHAVIOR_TINY if tiny else BEHAVIOR_PRESET, torch.float32,
                                      device, 0, options)
        if impl == "torchrl":
            math = behavior.torchrl_math(options)
            forward = lambda: tuple(math(*inputs).values())  # noqa: E731
        elif impl == "phases":
            forward = lambda: tuple(behavior._phases(inputs, options, "triton").values())  # noqa
        else:
            backend = "triton" if impl == "fused" else "torch"
            forward = lambda: tuple(behavior._call(inputs, options, backend).values())  # noqa
        return forward, [t for t in inputs if t.requires_grad]
    return build


def implementations() -> list[Impl]:
    """The rows, V1 then V3: the fused functional call and module at the preset, then torchrl's
    module, torchrl's math and the eager reference at tiny shapes."""
    from torchrl.objectives import DreamerModelLoss, DreamerV3ModelLoss

    from .. import FusedDreamerModelLoss, FusedDreamerV3ModelLoss

    v3 = _v3_options()
    torchrl_v3 = {k: v for k, v in v3.items() if k not in peers.TORCHRL_V3_FIXED}
    tiny = "tiny (compute ≈ 0)"
    return [
        Impl("v1", "fused functional", V1_PRESET, True,
             _functional("v1", False, _fused_functional("v1"))),
        Impl("v1", "autograd floor", V1_PRESET, False, _floor("v1")),
        Impl("v1", "fused module", V1_PRESET, True, _module(
            "v1", False, lambda wm: FusedDreamerModelLoss(wm, backend="triton"))),
        Impl("v1", "torchrl module", tiny, False, _module("v1", True, DreamerModelLoss)),
        Impl("v1", "torchrl math", tiny, False,
             _functional("v1", True, lambda device: peers.loss_fn("torchrl", "l2"))),
        Impl("v1", "eager reference", tiny, False,
             _functional("v1", True, lambda device: peers.loss_fn("eager", "l2"))),
        Impl("v3", "fused functional", V3_PRESET, True,
             _functional("v3", False, _fused_functional("v3"))),
        Impl("v3", "autograd floor", V3_PRESET, False, _floor("v3")),
        Impl("v3", "fused module", V3_PRESET, True, _module(
            "v3", False, lambda wm: FusedDreamerV3ModelLoss(wm, **v3, backend="triton"))),
        Impl("v3", "torchrl module", tiny, False, _module(
            "v3", True, lambda wm: DreamerV3ModelLoss(wm, **torchrl_v3))),
        Impl("v3", "torchrl math", tiny, False,
             _functional("v3", True, lambda device: peers.loss_fn_v3("torchrl", v3, device))),
        Impl("v3", "eager reference", tiny, False,
             _functional("v3", True, lambda device: peers.loss_fn_v3("eager", v3, device))),
        Impl("behavior", "fused functional", BEHAVIOR_PRESET, True, _behavior("fused", False)),
        Impl("behavior", "fused phases", BEHAVIOR_PRESET, True, _behavior("phases", False)),
        Impl("behavior", "torchrl math", tiny, False, _behavior("torchrl", True)),
        Impl("behavior", "eager reference", tiny, False, _behavior("eager", True)),
    ]


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def make_step(forward: Callable[[], Sequence[torch.Tensor]],
              leaves: list[torch.Tensor]) -> Callable[[], None]:
    """Forward, ``backward()`` of the losses' sum, ``.grad`` reset to None: a training step's
    loss part."""
    def step():
        losses = forward()
        total = losses[0]
        for loss in losses[1:]:
            total = total + loss
        total.sum().backward()
        for t in leaves:
            t.grad = None
    return step


def _batch_us(step: Callable[[], None], steps: int, cuda: bool) -> float:
    """Mean µs per step of ``steps`` steps launched back to back: on CUDA the wall time up to the
    device being done with them; on a CPU the CPU time of this thread (torch runs on it alone,
    see :func:`_launch_context`), which a shared machine's other processes do not inflate."""
    if cuda:
        torch.cuda.synchronize()
        start = time.perf_counter_ns()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return (time.perf_counter_ns() - start) / steps / 1e3
    start = time.thread_time_ns()
    for _ in range(steps):
        step()
    return (time.thread_time_ns() - start) / steps / 1e3


def interleaved(steps: dict[str, Callable[[], None]], rounds: int, per_round: int,
                cuda: bool) -> dict[str, list[float]]:
    """µs per step of each of ``steps``: ``rounds`` rounds, each timing every step once (a batch
    of ``per_round`` steps), in turn."""
    for step in steps.values():
        for _ in range(WARMUP_STEPS):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, step in steps.items():
                times[name].append(_batch_us(step, per_round, cuda))
            # The young generation only: a full collection also empties the interpreter's free
            # lists and hands memory back, and the next step then costs the host some 600-900 µs
            # more on this project's CPU VM, whichever row it is (measured step by step).
            gc.collect(0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def _spread(values: list[float]) -> dict[str, float]:
    return {"min_us": min(values), "median_us": statistics.median(values), "max_us": max(values)}


def _baseline(loss: str, name: str) -> str | None:
    """The unfused chain a fused row is compared with: torchrl's module for the module, torchrl's
    math for the functional call."""
    if name == "fused module":
        return "torchrl module"
    if name in ("fused functional", "fused phases", "autograd floor"):
        return "torchrl math"
    return None


@contextlib.contextmanager
def _launch_context(cuda: bool) -> Iterator[None]:
    """The fused kernels launched for real on CUDA; elsewhere through :func:`no_launch_driver`,
    with torch on one thread: the unfused chains' tiny ops then run inline, where a thread pool
    woken for each of them on a loaded CPU costs milliseconds a step that a GPU's asynchronous
    launches do not."""
    if cuda:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with no_launch_driver():
            yield
    finally:
        torch.set_num_threads(threads)


def run(rounds: int = ROUNDS, steps: int = STEPS, device: str | None = None,
        impls: Sequence[Impl] | None = None) -> list[dict]:
    """One row per implementation: µs per step (min / median / max over ``rounds`` interleaved
    rounds of ``steps`` steps), and for the fused rows the ratio of the median to their
    unfused chain's (``ratio``) and whether it meets :data:`TARGET_RATIO`. On CUDA, each row's
    CUDA-graph replay too (``graph_*_us``)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    impls = list(impls or implementations())
    with _launch_context(cuda):
        built = {f"{i.loss} {i.name}": make_step(*i.build(device)) for i in impls}
        times = interleaved(built, rounds, steps, cuda)
        graph_times = interleaved({k: timing.graphed(s) for k, s in built.items()}, rounds,
                                  steps, cuda) if cuda else {}
    rows = []
    for impl in impls:
        key = f"{impl.loss} {impl.name}"
        row = {"loss": impl.loss, "impl": impl.name, "shape": impl.shape, "device": device,
               **_spread(times[key])}
        if key in graph_times:
            row.update({f"graph_{k}": v for k, v in _spread(graph_times[key]).items()})
        rows.append(row)
    by_key = {(r["loss"], r["impl"]): r for r in rows}
    for impl, row in zip(impls, rows):
        base = _baseline(row["loss"], row["impl"])
        if base is not None and (row["loss"], base) in by_key:
            row["baseline"] = base
            row["ratio"] = row["median_us"] / by_key[(row["loss"], base)]["median_us"]
            if impl.fused:
                row["meets_target"] = row["ratio"] <= TARGET_RATIO
    return rows


# ---------------------------------------------------------------------------------------------
# Where a fused step's host time goes
# ---------------------------------------------------------------------------------------------

class _Phases:
    """Exclusive time per category of the functions it wraps: a wrapped call's time, less that
    of the wrapped calls inside it, goes to its category."""

    def __init__(self, clock: Callable[[], int]):
        self.clock = clock
        self.totals: dict[str, int] = {}
        self._stack: list[int] = []
        self._patches: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, name: str, category: str) -> None:
        """Time ``owner.name`` (a function of a module, or a class's method, static or class
        method included) under ``category`` until :meth:`restore`."""
        own = vars(owner).get(name, _MISSING)
        original = getattr(owner, name)  # for a class method: bound to owner
        if isinstance(own, staticmethod):
            original = own.__func__
        phases, clock = self, self.clock

        @functools.wraps(original)
        def timed(*args, **kwargs):
            phases._stack.append(0)
            start = clock()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = clock() - start
                inner = phases._stack.pop()
                phases.totals[category] = phases.totals.get(category, 0) + elapsed - inner
                if phases._stack:
                    phases._stack[-1] += elapsed

        plain_function = isinstance(owner, type) and not isinstance(own, (classmethod, staticmethod)) \
            and not hasattr(original, "__self__")
        setattr(owner, name, timed if plain_function or not isinstance(owner, type)
                else staticmethod(timed))
        self._patches.append((owner, name, own))

    def restore(self) -> None:
        for owner, name, own in reversed(self._patches):
            if own is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, own)
        self._patches.clear()


_MISSING = object()


def _phase_targets() -> list[tuple[object, str, str]]:
    """(owner, attribute, category) of the functions :func:`breakdown` times."""
    import triton.runtime.jit as triton_jit

    from ..behavior_v3 import functional as functional_behavior
    from ..behavior_v3 import kernels as kernels_behavior
    from ..core import machinery
    from ..world_model_v1 import functional as functional_v1
    from ..world_model_v1 import kernels as kernels_v1
    from ..world_model_v3 import functional as functional_v3
    from ..world_model_v3 import kernels as kernels_v3

    return [
        (functional_v1, "call_key", "validation"),
        (functional_v1, "values_key", "validation"),
        (functional_v3, "call_key", "validation"),
        (functional_v3, "values_key", "validation"),
        (functional_v1, "_prepare", "validation"),
        (functional_v3, "bins_key", "validation"),
        (functional_v3, "_prepare", "validation"),
        *((kernels._Plan, name, "plan") for kernels in (kernels_v1, kernels_v3)
          for name in ("forward", "backward", "current", "_views", "_launch")),
        (machinery, "run", "Function (Python)"),
        (machinery.FusedLossFunction, "forward", "Function (Python)"),
        (machinery.FusedLossFunction, "backward", "Function (Python)"),
        (kernels_v3._Plan, "_args", "plan"),
        (kernels_v3, "kernel_inputs", "plan"),
        (functional_behavior, "_prepared", "validation"),
        *((kernels_behavior._TermsPlan, name, "plan")
          for name in ("forward", "backward", "current", "_args", "_launch")),
        *((kernels_behavior._ReturnsPlan, name, "plan")
          for name in ("forward", "backward", "current")),
        (kernels_behavior._ReturnsLaunch, "__call__", "plan"),
        (kernels_behavior.ReturnsCall, "__call__", "plan"),
        (kernels_behavior, "run_terms", "plan"),
        (kernels_behavior, "run_lambda_returns", "plan"),
        (machinery.KeptCall, "__call__", "Function (Python)"),
        (torch, "empty", "allocation"),
        (torch, "empty_strided", "allocation"),
        (machinery, "empty_partials_and_keep", "allocation"),
        (machinery.Launch, "__call__", "Triton dispatch"),
        (triton_jit.JITFunction, "run", "Triton dispatch"),
        (machinery.FusedLossFunction, "apply", "autograd"),
        (machinery, "_apply_function", "autograd"),
        (torch.Tensor, "backward", "autograd"),
    ]


def breakdown(steps: int = 200, device: str | None = None) -> list[dict]:
    """Where the fused rows' host time goes: for each fused row, µs per step in each category,
    from ``steps`` steps with the functions of :func:`_phase_targets` wrapped in timers (which
    add a fraction of a µs a call). Exclusive times: a call's time less that of the timed calls
    inside it.

    ``validation``: the call's signature, its lookup (and preparing a call, on a miss);
    ``plan``: the plans' per-call work (the inputs' views, the kernels' arguments, the launch
    lookup); ``allocation``: ``torch.empty``/``empty_strided`` (outputs, gradient buffers,
    partial sums; on a CPU a 39–50 MB gradient costs an ``mmap`` and a ``munmap``, which a CUDA
    caching allocator does not); ``Triton dispatch``: the launches (data pointers, the compiled
    kernel's launcher, stubbed on a CPU; Triton's binder and cache lookup where a launch takes
    them); ``Function (Python)``: the autograd.Function's forward and backward bodies;
    ``autograd``: torch's part, ``Function.apply`` and the backward engine (the losses' sum,
    the gradient accumulation); ``rest``: everything else (the caller's Python, the modules'
    tensordict work, the step's sum of the losses, freeing the gradients)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    rows = []
    with _launch_context(cuda):
        for impl in implementations():
            if not impl.fused or impl.loss not in BREAKDOWN_LOSSES:
                continue
            step = make_step(*impl.build(device))
            for _ in range(WARMUP_STEPS):
                step()
            phases = _Phases(time.perf_counter_ns if cuda else time.thread_time_ns)
            for owner, name, category in _phase_targets():
                phases.wrap(owner, name, category)
            try:
                total = _batch_us(step, steps, cuda)
            finally:
                phases.restore()
            per_step = {k: v / steps / 1e3 for k, v in phases.totals.items()}
            per_step["rest"] = total - sum(per_step.values())
            rows.append({"loss": impl.loss, "impl": impl.name, "total_us": total, **per_step})
    return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

#: The losses :func:`breakdown` splits.
BREAKDOWN_LOSSES = ("v1", "v3", "behavior")
CATEGORIES = ("validation", "plan", "allocation", "Triton dispatch", "Function (Python)",
              "autograd", "rest")


def machine() -> str:
    """The machine, in words."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import os
    import platform

    return (f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU (the fused kernels compiled "
            f"for sm_{NO_LAUNCH_ARCH}, the driver's launch call stubbed)")


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    graph = any("graph_median_us" in r for r in rows)
    head = ["loss", "impl", "shape", "min µs", "median µs", "max µs", "vs", "ratio"]
    head += ["graph replay µs"] if graph else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if "ratio" in r else ""
        cells = [r["loss"], r["impl"], r["shape"], f"{r['min_us']:.1f}", f"{r['median_us']:.1f}",
                 f"{r['max_us']:.1f}", r.get("baseline", ""), ratio]
        if graph:
            cells.append(f"{r['graph_median_us']:.1f}" if "graph_median_us" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def breakdown_table(rows: list[dict]) -> str:
    """The breakdown rows as a Markdown table (µs per step)."""
    head = ["loss", "impl", "total µs", *CATEGORIES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["loss"], r["impl"], f"{r['total_us']:.1f}",
                 *(f"{r.get(c, 0.0):.1f}" for c in CATEGORIES)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measure(rounds: int = ROUNDS, steps: int = STEPS, device: str | None = None) -> dict:
    """The rows and the breakdown (see :func:`run`, :func:`breakdown`), with the machine."""
    return {"machine": machine(), "torch": torch.__version__,
            "rows": run(rounds, steps, device), "breakdown": breakdown(device=device)}


def print_report(report: dict) -> None:
    print(f"Host time per forward + backward, {report['machine']}, torch {report['torch']}")
    print(table(report["rows"]))
    print("\nWhere the fused steps' host time goes (µs per step):")
    print(breakdown_table(report["breakdown"]))


def workload_rows(run_: Run) -> list[Row]:
    """``fused-dreamer-loss-bench --workload host``: the rows of ``--loss``, as report rows (the
    median, min and max in ms; the ratio, its baseline and the breakdown in ``extra``), after
    printing the host tables. The command turns Triton's interpreter on for fused rows on a CPU,
    and this workload needs its compiler: there it runs in a child process without it."""
    device = run_.device
    if device != "cuda" and timing.interpreting():
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "host.json")
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            subprocess.run([sys.executable, "-m", __name__, "--device", device, "--json", path,
                            "--quiet"], env=env, check=True)
            with open(path) as f:
                report = json.load(f)
    else:
        report = measure(device=device)
    print_report(report)
    loss = run_.case.loss
    parts = {r["impl"]: r for r in report["breakdown"] if r["loss"] == loss}
    rows = []
    for r in report["rows"]:
        if r["loss"] != loss:
            continue
        extra = {k: r[k] for k in ("shape", "baseline", "ratio", "meets_target", "graph_min_us",
                                   "graph_median_us", "graph_max_us") if k in r}
        extra.update(workload="host", machine=report["machine"])
        if r["impl"] in parts:
            extra["breakdown_us"] = parts[r["impl"]]
        rows.append(Row(r["impl"], r["shape"], 0, [], 0, "float32", "fwd+bwd",
                        r["median_us"] / 1e3, None, None, min_ms=r["min_us"] / 1e3,
                        max_ms=r["max_us"] / 1e3, loss=loss, extra=extra))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fused_dreamer_loss.bench.host",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--steps", type=int, default=STEPS, help="steps per round")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--json", metavar="PATH", help="write the rows and the breakdown as JSON")
    p.add_argument("--quiet", action="store_true", help="print nothing (with --json)")
    args = p.parse_args(argv)
    report = measure(args.rounds, args.steps, args.device)
    if not args.quiet:
        print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
