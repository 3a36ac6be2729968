"""Argument checks of the DreamerV3 behaviour losses, shared by every backend.

Options are checked once, by the ``*Options`` dataclasses; tensors by the ``validate_*``
functions, which look at shapes, dtypes and devices only: no tensor value is read, so validation
never synchronises the host with the device (``value_bins`` are checked for order only when they
are a Python sequence or a CPU tensor, as the V3 reward bins are).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.validation import (FLOAT_DTYPES, MIN_BINS, check_bins, check_bool, check_choice,
                               check_real)

#: How the cumulative discount weights start (see :func:`reference.discount_weights`).
DISCOUNT_WEIGHTS = ("inclusive", "inclusive_gamma", "exclusive")
VALUE_LOSSES = ("symlog_mse", "two_hot")
REDUCTIONS = ("mean", "sum", "none")
TWO_HOT_SPACES = ("raw", "symlog")
MIN_VALUE_BINS = MIN_BINS


# ---- options -------------------------------------------------------------------------------------


def _check_unit(name: str, value: object, *, open_low: bool = False) -> float:
    """``value`` as a float in [0, 1] (or (0, 1] with ``open_low``)."""
    value = check_real(name, value)
    low_ok = value > 0.0 if open_low else value >= 0.0
    if not (low_ok and value <= 1.0):
        interval = "(0, 1]" if open_low else "[0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


@dataclass(frozen=True, eq=False)
class ReturnOptions:
    """The λ-return and its discount weights.

    ``gamma`` and ``lmbda`` in [0, 1]; ``discount_weights``: ``"inclusive"`` (torchrl:
    ``w_t = c_0 Π_{1≤i≤t} γ c_i``), ``"inclusive_gamma"`` (``w_t = Π_{0≤i≤t} γ c_i``, r2dreamer) or
    ``"exclusive"`` (``w_t = Π_{0≤i<t} γ c_i``, ``w_0 = 1``: dreamerv3-torch), ``c`` the root
    continuations.

    Raises:
        TypeError / ValueError: naming the option and what was wrong.
    """

    gamma: float = 1.0
    lmbda: float = 0.95
    discount_loss: bool = True
    discount_weights: str = "inclusive"

    def __post_init__(self) -> None:
        object.__setattr__(self, "gamma", _check_unit("gamma", self.gamma))
        object.__setattr__(self, "lmbda", _check_unit("lmbda", self.lmbda))
        check_bool("discount_loss", self.discount_loss)
        check_choice("discount_weights", self.discount_weights, DISCOUNT_WEIGHTS)


@dataclass(frozen=True, eq=False)
class ScaleOptions:
    """The return normalisation (torchrl's ``PercentileValueNorm``): quantiles ``0 ≤ lo < hi ≤ 1``,
    ``rate`` in [0, 1], ``min_scale > 0``, ``update`` a bool."""

    quantiles: tuple[float, float] = (0.05, 0.95)
    rate: float = 0.01
    min_scale: float = 1.0
    update: bool = True

    def __post_init__(self) -> None:
        q = self.quantiles
        if not isinstance(q, (tuple, list)) or len(q) != 2:
            raise TypeError(f"quantiles must be a pair (low, high), got {q!r}")
        low, high = check_real("quantiles[0]", q[0]), check_real("quantiles[1]", q[1])
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"quantiles must satisfy 0 <= low < high <= 1, got {tuple(q)}")
        object.__setattr__(self, "quantiles", (low, high))
        object.__setattr__(self, "rate", _check_unit("rate", self.rate))
        min_scale = check_real("min_scale", self.min_scale)
        if not min_scale > 0.0:
            raise ValueError(f"min_scale must be positive, got {min_scale!r}")
        object.__setattr__(self, "min_scale", min_scale)
        check_bool("update", self.update)


@dataclass(frozen=True, eq=False)
class ActorOptions:
    """The actor loss: REINFORCE or the reparameterised return, and the entropy bonus.

    ``normalize_advantage``: divide the REINFORCE advantage by the scale (every codebase but
    dreamerv3-torch); ``weight_entropy``: weight the entropy by the discount weights (every
    codebase but dreamerv3-torch). The entropy bonus applies when ``entropy_bonus > 0``
    (torchrl's rule).
    """

    entropy_bonus: float = 3e-4
    use_reinforce: bool = False
    normalize_advantage: bool = True
    weight_entropy: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "entropy_bonus", check_real("entropy_bonus", self.entropy_bonus))
        for name in ("use_reinforce", "normalize_advantage", "weight_entropy"):
            check_bool(name, getattr(self, name))

    @property
    def has_entropy(self) -> bool:
        return self.entropy_bonus > 0.0


@dataclass(frozen=True, eq=False)
class CriticOptions:
    """The critic loss: two-hot cross-entropy (in raw or symlog space) or symlog squared error,
    the slow-critic regulariser (weight ≥ 0, applied when non-zero) and torchrl's reduction.
    ``value_bins``: None (torchrl's default support of the logits' width) or a 1-D tensor or
    sequence of at least two ascending values."""

    value_loss: str = "symlog_mse"
    slow_critic_regularization: float = 0.0
    reduction: str = "mean"
    two_hot_space: str = "raw"
    value_bins: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_choice("value_loss", self.value_loss, VALUE_LOSSES)
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_choice("two_hot_space", self.two_hot_space, TWO_HOT_SPACES)
        reg = check_real("slow_critic_regularization", self.slow_critic_regularization)
        if reg < 0.0:
            raise ValueError(f"slow_critic_regularization must be non-negative, got {reg!r}")
        object.__setattr__(self, "slow_critic_regularization", reg)
        if self.value_bins is not None:
            if self.value_loss != "two_hot":
                raise ValueError("value_bins is used only with value_loss='two_hot'")
            object.__setattr__(self, "value_bins", check_bins("value_bins", self.value_bins))

    @property
    def two_hot(self) -> bool:
        return self.value_loss == "two_hot"

    @property
    def has_slow(self) -> bool:
        return self.slow_critic_regularization != 0.0


@dataclass(frozen=True, eq=False)
class ReplayOptions:
    """The replay λ-return: ``horizon ≥ 1`` (``γ = 1 − 1/horizon``) and ``lmbda`` in [0, 1]."""

    horizon: float = 333.0
    lmbda: float = 0.95

    def __post_init__(self) -> None:
        horizon = check_real("horizon", self.horizon)
        if not horizon >= 1.0:
            raise ValueError(f"horizon must be at least 1 (gamma = 1 - 1/horizon), got {horizon!r}")
        object.__setattr__(self, "horizon", horizon)
        object.__setattr__(self, "lmbda", _check_unit("lmbda", self.lmbda))

    @property
    def gamma(self) -> float:
        return 1.0 - 1.0 / self.horizon


# ---- tensors -------------------------------------------------------------------------------------


def check_float(name: str, tensor: object) -> torch.Tensor:
    """``tensor`` if it is a tensor of one of :data:`FLOAT_DTYPES`."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        expected = ", ".join(str(d) for d in FLOAT_DTYPES)
        raise TypeError(f"{name} has dtype {tensor.dtype}; expected one of {expected}")
    return tensor


def check_flag(name: str, tensor: object) -> torch.Tensor:
    """``tensor`` if it is a bool, integer or float tensor (a flag: non-zero is true)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.is_complex():
        raise TypeError(f"{name} has dtype {tensor.dtype}; expected bool, an integer or a float")
    return tensor


def term_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float32, or float64 when one of the floating ``tensors`` is float64."""
    floats = [t.dtype for t in tensors if t is not None and t.is_floating_point()]
    return functools.reduce(torch.promote_types, floats, torch.float32)


def check_device(named: Sequence[tuple[str, torch.Tensor | None]]) -> torch.device:
    """The one device of the given tensors (None entries skipped)."""
    present = [(n, t) for n, t in named if t is not None]
    devices = {t.device for _, t in present}
    if len(devices) > 1:
        placed = ", ".join(f"{n} on {t.device}" for n, t in present)
        raise ValueError(f"all inputs must be on one device, got {placed}")
    return devices.pop()


def check_steps(name: str, tensor: torch.Tensor, batch: torch.Size, what: str = "[*B, H, 1]",
                allow_squeezed: bool = False) -> None:
    """``tensor`` must have shape ``[*batch, 1]`` (or ``batch`` itself with ``allow_squeezed``)."""
    shape = tuple(tensor.shape)
    if shape == (*batch, 1) or (allow_squeezed and shape == tuple(batch)):
        return
    expected = f"{(*batch, 1)}" + (f" or {tuple(batch)}" if allow_squeezed else "")
    raise ValueError(f"{name} must have shape {what} = {expected}, got {shape}")


def steps_shape(name: str, tensor: torch.Tensor) -> torch.Size:
    """``[*B, H]`` of a ``[*B, H, 1]`` tensor, which must have a horizon of one step at least."""
    if tensor.dim() < 2 or tensor.shape[-1] != 1:
        raise ValueError(
            f"{name} must have shape [*B, H, 1] (a trailing dim of 1), got {tuple(tensor.shape)}")
    batch = tensor.shape[:-1]
    if math.prod(batch) == 0:
        raise ValueError(f"{name} is empty: shape {tuple(tensor.shape)}")
    return batch


@dataclass(frozen=True)
class ReturnShapes:
    steps: torch.Size  # [*B, H]
    dtype: torch.dtype


def validate_returns(reward, next_value, continuation, root_continuation) -> ReturnShapes:
    """Check the λ-return inputs (all ``[*B, H, 1]``)."""
    check_float("reward", reward)
    check_float("next_value", next_value)
    steps = steps_shape("reward", reward)
    check_steps("next_value", next_value, steps)
    for name, t in (("continuation", continuation), ("root_continuation", root_continuation)):
        if t is not None:
            check_float(name, t)
            check_steps(name, t, steps)
    check_device([("reward", reward), ("next_value", next_value),
                  ("continuation", continuation), ("root_continuation", root_continuation)])
    return ReturnShapes(steps, term_dtype(reward, next_value, continuation, root_continuation))


def validate_scale(returns, low, high) -> torch.dtype:
    """Check the return-normalisation inputs; the buffers' dtype (the percentiles' dtype)."""
    check_float("returns", returns)
    if returns.numel() == 0:
        raise ValueError(f"returns is empty: shape {tuple(returns.shape)}")
    for name, t in (("low", low), ("high", high)):
        check_float(name, t)
        if t.numel() != 1:
            raise ValueError(f"{name} must hold one value (torchrl's buffers have shape [1]), got "
                             f"shape {tuple(t.shape)}")
        if t.requires_grad:
            raise ValueError(f"{name} requires grad; it is a running statistic, updated in place")
    _check_buffer_dtypes(low, high)
    check_device([("returns", returns), ("low", low), ("high", high)])
    return low.dtype


def _check_buffer_dtypes(low: torch.Tensor, high: torch.Tensor) -> None:
    if low.dtype != high.dtype:
        raise TypeError(f"low and high must have one dtype, got {low.dtype} and {high.dtype}")
    if low.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"low and high must be float32 or float64 (torch.quantile's dtypes), "
                        f"got {low.dtype}")


@dataclass(frozen=True)
class ActorShapes:
    steps: torch.Size
    dtype: torch.dtype


def validate_actor(returns, weights, scale, baseline, log_prob, entropy,
                   opts: ActorOptions) -> ActorShapes:
    """Check the actor-loss inputs."""
    check_float("returns", returns)
    steps = steps_shape("returns", returns)
    check_float("weights", weights)
    check_steps("weights", weights, steps)
    check_float("scale", scale)
    if scale.numel() != 1:
        raise ValueError(f"scale must hold one value, got shape {tuple(scale.shape)}")
    check_device([("returns", returns), ("weights", weights), ("scale", scale)])
    policy = validate_policy(steps, returns.device, baseline, log_prob, entropy, opts)
    return ActorShapes(steps, torch.promote_types(policy, term_dtype(returns, weights, scale)))


def validate_policy(steps: torch.Size, device: torch.device, baseline, log_prob, entropy,
                    opts: ActorOptions) -> torch.dtype:
    """Check the policy's per-step inputs (``[*B, H, 1]`` or ``[*B, H]``, on ``device``); their
    term dtype."""
    if opts.use_reinforce:
        for name, t in (("log_prob", log_prob), ("baseline", baseline)):
            if t is None:
                raise ValueError(f"use_reinforce=True needs {name}")
    named = [("baseline", baseline), ("log_prob", log_prob), ("entropy", entropy)]
    for name, t in named:
        if t is not None:
            check_float(name, t)
            check_steps(name, t, steps, allow_squeezed=True)
            if t.device != device:
                raise ValueError(f"all inputs must be on one device, got {name} on {t.device} "
                                 f"and the returns on {device}")
    return term_dtype(baseline, log_prob, entropy)


@dataclass(frozen=True)
class CriticShapes:
    steps: torch.Size
    bins: int  # R (1 for symlog_mse)
    slow_logits: bool  # slow_value holds logits to decode
    dtype: torch.dtype


def validate_critic(value_pred, returns, weights, slow_value, opts: CriticOptions,
                    names: tuple[str, str] = ("returns", "weights")) -> CriticShapes:
    """Check the critic-loss inputs: ``value_pred`` ``[*B, H, R]`` logits (two-hot) or
    ``[*B, H, 1]`` values, ``returns`` and ``weights`` (None: ones) ``[*B, H, 1]``, ``slow_value``
    ``[*B, H, 1]`` values or ``[*B, H, R]`` logits."""
    check_float(names[0], returns)
    steps = steps_shape(names[0], returns)
    if weights is not None:
        check_float(names[1], weights)
        check_steps(names[1], weights, steps)
    check_device([(names[0], returns), (names[1], weights)])
    shapes = validate_critic_head(value_pred, steps, returns.device, slow_value, opts)
    return CriticShapes(steps, shapes.bins, shapes.slow_logits,
                        torch.promote_types(shapes.dtype, term_dtype(returns, weights)))


def validate_critic_head(value_pred, steps: torch.Size, device: torch.device, slow_value,
                         opts: CriticOptions, what: str = "[*B, H") -> CriticShapes:
    """Check the critic's outputs over ``steps`` (on ``device``): ``value_pred`` and, with the
    regulariser, ``slow_value`` (values ``[*steps, 1]`` or logits ``[*steps, R]``)."""
    check_float("value_pred", value_pred)
    width = _critic_width(value_pred, steps, opts, what)
    slow_logits = False
    if opts.has_slow:
        if slow_value is None:
            raise ValueError("slow_critic_regularization > 0 needs slow_value (the slow critic's "
                             "value or logits)")
        check_float("slow_value", slow_value)
        slow_logits = opts.two_hot and tuple(slow_value.shape) == (*steps, width)
        if not slow_logits:
            shape = f"{what}, 1]" + (f" (or {what}, R] logits)" if opts.two_hot else "")
            check_steps("slow_value", slow_value, steps, shape)
    slow = slow_value if opts.has_slow else None
    for name, t in (("value_pred", value_pred), ("slow_value", slow)):
        if t is not None and t.device != device:
            raise ValueError(f"all inputs must be on one device, got {name} on {t.device} and "
                             f"the returns on {device}")
    _check_bins_device(opts, device)
    return CriticShapes(steps, width, slow_logits, term_dtype(value_pred, slow))


def _critic_width(value_pred: torch.Tensor, steps: torch.Size, opts: CriticOptions,
                  what: str) -> int:
    """R, the logits' width (checked against ``value_bins``), or 1 for symlog_mse."""
    if not opts.two_hot:
        check_steps("value_pred", value_pred, steps, f"{what}, 1] (value_loss='symlog_mse')")
        return 1
    if value_pred.dim() != len(steps) + 1 or value_pred.shape[:-1] != steps:
        raise ValueError(f"value_pred must have shape {what}, R] = {(*steps, 'R')} "
                         f"(value_loss='two_hot'), got {tuple(value_pred.shape)}")
    width = value_pred.shape[-1]
    bins = opts.value_bins
    if bins is not None and bins.numel() != width:
        raise ValueError(f"value_pred has {width} logits per step but value_bins holds "
                         f"{bins.numel()} bins")
    if width < MIN_VALUE_BINS:
        raise ValueError(f"value_pred must have at least {MIN_VALUE_BINS} logits per step "
                         f"(value_loss='two_hot'), got {width}")
    return width


def _check_bins_device(opts: CriticOptions, device: torch.device) -> None:
    bins = opts.value_bins
    if bins is not None and bins.device not in (device, torch.device("cpu")):
        raise ValueError(
            f"value_bins must be on the inputs' device ({device}) or on the CPU, got {bins.device}")


@dataclass(frozen=True)
class ReplayShapes:
    steps: torch.Size  # [B, T]
    bins: int
    slow_logits: bool
    dtype: torch.dtype


def validate_replay(value_pred, reward, done, terminated, bootstrap, slow_value,
                    opts: CriticOptions, prefix: str = "") -> ReplayShapes:
    """Check the replay-value inputs: ``reward``, ``done``, ``terminated`` ``[B, T, 1]`` (or
    ``[B, T]``), ``bootstrap`` ``[B, T]`` or ``[B, T, 1]`` (None: the combined loss's own), T ≥ 2;
    ``prefix`` names them as the caller does (``"replay_"``)."""
    check_float(f"{prefix}reward", reward)
    steps = reward.shape[:-1] if reward.dim() >= 3 and reward.shape[-1] == 1 else reward.shape
    if len(steps) < 2 or steps[-1] < 2 or math.prod(steps) == 0:
        raise ValueError(f"{prefix}reward must have shape [B, T, 1] with T >= 2 (one target per "
                         f"step but the last), got {tuple(reward.shape)}")
    named = [(f"{prefix}reward", reward)]
    for name, t in ((f"{prefix}done", done), (f"{prefix}terminated", terminated)):
        check_flag(name, t)
        check_steps(name, t, steps, "[B, T, 1]", allow_squeezed=True)
        named.append((name, t))
    if bootstrap is not None:
        check_float("bootstrap", bootstrap)
        check_steps("bootstrap", bootstrap, steps, "[B, T]", allow_squeezed=True)
        named.append(("bootstrap", bootstrap))
    device = check_device(named)
    head = validate_critic_head(value_pred, steps, device, slow_value, opts, "[B, T")
    return ReplayShapes(steps, head.bins, head.slow_logits,
                        torch.promote_types(head.dtype, term_dtype(reward, bootstrap)))


@dataclass(frozen=True, eq=False)
class BehaviorOptions:
    """The options of :func:`dreamer_v3_behavior_loss`, one dataclass per phase, plus whether the
    returns are normalised (torchrl's ``return_normalization``; off: the scale is 1) and the
    replay value's weight (torchrl's ``replay_value_loss_weight``; 0: no replay term)."""

    returns: ReturnOptions
    scale: ScaleOptions
    actor: ActorOptions
    critic: CriticOptions
    replay: ReplayOptions
    return_normalization: bool = True
    replay_value_weight: float = 0.0

    def __post_init__(self) -> None:
        check_bool("return_normalization", self.return_normalization)
        weight = check_real("replay_value_weight", self.replay_value_weight)
        if weight < 0.0:
            raise ValueError(f"replay_value_weight must be non-negative, got {weight!r}")
        object.__setattr__(self, "replay_value_weight", weight)
        if self.critic.reduction != "mean":
            raise ValueError("dreamer_v3_behavior_loss reduces by the mean (torchrl's default); "
                             "call dreamer_v3_value_loss for another reduction")

    @property
    def has_replay(self) -> bool:
        return self.replay_value_weight > 0.0


@dataclass(frozen=True)
class BehaviorShapes:
    returns: ReturnShapes
    actor: ActorShapes
    critic: CriticShapes
    replay: ReplayShapes | None


def validate_behavior(reward, next_value, continuation, root_continuation, value_pred, low, high,
                      baseline, log_prob, entropy, slow_value, replay_inputs,
                      opts: BehaviorOptions) -> BehaviorShapes:
    """Check the inputs of :func:`dreamer_v3_behavior_loss`: the imagined rollout ``[*B, H, ·]``
    and, with a replay term, the replay batch ``[B', T, ·]`` with ``B'·T`` = the number of
    imagination starts (torchrl starts imagination from every replay state, in order)."""
    returns = validate_returns(reward, next_value, continuation, root_continuation)
    steps, device = returns.steps, reward.device
    for name, t in (("low", low), ("high", high)):
        check_float(name, t)
        if t.numel() != 1 or t.requires_grad or t.device != device:
            raise ValueError(f"{name} must be a one-element buffer without grad on the inputs' "
                             f"device ({device}), got shape {tuple(t.shape)} on {t.device}")
    _check_buffer_dtypes(low, high)
    policy = validate_policy(steps, device, baseline, log_prob, entropy, opts.actor)
    actor = ActorShapes(steps, torch.promote_types(policy, returns.dtype))
    head = validate_critic_head(value_pred, steps, device, slow_value, opts.critic)
    critic = CriticShapes(steps, head.bins, head.slow_logits,
                          torch.promote_types(head.dtype, returns.dtype))
    replay = None
    if opts.has_replay:
        names = ("replay_value_pred", "replay_reward", "replay_done", "replay_terminated")
        for name, t in zip(names, replay_inputs[:4]):
            if t is None:
                raise ValueError(f"replay_value_weight > 0 computes the replay value loss, which "
                                 f"needs {name}")
        pred, r, d, term, slow = replay_inputs
        replay = validate_replay(pred, r, d, term, None, slow, opts.critic, prefix="replay_")
        starts = math.prod(steps[:-1])
        if math.prod(replay.steps) != starts:
            raise ValueError(
                f"the replay batch {tuple(replay.steps)} must hold one state per imagination start "
                f"({starts} starts: {tuple(steps[:-1])}); its returns bootstrap from theirs")
        if r.device != device:
            raise ValueError(f"all inputs must be on one device, got replay_reward on {r.device} "
                             f"and reward on {device}")
        replay = ReplayShapes(replay.steps, replay.bins, replay.slow_logits,
                              torch.promote_types(replay.dtype, returns.dtype))
    return BehaviorShapes(returns, actor, critic, replay)
