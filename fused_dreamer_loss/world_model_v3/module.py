"""``FusedDreamerV3ModelLoss``: a torchrl loss module that is a drop-in for torchrl's
DreamerV3ModelLoss, computing through :func:`fused_dreamer_loss.dreamer_v3_model_loss`."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey, unravel_key

from ..core.torchrl_module import (LossModuleBase, TensorKeysMixin, _autocast_state, cast_to,
                                  torchrl_dtypes)
from ..core.validation import check_backend
from .functional import dreamer_v3_model_loss
from .reference import default_reward_bins, symlog
from .validation import DEFAULT_NUM_REWARD_BINS, V3Options, check_bins_ascending

KL_NAMES = {"balanced": ("loss_model_kl",),
            "separate": ("loss_model_dynamic", "loss_model_representation")}
#: Dtypes a module cast does not give the reward_bins buffer: torchrl's default support (±4.9e8)
#: overflows float16 and is rounded to 3 digits in bfloat16, and the loss computes in float32.
NARROW_FLOATS = (torch.float16, torch.bfloat16)


# ---- torchrl's dtypes: the kinds of ops its DreamerV3ModelLoss applies to each term -------------
# (see fused_dreamer_loss.core.torchrl_module.torchrl_dtypes; only the dtypes of these results are used)


def _kl_dtype_chain(posterior_logits, prior_logits):
    q, p = torch.softmax(posterior_logits, -1), torch.softmax(prior_logits, -1)
    return (q * (q.log() - p.log())).sum(-1).mean()


def _reco_dtype_chain(target, prediction, transform, reco_loss, global_average):
    if transform is False:  # torchrl: integer targets .float() / 255, predictions .float()
        target = target if target.is_floating_point() else target.float()
        prediction = prediction.float()
    else:
        target = symlog(target)
        prediction = symlog(prediction) if transform is True else prediction
    error = target - prediction
    error = error.pow(2) if reco_loss == "l2" else error.abs()
    if not global_average:
        error = error.reshape(1, -1).sum(-1)
    return error.mean()


def _reward_dtype_chain(true_reward, prediction, two_hot):
    if two_hot:  # the two-hot target has the reward's dtype
        return (true_reward * torch.log_softmax(prediction, -1)).sum(-1).mean()
    return (symlog(true_reward) - symlog(prediction)).pow(2).mean()


def _continue_dtype_chain(prediction):  # the target is float32, (~terminated).float()
    return F.binary_cross_entropy_with_logits(prediction, torch.ones_like(prediction,
                                                                          dtype=torch.float32))


def _as_list(keys: NestedKey | list[NestedKey]) -> list[NestedKey]:
    return list(keys) if isinstance(keys, list) else [keys]


#: The constructor options torchrl's DreamerV3ModelLoss has, under its attribute names.
TORCHRL_OPTIONS = ("lambda_kl", "lambda_reco", "lambda_reward", "lambda_continue", "kl_mode",
                   "lambda_dynamic", "lambda_representation", "unimix", "continue_target_scale",
                   "kl_alpha", "free_bits", "reco_loss", "reco_symlog", "reward_two_hot",
                   "num_reward_bins", "global_average", "detach_output")


class FusedDreamerV3ModelLoss(TensorKeysMixin, LossModuleBase):
    """DreamerV3 world-model loss, fused: the arguments, keys, outputs, numbers and LossModule API
    of torchrl's ``DreamerV3ModelLoss``, plus ``backend`` and the convention options of
    :func:`fused_dreamer_loss.dreamer_v3_model_loss`.

    The loss (Hafner et al., 2023, https://arxiv.org/abs/2301.04104) is a KL between the RSSM's
    categorical posterior and prior (``kl_mode="balanced"``: torchrl's default, one
    ``loss_model_kl``; ``"separate"``: the reference's dynamics and representation terms), a
    reconstruction loss summed over one or more heads, a reward loss (two-hot cross-entropy over
    ``reward_bins``, or symlog squared error) and, with ``lambda_continue > 0``, a continue loss
    (binary cross-entropy). The math is :func:`fused_dreamer_loss.dreamer_v3_model_loss`'s: this
    module reads the tensordict, runs the world model and calls it.

    As torchrl's module: the environment's reward (``("next", reward)``) is renamed to
    ``("next", true_reward)`` before the world model runs (on a shallow copy: the input is not
    modified); with ``reward_two_hot`` the reward logits are read from ``reward_logits``, falling
    back, with torchrl's ``DeprecationWarning``, to the ``reward`` key the world model wrote; the
    continue term is computed only when ``lambda_continue > 0`` **and** the world model wrote
    ``continue_pred`` **and** the data holds ``terminated`` (else ``done``): otherwise it is
    skipped silently and ``loss_model_continue`` is absent; ``reward_bins`` is a (persistent)
    buffer, so state dicts load strictly either way between torchrl's module and this one.

    With torchrl installed this is a ``torchrl.objectives.LossModule`` (``functional``,
    ``convert_to_functional``, ``make_value_estimator`` (raises ``NotImplementedError``, as
    torchrl's), ``vmap_randomness``, ``reset_parameters_recursive`` (torchrl's resets only modules
    held outside the registered submodules, and this loss, as torchrl's, holds none: nothing is
    reset), ``set_keys`` (returns None)); without torchrl a ``tensordict.nn.TensorDictModuleBase``
    (``reset_parameters_recursive`` is then tensordict's: it resets the world model).

    Where it differs from torchrl's (where torchrl would be wrong, this is right):

    - ``unimix=0`` with a class whose softmax underflows to 0: torchrl's separate-mode KL is NaN
      (``0·log 0``), or inf where a prior class underflows; this gives the finite, right value;
    - the losses carry torchrl's dtypes (float32 for float32 data; under CPU bf16 autocast the KL
      terms are bfloat16, the others float32; a float64 world model gets torchrl's float32 for the
      continue term and for uint8 heads without symlog), but are computed in float32 or float64
      and rounded once, never in bf16 arithmetic; heads without symlog of a float64 world model
      are compared in float64 (torchrl first rounds the prediction to float32);
    - a cast of the module to float16 or bfloat16 (``loss.to(torch.float16)``, ``half()``)
      leaves the ``reward_bins`` buffer in its dtype (it follows the device): torchrl's float16
      buffer overflows to ±inf at the ends of the default support and its bfloat16 one rounds every
      bin, while the loss is computed in float32 anyway (a state dict saved from a float16 torchrl
      module holds those infinite bins: rebuild its bins rather than load them);
    - options are checked at construction (torchrl checks ``kl_mode`` and
      ``continue_target_scale``), key values in ``set_keys``, and the inputs on every call, with
      errors naming the argument or the key; ``terminated`` may also be float (torchrl's ``~``
      needs bool);
    - it has ``in_keys`` (the world model's) and ``out_keys`` (the loss names for the options
      given at construction); torchrl's has neither, and its ``repr`` raises.

    Args:
        world_model (TensorDictModule): reads the input tensordict and writes, under ``"next"``,
            the prior and posterior logits ``[*B, S, K]``, the reconstructions, the reward logits
            (or the scalar reward), and optionally the continue logit.
        lambda_kl (float, optional): weight of the KL terms. Default: 1.0.
        lambda_reco (float, optional): weight of the reconstruction loss. Default: 1.0.
        lambda_reward (float, optional): weight of the reward loss. Default: 1.0.
        lambda_continue (float, optional): weight of the continue loss; 0 turns it off.
            Default: 0.0.
        kl_mode (str, optional): ``"balanced"`` or ``"separate"``. Default: ``"balanced"``.
        lambda_dynamic (float, optional): weight of the dynamics term (separate mode). Default: 1.0.
        lambda_representation (float, optional): weight of the representation term (separate
            mode). Default: 0.1.
        unimix (float, optional): uniform mixture of the separate mode's categoricals, in [0, 1).
            Default: 0.0.
        continue_target_scale (float, optional): the continue target is
            ``(1 − terminated)·continue_target_scale``, in (0, 1]. Default: 1.0.
        kl_alpha (float, optional): the balance of the balanced mode, in [0, 1]. Default: 0.8.
        free_bits (float, optional): free nats: per categorical (balanced) or on the sum over the
            categoricals (separate). Default: 1.0.
        reco_loss (str, optional): ``"l2"`` or ``"l1"``. Default: ``"l2"``.
        reco_symlog (bool, str or list, optional): ``True`` (symlog of target and prediction),
            ``False`` (none; integer targets become ``x·pixels_scale + pixels_offset``),
            ``"target"`` (symlog of the target only, as the reference code for vector
            observations), or a list of these, one per head. Default: ``True``.
        reward_two_hot (bool, optional): two-hot cross-entropy of reward logits, or symlog squared
            error of a scalar reward. Default: ``True``.
        num_reward_bins (int, optional): the number of reward bins of torchrl's default support;
            with ``reward_bins`` it is their count (passing another value raises). Default: 255.
        global_average (bool, optional): average the reconstruction over all its elements instead
            of summing each row over everything after the tensordict's batch dims and averaging
            over the rows, as torchrl (a tensordict of ``batch_size=[B]`` holding ``[B, T, ...]``
            frames has B rows of T frames). Default: ``False``.
        detach_output (bool, optional): return the world model's output detached. Default: True.
        reward_bins (tensor or sequence, optional): a support of your own (1-D, ascending) for the
            ``reward_bins`` buffer; default: torchrl's (``symexp`` of a uniform grid of [−20, 20]).
        two_hot_space (str, optional): ``"raw"`` (torchrl) or ``"symlog"`` (interpolate after
            symlog, as the 2023 reference and SheepRL). Default: ``"raw"``.
        pixels_scale, pixels_offset (float, optional): the normalisation of integer targets of
            heads without symlog. Defaults: 1/255 and 0 (torchrl).
        backend (str, optional): ``"auto"`` (the fused kernels for CUDA tensors, the pure-torch
            reference otherwise), ``"triton"`` or ``"torch"``. Default: ``"auto"``.

    Keys (``set_keys`` changes them, all read under ``"next"``; see :class:`_AcceptedKeys`):
        reward, reward_logits, true_reward, prior_logits, posterior_logits, pixels and
        reco_pixels (a key, or lists of keys: one pair per head), continue_pred, done, terminated.

    Returns from ``forward``:
        ``(losses, world_model_output)``: a ``TensorDict`` with batch size ``[]`` holding
        ``loss_model_reco``, ``loss_model_reward``, then ``loss_model_kl`` (balanced) or
        ``loss_model_dynamic`` and ``loss_model_representation`` (separate), then
        ``loss_model_continue`` when computed, each of shape ``[1]``; and the world model's output
        (detached if ``detach_output``).

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from tensordict.nn import TensorDictModule
        >>> from fused_dreamer_loss import FusedDreamerV3ModelLoss
        >>> S, K, BINS = 4, 4, 16
        >>> class WorldModel(torch.nn.Module):  # a stand-in: logits, decoder, reward, continue
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.enc = torch.nn.Linear(3 * 8 * 8, 2 * S * K)
        ...         self.dec = torch.nn.Linear(S * K, 3 * 8 * 8)
        ...         self.heads = torch.nn.Linear(S * K, BINS + 1)
        ...     def forward(self, pixels):
        ...         post, prior = self.enc(pixels.flatten(-3).float() / 255).chunk(2, -1)
        ...         reco = self.dec(post.softmax(-1)).unflatten(-1, (3, 8, 8))
        ...         reward_logits, cont = self.heads(post).split([BINS, 1], -1)
        ...         return post.unflatten(-1, (S, K)), prior.unflatten(-1, (S, K)), reco, \\
        ...             reward_logits, cont
        >>> world_model = TensorDictModule(
        ...     WorldModel(), in_keys=[("next", "pixels")],
        ...     out_keys=[("next", k) for k in ("posterior_logits", "prior_logits", "reco_pixels",
        ...                                     "reward_logits", "continue_pred")])
        >>> loss = FusedDreamerV3ModelLoss(world_model, num_reward_bins=BINS, kl_mode="separate",
        ...                                unimix=0.01, lambda_continue=1.0, reco_symlog=False,
        ...                                backend="torch")
        >>> data = TensorDict({"next": {
        ...     "pixels": torch.randint(0, 256, (2, 5, 3, 8, 8), dtype=torch.uint8),
        ...     "reward": torch.randn(2, 5, 1),
        ...     "terminated": torch.zeros(2, 5, 1, dtype=torch.bool)}}, batch_size=[2, 5])
        >>> losses, model_out = loss(data)
        >>> for name, value in losses.items():
        ...     print(name, tuple(value.shape), value.dtype)
        loss_model_reco (1,) torch.float32
        loss_model_reward (1,) torch.float32
        loss_model_dynamic (1,) torch.float32
        loss_model_representation (1,) torch.float32
        loss_model_continue (1,) torch.float32
        >>> losses.batch_size
        torch.Size([])
        >>> sum(losses.values()).sum().backward()
    """

    @dataclass
    class _AcceptedKeys:
        """The tensordict keys the loss reads, all under ``"next"``; change them with ``set_keys``.

        Attributes:
            reward: the decoded reward the world model writes (the prediction when
                ``reward_two_hot=False``), and, before the world model runs, the environment's
                reward, moved to ``true_reward``. Default: ``"reward"``.
            reward_logits: the reward head's logits over the bins (``reward_two_hot=True``).
                Default: ``"reward_logits"``.
            true_reward: where the environment's reward is moved to. Default: ``"true_reward"``.
            prior_logits, posterior_logits: the RSSM's categorical logits ``[*B, S, K]``.
                Defaults: ``"prior_logits"``, ``"posterior_logits"``.
            pixels: the observation of each reconstruction head: a key, or a list of keys (one per
                head; the heads' losses are summed). Default: ``"pixels"``.
            reco_pixels: the predictions, paired in order with ``pixels``. Default:
                ``"reco_pixels"``.
            continue_pred: the continue logit (optional). Default: ``"continue_pred"``.
            done: the flag read as the terminal flag when ``terminated`` is missing (optional).
                Default: ``"done"``.
            terminated: the terminal flag (optional). Default: ``"terminated"``.
        """

        reward: NestedKey = "reward"
        reward_logits: NestedKey = "reward_logits"
        true_reward: NestedKey = "true_reward"
        prior_logits: NestedKey = "prior_logits"
        posterior_logits: NestedKey = "posterior_logits"
        pixels: NestedKey | list[NestedKey] = "pixels"
        reco_pixels: NestedKey | list[NestedKey] = "reco_pixels"
        continue_pred: NestedKey = "continue_pred"
        done: NestedKey = "done"
        terminated: NestedKey = "terminated"

    default_keys = _AcceptedKeys
    _list_keys = ("pixels", "reco_pixels")

    def __init__(
        self,
        world_model: TensorDictModuleBase,
        *,
        lambda_kl: float = 1.0,
        lambda_reco: float = 1.0,
        lambda_reward: float = 1.0,
        lambda_continue: float = 0.0,
        kl_mode: str = "balanced",
        lambda_dynamic: float = 1.0,
        lambda_representation: float = 0.1,
        unimix: float = 0.0,
        continue_target_scale: float = 1.0,
        kl_alpha: float = 0.8,
        free_bits: float = 1.0,
        reco_loss: str = "l2",
        reco_symlog: bool | str | Sequence[bool | str] = True,
        reward_two_hot: bool = True,
        num_reward_bins: int = DEFAULT_NUM_REWARD_BINS,
        global_average: bool = False,
        detach_output: bool = True,
        reward_bins: torch.Tensor | Sequence[float] | None = None,
        two_hot_space: str = "raw",
        pixels_scale: float = 1.0 / 255.0,
        pixels_offset: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(detach_output, bool):
            raise TypeError(f"detach_output must be a bool, got {type(detach_output).__name__} "
                            f"{detach_output!r}")
        # Checked now, so a bad option fails at construction rather than at the first batch.
        opts = V3Options(lambda_kl, lambda_reco, lambda_reward, lambda_continue, kl_mode,
                         lambda_dynamic, lambda_representation, unimix, continue_target_scale,
                         kl_alpha, free_bits, reco_loss, reco_symlog, reward_two_hot,
                         num_reward_bins, global_average, reward_bins, two_hot_space,
                         pixels_scale, pixels_offset)
        if reward_bins is None:
            bins = default_reward_bins(num_reward_bins)
        else:
            bins = (reward_bins.detach().clone() if isinstance(reward_bins, torch.Tensor)
                    else opts.reward_bins.to(torch.get_default_dtype()))
            if num_reward_bins not in (DEFAULT_NUM_REWARD_BINS, bins.numel()):
                raise ValueError(
                    f"num_reward_bins={num_reward_bins} but reward_bins holds {bins.numel()} "
                    "bins; leave num_reward_bins out when you give reward_bins")
            num_reward_bins = bins.numel()
            check_bins_ascending(bins, bins.dtype)  # as the buffer holds them
        self.world_model = world_model
        self.backend = check_backend(backend)
        self.lambda_kl = lambda_kl
        self.lambda_reco = lambda_reco
        self.lambda_reward = lambda_reward
        self.lambda_continue = lambda_continue
        self.kl_mode = kl_mode
        self.lambda_dynamic = lambda_dynamic
        self.lambda_representation = lambda_representation
        self.unimix = unimix
        self.continue_target_scale = continue_target_scale
        self.kl_alpha = kl_alpha
        self.free_bits = free_bits
        self.reco_loss = reco_loss
        self.reco_symlog = list(reco_symlog) if isinstance(reco_symlog, tuple) else reco_symlog
        self.reward_two_hot = reward_two_hot
        self.num_reward_bins = num_reward_bins
        self.global_average = global_average
        self.detach_output = detach_output
        self.two_hot_space = two_hot_space
        self.pixels_scale = pixels_scale
        self.pixels_offset = pixels_offset
        self.register_buffer("reward_bins", bins)
        #: The losses' torchrl dtypes by input dtypes, options and autocast state.
        self._dtypes: dict = {}
        self._tensor_keys = self._AcceptedKeys()
        self.in_keys = list(getattr(world_model, "in_keys", []))
        self.out_keys = ["loss_model_reco", "loss_model_reward", *KL_NAMES[kl_mode],
                         *(["loss_model_continue"] if lambda_continue > 0 else [])]

    @classmethod
    def from_torchrl(cls, loss: Any, *, backend: str = "auto") -> FusedDreamerV3ModelLoss:
        """A fused twin of torchrl's ``DreamerV3ModelLoss`` ``loss``: its world model (the module
        itself, weights shared), its options, its keys and a copy of its reward bins; the
        options torchrl lacks keep torchrl's behaviour.

        Args:
            loss (DreamerV3ModelLoss): torchrl's loss.
            backend (str, optional): as for the constructor. Default: ``"auto"``.
        """
        options = {name: getattr(loss, name) for name in TORCHRL_OPTIONS}
        fused = cls(loss.world_model, **options, backend=backend)
        fused.reward_bins = loss.reward_bins.detach().clone()
        fused.set_keys(**dataclasses.asdict(loss.tensor_keys))
        return fused

    def _apply(self, fn, *args, **kwargs):
        """``nn.Module._apply`` (behind ``to``, ``half``, ``cuda``, ...), except that a cast to
        float16 or bfloat16 leaves ``reward_bins`` in its dtype (on the new device): bins in a
        dtype that holds them."""
        bins = self.reward_bins
        result = super()._apply(fn, *args, **kwargs)
        cast = self._buffers["reward_bins"]
        if cast.dtype in NARROW_FLOATS and bins.dtype not in NARROW_FLOATS:
            self._buffers["reward_bins"] = bins.to(cast.device)
        return result

    def _heads(self) -> tuple[list[NestedKey], list[NestedKey], list[bool | str]]:
        """The (pixels, reco_pixels, reco_symlog) of each head, or a ValueError naming them."""
        targets = _as_list(self._tensor_keys.pixels)
        predictions = _as_list(self._tensor_keys.reco_pixels)
        symlogs = (list(self.reco_symlog) if isinstance(self.reco_symlog, (list, tuple))
                   else [self.reco_symlog] * len(targets))
        if not len(targets) == len(predictions) == len(symlogs):
            raise ValueError(
                f"the reconstruction heads disagree: tensor_keys.pixels lists {len(targets)} "
                f"keys, tensor_keys.reco_pixels {len(predictions)} and reco_symlog "
                f"{len(symlogs)} entries; give one each per head")
        return targets, predictions, symlogs

    def _reward_prediction(self, tensordict: TensorDictBase) -> torch.Tensor:
        """The reward logits (two-hot) or the scalar prediction, as torchrl reads them."""
        if not self.reward_two_hot:
            return self._next(tensordict, "reward", "world model's output")
        logits_key = unravel_key(("next", self._tensor_keys.reward_logits))
        logits = tensordict.get(logits_key, None)
        if logits is None:
            reward_key = unravel_key(("next", self._tensor_keys.reward))
            logits = tensordict.get(reward_key, None)
            if logits is None:
                raise KeyError(
                    f"{logits_key} (the 'reward_logits' key) is missing from the world model's "
                    f"output (and so is the legacy {reward_key}); set it with "
                    "set_keys(reward_logits=...) if your world model writes it elsewhere")
            # torchrl's category and words, so that filters and matches written for it hold
            warnings.warn(
                "Storing DreamerV3 categorical reward logits under the decoded reward key "
                f"{reward_key!r} is deprecated and will be removed in v0.16. Write logits to the "
                "configured reward_logits key instead.", DeprecationWarning, stacklevel=3)
        if logits.shape[-1] != self.reward_bins.numel():
            raise ValueError(
                f"reward_two_hot=True needs logits over {self.reward_bins.numel()} bins, but the "
                f"reward logits have shape {tuple(logits.shape)}")
        return logits

    def _continue_inputs(self, tensordict: TensorDictBase, batch_shape: torch.Size):
        """``(continue_pred, terminated)`` shaped ``[*B, 1]``, or ``(None, None)`` when the term
        is off or an input is missing (torchrl skips it then)."""
        if not self.lambda_continue > 0:
            return None, None
        keys = self._tensor_keys
        prediction = tensordict.get(unravel_key(("next", keys.continue_pred)), None)
        terminated = tensordict.get(unravel_key(("next", keys.terminated)), None)
        if terminated is None:
            terminated = tensordict.get(unravel_key(("next", keys.done)), None)
        if prediction is None or terminated is None:
            return None, None
        # torchrl squeezes the last dim of both: [*B] is accepted as well as [*B, 1]
        prediction, terminated = (t.unsqueeze(-1) if t.shape == batch_shape else t
                                  for t in (prediction, terminated))
        return prediction, terminated

    def _torchrl_dtypes(self, posterior, prior, targets, predictions, symlogs, true_reward,
                        reward_pred, continue_pred) -> dict[str, torch.dtype | None]:
        """The dtype of each loss as torchrl's module would return it (see ``torchrl_dtypes``),
        worked out once per input dtypes, options and autocast state."""
        tensors = (posterior, prior, *targets, *predictions, true_reward, reward_pred,
                   continue_pred)
        key = None if torch.compiler.is_compiling() else (
            tuple(None if t is None else t.dtype for t in tensors), tuple(symlogs),
            posterior.device.type, _autocast_state(posterior.device.type), self.reco_loss,
            self.global_average, self.reward_two_hot, self.kl_mode)
        dtypes = self._dtypes.get(key) if key is not None else None
        if dtypes is None:
            dtypes = self._probe_dtypes(posterior, prior, targets, predictions, symlogs,
                                        true_reward, reward_pred, continue_pred)
            if key is not None:
                self._dtypes[key] = dtypes
        return dtypes

    def _probe_dtypes(self, posterior, prior, targets, predictions, symlogs, true_reward,
                      reward_pred, continue_pred) -> dict[str, torch.dtype | None]:
        def one(chain, tensors, *params):
            found = torchrl_dtypes(chain, tuple(t.dtype for t in tensors), posterior.device,
                                   params)
            return None if found is None else found[0]

        kl = one(_kl_dtype_chain, (posterior, prior))
        reco = [one(_reco_dtype_chain, (x, y), s, self.reco_loss, self.global_average)
                for x, y, s in zip(targets, predictions, symlogs)]
        dtypes = {"loss_model_reco": None if None in reco else _promote(reco),
                  "loss_model_reward": one(_reward_dtype_chain, (true_reward, reward_pred),
                                           self.reward_two_hot),
                  **dict.fromkeys(KL_NAMES[self.kl_mode], kl)}
        if continue_pred is not None:
            dtypes["loss_model_continue"] = one(_continue_dtype_chain, (continue_pred,))
        return dtypes

    def forward(self, tensordict: TensorDictBase) -> tuple[TensorDict, TensorDictBase]:
        """Run the world model on a shallow copy of ``tensordict`` and compute the losses."""
        keys = self._tensor_keys
        # New containers for every nested level, no tensor copied: renaming does not touch the
        # input (under torch.compile a shallow copy can keep the input's nested containers)
        tensordict = (tensordict.select(*tensordict.keys(True, True))
                      if torch.compiler.is_compiling() else tensordict.copy())
        self._next(tensordict, "reward", "input tensordict")
        tensordict.rename_key_(unravel_key(("next", keys.reward)),
                               unravel_key(("next", keys.true_reward)))

        tensordict = self.world_model(tensordict)
        written = "world model's output"
        posterior = self._next(tensordict, "posterior_logits", written)
        prior = self._next(tensordict, "prior_logits", written)
        target_keys, prediction_keys, symlogs = self._heads()
        targets = [self._next(tensordict, "pixels", written, k) for k in target_keys]
        predictions = [self._next(tensordict, "reco_pixels", written, k) for k in prediction_keys]
        true_reward = self._next(tensordict, "true_reward", written)
        reward_pred = self._reward_prediction(tensordict)
        continue_pred, terminated = self._continue_inputs(tensordict, posterior.shape[:-2])

        losses = dreamer_v3_model_loss(
            posterior, prior, targets, predictions, true_reward, reward_pred, continue_pred,
            terminated, lambda_kl=self.lambda_kl,
            lambda_reco=self.lambda_reco * _rows_per_tensordict_row(posterior, tensordict,
                                                                    self.global_average),
            lambda_reward=self.lambda_reward,
            lambda_continue=self.lambda_continue if continue_pred is not None else 0.0,
            kl_mode=self.kl_mode, lambda_dynamic=self.lambda_dynamic,
            lambda_representation=self.lambda_representation, unimix=self.unimix,
            continue_target_scale=self.continue_target_scale, kl_alpha=self.kl_alpha,
            free_bits=self.free_bits, reco_loss=self.reco_loss, reco_symlog=symlogs,
            reward_two_hot=self.reward_two_hot, num_reward_bins=self.num_reward_bins,
            global_average=self.global_average,
            reward_bins=self.reward_bins if self.reward_two_hot else None,
            two_hot_space=self.two_hot_space, pixels_scale=self.pixels_scale,
            pixels_offset=self.pixels_offset, backend=self.backend,
        )
        dtypes = self._torchrl_dtypes(posterior, prior, targets, predictions, symlogs,
                                      true_reward, reward_pred, continue_pred)
        out = TensorDict({name: cast_to(loss, dtypes.get(name)).unsqueeze(-1)
                          for name, loss in losses.items()}, batch_size=[])
        self._clear_refs(tensordict, out)
        return out, tensordict.detach() if self.detach_output else tensordict


def _rows_per_tensordict_row(logits: torch.Tensor, tensordict: TensorDictBase,
                             global_average: bool) -> float:
    """How many of the functional loss's reconstruction rows (the logits' batch dims ``*B``) make
    one row of torchrl's, which sums each row over everything after the tensordict's batch dims
    (``batch_size=[B]`` with ``[B, T, ...]`` frames: T; ``batch_size=[]``: all of ``*B``)."""
    rows, tensordict_rows = math.prod(logits.shape[:-2]), math.prod(tensordict.batch_size)
    if global_average or not tensordict_rows:  # an empty batch: the functional loss says so
        return 1.0
    return rows / tensordict_rows


def _promote(dtypes: list[torch.dtype]) -> torch.dtype:
    result = dtypes[0]
    for dtype in dtypes[1:]:
        result = torch.promote_types(result, dtype)
    return result
