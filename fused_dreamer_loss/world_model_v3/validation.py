"""Argument checks of the DreamerV3 model loss, shared by every backend.

Options are checked once, by :class:`V3Options`; tensors by :func:`validate_v3_inputs`, which
looks at shapes, dtypes and devices only. No tensor value is read on a device: the one value check,
``reward_bins`` ascending, runs only on bins that are a Python sequence or a CPU tensor (outside
``torch.compile``), where it costs no host-device synchronisation. NaN in gives NaN out.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.math import DEFAULT_NUM_BINS
from ..core.validation import FLOAT_DTYPES, check_bool, check_choice, check_fit, check_real

KL_MODES = ("balanced", "separate")
RECO_LOSSES = ("l2", "l1")
TWO_HOT_SPACES = ("raw", "symlog")
RECO_SYMLOG_VALUES = (True, False, "target")
DEFAULT_NUM_REWARD_BINS = DEFAULT_NUM_BINS
MIN_REWARD_BINS = 2
# Error messages list bad reward_bins up to this many values.
_BINS_SHOWN = 16

# How each reconstruction head is transformed, resolved from ``reco_symlog``.
SYMLOG_BOTH = "both"
SYMLOG_TARGET = "target"
SYMLOG_NONE = "none"
_HEAD_MODES = {True: SYMLOG_BOTH, False: SYMLOG_NONE, "target": SYMLOG_TARGET}

#: Warned about once a process: a head that symlogs integer targets symlogs the raw values.
RAW_SYMLOG_WARNING = (
    "{name} holds integer frames ({dtype}) and reco_symlog is {mode!r} for that head: the loss "
    "compares the symlog of the raw values (0...255), as torchrl does, not of pixels / 255, so "
    "the prediction must be in raw pixel units (or, with 'target', in symlog units). For targets "
    "scaled as x * pixels_scale + pixels_offset (the DreamerV3 reference's uint8 / 255), use "
    "reco_symlog=False. Shown once."
)
_warned: set[str] = set()

_REAL_OPTIONS = ("lambda_kl", "lambda_reco", "lambda_reward", "lambda_continue", "lambda_dynamic",
                 "lambda_representation", "unimix", "continue_target_scale", "kl_alpha",
                 "free_bits", "pixels_scale", "pixels_offset")


def _check_reco_symlog(value: object) -> bool | str | tuple[bool | str, ...]:
    """``reco_symlog`` with a list turned into a tuple, each entry one of RECO_SYMLOG_VALUES."""
    entries = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not entries:
        raise ValueError("reco_symlog must not be an empty list: give one entry per head")
    for entry in entries:
        if isinstance(entry, str) and entry not in RECO_SYMLOG_VALUES:
            raise ValueError(
                f"reco_symlog must be one of {RECO_SYMLOG_VALUES} or a list of them, got {entry!r}"
            )
        if not isinstance(entry, (bool, str)):
            raise TypeError(
                f"reco_symlog must be one of {RECO_SYMLOG_VALUES} or a list of them, got "
                f"{type(entry).__name__} {entry!r}"
            )
    return entries if isinstance(value, (list, tuple)) else value


def _check_reward_bins(value: object) -> torch.Tensor:
    """``reward_bins`` as a 1-D real tensor of at least two strictly ascending finite values.

    The values are read only from a Python sequence or a CPU tensor, outside ``torch.compile``:
    reading a device tensor would synchronise the host with the device.
    """
    if isinstance(value, torch.Tensor):
        bins = value
        if bins.dtype == torch.bool or bins.is_complex():
            raise TypeError(f"reward_bins must hold real numbers, got dtype {bins.dtype}")
    elif isinstance(value, Sequence) and not isinstance(value, str):
        try:
            bins = torch.tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"reward_bins must be a sequence of real numbers: {exc}") from exc
    else:
        raise TypeError(
            f"reward_bins must be a 1-D tensor or a sequence of numbers, got {type(value).__name__}"
        )
    if bins.dim() != 1 or bins.numel() < MIN_REWARD_BINS:
        raise ValueError(
            f"reward_bins must be 1-D with at least {MIN_REWARD_BINS} values, got shape "
            f"{tuple(bins.shape)}"
        )
    check_bins_ascending(bins, torch.float64)
    return bins


def check_bins_ascending(bins: torch.Tensor, dtype: torch.dtype) -> None:
    """Raise a ValueError naming ``reward_bins`` unless ``bins``, cast to ``dtype`` (the dtype the
    loss uses them in), are finite and strictly ascending: bins distinct in float64 may collide
    in float32 (``1e8`` and ``1e8 + 1``), which would divide by zero in the two-hot weights.
    Only bins on the CPU are read, outside ``torch.compile``: a device tensor would synchronise.
    """
    if bins.device.type != "cpu" or torch.compiler.is_compiling():
        return
    values = bins.to(dtype)
    if bool(torch.isfinite(values).all()) and bool((values[1:] > values[:-1]).all()):
        return
    where = "" if dtype == torch.float64 else f" in {dtype}, the dtype of the reward loss"
    shown = (f", got {values.tolist()}" if values.numel() <= _BINS_SHOWN
             else f" ({values.numel()} values)")
    raise ValueError(f"reward_bins must be finite and strictly ascending{where}{shown}")


@dataclass(frozen=True, eq=False)
class V3Options:
    """The options of the DreamerV3 model loss, checked once at construction.

    Names and defaults are those of torchrl's ``DreamerV3ModelLoss``, plus ``reward_bins``,
    ``two_hot_space``, ``pixels_scale`` and ``pixels_offset``. After construction every real option
    is a float, ``reco_symlog`` a bool, ``"target"`` or a tuple of them, and ``reward_bins`` None or
    a 1-D tensor (a sequence becomes a float64 CPU tensor). Options are compared by identity.

    Raises:
        TypeError: an option of the wrong type (a bool where a number is expected counts).
        ValueError: a non-finite real, a string option outside its allowed values (listed in the
            message), ``unimix`` outside [0, 1), ``kl_alpha`` outside [0, 1],
            ``continue_target_scale`` outside (0, 1] (as torchrl), a negative ``free_bits``,
            ``num_reward_bins`` < 2, ``reward_bins`` that are not 1-D with two values at least, or
            (checked on a sequence or a CPU tensor only) not finite and strictly ascending, and
            ``reward_bins`` given with ``reward_two_hot=False``.
    """

    lambda_kl: float = 1.0
    lambda_reco: float = 1.0
    lambda_reward: float = 1.0
    lambda_continue: float = 0.0
    kl_mode: str = "balanced"
    lambda_dynamic: float = 1.0
    lambda_representation: float = 0.1
    unimix: float = 0.0
    continue_target_scale: float = 1.0
    kl_alpha: float = 0.8
    free_bits: float = 1.0
    reco_loss: str = "l2"
    reco_symlog: bool | str | tuple[bool | str, ...] = True
    reward_two_hot: bool = True
    num_reward_bins: int = DEFAULT_NUM_REWARD_BINS
    global_average: bool = False
    reward_bins: torch.Tensor | None = None
    two_hot_space: str = "raw"
    pixels_scale: float = 1.0 / 255.0
    pixels_offset: float = 0.0

    def __post_init__(self) -> None:
        for name in _REAL_OPTIONS:
            object.__setattr__(self, name, check_real(name, getattr(self, name)))
        if not 0.0 <= self.unimix < 1.0:
            raise ValueError(f"unimix must be in [0, 1), got {self.unimix!r}")
        if not 0.0 <= self.kl_alpha <= 1.0:
            raise ValueError(f"kl_alpha must be in [0, 1], got {self.kl_alpha!r}")
        if not 0.0 < self.continue_target_scale <= 1.0:
            raise ValueError(
                f"continue_target_scale must be in (0, 1], got {self.continue_target_scale!r}"
            )
        if not self.free_bits >= 0.0:
            raise ValueError(f"free_bits must be non-negative, got {self.free_bits!r}")
        check_choice("kl_mode", self.kl_mode, KL_MODES)
        check_choice("reco_loss", self.reco_loss, RECO_LOSSES)
        check_choice("two_hot_space", self.two_hot_space, TWO_HOT_SPACES)
        for name in ("reward_two_hot", "global_average"):
            check_bool(name, getattr(self, name))
        object.__setattr__(self, "reco_symlog", _check_reco_symlog(self.reco_symlog))
        if isinstance(self.num_reward_bins, bool) or not isinstance(self.num_reward_bins, int):
            raise TypeError(
                f"num_reward_bins must be an int, got {type(self.num_reward_bins).__name__} "
                f"{self.num_reward_bins!r}"
            )
        if self.num_reward_bins < MIN_REWARD_BINS:
            raise ValueError(
                f"num_reward_bins must be at least {MIN_REWARD_BINS}, got {self.num_reward_bins}"
            )
        if self.reward_bins is not None:
            if not self.reward_two_hot:
                raise ValueError("reward_bins is used only with reward_two_hot=True")
            object.__setattr__(self, "reward_bins", _check_reward_bins(self.reward_bins))

    @property
    def reward_width(self) -> int:
        """The reward head's last dim: R logits (``len(reward_bins)`` if given, else
        ``num_reward_bins``) with ``reward_two_hot``, else 1."""
        if not self.reward_two_hot:
            return 1
        return self.num_reward_bins if self.reward_bins is None else self.reward_bins.numel()

    @property
    def has_continue(self) -> bool:
        """Whether the continue term is computed (``lambda_continue > 0``, as torchrl)."""
        return self.lambda_continue > 0.0


@dataclass(frozen=True)
class V3Shapes:
    """What the kernels need to know about the inputs.

    ``rows`` = prod(*B); ``head_numels`` the element count of each reconstruction head;
    ``head_symlog`` each head's transform: ``"both"`` (symlog target and prediction), ``"target"``
    (symlog the target only) or ``"none"``. Each ``*_dtype`` is the dtype its term is computed in
    and returned as: float32, or float64 when one of the term's floating inputs is float64
    (``continue_dtype`` is None when the continue term is off).
    """

    batch_shape: torch.Size
    rows: int
    num_categoricals: int
    num_classes: int
    reward_width: int
    head_numels: tuple[int, ...]
    head_symlog: tuple[str, ...]
    kl_dtype: torch.dtype
    reco_dtype: torch.dtype
    reward_dtype: torch.dtype
    continue_dtype: torch.dtype | None

    @property
    def heads(self) -> int:
        """The number of reconstruction heads."""
        return len(self.head_numels)


def as_heads(name: str, value: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """One tensor per reconstruction head: a tensor becomes a 1-tuple, a list a tuple."""
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{name} must hold at least one reconstruction head, got none")
        return tuple(value)
    raise TypeError(
        f"{name} must be a torch.Tensor or a list of them (one per head), got "
        f"{type(value).__name__}"
    )


def _check_tensor(name: str, tensor: object, *, integer: bool = False,
                  boolean: bool = False) -> torch.Tensor:
    """``tensor`` if its dtype is floating (or, where allowed, integer or bool)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    dtype = tensor.dtype
    is_integer = not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    if not (dtype in FLOAT_DTYPES or (integer and is_integer)
            or (boolean and dtype == torch.bool)):
        expected = ", ".join(str(d) for d in FLOAT_DTYPES)
        if integer:
            expected += " or an integer dtype (e.g. torch.uint8)"
        if boolean:
            expected += " or torch.bool"
        raise TypeError(f"{name} has dtype {dtype}; expected one of {expected}")
    return tensor


def _term_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when one of the floating ``tensors`` is float64."""
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    return functools.reduce(torch.promote_types, floats, torch.float32)


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name} must have shape {what} = {expected}, got {tuple(tensor.shape)}")


def validate_v3_inputs(
    posterior_logits: torch.Tensor,
    prior_logits: torch.Tensor,
    pixels: torch.Tensor | Sequence[torch.Tensor],
    reco_pixels: torch.Tensor | Sequence[torch.Tensor],
    true_reward: torch.Tensor,
    reward_pred: torch.Tensor,
    continue_pred: torch.Tensor | None,
    terminated: torch.Tensor | None,
    opts: V3Options,
) -> V3Shapes:
    """Check the input tensors against each other and ``opts``; return their shape summary.

    ``continue_pred`` and ``terminated`` are required when ``opts.lambda_continue > 0`` and checked
    whenever they are given.

    Raises:
        TypeError: a non-tensor; logits, predictions or rewards that are not float16, bfloat16,
            float32 or float64; ``pixels`` neither float nor integer; ``terminated`` neither float
            nor bool.
        ValueError: posterior and prior shapes that differ, latents without a batch dim, an empty
            batch, categorical or head; batch dims that disagree between terms; a target and its
            prediction of different shapes; reward logits not ``opts.reward_width`` wide; unequal
            numbers of ``pixels``, ``reco_pixels`` (and ``reco_symlog`` entries); a missing
            ``continue_pred`` or ``terminated`` with ``lambda_continue > 0``; tensors (or
            ``reward_bins``, which may also be on the CPU) on different devices; a real option
            that does not fit in its term's dtype.
    """
    targets, predictions = as_heads("pixels", pixels), as_heads("reco_pixels", reco_pixels)
    if len(targets) != len(predictions):
        raise ValueError(
            f"pixels holds {len(targets)} heads but reco_pixels holds {len(predictions)}; "
            "give one prediction per target"
        )
    symlog = opts.reco_symlog
    if isinstance(symlog, tuple) and len(symlog) != len(targets):
        raise ValueError(
            f"reco_symlog lists {len(symlog)} entries for {len(targets)} reconstruction heads"
        )
    suffixes = [f"[{i}]" for i in range(len(targets))] if len(targets) > 1 else [""]
    heads = [((f"pixels{s}", _check_tensor(f"pixels{s}", target, integer=True)),
              (f"reco_pixels{s}", _check_tensor(f"reco_pixels{s}", prediction)))
             for s, target, prediction in zip(suffixes, targets, predictions)]
    named = [("posterior_logits", _check_tensor("posterior_logits", posterior_logits)),
             ("prior_logits", _check_tensor("prior_logits", prior_logits)),
             *(pair for head in heads for pair in head),
             ("true_reward", _check_tensor("true_reward", true_reward)),
             ("reward_pred", _check_tensor("reward_pred", reward_pred))]
    if continue_pred is not None:
        named.append(("continue_pred", _check_tensor("continue_pred", continue_pred)))
    if terminated is not None:
        named.append(("terminated", _check_tensor("terminated", terminated, boolean=True)))
    if opts.has_continue and (continue_pred is None or terminated is None):
        missing = " and ".join(n for n, t in (("continue_pred", continue_pred),
                                              ("terminated", terminated)) if t is None)
        raise ValueError(f"lambda_continue > 0 computes the continue loss, which needs {missing}")

    devices = {tensor.device for _, tensor in named}
    if len(devices) > 1:
        placed = ", ".join(f"{name} on {tensor.device}" for name, tensor in named)
        raise ValueError(f"all inputs must be on one device, got {placed}")
    device = devices.pop()
    bins = opts.reward_bins
    if bins is not None and bins.device not in (device, torch.device("cpu")):
        raise ValueError(
            f"reward_bins must be on the inputs' device ({device}) or on the CPU, got {bins.device}"
        )

    per_head = symlog if isinstance(symlog, tuple) else (symlog,) * len(targets)
    for ((name, target), _), mode in zip(heads, per_head):
        if mode is not False and not target.is_floating_point():
            _warn_once(RAW_SYMLOG_WARNING,
                       RAW_SYMLOG_WARNING.format(name=name, dtype=target.dtype, mode=mode))

    if posterior_logits.dim() < 3:
        raise ValueError(
            "posterior_logits must have shape [*B, S, K] with at least one batch dim, got "
            f"{tuple(posterior_logits.shape)}"
        )
    if prior_logits.shape != posterior_logits.shape:
        raise ValueError(
            f"prior_logits has shape {tuple(prior_logits.shape)} but posterior_logits has shape "
            f"{tuple(posterior_logits.shape)}; they must match ([*B, S, K])"
        )
    batch_shape = posterior_logits.shape[:-2]
    num_categoricals, num_classes = posterior_logits.shape[-2:]
    rows = math.prod(batch_shape)
    if rows == 0:
        raise ValueError(
            f"the batch is empty: posterior_logits has shape {tuple(posterior_logits.shape)}"
        )
    if num_categoricals == 0 or num_classes == 0:
        raise ValueError(
            "the latent is empty: posterior_logits has shape "
            f"{tuple(posterior_logits.shape)} (S = {num_categoricals}, K = {num_classes})"
        )

    nb = len(batch_shape)
    head_numels = []
    for (t_name, target), (p_name, prediction) in heads:
        if target.dim() <= nb or target.shape[:nb] != batch_shape:
            raise ValueError(
                f"{t_name} must have shape [*B, *I] with the latents' batch dims "
                f"B={tuple(batch_shape)} and at least one event dim, got {tuple(target.shape)}"
            )
        if prediction.shape != target.shape:
            raise ValueError(
                f"{p_name} has shape {tuple(prediction.shape)} but {t_name} has shape "
                f"{tuple(target.shape)}; they must match"
            )
        if target.numel() == 0:
            raise ValueError(f"the head is empty: {t_name} has shape {tuple(target.shape)}")
        head_numels.append(target.numel())

    _check_shape("true_reward", true_reward, (*batch_shape, 1), "[*B, 1]")
    width = opts.reward_width
    what = f"[*B, R] (R = {width} reward bins)" if opts.reward_two_hot else "[*B, 1]"
    _check_shape("reward_pred", reward_pred, (*batch_shape, width), what)
    for name, tensor in (("continue_pred", continue_pred), ("terminated", terminated)):
        if tensor is not None:
            _check_shape(name, tensor, (*batch_shape, 1), "[*B, 1]")

    shapes = V3Shapes(
        batch_shape=batch_shape,
        rows=rows,
        num_categoricals=num_categoricals,
        num_classes=num_classes,
        reward_width=width,
        head_numels=tuple(head_numels),
        head_symlog=tuple(_HEAD_MODES[entry] for entry in per_head),
        kl_dtype=_term_dtype(posterior_logits, prior_logits),
        reco_dtype=_term_dtype(*targets, *predictions),
        reward_dtype=_term_dtype(true_reward, reward_pred),
        continue_dtype=(_term_dtype(continue_pred, terminated) if opts.has_continue else None),
    )
    _check_options_fit(opts, shapes)
    if opts.reward_two_hot and bins is not None:
        check_bins_ascending(bins, shapes.reward_dtype)
    return shapes


def _warn_once(key: str, message: str) -> None:
    """A UserWarning the first time ``key`` applies in this process (pointing at the caller of
    the loss), none after; none while torch.compile traces, where a warning cannot be raised."""
    if key in _warned or torch.compiler.is_compiling():
        return
    _warned.add(key)
    warnings.warn(message, UserWarning, stacklevel=4)


def _check_options_fit(opts: V3Options, shapes: V3Shapes) -> None:
    """Each real option (and the KL's products of lambdas) must be representable in its term's
    dtype: no silent overflow to inf in a float32 loss."""
    options = [("lambda_kl", opts.lambda_kl, shapes.kl_dtype),
               ("lambda_kl * lambda_dynamic", opts.lambda_kl * opts.lambda_dynamic,
                shapes.kl_dtype),
               ("lambda_kl * lambda_representation", opts.lambda_kl * opts.lambda_representation,
                shapes.kl_dtype),
               ("free_bits", opts.free_bits, shapes.kl_dtype),
               ("lambda_reco", opts.lambda_reco, shapes.reco_dtype),
               ("pixels_scale", opts.pixels_scale, shapes.reco_dtype),
               ("pixels_offset", opts.pixels_offset, shapes.reco_dtype),
               ("lambda_reward", opts.lambda_reward, shapes.reward_dtype)]
    if shapes.continue_dtype is not None:
        options.append(("lambda_continue", opts.lambda_continue, shapes.continue_dtype))
    check_fit(options)
