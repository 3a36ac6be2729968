"""The one place that decides which backend runs a loss."""

from __future__ import annotations

import torch

from .validation import check_backend


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
