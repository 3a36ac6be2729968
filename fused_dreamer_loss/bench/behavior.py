"""``--loss v3-behavior``: the DreamerV3 behaviour math after the networks (λ-returns, weights,
return normalisation, actor, critic with its slow regulariser, replay value) from one imagined
rollout, as :func:`~fused_dreamer_loss.behavior_v3.dreamer_v3_behavior_loss` computes it:

- ``fused``: its Triton kernels (four launches forward and backward);
- ``eager``: its pure-torch reference; ``compiled``: ``torch.compile`` of the reference;
- ``torchrl``: torchrl 0.14's own code for the same math (``DreamerV3ActorLoss.lambda_target``,
  its weights, ``_return_scale`` over a ``PercentileValueNorm``, its actor expression,
  ``two_hot_cross_entropy`` / ``two_hot_decode`` and ``_replay_value_target``): n/a for a
  convention with knobs torchrl lacks.

Every row counts the launches of one step (:func:`.timing.count_launches`) and its host
synchronisations (:func:`count_syncs`: the ATen ops that make the host wait for a CUDA device,
counted on any machine); on CUDA it is timed. Run the whole table with
``python -m fused_dreamer_loss.bench.behavior`` (:func:`rows` from Python), or the package's
command with ``--loss v3-behavior``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch
import torch.utils._python_dispatch

from ..behavior_v3 import (BEHAVIOR_CONVENTIONS, dreamer_v3_actor_loss, dreamer_v3_behavior_loss,
                           dreamer_v3_value_loss, lambda_returns, replay_value_loss, return_scale)
from . import peers
from .presets import BEHAVIOR_PRESETS, DEFAULT_BEHAVIOR_CONVENTION, DTYPES, IMPLS
from .report import Row
from .timing import interpreting, step_fn
from .workloads import run_config

DEFAULT_CONVENTION = DEFAULT_BEHAVIOR_CONVENTION
#: This module, as ``python -m`` runs it.
MODULE = "fused_dreamer_loss.bench.behavior"
#: The conventions torchrl's code computes (the others switch knobs it lacks).
TORCHRL_CONVENTIONS = ("torchrl", "torchrl-recipe", "dreamerv3-2024")
#: The loss's arguments, in the order of :meth:`BehaviorCase.inputs`.
INPUTS = ("reward", "next_value", "value_pred", "low", "high", "continuation",
          "root_continuation", "baseline", "log_prob", "entropy", "slow_value",
          "replay_value_pred", "replay_reward", "replay_done", "replay_terminated",
          "replay_slow_value")
#: ATen ops that make the host wait for a CUDA device (a value read back, a data-dependent
#: shape); a copy between the host and the device counts too (:class:`SyncCounter`).
SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "masked_select", "unique",
            "_unique2", "repeat_interleave", "equal"}


class SyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ATen calls that synchronise the host with a CUDA device: :data:`SYNC_OPS` and
    copies between a CPU and a device tensor (on a CPU-only machine, copies cannot be told apart:
    the ops alone count, which is what would sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.names: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
        if name in SYNC_OPS or (name in ("copy_", "_to_copy") and len(devices) > 1):
            self.count += 1
            self.names[name] = self.names.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def count_syncs(step: Callable[[], None]) -> tuple[int, dict[str, int]]:
    """Host synchronisations of one call of ``step`` (:class:`SyncCounter`)."""
    counter = SyncCounter()
    with counter:
        step()
    return counter.count, counter.names


def make_inputs(preset: str, dtype: torch.dtype, device: str, seed: int,
                options: dict) -> list[torch.Tensor]:
    """Random arguments at ``preset`` (:data:`INPUTS` order): rewards and values ~ 3·N(0, 1),
    continuations in (0.9, 1) with terminal and truncated steps, logits ~ 2·N(0, 1); those the
    convention differentiates require grad."""
    batch, time, H, R = BEHAVIOR_PRESETS[preset]
    N, width = batch * time, R if options["value_loss"] == "two_hot" else 1
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0, grad=False):
        t = (torch.randn(*shape, generator=g) * scale + shift).to(dtype).to(device)
        return t.requires_grad_(grad)

    reparam = not options["use_reinforce"]
    cont = (0.9 + 0.1 * torch.rand(N, H, 1, generator=g))
    cont[::7, H // 2] = 0.0
    cont = cont.to(dtype).to(device)
    root = torch.cat([torch.full_like(cont[:, :1], 0.997), cont[:, :-1]], 1)
    flags = torch.rand(batch, time, 1, generator=g) < 0.05
    return [rand(N, H, 1, scale=3.0, grad=reparam), rand(N, H, 1, scale=3.0, grad=reparam),
            rand(N, H, width, scale=2.0, grad=True), torch.zeros(1, device=device),
            torch.zeros(1, device=device), cont.clone().requires_grad_(reparam), root,
            rand(N, H, 1, scale=3.0, grad=not options["use_reinforce"] and
                 not options["weight_entropy"]),
            rand(N, H, 1, scale=0.5, shift=-1.0, grad=options["use_reinforce"]),
            rand(N, H, 1, scale=0.3, shift=1.0, grad=True), rand(N, H, width, scale=2.0),
            rand(batch, time, width, scale=2.0, grad=True), rand(batch, time, 1),
            flags.to(device), (flags & (torch.rand(batch, time, 1, generator=g) < 0.5)).to(device),
            rand(batch, time, width, scale=2.0)]


def _call(inputs, options: dict, backend: str) -> dict[str, torch.Tensor]:
    t = dict(zip(INPUTS, inputs))
    baseline = t["baseline"] if t["baseline"].requires_grad or options["use_reinforce"] else None
    losses = dreamer_v3_behavior_loss(
        t["reward"], t["next_value"], t["value_pred"], t["low"], t["high"], t["continuation"],
        t["root_continuation"], baseline=baseline, log_prob=t["log_prob"], entropy=t["entropy"],
        slow_value=t["slow_value"], replay_value_pred=t["replay_value_pred"],
        replay_reward=t["replay_reward"], replay_done=t["replay_done"],
        replay_terminated=t["replay_terminated"], replay_slow_value=t["replay_slow_value"],
        **options, backend=backend)
    return {k: v for k, v in losses.items() if k.startswith("loss_")}


def _phases(inputs, options: dict, backend: str) -> dict[str, torch.Tensor]:
    """:func:`_call`'s losses through the five phase functions, chained as this project's
    torchrl modules call them (the returns, the scale, the actor; the critic; the replay term,
    weighted as the objective weights it)."""
    t = dict(zip(INPUTS, inputs))
    baseline = t["baseline"] if t["baseline"].requires_grad or options["use_reinforce"] else None
    returns, weights = lambda_returns(t["reward"], t["next_value"], t["continuation"],
                                      t["root_continuation"], gamma=options["gamma"],
                                      discount_weights=options["discount_weights"],
                                      backend=backend)
    scale = return_scale(returns, t["low"], t["high"], backend=backend)
    actor = dreamer_v3_actor_loss(
        returns, weights, scale, baseline=baseline, log_prob=t["log_prob"], entropy=t["entropy"],
        use_reinforce=options["use_reinforce"],
        normalize_advantage=options["normalize_advantage"],
        weight_entropy=options["weight_entropy"], backend=backend)
    critic = dict(value_loss=options["value_loss"], two_hot_space=options["two_hot_space"],
                  slow_critic_regularization=options["slow_critic_regularization"])
    value = dreamer_v3_value_loss(t["value_pred"], returns.detach(), weights,
                                  slow_value=t["slow_value"], **critic, backend=backend)
    B, T = t["replay_reward"].shape[:2]
    replay = replay_value_loss(t["replay_value_pred"], t["replay_reward"], t["replay_done"],
                               t["replay_terminated"], returns[..., 0, 0].detach().reshape(B, T),
                               slow_value=t["replay_slow_value"], **critic, backend=backend)
    return {"loss_actor": actor["loss_actor"], "loss_value": value["loss_value"],
            "loss_replay_value": options["replay_value_weight"] * replay}


def torchrl_math(options: dict) -> Callable:
    """torchrl's code for the behaviour math of ``options`` (a :data:`TORCHRL_CONVENTIONS`
    preset), after the networks, as its ``DreamerV3ActorLoss.forward``, ``DreamerV3ValueLoss``
    and ``replay_value_loss`` run it."""
    from torchrl.modules.value_norm import PercentileValueNorm
    from torchrl.objectives import dreamer_v3 as trl
    from torchrl.objectives.value import TDLambdaEstimator

    actor = SimpleNamespace(value_estimator=TDLambdaEstimator(
        gamma=options["gamma"], lmbda=0.95, value_network=None),
        tensor_keys=trl.DreamerV3ActorLoss._AcceptedKeys(), return_normalization=True,
        training=True, retnorm=None)
    two_hot, reg = options["value_loss"] == "two_hot", options["slow_critic_regularization"]

    def critic(pred, target, slow, bins):
        if two_hot:
            loss = trl.two_hot_cross_entropy(pred, target, bins)
            if reg:
                loss = loss + reg * trl.two_hot_cross_entropy(
                    pred, trl.two_hot_decode(slow, bins), bins)
            return loss
        return (trl.symlog(pred.squeeze(-1)) - trl.symlog(target)).pow(2)

    def fn(*inputs):
        t = dict(zip(INPUTS, inputs))
        if actor.retnorm is None or actor.retnorm.low is not t["low"]:
            actor.retnorm = PercentileValueNorm(device=t["low"].device)
            actor.retnorm._buffers.update(low=t["low"], high=t["high"])
        returns = trl.DreamerV3ActorLoss.lambda_target(actor, t["reward"], t["next_value"],
                                                       t["continuation"])
        gamma = actor.value_estimator.gamma.to(returns.device)
        rc = t["root_continuation"]
        w = torch.cat([rc[..., :1, :], gamma * rc[..., 1:, :]], dim=-2).cumprod(dim=-2).detach()
        scale = trl.DreamerV3ActorLoss._return_scale(actor, returns)
        if options["use_reinforce"]:
            advantage = (returns - t["baseline"]).detach() / scale
            loss_actor = -(w * t["log_prob"] * advantage).mean()
        else:
            loss_actor = -(w * returns / scale).mean()
        loss_actor = loss_actor - 3e-4 * (w * t["entropy"]).mean()
        bins = trl._default_bins(t["value_pred"].shape[-1], device=returns.device) if two_hot \
            else None
        target = returns.detach().squeeze(-1)
        loss_value = (w.squeeze(-1) * critic(t["value_pred"], target, t["slow_value"],
                                             bins)).mean()
        replay_target = trl._replay_value_target(t["replay_reward"], t["replay_done"],
                                                 t["replay_terminated"],
                                                 returns.detach()[..., 0, 0].reshape(
                                                     t["replay_reward"].shape[:2]), 333.0, 0.95)
        keep = ~t["replay_done"].squeeze(-1)[..., :-1]
        replay = critic(t["replay_value_pred"][..., :-1, :], replay_target,
                        t["replay_slow_value"][..., :-1, :], bins)
        loss_replay = options["replay_value_weight"] * (keep.to(replay.dtype) * replay).mean()
        return {"loss_actor": loss_actor, "loss_value": loss_value,
                "loss_replay_value": loss_replay}

    return fn


@dataclass(frozen=True)
class BehaviorCase:
    """What a ``--loss v3-behavior`` run measures (the :class:`~.losses.Case` protocol)."""

    convention: str
    loss = "v3-behavior"
    losses = 3

    @property
    def options(self) -> dict:
        return dict(BEHAVIOR_CONVENTIONS[self.convention], replay_value_weight=0.3)

    def row(self, impl: str, preset: str, dtype_name: str, mode: str) -> Row:
        batch, time, H, R = BEHAVIOR_PRESETS[preset]
        return Row(impl, preset, batch * time * H, [], R, dtype_name, mode, None, None, None,
                   loss=self.loss, convention=self.convention)

    def describe(self, preset: str) -> str:
        batch, time, H, R = BEHAVIOR_PRESETS[preset]
        return (f"{batch * time} imagination starts x H = {H}, {R} critic bins, replay "
                f"{batch}x{time} ({self.convention}, replay value weight 0.3)")

    def model_bytes(self, preset: str, itemsize: int, mode: str) -> int:
        """The logits dominate: the critic's and the slow critic's over the imagined steps and
        the replay steps read once, the two critics' gradients written once; the per-step
        tensors (11 of them) read once."""
        batch, time, H, R = BEHAVIOR_PRESETS[preset]
        steps, replay = batch * time * H, batch * time
        logits = (2 * steps + 2 * replay) * R
        grads = (steps + replay) * R if mode == "fwd+bwd" else 0
        return (logits + grads + 11 * steps) * itemsize

    def inputs(self, preset: str, dtype: torch.dtype, device: str, seed: int) -> list:
        return make_inputs(preset, dtype, device, seed, self.options)

    def check(self, inputs: list[torch.Tensor]) -> str | None:
        """The fused losses and gradients against the float64 reference on the same values."""
        wanted = [t for t in inputs if t.requires_grad]
        fused = _call(inputs, self.options, "triton")
        got = [*fused.values(), *torch.autograd.grad(sum(fused.values()), wanted)]
        exact = [t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point()
                 else t for t in inputs]
        exact[3:5] = [torch.zeros(1, dtype=torch.float64, device=t.device) for t in inputs[3:5]]
        ref = _call(exact, self.options, "torch")
        want = [*ref.values(), *torch.autograd.grad(
            sum(ref.values()), [t for t in exact if t.requires_grad])]
        names = [*fused, *(f"grad {n}" for n, t in zip(INPUTS, inputs) if t.requires_grad)]
        return peers._disagreement(list(zip(names, got, want)), inputs[0].dtype)

    def fn(self, impl: str, device: str) -> Callable:
        options = self.options
        if impl == "torchrl":
            return torchrl_math(options)
        if impl == "compiled":
            return torch.compile(lambda *inputs: _call(inputs, options, "torch"))
        backend = "triton" if impl == "fused" else "torch"
        return lambda *inputs: _call(inputs, options, backend)

    def not_applicable(self, impl: str) -> str | None:
        if impl == "torchrl" and self.convention not in TORCHRL_CONVENTIONS:
            return f"torchrl has no option for {self.convention}'s behaviour losses"
        return None

    def train_step(self, impl: str, preset: str, dtype_name: str, device: str) -> Row:
        row = self.row(impl, preset, dtype_name, "train-step")
        row.status = "n/a: the behaviour losses have no train-step workload"
        return row

    def checked(self) -> str:
        return "the three losses and the gradients of every differentiable input"


def measure(case: BehaviorCase, impl: str, preset: str, dtype_name: str, mode: str,
            device: str) -> Row:
    """One row of the loss workload (:func:`.workloads.run_config`: the fused result checked,
    launches counted, timed on CUDA) with the host syncs of one more step."""
    row = run_config(impl, preset, dtype_name, mode, case, device, None)
    if row.status.startswith(("ok", "correct")):
        inputs = case.inputs(preset, DTYPES[dtype_name], device, 0)
        row.extra["host_syncs"], row.extra["syncing_ops"] = count_syncs(
            step_fn(case.fn(impl, device), inputs, mode))
    return row


def rows(presets: list[str], dtypes: list[str], impls: list[str], modes: list[str], device: str,
         convention: str = DEFAULT_CONVENTION) -> list[Row]:
    """Every row of the table: each preset, dtype, mode and implementation."""
    case = BehaviorCase(convention)
    return [measure(case, impl, preset, dtype, mode, device)
            for preset in presets for dtype in dtypes for mode in modes for impl in impls]


def _table(results: list[Row]) -> str:
    lines = ["| impl | preset | dtype | mode | launches | host syncs | median ms | status |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | --- |"]
    for r in results:
        ms = "—" if r.median_ms is None else f"{r.median_ms:.3f}"
        launches = "—" if r.launches is None else str(r.launches)
        syncs = r.extra.get("host_syncs", "—")
        lines.append(f"| {r.impl} | {r.preset} | {r.dtype} | {r.mode} | {launches} | {syncs} | "
                     f"{ms} | {r.status} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m fused_dreamer_loss.bench.behavior``: the table on stdout (``--json`` too);
    restarts once with Triton's interpreter on a CPU (as the package's command does)."""
    p = argparse.ArgumentParser(prog="python -m fused_dreamer_loss.bench.behavior",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", nargs="+", choices=list(BEHAVIOR_PRESETS))
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float32"])
    p.add_argument("--mode", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd+bwd"])
    p.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--convention", choices=list(BEHAVIOR_CONVENTIONS), default=DEFAULT_CONVENTION)
    p.add_argument("--device", choices=["cuda", "cpu"])
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's start/stop lines are noise
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if (argv is None and args.device == "cpu" and "fused" in args.impl and not interpreting()
            and "TRITON_INTERPRET" not in os.environ):
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", MODULE, *sys.argv[1:]])
    presets = args.preset or (["behavior"] if args.device == "cuda" else ["behavior-tiny"])
    results = rows(presets, args.dtype, args.impl, args.mode, args.device, args.convention)
    print(_table(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([r.__dict__ for r in results], fh, indent=1)
    return int(any(r.status.startswith(("wrong", "failed")) for r in results))


if __name__ == "__main__":
    sys.exit(main())
