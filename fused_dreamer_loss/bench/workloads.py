"""Benchmark CLI: the fused Dreamer losses against eager torch, torch.compile and torchrl.

Run ``fused-dreamer-loss-bench --help`` (or ``python -m fused_dreamer_loss.bench --help``).
From Python: :func:`run` returns the report (a dict, the ``--json`` schema), :func:`main` the exit
status (0, or 1 when a fused result was wrong or an implementation crashed).

``--loss v1`` (the default) times the Dreamer loss (:func:`dreamer_model_loss`), ``--loss v3`` the
DreamerV3 loss (:func:`dreamer_v3_model_loss`) with the options of one of :data:`V3_CONVENTIONS`.
Every implementation is timed on the same inputs, and every row reports the achieved bandwidth under
one minimal-traffic model (DESIGN §3, DESIGN-V3 §5: each input read once, each needed gradient
written once), so GB/s ratios are speed ratios. On CUDA the timer is ``triton.testing.do_bench``
(median) over several input sets in rotation, next to a device-to-device copy measured in the same
run.

Without CUDA the fused kernels run through Triton's interpreter: they are checked against the
float64 reference and their launches counted, but not timed (the interpreter's speed says nothing
about the kernels'). Every row counts the kernel launches of one step (see :func:`count_launches`).
A figure that was not measured is None in the JSON and "—" in the table, never 0.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import math
import os
import re
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ..world_model_v1 import reference
from ..core import dispatch
from ..world_model_v1.functional import dreamer_model_loss
from ..world_model_v3 import reference as reference_v3
from ..world_model_v3.conventions import V3_CONVENTIONS
from ..world_model_v3.functional import dreamer_v3_model_loss
from ..world_model_v3.validation import V3Options

LOSSES = ("v1", "v3")
PRESETS = {
    # name: (batch, time, image shape, latent dim): the Dreamer loss (--loss v1)
    "tiny": (4, 8, (3, 16, 16), 30),
    "small": (16, 50, (3, 64, 64), 30),
    "default": (200, 50, (3, 64, 64), 30),
    "large": (1024, 64, (3, 64, 64), 30),
    "v1-wide-latents": (16, 64, (3, 64, 64), 1024),
}
V3_PRESETS = {
    # name: (batch, time, uint8 image shape, categoricals, classes): the DreamerV3 loss
    # (--loss v3), DESIGN-V3 §6
    "v3-tiny": (2, 4, (3, 8, 8), 4, 4),
    "v3": (16, 64, (3, 64, 64), 32, 32),
    "v3-r2": (16, 64, (3, 64, 64), 32, 16),
    "v3-large": (256, 64, (3, 64, 64), 32, 64),
}
#: The options of a --loss v3 run unless --convention names others.
DEFAULT_CONVENTION = "dreamerv3-2024"
IMPLS = ("fused", "eager", "compiled", "torchrl")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DISTANCES = ("l2", "l1", "smooth_l1")
#: Input sets the timer rotates through, so that the cache is not what is timed.
ROTATION = 3
#: Bytes copied to measure the device's copy bandwidth.
COPY_BYTES = 1 << 30
#: Inputs that need a gradient in a training step: the latents, the decoded frames, the predicted
#: reward (not the targets).
NEEDS_GRAD = (True, True, True, True, False, True, False, True)
#: The same for the DreamerV3 loss, in its argument order (posterior and prior logits, pixels,
#: reco_pixels, true_reward, reward logits, continue logits, terminated): the network's outputs.
V3_NEEDS_GRAD = (True, True, False, True, False, True, True, False)
#: The names of those arguments.
V3_ARGS = ("posterior_logits", "prior_logits", "pixels", "reco_pixels", "true_reward",
           "reward_pred", "continue_pred", "terminated")
#: The dtypes of the DreamerV3 loss's targets whatever ``--dtype`` (which is the network outputs'):
#: what a replay buffer holds.
V3_TARGET_DTYPES = {"pixels": torch.uint8, "true_reward": torch.float32, "terminated": torch.bool}
#: What torchrl's DreamerV3ModelLoss computes for the options it does not take: a convention that
#: asks for another value has no torchrl row.
TORCHRL_V3_FIXED = {"two_hot_space": "raw", "pixels_scale": 1.0 / 255.0, "pixels_offset": 0.0}
#: The widths of the V3 train step's world model (models_v3.CategoricalWorldModel) at each preset,
#: whose latent is the preset's S categoricals of K classes. v3-tiny: a CPU smoke test. The others:
#: 15 M parameters at v3, 25 M at v3-large, whose 16,384 frames of 3x64x64 make the world model's
#: float32 forward save about 7 GiB for the backward (counted with saved-tensor hooks on 128
#: frames, scaled): far within an H100's 80 GB.
V3_WORLD_MODELS = {
    "v3-tiny": {"channels": 4, "embed_dim": 32, "belief_dim": 32, "hidden_dim": 32},
    **dict.fromkeys(("v3", "v3-r2", "v3-large"),
                    {"channels": 16, "embed_dim": 256, "belief_dim": 256, "hidden_dim": 256}),
}
#: The implementations the V3 train step compares: the loss modules.
V3_TRAIN_STEP_IMPLS = ("fused", "eager", "torchrl")
CPU_REPEATS = 25
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


@dataclass
class Row:
    impl: str
    preset: str
    frames: int
    image_shape: list[int]
    latent_dim: int
    dtype: str
    mode: str
    median_ms: float | None
    gbps: float | None
    peak_mem_mb: float | None
    frac_copy: float | None = None
    speedup_vs_eager: float | None = None
    compile_s: float | None = None
    status: str = "ok"
    extra: dict = field(default_factory=dict)
    #: Kernel launches of one step (see :func:`count_launches`); None where not counted.
    launches: int | None = None
    #: Bytes one step moves under the minimal-traffic model (:func:`minimal_bytes`,
    #: :func:`minimal_bytes_v3`).
    model_bytes: int | None = None
    #: Which loss: "v1" (the Dreamer loss) or "v3" (the DreamerV3 loss, whose ``latent_dim`` is
    #: categoricals × classes, ``latent_shape`` the two, ``convention`` its options).
    loss: str = "v1"
    convention: str | None = None
    latent_shape: list[int] | None = None


def minimal_bytes(frames: int, image_numel: int, latent_dim: int, itemsize: int, mode: str) -> int:
    """Fewest bytes a pass must move: read all eight inputs once, and for fwd+bwd write each needed
    gradient once (4 latents, reco_pixels, pred_reward)."""
    reads = (4 * latent_dim + 2 * image_numel + 2) * frames
    writes = (4 * latent_dim + image_numel + 1) * frames if mode == "fwd+bwd" else 0
    return (reads + writes) * itemsize


def make_inputs(preset: str, dtype: torch.dtype, device: str, seed: int) -> list[torch.Tensor]:
    batch, steps, image, latent_dim = PRESETS[preset]
    g = torch.Generator(device).manual_seed(seed)
    B = (batch, steps)

    def rand(*shape, lo=0.0, width=1.0):
        return torch.rand(*shape, generator=g, device=device) * width + lo

    tensors = [
        torch.randn(*B, latent_dim, generator=g, device=device),
        rand(*B, latent_dim, lo=0.1, width=1.5),
        torch.randn(*B, latent_dim, generator=g, device=device),
        rand(*B, latent_dim, lo=0.1, width=1.5),
        rand(*B, *image),
        rand(*B, *image, lo=-0.5, width=2.0),
        torch.randn(*B, 1, generator=g, device=device),
        torch.randn(*B, 1, generator=g, device=device),
    ]
    return [t.to(dtype).requires_grad_(n) for t, n in zip(tensors, NEEDS_GRAD)]


def torchrl_loss_fn(reco_loss: str):
    """torchrl's own path: DreamerModelLoss.kl_loss and distance_loss, reduced as its forward does."""
    from torch import nn
    from torchrl.objectives import DreamerModelLoss
    from torchrl.objectives.utils import distance_loss

    loss = DreamerModelLoss(nn.ModuleList([nn.Sequential(nn.Identity()), nn.Identity()]),
                            reco_loss=reco_loss)

    def fn(pm, ps, qm, qs, pixels, reco, true_reward, pred_reward):
        kl = loss.kl_loss(pm, ps, qm, qs)
        reco_term = distance_loss(pixels, reco, reco_loss).sum((-3, -2, -1)).mean()
        reward = distance_loss(true_reward, pred_reward, "l2").squeeze(-1).mean()
        return kl, reco_term, reward

    return fn


def loss_fn(impl: str, reco_loss: str) -> Callable:
    if impl == "fused":
        return lambda *t: dreamer_model_loss(*t, reco_loss=reco_loss, backend="triton")
    if impl == "eager":
        return lambda *t: reference.dreamer_model_loss(*t, reco_loss=reco_loss)
    if impl == "compiled":
        return torch.compile(lambda *t: reference.dreamer_model_loss(*t, reco_loss=reco_loss))
    return torchrl_loss_fn(reco_loss)


def minimal_bytes_v3(rows: int, image_numel: int, logits: int, reward_bins: int, continues: bool,
                     itemsize: int, mode: str) -> int:
    """Fewest bytes a pass of the DreamerV3 loss must move (DESIGN-V3 §5): read each input once
    and, for fwd+bwd, write the gradient of each network output once. Per row, the outputs
    (``itemsize`` bytes an element) are the predicted frame, the posterior and prior logits
    (``logits`` each), the reward logits and, when the convention ``continues``, the continue
    logit; the targets (in :data:`V3_TARGET_DTYPES`, read only) the frame, the reward and the
    terminal flag."""
    outputs = image_numel + 2 * logits + reward_bins + continues
    targets = (image_numel * V3_TARGET_DTYPES["pixels"].itemsize
               + V3_TARGET_DTYPES["true_reward"].itemsize
               + continues * V3_TARGET_DTYPES["terminated"].itemsize)
    passes = 2 if mode == "fwd+bwd" else 1
    return rows * (outputs * itemsize * passes + targets)


def make_v3_inputs(preset: str, dtype: torch.dtype, device: str, seed: int,
                   opts: V3Options) -> list[torch.Tensor]:
    """The arguments of :func:`dreamer_v3_model_loss` for ``preset`` (:data:`V3_ARGS`): the
    network's outputs in ``dtype`` (logits ~ 2·N(0, 1), predicted frames in [−0.5, 1.5)), the
    targets in :data:`V3_TARGET_DTYPES` (frames in 0…255, rewards ~ 3·N(0, 1), 5% terminal); the
    continue logits and terminal flags only when ``opts`` has the continue term."""
    batch, steps, image, categoricals, classes = V3_PRESETS[preset]
    g = torch.Generator(device).manual_seed(seed)
    B = (batch, steps)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device) * scale

    tensors = [
        randn(*B, categoricals, classes, scale=2.0),
        randn(*B, categoricals, classes, scale=2.0),
        torch.randint(0, 256, (*B, *image), generator=g, device=device,
                      dtype=V3_TARGET_DTYPES["pixels"]),
        torch.rand(*B, *image, generator=g, device=device) * 2.0 - 0.5,
        randn(*B, 1, scale=3.0).to(V3_TARGET_DTYPES["true_reward"]),
        randn(*B, opts.reward_width),
        randn(*B, 1, scale=2.0),
        torch.rand(*B, 1, generator=g, device=device) < 0.05,
    ]
    inputs = [t.to(dtype).requires_grad_() if needs_grad else t
              for t, needs_grad in zip(tensors, V3_NEEDS_GRAD)]
    return inputs if opts.has_continue else inputs[:-2]


def torchrl_v3_loss_fn(opts: V3Options, device: str) -> Callable:
    """torchrl's DreamerV3ModelLoss without a world model: its functions (categorical_kl_terms or
    categorical_kl_balanced, symlog, two_hot_cross_entropy) and reductions called on the same
    tensors as its forward calls them; the losses under its names."""
    import torch.nn.functional as F
    from torchrl.objectives import dreamer_v3 as trl

    reward_bins = trl._default_bins(opts.num_reward_bins, device=device)  # the module's buffer

    def fn(posterior_logits, prior_logits, pixels, reco_pixels, true_reward, reward_logits,
           continue_pred=None, terminated=None):
        if opts.kl_mode == "separate":
            dynamic, representation = trl.categorical_kl_terms(
                posterior_logits, prior_logits, free_nats=opts.free_bits, unimix=opts.unimix)
            kl = {"loss_model_dynamic":
                  opts.lambda_kl * opts.lambda_dynamic * dynamic.unsqueeze(-1),
                  "loss_model_representation":
                  opts.lambda_kl * opts.lambda_representation * representation.unsqueeze(-1)}
        else:
            kl = {"loss_model_kl": opts.lambda_kl * trl.categorical_kl_balanced(
                posterior_logits, prior_logits, alpha=opts.kl_alpha,
                free_bits=opts.free_bits).unsqueeze(-1)}
        target, prediction = pixels.contiguous(), reco_pixels.contiguous()
        if opts.reco_symlog:
            target, prediction = trl.symlog(target), trl.symlog(prediction)
        else:
            if not target.is_floating_point():
                target = target.float() / 255.0
            prediction = prediction.float()
        error = target - prediction
        reconstruction = error.pow(2) if opts.reco_loss == "l2" else error.abs()
        if not opts.global_average:
            reconstruction = reconstruction.reshape(*true_reward.shape[:-1], -1).sum(-1)
        heads = [reconstruction.mean().unsqueeze(-1)]
        reward = trl.two_hot_cross_entropy(reward_logits, true_reward, reward_bins)
        losses = {"loss_model_reco": opts.lambda_reco * sum(heads),  # its sum over the heads
                  "loss_model_reward": opts.lambda_reward * reward.mean().unsqueeze(-1), **kl}
        if opts.has_continue:
            target = (~terminated).float() * opts.continue_target_scale
            bce = F.binary_cross_entropy_with_logits(continue_pred.squeeze(-1), target.squeeze(-1))
            losses["loss_model_continue"] = opts.lambda_continue * bce.unsqueeze(-1)
        return losses

    return fn


def torchrl_v3_gap(options: Mapping) -> str | None:
    """Why torchrl's DreamerV3ModelLoss cannot compute the loss of ``options`` (keyword arguments
    of :func:`dreamer_v3_model_loss`), or None when it can."""
    asked = [name for name, value in TORCHRL_V3_FIXED.items() if options.get(name, value) != value]
    if not asked:
        return None
    return ("torchrl's DreamerV3ModelLoss has no "
            + ", ".join(f"{name}={options[name]!r}" for name in asked) + " (it computes "
            + ", ".join(f"{name}={TORCHRL_V3_FIXED[name]!r}" for name in asked) + ")")


def loss_fn_v3(impl: str, options: Mapping, device: str) -> Callable:
    """``impl``'s DreamerV3 loss with ``options``: a function of the :data:`V3_ARGS` that returns
    the losses by name."""
    if impl == "fused":
        return lambda *t: dreamer_v3_model_loss(*t, **options, backend="triton")
    if impl == "eager":
        return lambda *t: reference_v3.dreamer_v3_model_loss(*t, **options)
    if impl == "compiled":
        return torch.compile(lambda *t: reference_v3.dreamer_v3_model_loss(*t, **options))
    return torchrl_v3_loss_fn(V3Options(**options), device)


def _terms(losses) -> tuple[torch.Tensor, ...]:
    """The losses of one call: the Dreamer loss's tuple, or the values of the DreamerV3 loss's
    dict."""
    return tuple(losses.values()) if isinstance(losses, Mapping) else tuple(losses)


def step_fn(fn: Callable, inputs: list[torch.Tensor], mode: str) -> Callable[[], None]:
    wanted = [t for t in inputs if t.requires_grad]
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(*inputs)
    else:
        def step():
            torch.autograd.grad(_terms(fn(*inputs)), wanted)
    return step


def graphed(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` captured in a CUDA graph (after warm-up on a side stream); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def timed(steps: list[Callable[[], None]], cuda: bool) -> float:
    """Median milliseconds of one step, rotating through the input sets."""
    turn = [0]

    def rotate():
        steps[turn[0] % len(steps)]()
        turn[0] += 1

    if cuda:
        from triton.testing import do_bench
        return float(do_bench(rotate, warmup=50, rep=300, return_mode="median"))
    rotate()
    times = []
    for _ in range(CPU_REPEATS):
        start = time.perf_counter()
        rotate()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_gbps() -> float:
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = timed([lambda: dst.copy_(src)], cuda=True)
    return 2 * COPY_BYTES / ms / 1e6


def fused_rtol(dtype: torch.dtype) -> float:
    """The relative error (of each loss, and of each gradient as a whole) :func:`check_fused`
    accepts against the float64 reference."""
    return 1e-4 if dtype == torch.float32 else 2e-2


def _disagreement(pairs, dtype: torch.dtype) -> str | None:
    """The first ``(what, fused, float64 reference)`` of ``pairs`` whose relative error exceeds
    :func:`fused_rtol`, said in words; None when all agree."""
    rtol = fused_rtol(dtype)
    for what, a, b in pairs:
        err = float((a.detach().double() - b.detach()).norm() / b.detach().norm().clamp_min(1e-30))
        if not math.isfinite(err) or err > rtol:
            return f"{what}: relative error {err:.2e} > {rtol:.0e}"
    return None


def check_fused(inputs: list[torch.Tensor], reco_loss: str) -> str | None:
    """Why the fused result differs from the float64 reference, or None when it agrees."""
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    want = [t for t in leaves if t.requires_grad]
    ref = reference.dreamer_model_loss(*leaves, reco_loss=reco_loss)
    ref_grads = torch.autograd.grad(ref, want)
    out = dreamer_model_loss(*inputs, reco_loss=reco_loss, backend="triton")
    grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad])
    return _disagreement([*zip(("loss_kl", "loss_reco", "loss_reward"), out, ref),
                          *zip(("grad",) * 6, grads, ref_grads)], inputs[0].dtype)


def check_fused_v3(inputs: list[torch.Tensor], options: Mapping) -> str | None:
    """Why the fused DreamerV3 result (each loss, and the gradient of each input that needs one)
    differs from the float64 reference, or None when it agrees."""
    leaves = [t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t
              for t in inputs]
    ref = reference_v3.dreamer_v3_model_loss(*leaves, **options)
    ref_grads = torch.autograd.grad(_terms(ref), [t for t in leaves if t.requires_grad])
    out = dreamer_v3_model_loss(*inputs, **options, backend="triton")
    grads = torch.autograd.grad(_terms(out), [t for t in inputs if t.requires_grad])
    names = [f"grad {name}" for name, t in zip(V3_ARGS, inputs) if t.requires_grad]
    return _disagreement([*((name, out[name], ref[name]) for name in ref),
                          *zip(names, grads, ref_grads)], inputs[0].dtype)


#: The module ``python -m`` runs when the command restarts itself (see :func:`main`).
MODULE = "fused_dreamer_loss.bench"


def checks_fused_on_cpu(args: argparse.Namespace) -> bool:
    """Whether this run checks the fused kernels on the CPU (through Triton's interpreter): the
    fused implementation asked for, on the CPU (no CUDA device, or ``--device cpu``), in the loss
    workload or the V3 train step (the V1 train step skips its fused row on a CPU)."""
    return (args.device == "cpu" and "fused" in args.impl
            and (args.workload == "loss" or args.loss == "v3"))


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
    yet; :func:`main` otherwise restarts the command with the variable set.
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


def _count_launches_or_none(row: Row, step: Callable[[], None], cuda: bool) -> None:
    try:
        launched = count_launches(step, cuda)
        row.launches = sum(launched.values())
        row.extra["launched"] = launched
    except Exception as exc:  # the profiler may be unavailable (e.g. CUPTI): a missing figure
        row.extra["launches_error"] = f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class V1Case:
    """What a ``--loss v1`` run measures: the Dreamer loss with one reconstruction distance."""

    reco_loss: str
    loss = "v1"
    losses = 3

    def row(self, impl: str, preset: str, dtype_name: str, mode: str) -> Row:
        batch, steps_, image, latent_dim = PRESETS[preset]
        return Row(impl, preset, batch * steps_, list(image), latent_dim, dtype_name, mode, None,
                   None, None)

    def describe(self, preset: str) -> str:
        batch, steps_, image, latent_dim = PRESETS[preset]
        return f"{batch * steps_} frames of {'x'.join(map(str, image))}, {latent_dim} latents"

    def model_bytes(self, preset: str, itemsize: int, mode: str) -> int:
        batch, steps_, image, latent_dim = PRESETS[preset]
        return minimal_bytes(batch * steps_, math.prod(image), latent_dim, itemsize, mode)

    def inputs(self, preset: str, dtype: torch.dtype, device: str, seed: int) -> list[torch.Tensor]:
        return make_inputs(preset, dtype, device, seed)

    def check(self, inputs: list[torch.Tensor]) -> str | None:
        return check_fused(inputs, self.reco_loss)

    def fn(self, impl: str, device: str) -> Callable:
        return loss_fn(impl, self.reco_loss)

    def not_applicable(self, impl: str) -> str | None:
        return None

    def train_step(self, impl: str, preset: str, dtype_name: str, device: str) -> Row:
        return run_train_step(impl, preset, dtype_name, self.reco_loss, device)

    def checked(self) -> str:
        return "the three losses and the six gradients"


@dataclass(frozen=True)
class V3Case:
    """What a ``--loss v3`` run measures: the DreamerV3 loss with the options of ``convention``
    (:data:`V3_CONVENTIONS`) and one reconstruction distance."""

    convention: str
    reco_loss: str
    loss = "v3"

    @property
    def options(self) -> dict:
        """The keyword arguments of :func:`dreamer_v3_model_loss`."""
        return {**V3_CONVENTIONS[self.convention], "reco_loss": self.reco_loss}

    @property
    def opts(self) -> V3Options:
        return V3Options(**self.options)

    @property
    def losses(self) -> int:
        return 2 + (2 if self.opts.kl_mode == "separate" else 1) + self.opts.has_continue

    def row(self, impl: str, preset: str, dtype_name: str, mode: str) -> Row:
        batch, steps_, image, categoricals, classes = V3_PRESETS[preset]
        return Row(impl, preset, batch * steps_, list(image), categoricals * classes, dtype_name,
                   mode, None, None, None, loss="v3", convention=self.convention,
                   latent_shape=[categoricals, classes])

    def describe(self, preset: str) -> str:
        batch, steps_, image, categoricals, classes = V3_PRESETS[preset]
        return (f"{batch * steps_} frames of {'x'.join(map(str, image))} uint8, "
                f"{categoricals}x{classes} categorical latents, {self.opts.reward_width} reward "
                f"bins, continue {'on' if self.opts.has_continue else 'off'} "
                f"({self.convention})")

    def model_bytes(self, preset: str, itemsize: int, mode: str) -> int:
        batch, steps_, image, categoricals, classes = V3_PRESETS[preset]
        return minimal_bytes_v3(batch * steps_, math.prod(image), categoricals * classes,
                                self.opts.reward_width, self.opts.has_continue, itemsize, mode)

    def inputs(self, preset: str, dtype: torch.dtype, device: str, seed: int) -> list[torch.Tensor]:
        return make_v3_inputs(preset, dtype, device, seed, self.opts)

    def check(self, inputs: list[torch.Tensor]) -> str | None:
        return check_fused_v3(inputs, self.options)

    def fn(self, impl: str, device: str) -> Callable:
        return loss_fn_v3(impl, self.options, device)

    def not_applicable(self, impl: str) -> str | None:
        return torchrl_v3_gap(self.options) if impl == "torchrl" else None

    def train_step(self, impl: str, preset: str, dtype_name: str, device: str) -> Row:
        return run_train_step_v3(impl, preset, dtype_name, self, device)

    def checked(self) -> str:
        needs_grad = V3_NEEDS_GRAD if self.opts.has_continue else V3_NEEDS_GRAD[:-2]
        return f"the {self.losses} losses and the {sum(needs_grad)} gradients"


def run_config(impl, preset, dtype_name, mode, case, device, copy,
               cuda_graph: bool = False) -> Row:
    """One row of the loss workload: ``impl`` on ``case``'s loss (:class:`V1Case`,
    :class:`V3Case`) at ``preset``."""
    dtype = DTYPES[dtype_name]
    row = case.row(impl, preset, dtype_name, mode)
    nbytes = case.model_bytes(preset, dtype.itemsize, mode)
    row.model_bytes = nbytes
    cuda = device == "cuda"
    why_not = unavailable(case, impl, cuda)
    if why_not:
        row.status = why_not
        return row
    sets = [case.inputs(preset, dtype, device, seed) for seed in range(ROTATION if cuda else 1)]
    if impl == "fused":
        wrong = case.check(sets[0])
        if wrong:
            row.status = f"wrong: {wrong}"
            return row
    fn = case.fn(impl, device)
    steps = [step_fn(fn, inputs, mode) for inputs in sets]
    if impl == "fused" and not cuda:
        # Through Triton's interpreter: right answers and the launch count, no speed.
        row.status = "correct (interpreter); not timed (needs a CUDA GPU)"
        row.extra["interpreter"] = True
        _count_launches_or_none(row, steps[0], cuda)
        return row
    if impl == "compiled":
        # On a CPU, name inductor's C++ kernels in the profiler, so that they can be counted.
        names = {} if cuda else {"cpp.enable_kernel_profile": True}
        import torch._inductor.config as inductor_config
        with inductor_config.patch(names):
            start = time.perf_counter()
            steps[0]()
            if cuda:
                torch.cuda.synchronize()
            row.compile_s = time.perf_counter() - start
    else:
        steps[0]()  # warm up: first-call work (lazy imports, allocator) is not a step's launches
    _count_launches_or_none(row, steps[0], cuda)
    if cuda:
        steps[0]()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        steps[0]()
        torch.cuda.synchronize()
        row.peak_mem_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    if cuda_graph:
        try:
            steps = [graphed(step) for step in steps]
        except Exception as exc:  # report, do not hide, an implementation that cannot be captured
            row.status = f"skipped: CUDA graph capture failed: {type(exc).__name__}"
            return row
        row.extra["cuda_graph"] = True
    row.median_ms = timed(steps, cuda)
    row.gbps = nbytes / row.median_ms / 1e6
    if copy:
        row.frac_copy = row.gbps / copy
    return row


def _time_train_step(row: Row, steps: list[Callable[[], object]], cuda: bool) -> None:
    """Time training ``steps`` (run once already, so that the optimizer holds its state) into
    ``row``; on CUDA also the peak memory a step allocates beyond what is held between steps."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        steps[0]()
        torch.cuda.synchronize()
        row.peak_mem_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    row.median_ms = timed(steps, cuda)


def run_train_step(impl: str, preset: str, dtype_name: str, reco_loss: str, device: str) -> Row:
    """One optimizer step of :class:`~fused_dreamer_loss.models.ConvWorldModel` with the loss of
    ``impl`` (fused or eager), under autocast for half dtypes."""
    from ..world_model_v1.models import ConvWorldModel

    batch, steps_, image, latent_dim = PRESETS[preset]
    cuda = device == "cuda"
    row = Row(impl, preset, batch * steps_, list(image), latent_dim, dtype_name, "train-step",
              None, None, None, extra={"workload": "train-step"})
    if impl not in ("fused", "eager"):
        row.status = "skipped: train-step compares fused with eager"
        return row
    if impl == "fused" and not cuda:
        row.status = "skipped: a speed figure for the fused kernels needs a CUDA GPU"
        return row
    skipped = skip_reason(impl, cuda)
    if skipped:
        row.status = skipped
        return row
    torch.manual_seed(0)
    model = ConvWorldModel(image, latent_dim).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    dtype = DTYPES[dtype_name]
    loss = loss_fn(impl, reco_loss)

    def frames_and_rewards(seed):
        g = torch.Generator(device).manual_seed(seed)
        return (torch.rand(batch, steps_, *image, generator=g, device=device),
                torch.randn(batch, steps_, 1, generator=g, device=device))

    sets = [frames_and_rewards(seed) for seed in range(ROTATION if cuda else 1)]

    def make_step(pixels, reward):
        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                pm, ps, qm, qs, reco, pred_reward = model(pixels)
            terms = loss(pm, ps, qm, qs, pixels, reco, reward, pred_reward)
            sum(t.float() for t in terms).backward()
            optimizer.step()
        return step

    steps = [make_step(*s) for s in sets]
    steps[0]()
    _time_train_step(row, steps, cuda)
    return row


def make_v3_batch(preset: str, device: str, seed: int):
    """A replay-buffer batch of ``preset`` for the V3 train step, as the loss modules read it: under
    ``"next"``, uint8 frames, rewards ~ 3·N(0, 1) (float32) and terminal flags (5%)."""
    from tensordict import TensorDict

    batch, steps_, image, _, _ = V3_PRESETS[preset]
    g = torch.Generator(device).manual_seed(seed)
    B = (batch, steps_)
    return TensorDict({"next": {
        "pixels": torch.randint(0, 256, (*B, *image), generator=g, device=device,
                                dtype=V3_TARGET_DTYPES["pixels"]),
        "reward": torch.randn(*B, 1, generator=g, device=device) * 3.0,
        "terminated": torch.rand(*B, 1, generator=g, device=device) < 0.05,
    }}, batch_size=list(B), device=device)


def world_model_loss_inputs(outputs, opts: V3Options) -> list[torch.Tensor]:
    """The arguments of :func:`dreamer_v3_model_loss` (:data:`V3_ARGS`) that a loss module read
    from ``outputs`` (its world model's output, detached): the network outputs as new leaves
    that need a gradient."""
    keys = ("posterior_logits", "prior_logits", "pixels", "reco_pixels", "true_reward",
            "reward_logits", "continue_pred", "terminated")
    inputs = [outputs["next", key].detach().requires_grad_(needs_grad) for key, needs_grad
              in zip(keys, V3_NEEDS_GRAD)]
    return inputs if opts.has_continue else inputs[:-2]


def run_train_step_v3(impl: str, preset: str, dtype_name: str, case: V3Case, device: str) -> Row:
    """One optimizer step (Adam) of :class:`~fused_dreamer_loss.models_v3.CategoricalWorldModel`
    (:data:`V3_WORLD_MODELS`, the latent of ``preset``) through the loss module of ``impl`` with
    ``case``'s options: :class:`~fused_dreamer_loss.FusedDreamerV3ModelLoss` with backend triton
    (fused) or torch (eager), or torchrl's DreamerV3ModelLoss (n/a where it lacks the options).
    The module's forward (world model and loss) runs under autocast for half dtypes.

    The fused row is checked first: the fused loss of the world model's outputs in the first step
    against the float64 reference (:func:`check_fused_v3`). On a CPU it is only checked (through
    Triton's interpreter), not timed."""
    from ..world_model_v3.models import make_world_model_v3
    from ..world_model_v3.module import FusedDreamerV3ModelLoss

    _, _, image, categoricals, classes = V3_PRESETS[preset]
    cuda = device == "cuda"
    row = case.row(impl, preset, dtype_name, "train-step")
    row.extra["workload"] = "train-step"
    if impl not in V3_TRAIN_STEP_IMPLS:
        row.status = f"skipped: the V3 train-step compares {', '.join(V3_TRAIN_STEP_IMPLS)}"
        return row
    why_not = unavailable(case, impl, cuda)
    if why_not:
        row.status = why_not
        return row
    torch.manual_seed(0)
    world_model = make_world_model_v3(image, num_categoricals=categoricals, num_classes=classes,
                                      num_reward_bins=case.opts.num_reward_bins,
                                      **V3_WORLD_MODELS[preset])
    row.extra["world_model"] = {**V3_WORLD_MODELS[preset],
                                "parameters": sum(p.numel() for p in world_model.parameters())}
    if impl == "torchrl":
        from torchrl.objectives import DreamerV3ModelLoss
        options = {k: v for k, v in case.options.items() if k not in TORCHRL_V3_FIXED}
        loss = DreamerV3ModelLoss(world_model, **options)
    else:
        loss = FusedDreamerV3ModelLoss(world_model, **case.options,
                                       backend="triton" if impl == "fused" else "torch")
    loss = loss.to(device)
    optimizer = torch.optim.Adam(loss.parameters(), lr=1e-4)
    dtype = DTYPES[dtype_name]

    def make_step(data):
        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                losses, outputs = loss(data)
            sum(losses.values()).sum().backward()
            optimizer.step()
            return outputs
        return step

    steps = [make_step(make_v3_batch(preset, device, seed))
             for seed in range(ROTATION if cuda else 1)]
    outputs = steps[0]()
    if impl == "fused":
        wrong = case.check(world_model_loss_inputs(outputs, case.opts))
        if wrong:
            row.status = f"wrong: {wrong}"
            return row
        if not cuda:
            row.status = ("correct (interpreter) on the world model's outputs; not timed (needs "
                          "a CUDA GPU)")
            row.extra["interpreter"] = True
            return row
    _time_train_step(row, steps, cuda)
    return row


#: How a figure that was not measured shows in the table.
ABSENT = "—"


def _fmt(v, fmt: str) -> str:
    return ABSENT if v is None else format(v, fmt)


def _fmt_gbps(v: float | None) -> str:
    """Bandwidth with three significant digits below 100 GB/s (a CPU's tiny preset moves less
    than 1 GB/s: not "0"), whole numbers above."""
    if v is None:
        return ABSENT
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def header(report: dict) -> str:
    """The table's first line: device, versions and what the bandwidth is compared with."""
    line = f"Device: {report['device']}; torch {report['torch']}, triton {report['triton']}"
    if report["copy_gbps"] is not None:
        line += (f"; device-to-device copy: {report['copy_gbps']:.0f} GB/s "
                 "(bytes read + written)")
    else:
        line += "; no copy bandwidth (measured on CUDA only)"
    if report.get("loss") == "v3":
        line += f"; DreamerV3 loss, {report['convention']} options"
    if report.get("cuda_graph"):
        line += "; timed as CUDA-graph replays"
    if report.get("interpreter"):
        line += "; fused kernels through Triton's interpreter: checked, not timed"
    return line + "."


def markdown(report: dict) -> str:
    lines = [
        header(report),
        "",
        "| impl | preset | dtype | mode | median ms | launches | GB/s | of copy | peak MiB "
        "| vs eager | status |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in report["results"]:
        speedup = ABSENT if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}×"
        lines.append(
            f"| {r['impl']} | {r['preset']} | {r['dtype']} | {r['mode']} "
            f"| {_fmt(r['median_ms'], '.3f')} | {_fmt(r.get('launches'), 'd')} "
            f"| {_fmt_gbps(r['gbps'])} | {_fmt(r['frac_copy'], '.0%')} "
            f"| {_fmt(r['peak_mem_mb'], '.0f')} | {speedup} | {r['status']} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    rows = [r for r in report["results"] if r["median_ms"] is not None]
    groups = sorted({(r["preset"], r["dtype"], r["mode"]) for r in rows})
    impls = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        xs, ys = [], []
        for g, group in enumerate(groups):
            for r in rows:
                if r["impl"] == impl and (r["preset"], r["dtype"], r["mode"]) == group:
                    xs.append(g + k * width)
                    ys.append(r["median_ms"])
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks([g + width * (len(impls) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels(["\n".join(g) for g in groups], fontsize=8)
    ax.set_ylabel("median ms per call (lower is better)")
    ax.set_yscale("log")
    loss = ("DreamerV3 model loss, " + report["convention"] if report.get("loss") == "v3"
            else "Dreamer model loss")
    ax.set_title(f"{loss} on {report['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def make_parser() -> argparse.ArgumentParser:
    """The command line's parser (also read by the README test, for the options it names)."""
    p = argparse.ArgumentParser(
        prog="fused-dreamer-loss-bench",
        description="Time the Dreamer model loss (V1) or the DreamerV3 model loss: fused Triton "
                    "kernels vs eager torch (our reference), torch.compile of it, and torchrl's "
                    "own code. Reports median time, bandwidth under the minimal-traffic model, "
                    "its fraction of the device's copy bandwidth, peak memory and speed-up vs "
                    "eager.")
    p.add_argument("--loss", choices=LOSSES, default="v1",
                   help="v1: the Dreamer loss (dreamer_model_loss, torchrl's DreamerModelLoss); "
                        "v3: the DreamerV3 loss (dreamer_v3_model_loss, torchrl's "
                        "DreamerV3ModelLoss) with the options of --convention. Default: v1")
    p.add_argument("--convention", choices=list(V3_CONVENTIONS),
                   help=f"--loss v3 only: whose options (fused_dreamer_loss.V3_CONVENTIONS). "
                        f"Default: {DEFAULT_CONVENTION}")
    p.add_argument("--preset", nargs="+", choices=[*PRESETS, *V3_PRESETS],
                   help="input sizes (frames = batch x time). --loss v1 (3x64x64 frames, 30 "
                        "latents unless said): tiny 4x8 of 3x16x16; small 16x50; default 200x50 "
                        "(torchrl's Dreamer); large 1024x64; v1-wide-latents 16x64 with 1024 "
                        "latents. Default: small and default on a GPU, tiny on a CPU. --loss v3 "
                        "(3x64x64 uint8 frames, S categoricals of K classes): v3-tiny 2x4 of "
                        "3x8x8, 4x4; v3 16x64, 32x32; v3-r2 16x64, 32x16 (r2dreamer); v3-large "
                        "256x64, 32x64. Default: v3 and v3-large on a GPU, v3-tiny on a CPU")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float32"],
                   help="input dtype(s); with --loss v3 the network outputs' (the targets stay "
                        "uint8 frames, float32 rewards, bool terminal flags). Default: float32")
    p.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES),
                   help="fwd: loss only, under no_grad; fwd+bwd: loss and the gradients of the "
                        "latents (v3: posterior and prior logits), decoded frames and predicted "
                        "reward (v3: reward and continue logits). Default: both")
    p.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS),
                   help="fused: our kernels (timed on CUDA; on a CPU checked and counted "
                        "through Triton's interpreter, not timed); eager: the pure-torch reference; "
                        "compiled: torch.compile of it (compile time reported apart); torchrl: "
                        "torchrl's kl_loss + distance_loss (v3: the functions of "
                        "DreamerV3ModelLoss's forward; n/a for a convention with options torchrl "
                        "lacks). Default: all")
    p.add_argument("--reco-loss", choices=DISTANCES, default="l2",
                   help="reconstruction distance (--loss v3: l2 or l1). Default: l2")
    p.add_argument("--device", choices=["cuda", "cpu"],
                   help="where to run. Default: cuda when available, else cpu (the fused kernels "
                        "then run through Triton's interpreter: checked, launches counted, "
                        "not timed)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time replays of each step captured in a CUDA graph: the device time "
                        "without Python and launch overhead (as in a graph-captured training "
                        "step). CUDA only")
    p.add_argument("--workload", choices=["loss", "train-step"], default="loss",
                   help="loss: the loss alone; train-step: one optimizer step of a small conv "
                        "world model, to see what the loss speed-up is worth in a real step: "
                        "--loss v1, fused_dreamer_loss.models with the fused vs the eager loss; "
                        "--loss v3, fused_dreamer_loss.models_v3 (the preset's categorical "
                        "latents; 16 and 32 conv channels, 256-wide embedding, GRU and heads; "
                        "narrower at v3-tiny) trained through FusedDreamerV3ModelLoss (fused: "
                        "backend triton, checked and not timed on a CPU; eager: backend torch) "
                        "and torchrl's DreamerV3ModelLoss. Default: loss")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the results table as Markdown")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of time per implementation and "
                                                   "preset (needs matplotlib)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = make_parser()
    args = p.parse_args(argv)
    if args.plot:  # refuse now, not after the whole run
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib: pip install matplotlib")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.cuda_graph and args.device != "cuda":
        p.error("--cuda-graph needs --device cuda")
    if args.loss == "v1":
        if args.convention:
            p.error("--convention: options of the DreamerV3 loss, for --loss v3")
        presets, defaults = PRESETS, (["small", "default"], ["tiny"])
    else:
        if args.reco_loss == "smooth_l1":
            p.error("--reco-loss smooth_l1: the V1 loss only; --loss v3 takes l2 or l1")
        args.convention = args.convention or DEFAULT_CONVENTION
        presets, defaults = V3_PRESETS, (["v3", "v3-large"], ["v3-tiny"])
    if args.preset is None:
        args.preset = defaults[0] if args.device == "cuda" else defaults[1]
    others = [name for name in args.preset if name not in presets]
    if others:
        hint = ("; the V1 loss's 16x64 preset with 1024 latents is now v1-wide-latents"
                if "v3" in others else "")
        p.error(f"--preset {' '.join(others)}: not a preset of --loss {args.loss} "
                f"({', '.join(presets)}){hint}")
    return args


def _progress(row: Row) -> str:
    if row.median_ms is not None:
        shown = f"{row.median_ms:.3f} ms"
        if row.compile_s is not None:
            shown += f" (compile {row.compile_s:.1f} s, apart)"
    else:
        shown = row.status
    if row.launches is not None:
        shown += f"; {row.launches} launch{'' if row.launches == 1 else 'es'}"
    return shown


def _failed_row(case, impl: str, preset: str, dtype_name: str, mode: str, exc: Exception) -> Row:
    row = case.row(impl, preset, dtype_name, mode)
    row.status = f"failed: {type(exc).__name__}: {exc}"
    return row


def failures(report: dict) -> list[str]:
    """One line per row that failed: a wrong fused result or an implementation that crashed."""
    return [f"{r['impl']} {r['preset']} {r['dtype']} {r['mode']}: {r['status']}"
            for r in report["results"] if r["status"].startswith(("wrong", "failed"))]


def run(argv: list[str] | None = None) -> dict:
    """Run the benchmark the command line describes; return the report (the ``--json`` schema).

    An implementation that raises gets a row with status ``failed: ...`` (its traceback goes to
    stderr) and the run goes on; :func:`failures` lists such rows and wrong fused results.
    """
    args = parse_args(argv)
    cuda = args.device == "cuda"
    use_interpreter(args)
    interpreter = checks_fused_on_cpu(args) and interpreting()
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    copy = copy_gbps() if cuda else None
    case = V1Case(args.reco_loss) if args.loss == "v1" else V3Case(args.convention, args.reco_loss)
    report = {"device": device_name, "torch": torch.__version__, "triton": triton_version,
              "copy_gbps": copy, "cuda_graph": args.cuda_graph, "interpreter": interpreter,
              "loss": args.loss, "convention": args.convention, "results": []}
    if cuda:
        print(f"{device_name}: copy {copy:.0f} GB/s", flush=True)
    else:
        print(f"{device_name}, no CUDA device: the pure-torch implementations are timed on this "
              "CPU.", flush=True)
        if interpreter:
            print("The fused kernels run through Triton's interpreter (TRITON_INTERPRET=1): "
                  "checked against the float64 reference, launches counted, not timed.",
                  flush=True)
    rows: list[Row] = []
    if args.workload == "train-step":
        modes = ["train-step"]

        def one(impl, preset, dtype, mode):
            return case.train_step(impl, preset, dtype, args.device)
    else:
        modes = args.mode

        def one(impl, preset, dtype, mode):
            return run_config(impl, preset, dtype, mode, case, args.device, copy,
                              args.cuda_graph)

    for preset, dtype in itertools.product(args.preset, args.dtype):
        if args.workload == "loss":
            sizes = ", ".join(
                f"{m} {case.model_bytes(preset, DTYPES[dtype].itemsize, m) / 1e6:.3g} MB"
                for m in modes)
            print(f"{preset} {dtype}: {case.describe(preset)}; modelled bytes per step (each "
                  f"input read once, each gradient written once): {sizes}", flush=True)
        else:
            print(f"{preset} {dtype}: one training step (world model forward, loss, backward, "
                  f"Adam) on {case.describe(preset)}", flush=True)
        for mode, impl in itertools.product(modes, args.impl):
            print(f"  {preset:>7} {dtype:>8} {mode:>7} {impl:>8} ...", end="", flush=True)
            try:
                row = one(impl, preset, dtype, mode)
            except Exception as exc:  # report it, go on with the others, exit non-zero
                print(" failed", flush=True)
                traceback.print_exc()
                row = _failed_row(case, impl, preset, dtype, mode, exc)
            rows.append(row)
            print(f" {_progress(row)}", flush=True)
            if cuda:
                torch.cuda.empty_cache()
    for row in rows:
        eager = next((r for r in rows if r.impl == "eager" and r.median_ms and
                      (r.preset, r.dtype, r.mode) == (row.preset, row.dtype, row.mode)), None)
        if eager and row.median_ms:
            row.speedup_vs_eager = eager.median_ms / row.median_ms
    report["results"] = [asdict(r) for r in rows]
    table = markdown(report)
    print(table)
    print("launches: kernels per step (CUDA: what the device ran; CPU: ATen operators that "
          "compute, torch.compile's C++ kernels, Triton launches). fwd+bwd includes the "
          f"{case.losses} grad-output fills of torch.autograd.grad, one per loss.")
    checked = sorted({(r.preset, r.dtype) for r in rows if r.impl == "fused" and
                      r.status.startswith("correct")})
    if checked:
        where = ", ".join(f"{p} {d}" for p, d in checked)
        rtols = ", ".join(sorted({f"{fused_rtol(DTYPES[d]):.0e}" for _, d in checked}))
        print(f"fused: correct (interpreter) on {where}: {case.checked()} agree with the float64 "
              f"reference (relative error within {rtols}).")
        print("Speed figures for the fused kernels need a CUDA GPU (the interpreter's speed says "
              "nothing about the kernels').")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(table)
    if args.plot:
        plot(report, args.plot)
    return report


def main(argv: list[str] | None = None) -> int:
    """The console script ``fused-dreamer-loss-bench``: 0 when every implementation ran and every
    fused result was right, 1 otherwise (the reasons on stderr); 2 for bad arguments.

    Without CUDA the fused kernels need Triton's interpreter, which has to be chosen before triton
    is imported (see :func:`use_interpreter`), and importing this package imported it already. So
    the command (``argv`` None: the arguments are this process's own) restarts itself once, as
    ``python -m fused_dreamer_loss.bench`` with ``TRITON_INTERPRET=1`` in its environment; the
    variable being set is what stops a second restart. Called from Python with ``argv``, it never
    restarts: the fused rows then say why they are skipped.
    """
    # The profiler behind the launch counts logs "profiler_start"/"profiler_stop" lines to stderr.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    if argv is None:
        args = parse_args(None)  # --help and bad arguments end here, before any restart
        if not use_interpreter(args):
            os.environ["TRITON_INTERPRET"] = "1"
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(sys.executable, [sys.executable, "-m", MODULE, *sys.argv[1:]])
    report = run(argv)
    failed = failures(report)
    if failed:
        print(f"fused-dreamer-loss-bench: {len(failed)} of {len(report['results'])} failed:",
              file=sys.stderr)
        for line in failed:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
