"""The pure-torch DreamerV3 behaviour losses: the spec of the fused behaviour kernels and their
oracle.

They compute what torchrl's ``DreamerV3ActorLoss``, ``DreamerV3ValueLoss`` and the replay-value
term of ``DreamerV3Loss`` compute after the networks and the imagination rollout (Hafner et al.,
2023), term by term, in the order the kernels compute them. Imagined tensors are ``[*B, H, 1]``:
``*B`` the imagination starts, H the horizon; step t holds the reward, continuation and value of
the state reached after t + 1 steps (``next_value``), or of the state t itself (the roots).

λ-return, a scan backwards over H per start::

    R_{H-1} = r_{H-1} + γ c_{H-1} v_{H-1}          (the bootstrap R_H = v_{H-1})
    R_t     = r_t + γ c_t ((1 − λ) v_t + λ R_{t+1})

Discount weights, detached, from the root continuations ``ĉ`` (ones when not given)::

    inclusive        w_t = ĉ_0 Π_{1≤i≤t} γ ĉ_i          (torchrl: cumprod(cat([ĉ_0, γ ĉ_1:])))
    inclusive_gamma  w_t = Π_{0≤i≤t} γ ĉ_i
    exclusive        w_t = Π_{0≤i<t} γ ĉ_i, w_0 = 1

Return normalisation (torchrl's ``PercentileValueNorm``): ``lo, hi`` the quantiles of all the
detached returns (linear interpolation, as ``torch.quantile``), in the buffers' dtype; when
updating, ``low ← lerp(low, lo, rate)`` and ``high ← lerp(high, hi, rate)`` in place, before use;
``scale = max(min_scale, high − low)``.

Actor::

    REINFORCE       −mean(w · log π · sg((R − b) / scale))     (/ scale unless normalize_advantage
                                                                is off)
    reparameterised −mean(w · (R − b) / scale)                  (b = 0 when no baseline is given)
    entropy bonus   − η · mean(w · H)                           (w = 1 unless weight_entropy)

Critic, per step: the two-hot cross-entropy ``lse(l) − (w_lo l_lo + w_hi l_hi)`` of the value
logits against ``sg(R)`` over the bins (raw values, or after symlog of the bins and the target),
or ``(symlog v̂ − symlog sg(R))²``; plus ``reg ·`` the same against the slow critic's value (its
logits decoded as the expectation over the bins, in the two-hot space); weighted by ``w`` and
reduced.

Replay value (torchrl's ``replay_value_loss``): TD(λ) along the replay time dim with
``γ = 1 − 1/horizon``, from step k + 1 on, bootstrapped from ``bootstrap`` (zero where terminated),
``done`` cutting λ::

    g_{T-2} = v'_{T-1};  g_k = v'_{k+1} if done_{k+1} else R_{k+1}
    R_k = r_{k+1} + γ ((1 − λ) v'_{k+1} + λ g_k),   v' = bootstrap · ¬terminated

then the critic terms of the logits of steps 0 … T−2 against ``sg(R)``, weighted by ``¬done``.

Numerics: every term in float32, or float64 when one of its floating inputs is float64 (float16
and bfloat16 inputs are upcast); the percentiles in the buffers' dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..core.math import default_bins, symexp, symlog, two_hot, two_hot_cross_entropy
from .validation import (
    ActorOptions,
    BehaviorOptions,
    BehaviorShapes,
    CriticOptions,
    ReplayOptions,
    ReturnOptions,
    ScaleOptions,
)

# ---- λ-returns and discount weights --------------------------------------------------------------


def lambda_returns(reward: torch.Tensor, next_value: torch.Tensor,
                   continuation: torch.Tensor | None, opts: ReturnOptions,
                   dtype: torch.dtype) -> torch.Tensor:
    """``R [*B, H, 1]``, differentiable with respect to reward, next_value and continuation."""
    reward, next_value = reward.to(dtype), next_value.to(dtype)
    cont = torch.ones_like(reward) if continuation is None else continuation.to(dtype)
    gamma, lmbda = opts.gamma, opts.lmbda
    next_return = next_value[..., -1, :]
    returns = []
    for r_t, v_t, c_t in zip(reversed(reward.unbind(-2)), reversed(next_value.unbind(-2)),
                             reversed(cont.unbind(-2))):
        next_return = r_t + gamma * c_t * ((1 - lmbda) * v_t + lmbda * next_return)
        returns.append(next_return)
    return torch.stack(returns[::-1], dim=-2)


def discount_weights(root_continuation: torch.Tensor | None, steps: torch.Size,
                     opts: ReturnOptions, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """``w [*B, H, 1]``, detached (ones when ``discount_loss`` is off)."""
    if not opts.discount_loss:
        return torch.ones((*steps, 1), dtype=dtype, device=device)
    rc = (torch.ones((*steps, 1), dtype=dtype, device=device) if root_continuation is None
          else root_continuation.detach().to(dtype))
    gamma = opts.gamma
    if opts.discount_weights == "inclusive":
        factors = torch.cat([rc[..., :1, :], gamma * rc[..., 1:, :]], dim=-2)
    elif opts.discount_weights == "inclusive_gamma":
        factors = gamma * rc
    else:
        factors = torch.cat([torch.ones_like(rc[..., :1, :]), gamma * rc[..., :-1, :]], dim=-2)
    return factors.cumprod(dim=-2)


# ---- return normalisation ------------------------------------------------------------------------


def gather_returns(flat: torch.Tensor, process_group) -> torch.Tensor:
    """``flat`` of every rank of ``process_group``, concatenated (all ranks must give the same
    number of returns). ``process_group=True`` means the default group."""
    group = None if process_group is True else process_group
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, flat.contiguous(), group=group)
    return torch.cat(parts)


def return_quantiles(returns: torch.Tensor, opts: ScaleOptions,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The two quantiles of all elements of ``returns`` (flat, detached, in ``dtype``), linear
    interpolation, each of shape [1]."""
    flat = returns.detach().reshape(-1).to(dtype)
    low = torch.quantile(flat, opts.quantiles[0]).reshape(1)
    high = torch.quantile(flat, opts.quantiles[1]).reshape(1)
    return low, high


def return_scale(returns: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                 opts: ScaleOptions, process_group=None) -> torch.Tensor:
    """``max(min_scale, high − low)`` (0-dim, detached), after updating ``low`` and ``high`` in
    place when ``opts.update``."""
    if opts.update:
        with torch.no_grad():
            flat = returns.detach().reshape(-1).to(low.dtype)
            if process_group is not None:
                flat = gather_returns(flat, process_group)
            batch_low, batch_high = return_quantiles(flat, opts, low.dtype)
            low.lerp_(batch_low.reshape(low.shape), opts.rate)
            high.lerp_(batch_high.reshape(high.shape), opts.rate)
    return (high - low).detach().clamp_min(opts.min_scale).reshape(())


# ---- actor ---------------------------------------------------------------------------------------


def _steps(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """``t`` as ``[*B, H, 1]`` (from ``[*B, H]`` or ``[*B, H, 1]``)."""
    if t is None or t.dim() == like.dim():
        return t
    return t.unsqueeze(-1)


def actor_loss(returns: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor,
               baseline: torch.Tensor | None, log_prob: torch.Tensor | None,
               entropy: torch.Tensor | None, opts: ActorOptions,
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``{"loss_actor", "actor_entropy"}``, 0-dim in ``dtype``."""
    returns = returns.to(dtype)
    w = weights.detach().to(dtype)
    scale = scale.detach().to(dtype).reshape(())
    baseline, log_prob, entropy = (None if t is None else _steps(t, returns).to(dtype)
                                   for t in (baseline, log_prob, entropy))
    target = returns if baseline is None else returns - baseline
    if opts.use_reinforce:
        advantage = target.detach()
        if opts.normalize_advantage:
            advantage = advantage / scale
        loss = -(w * log_prob * advantage).mean()
    else:
        loss = -(w * target / scale).mean()
    if entropy is not None and opts.has_entropy:
        bonus = (w * entropy if opts.weight_entropy else entropy).mean()
        loss = loss - opts.entropy_bonus * bonus
    else:
        bonus = loss.new_zeros(())
    return {"loss_actor": loss, "actor_entropy": bonus.detach()}


# ---- critic --------------------------------------------------------------------------------------


def value_support(opts: CriticOptions, width: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """The two-hot bins in raw values, detached (a support, as torchrl's buffer): the user's, or
    torchrl's default of ``width`` bins."""
    bins = opts.value_bins if opts.value_bins is not None else default_bins(width, device)
    return bins.detach().to(device=device, dtype=dtype)


def decode(logits: torch.Tensor, bins: torch.Tensor, space: str) -> torch.Tensor:
    """The expectation of ``softmax(logits)`` over the bins, in the two-hot space: ``Σ p b`` (raw)
    or ``symexp(Σ p symlog(b))`` (symlog)."""
    probs = torch.softmax(logits, dim=-1)
    if space == "symlog":
        return symexp((probs * symlog(bins)).sum(-1))
    return (probs * bins).sum(-1)


def critic_rows(prediction: torch.Tensor, target: torch.Tensor, bins: torch.Tensor | None,
                space: str) -> torch.Tensor:
    """The critic loss per step against the detached ``target`` ``[*S]``: two-hot cross-entropy of
    the logits ``prediction [*S, R]`` over ``bins``, or, when ``bins`` is None, the symlog squared
    error of the values ``prediction [*S]``."""
    target = target.detach()
    if bins is None:
        return (symlog(prediction) - symlog(target)).square()
    if space == "symlog":
        target, bins = symlog(target), symlog(bins)
    return two_hot_cross_entropy(prediction, *two_hot(target, bins))


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """torchrl's ``_reduce_loss`` without a mask."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def critic_loss(value_pred: torch.Tensor, returns: torch.Tensor, weights: torch.Tensor | None,
                slow_value: torch.Tensor | None, opts: CriticOptions, slow_logits: bool,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weighted loss, weighted slow term)`` per step ``[*S]`` (before the reduction):
    ``w · (ce(R) + reg · ce(slow))`` and ``w · ce(slow)`` (zeros without the regulariser).
    ``value_pred``, ``returns``, ``weights`` and ``slow_value`` are aligned ``[*S, ·]``."""
    value_pred = value_pred.to(dtype)
    target = returns.detach().to(dtype).squeeze(-1)
    bins = None
    if opts.two_hot:
        bins = value_support(opts, value_pred.shape[-1], value_pred.device, dtype)
    else:
        value_pred = value_pred.squeeze(-1)
    loss = critic_rows(value_pred, target, bins, opts.two_hot_space)
    if opts.has_slow:
        slow_value = slow_value.detach().to(dtype)
        slow_target = (decode(slow_value, bins, opts.two_hot_space) if slow_logits
                       else slow_value.squeeze(-1))
        slow = critic_rows(value_pred, slow_target, bins, opts.two_hot_space)
        loss = loss + opts.slow_critic_regularization * slow
    else:
        slow = torch.zeros_like(loss)
    if weights is not None:
        w = weights.detach().to(dtype).squeeze(-1)
        loss, slow = w * loss, w * slow
    return loss, slow


def value_loss(value_pred: torch.Tensor, returns: torch.Tensor, weights: torch.Tensor | None,
               slow_value: torch.Tensor | None, opts: CriticOptions, slow_logits: bool,
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``{"loss_value", "value_slow_loss"}`` reduced as ``opts.reduction``."""
    loss, slow = critic_loss(value_pred, returns, weights, slow_value, opts, slow_logits, dtype)
    return {"loss_value": reduce(loss, opts.reduction),
            "value_slow_loss": reduce(slow, opts.reduction).detach()}


# ---- replay value --------------------------------------------------------------------------------


def _flags(t: torch.Tensor, steps: torch.Size) -> torch.Tensor:
    """A flag tensor ``[B, T]`` as bool (non-zero is true)."""
    t = t.reshape(steps)
    return t if t.dtype == torch.bool else t != 0


def replay_returns(reward: torch.Tensor, done: torch.Tensor, terminated: torch.Tensor,
                   bootstrap: torch.Tensor, opts: ReplayOptions, steps: torch.Size,
                   dtype: torch.dtype) -> torch.Tensor:
    """The replay λ-returns ``[B, T − 1]``, detached: target k for replay state k."""
    reward = reward.detach().reshape(steps).to(dtype)[..., 1:]
    done = _flags(done, steps)[..., 1:]
    terminated = _flags(terminated, steps)[..., 1:]
    value = bootstrap.detach().reshape(steps).to(dtype)[..., 1:]
    value = torch.where(terminated, torch.zeros_like(value), value)
    gamma, lmbda = opts.gamma, opts.lmbda
    g = value[..., -1]
    returns = []
    for r_k, d_k, v_k in zip(reversed(reward.unbind(-1)), reversed(done.unbind(-1)),
                             reversed(value.unbind(-1))):
        g = torch.where(d_k, v_k, g)
        g = r_k + gamma * ((1 - lmbda) * v_k + lmbda * g)
        returns.append(g)
    return torch.stack(returns[::-1], dim=-1)


def replay_value_loss(value_pred: torch.Tensor, reward: torch.Tensor, done: torch.Tensor,
                      terminated: torch.Tensor, bootstrap: torch.Tensor,
                      slow_value: torch.Tensor | None, replay: ReplayOptions,
                      opts: CriticOptions, steps: torch.Size, slow_logits: bool,
                      dtype: torch.dtype) -> torch.Tensor:
    """The reduced replay value loss (``loss_replay_value`` before its weight)."""
    target = replay_returns(reward, done, terminated, bootstrap, replay, steps, dtype)
    keep = ~_flags(done, steps)[..., :-1]
    prediction = value_pred[..., :-1, :]
    slow = None if slow_value is None or not opts.has_slow else slow_value[..., :-1, :]
    loss, _ = critic_loss(prediction, target.unsqueeze(-1), None, slow, opts, slow_logits, dtype)
    return reduce(keep.to(loss.dtype) * loss, opts.reduction)


# ---- the whole behaviour objective ---------------------------------------------------------------


def behavior_loss(reward: torch.Tensor, next_value: torch.Tensor,
                  continuation: torch.Tensor | None, root_continuation: torch.Tensor | None,
                  value_pred: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                  baseline: torch.Tensor | None, log_prob: torch.Tensor | None,
                  entropy: torch.Tensor | None, slow_value: torch.Tensor | None,
                  replay_inputs: tuple, opts: BehaviorOptions, shapes: BehaviorShapes,
                  process_group=None) -> dict[str, torch.Tensor]:
    """torchrl's ``DreamerV3Loss`` after the networks: the actor, the critic and the replay value
    from one imagined rollout (see :func:`fused_dreamer_loss.behavior_v3.dreamer_v3_behavior_loss`)."""
    dtype = shapes.returns.dtype
    returns = lambda_returns(reward, next_value, continuation, opts.returns, dtype)
    weights = discount_weights(root_continuation, shapes.returns.steps, opts.returns, dtype,
                               reward.device)
    if opts.return_normalization:
        scale = return_scale(returns, low, high, opts.scale, process_group)
    else:
        scale = torch.ones((), dtype=dtype, device=reward.device)
    losses = actor_loss(returns, weights, scale, baseline, log_prob, entropy, opts.actor,
                        shapes.actor.dtype)
    losses.update(value_loss(value_pred, returns, weights, slow_value, opts.critic,
                             shapes.critic.slow_logits, shapes.critic.dtype))
    if opts.has_replay:
        pred, r, d, term, slow = replay_inputs
        steps = shapes.replay.steps
        bootstrap = returns[..., 0, 0].detach().reshape(steps)
        replay = replay_value_loss(pred, r, d, term, bootstrap, slow, opts.replay, opts.critic,
                                   steps, shapes.replay.slow_logits, shapes.replay.dtype)
        losses["loss_replay_value"] = opts.replay_value_weight * replay
    losses.update(lambda_target=returns.detach(), discount_weight=weights,
                  return_scale=scale.detach())
    return losses
