"""The tables a run is read from: the losses (``--loss``) and the workloads (``--workload``) the
command offers. Adding one is a module and an entry here (see the package's docstring)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable

from .losses import Case, V1Case, V3Case
from .presets import DEFAULT_CONVENTION, PRESETS, V3_PRESETS
from .report import Row
from .host import workload_rows as host_rows
from .workloads import Run, loss_rows, train_step_rows


def _accepts_all(args: argparse.Namespace) -> str | None:
    return None


@dataclass(frozen=True)
class Loss:
    """A ``--loss`` choice."""

    #: The run's loss from the parsed command line: a :class:`~.losses.Case`.
    case: Callable[[argparse.Namespace], Case]
    #: Its ``--preset`` names (no two losses share one) and the sizes each stands for.
    presets: Mapping[str, tuple]
    #: Its presets when ``--preset`` is not given: on a GPU, on a CPU.
    gpu_presets: tuple[str, ...]
    cpu_presets: tuple[str, ...]
    #: Its part of ``--help``: of ``--loss`` (what it times) and of ``--preset`` (its sizes).
    help: str
    preset_help: str
    #: Completes the loss's own defaults in the parsed command line and says what it refuses
    #: (an argparse error message), or None.
    settle: Callable[[argparse.Namespace], str | None] = _accepts_all
    #: Former names of its presets, each with the hint the error for that name gives.
    renamed: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Workload:
    """A ``--workload`` choice."""

    #: The run's report rows (:class:`~.report.Row`), from :class:`~.workloads.Run` (the parsed
    #: command line, the loss, the copy bandwidth); :meth:`~.workloads.Run.each` makes one row per
    #: preset, dtype, mode and implementation.
    rows: Callable[[Run], list[Row]]
    #: Its part of ``--workload --help``.
    help: str


def _learner_rows(run: Run) -> list[Row]:
    # Imported when run: ``python -m fused_dreamer_loss.bench.learner`` runs that module as
    # __main__, which the package must not have imported before.
    from .learner import learner_rows
    return learner_rows(run)


def _settle_v1(args: argparse.Namespace) -> str | None:
    if args.convention:
        return "--convention: options of the DreamerV3 loss, for --loss v3"
    return None


def _settle_v3(args: argparse.Namespace) -> str | None:
    if args.reco_loss == "smooth_l1":
        return "--reco-loss smooth_l1: the V1 loss only; --loss v3 takes l2 or l1"
    args.convention = args.convention or DEFAULT_CONVENTION
    return None


LOSSES: dict[str, Loss] = {
    "v1": Loss(
        lambda args: V1Case(args.reco_loss), PRESETS, ("small", "default"), ("tiny",),
        help="the Dreamer loss (dreamer_model_loss, torchrl's DreamerModelLoss)",
        preset_help="(3x64x64 frames, 30 latents unless said): tiny 4x8 of 3x16x16; small 16x50; "
                    "default 200x50 (torchrl's Dreamer); large 1024x64; v1-wide-latents 16x64 "
                    "with 1024 latents",
        settle=_settle_v1,
        renamed={"v3": "the V1 loss's 16x64 preset with 1024 latents is now v1-wide-latents"}),
    "v3": Loss(
        lambda args: V3Case(args.convention, args.reco_loss), V3_PRESETS, ("v3", "v3-large"),
        ("v3-tiny",),
        help="the DreamerV3 loss (dreamer_v3_model_loss, torchrl's DreamerV3ModelLoss) with the "
             "options of --convention",
        preset_help="(3x64x64 uint8 frames, S categoricals of K classes): v3-tiny 2x4 of 3x8x8, "
                    "4x4; v3 16x64, 32x32; v3-r2 16x64, 32x16 (r2dreamer); v3-large 256x64, 32x64",
        settle=_settle_v3),
}

WORKLOADS: dict[str, Workload] = {
    "loss": Workload(loss_rows, help="the loss alone"),
    "train-step": Workload(
        train_step_rows,
        help="one optimizer step of a small conv world model, to see what the loss speed-up is "
             "worth in a real step: --loss v1, fused_dreamer_loss.models with the fused vs the "
             "eager loss; --loss v3, fused_dreamer_loss.models_v3 (the preset's categorical "
             "latents; 16 and 32 conv channels, 256-wide embedding, GRU and heads; narrower at "
             "v3-tiny) trained through FusedDreamerV3ModelLoss (fused: backend triton; eager: "
             "backend torch) and torchrl's DreamerV3ModelLoss. The fused row is first checked on "
             "the world model's outputs against the float64 reference; on a CPU it is checked "
             "(through Triton's interpreter), not timed"),
    "host": Workload(
        host_rows,
        help="host time per forward + backward (launch-bound: the host is what a step waits "
             "for): the fused functional call and module of --loss at its preset (V1 small, V3 "
             "v3) against torchrl's module, torchrl's math and the eager reference at tiny "
             "shapes, as ratios, and where the fused call's host time goes "
             "(fused_dreamer_loss.bench.host). On a CPU the kernels are compiled for sm_90 and "
             "every launch goes through Triton's dispatch with only the driver's launch stubbed; "
             "on a GPU they launch, and each step is also timed as a CUDA-graph replay"),
    "learner": Workload(
        _learner_rows,
        help="one update of torchrl's DreamerV3 learner (DreamerV3Loss and "
             "DreamerV3OptimizationStepper; --loss v3) with torchrl's world-model loss "
             "(torchrl) or FusedDreamerV3ModelLoss (fused: backend triton; eager: backend "
             "torch): eager and compiled, or compiled and captured in a CUDA graph with "
             "--cuda-graph (torchrl's defaults on CUDA); time, launches and host syncs per "
             "update, and the world-model loss's share of them"),
}
