"""The functional DreamerV3 behaviour losses: validation, then the one place that picks a backend.

Five functions, one per phase of torchrl's actor and critic math (``lambda_returns``,
``return_scale``, ``dreamer_v3_actor_loss``, ``dreamer_v3_value_loss``, ``replay_value_loss``);
their names, arguments and defaults are torchrl's, and keyword options added to each express the
other codebases' conventions (:data:`fused_dreamer_loss.behavior_v3.BEHAVIOR_CONVENTIONS`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..core.dispatch import (NO_KEY, bins_key, cacheable, call_key, calls_table, remember,
                             require_triton, resolve_backend, values_key)
from ..core.validation import check_backend, kernels_can_take
from . import reference
from .validation import (
    ActorOptions,
    BehaviorOptions,
    CriticOptions,
    ReplayOptions,
    ReturnOptions,
    ScaleOptions,
    validate_actor,
    validate_behavior,
    validate_critic,
    validate_replay,
    validate_returns,
    validate_scale,
)


def _fused(backend: str, tensors: Sequence[torch.Tensor | None]) -> bool:
    """Whether the fused kernels run this call (see :func:`core.dispatch.resolve_backend`);
    ``meta`` tensors and those of ``torch.func`` transforms take the reference."""
    check_backend(backend)
    present = [t for t in tensors if t is not None]
    return kernels_can_take(present) and resolve_backend(backend, present[0].device) != "torch"


def _kernels():
    """The fused behaviour kernel module (importing triton), or a RuntimeError saying why it
    cannot run."""
    require_triton()
    from . import kernels
    return kernels


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _prepared(calls: dict, prepare: Callable[[], tuple], tensors: tuple, options: tuple,
              backend: str, bins=None, quantiles=None, process_group=None) -> tuple:
    """What ``prepare()`` gives for a call of this signature (validated options and shapes, the
    fused call where the kernels run it), kept in ``calls``: the tensors', the options' (plain
    values, see :func:`~fused_dreamer_loss.core.dispatch.values_key`), the bins'
    (:func:`~fused_dreamer_loss.core.dispatch.bins_key`), the quantiles' and the process group's.
    A call that cannot be keyed is prepared afresh, so that bad input raises at every call."""
    key = None
    if cacheable():
        parts = (bins_key(bins), _quantiles_key(quantiles))
        if all(part is not NO_KEY for part in parts):
            key = call_key(tensors, (values_key(options), *parts, process_group), backend)
    prepared = calls.get(key) if key is not None else None
    if prepared is None:
        prepared = prepare()
        remember(calls, key, prepared)
    return prepared


def _quantiles_key(quantiles):
    """The quantiles in a call's signature: None for None (no quantiles), their values for a
    tuple (a list is made one before); anything else cannot be keyed (its validation says
    why)."""
    if quantiles is None:
        return None
    return values_key(quantiles) if isinstance(quantiles, tuple) else NO_KEY


#: Each entry point's prepared calls by signature (see :func:`_prepared`).
_RETURNS_CALLS = calls_table()
_SCALE_CALLS = calls_table()
_ACTOR_CALLS = calls_table()
_VALUE_CALLS = calls_table()
_REPLAY_CALLS = calls_table()
_CALLS = calls_table()


def lambda_returns(
    reward: torch.Tensor,
    next_value: torch.Tensor,
    continuation: torch.Tensor | None = None,
    root_continuation: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
    lmbda: float = 0.95,
    discount_loss: bool = True,
    discount_weights: str = "inclusive",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """torchrl's ``DreamerV3ActorLoss.lambda_target`` and its discount weights.

    ``R_t = r_t + γ c_t ((1 − λ) v_t + λ R_{t+1})`` backwards over the horizon from
    ``R_H = v_{H−1}``, and ``w = cumprod(cat([ĉ_0, γ ĉ_1:]))`` over the root continuations ``ĉ``.

    Args:
        reward, next_value, continuation: ``[*B, H, 1]``: the reward, value and continuation of
            the state each imagined step reaches (continuation None: 1 everywhere).
        root_continuation: ``[*B, H, 1]``, the continuation of each step's root state (torchrl:
            the first imagined state's, then ``continuation[..., :-1, :]``); None: ones.
        gamma, lmbda: the discount and the λ of the return, in [0, 1].
        discount_loss: weights ones when False (torchrl's flag).
        discount_weights: ``"inclusive"`` (torchrl, the references, SheepRL: ``w_t = ĉ_0
            Π_{1≤i≤t} γ ĉ_i``), ``"inclusive_gamma"`` (r2dreamer: ``Π_{0≤i≤t} γ ĉ_i``) or
            ``"exclusive"`` (dreamerv3-torch: ``Π_{0≤i<t} γ ĉ_i``, ``w_0 = 1``).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see
            :func:`fused_dreamer_loss.dreamer_v3_model_loss`).

    Returns:
        ``(returns, weights)``, both ``[*B, H, 1]`` in float32 (float64 when an input is float64).
        ``returns`` is differentiable with respect to ``reward``, ``next_value`` and
        ``continuation``; ``weights`` is detached.

    Raises:
        TypeError: non-tensor inputs, non-float dtypes, options of the wrong type.
        ValueError: shapes that are not ``[*B, H, 1]`` or disagree, tensors on different devices,
            options out of range (the message names the argument).

    Example:
        >>> import torch
        >>> from fused_dreamer_loss.behavior_v3 import lambda_returns
        >>> reward, value = torch.ones(2, 3, 1), torch.zeros(2, 3, 1)
        >>> returns, weights = lambda_returns(reward, value, gamma=0.5, lmbda=1.0,
        ...                                  backend="torch")
        >>> returns[0, :, 0]
        tensor([1.7500, 1.5000, 1.0000])
        >>> weights[0, :, 0]
        tensor([1.0000, 0.5000, 0.2500])
    """
    tensors = (reward, next_value, continuation, root_continuation)
    options = (gamma, lmbda, discount_loss, discount_weights)
    opts, shapes, fused = _prepared(_RETURNS_CALLS, lambda: _prepare_returns(tensors, options,
                                                                             backend),
                                    tensors, options, backend)
    if fused is not None:
        return _kernels().run_lambda_returns(fused, *tensors)
    returns = reference.lambda_returns(reward, next_value, continuation, opts, shapes.dtype)
    weights = reference.discount_weights(root_continuation, shapes.steps, opts, shapes.dtype,
                                         reward.device)
    return returns, weights


def _prepare_returns(tensors: tuple, options: tuple, backend: str) -> tuple:
    opts = ReturnOptions(*options)
    shapes = validate_returns(*tensors)
    fused = _kernels().returns_call(opts, shapes) if _fused(backend, tensors) else None
    return opts, shapes, fused


def return_scale(
    returns: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    *,
    quantiles: tuple[float, float] = (0.05, 0.95),
    rate: float = 0.01,
    min_scale: float = 1.0,
    update: bool = True,
    process_group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """torchrl's ``PercentileValueNorm`` update and scale, as ``DreamerV3ActorLoss`` uses them.

    When ``update``: ``low ← low + rate · (quantile(sg(R), q_lo) − low)`` and the same for
    ``high``, in place on the device, the quantiles over all elements of ``returns`` with linear
    interpolation (``torch.quantile``'s), in the buffers' dtype. Then the scale
    ``max(min_scale, high − low)``.

    Args:
        returns: the λ-returns, any shape (all elements count).
        low, high: the running statistics, float tensors of one element (torchrl's
            ``retnorm.low`` / ``retnorm.high``, shape [1]); written in place when ``update``.
        quantiles: ``(q_lo, q_hi)``, ``0 ≤ q_lo < q_hi ≤ 1``.
        rate: the EMA rate, in [0, 1].
        min_scale: the scale's floor, positive.
        update: update the statistics first (torchrl: only in training mode).
        process_group: all-gather the returns over this ``torch.distributed`` group (``True``:
            the default group) before taking the quantiles, as the 2024 reference and SheepRL do
            (every rank must give the same number of returns).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        The 0-dim scale, detached, in the buffers' dtype.

    Example:
        >>> import torch
        >>> from fused_dreamer_loss.behavior_v3 import return_scale
        >>> low, high = torch.zeros(1), torch.zeros(1)
        >>> returns = torch.linspace(0.0, 1000.0, 101)
        >>> return_scale(returns, low, high, rate=0.5, backend="torch")
        tensor(450.)
        >>> low, high
        (tensor([25.]), tensor([475.]))
    """
    quantiles = tuple(quantiles) if isinstance(quantiles, list) else quantiles
    tensors = (returns, low, high)
    options = (rate, min_scale, update)
    opts, fused = _prepared(_SCALE_CALLS, lambda: _prepare_scale(tensors, quantiles, options,
                                                                 backend),
                            tensors, options, backend, None, quantiles, process_group)
    if fused is not None:
        values = _kernels().scale_values(returns, low, opts, process_group)
        return fused(None, None, None, None, values, low, high)[2]
    return reference.return_scale(returns, low, high, opts, process_group)


def _prepare_scale(tensors: tuple, quantiles, options: tuple, backend: str) -> tuple:
    opts = ScaleOptions(quantiles, *options)
    validate_scale(*tensors)
    return opts, _kernels().ReturnsCall(None, opts) if _fused(backend, tensors) else None


def dreamer_v3_actor_loss(
    returns: torch.Tensor,
    weights: torch.Tensor,
    scale: torch.Tensor,
    *,
    baseline: torch.Tensor | None = None,
    log_prob: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_bonus: float = 3e-4,
    use_reinforce: bool = False,
    normalize_advantage: bool = True,
    weight_entropy: bool = True,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """torchrl's ``DreamerV3ActorLoss`` objective after the rollout and the policy's log-probs.

    REINFORCE (``use_reinforce``): ``−mean(w · log π · sg((R − b) / scale))``; else the
    reparameterised ``−mean(w · (R − b) / scale)`` (torchrl: no baseline, ``b = 0``); minus
    ``entropy_bonus · mean(w · H)`` when ``entropy`` is given and ``entropy_bonus > 0``.

    Args:
        returns: the λ-returns ``[*B, H, 1]`` (differentiable for the reparameterised actor).
        weights: the discount weights ``[*B, H, 1]`` (detached inside).
        scale: the return scale, one element (detached inside).
        baseline: the critic's value of each step's root state, ``[*B, H, 1]`` or ``[*B, H]``;
            needed with ``use_reinforce`` (detached there; differentiable in the reparameterised
            loss, as dreamerv3-torch's "dynamics" gradient).
        log_prob: ``log π(sg(a) | sg(s))`` of each step, ``[*B, H, 1]`` or ``[*B, H]``; needed with
            ``use_reinforce``.
        entropy: the policy's entropy per step (analytic, or a one-sample ``−log π(a')`` estimate
            as torchrl's for a TanhNormal), ``[*B, H, 1]`` or ``[*B, H]``.
        entropy_bonus: η; the bonus applies when positive.
        use_reinforce: the score-function estimator instead of the reparameterised return.
        normalize_advantage: divide the REINFORCE advantage by ``scale`` (False: dreamerv3-torch).
        weight_entropy: weight the entropy by ``w`` (False: dreamerv3-torch).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``{"loss_actor": 0-dim, "actor_entropy": 0-dim, detached}`` (``actor_entropy`` is the
        weighted mean entropy, 0 without an entropy or a positive bonus), in float32 (float64
        when an input is float64).

    Example:
        >>> import torch
        >>> from fused_dreamer_loss.behavior_v3 import dreamer_v3_actor_loss
        >>> returns = torch.ones(2, 3, 1, requires_grad=True)
        >>> losses = dreamer_v3_actor_loss(returns, torch.ones(2, 3, 1), torch.tensor(2.0),
        ...                                entropy=torch.ones(2, 3), backend="torch")
        >>> losses["loss_actor"]
        tensor(-0.5003, grad_fn=<SubBackward0>)
        >>> losses["actor_entropy"]
        tensor(1.)
    """
    tensors = (returns, weights, scale, baseline, log_prob, entropy)
    options = (entropy_bonus, use_reinforce, normalize_advantage, weight_entropy)
    opts, shapes, terms = _prepared(_ACTOR_CALLS, lambda: _prepare_actor(tensors, options,
                                                                         backend),
                                    tensors, options, backend)
    if terms is not None:
        return _kernels().run_terms(terms, **_actor_tensors(opts, *tensors))
    return reference.actor_loss(*tensors, opts, shapes.dtype)


def _prepare_actor(tensors: tuple, options: tuple, backend: str) -> tuple:
    opts = ActorOptions(*options)
    shapes = validate_actor(*tensors, opts)
    terms = None
    if _fused(backend, tensors):
        k = _kernels()
        terms = k.TermsCall(k.TermsOptions(actor=opts), k.TermsShapes(actor_dtype=shapes.dtype))
    return opts, shapes, terms


def dreamer_v3_value_loss(
    value_pred: torch.Tensor,
    returns: torch.Tensor,
    weights: torch.Tensor | None,
    *,
    value_loss: str = "symlog_mse",
    value_bins: torch.Tensor | Sequence[float] | None = None,
    slow_value: torch.Tensor | None = None,
    slow_critic_regularization: float = 0.0,
    reduction: str = "mean",
    two_hot_space: str = "raw",
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """torchrl's ``DreamerV3ValueLoss.forward`` after the value network.

    Per step: the two-hot cross-entropy of the value logits against ``sg(R)`` (or
    ``(symlog v̂ − symlog sg(R))²``), plus ``slow_critic_regularization ·`` the same against the
    slow critic's value; weighted by ``weights`` and reduced.

    Args:
        value_pred: the critic's logits ``[*B, H, R]`` (``"two_hot"``) or values ``[*B, H, 1]``
            (``"symlog_mse"``), for each step's root state.
        returns: the λ-returns ``[*B, H, 1]`` (the target; detached inside).
        weights: the discount weights ``[*B, H, 1]`` (detached inside), or None (ones).
        value_loss: ``"symlog_mse"`` (torchrl's default) or ``"two_hot"``.
        value_bins: the two-hot support in raw values (R ascending values; default torchrl's
            symexp bins of R = the logits' width); put it on the inputs' device for a captured
            step (a CPU tensor or a sequence is copied at every call).
        slow_value: the slow critic's decoded value ``[*B, H, 1]``, or its logits ``[*B, H, R]``
            (decoded as the expectation over the bins); needed when the regulariser is on.
        slow_critic_regularization: the regulariser's weight (non-negative; on when non-zero).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (torchrl's; ``"none"``, per step, runs
            the reference on every backend).
        two_hot_space: ``"raw"`` (torchrl, the 2024 reference, r2dreamer) or ``"symlog"``
            (the 2023 reference, dreamerv3-torch, SheepRL: bins, targets and the slow decode in
            symlog space).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``{"loss_value", "value_slow_loss"}``: ``reduce(w · (ce(R) + reg · ce(slow)))`` and the
        detached ``reduce(w · ce(slow))`` (zeros without the regulariser): 0-dim, or ``[*B, H]``
        with ``reduction="none"``.

    Example:
        >>> import torch
        >>> from fused_dreamer_loss.behavior_v3 import dreamer_v3_value_loss
        >>> logits = torch.zeros(2, 3, 255, requires_grad=True)
        >>> returns, weights = torch.ones(2, 3, 1), torch.ones(2, 3, 1)
        >>> losses = dreamer_v3_value_loss(logits, returns, weights, value_loss="two_hot",
        ...                                backend="torch")
        >>> losses["loss_value"].detach()  # log(255): uniform logits
        tensor(5.5413)
    """
    tensors = (value_pred, returns, weights, slow_value)
    options = (value_loss, slow_critic_regularization, reduction, two_hot_space)
    opts, shapes, terms = _prepared(_VALUE_CALLS, lambda: _prepare_value(tensors, options,
                                                                         value_bins, backend),
                                    tensors, options, backend, value_bins)
    if terms is not None:
        return _kernels().run_terms(
            terms, returns=returns.detach(), weights=_detach(weights), value_pred=value_pred,
            slow_value=_detach(slow_value) if opts.has_slow else None)
    return reference.value_loss(*tensors, opts, shapes.slow_logits, shapes.dtype)


def _prepare_value(tensors: tuple, options: tuple, value_bins, backend: str) -> tuple:
    opts = CriticOptions(*options, value_bins)
    shapes = validate_critic(*tensors, opts)
    terms = None
    if opts.reduction != "none" and _fused(backend, tensors):
        k = _kernels()
        terms = k.TermsCall(
            k.TermsOptions(critic=opts, imagined=True),
            k.TermsShapes(critic_dtype=shapes.dtype, slow_logits=shapes.slow_logits))
    return opts, shapes, terms


def replay_value_loss(
    value_pred: torch.Tensor,
    reward: torch.Tensor,
    done: torch.Tensor,
    terminated: torch.Tensor,
    bootstrap: torch.Tensor,
    *,
    horizon: float = 333.0,
    lmbda: float = 0.95,
    value_loss: str = "two_hot",
    value_bins: torch.Tensor | Sequence[float] | None = None,
    slow_value: torch.Tensor | None = None,
    slow_critic_regularization: float = 0.0,
    reduction: str = "mean",
    two_hot_space: str = "raw",
    backend: str = "auto",
) -> torch.Tensor:
    """torchrl's ``DreamerV3ValueLoss.replay_value_loss`` after the value network, without its
    host synchronisations.

    TD(λ) along the replay time dim with ``γ = 1 − 1/horizon``: target k uses the reward, flags
    and bootstrap of step k + 1 on (``terminated`` zeroes the bootstrap, ``done`` cuts λ); the
    critic terms of steps 0 … T−2 against it, weighted by ``¬done``, reduced.

    Args:
        value_pred: the critic's logits ``[B, T, R]`` (``"two_hot"``) or values ``[B, T, 1]``
            on the replay's posterior states.
        reward: the replay reward ``[B, T, 1]`` (torchrl's ``("next", "reward")``).
        done, terminated: ``[B, T, 1]`` flags (bool, or numbers: non-zero is true).
        bootstrap: ``[B, T]`` or ``[B, T, 1]``: the first imagined return of each replay state.
        horizon: the discount horizon (``γ = 1 − 1/horizon``), at least 1.
        lmbda: λ, in [0, 1].
        value_loss, value_bins, slow_value, slow_critic_regularization, reduction,
            two_hot_space: as :func:`dreamer_v3_value_loss` (``slow_value`` over the replay
            states, ``[B, T, 1]`` values or ``[B, T, R]`` logits).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        The replay value loss before torchrl's 0.3 weight: 0-dim (``"mean"``, ``"sum"``) or
        ``[B, T − 1]`` (``"none"``).

    Example:
        >>> import torch
        >>> from fused_dreamer_loss.behavior_v3 import replay_value_loss
        >>> B, T = 2, 5
        >>> logits = torch.zeros(B, T, 255, requires_grad=True)
        >>> flags = torch.zeros(B, T, 1, dtype=torch.bool)
        >>> loss = replay_value_loss(logits, torch.randn(B, T, 1), flags, flags,
        ...                          torch.randn(B, T), backend="torch")
        >>> loss.shape
        torch.Size([])
    """
    tensors = (value_pred, reward, done, terminated, bootstrap, slow_value)
    options = (horizon, lmbda, value_loss, slow_critic_regularization, reduction, two_hot_space)
    replay, opts, shapes, terms = _prepared(
        _REPLAY_CALLS, lambda: _prepare_replay(tensors, options, value_bins, backend), tensors,
        options, backend, value_bins)
    if terms is not None:
        return _kernels().run_terms(terms, **_replay_tensors(opts, *tensors))["loss_replay_value"]
    return reference.replay_value_loss(*tensors, replay, opts, shapes.steps, shapes.slow_logits,
                                       shapes.dtype)


def _prepare_replay(tensors: tuple, options: tuple, value_bins, backend: str) -> tuple:
    horizon, lmbda, *critic = options
    replay = ReplayOptions(horizon, lmbda)
    opts = CriticOptions(*critic, value_bins)
    shapes = validate_replay(*tensors, opts)
    value_pred, reward, _, _, bootstrap, slow_value = tensors
    terms = None
    if opts.reduction != "none" and _fused(backend, (value_pred, reward, bootstrap, slow_value)):
        k = _kernels()
        terms = k.TermsCall(
            k.TermsOptions(critic=opts, replay=replay),
            k.TermsShapes(replay_dtype=shapes.dtype, replay_slow_logits=shapes.slow_logits,
                          replay_steps=shapes.steps))
    return replay, opts, shapes, terms


def dreamer_v3_behavior_loss(
    reward: torch.Tensor,
    next_value: torch.Tensor,
    value_pred: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    continuation: torch.Tensor | None = None,
    root_continuation: torch.Tensor | None = None,
    *,
    baseline: torch.Tensor | None = None,
    log_prob: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    slow_value: torch.Tensor | None = None,
    replay_value_pred: torch.Tensor | None = None,
    replay_reward: torch.Tensor | None = None,
    replay_done: torch.Tensor | None = None,
    replay_terminated: torch.Tensor | None = None,
    replay_slow_value: torch.Tensor | None = None,
    gamma: float = 1.0,
    lmbda: float = 0.95,
    discount_loss: bool = True,
    discount_weights: str = "inclusive",
    return_normalization: bool = True,
    quantiles: tuple[float, float] = (0.05, 0.95),
    rate: float = 0.01,
    min_scale: float = 1.0,
    update: bool = True,
    process_group=None,
    entropy_bonus: float = 3e-4,
    use_reinforce: bool = False,
    normalize_advantage: bool = True,
    weight_entropy: bool = True,
    value_loss: str = "symlog_mse",
    value_bins: torch.Tensor | Sequence[float] | None = None,
    slow_critic_regularization: float = 0.0,
    two_hot_space: str = "raw",
    replay_value_weight: float = 0.0,
    horizon: float = 333.0,
    replay_lmbda: float = 0.95,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """The whole DreamerV3 behaviour objective after the networks, from one imagined rollout: the
    λ-returns and weights, the return normalisation, the actor, the critic and (with
    ``replay_value_weight > 0``) the replay value, as torchrl's ``DreamerV3Loss`` composes
    ``DreamerV3ActorLoss``, ``DreamerV3ValueLoss`` and ``replay_value_loss``. The fused backend
    runs it in four launches forward and backward (see :mod:`.kernels`);
    :data:`BEHAVIOR_CONVENTIONS` holds the options of each codebase.

    Args:
        reward, next_value, continuation, root_continuation: the rollout, as
            :func:`lambda_returns`; with the reparameterised actor (``use_reinforce=False``) the
            actor loss is differentiable with respect to the first three.
        value_pred: the critic on each step's root state: logits ``[*B, H, R]`` (``"two_hot"``)
            or values ``[*B, H, 1]``.
        low, high: the return statistics (one-element buffers), updated in place when
            ``return_normalization`` and ``update``.
        baseline, log_prob, entropy: as :func:`dreamer_v3_actor_loss`.
        slow_value: as :func:`dreamer_v3_value_loss`.
        replay_value_pred, replay_reward, replay_done, replay_terminated, replay_slow_value: the
            replay batch ``[B', T, ·]`` whose states started the imagination (``B'·T`` starts, in
            order): as :func:`replay_value_loss`, bootstrapped from the first return of each
            start; needed when ``replay_value_weight > 0``.
        gamma, lmbda, discount_loss, discount_weights: as :func:`lambda_returns`.
        return_normalization: divide by the return scale (off: the scale is 1, no update).
        quantiles, rate, min_scale, update, process_group: as :func:`return_scale`.
        entropy_bonus, use_reinforce, normalize_advantage, weight_entropy: as
            :func:`dreamer_v3_actor_loss`.
        value_loss, value_bins, slow_critic_regularization, two_hot_space: as
            :func:`dreamer_v3_value_loss` (reduced by the mean, as torchrl's default).
        replay_value_weight: torchrl's ``replay_value_loss_weight`` (its ``DreamerV3Loss``
            default is 0.3); 0 skips the replay term.
        horizon, replay_lmbda: the replay return's discount horizon and λ.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``loss_actor``, ``actor_entropy``, ``loss_value``, ``value_slow_loss`` (as the two
        losses), ``loss_replay_value`` (weighted; with the replay term), and the detached
        ``lambda_target`` and ``discount_weight`` (``[*B, H, 1]``) and ``return_scale`` (0-dim).

    Example:
        >>> import torch
        >>> from fused_dreamer_loss.behavior_v3 import BEHAVIOR_CONVENTIONS, dreamer_v3_behavior_loss
        >>> N, H, R = 8, 15, 255
        >>> reward, value = torch.randn(N, H, 1), torch.randn(N, H, 1)
        >>> cont = torch.full((N, H, 1), 0.997)
        >>> logits = torch.randn(N, H, R, requires_grad=True)
        >>> log_prob = -torch.rand(N, H, 1, requires_grad=True)
        >>> low, high = torch.zeros(1), torch.zeros(1)
        >>> losses = dreamer_v3_behavior_loss(
        ...     reward, value, logits, low, high, cont, cont, baseline=value, log_prob=log_prob,
        ...     entropy=torch.ones(N, H, 1), slow_value=torch.randn(N, H, 1),
        ...     **{**BEHAVIOR_CONVENTIONS["dreamerv3-2024"], "replay_value_weight": 0.0},
        ...     backend="torch")
        >>> sorted(k for k in losses if k.startswith("loss_"))
        ['loss_actor', 'loss_value']
        >>> (losses["loss_actor"] + losses["loss_value"]).backward()
        >>> logits.grad.shape
        torch.Size([8, 15, 255])
    """
    quantiles = tuple(quantiles) if isinstance(quantiles, list) else quantiles
    options = (gamma, lmbda, discount_loss, discount_weights, quantiles, rate, min_scale, update,
               entropy_bonus, use_reinforce, normalize_advantage, weight_entropy, value_loss,
               slow_critic_regularization, two_hot_space, return_normalization,
               replay_value_weight, horizon, replay_lmbda)
    replay = (replay_value_pred, replay_reward, replay_done, replay_terminated, replay_slow_value)
    tensors = (reward, next_value, continuation, root_continuation, value_pred, low, high,
               baseline, log_prob, entropy, slow_value, *replay)
    opts, shapes, fused = _prepared(
        _CALLS, lambda: _prepare_behavior(tensors, options, value_bins, backend, process_group),
        tensors, options, backend, value_bins, quantiles, process_group)
    if fused is not None:
        return _fused_behavior(reward, next_value, continuation, root_continuation, value_pred,
                               low, high, baseline, log_prob, entropy, slow_value, replay, opts,
                               shapes, process_group, *fused)
    return reference.behavior_loss(reward, next_value, continuation, root_continuation,
                                   value_pred, low, high, baseline, log_prob, entropy, slow_value,
                                   replay, opts, shapes, process_group)


def _prepare_behavior(tensors: tuple, options: tuple, value_bins, backend: str,
                      process_group) -> tuple:
    """Validate a :func:`dreamer_v3_behavior_loss` call: ``(opts, shapes, fused)``, ``fused``
    where the fused kernels run it (else None) the returns kernel's
    :class:`~.kernels.ReturnsCall`, the scale's when it takes one of its own (the returns
    all-gathered over ``process_group``, else None) and the fused terms'
    :class:`~.kernels.TermsCall`. Raises on bad input."""
    (gamma, lmbda, discount_loss, discount_weights, quantiles, rate, min_scale, update,
     entropy_bonus, use_reinforce, normalize_advantage, weight_entropy, value_loss,
     slow_critic_regularization, two_hot_space, return_normalization, replay_value_weight,
     horizon, replay_lmbda) = options
    opts = BehaviorOptions(
        ReturnOptions(gamma, lmbda, discount_loss, discount_weights),
        ScaleOptions(quantiles, rate, min_scale, update),
        ActorOptions(entropy_bonus, use_reinforce, normalize_advantage, weight_entropy),
        CriticOptions(value_loss, slow_critic_regularization, "mean", two_hot_space, value_bins),
        ReplayOptions(horizon, replay_lmbda),
        return_normalization, replay_value_weight)
    (reward, next_value, continuation, root_continuation, value_pred, low, high, baseline,
     log_prob, entropy, slow_value, *replay) = tensors
    shapes = validate_behavior(reward, next_value, continuation, root_continuation, value_pred,
                               low, high, baseline, log_prob, entropy, slow_value, replay, opts)
    if not _fused(backend, (reward, next_value, continuation, root_continuation, value_pred,
                            baseline, log_prob, entropy, slow_value, *replay)):
        return opts, shapes, None
    k = _kernels()
    scale = opts.scale if opts.return_normalization else None
    gather = process_group is not None and scale is not None and scale.update
    return opts, shapes, (k.ReturnsCall(opts.returns, scale, grid=gather),
                          k.ReturnsCall(None, scale) if gather else None,
                          _terms_call(k, opts, shapes))


def _actor_tensors(opts: ActorOptions, returns, weights, scale, baseline, log_prob,
                   entropy) -> dict:
    """The actor's inputs of the fused terms: what its estimator reads, stopped where the
    reference stops the gradient."""
    reinforce = opts.use_reinforce
    return dict(returns=returns.detach() if reinforce else returns, weights=weights.detach(),
                scale=scale.detach(), baseline=_detach(baseline) if reinforce else baseline,
                log_prob=log_prob if reinforce else None,
                entropy=entropy if opts.has_entropy else None)


def _replay_tensors(opts: CriticOptions, value_pred, reward, done, terminated, bootstrap,
                    slow_value) -> dict:
    return dict(replay_pred=value_pred, replay_reward=reward.detach(), replay_done=done.detach(),
                replay_terminated=terminated.detach(), bootstrap=bootstrap.detach(),
                replay_slow=_detach(slow_value) if opts.has_slow else None)


def _terms_call(k, opts: BehaviorOptions, shapes):
    """The fused terms of :func:`dreamer_v3_behavior_loss` for ``opts`` and ``shapes``."""
    return k.TermsCall(
        k.TermsOptions(actor=opts.actor, critic=opts.critic, imagined=True,
                       replay=opts.replay if opts.has_replay else None, returns=opts.returns,
                       replay_weight=opts.replay_value_weight),
        k.TermsShapes(actor_dtype=shapes.actor.dtype, critic_dtype=shapes.critic.dtype,
                      replay_dtype=shapes.replay.dtype if opts.has_replay else None,
                      slow_logits=shapes.critic.slow_logits,
                      replay_slow_logits=opts.has_replay and shapes.replay.slow_logits,
                      replay_steps=shapes.replay.steps if opts.has_replay else None))


def _fused_behavior(reward, next_value, continuation, root_continuation, value_pred, low, high,
                    baseline, log_prob, entropy, slow_value, replay, opts: BehaviorOptions,
                    shapes, process_group, returns_call, scale_call,
                    terms) -> dict[str, torch.Tensor]:
    """:func:`dreamer_v3_behavior_loss` on the fused kernels (see :func:`_prepare_behavior`): the
    returns kernel (returns, weights, quantiles, EMA, scale), then the terms kernels."""
    k = _kernels()
    rollout = [t.detach() if t is not None else None
               for t in (reward, next_value, continuation, root_continuation)]
    returns, weights, scale = returns_call(*rollout, None, low, high)
    if scale_call is not None:
        values = k.scale_values(returns, low, opts.scale, process_group)
        scale = scale_call(None, None, None, None, values, low, high)[2]
    tensors = _actor_tensors(opts.actor, returns, weights, scale, baseline, log_prob, entropy)
    if not opts.actor.use_reinforce:  # the reparameterised actor's gradient runs through R
        tensors.update(reward=reward, next_value=next_value, continuation=continuation)
    tensors.update(value_pred=value_pred,
                   slow_value=_detach(slow_value) if opts.critic.has_slow else None)
    if opts.has_replay:
        pred, r, d, term, slow = replay
        tensors.update(_replay_tensors(opts.critic, pred, r, d, term,
                                       returns[..., 0, 0].reshape(shapes.replay.steps), slow))
    losses = k.run_terms(terms, **tensors)
    losses.update(lambda_target=returns, discount_weight=weights, return_scale=scale)
    return losses
