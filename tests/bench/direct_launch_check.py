"""Check, with Triton's real compiler and a driver that launches nothing, that a direct launch
of the fused kernels (:class:`fused_dreamer_loss.core.machinery.Launch` after its first call)
hands the launcher what Triton's own dispatch hands it for the same arguments.

Every direct launch is followed by Triton's dispatch of the same arguments; both launcher calls
are recorded and compared: grid, stream, function, metadata, and every argument value, a tensor
as its data pointer; and the compiled kernel launched directly must be the one Triton's dispatch
picks (the world-model plans' launches, and the behaviour plans' at several dtypes and sizes,
and their finalizes). Prints
one JSON line per compared launch. Run from the repository root as ``python -m
tests.bench.direct_launch_check`` with TRITON_INTERPRET unset (``tests/bench/test_host.py``
does).
"""

from __future__ import annotations

import json

import torch

from fused_dreamer_loss.bench import host
from fused_dreamer_loss.core import machinery

CALLS: list[tuple] = []


def _pointer(value):
    if isinstance(value, torch.Tensor):
        return value.data_ptr()
    if isinstance(value, tuple):
        return tuple(_pointer(v) for v in value)
    return value


def _behavior_steps():
    """Behaviour steps whose launches share kernels and constexprs but not every specialisation:
    float32 and float64 inputs, a float64 critic beside a float32 actor, and rollouts whose sizes
    Triton compiles apart (16 starts and 16 steps, multiples of 16, against 2 or 8 starts and 15
    steps), interleaved."""
    from fused_dreamer_loss.bench import behavior
    from fused_dreamer_loss.bench.presets import BEHAVIOR_PRESETS, DEFAULT_BEHAVIOR_CONVENTION
    from fused_dreamer_loss.behavior_v3 import BEHAVIOR_CONVENTIONS

    options = dict(BEHAVIOR_CONVENTIONS[DEFAULT_BEHAVIOR_CONVENTION])
    steps = []
    for shape in ((1, 2, 15, 255), (2, 8, 16, 255), (2, 4, 15, 255)):
        BEHAVIOR_PRESETS["direct-check"] = shape
        for dtype in (torch.float32, torch.float64):
            inputs = behavior.make_inputs("direct-check", dtype, "cpu", 0, options)
            steps.append(host.make_step(
                lambda inputs=inputs: tuple(behavior._call(inputs, options, "triton").values()),
                [t for t in inputs if t.requires_grad]))
        # the critic in float64 beside a float32 actor: the float64 accumulation of an
        # all-float64 call, other loss dtypes
        inputs = behavior.make_inputs("direct-check", torch.float32, "cpu", 0, options)
        for i in (behavior.INPUTS.index("value_pred"), behavior.INPUTS.index("slow_value")):
            inputs[i] = inputs[i].detach().double().requires_grad_(inputs[i].requires_grad)
        steps.append(host.make_step(
            lambda inputs=inputs: tuple(behavior._call(inputs, options, "triton").values()),
            [t for t in inputs if t.requires_grad]))
    del BEHAVIOR_PRESETS["direct-check"]
    return steps + steps


def main() -> None:
    launch_call = machinery.Launch.__call__
    launcher_call = host._NoLaunch.__call__
    compared = []

    def recording_launcher(self, *args):
        CALLS.append(args)
        return launcher_call(self, *args)

    def checked_launch(self, *args):
        direct = self._direct is not None
        before = len(CALLS)
        launch_call(self, *args)
        if not direct or len(CALLS) != before + 1:
            return
        kernel = getattr(self.owner, self.name)
        compiled = kernel[(self.programs,)](*args, **self.constexprs)
        mine, triton_s = CALLS[-2], CALLS[-1]
        head = 5  # grid x, y, z, stream, function
        same = (mine[:head] == triton_s[:head] and mine[head] is triton_s[head]
                and [_pointer(v) for v in mine[head + 4:]]
                == [_pointer(v) for v in triton_s[head + 4:]])
        # the kernel Triton's dispatch picks for these arguments is the one launched directly
        # (a key that missed a specialisation would launch another's)
        same_kernel = self._direct is not None and self._direct[1] is compiled
        compared.append({"kernel": self.name, "values": len(mine) - head - 4,
                         "same": same and same_kernel})

    host._NoLaunch.__call__ = recording_launcher
    machinery.Launch.__call__ = checked_launch
    with host.no_launch_driver():
        for impl in host.implementations():
            if impl.fused:
                step = host.make_step(*impl.build("cpu"))
                for _ in range(2):
                    step()
        for step in _behavior_steps():
            for _ in range(2):
                step()
    for line in compared:
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
