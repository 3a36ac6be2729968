"""How a row is measured: the timer (``triton.testing.do_bench`` on CUDA, repeats of
``time.perf_counter`` on a CPU, with their spread), CUDA-graph capture, peak memory, the device's
copy bandwidth, the kernel launches of one step (torch.profiler), and the switch that puts the
fused kernels through Triton's interpreter on a CPU (with why an implementation cannot run
here)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..core import dispatch
from .peers import loss_terms

if TYPE_CHECKING:
    from .report import Row

#: Bytes copied to measure the device's copy bandwidth.
COPY_BYTES = 1 << 30
#: Timed calls of a step on a CPU (after one untimed warm-up call).
CPU_REPEATS = 25
#: A CPU row is flagged noisy when its slowest repeat took more than this many times its fastest:
#: the machine was busy, and the median may be off.
NOISY_SPREAD = 2.0
#: ATen operators that move no tensor data (allocation, views, dtype and shape queries): not
#: counted as launches on a CPU.
NO_KERNEL_OPS = frozenset({
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::as_strided", "aten::view",
    "aten::_reshape_alias", "aten::reshape", "aten::_unsafe_view", "aten::expand", "aten::t",
    "aten::transpose", "aten::permute", "aten::squeeze", "aten::unsqueeze", "aten::select",
    "aten::slice", "aten::alias", "aten::detach", "aten::detach_", "aten::lift_fresh",
    "aten::result_type", "aten::promote_types", "aten::broadcast_tensors", "aten::to",
    "aten::resolve_conj", "aten::resolve_neg", "aten::flatten", "aten::unflatten",
    "aten::contiguous", "aten::split", "aten::chunk", "aten::unbind", "aten::set_",
    "aten::is_nonzero", "aten::size", "aten::stride", "aten::numel",
})
#: Profiler ranges counted as one launch each (what runs inside them is not counted again): a
#: Triton launch under the interpreter (named by :func:`_named_interpreter_launches`) and a C++
#: kernel of torch.compile on a CPU (named when inductor's ``cpp.enable_kernel_profile`` is on).
TRITON_RANGE = "triton::"
KERNEL_RANGE = re.compile(r"^triton::|cpp_fused")


def step_fn(fn: Callable, inputs: list[torch.Tensor], mode: str) -> Callable[[], None]:
    wanted = [t for t in inputs if t.requires_grad]
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(*inputs)
    else:
        def step():
            torch.autograd.grad(loss_terms(fn(*inputs)), wanted)
    return step


def capture(step: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """``step`` captured in a CUDA graph after warm-up on a side stream: the graph, and what the
    captured call returned (its outputs, which every replay rewrites)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


def graphed(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` captured in a CUDA graph (:func:`capture`); returns its replay."""
    return capture(step)[0].replay


@dataclass(frozen=True)
class Timing:
    """Milliseconds of one step: the median and, on a CPU, the fastest and the slowest of the
    :data:`CPU_REPEATS` (None on CUDA, where ``do_bench`` gives the median)."""

    median_ms: float
    min_ms: float | None = None
    max_ms: float | None = None

    @property
    def noisy(self) -> bool | None:
        """Whether the spread exceeds :data:`NOISY_SPREAD`; None where there is no spread."""
        if self.min_ms is None or self.max_ms is None:
            return None
        return self.max_ms > NOISY_SPREAD * self.min_ms


def timed(steps: list[Callable[[], None]], cuda: bool) -> Timing:
    """The time of one step, rotating through the input sets."""
    turn = [0]

    def rotate():
        steps[turn[0] % len(steps)]()
        turn[0] += 1

    if cuda:
        from triton.testing import do_bench
        return Timing(float(do_bench(rotate, warmup=50, rep=300, return_mode="median")))
    rotate()
    times = []
    for _ in range(CPU_REPEATS):
        start = time.perf_counter()
        rotate()
        times.append((time.perf_counter() - start) * 1e3)
    return Timing(statistics.median(times), min(times), max(times))


def peak_mem_mb(step: Callable[[], object]) -> float:
    """MiB one call of ``step`` allocates on the CUDA device beyond what was held before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_gbps() -> float:
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = timed([lambda: dst.copy_(src)], cuda=True).median_ms
    return 2 * COPY_BYTES / ms / 1e6


#: The module ``python -m`` runs when the command restarts itself (see :func:`.cli.main`).
MODULE = "fused_dreamer_loss.bench"


def checks_fused_on_cpu(args: argparse.Namespace) -> bool:
    """Whether this run checks the fused kernels on the CPU (through Triton's interpreter): the
    fused implementation asked for, on the CPU (no CUDA device, or ``--device cpu``), whatever
    the workload and the loss."""
    return args.device == "cpu" and "fused" in args.impl


def wants_interpreter(args: argparse.Namespace) -> bool:
    """Whether this run would put the fused kernels through Triton's interpreter: it checks them on
    the CPU (:func:`checks_fused_on_cpu`) and the user did not decide otherwise
    (``TRITON_INTERPRET`` unset) on a machine that has triton."""
    return (checks_fused_on_cpu(args) and "TRITON_INTERPRET" not in os.environ
            and importlib.util.find_spec("triton") is not None)


def use_interpreter(args: argparse.Namespace) -> bool:
    """Set ``TRITON_INTERPRET=1`` in this process if that is still in time; False if it is not.

    Triton reads the variable when its modules are imported, not only when the package's kernels
    are defined: ``triton.language``'s own jit helpers (``tl.zeros`` in triton 3.6) are built for
    the compiler or for the interpreter at ``import triton``, and a kernel of one kind cannot call
    a helper of the other. So it must be set before ``import triton``; but importing this package
    already imports triton (``torch._dynamo`` does). In time only when nothing imported triton
    yet; :func:`.cli.main` otherwise restarts the command with the variable set.
    """
    if not wants_interpreter(args):
        return True
    if "triton" in sys.modules:
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True


def interpreting() -> bool:
    """Whether the fused kernels run through Triton's interpreter (False when triton is missing)."""
    try:
        return dispatch.interpreting()
    except RuntimeError:
        return False


def unavailable(case, impl: str, cuda: bool) -> str | None:
    """Why ``impl`` gives no row of ``case`` here: "n/a: ..." where it cannot compute this loss
    with these options, a skip reason where it cannot run on this machine; None if it runs."""
    unsupported = case.not_applicable(impl)
    if unsupported:
        return f"n/a: {unsupported}"
    return skip_reason(impl, cuda)


def skip_reason(impl: str, cuda: bool) -> str | None:
    """Why ``impl`` cannot run here, or None."""
    if impl == "fused":
        try:
            dispatch.require_triton()
        except RuntimeError:
            return "skipped: triton is not installed (Linux only)"
        if not cuda and not dispatch.interpreting():
            return ("skipped: on the CPU the fused kernels need Triton's interpreter, which is "
                    "off (the fused-dreamer-loss-bench command turns it on; from Python, set "
                    "TRITON_INTERPRET=1 before triton is imported)")
    if impl == "compiled" and sys.platform == "win32":
        return "skipped: torch.compile is not supported here"
    if impl == "torchrl":
        try:
            import torchrl  # noqa: F401
        except ImportError:
            return "skipped: torchrl is not installed"
    return None


@contextlib.contextmanager
def _named_interpreter_launches():
    """Each launch of a Triton kernel through the interpreter inside a profiler range
    ``triton::<kernel name>``. Hooks the interpreter's launch method (the one every
    ``kernel[grid](...)`` goes through), not the package's kernels, for the duration only."""
    from triton.runtime.interpreter import InterpretedFunction

    launch = InterpretedFunction.run

    def named(self, *args, **kwargs):
        with torch.profiler.record_function(TRITON_RANGE + getattr(self.fn, "__name__", "kernel")):
            return launch(self, *args, **kwargs)

    InterpretedFunction.run = named
    try:
        yield
    finally:
        InterpretedFunction.run = launch


def _inside_kernel_range(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if KERNEL_RANGE.search(parent.name):
            return True
        parent = parent.cpu_parent
    return False


def count_launches(step: Callable[[], None], cuda: bool) -> dict[str, int]:
    """Kernel launches of one call of ``step``, counted by torch.profiler: ``{name: count}``.

    On CUDA: every operation the device ran (kernels, memsets, copies). On a CPU, where nothing is
    launched, what would be: each ATen operator that computes (leaf operators, less those that only
    allocate or view, :data:`NO_KERNEL_OPS`), each C++ kernel of torch.compile and each Triton
    launch through the interpreter (not what the interpreter runs inside it). A fwd+bwd step
    includes the three ``ones`` that ``torch.autograd.grad`` fills as the losses' grad outputs.
    """
    from torch.profiler import ProfilerActivity, profile

    launched: dict[str, int] = {}
    if cuda:
        torch.cuda.synchronize()
        with warnings.catch_warnings():  # one profile per row: its "clears events" note is noise
            warnings.filterwarnings("ignore", "Warning: Profiler clears events", UserWarning)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                launched[e.name] = launched.get(e.name, 0) + 1
        return launched
    hook = _named_interpreter_launches() if interpreting() else contextlib.nullcontext()
    with hook, profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    for e in prof.events():
        if _inside_kernel_range(e):
            continue
        if KERNEL_RANGE.search(e.name) or (
                e.name.startswith("aten::") and e.name not in NO_KERNEL_OPS
                and not any(c.name.startswith("aten::") for c in e.cpu_children)):
            launched[e.name] = launched.get(e.name, 0) + 1
    return launched


def time_into(row: Row, steps: list[Callable[[], object]], cuda: bool) -> None:
    """The time of one of ``steps`` (:func:`timed`) into ``row``: median, spread, noisy flag."""
    timing = timed(steps, cuda)
    row.median_ms, row.min_ms, row.max_ms = timing.median_ms, timing.min_ms, timing.max_ms
    row.noisy = timing.noisy


def count_launches_into(row: Row, step: Callable[[], None], cuda: bool) -> None:
    """The launches of one call of ``step`` (:func:`count_launches`) into ``row``: their sum and,
    in ``extra["launched"]``, by name; where the profiler fails, the error in
    ``extra["launches_error"]`` and no figure."""
    try:
        launched = count_launches(step, cuda)
        row.launches = sum(launched.values())
        row.extra["launched"] = launched
    except Exception as exc:  # the profiler may be unavailable (e.g. CUPTI): a missing figure
        row.extra["launches_error"] = f"{type(exc).__name__}: {exc}"

