"""``--workload learner``: one update of torchrl's DreamerV3 learner (``DreamerV3Loss`` and
``DreamerV3OptimizationStepper``: world-model loss, imagination, actor, critic and replay-value
losses, backward, ``DreamerV3Optimizer`` step, slow-critic update) with torchrl's world-model loss
(``torchrl``) or ours (``fused``: :class:`~fused_dreamer_loss.FusedDreamerV3ModelLoss` with
backend triton; ``eager``: the same with backend torch), everything else the same.

The learner is built as torchrl's DreamerV3 recipe builds it for pixels (:func:`make_learner`):
torchrl's image encoder and decoder, the RSSM with its block-GRU core, two-hot reward and value
heads, a continue head that also weighs the imagined returns, a Gaussian actor, the slow critic,
``replay_value_loss_weight`` 0.3. The world-model loss takes the options of ``--convention``
(default ``dreamerv3-2024``: the recipe's). Sizes: the preset's batch, time, frames and latent
(:data:`~.presets.V3_PRESETS`; ``v3`` is DreamerV3's 16 × 64 of 3×64×64 uint8 frames with 32 × 32
latents, imagining 15 steps from each of the 1024 posterior states), the networks of
:data:`NETWORKS` (torchrl's module defaults; tiny at ``v3-tiny``, the CPU preset).

Each row is one loss in one of the learner's modes (:data:`MODES`): ``eager``; ``compiled``
(``compile_train_step=True``: Inductor compiles the forward and backward); ``captured``
(``--cuda-graph``: compiled and replayed as a CUDA graph by tensordict's ``CudaGraphModule``, what
torchrl's defaults do on CUDA). A CPU runs the eager mode (Inductor takes minutes to compile the
whole step there). Per update: the median time (on CUDA; on a CPU for the pure-torch losses),
the launches (:func:`.timing.count_launches`) and the host syncs (:func:`count_host_syncs`). The
world-model loss's share: the same loss module on the world model's outputs of one update
(replayed by a stand-in world model), forward and backward, in the same mode: its time and
launches against the update's (``extra``: ``loss_ms``, ``loss_launches``, ``loss_host_syncs``,
``loss_share_time``, ``loss_share_launches``). :func:`learner_table` prints them all.

Run it as ``fused-dreamer-loss-bench --workload learner --loss v3`` or
``python -m fused_dreamer_loss.bench.learner`` (the same, those two options given).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import torch

from ..world_model_v3.validation import DEFAULT_NUM_REWARD_BINS
from .peers import TORCHRL_V3_FIXED, torchrl_v3_gap
from .presets import DTYPES, ROTATION, V3_PRESETS
from .report import ABSENT, Row
from .timing import (count_launches, graphed, peak_mem_mb, skip_reason, time_into, timed,
                     unavailable)
from .workloads import Run, world_model_loss_inputs

#: The learner's modes: how torchrl's stepper runs the forward and backward of an update.
MODES = ("eager", "compiled", "captured")
#: The world-model loss of each implementation: torchrl's, or ours with this backend.
BACKENDS = {"torchrl": None, "fused": "triton", "eager": "torch"}
#: ATen operators that make the host wait for a CUDA device: reading a value (``.item()``,
#: ``float()``, ``bool()``, Python branching on a tensor) and output sizes that depend on values
#: (``nonzero``, which boolean-mask indexing, ``masked_select`` and ``unique`` run).
SYNC_OPS = frozenset({"aten::_local_scalar_dense", "aten::nonzero"})
#: CUDA runtime calls that wait for the device (a ``.cpu()`` copy ends in one).
SYNC_CALLS = frozenset({"cudaStreamSynchronize", "cudaDeviceSynchronize",
                        "cudaEventSynchronize"})
#: The world model's outputs the world-model loss reads, under "next".
WORLD_MODEL_OUTPUTS = ("posterior_logits", "prior_logits", "reco_pixels", "reward_logits",
                       "reward", "continue_pred")
#: The world model's input sample keys, as a replay buffer holds them.
SAMPLE_KEYS = ("state", "belief", "action", "is_init")


@dataclasses.dataclass(frozen=True)
class Networks:
    """The learner's networks (the defaults are torchrl's modules' own)."""

    #: The image encoder's base channels (stage ``i``: ``depth * mults[i]``), its stages and
    #: kernel; the decoder mirrors them.
    depth: int = 64
    mults: tuple[int, ...] = (2, 3, 4, 4)
    kernel: int = 5
    #: The RSSM's projections and its deterministic state (block GRU of ``blocks`` blocks).
    hidden: int = 512
    belief: int = 512
    blocks: int = 8
    #: The hidden layers and width of the reward, continue, actor and value MLPs.
    mlp_layers: int = 3
    mlp_cells: int = 1024
    #: A continuous action of this size, the value head's two-hot bins, the imagination steps.
    action: int = 6
    value_bins: int = 255
    horizon: int = 15


NETWORKS = {
    "v3-tiny": Networks(depth=2, mults=(1, 2), kernel=3, hidden=8, belief=8, blocks=2,
                        mlp_layers=1, mlp_cells=8, action=2, value_bins=16, horizon=3),
    **dict.fromkeys(("v3", "v3-r2", "v3-large"), Networks()),
}


class Learner(NamedTuple):
    """What torchrl's stepper is made of."""

    loss: Any  # torchrl.objectives.DreamerV3Loss
    optimizer: torch.optim.Optimizer
    target_updater: Any  # torchrl.objectives.SoftUpdate


class GaussianActor(torch.nn.Module):
    """The recipe's actor: an MLP over ``(state, belief)`` to a tanh mean and a standard deviation
    in ``[min_std, max_std]``."""

    def __init__(self, features: int, net: Networks, min_std: float = 0.1, max_std: float = 1.0):
        super().__init__()
        from torchrl.modules import DreamerV3MLP

        self.net = DreamerV3MLP(features, 2 * net.action, depth=net.mlp_layers,
                                num_cells=net.mlp_cells)
        self.min_std, self.max_std = min_std, max_std

    def forward(self, state: torch.Tensor, belief: torch.Tensor):
        mean, std = self.net(state, belief).chunk(2, -1)
        return mean.tanh(), (self.max_std - self.min_std) * torch.sigmoid(std + 2) + self.min_std


def torchrl_options(options: Mapping) -> dict:
    """``options`` (of :func:`~fused_dreamer_loss.dreamer_v3_model_loss`) as torchrl's
    ``DreamerV3ModelLoss`` takes them: without those it lacks (see
    :func:`.peers.torchrl_v3_gap`)."""
    return {k: v for k, v in options.items() if k not in TORCHRL_V3_FIXED}


def make_learner(preset: str, options: Mapping, impl: str, device: str | torch.device = "cpu", *,
                 head_outscale: float = 0.0, lr: float = 4e-5, warmup_steps: int = 1000,
                 seed: int = 0) -> Learner:
    """torchrl's DreamerV3 learner at ``preset`` (:data:`NETWORKS`) with the world-model loss of
    ``impl`` (:data:`BACKENDS`) and ``options``. The same ``seed`` gives every ``impl`` the same
    initial weights.

    Args:
        preset: a key of :data:`~.presets.V3_PRESETS` (and :data:`NETWORKS`).
        options: the world-model loss's keyword arguments (e.g. a
            :data:`~fused_dreamer_loss.V3_CONVENTIONS` entry).
        impl: ``"torchrl"``, ``"fused"`` or ``"eager"``.
        device: where the learner lives.
        head_outscale: the initial scale of the reward and value heads' output layers (DreamerV3:
            0, so that both start predicting 0).
        lr, warmup_steps: ``DreamerV3Optimizer``'s (its defaults).
        seed: the initial weights' seed.

    Example:
        >>> from fused_dreamer_loss import V3_CONVENTIONS
        >>> learner = make_learner("v3-tiny", V3_CONVENTIONS["dreamerv3-2024"], "eager")
        >>> type(learner.loss.model_loss).__name__
        'FusedDreamerV3ModelLoss'
    """
    from tensordict.nn import (InteractionType, ProbabilisticTensorDictModule,
                               ProbabilisticTensorDictSequential, TensorDictModule,
                               TensorDictSequential)
    from torchrl.data import Bounded, Composite, Unbounded
    from torchrl.envs.model_based import DreamerEnv
    from torchrl.modules import (DreamerV3ImageDecoder, DreamerV3ImageEncoder, DreamerV3MLP,
                                 RSSMPosteriorV3, RSSMPriorV3, RSSMRolloutV3, SymExpTwoHot,
                                 WorldModelWrapper)
    from torchrl.modules.distributions.continuous import IndependentNormal
    from torchrl.objectives import (DreamerV3ActorLoss, DreamerV3Loss, DreamerV3ModelLoss,
                                    DreamerV3ValueLoss, SoftUpdate, ValueEstimators)
    from torchrl.trainers.algorithms import DreamerV3Optimizer

    from ..world_model_v3.module import FusedDreamerV3ModelLoss

    if impl not in BACKENDS:
        raise ValueError(f"impl must be one of {', '.join(BACKENDS)}, got {impl!r}")
    _, _, image, categoricals, classes = V3_PRESETS[preset]
    net = NETWORKS[preset]
    state_dim = categoricals * classes
    features = state_dim + net.belief
    reward_bins = options.get("num_reward_bins", DEFAULT_NUM_REWARD_BINS)
    unimix = options.get("unimix", 0.0)  # the recipe samples the latents with the loss's
    torch.manual_seed(seed)

    def mlp(out_features, outscale=1.0):
        return DreamerV3MLP(features, out_features, depth=net.mlp_layers, num_cells=net.mlp_cells,
                            outscale=outscale)

    encoder = DreamerV3ImageEncoder(image[0], depth=net.depth, mults=net.mults,
                                    kernel_size=net.kernel)
    prior_net = RSSMPriorV3(action_shape=(net.action,), hidden_dim=net.hidden,
                            rnn_hidden_dim=net.belief, num_categoricals=categoricals,
                            num_classes=classes, action_dim=net.action, unimix=unimix,
                            recurrent_model="block_gru", num_blocks=net.blocks)
    posterior_net = RSSMPosteriorV3(hidden_dim=net.hidden, num_categoricals=categoricals,
                                    num_classes=classes, rnn_hidden_dim=net.belief,
                                    obs_embed_dim=encoder.output_features(image),
                                    use_rms_norm=True, unimix=unimix)
    decoder = DreamerV3ImageDecoder(features, image_shape=image, depth=net.depth,
                                    mults=net.mults, kernel_size=net.kernel, num_blocks=net.blocks)
    reward_net, reward_decoder = mlp(reward_bins, head_outscale), SymExpTwoHot(reward_bins)
    continue_net = mlp(1)
    actor_net = GaussianActor(features, net)
    value_net = mlp(net.value_bins, head_outscale)

    latent = [("next", "state"), ("next", "belief")]
    world_model = TensorDictSequential(
        TensorDictModule(encoder, in_keys=[("next", "pixels")],
                         out_keys=[("next", "encoded_latents")]),
        RSSMRolloutV3(
            TensorDictModule(prior_net, in_keys=["state", "belief", "action"],
                             out_keys=[("next", "prior_logits"), *latent]),
            TensorDictModule(posterior_net,
                             in_keys=[("next", "belief"), ("next", "encoded_latents")],
                             out_keys=[("next", "posterior_logits"), ("next", "state")]),
            reset_key="is_init"),
        TensorDictModule(decoder, in_keys=latent, out_keys=[("next", "reco_pixels")]),
        TensorDictModule(reward_net, in_keys=latent, out_keys=[("next", "reward_logits")]),
        TensorDictModule(reward_decoder, in_keys=[("next", "reward_logits")],
                         out_keys=[("next", "reward")]),
        TensorDictModule(continue_net, in_keys=latent, out_keys=[("next", "continue_pred")]),
    ).to(device)
    imagination = WorldModelWrapper(
        TensorDictModule(prior_net, in_keys=["state", "belief", "action"],
                         out_keys=["_", "state", "belief"]),
        TensorDictSequential(
            TensorDictModule(reward_net, in_keys=["state", "belief"], out_keys=["reward_logits"]),
            TensorDictModule(reward_decoder, in_keys=["reward_logits"], out_keys=["reward"])),
    ).to(device)
    env = DreamerEnv(imagination, prior_shape=(state_dim,), belief_shape=(net.belief,),
                     device=device)
    env.observation_spec = Composite(state=Unbounded(state_dim, device=device),
                                     belief=Unbounded(net.belief, device=device), device=device)
    env.state_spec = env.observation_spec.clone()
    env.action_spec = Bounded(-1, 1, (net.action,), device=device)
    env.reward_spec = Unbounded((1,), device=device)
    continuation = TensorDictSequential(
        TensorDictModule(continue_net, in_keys=["state", "belief"], out_keys=["continue_logits"]),
        TensorDictModule(torch.nn.Sigmoid(), in_keys=["continue_logits"],
                         out_keys=["continuation"]),
    ).to(device)
    actor = ProbabilisticTensorDictSequential(
        TensorDictModule(actor_net, in_keys=["state", "belief"], out_keys=["loc", "scale"]),
        ProbabilisticTensorDictModule(
            in_keys=["loc", "scale"], out_keys=["action"], distribution_class=IndependentNormal,
            default_interaction_type=InteractionType.RANDOM, return_log_prob=True,
            log_prob_key="action_log_prob"),
    ).to(device)
    value = TensorDictSequential(
        TensorDictModule(value_net, in_keys=["state", "belief"], out_keys=["state_value_logits"]),
        TensorDictModule(SymExpTwoHot(net.value_bins), in_keys=["state_value_logits"],
                         out_keys=["state_value"]),
    ).to(device)

    if BACKENDS[impl] is None:
        gap = torchrl_v3_gap(options)
        if gap:
            raise ValueError(gap)
        model_loss = DreamerV3ModelLoss(world_model, **torchrl_options(options),
                                        detach_output=False)
    else:
        model_loss = FusedDreamerV3ModelLoss(world_model, **options, detach_output=False,
                                             backend=BACKENDS[impl])
    actor_loss = DreamerV3ActorLoss(actor, value, env, continuation_model=continuation,
                                    imagination_horizon=net.horizon)
    actor_loss.make_value_estimator(ValueEstimators.TDLambda, gamma=0.99, lmbda=0.95)
    value_loss = DreamerV3ValueLoss(value, value_loss="two_hot", num_value_bins=net.value_bins,
                                    actor_loss=actor_loss, slow_critic_regularization=1.0)
    loss = DreamerV3Loss(model_loss.to(device), actor_loss.to(device), value_loss.to(device))
    parameters = [*world_model.parameters(), *actor.parameters(), *value_loss.parameters()]
    optimizer = DreamerV3Optimizer(parameters, lr=lr, warmup_steps=warmup_steps)
    return Learner(loss, optimizer, SoftUpdate(value_loss, tau=0.02))


def make_sample(preset: str, device: str | torch.device = "cpu", seed: int = 0):
    """A replay-buffer sample of ``preset`` as torchrl's learner reads it: zero latent states, the
    first step of each sequence an episode start, actions in [−1, 1]; under ``"next"``, uint8
    frames, rewards ~ N(0, 1) and terminal flags (5%)."""
    from tensordict import TensorDict

    batch, steps, image, categoricals, classes = V3_PRESETS[preset]
    net = NETWORKS[preset]
    g = torch.Generator().manual_seed(seed)
    B = (batch, steps)
    is_init = torch.zeros(*B, 1, dtype=torch.bool)
    is_init[:, 0] = True
    terminated = torch.rand(*B, 1, generator=g) < 0.05
    return TensorDict({
        "state": torch.zeros(*B, categoricals * classes),
        "belief": torch.zeros(*B, net.belief),
        "action": torch.rand(*B, net.action, generator=g) * 2 - 1,
        "is_init": is_init,
        "next": {"pixels": torch.randint(0, 256, (*B, *image), generator=g, dtype=torch.uint8),
                 "reward": torch.randn(*B, 1, generator=g),
                 "done": terminated.clone(), "terminated": terminated},
    }, batch_size=list(B)).to(device)


def make_stepper(learner: Learner, mode: str, **kwargs):
    """torchrl's ``DreamerV3OptimizationStepper`` over ``learner`` in ``mode`` (:data:`MODES`);
    ``kwargs`` go to it (e.g. ``mixed_precision``, ``rssm_scan_unroll``, ``warmup_steps``)."""
    from torchrl.trainers.algorithms import DreamerV3OptimizationStepper

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return DreamerV3OptimizationStepper(*learner, compile_train_step=mode != "eager",
                                        cudagraph=mode == "captured", **kwargs)


def world_model_outputs(learner: Learner, sample):
    """The sample with the world model's outputs of it (as the world-model loss sees them: the
    reward renamed ``true_reward``), detached."""
    model_loss = learner.loss.model_loss
    data = sample.select(*SAMPLE_KEYS, ("next", "pixels"), ("next", "reward"),
                         ("next", "terminated"))
    data.rename_key_(("next", "reward"), ("next", "true_reward"))
    with torch.no_grad():
        return model_loss.world_model(data).detach()


class Replay(torch.nn.Module):
    """A stand-in world model: writes recorded outputs (:data:`WORLD_MODEL_OUTPUTS`) under
    ``"next"``, the same leaves on every call, those that the loss differentiates needing a
    gradient."""

    def __init__(self, outputs):
        super().__init__()
        self.leaves = {key: outputs["next", key].clone().requires_grad_(key != "reward")
                       for key in WORLD_MODEL_OUTPUTS}

    def forward(self, tensordict):
        for key, value in self.leaves.items():
            tensordict.set(("next", key), value)
        return tensordict


def loss_step(impl: str, options: Mapping, outputs, mode: str,
              mixed_precision: bool = False) -> Callable[[], object]:
    """Forward and backward of ``impl``'s world-model loss alone on ``outputs``
    (:func:`world_model_outputs`), run as the learner runs it in ``mode``: eager, compiled, or
    compiled and captured in a CUDA graph (after its warm-up)."""
    from torchrl.objectives import DreamerV3ModelLoss

    from ..world_model_v3.module import FusedDreamerV3ModelLoss

    replay = Replay(outputs)
    if BACKENDS[impl] is None:
        loss = DreamerV3ModelLoss(replay, **torchrl_options(options))
    else:
        loss = FusedDreamerV3ModelLoss(replay, **options, backend=BACKENDS[impl])
    loss = loss.to(outputs.device)
    data = outputs.select(("next", "pixels"), ("next", "true_reward"), ("next", "terminated"))
    data.rename_key_(("next", "true_reward"), ("next", "reward"))
    wanted = [leaf for leaf in replay.leaves.values() if leaf.requires_grad]

    def step():
        with torch.autocast(outputs.device.type, dtype=torch.bfloat16, enabled=mixed_precision):
            losses, _ = loss(data)
            total = sum(value.sum() for value in losses.values())
        return torch.autograd.grad(total, wanted)

    if mode == "eager":
        return step
    compiled = torch.compile(step)
    return graphed(compiled) if mode == "captured" else compiled


def count_host_syncs(step: Callable[[], object], cuda: bool) -> dict[str, int]:
    """The host syncs of one call of ``step``, counted by torch.profiler: ``{name: count}``. On
    CUDA, the runtime calls that wait for the device (:data:`SYNC_CALLS`); on a CPU, where nothing
    waits, the ATen operators that would (:data:`SYNC_OPS`; a ``.cpu()`` of a CPU tensor is no
    operator and is not seen)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    names = SYNC_CALLS if cuda else SYNC_OPS
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        step()
    syncs: dict[str, int] = {}
    for event in prof.events():
        if event.name in names:
            syncs[event.name] = syncs.get(event.name, 0) + 1
    return syncs


def why_not(impl: str, dtype_name: str, mode: str, run: Run) -> str | None:
    """Why ``impl`` gives no row of ``dtype_name`` in ``mode`` here, or None."""
    if run.args.loss != "v3":
        return "n/a: the learner is torchrl's DreamerV3 learner: run it with --loss v3"
    if impl not in BACKENDS:
        return f"n/a: the learner compares the world-model losses {', '.join(BACKENDS)}"
    if DTYPES[dtype_name] == torch.float16:
        return "n/a: torchrl's learner runs float32 or bfloat16 autocast (mixed_precision)"
    if DTYPES[dtype_name] == torch.bfloat16 and not run.cuda:
        return "n/a: torchrl's learner runs bfloat16 autocast on CUDA only"
    if mode == "captured" and not run.cuda:
        return "skipped: CUDA graphs need a CUDA device"
    if mode == "compiled" and not run.cuda:
        return "skipped: Inductor takes minutes to compile the whole learner step on a CPU"
    return unavailable(run.case, impl, run.cuda) or skip_reason("torchrl", run.cuda)


def learner_row(impl: str, preset: str, dtype_name: str, mode: str, run: Run) -> Row:
    """One row: an update of the learner with ``impl``'s world-model loss in ``mode``."""
    row = run.case.row(impl, preset, dtype_name, mode)
    row.extra["workload"] = "learner"
    reason = why_not(impl, dtype_name, mode, run)
    if reason:
        row.status = reason
        return row
    cuda, options = run.cuda, run.case.options
    mixed = DTYPES[dtype_name] == torch.bfloat16
    learner = make_learner(preset, options, impl, run.device)
    row.extra["networks"] = {**dataclasses.asdict(NETWORKS[preset]), "parameters": sum(
        p.numel() for p in learner.optimizer.param_groups[0]["params"])}
    samples = [make_sample(preset, run.device, seed) for seed in range(ROTATION if cuda else 1)]
    stepper = make_stepper(learner, mode, mixed_precision=mixed)
    if mode != "eager":
        start = time.perf_counter()
        stepper.warmup(samples[0])
        row.compile_s = time.perf_counter() - start
    updates = [lambda sample=sample: stepper.step(None, sample) for sample in samples]
    updates[0]()  # the optimizer's state, lazy initialisations
    outputs = world_model_outputs(learner, samples[0])
    if impl == "fused":
        wrong = run.case.check(world_model_loss_inputs(outputs, run.case.opts))
        if wrong:
            row.status = f"wrong: {wrong}"
            return row
    alone = loss_step(impl, options, outputs, mode, mixed)
    alone()
    launched, alone_launched = count_launches(updates[0], cuda), count_launches(alone, cuda)
    row.launches = sum(launched.values())
    syncs = count_host_syncs(updates[0], cuda)
    row.extra.update(
        launched=launched, host_syncs=sum(syncs.values()), host_syncs_by=syncs,
        loss_launches=sum(alone_launched.values()),
        loss_host_syncs=sum(count_host_syncs(alone, cuda).values()))
    row.extra["loss_share_launches"] = row.extra["loss_launches"] / row.launches
    if impl == "fused" and not cuda:
        row.status = ("correct (interpreter) on the world model's outputs; launches and host "
                      "syncs counted, not timed (needs a CUDA GPU)")
        row.extra["interpreter"] = True
        return row
    time_into(row, updates, cuda)
    alone_time = timed([alone], cuda)
    row.extra.update(loss_ms=alone_time.median_ms, loss_noisy=alone_time.noisy,
                     loss_share_time=alone_time.median_ms / row.median_ms)
    if cuda:
        row.peak_mem_mb = peak_mem_mb(updates[0])
    return row


def learner_rows(run: Run) -> list[Row]:
    """``--workload learner``: a row per mode (:data:`MODES`: eager and compiled, or captured with
    ``--cuda-graph``), implementation and preset; the learner's table printed after them."""
    modes = ["captured"] if run.args.cuda_graph else ["eager", "compiled"]

    def describe(preset, dtype):
        if run.args.loss != "v3":
            return "the learner workload needs --loss v3"
        return (f"one update of torchrl's DreamerV3 learner (imagination "
                f"{NETWORKS[preset].horizon} steps) on {run.case.describe(preset)}")

    rows = run.each(modes, lambda impl, preset, dtype, mode: learner_row(
        impl, preset, dtype, mode, run), describe)
    print(learner_table(rows))
    return rows


def _cell(value, fmt: str) -> str:
    return ABSENT if value is None else format(value, fmt)


def learner_table(rows: list[Row]) -> str:
    """A Markdown table of the learner's figures: per update, its time, launches and host syncs;
    the world-model loss alone, its time, launches and host syncs, and its shares of the
    update's."""
    lines = ["| world-model loss | preset | dtype | mode | update ms | launches | host syncs "
             "| loss ms | loss launches | loss host syncs | loss share: time | loss share: "
             "launches | status |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| --- |"]
    for r in rows:
        x = r.extra
        lines.append(
            f"| {r.impl} | {r.preset} | {r.dtype} | {r.mode} | {_cell(r.median_ms, '.2f')} "
            f"| {_cell(r.launches, 'd')} | {_cell(x.get('host_syncs'), 'd')} "
            f"| {_cell(x.get('loss_ms'), '.2f')} | {_cell(x.get('loss_launches'), 'd')} "
            f"| {_cell(x.get('loss_host_syncs'), 'd')} | {_cell(x.get('loss_share_time'), '.1%')} "
            f"| {_cell(x.get('loss_share_launches'), '.1%')} | {r.status} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m fused_dreamer_loss.bench.learner [OPTIONS]``: the benchmark command with
    ``--workload learner --loss v3`` and OPTIONS."""
    from .cli import main as bench_main

    fixed = ["--workload", "learner", "--loss", "v3"]
    if argv is None:  # the command line's own arguments, which a restart re-reads
        sys.argv[1:1] = fixed
        return bench_main(None)
    return bench_main([*fixed, *argv])


if __name__ == "__main__":
    sys.exit(main())
