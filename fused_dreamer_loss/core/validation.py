"""Argument checks every loss family uses.

Everything here looks at Python values, shapes, dtypes and devices only: no tensor value is read,
so validation never synchronises the host with the device.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import torch

BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def kernels_can_take(tensors: Iterable[torch.Tensor | None]) -> bool:
    """False for tensors no kernel can read: ``meta`` tensors (shape propagation only) and tensors
    without storage: those of ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ...) and
    of the batched backward of ``jacobian(vectorize=True)``. Those take the pure-torch path, whose
    ops every transform supports. Looks at no value: no host sync."""
    if torch.compiler.is_compiling():  # Dynamo cannot trace the storage check; fakes are plain
        return not any(t is not None and t.device.type == "meta" for t in tensors)
    return not any(t is not None and (t.device.type == "meta" or not torch._C._has_storage(t))
                   for t in tensors)


def check_backend(backend: str) -> str:
    """``backend`` itself, if it is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_fit(options: Iterable[tuple[str, float, torch.dtype]]) -> None:
    """Each ``(name, value, dtype)``: ``value`` must be representable in ``dtype``, the dtype of
    the loss term it scales or bounds (a comparison: symbolic floats under torch.compile pass).

    Raises:
        ValueError: naming the option, its value and the dtype.
    """
    for name, value, dtype in options:
        largest = torch.finfo(dtype).max
        if not -largest <= value <= largest:
            raise ValueError(
                f"{name}={value!r} does not fit in {dtype}, the dtype of its loss term "
                f"(largest magnitude {largest:g})"
            )


def check_real(name: str, value: object) -> float:
    """``value`` as a float if it is a finite real number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    # A comparison, not math.isfinite: under torch.compile an option that changes between calls
    # arrives as a symbolic float, which comparisons (guards) accept.
    if not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def check_choice(name: str, value: object, allowed: tuple) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is one of the strings ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_bool(name: str, value: object) -> None:
    """Raise a TypeError naming ``name`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


#: Error messages list bad bins up to this many values.
_BINS_SHOWN = 16
#: A two-hot support has two values at least.
MIN_BINS = 2


def check_bins(name: str, value: object) -> torch.Tensor:
    """``value`` as a 1-D real tensor of at least two strictly ascending finite values: a two-hot
    support. The values are read only from a Python sequence (made a float64 CPU tensor) or a CPU
    tensor, outside ``torch.compile``: reading a device tensor would synchronise the host.

    Raises:
        TypeError / ValueError: naming ``name`` and what was wrong.
    """
    if isinstance(value, torch.Tensor):
        bins = value
        if bins.dtype == torch.bool or bins.is_complex():
            raise TypeError(f"{name} must hold real numbers, got dtype {bins.dtype}")
    elif isinstance(value, Sequence) and not isinstance(value, str):
        try:
            bins = torch.tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be a sequence of real numbers: {exc}") from exc
    else:
        raise TypeError(
            f"{name} must be a 1-D tensor or a sequence of numbers, got {type(value).__name__}")
    if bins.dim() != 1 or bins.numel() < MIN_BINS:
        raise ValueError(f"{name} must be 1-D with at least {MIN_BINS} values, got shape "
                         f"{tuple(bins.shape)}")
    check_bins_ascending(name, bins, torch.float64)
    return bins


def check_bins_ascending(name: str, bins: torch.Tensor, dtype: torch.dtype,
                         used_in: str = "the loss") -> None:
    """Raise a ValueError naming ``name`` unless ``bins``, cast to ``dtype`` (the dtype ``used_in``
    uses them in), are finite and strictly ascending: bins distinct in float64 may collide in
    float32 (``1e8`` and ``1e8 + 1``), which would divide by zero in the two-hot weights. Only
    bins on the CPU are read, outside ``torch.compile``: a device tensor would synchronise.
    """
    if bins.device.type != "cpu" or torch.compiler.is_compiling():
        return
    values = bins.to(dtype)
    if bool(torch.isfinite(values).all()) and bool((values[1:] > values[:-1]).all()):
        return
    where = "" if dtype == torch.float64 else f" in {dtype}, the dtype of {used_in}"
    shown = (f", got {values.tolist()}" if values.numel() <= _BINS_SHOWN
             else f" ({values.numel()} values)")
    raise ValueError(f"{name} must be finite and strictly ascending{where}{shown}")
