"""The torchrl side every loss module shares.

- :data:`LossModuleBase`, the modules' base class, picked when this module is imported: torchrl's
  ``LossModule`` when torchrl is importable, else tensordict's ``TensorDictModuleBase``, so the
  package (and its functional API) works without torchrl.
- :class:`TensorKeysMixin`: key handling (``tensor_keys``, ``set_keys``) with torchrl's semantics
  and errors that name the key;
- :func:`torchrl_dtypes` and :func:`cast_to`: the dtypes torchrl's arithmetic would give a loss
  term, so that the modules return torchrl's dtypes, autocast included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey, unravel_key

try:  # torchrl is optional: the modules are torchrl loss modules only where it is installed
    from torchrl.objectives.common import LossModule as _TorchrlLossModule
except ImportError:
    _TorchrlLossModule = None

#: Whether torchrl was importable when this module was imported.
HAS_TORCHRL: bool = _TorchrlLossModule is not None

#: The base class of both loss modules: ``torchrl.objectives.LossModule`` when torchrl is
#: installed (so ``isinstance(loss, LossModule)`` holds and its API is inherited), else
#: ``tensordict.nn.TensorDictModuleBase``.
LossModuleBase: type = _TorchrlLossModule if HAS_TORCHRL else TensorDictModuleBase


# ---- torchrl's dtypes ----------------------------------------------------------------------------

_DTYPE_CACHE: dict = {}


def _autocast_state(device_type: str) -> torch.dtype | None:
    """The autocast dtype in effect for ``device_type``, or None when autocast is off there."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type without autocast, e.g. "meta"
        pass
    return None


def _run_probe(chain: Callable, dtypes: tuple[torch.dtype, ...], device: torch.device,
               params: tuple) -> tuple[torch.dtype, ...] | None:
    probes = [torch.ones(1, 1, dtype=dtype, device=device) for dtype in dtypes]
    try:
        out = chain(*probes, *params)
    except (RuntimeError, TypeError, ValueError):  # torchrl's arithmetic would fail as well
        return None
    return tuple(t.dtype for t in out) if isinstance(out, (tuple, list)) else (out.dtype,)


def torchrl_dtypes(chain: Callable, dtypes: tuple[torch.dtype, ...], device: torch.device,
                   params: tuple = ()) -> tuple[torch.dtype, ...] | None:
    """The dtypes ``chain`` returns on 1-element tensors of ``dtypes`` on ``device``, under the
    autocast state now in effect; None where ``chain`` fails on them.

    ``chain`` applies the kinds of ops torchrl applies to one loss term (a log, a softmax, a
    ``mse_loss``, ...): autocast runs some of them in float32 (which ones depends on the device
    type: ``log`` is on CUDA's float32 list, not on the CPU's), and torch's type promotion does the
    rest, so the dtype ``chain`` returns is the dtype torchrl's term has. The result is cached per
    ``(chain, dtypes, params, device type, autocast dtype)``: a 1-element probe runs once per new
    combination (a few tiny kernels on a GPU; no host-device synchronisation), and under
    ``torch.compile`` it is traced (its values unused) instead of cached.
    """
    if torch.compiler.is_compiling():
        return _run_probe(chain, dtypes, device, params)
    key = (chain, dtypes, params, device.type, _autocast_state(device.type))
    try:
        return _DTYPE_CACHE[key]
    except KeyError:
        result = _DTYPE_CACHE[key] = _run_probe(chain, dtypes, device, params)
        return result


def cast_to(loss: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``loss`` in ``dtype``, differentiably (itself if it has that dtype or ``dtype`` is None)."""
    return loss if dtype is None or loss.dtype == dtype else loss.to(dtype)


# ---- keys ----------------------------------------------------------------------------------------


def _is_nested_key(value: object) -> bool:
    return isinstance(value, str) or (
        isinstance(value, tuple) and bool(value)
        and all(isinstance(v, str) or _is_nested_key(v) for v in value))


def check_key(name: str, value: object, *, allow_list: bool = False) -> None:
    """Raise a TypeError naming ``name`` unless ``value`` is a NestedKey (a str or a tuple of
    them), or, with ``allow_list``, a non-empty list of NestedKeys."""
    if allow_list and isinstance(value, list):
        if value and all(_is_nested_key(v) for v in value):
            return
        raise TypeError(
            f"set_keys({name}=...) takes a NestedKey or a non-empty list of them, got {value!r}")
    if not _is_nested_key(value):
        what = "a NestedKey (a str or a tuple of str)"
        what += " or a list of them" if allow_list else ""
        raise TypeError(f"set_keys({name}=...) takes {what}, got {type(value).__name__} {value!r}")


class TensorKeysMixin:
    """``tensor_keys`` and ``set_keys`` as torchrl's LossModule has them, on either base class."""

    #: Fields of ``_AcceptedKeys`` that may hold a list of keys (one per reconstruction head).
    _list_keys: tuple[str, ...] = ()

    @property
    def tensor_keys(self):
        """The keys in use: an ``_AcceptedKeys`` instance (change them with :meth:`set_keys`)."""
        return self._tensor_keys

    def set_keys(self, **kwargs: NestedKey | list[NestedKey] | None) -> None:
        """Change the tensordict keys the loss reads (all under ``"next"``), e.g.
        ``set_keys(pixels=("obs", "rgb"))``; ``None`` restores a key's default. Returns None, as
        torchrl's ``LossModule.set_keys``.

        Raises:
            ValueError: a name that is not a field of ``_AcceptedKeys``.
            TypeError: a value that is not a NestedKey (or, for the fields that take one, a list
                of them). torchrl accepts any value here and fails later, reading the tensordict.
        """
        accepted = [f.name for f in dataclasses.fields(self._AcceptedKeys)]
        for name, key in kwargs.items():
            if name not in accepted:
                raise ValueError(
                    f"{name!r} is not an accepted tensordict key of {type(self).__name__}; "
                    f"accepted: {accepted}")
            if key is not None:
                check_key(name, key, allow_list=name in self._list_keys)
        for name, key in kwargs.items():
            if key is None:
                key = getattr(self.default_keys(), name)
            setattr(self._tensor_keys, name, list(key) if isinstance(key, list) else key)
        self._forward_value_estimator_keys(**kwargs)

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        """No value estimator to pass keys to (as torchrl's Dreamer model losses)."""

    def _next(self, tensordict: TensorDictBase, name: str, what: str,
              key: NestedKey | None = None) -> torch.Tensor:
        """``tensordict["next", key]`` (``key`` defaults to the ``name`` key), or a KeyError
        naming the key and how to change it."""
        key = unravel_key(("next", getattr(self._tensor_keys, name) if key is None else key))
        value = tensordict.get(key, None)
        if value is None:
            raise KeyError(
                f"{key} (the {name!r} key) is missing from the {what}; set it with "
                f"set_keys({name}=...) if your world model writes it elsewhere")
        return value

    def _clear_refs(self, *tds: TensorDictBase) -> None:
        """torchrl's LossModule clears tensordict weakrefs under torch.compile; do the same."""
        clear = getattr(self, "_clear_weakrefs", None)
        if clear is not None:
            clear(*tds)
