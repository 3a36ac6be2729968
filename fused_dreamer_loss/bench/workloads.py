"""The workloads: what a run times (``--workload``). ``loss``: the loss alone, forward or forward
and backward (:func:`run_config`); ``train-step``: one optimizer step of a small world model trained
through the loss (:func:`run_train_step` for V1, :func:`run_train_step_v3` for V3). :class:`Run`
is what every workload is handed, and :meth:`Run.each` the loop over presets, dtypes, modes and
implementations that makes its rows."""

from __future__ import annotations

import argparse
import itertools
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from . import peers
from .peers import TORCHRL_V3_FIXED
from .presets import (DTYPES, NEEDS_GRAD, PRESETS, ROTATION, V3_PRESETS,
                      V3_TRAIN_STEP_IMPLS, V3_WORLD_MODELS, V3_NEEDS_GRAD, make_v3_batch)
from .report import Row, progress
from .timing import (count_launches_into, graphed, peak_mem_mb, skip_reason, step_fn, time_into,
                     unavailable)

if TYPE_CHECKING:
    from ..world_model_v3.validation import V3Options
    from .losses import Case, V1Case, V3Case


@dataclass(frozen=True)
class Run:
    """What a workload is handed: the parsed command line (``args``, completed by
    :func:`.cli.parse_args`: ``preset``, ``dtype``, ``mode``, ``impl`` lists, ``device``,
    ``cuda_graph``, ...), the run's loss (``case``: a :class:`~.losses.Case` made by its entry of
    :data:`~.registry.LOSSES`) and the device's copy bandwidth (``copy_gbps``, GB/s; None off
    CUDA)."""

    args: argparse.Namespace
    case: Case
    copy_gbps: float | None

    @property
    def device(self) -> str:
        return self.args.device

    @property
    def cuda(self) -> bool:
        return self.args.device == "cuda"

    def each(self, modes: list[str], one: Callable[[str, str, str, str], Row],
             describe: Callable[[str, str], str]) -> list[Row]:
        """The rows of ``one(impl, preset, dtype_name, mode)`` for every preset and dtype of the
        command line (``describe(preset, dtype_name)`` printed before each) and every mode of
        ``modes`` and implementation of ``--impl``, each with a progress line. A row that raises
        becomes a row of status ``failed: ...`` (its traceback on stderr) and the run goes on."""
        rows = []
        for preset, dtype in itertools.product(self.args.preset, self.args.dtype):
            print(f"{preset} {dtype}: {describe(preset, dtype)}", flush=True)
            for mode, impl in itertools.product(modes, self.args.impl):
                print(f"  {preset:>7} {dtype:>8} {mode:>7} {impl:>8} ...", end="", flush=True)
                try:
                    row = one(impl, preset, dtype, mode)
                except Exception as exc:  # report it, go on with the others, exit non-zero
                    print(" failed", flush=True)
                    traceback.print_exc()
                    row = self.case.row(impl, preset, dtype, mode)
                    row.status = f"failed: {type(exc).__name__}: {exc}"
                rows.append(row)
                print(f" {progress(row)}", flush=True)
                if self.cuda:
                    torch.cuda.empty_cache()
        return rows


def loss_rows(run: Run) -> list[Row]:
    """``--workload loss``: a row per mode of ``--mode`` (:func:`run_config`)."""
    case = run.case

    def describe(preset, dtype):
        sizes = ", ".join(f"{m} {case.model_bytes(preset, DTYPES[dtype].itemsize, m) / 1e6:.3g} MB"
                          for m in run.args.mode)
        return (f"{case.describe(preset)}; modelled bytes per step (each input read once, each "
                f"gradient written once): {sizes}")

    return run.each(run.args.mode, lambda impl, preset, dtype, mode: run_config(
        impl, preset, dtype, mode, case, run.device, run.copy_gbps, run.args.cuda_graph), describe)


def train_step_rows(run: Run) -> list[Row]:
    """``--workload train-step``: a row of mode ``train-step`` (the case's
    :meth:`~.losses.Case.train_step`)."""
    return run.each(["train-step"], lambda impl, preset, dtype, mode: run.case.train_step(
        impl, preset, dtype, run.device), lambda preset, dtype: (
        "one training step (world model forward, loss, backward, Adam) on "
        f"{run.case.describe(preset)}"))


def run_config(impl, preset, dtype_name, mode, case, device, copy,
               cuda_graph: bool = False) -> Row:
    """One row of the loss workload: ``impl`` on ``case``'s loss (:class:`~.losses.V1Case`,
    :class:`~.losses.V3Case`) at ``preset``."""
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
        count_launches_into(row, steps[0], cuda)
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
    count_launches_into(row, steps[0], cuda)
    if cuda:
        steps[0]()
        row.peak_mem_mb = peak_mem_mb(steps[0])
    if cuda_graph:
        try:
            steps = [graphed(step) for step in steps]
        except Exception as exc:  # report, do not hide, an implementation that cannot be captured
            row.status = f"skipped: CUDA graph capture failed: {type(exc).__name__}"
            return row
        row.extra["cuda_graph"] = True
    time_into(row, steps, cuda)
    row.gbps = nbytes / row.median_ms / 1e6
    if copy:
        row.frac_copy = row.gbps / copy
    return row


def _time_train_step(row: Row, steps: list[Callable[[], object]], cuda: bool) -> None:
    """Time training ``steps`` (run once already, so that the optimizer holds its state) into
    ``row``; on CUDA also the peak memory a step allocates beyond what is held between steps."""
    if cuda:
        row.peak_mem_mb = peak_mem_mb(steps[0])
    time_into(row, steps, cuda)


def _checked_not_timed(row: Row, case: Case, inputs: list[torch.Tensor], cuda: bool) -> bool:
    """Check the fused loss of a train step's world-model outputs (``inputs``, the loss's
    arguments) against the float64 reference into ``row``; True when that is the row's result: a
    wrong loss, or a right one on a CPU (checked through Triton's interpreter, not timed)."""
    wrong = case.check(inputs)
    if wrong:
        row.status = f"wrong: {wrong}"
        return True
    if not cuda:
        row.status = ("correct (interpreter) on the world model's outputs; not timed (needs a "
                      "CUDA GPU)")
        row.extra["interpreter"] = True
        return True
    return False


def run_train_step(impl: str, preset: str, dtype_name: str, case: V1Case, device: str) -> Row:
    """One optimizer step of :class:`~fused_dreamer_loss.models.ConvWorldModel` with the loss of
    ``impl`` (fused or eager), under autocast for half dtypes.

    The fused row is checked first: the fused loss of the world model's outputs in the first step
    against the float64 reference (:func:`.peers.check_fused`). On a CPU it is only checked
    (through Triton's interpreter), not timed."""
    from ..world_model_v1.models import ConvWorldModel

    batch, steps_, image, latent_dim = PRESETS[preset]
    cuda = device == "cuda"
    row = case.row(impl, preset, dtype_name, "train-step")
    row.extra["workload"] = "train-step"
    if impl not in ("fused", "eager"):
        row.status = "skipped: train-step compares fused with eager"
        return row
    skipped = skip_reason(impl, cuda)
    if skipped:
        row.status = skipped
        return row
    torch.manual_seed(0)
    model = ConvWorldModel(image, latent_dim).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    dtype = DTYPES[dtype_name]
    loss = peers.loss_fn(impl, case.reco_loss)

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
            inputs = [pm, ps, qm, qs, pixels, reco, reward, pred_reward]
            sum(t.float() for t in loss(*inputs)).backward()
            optimizer.step()
            return inputs
        return step

    steps = [make_step(*s) for s in sets]
    inputs = steps[0]()
    if impl == "fused" and _checked_not_timed(
            row, case, [t.detach().requires_grad_(n) for t, n in zip(inputs, NEEDS_GRAD)], cuda):
        return row
    _time_train_step(row, steps, cuda)
    return row


def world_model_loss_inputs(outputs, opts: V3Options) -> list[torch.Tensor]:
    """The arguments of :func:`~fused_dreamer_loss.dreamer_v3_model_loss`
    (:data:`~.presets.V3_ARGS`) that a loss module read from ``outputs`` (its world model's output,
    detached): the network outputs as new leaves that need a gradient."""
    keys = ("posterior_logits", "prior_logits", "pixels", "reco_pixels", "true_reward",
            "reward_logits", "continue_pred", "terminated")
    inputs = [outputs["next", key].detach().requires_grad_(needs_grad) for key, needs_grad
              in zip(keys, V3_NEEDS_GRAD)]
    return inputs if opts.has_continue else inputs[:-2]


def run_train_step_v3(impl: str, preset: str, dtype_name: str, case: V3Case, device: str) -> Row:
    """One optimizer step (Adam) of :class:`~fused_dreamer_loss.models_v3.CategoricalWorldModel`
    (:data:`~.presets.V3_WORLD_MODELS`, the latent of ``preset``) through the loss module of
    ``impl`` with ``case``'s options: :class:`~fused_dreamer_loss.FusedDreamerV3ModelLoss` with
    backend triton (fused) or torch (eager), or torchrl's DreamerV3ModelLoss (n/a where it lacks
    the options). The module's forward (world model and loss) runs under autocast for half dtypes.

    The fused row is checked first: the fused loss of the world model's outputs in the first step
    against the float64 reference (:func:`.peers.check_fused_v3`). On a CPU it is only checked
    (through Triton's interpreter), not timed."""
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
    if impl == "fused" and _checked_not_timed(
            row, case, world_model_loss_inputs(outputs, case.opts), cuda):
        return row
    _time_train_step(row, steps, cuda)
    return row

