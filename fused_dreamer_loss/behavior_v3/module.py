"""``FusedDreamerV3ActorLoss`` and ``FusedDreamerV3ValueLoss``: drop-ins for torchrl's
DreamerV3ActorLoss and DreamerV3ValueLoss that run the networks and the imagination rollout as
torchrl's do and the math after them through :mod:`fused_dreamer_loss.behavior_v3.functional`.

They subclass torchrl's modules, so the constructor arguments and defaults, the keys
(``set_keys``), the buffers (``retnorm.low`` / ``retnorm.high`` with the ``return_low`` /
``return_high`` views and the migration of checkpoints that stored those two flat, ``value_bins``),
the slow critic's target parameters, the value estimator and the rest of the ``LossModule`` API
are torchrl's own; state dicts load strictly either way. What differs is ``forward`` (and
``replay_value_loss``, ``lambda_target``): the λ-returns, the discount weights, the return
percentiles and their EMA, the actor's and the critic's terms and the replay value loss are the
functional API's (fused kernels on CUDA), with no host synchronisation.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictModuleBase
from tensordict.utils import NestedKey, unravel_key

from ..core.math import DEFAULT_NUM_BINS, symlog
from ..core.torchrl_module import cast_to, check_key, torchrl_dtypes
from ..core.validation import check_backend, check_bool, check_real
from .functional import (dreamer_v3_actor_loss, dreamer_v3_value_loss, lambda_returns,
                         replay_value_loss, return_scale)

try:
    from torchrl.envs.model_based.dreamer import DreamerEnv
    from torchrl.envs.utils import ExplorationType, set_exploration_type, step_mdp
    from torchrl.modules.distributions.utils import has_analytic_entropy, rsample_and_log_prob
    from torchrl.objectives.dreamer_v3 import DreamerV3ActorLoss, DreamerV3ValueLoss
    from torchrl.objectives.utils import hold_out_net
    from torchrl.objectives.value import TD0Estimator, TD1Estimator, TDLambdaEstimator
except ImportError as error:
    raise ImportError(
        "fused_dreamer_loss.behavior_v3.module needs torchrl: FusedDreamerV3ActorLoss and "
        "FusedDreamerV3ValueLoss extend torchrl's DreamerV3 actor and value losses and run its "
        "imagination environment (pip install torchrl); the functional API "
        "(fused_dreamer_loss.behavior_v3.functional) works without it") from error

#: Where torchrl's modules read and write the λ-return (a fixed key, not one of ``tensor_keys``).
LAMBDA_TARGET_KEY = "lambda_target"


def _check_keys(kwargs: dict) -> None:
    """torchrl's ``set_keys``, after checking that every value given is a NestedKey (torchrl
    accepts anything and fails later, reading the tensordict)."""
    for name, key in kwargs.items():
        if key is not None:
            check_key(name, key)


def _to_trailing_dim(tensor: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """``tensor`` as ``[*B, H, 1]``, the policy's log-probability or entropy as torchrl aligns it
    with the ``[*B, H, 1]`` returns: given a trailing singleton dim, or summed over a trailing
    action dim; one with the returns' number of dims but a wider last dim (a per-action-dim
    distribution without ``Independent``) torchrl broadcasts against the ``[*B, H, 1]`` terms
    before its mean: its mean over that dim."""
    if tensor.ndim == like.ndim:
        return tensor if tensor.shape[-1] == 1 else tensor.mean(-1, keepdim=True)
    if tensor.ndim == like.ndim - 1:
        return tensor.unsqueeze(-1)
    if tensor.ndim == like.ndim + 1:
        return tensor.sum(-1, keepdim=True)
    raise ValueError(f"the policy's {name} has shape {tuple(tensor.shape)}, which does not align "
                     f"with the returns' {tuple(like.shape)}")


# ---- torchrl's dtypes: the kinds of ops its modules apply (fused_dreamer_loss.core.torchrl_module)


def _actor_dtype_chain(reward, value, continuation, root_continuation, log_prob, entropy, scale,
                       has_continuation, reinforce, with_entropy):
    """torchrl's returns, weights, loss and entropy metric (their dtypes only: 1-element probes;
    the scale is 0-dim, as torchrl's)."""
    scale = scale.reshape(())
    if not has_continuation:
        continuation = root_continuation = torch.ones_like(reward + value)
    returns = reward + continuation * (value + value)
    weights = torch.cat([root_continuation, 0.5 * root_continuation], -2).cumprod(-2)
    objective = (returns - value).detach() / scale * log_prob if reinforce else returns / scale
    loss = -(weights * objective).mean()
    bonus = (weights * entropy).mean() if with_entropy else loss.new_zeros(())
    return returns, weights, loss - bonus, bonus


def _value_dtype_chain(prediction, target, weights, slow, two_hot):
    """torchrl's critic loss and slow-critic metric (their dtypes only)."""
    def term(reference):
        if two_hot:  # a two-hot encoding in the target's dtype against a log-softmax
            logits = prediction.expand(1, 2)
            return -(reference.expand(1, 2) * torch.log_softmax(logits, -1)).sum(-1)
        return (symlog(prediction) - symlog(reference)).pow(2)
    return (weights * (term(target) + term(slow))).mean(), (weights * term(slow)).mean()


# ---- the actor -----------------------------------------------------------------------------------


class FusedDreamerV3ActorLoss(DreamerV3ActorLoss):
    """DreamerV3 actor loss with torchrl's arguments, keys, buffers, outputs and API, and the math
    after the networks fused.

    The rollout is torchrl's: the imagination environment resets on the start states and rolls
    the actor out for ``imagination_horizon`` steps; the critic (held out of the graph) values the
    next states and, when given, the continuation model predicts the continuation of the start
    states and of the next states. The λ-returns and the discount weights
    (:func:`~fused_dreamer_loss.behavior_v3.functional.lambda_returns`), the return-percentile
    EMA and the scale (:func:`~fused_dreamer_loss.behavior_v3.functional.return_scale`, the EMA
    updated on the device in training mode only) and the REINFORCE or reparameterised objective
    with the entropy bonus
    (:func:`~fused_dreamer_loss.behavior_v3.functional.dreamer_v3_actor_loss`) are the
    functional API's.

    γ and λ are torchrl's: with a continuation model, its recursion with the value estimator's
    ``gamma`` and ``lmbda``; without one, the value estimator's own estimate, which with the
    estimator's default ``time_dim`` runs along the trailing singleton dim of the returns (torchrl
    0.14.1): each step's target is then the one-step ``r + γ·v``; make the estimator with
    ``time_dim=-2`` (in both modules) for λ-returns along the horizon. TD(0), TD(1) and TD(λ)
    estimators are supported; another estimator, one with ``average_rewards`` (without a
    continuation model) or another ``time_dim`` raises a ``NotImplementedError``.

    Where it differs from torchrl's:

    - the REINFORCE baseline of the states 1 … H−1 is the critic's value of the next states
      0 … H−2, which are the same states (torchrl evaluates the critic on them twice, with the
      same numbers); only the start states are valued again;
    - γ and λ are read from the value estimator once, when the loss first uses it (and again
      after ``make_value_estimator`` or ``load_state_dict``), not on every call, which would
      synchronise the host with the device: change them with ``make_value_estimator``, not by
      writing the estimator's buffers in place;
    - the losses are computed in float32 (float64 for float64 inputs) and returned in the dtype
      torchrl's arithmetic would give them (autocast included), never in bf16 arithmetic; where
      torchrl's vectorised TD(λ) estimate runs (no continuation model, ``time_dim=-2``), ours is
      the exact recursion (torchrl's is off by ≈1e-8 relative in float64);
    - options are checked at construction, with errors naming the argument.

    Args:
        actor_model (TensorDictModule): the policy (a probabilistic module with ``get_dist``).
        value_model (TensorDictModule): the critic, writing the decoded value under the
            ``value`` key.
        model_based_env (DreamerEnv): the imagination environment.
        continuation_model (TensorDictModuleBase, optional): writes the continuation
            probability of imagined states under the ``continuation`` key. Default: None
            (continuation 1).
        imagination_horizon (int, optional): imagined steps per start state. Default: 15.
        discount_loss (bool, optional): weigh each step by the cumulative discount. Default: True.
        entropy_bonus (float, optional): the entropy weight η. Default: 3e-4.
        use_reinforce (bool, optional): REINFORCE instead of the reparameterised gradient.
            Default: False.
        return_normalization (bool, optional): divide the objective by the EMA return-percentile
            span. Default: True.
        return_normalization_rate (float, optional): the EMA rate. Default: 0.01.
        return_normalization_quantiles (tuple of float, optional): the percentiles.
            Default: (0.05, 0.95).
        return_normalization_min_scale (float, optional): the smallest scale. Default: 1.0.
        gamma, lmbda: refused, as torchrl's (set them with ``make_value_estimator``).
        backend (str, optional): ``"auto"`` (the fused kernels for CUDA tensors, the pure-torch
            reference otherwise), ``"triton"`` or ``"torch"``. Default: ``"auto"``.

    Returns from ``forward``:
        ``(losses, imagined)``: a TensorDict with batch size ``[]`` holding ``loss_actor``,
        ``actor_entropy``, ``return_low``, ``return_high``, ``return_scale`` and
        ``continuation_mean`` (0-dim), and the imagined trajectory ``[*B, H]`` with
        ``lambda_target`` and the discount weights written in it (detached).

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from tensordict.nn import (NormalParamExtractor, ProbabilisticTensorDictModule,
        ...                            ProbabilisticTensorDictSequential, TensorDictModule)
        >>> from torchrl.data import Bounded, Composite, Unbounded
        >>> from torchrl.envs.model_based import DreamerEnv
        >>> from torchrl.modules import MLP, TanhNormal, WorldModelWrapper
        >>> from fused_dreamer_loss.behavior_v3.module import FusedDreamerV3ActorLoss
        >>> class Dynamics(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Linear(4 + 8 + 1, 4 + 8)
        ...     def forward(self, state, belief, action):
        ...         return self.net(torch.cat([state, belief, action], -1)).tanh().split([4, 8], -1)
        >>> env = DreamerEnv(WorldModelWrapper(
        ...     TensorDictModule(Dynamics(), in_keys=["state", "belief", "action"],
        ...                      out_keys=["state", "belief"]),
        ...     TensorDictModule(MLP(in_features=12, out_features=1, num_cells=8, depth=1),
        ...                      in_keys=["state", "belief"], out_keys=["reward"])),
        ...     prior_shape=(4,), belief_shape=(8,))
        >>> env.observation_spec = Composite(state=Unbounded(4), belief=Unbounded(8))
        >>> env.state_spec = env.observation_spec.clone()
        >>> env.action_spec = Bounded(-1, 1, (1,))
        >>> env.reward_spec = Unbounded((1,))
        >>> actor = ProbabilisticTensorDictSequential(
        ...     TensorDictModule(MLP(in_features=12, out_features=2, num_cells=8, depth=1),
        ...                      in_keys=["state", "belief"], out_keys=["params"]),
        ...     TensorDictModule(NormalParamExtractor(), in_keys=["params"],
        ...                      out_keys=["loc", "scale"]),
        ...     ProbabilisticTensorDictModule(in_keys=["loc", "scale"], out_keys=["action"],
        ...                                   distribution_class=TanhNormal))
        >>> value = TensorDictModule(MLP(in_features=12, out_features=1, num_cells=8, depth=1),
        ...                          in_keys=["state", "belief"], out_keys=["state_value"])
        >>> loss = FusedDreamerV3ActorLoss(actor, value, env, imagination_horizon=3,
        ...                                backend="torch")
        >>> starts = TensorDict({"state": torch.randn(5, 4), "belief": torch.randn(5, 8)}, [5])
        >>> losses, imagined = loss(starts)
        >>> sorted(losses.keys())
        ['actor_entropy', 'continuation_mean', 'loss_actor', 'return_high', 'return_low', \
'return_scale']
        >>> imagined["lambda_target"].shape
        torch.Size([5, 3, 1])
        >>> losses["loss_actor"].backward()
    """

    def __init__(
        self,
        actor_model: TensorDictModule,
        value_model: TensorDictModule,
        model_based_env: DreamerEnv,
        *,
        continuation_model: TensorDictModuleBase | None = None,
        imagination_horizon: int = 15,
        discount_loss: bool = True,
        entropy_bonus: float = 3e-4,
        use_reinforce: bool = False,
        return_normalization: bool = True,
        return_normalization_rate: float = 0.01,
        return_normalization_quantiles: tuple[float, float] = (0.05, 0.95),
        return_normalization_min_scale: float = 1.0,
        gamma: float | None = None,
        lmbda: float | None = None,
        backend: str = "auto",
    ) -> None:
        if isinstance(imagination_horizon, bool) or not isinstance(imagination_horizon, int) \
                or imagination_horizon < 1:
            raise ValueError(f"imagination_horizon must be a positive int, got "
                             f"{imagination_horizon!r}")
        for name, flag in (("discount_loss", discount_loss), ("use_reinforce", use_reinforce),
                           ("return_normalization", return_normalization)):
            check_bool(name, flag)
        if check_real("entropy_bonus", entropy_bonus) < 0:
            raise ValueError(f"entropy_bonus must be >= 0, got {entropy_bonus!r}")
        super().__init__(
            actor_model, value_model, model_based_env, continuation_model=continuation_model,
            imagination_horizon=imagination_horizon, discount_loss=discount_loss,
            entropy_bonus=entropy_bonus, use_reinforce=use_reinforce,
            return_normalization=return_normalization,
            return_normalization_rate=return_normalization_rate,
            return_normalization_quantiles=return_normalization_quantiles,
            return_normalization_min_scale=return_normalization_min_scale, gamma=gamma,
            lmbda=lmbda)
        self.backend = check_backend(backend)
        # The percentiles as torchrl's normaliser holds them: in a tensor of the default dtype.
        self._quantiles = tuple(torch.tensor(self.retnorm.quantiles).tolist())
        self.register_load_state_dict_post_hook(_forget_discounting)

    def set_keys(self, **kwargs: NestedKey | None) -> None:
        """torchrl's ``set_keys``; a value that is not a NestedKey raises a TypeError naming it."""
        _check_keys(kwargs)
        super().set_keys(**kwargs)

    def _discounting(self, with_continuation: bool) -> tuple[float, float]:
        """``(γ, λ)`` of torchrl's returns, from the value estimator, read once per estimator
        (see the class notes).

        With a continuation model torchrl runs the recursion with the estimator's ``gamma`` and
        ``lmbda``. Without one it asks the estimator for its value estimate of the ``[*B, H, 1]``
        rewards and next values in a tensordict of batch size ``[]``: TD(0) is λ = 0, TD(1)
        λ = 1 and TD(λ) its ``lmbda`` along the estimator's ``time_dim``, and where that is not
        set (or is -1) the time dim is the trailing singleton one: every step is a one-step
        return ``r + γ·v``, λ = 0.
        """
        estimator = self.value_estimator
        cache = self.__dict__.get("_discounting_cache")
        if cache is None or cache[0] is not estimator:
            cache = self.__dict__["_discounting_cache"] = (estimator, {})
        if with_continuation not in cache[1]:
            cache[1][with_continuation] = (float(estimator.gamma),
                                           self._lmbda(estimator, with_continuation))
        return cache[1][with_continuation]

    def _lmbda(self, estimator, with_continuation: bool) -> float:
        if with_continuation:
            return float(estimator.lmbda)
        if not isinstance(estimator, (TD0Estimator, TD1Estimator, TDLambdaEstimator)):
            raise NotImplementedError(
                f"{type(self).__name__} computes the returns of the TD0, TD1 and TDLambda value "
                f"estimators, got {type(estimator).__name__}")
        if estimator.average_rewards:
            raise NotImplementedError(
                f"{type(self).__name__} does not standardise the rewards: make the value "
                "estimator with average_rewards=False, or give a continuation model (torchrl's "
                "returns ignore average_rewards then)")
        time_dim = getattr(estimator, "time_dim", None)
        if isinstance(estimator, TD0Estimator) or time_dim in (None, -1):
            return 0.0
        if time_dim != -2:
            raise NotImplementedError(
                f"the value estimator's time_dim={time_dim}: {type(self).__name__} takes the "
                "returns along the horizon (time_dim=-2) or one-step returns (None or -1)")
        return 1.0 if isinstance(estimator, TD1Estimator) else float(estimator.lmbda)

    def lambda_target(self, reward: torch.Tensor, value: torch.Tensor,
                      continuation: torch.Tensor | None = None) -> torch.Tensor:
        """The λ-returns ``[*B, H, 1]`` of the next-step rewards, next-state values and
        continuations (None: 1), with the value estimator's γ and λ (torchrl's method, fused)."""
        gamma, lmbda = self._discounting(continuation is not None)
        returns, _ = lambda_returns(reward, value, continuation, gamma=gamma, lmbda=lmbda,
                                    discount_loss=False, backend=self.backend)
        return returns

    def _continuations(self, fake_data: TensorDictBase, next_data: TensorDictBase,
                       first: TensorDictBase):
        """``(continuation, root_continuation)`` of the next states (1 … H) and of the states
        (0 … H−1), written into ``fake_data`` as torchrl does; ``(None, None)`` without a
        continuation model."""
        model = self.__dict__.get("continuation_model")
        if model is None:
            return None, None
        key = self.tensor_keys.continuation
        first = first.select(*model.in_keys, strict=False)
        shifted = next_data.select(*model.in_keys, strict=False)
        with hold_out_net(model):
            model(first)
            model(shifted)
        continuation = shifted.get(key)
        root_continuation = torch.cat([first.get(key), continuation[..., :-1, :]], dim=-2)
        fake_data.set(key, root_continuation)
        fake_data.set(("next", key), continuation)
        return continuation, root_continuation

    def _baseline(self, first: TensorDictBase, next_value: torch.Tensor) -> torch.Tensor:
        """The critic's value of the states 0 … H−1: of the start states, then the next states'
        values shifted by one (the same states)."""
        start = first.select(*self.value_model.in_keys, strict=False)
        with torch.no_grad():
            self.value_model(start)
        return torch.cat([start.get(self.tensor_keys.value), next_value[..., :-1, :]], dim=-2)

    def _return_scale(self, returns: torch.Tensor) -> torch.Tensor:
        if not self.return_normalization:
            return torch.ones((), dtype=returns.dtype, device=returns.device)
        retnorm = self.retnorm
        return return_scale(returns, retnorm.low, retnorm.high, quantiles=self._quantiles,
                            rate=retnorm.rate, min_scale=retnorm.min_scale,
                            update=self.training, backend=self.backend)

    def _entropy(self, policy) -> torch.Tensor:
        """The policy's entropy, analytic where the distribution has one, else torchrl's
        one-sample estimate ``−log π(a)`` of a fresh reparameterised sample."""
        if has_analytic_entropy(policy):
            return policy.entropy()
        return -rsample_and_log_prob(policy)[1]

    def forward(self, tensordict: TensorDictBase) -> tuple[TensorDict, TensorDictBase]:
        """Imagine from the ``state`` / ``belief`` start states and compute the actor loss."""
        keys = self.tensor_keys
        starts = tensordict.select(keys.state, keys.belief).data
        with hold_out_net(self.model_based_env), set_exploration_type(ExplorationType.RANDOM):
            starts = self.model_based_env.reset(starts.copy())
            fake_data = self.model_based_env.rollout(
                max_steps=self.imagination_horizon, policy=self.actor_model, auto_reset=False,
                tensordict=starts, break_when_any_done=False)
            next_data = step_mdp(fake_data, keep_other=True)
            with hold_out_net(self.value_model):
                next_data = self.value_model(next_data)
        next_value = next_data.get(keys.value)
        reward = fake_data.get(("next", keys.reward))
        first = fake_data[..., :1]
        continuation, root_continuation = self._continuations(fake_data, next_data, first)

        gamma, lmbda = self._discounting(continuation is not None)
        # The weights take no gradient (torchrl detaches them): their continuations neither.
        returns, weights = lambda_returns(
            reward, next_value, continuation,
            None if root_continuation is None else root_continuation.detach(), gamma=gamma,
            lmbda=lmbda, discount_loss=self.discount_loss, backend=self.backend)

        policy = log_prob = baseline = entropy = None
        if self.use_reinforce or self.entropy_bonus > 0:
            policy = self.actor_model.get_dist(
                fake_data.select(*self.actor_model.in_keys, strict=False).detach())
        if self.use_reinforce:  # the score of the stopped action from the stopped state
            log_prob = _to_trailing_dim(
                policy.log_prob(fake_data.get(keys.action).detach()), returns, "log-probability")
            baseline = self._baseline(first, next_value)
        scale = self._return_scale(returns)
        if self.entropy_bonus > 0:
            entropy = _to_trailing_dim(self._entropy(policy), weights, "entropy")

        losses = dreamer_v3_actor_loss(
            returns, weights, scale, baseline=baseline, log_prob=log_prob, entropy=entropy,
            entropy_bonus=self.entropy_bonus, use_reinforce=self.use_reinforce,
            backend=self.backend)
        dtypes = torchrl_dtypes(_actor_dtype_chain, tuple(t.dtype for t in (
            reward, next_value, reward if continuation is None else continuation,
            reward if root_continuation is None else root_continuation,
            reward if log_prob is None else log_prob, reward if entropy is None else entropy,
            scale)), reward.device, (continuation is not None, self.use_reinforce,
                                     entropy is not None))
        returns_dtype, weights_dtype, loss_dtype, entropy_dtype = dtypes or (None,) * 4
        fake_data.set(LAMBDA_TARGET_KEY, cast_to(returns, returns_dtype))
        fake_data.set(keys.discount_weight, cast_to(weights, weights_dtype))
        out = TensorDict({
            "loss_actor": cast_to(losses["loss_actor"], loss_dtype),
            "actor_entropy": cast_to(losses["actor_entropy"], entropy_dtype),
            "return_low": self.return_low.detach().clone(),
            "return_high": self.return_high.detach().clone(),
            "return_scale": scale.detach().clone(),
            "continuation_mean": (continuation.mean().detach() if continuation is not None
                                  else torch.ones((), device=returns.device)),
        }, [])
        self._clear_weakrefs(tensordict, out)
        return out, fake_data.data


def _forget_discounting(module: FusedDreamerV3ActorLoss, incompatible_keys) -> None:
    """After a state dict is loaded, γ and λ are read from the estimator again."""
    module.__dict__.pop("_discounting_cache", None)


# ---- the critic ----------------------------------------------------------------------------------


class FusedDreamerV3ValueLoss(DreamerV3ValueLoss):
    """DreamerV3 critic loss with torchrl's arguments, keys, buffers, outputs and API (the slow
    critic's target parameters, ``actor_loss=``, ``sync_gamma_with_actor_loss``), and the math
    after the critic fused.

    ``forward`` values the imagined states with the critic (and, with
    ``slow_critic_regularization > 0``, with the slow critic's target parameters, without
    gradient) and computes the two-hot cross-entropy (or symlog squared error) against the
    λ-return, plus the slow-critic regulariser, weighted by the discount weights
    (:func:`~fused_dreamer_loss.behavior_v3.functional.dreamer_v3_value_loss`).
    :meth:`replay_value_loss` does the same on replay sequences against their TD(λ) return,
    bootstrapped from the first imagined return of each state
    (:func:`~fused_dreamer_loss.behavior_v3.functional.replay_value_loss`), with no host
    synchronisation (torchrl's syncs to find the episodes).

    Where it differs from torchrl's:

    - the replay TD(λ) is the recursion torchrl runs under torch.compile, with no host sync; its
      eager, vectorised estimate syncs (``nonzero``, ``.item()``) and is off by ≈1e-8 relative in
      float64;
    - without discount weights in the data and with ``actor_loss=``, the actor's γ is used as the
      estimator's tensor (torchrl reads it to the host);
    - the losses are computed in float32 (float64 for float64 inputs) and returned in the dtype
      torchrl's arithmetic would give them;
    - options are checked at construction, with errors naming the argument.

    Args:
        value_model (TensorDictModule): the critic: logits under ``value_logits`` and the decoded
            value under ``value`` (``"two_hot"``), or the value under ``value``.
        value_loss (str, optional): ``"symlog_mse"`` or ``"two_hot"``. Default: ``"symlog_mse"``.
        discount_loss (bool, optional): without discount weights in the data, weigh step t by
            γ^t. Default: True.
        gamma (float, optional): that γ when no ``actor_loss`` is given. Default: 0.99.
        num_value_bins (int, optional): bins of the two-hot support (the ``value_bins`` buffer).
            Default: 255.
        actor_loss (DreamerV3ActorLoss, optional): read γ from its value estimator.
        slow_critic_regularization (float, optional): weight of the regulariser towards the slow
            critic's decoded value; > 0 creates the target parameters. Default: 0.0.
        reduction (str, optional): ``"none"``, ``"mean"`` or ``"sum"``. Default: ``"mean"``.
        backend (str, optional): ``"auto"``, ``"triton"`` or ``"torch"``. Default: ``"auto"``.

    Returns from ``forward``:
        ``(losses, data)``: ``loss_value`` and ``value_slow_loss`` (detached), and the input.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from tensordict.nn import TensorDictModule, TensorDictSequential
        >>> from torchrl.modules import MLP, SymExpTwoHot
        >>> from fused_dreamer_loss.behavior_v3.module import FusedDreamerV3ValueLoss
        >>> critic = TensorDictSequential(
        ...     TensorDictModule(MLP(in_features=4, out_features=255, num_cells=8, depth=1),
        ...                      in_keys=["state"], out_keys=["state_value_logits"]),
        ...     TensorDictModule(SymExpTwoHot(255), in_keys=["state_value_logits"],
        ...                      out_keys=["state_value"]))
        >>> loss = FusedDreamerV3ValueLoss(critic, value_loss="two_hot",
        ...                                slow_critic_regularization=1.0, backend="torch")
        >>> imagined = TensorDict({"state": torch.randn(5, 3, 4),
        ...                        "lambda_target": torch.randn(5, 3, 1),
        ...                        "discount_weight": torch.ones(5, 3, 1)}, [5, 3])
        >>> losses, _ = loss(imagined)
        >>> sorted(losses.keys())
        ['loss_value', 'value_slow_loss']
        >>> losses["loss_value"].backward()
    """

    def __init__(
        self,
        value_model: TensorDictModule,
        value_loss: Literal["symlog_mse", "two_hot"] = "symlog_mse",
        discount_loss: bool = True,
        gamma: float = 0.99,
        num_value_bins: int = DEFAULT_NUM_BINS,
        actor_loss: DreamerV3ActorLoss | None = None,
        slow_critic_regularization: float = 0.0,
        reduction: Literal["none", "mean", "sum"] | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        check_bool("discount_loss", discount_loss)
        check_real("gamma", gamma)
        check_real("slow_critic_regularization", slow_critic_regularization)
        if reduction is not None and reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
        super().__init__(value_model, value_loss=value_loss, discount_loss=discount_loss,
                         gamma=gamma, num_value_bins=num_value_bins, actor_loss=actor_loss,
                         slow_critic_regularization=slow_critic_regularization,
                         reduction=reduction)
        self.backend = check_backend(backend)

    def set_keys(self, **kwargs: NestedKey | None) -> None:
        """torchrl's ``set_keys``; a value that is not a NestedKey raises a TypeError naming it."""
        _check_keys(kwargs)
        super().set_keys(**kwargs)

    def _bins(self) -> torch.Tensor | None:
        """The ``value_bins`` buffer, for the two-hot loss."""
        return self.value_bins if self.value_loss == "two_hot" else None

    def _run_critic(self, data: TensorDictBase, params) -> TensorDictBase:
        """The critic's outputs on ``data`` with ``params`` (online or target parameters)."""
        values = data.select(*self.value_model.in_keys, strict=False)
        with params.to_module(self.value_model, preserve_module_state=False):
            self.value_model(values)
        return values

    def _slow_critic(self, data: TensorDictBase) -> TensorDictBase | None:
        """The slow critic's outputs on ``data`` (no gradient), or None without the regulariser."""
        if not self.slow_critic_regularization:
            return None
        with torch.no_grad():
            return self._run_critic(data, self.target_value_model_params)

    def _default_weights(self, target: torch.Tensor) -> torch.Tensor:
        """torchrl's weights when the data has none: γ^t along the time dim, or ones."""
        if not (self.discount_loss and target.ndim >= 3):
            return torch.ones_like(target)
        actor_loss = self.__dict__.get("_actor_loss")
        gamma = self.gamma if actor_loss is None else actor_loss.value_estimator.gamma
        steps = torch.ones_like(target) * gamma
        steps[..., 0, :] = 1
        return steps.cumprod(dim=-2)

    def _prediction(self, values: TensorDictBase) -> torch.Tensor:
        """The logits (two-hot; torchrl's deprecated fallback to the value key warns) or the
        value the loss compares with its targets."""
        if self.value_loss != "two_hot":
            return values.get(self.tensor_keys.value)
        logits = values.get(self.tensor_keys.value_logits, None)
        if logits is None:
            logits = values.get(self.tensor_keys.value)
            warnings.warn(
                "Storing DreamerV3 categorical value logits under the decoded value key "
                f"{unravel_key(self.tensor_keys.value)!r} is deprecated (by torchrl, for v0.16): "
                "write the logits to the configured value_logits key instead",
                DeprecationWarning, stacklevel=3)
        if logits.shape[-1] != self.value_bins.shape[0]:
            raise ValueError(
                f"value_loss='two_hot' expects the value head to output logits over "
                f"{self.value_bins.shape[0]} bins, got trailing dim {logits.shape[-1]}")
        return logits

    def forward(self, fake_data: TensorDictBase) -> tuple[TensorDict, TensorDictBase]:
        """The critic loss on imagined states holding ``lambda_target`` (and the weights)."""
        keys = self.tensor_keys
        returns = fake_data.get(LAMBDA_TARGET_KEY)
        prediction = self._prediction(self._run_critic(fake_data, self.value_model_params))
        weights = fake_data.get(keys.discount_weight, None)
        if weights is None:
            weights = self._default_weights(returns)
        slow = self._slow_critic(fake_data)
        slow_value = None if slow is None else slow.get(keys.value)
        losses = dreamer_v3_value_loss(
            prediction, returns, weights, value_loss=self.value_loss,
            value_bins=self._bins(), slow_value=slow_value,
            slow_critic_regularization=self.slow_critic_regularization,
            reduction=self.reduction, backend=self.backend)
        dtypes = torchrl_dtypes(
            _value_dtype_chain,
            (prediction.dtype, returns.dtype, weights.dtype,
             (slow_value if slow_value is not None else returns).dtype),
            prediction.device, (self.value_loss == "two_hot",))
        loss_dtype, slow_dtype = dtypes or (None, None)
        out = TensorDict(loss_value=cast_to(losses["loss_value"], loss_dtype),
                         value_slow_loss=cast_to(losses["value_slow_loss"], slow_dtype))
        self._clear_weakrefs(fake_data, out)
        return out, fake_data.data

    def replay_value_loss(self, tensordict: TensorDictBase, *, horizon: float = 333.0,
                          lmbda: float = 0.95) -> TensorDictBase:
        """The critic loss on replay sequences ``[B, T]``: the critic's input keys, ``bootstrap``
        (the first imagined λ-return of each state) and, under ``"next"``, ``reward``, ``done``
        and ``terminated``; returns ``loss_replay_value`` (unweighted by the replay weight).
        The gradient reaches the critic's inputs (the world model's features)."""
        keys = self.tensor_keys
        reward = tensordict.get(("next", keys.reward))
        done = tensordict.get(("next", keys.done))
        terminated = tensordict.get(("next", keys.terminated))
        bootstrap = tensordict.get(keys.bootstrap)
        values = self._run_critic(tensordict, self.value_model_params)
        prediction = values.get(keys.value_logits if self.value_loss == "two_hot" else keys.value)
        slow = self._slow_critic(tensordict)
        loss = replay_value_loss(
            prediction, reward, done, terminated, bootstrap, horizon=horizon, lmbda=lmbda,
            value_loss=self.value_loss, value_bins=self._bins(),
            slow_value=None if slow is None else slow.get(keys.value),
            slow_critic_regularization=self.slow_critic_regularization,
            reduction=self.reduction, backend=self.backend)
        return TensorDict(loss_replay_value=loss)
