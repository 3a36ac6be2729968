"""What one training step moves over the image tensors, measured, eager or compiled.

Under Triton's interpreter every load and store a kernel makes is a Python call with the addresses
in hand, so the fused kernels' traffic is counted element by element (:func:`measure`): the
elements of each image-sized tensor argument a launch loads or stores. Around the kernels, torch
operators that read or write an image-sized tensor are counted from the dispatcher in eager mode,
and from the graphs the compiler produces otherwise (the graphs ``aot_eager`` runs, the graphs
Inductor lowers): a torch.compile'd function called under a dispatch mode runs eagerly, not its
graphs, and Inductor's C++ kernels do not go through the dispatcher. Allocations and launches come
from torch.profiler, which sees Inductor's allocations and kernels too. ``TRITON_INTERPRET=1
python -m tests.core.traffic`` prints the figures for V1 and V3, eager and compiled.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import re
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.utils._python_dispatch
from tests.world_model_v1.helpers_v1 import make_inputs
from tests.world_model_v3.helpers_v3 import leaves, make_v3_inputs
from torch.utils import _pytree as pytree

from fused_dreamer_loss import dreamer_model_loss, dreamer_v3_model_loss

#: Operators that only allocate, view, detach or compute dtypes: no pass over any data.
NO_DATA_OPS = frozenset({"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
                         "detach", "alias", "lift_fresh", "set_", "promote_types",
                         "result_type"})
#: Operators that write their first argument without reading it.
WRITE_ONLY_SELF = frozenset({"copy_", "fill_", "zero_"})
#: The fused loss's custom ops: their kernels' traffic is counted at the loads and stores.
FUSED_NAMESPACE = "fused_dreamer_loss"
#: Profiler ranges of a launch: a Triton kernel (named here) or an Inductor C++ kernel.
TRITON_RANGE = "triton::"
KERNEL_RANGE = re.compile(r"^triton::|cpp_fused")


@dataclasses.dataclass
class Traffic:
    """One step's traffic over tensors of at least ``image_numel`` elements.

    Attributes:
        image_numel: the size that counts as an image.
        kernel_elements: image elements the Triton kernels loaded or stored.
        operators: ``(operator, images read, images written)`` for each torch operator (run, or
            lowered by Inductor) that touched an image-sized tensor.
        triton_launches: Triton launches by kernel name.
        other_launches: the step's other launches by name: torch operators that compute and
            Inductor's C++ kernels.
        allocations: the bytes of each image-sized allocation.
    """

    image_numel: int
    kernel_elements: int = 0
    operators: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)
    triton_launches: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    other_launches: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    allocations: list[int] = dataclasses.field(default_factory=list)

    @property
    def passes(self) -> float:
        """Image-sized reads and writes, in passes over one image tensor."""
        return (self.kernel_elements / self.image_numel
                + sum(reads + writes for _, reads, writes in self.operators))

    def row(self) -> str:
        """The figures on one line."""
        operators = "".join(f"; {n} r{r} w{w}" for n, r, w in self.operators)
        return (f"{self.passes:g} passes ({self.kernel_elements / self.image_numel:g} by the "
                f"fused kernels{operators}), Triton launches "
                f"{dict(sorted(self.triton_launches.items()))}, other launches "
                f"{dict(sorted(self.other_launches.items()))}, image-sized allocations (bytes) "
                f"{sorted(self.allocations)}")


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _span(t: torch.Tensor) -> tuple[int, int]:
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


@contextlib.contextmanager
def _kernel_traffic(traffic: Traffic, inside: list[bool]) -> Iterator[None]:
    """Count each Triton launch, and the elements its loads and stores touch in its image-sized
    tensor arguments (the interpreter hands them the tensors' own memory on a CPU)."""
    from triton.runtime import interpreter

    run, builder = interpreter.InterpretedFunction.run, interpreter.InterpreterBuilder
    load, store = builder.create_masked_load, builder.create_masked_store
    spans: list[tuple[int, int]] = []

    def count(ptrs, mask):
        addresses, active = ptrs.data, mask.data
        for lo, hi in spans:
            traffic.kernel_elements += int(np.count_nonzero(active & (addresses >= lo)
                                                            & (addresses < hi)))

    def counted_run(self, *args, **kwargs):
        name = getattr(self.fn, "__name__", "kernel")
        traffic.triton_launches[name] += 1
        spans[:] = [_span(t) for t in _tensors((args, kwargs)) if t.numel() >= traffic.image_numel]
        inside[0] = True
        try:
            with torch.profiler.record_function(TRITON_RANGE + name):
                return run(self, *args, **kwargs)
        finally:
            inside[0] = False
            spans.clear()

    def counted_load(self, ptrs, mask, *args):
        count(ptrs, mask)
        return load(self, ptrs, mask, *args)

    def counted_store(self, ptrs, value, mask, *args):
        count(ptrs, mask)
        return store(self, ptrs, value, mask, *args)

    interpreter.InterpretedFunction.run = counted_run
    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    try:
        yield
    finally:
        interpreter.InterpretedFunction.run = run
        builder.create_masked_load, builder.create_masked_store = load, store


def _image_access(name: str, inputs, outputs, image_numel: int) -> tuple[int, int]:
    reads = [t for t in inputs if t.numel() >= image_numel]
    if name in WRITE_ONLY_SELF and inputs and inputs[0].numel() >= image_numel:
        reads = reads[1:]
    return len(reads), sum(t.numel() >= image_numel for t in outputs)


def _counts_data(op) -> bool:
    return (isinstance(op, torch._ops.OpOverload) and not op.is_view
            and op.namespace != FUSED_NAMESPACE
            and op.overloadpacket.__name__ not in NO_DATA_OPS)


class _OperatorTraffic(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the torch operators that touch an image-sized tensor outside the Triton launches
    (the interpreter's own copies of the arguments are not the kernels' traffic). Eager mode
    only: under a dispatch mode, a torch.compile'd function runs eagerly, not its graphs."""

    def __init__(self, traffic: Traffic, inside: list[bool]):
        super().__init__()
        self.traffic, self.inside = traffic, inside

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.inside[0] and _counts_data(func):
            name = func.overloadpacket.__name__
            reads, writes = _image_access(name, _tensors((args, kwargs)), _tensors(out),
                                          self.traffic.image_numel)
            if reads or writes:
                self.traffic.operators.append((name, reads, writes))
        return out


def _graph_recorder(traffic: Traffic, compiler: str) -> Callable[[torch.fx.Graph], None]:
    """Records the operators of a compiled graph that touch an image-sized tensor: what the
    graph runs (``aot_eager``) or what Inductor's generated kernels will read and write."""
    def record(graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            if node.op != "call_function" or not _counts_data(node.target):
                continue
            inputs = _tensors([a.meta.get("val") for a in node.all_input_nodes])
            name = node.target.overloadpacket.__name__
            reads, writes = _image_access(name, inputs, _tensors(node.meta.get("val")),
                                          traffic.image_numel)
            if reads or writes:
                traffic.operators.append((f"{compiler} {name}", reads, writes))

    return record


def _backend(traffic: Traffic, compiler: str):
    """``compiler`` ("aot_eager", "inductor"), recording its graphs' image-sized operators."""
    record = _graph_recorder(traffic, compiler)
    if compiler == "inductor":
        return "inductor", torch._inductor.config.patch(
            post_grad_custom_post_pass=record, fx_graph_cache=False,
            **{"cpp.enable_kernel_profile": True})
    from torch._dynamo.backends.debugging import aot_eager, boxed_nop

    def recorded(gm, example_inputs):
        record(gm.graph)
        return boxed_nop(gm, example_inputs)

    return (functools.partial(aot_eager, fw_compiler=recorded, bw_compiler=recorded),
            contextlib.nullcontext())


def _within_launches(events) -> set[int]:
    """The ids of the events that run inside a launch's range (the launch is counted, not what
    it runs)."""
    within = set()
    stack = [c for e in events if KERNEL_RANGE.search(e.name) for c in e.cpu_children]
    while stack:
        event = stack.pop()
        within.add(id(event))
        stack.extend(event.cpu_children)
    return within


def _moves_data(event_name: str) -> bool:
    packet = getattr(torch.ops.aten, event_name.removeprefix("aten::"), None)
    return packet is not None and packet.__name__ not in NO_DATA_OPS and not any(
        getattr(packet, overload).is_view for overload in packet.overloads())


def _profile(traffic: Traffic, prof, image_bytes: int) -> None:
    events = prof.events()
    within = _within_launches(events)
    for e in events:
        memory = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if memory >= image_bytes:
            traffic.allocations.append(memory)
        if e.name.startswith(TRITON_RANGE) or id(e) in within:
            continue
        if KERNEL_RANGE.search(e.name) or (
                e.name.startswith("aten::") and _moves_data(e.name)
                and not any(c.name.startswith("aten::") for c in e.cpu_children)):
            traffic.other_launches[e.name] += 1


def measure(make_step: Callable[[object], Callable[[], None]], compiler: Optional[str],
            image_numel: int, image_bytes: int) -> Traffic:
    """The traffic of one ``step()``, ``step = make_step(backend)``: eager where ``compiler`` is
    None (``backend`` None), else compiled by ``compiler`` ("aot_eager" or "inductor"). The step
    runs twice: first to compile, then measured. Allocations of at least ``image_bytes`` count.
    Needs Triton's interpreter."""
    from torch.profiler import ProfilerActivity, profile

    traffic = Traffic(image_numel)
    backend, compiling = (None, contextlib.nullcontext()) if compiler is None else \
        _backend(traffic, compiler)
    step = make_step(backend)
    with compiling:
        step()
    inside = [False]
    operators = _OperatorTraffic(traffic, inside) if compiler is None else \
        contextlib.nullcontext()
    with _kernel_traffic(traffic, inside), operators, \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    _profile(traffic, prof, image_bytes)
    return traffic


# ---------------------------------------------------------------------------------------------
# The common training step of each loss: one backward of the sum of the terms (grad output 1)
# ---------------------------------------------------------------------------------------------


#: An image large enough to dwarf every other tensor of the steps below (the V3 reward logits
#: hold 2 × 3 × 255 floats).
IMAGE_SHAPE = (3, 32, 32)
BATCH_SHAPE = (2, 3)


def compiled(fn: Callable, backend) -> Callable:
    """``fn``, compiled whole by ``backend`` unless it is None."""
    return fn if backend is None else torch.compile(fn, fullgraph=True, backend=backend)


def training_step(fn: Callable, wrt: list[torch.Tensor]) -> Callable[[], None]:
    """A step: ``.grad`` of ``wrt`` reset to None (as ``zero_grad()`` does), ``fn().backward()``."""
    def step():
        for t in wrt:
            t.grad = None
        fn().backward()

    return step


def v1_step(backend) -> Callable[[], None]:
    """V1: ``sum(dreamer_model_loss(...)).backward()``, the target frames not requiring grad."""
    inputs = make_inputs(BATCH_SHAPE, 5, IMAGE_SHAPE, seed=1)
    inputs[4].requires_grad_(False)
    loss = compiled(lambda *t: sum(dreamer_model_loss(*t, backend="triton")), backend)
    return training_step(lambda: loss(*inputs), [t for t in inputs if t.requires_grad])


def v3_step(backend) -> Callable[[], None]:
    """V3 (torchrl's defaults): uint8 frames, ``sum(dreamer_v3_model_loss(...).values())``."""
    inputs = make_v3_inputs(BATCH_SHAPE, head_shapes=(IMAGE_SHAPE,), seed=1)
    inputs["true_reward"].requires_grad_(False)
    loss = compiled(lambda t: sum(dreamer_v3_model_loss(**t, backend="triton").values()),
                    backend)
    return training_step(lambda: loss(inputs), leaves(inputs))


#: The steps, and the bytes an element of their target frames takes (the narrowest image tensor).
STEPS = {"V1 float32": (v1_step, 4), "V3 uint8 frames, float32": (v3_step, 1)}
COMPILERS = (None, "aot_eager", "inductor")


def image_numel() -> int:
    """Elements of one image tensor of the steps."""
    return math.prod(BATCH_SHAPE) * math.prod(IMAGE_SHAPE)


def measure_step(name: str, compiler: Optional[str]) -> Traffic:
    """The traffic of the common step :data:`STEPS` ``[name]``, eager (``compiler`` None) or
    compiled."""
    make_step, target_itemsize = STEPS[name]
    torch._dynamo.reset()
    return measure(make_step, compiler, image_numel(), image_numel() * target_itemsize)


def main() -> None:
    for name in STEPS:
        for compiler in COMPILERS:
            print(f"{name}, {compiler or 'eager'}: {measure_step(name, compiler).row()}")


if __name__ == "__main__":
    main()
