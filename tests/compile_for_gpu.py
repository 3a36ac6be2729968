"""Compile the fused kernels for an H100 (sm_90) on a machine without a GPU, and report them.

Triton's interpreter, which runs the kernels in CI, accepts code that Triton's compiler refuses
(a plain global in a kernel, say) and cannot show register spills. This script swaps in a driver
that says "CUDA, sm_90" (the host benchmark's: :func:`fused_dreamer_loss.bench.host.
no_launch_driver`) and turns every Triton dispatch into a compile-only warm-up, then runs the
project's own launchers (forward, and backward with grad outputs 1 and 2) on CPU tensors of the
benchmark presets' shapes: Triton's real front end, its passes down to PTX, and the ptxas that
Triton itself uses (:func:`triton_ptxas`) to a cubin.
It prints one JSON line per compiled kernel: name, registers and spilled bytes (from ``ptxas -v``).

Run from the repository root as ``python -m tests.compile_for_gpu`` (``tests/test_compile_for_gpu.py``
does); TRITON_INTERPRET must not be set.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import jit

from fused_dreamer_loss.bench.host import NO_LAUNCH_ARCH

TARGET = GPUTarget("cuda", NO_LAUNCH_ARCH, 32)


def triton_ptxas() -> str | None:
    """The ptxas the installed triton compiles TARGET's kernels with, as triton itself picks it
    (``triton.backends.nvidia.compiler.get_ptxas``: the ``TRITON_PTXAS_PATH`` or
    ``TRITON_PTXAS_BLACKWELL_PATH`` binary if set, else its bundled ``ptxas`` or
    ``ptxas-blackwell``, by target architecture and triton release: triton 3.9 compiles sm_90 with
    ``ptxas-blackwell``, CUDA 13, whose PTX the bundled ``ptxas``, CUDA 12, refuses), or None where
    triton has no NVIDIA backend. (The form of ``get_ptxas`` is that of the supported triton
    range, 3.6 on: 3.3 returns a pair, 3.4 and 3.5 take no architecture.)"""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(TARGET.arch).path
    except (ImportError, RuntimeError):  # no backend, or its ptxas is missing
        return None


COMPILED: list[tuple[str, object]] = []
_run = jit.JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    COMPILED.append((self.fn.__name__, kernel))
    return kernel


def ptxas_report(kernel) -> dict:
    """Registers and spilled bytes of a compiled kernel, from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        out = subprocess.run([triton_ptxas(), "-v", "--gpu-name=sm_90a", ptx, "-o",
                              os.path.join(tmp, "k.o")], capture_output=True, text=True,
                             check=True).stderr
    return {"registers": max(int(r) for r in re.findall(r"Used (\d+) registers", out)),
            "spilled": sum(int(b) for b in re.findall(r"(\d+) bytes spill stores", out))}


def cases():
    """(what, spill-free, run): each run calls a loss forward and backward on CPU tensors; the
    benchmark presets' dtypes (float32, bfloat16) must compile without register spills."""
    from tests.world_model_v1.helpers_v1 import make_inputs
    from tests.world_model_v3.helpers_v3 import leaves, make_v3_inputs

    from fused_dreamer_loss import dreamer_model_loss, dreamer_v3_model_loss

    def backward_twice(losses, wrt):
        for weight in (1.0, 2.0):
            torch.autograd.grad(losses, wrt, [torch.full_like(v, weight) for v in losses],
                                retain_graph=True, allow_unused=True)

    def v1(dtype, **options):
        def run():
            inputs = make_inputs((200, 50), 30, (3, 64, 64), dtype, "cpu", seed=0)
            backward_twice(list(dreamer_model_loss(*inputs, backend="triton", **options)),
                           inputs)
        return run

    def v3(dtype, heads=((3, 64, 64),), uint8=True, **options):
        def run():
            two_hot = options.get("reward_two_hot", True)
            inputs = make_v3_inputs((16, 64), 32, 32, heads, uint8=uint8, dtype=dtype,
                                    reward_width=255 if two_hot else 1)
            if two_hot:
                inputs["true_reward"] = inputs["true_reward"].detach()
            losses = dreamer_v3_model_loss(**inputs, lambda_continue=1.0, backend="triton",
                                           **options)
            backward_twice(list(losses.values()), leaves(inputs))
        return run

    def behavior(dtype, value_loss="two_hot", **options):
        def run():
            from tests.behavior_v3.helpers_behavior import replay, rollout

            from fused_dreamer_loss.behavior_v3 import dreamer_v3_behavior_loss
            R = 255 if value_loss == "two_hot" else 1
            x = rollout((16, 64), 15, R=max(R, 2), dtype=dtype)
            rep = replay(16, 64, R=max(R, 2), dtype=dtype)
            if R == 1:
                x["value_logits"] = x["value_logits"][..., :1].detach().requires_grad_()
                rep["value_pred"] = rep["value_pred"][..., :1].detach().requires_grad_()
            losses = dreamer_v3_behavior_loss(
                x["reward"], x["next_value"], x["value_logits"], torch.zeros(1), torch.zeros(1),
                x["continuation"], x["root_continuation"], baseline=x["baseline"],
                log_prob=x["log_prob"], entropy=x["entropy"], slow_value=x["slow_logits"][..., :R],
                replay_value_pred=rep["value_pred"], replay_reward=rep["reward"],
                replay_done=rep["done"], replay_terminated=rep["terminated"],
                replay_slow_value=rep["slow_value"][..., :R], value_loss=value_loss,
                slow_critic_regularization=1.0, replay_value_weight=0.3, backend="triton",
                **options)
            wrt = [x[k] for k in ("reward", "next_value", "continuation", "baseline", "log_prob",
                                  "entropy", "value_logits")] + [rep["value_pred"]]
            backward_twice([v for k, v in losses.items() if k.startswith("loss_")], wrt)
        return run

    def behavior_phases(dtype):
        def run():
            from tests.behavior_v3.helpers_behavior import rollout

            from fused_dreamer_loss.behavior_v3 import lambda_returns, return_scale
            x = rollout((1024,), 15, R=2, dtype=dtype)
            returns, _ = lambda_returns(x["reward"], x["next_value"], x["continuation"],
                                        x["root_continuation"], backend="triton")
            return_scale(returns, torch.zeros(1, dtype=dtype), torch.zeros(1, dtype=dtype),
                         backend="triton")
            backward_twice([returns], [x["reward"], x["next_value"], x["continuation"]])
        return run

    return [
        ("v1 float32", True, v1(torch.float32)),
        ("v1 bfloat16 delayed global smooth_l1", True,
         v1(torch.bfloat16, delayed_clamp=True, global_average=True, reco_loss="smooth_l1")),
        ("v3 bfloat16 balanced", True, v3(torch.bfloat16)),
        ("v3 float32 separate unimix, two heads", True,
         v3(torch.float32, heads=((3, 64, 64), (7,)), kl_mode="separate", unimix=0.01,
            reco_symlog=[False, "target"])),
        ("v3 float16 separate, symlog reward, float targets", False,
         v3(torch.float16, uint8=False, kl_mode="separate", reward_two_hot=False)),
        ("v3 float64 balanced, two-hot in symlog space", False,
         v3(torch.float64, two_hot_space="symlog", reco_loss="l1")),
        ("behavior float32 REINFORCE, two-hot, slow critic, replay", True,
         behavior(torch.float32, use_reinforce=True)),
        ("behavior bfloat16 reparameterised, symlog space", True,
         behavior(torch.bfloat16, two_hot_space="symlog")),
        ("behavior float32 symlog_mse", True, behavior(torch.float32, value_loss="symlog_mse")),
        ("behavior float64 phases: lambda_returns, return_scale", False,
         behavior_phases(torch.float64)),
    ]


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET"
    from fused_dreamer_loss.bench.host import no_launch_driver
    from fused_dreamer_loss.core import dispatch

    jit.JITFunction.run = _compile_only
    with no_launch_driver():  # backend="triton" takes CPU tensors; nothing runs
        for what, spill_free, run in cases():
            start = len(COMPILED)
            # every launch of a case through Triton's dispatch, where it is recorded: none
            # launched directly by a plan another case kept
            dispatch.forget_all()
            run()
            for name, kernel in COMPILED[start:]:
                print(json.dumps({"case": what, "spill_free": spill_free, "kernel": name,
                                  **ptxas_report(kernel)}), flush=True)


if __name__ == "__main__":
    main()
