"""``FusedDreamerModelLoss``: a torchrl loss module, a drop-in for torchrl's DreamerModelLoss."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey, unravel_key

from . import reference
from ..core.torchrl_module import LossModuleBase, TensorKeysMixin, cast_to, torchrl_dtypes
from ..core.validation import check_backend
from .validation import LossOptions
from .functional import dreamer_model_loss

def _v1_dtype_chain(prior_mean, prior_std, posterior_mean, posterior_std, pixels, reco_pixels,
                    true_reward, pred_reward, reco_loss, reward_loss, global_average):
    """The reference runs the ops torchrl's DreamerModelLoss runs, so its dtypes are torchrl's."""
    opts = LossOptions(reco_loss=reco_loss, reward_loss=reward_loss, global_average=global_average)
    return reference.checked_dreamer_model_loss(prior_mean, prior_std, posterior_mean,
                                                posterior_std, pixels, reco_pixels, true_reward,
                                                pred_reward, opts, 1)


class FusedDreamerModelLoss(TensorKeysMixin, LossModuleBase):
    """Dreamer world-model loss with fused kernels: the same arguments, keys, outputs, numbers and
    LossModule API as torchrl's ``DreamerModelLoss``, and one more argument, ``backend``.

    The loss is a KL divergence between the RSSM's prior and posterior (with a free-nats clamp), a
    reconstruction loss over the decoded observation and a reward loss (Hafner et al., 2019,
    https://arxiv.org/abs/1912.01603). On CUDA it runs the fused Triton kernels of
    :func:`fused_dreamer_loss.dreamer_model_loss`; elsewhere the pure-torch reference.

    With torchrl installed this is a ``torchrl.objectives.LossModule`` and behaves as
    ``DreamerModelLoss`` on the same world model: ``decoder`` and ``reward_model`` (the modules
    ``world_model[0][-1]`` and ``world_model[1]`` of torchrl's ``WorldModelWrapper`` layout, held
    outside the registered submodules, so the state dict has torchrl's names and loads strictly
    either way), ``kl_loss``, ``normal_log_probability``, ``functional``,
    ``convert_to_functional``, ``make_value_estimator`` (raises ``NotImplementedError``, as
    torchrl's), ``vmap_randomness`` and ``reset_parameters_recursive`` (torchrl's resets the
    modules the loss holds outside its registered submodules, the decoder and the reward model:
    the encoder and RSSM keep their weights), ``set_keys`` (returns None). Without torchrl it is a
    ``tensordict.nn.TensorDictModuleBase`` with the same arguments, keys and outputs, and
    ``reset_parameters_recursive`` is tensordict's (it resets every parameter of the world model).

    As torchrl's, the reduction does not depend on the tensordict's batch size (a tensordict of
    ``batch_size=[B]`` or ``[]`` holding ``[B, T, ...]`` data gives the losses of ``[B, T]``): the KL
    is summed over the latent dim and the reconstruction over each frame's ``C, H, W``, then
    averaged over the rest.

    Where it differs from torchrl's:

    - an observation with other than three event dims (after the latents' batch dims): its row
      sum runs over all of them; torchrl sums over the last three dims whatever they are (for a
      vector observation ``[B, T, D]``, over the batch too);
    - a world model without the ``WorldModelWrapper`` layout is accepted (``decoder`` and
      ``reward_model`` are then None; torchrl raises a TypeError at construction);
    - options are checked at construction and key values in ``set_keys``, with errors naming the
      argument (torchrl fails later, or not at all);
    - it has ``in_keys`` (the world model's) and ``out_keys`` (the three loss names); torchrl's
      has neither, and its ``repr`` raises;
    - the fused kernels accumulate in float32 (float64 for float64 inputs): the losses carry
      torchrl's dtypes (under CPU bf16 autocast its KL is bfloat16, everything else float32), but
      a bf16 KL is our float32 value rounded once, not bf16 arithmetic.

    Args:
        world_model (TensorDictModule): the world model; it reads the input tensordict and writes
            the prior, posterior, reconstruction and predicted reward under ``"next"``.
        lambda_kl (float, optional): weight of the KL loss. Default: 1.0.
        lambda_reco (float, optional): weight of the reconstruction loss. Default: 1.0.
        lambda_reward (float, optional): weight of the reward loss. Default: 1.0.
        reco_loss (str, optional): ``"l2"``, ``"l1"`` or ``"smooth_l1"``. Default: ``"l2"``.
        reward_loss (str, optional): ``"l2"``, ``"l1"`` or ``"smooth_l1"``. Default: ``"l2"``.
        free_nats (float, optional): the free nats. Default: 3.
        delayed_clamp (bool, optional): if ``True``, the KL is clamped after averaging; if
            ``False`` (default), each KL row sum is clamped, then averaged.
        global_average (bool, optional): if ``True``, every loss is averaged over all its elements;
            otherwise summed over the non-batch dims and averaged over the batch. Default: False.
        backend (str, optional): ``"auto"`` (Triton on CUDA, pure torch elsewhere), ``"triton"`` or
            ``"torch"``. Default: ``"auto"``.

    Keys (``set_keys`` changes them; nested keys are allowed; all are read under ``"next"``):
        reward, true_reward, prior_mean, prior_std, posterior_mean, posterior_std, pixels,
        reco_pixels: see :class:`FusedDreamerModelLoss._AcceptedKeys`.

    Returns from ``forward``:
        ``(losses, world_model_output)``: a ``TensorDict`` with batch size ``[]`` holding
        ``loss_model_kl``, ``loss_model_reco`` and ``loss_model_reward``, each of shape ``[1]``,
        and the world model's output tensordict, detached.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from tensordict.nn import TensorDictModule
        >>> from fused_dreamer_loss import FusedDreamerModelLoss
        >>> class Latents(torch.nn.Module):  # a stand-in world model: prior, posterior, decoder
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.enc = torch.nn.Linear(3 * 8 * 8, 2 * 16)
        ...         self.dec = torch.nn.Linear(16, 3 * 8 * 8)
        ...         self.prior = torch.nn.Parameter(torch.zeros(2, 16))
        ...     def forward(self, pixels):
        ...         mean, log_std = self.enc(pixels.flatten(-3)).chunk(2, -1)
        ...         reco = self.dec(mean).unflatten(-1, (3, 8, 8))
        ...         pm = self.prior[0].expand_as(mean)
        ...         ps = self.prior[1].exp().expand_as(mean)
        ...         return pm, ps, mean, log_std.exp(), reco, reco.mean((-3, -2, -1))[..., None]
        >>> world_model = TensorDictModule(
        ...     Latents(), in_keys=[("next", "pixels")],
        ...     out_keys=[("next", k) for k in ("prior_mean", "prior_std", "posterior_mean",
        ...                                     "posterior_std", "reco_pixels", "reward")])
        >>> loss = FusedDreamerModelLoss(world_model, free_nats=3.0)
        >>> data = TensorDict({"next": {"pixels": torch.rand(4, 5, 3, 8, 8),
        ...                             "reward": torch.randn(4, 5, 1)}}, batch_size=[4, 5])
        >>> losses, model_out = loss(data)
        >>> sorted(losses.keys())
        ['loss_model_kl', 'loss_model_reco', 'loss_model_reward']
        >>> losses["loss_model_reco"].shape
        torch.Size([1])
        >>> sum(losses.values()).sum().backward()
    """

    @dataclass
    class _AcceptedKeys:
        """The tensordict keys this loss reads, all under ``"next"``; change them with ``set_keys``.

        Attributes:
            reward: the reward the world model predicts, and, before the world model runs, the
                environment's reward (renamed to ``true_reward``). Default: ``"reward"``.
            true_reward: where the environment's reward is moved to. Default: ``"true_reward"``.
            prior_mean, prior_std: the RSSM prior. Defaults: ``"prior_mean"``, ``"prior_std"``.
            posterior_mean, posterior_std: the RSSM posterior. Defaults: ``"posterior_mean"``,
                ``"posterior_std"``.
            pixels: the observation. Default: ``"pixels"``.
            reco_pixels: the decoded observation. Default: ``"reco_pixels"``.
        """

        reward: NestedKey = "reward"
        true_reward: NestedKey = "true_reward"
        prior_mean: NestedKey = "prior_mean"
        prior_std: NestedKey = "prior_std"
        posterior_mean: NestedKey = "posterior_mean"
        posterior_std: NestedKey = "posterior_std"
        pixels: NestedKey = "pixels"
        reco_pixels: NestedKey = "reco_pixels"

    default_keys = _AcceptedKeys
    out_keys = ["loss_model_kl", "loss_model_reco", "loss_model_reward"]

    def __init__(
        self,
        world_model: TensorDictModuleBase,
        *,
        lambda_kl: float = 1.0,
        lambda_reco: float = 1.0,
        lambda_reward: float = 1.0,
        reco_loss: str | None = None,
        reward_loss: str | None = None,
        free_nats: float = 3,
        delayed_clamp: bool = False,
        global_average: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.world_model = world_model
        # Checked now, so a bad option fails at construction rather than at the first batch.
        LossOptions(lambda_kl, lambda_reco, lambda_reward, reco_loss or "l2",
                    reward_loss or "l2", free_nats, delayed_clamp, global_average)
        self.backend = check_backend(backend)
        self.lambda_kl = lambda_kl
        self.lambda_reco = lambda_reco
        self.lambda_reward = lambda_reward
        self.reco_loss = reco_loss if reco_loss is not None else "l2"
        self.reward_loss = reward_loss if reward_loss is not None else "l2"
        self.free_nats = free_nats
        self.delayed_clamp = delayed_clamp
        self.global_average = global_average
        self._tensor_keys = self._AcceptedKeys()
        self.in_keys = list(getattr(world_model, "in_keys", []))
        # As torchrl: held in __dict__, not registered, so they add no state-dict names (and
        # LossModule.reset_parameters_recursive resets these two modules only).
        decoder = reward_model = None
        try:
            decoder, reward_model = world_model[0][-1], world_model[1]
        except (TypeError, IndexError, KeyError, AttributeError, NotImplementedError):
            pass  # not torchrl's WorldModelWrapper layout (torchrl raises here)
        self.__dict__["decoder"] = decoder
        self.__dict__["reward_model"] = reward_model

    @classmethod
    def from_torchrl(cls, loss: Any, *, backend: str = "auto") -> FusedDreamerModelLoss:
        """Build the fused loss from a torchrl ``DreamerModelLoss``: the same world model (the
        same module, so the same weights), options and keys.

        Args:
            loss (DreamerModelLoss): torchrl's loss.
            backend (str, optional): as for the constructor. Default: ``"auto"``.
        """
        fused = cls(
            loss.world_model, lambda_kl=loss.lambda_kl, lambda_reco=loss.lambda_reco,
            lambda_reward=loss.lambda_reward, reco_loss=loss.reco_loss,
            reward_loss=loss.reward_loss, free_nats=loss.free_nats,
            delayed_clamp=loss.delayed_clamp, global_average=loss.global_average,
            backend=backend,
        )
        fused.set_keys(**dataclasses.asdict(loss.tensor_keys))
        return fused

    @staticmethod
    def normal_log_probability(x: torch.Tensor, mean: torch.Tensor,
                               std: torch.Tensor) -> torch.Tensor:
        """The log-density of ``N(mean, std²)`` at ``x`` without its ``−½·log 2π`` constant, as
        torchrl's ``DreamerModelLoss.normal_log_probability`` (``x`` cast to ``mean``'s dtype)."""
        z = (x.to(mean.dtype) - mean) / std
        return -0.5 * z.pow(2) - torch.log(std)

    def kl_loss(self, prior_mean: torch.Tensor, prior_std: torch.Tensor,
                posterior_mean: torch.Tensor, posterior_std: torch.Tensor) -> torch.Tensor:
        """The KL term as torchrl's ``DreamerModelLoss.kl_loss`` returns it: 0-dim, clamped at
        ``free_nats`` (per row sum, or after averaging with ``delayed_clamp``), without
        ``lambda_kl``. Pure torch (the reference's KL); ``forward`` computes it fused."""
        kl = reference.kl_divergence(prior_mean, prior_std, posterior_mean, posterior_std)
        if not self.global_average:
            kl = kl.sum(-1)
        if self.delayed_clamp:
            return kl.mean().clamp_min(self.free_nats)
        return kl.clamp_min(self.free_nats).mean()

    def forward(self, tensordict: TensorDictBase) -> tuple[TensorDict, TensorDictBase]:
        """Run the world model on a shallow copy of ``tensordict`` and compute the three losses."""
        tensordict = tensordict.copy()
        reward_key = unravel_key(("next", self._tensor_keys.reward))
        true_reward_key = unravel_key(("next", self._tensor_keys.true_reward))
        self._next(tensordict, "reward", "input tensordict")
        tensordict.rename_key_(reward_key, true_reward_key)

        tensordict = self.world_model(tensordict)
        names = ("prior_mean", "prior_std", "posterior_mean", "posterior_std", "pixels",
                 "reco_pixels", "true_reward", "reward")
        written, keys = tensordict.get("next", None), self._tensor_keys
        tensors = ([written.get(getattr(keys, name), None) for name in names]
                   if isinstance(written, TensorDictBase) else [None])
        if any(t is None for t in tensors):  # the KeyError that names the missing key
            tensors = [self._next(tensordict, name, "world model's output") for name in names]
        losses = dreamer_model_loss(
            *tensors, lambda_kl=self.lambda_kl, lambda_reco=self.lambda_reco,
            lambda_reward=self.lambda_reward, reco_loss=self.reco_loss,
            reward_loss=self.reward_loss, free_nats=self.free_nats,
            delayed_clamp=self.delayed_clamp, global_average=self.global_average,
            backend=self.backend,
        )
        dtypes = torchrl_dtypes(_v1_dtype_chain, tuple(t.dtype for t in tensors),
                                tensors[0].device,
                                (self.reco_loss, self.reward_loss, self.global_average))
        out = TensorDict(
            {name: cast_to(loss, dtype).unsqueeze(-1)
             for name, loss, dtype in zip(self.out_keys, losses, dtypes or (None,) * 3)},
            batch_size=[],
        )
        self._clear_refs(tensordict, out)
        return out, tensordict.detach()
