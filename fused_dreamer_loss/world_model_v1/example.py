"""A short example: the fused loss against the pure-torch reference on random Dreamer-sized inputs.

Run with ``python -m fused_dreamer_loss.example``. On a machine without CUDA it uses the reference
alone (the fused kernels need a GPU, or Triton's interpreter).
"""

from __future__ import annotations

import time

import torch

from . import dreamer_model_loss


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, T, D, image = (50, 50, 30, (3, 64, 64)) if device == "cuda" else (4, 8, 30, (3, 16, 16))
    g = torch.Generator(device).manual_seed(0)

    def rnd(*shape, lo=None):
        t = torch.randn(*shape, generator=g, device=device) if lo is None else (
            torch.rand(*shape, generator=g, device=device) + lo)
        return t.requires_grad_()

    inputs = [rnd(B, T, D), rnd(B, T, D, lo=0.1), rnd(B, T, D), rnd(B, T, D, lo=0.1),
              rnd(B, T, *image, lo=0.0), rnd(B, T, *image, lo=0.0), rnd(B, T, 1), rnd(B, T, 1)]
    print(f"device {device}: {B}x{T} frames of {'x'.join(map(str, image))}, latents {D}")
    for backend in (["triton", "torch"] if device == "cuda" else ["torch"]):
        losses = dreamer_model_loss(*inputs, backend=backend)
        sum(losses).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        losses = dreamer_model_loss(*inputs, backend=backend)
        sum(losses).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        kl, reco, reward = (float(x) for x in losses)
        print(f"{backend:>6}: kl {kl:.4f}  reco {reco:.4f}  reward {reward:.4f}  "
              f"(one forward+backward: {ms:.2f} ms)")


if __name__ == "__main__":
    main()
