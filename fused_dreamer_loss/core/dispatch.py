"""The one place that decides which backend runs a loss, and remembers the decision.

A loss's functional entry point validates its inputs and options, picks a backend and prepares
the call (for the fused kernels, a :class:`~fused_dreamer_loss.core.machinery.FusedCall`, whose
launch plan the backward reuses). All of that depends on the inputs' signature only, not on
their values, so it is done once per signature and kept: :func:`call_key` is the signature,
:func:`remember` keeps a prepared call under it. A call whose inputs cannot be keyed (a
non-tensor, a layout without strides, an option that is not hashable) or that runs under
``torch.compile`` or a ``torch.func`` transform is prepared every time, so bad input raises the
same error at every call.
"""

from __future__ import annotations

import itertools
import math
import numbers
import sys
from collections.abc import Iterable, Sequence

import torch

from .validation import check_backend

#: Prepared calls one entry point keeps; past this many signatures it starts over.
MAX_CALLS = 256
_ONES = itertools.repeat(1.0)


def require_triton() -> None:
    """Nothing where triton imports; a RuntimeError saying why ``backend='triton'`` cannot run
    where it does not (e.g. not Linux). Each family's kernels import triton after this check."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"backend='triton' needs the triton package, which failed to import: {exc}"
        ) from exc


def interpreting() -> bool:
    """Whether Triton runs its kernels through its interpreter (``TRITON_INTERPRET=1`` was set
    before triton was imported)."""
    require_triton()
    from . import machinery
    return machinery.INTERPRET


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` for inputs on ``device``; raises if ``backend`` cannot run there."""
    if check_backend(backend) == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got tensors on {device}), or Triton's interpreter: "
            "set TRITON_INTERPRET=1 before triton is imported to run the kernels on the CPU"
        )
    return backend


_MACHINERY = f"{__package__}.machinery"


def _dispatch_state() -> bool | None:
    """What :func:`resolve_backend` reads besides its arguments: whether the kernels accept CPU
    tensors (None until the machinery is imported)."""
    machinery = sys.modules.get(_MACHINERY)
    return None if machinery is None else machinery.INTERPRET


def values_key(values: Sequence) -> tuple:
    """``values`` (real numbers, strings, bools) as a key that tells apart what ``==`` does not:
    their types (``True``, ``1`` and ``1.0`` are checked differently) and, for the numbers, the
    sign of a zero (``-0.0`` gives ``-0.0`` losses)."""
    values = tuple(values)
    # an int has no negative zero: the floats' signs are all ``==`` misses (numpy's included)
    floats = [v for v in values if type(v) is float
              or (type(v) not in _NOT_FLOATS and isinstance(v, numbers.Real))]
    return values, tuple(map(type, values)), tuple(map(math.copysign, _ONES, floats))


#: Option types with no negative zero, skipped by :func:`values_key` without the slower check.
_NOT_FLOATS = (int, bool, str, type(None), tuple)


#: A part of a call's signature that cannot be keyed: the call is prepared afresh.
NO_KEY = object()


def bins_key(bins):
    """Bins (a loss's support) in a call's signature: their values for a sequence of numbers;
    for a tensor, the tensor itself (by identity: the prepared call keeps it, so no other tensor
    takes its id), its version (bins modified in place are checked again) and layout; None for
    None; :data:`NO_KEY` for an inference tensor, whose version is not tracked, or anything else.
    Writes that bypass the version counter (through ``.data`` or a numpy view) are not seen:
    bins written that way are not checked again."""
    if bins is None:
        return None
    if isinstance(bins, torch.Tensor):
        if bins.is_inference():
            return NO_KEY
        return (id(bins), bins._version, bins.shape, bins.stride(), bins.dtype, bins.device,
                bins.requires_grad)
    if isinstance(bins, (list, tuple)) and all(isinstance(v, numbers.Real) for v in bins):
        return values_key(bins)
    return NO_KEY  # e.g. a list of 0-dim tensors, which may change in place


def cacheable() -> bool:
    """Whether a call may be keyed: not under ``torch.compile`` (which traces the preparation
    instead) nor a ``torch.func`` transform (whose tensors no kernel reads)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is None


def call_key(tensors: Iterable[torch.Tensor | None], options: tuple, backend: str,
             *state) -> tuple | None:
    """The signature of a call (where :func:`cacheable`): for each tensor its type, shape,
    strides, dtype, device and ``requires_grad``; the options (already keyed, e.g. by
    :func:`values_key`), the backend, the grad mode, the dispatch state and ``state``. None for
    inputs that cannot be keyed (their validation says why)."""
    try:
        key = (backend, options, torch.is_grad_enabled(), _dispatch_state(), *state,
               *[None if t is None else
                 (type(t), t.shape, t.stride(), t.dtype, t.device, t.requires_grad)
                 for t in tensors])
        hash(key)
    except (AttributeError, TypeError, RuntimeError):
        return None
    return key


#: Every entry point's table of prepared calls (:func:`calls_table`).
_TABLES: list[dict] = []


def calls_table() -> dict:
    """A table of prepared calls for one entry point (:func:`remember` keeps calls in it,
    :func:`forget_all` empties it with all the others)."""
    table: dict = {}
    _TABLES.append(table)
    return table


def forget_all() -> None:
    """Empty every entry point's table: the next call of each signature is prepared afresh, its
    plans made again and its launches taken through Triton's dispatch first."""
    for table in _TABLES:
        table.clear()


def remember(calls: dict, key: tuple | None, prepared) -> None:
    """Keep ``prepared`` under ``key`` in ``calls`` (nothing for a None key)."""
    if key is None:
        return
    if len(calls) >= MAX_CALLS:
        calls.clear()
    calls[key] = prepared
