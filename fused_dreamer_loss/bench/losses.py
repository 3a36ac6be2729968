"""The losses a run measures: a *case* says, for one loss and its options, what a row is, what its
inputs are at a preset, what each implementation computes, how the fused result is checked and
what one training step of a world model trained through it is (:class:`Case`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..world_model_v3.conventions import V3_CONVENTIONS
from ..world_model_v3.validation import V3Options
from . import peers, workloads
from .presets import (PRESETS, V3_NEEDS_GRAD, V3_PRESETS, make_inputs, make_v3_inputs,
                      minimal_bytes, minimal_bytes_v3)
from .report import Row


class Case(Protocol):
    """What a run of one loss measures, as the workloads read it (a ``--loss`` of
    :data:`~.registry.LOSSES` makes one from the parsed arguments). Presets are names of the
    loss's entry; ``dtype_name`` a key of :data:`~.presets.DTYPES`; ``impl`` one of
    :data:`~.presets.IMPLS`; ``mode`` ``"fwd"``, ``"fwd+bwd"`` or a workload's own."""

    #: The ``--loss`` name, and how many losses one call returns (autograd fills one grad output
    #: per loss in a fwd+bwd step).
    loss: str
    losses: int

    def row(self, impl: str, preset: str, dtype_name: str, mode: str) -> Row:
        """An empty row (no figure, status ok) that names the case."""

    def describe(self, preset: str) -> str:
        """The preset's sizes in words, for the progress output."""

    def model_bytes(self, preset: str, itemsize: int, mode: str) -> int:
        """Bytes one step moves under the minimal-traffic model."""

    def inputs(self, preset: str, dtype: torch.dtype, device: str, seed: int) -> list[torch.Tensor]:
        """The loss's arguments at ``preset``; those that need a gradient require it."""

    def check(self, inputs: list[torch.Tensor]) -> str | None:
        """Why the fused result on ``inputs`` differs from the float64 reference, or None."""

    def fn(self, impl: str, device: str) -> Callable:
        """``impl``'s loss: a function of :meth:`inputs` that returns the losses (a tuple, or a
        dict by name)."""

    def not_applicable(self, impl: str) -> str | None:
        """Why ``impl`` cannot compute this loss with these options, or None."""

    def train_step(self, impl: str, preset: str, dtype_name: str, device: str) -> Row:
        """The row of ``--workload train-step`` (status ``"n/a: ..."`` where the loss has none)."""

    def checked(self) -> str:
        """What :meth:`check` compares, in words ("the three losses and the six gradients")."""


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
        return peers.check_fused(inputs, self.reco_loss)

    def fn(self, impl: str, device: str) -> Callable:
        return peers.loss_fn(impl, self.reco_loss)

    def not_applicable(self, impl: str) -> str | None:
        return None

    def train_step(self, impl: str, preset: str, dtype_name: str, device: str) -> Row:
        return workloads.run_train_step(impl, preset, dtype_name, self, device)

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
        """The keyword arguments of :func:`~fused_dreamer_loss.dreamer_v3_model_loss`."""
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
        return peers.check_fused_v3(inputs, self.options)

    def fn(self, impl: str, device: str) -> Callable:
        return peers.loss_fn_v3(impl, self.options, device)

    def not_applicable(self, impl: str) -> str | None:
        return peers.torchrl_v3_gap(self.options) if impl == "torchrl" else None

    def train_step(self, impl: str, preset: str, dtype_name: str, device: str) -> Row:
        return workloads.run_train_step_v3(impl, preset, dtype_name, self, device)

    def checked(self) -> str:
        needs_grad = V3_NEEDS_GRAD if self.opts.has_continue else V3_NEEDS_GRAD[:-2]
        return f"the {self.losses} losses and the {sum(needs_grad)} gradients"

