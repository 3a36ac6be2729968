"""Train a small Dreamer world model on synthetic moving-shapes video with FusedDreamerModelLoss.

Everything is generated here (no downloads): each clip shows a few coloured squares bouncing
around the frame, with a reward that is the mean brightness of the frame's centre. Runs on CUDA
(the fused kernels) or on a CPU (the pure-torch reference; the fused kernels through Triton's
interpreter with ``TRITON_INTERPRET=1 ... --backend triton``, slowly). It prints which backend ran
and why, and the steps per second after the first step (whose time, compilation included with
``--compile``, is shown apart).

    python examples/train_world_model.py --steps 200 [--compile] [--device cpu] [--backend torch]
"""

from __future__ import annotations

import argparse
import time

import torch
from tensordict import TensorDict

from fused_dreamer_loss import FusedDreamerModelLoss
from fused_dreamer_loss.functional import resolve_backend
from fused_dreamer_loss.models import make_world_model


def moving_shapes(batch: int, steps: int, size: int, shapes: int = 3, generator=None,
                  device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``pixels [batch, steps, 3, size, size]`` in [0, 1] and ``reward [batch, steps, 1]``."""
    side = max(2, size // 6)
    pos = torch.rand(batch, shapes, 2, generator=generator) * (size - side)
    vel = (torch.rand(batch, shapes, 2, generator=generator) - 0.5) * size / 8
    colour = torch.rand(batch, shapes, 3, generator=generator)
    grid = torch.arange(size, dtype=torch.float32)
    frames = []
    for _ in range(steps):
        pos = pos + vel
        low, high = pos < 0, pos > size - side  # bounce off the walls
        vel = torch.where(low | high, -vel, vel)
        pos = pos.clamp(0, size - side)
        inside_y = (grid >= pos[..., 0:1]) & (grid < pos[..., 0:1] + side)  # [B, S, size]
        inside_x = (grid >= pos[..., 1:2]) & (grid < pos[..., 1:2] + side)
        mask = (inside_y[..., :, None] & inside_x[..., None, :]).float()  # [B, S, H, W]
        frame = torch.einsum("bshw,bsc->bchw", mask, colour).clamp(max=1.0)
        frames.append(frame)
    pixels = torch.stack(frames, dim=1)
    centre = pixels[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4]
    reward = centre.mean(dim=(-3, -2, -1)).unsqueeze(-1)
    return pixels.to(device), reward.to(device)


def backend_line(backend: str, device: str) -> str:
    """Which implementation of the loss runs for ``backend`` on ``device``, and why."""
    ran = resolve_backend(backend, torch.device(device))
    if ran == "triton":
        where = ("on the GPU" if device.startswith("cuda") else
                 "through Triton's interpreter on the CPU (TRITON_INTERPRET=1: right answers, "
                 "no speed)")
        return f"backend: triton (the fused kernels, {where})"
    if backend == "torch":
        why = "asked for with --backend torch"
    elif device.startswith("cuda"):
        why = "asked for"
    else:
        why = ("no CUDA device: the fused Triton kernels need a GPU, or TRITON_INTERPRET=1 and "
               "--backend triton")
    return f"backend: torch (the pure-torch reference; {why})"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def training_arguments(description: str, frames_per_clip: int) -> argparse.ArgumentParser:
    """The options both examples take: steps, batch, clip length, frame size, device, backend,
    seed."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--batch", type=int, default=16, help="clips per batch (default 16)")
    p.add_argument("--time", type=int, default=frames_per_clip,
                   help=f"frames per clip (default {frames_per_clip})")
    p.add_argument("--size", type=int, default=32, help="frame height and width, divisible by 4")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when available, else cpu")
    p.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto",
                   help="the loss's backend: auto (the fused kernels on CUDA, the pure-torch "
                        "reference elsewhere), triton (the fused kernels; on a CPU only with "
                        "TRITON_INTERPRET=1 set) or torch. Default: auto")
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_training_arguments(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``p.parse_args(argv)``, refusing with the usage line and exit status 2 (``p.error``) what
    would fail later: sizes that are not positive, a frame size not divisible by 4, a device this
    torch build does not have, a backend that cannot run there."""
    args = p.parse_args(argv)
    for name in ("steps", "batch", "time", "size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.size % 4:
        p.error(f"--size must be divisible by 4 (two stride-2 convolutions), got {args.size}")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        p.error(f"--device {args.device!r}: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here (torch {torch.__version__}"
                f"{'' if torch.version.cuda else ', a build without CUDA'}); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    try:
        resolve_backend(args.backend, device)
    except RuntimeError as exc:
        p.error(f"--backend {args.backend}: {exc}")
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = training_arguments(__doc__.splitlines()[0], frames_per_clip=20)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile(fullgraph=True) the world model and the loss together")
    args = parse_training_arguments(p, argv)

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    loss_module = FusedDreamerModelLoss(
        make_world_model(image_shape=(3, args.size, args.size), latent_dim=30),
        free_nats=3.0, backend=args.backend).to(args.device)
    optimizer = torch.optim.Adam(loss_module.parameters(), lr=3e-4)
    compute_losses = torch.compile(loss_module, fullgraph=True) if args.compile else loss_module
    print(f"training on {args.device}: {args.batch} clips x {args.time} frames of "
          f"3x{args.size}x{args.size}, {sum(p.numel() for p in loss_module.parameters())} "
          "parameters")
    print(backend_line(args.backend, args.device))
    start, losses = time.perf_counter(), {}
    warm = None  # (time, step) at the end of the first step
    for step in range(1, args.steps + 1):
        pixels, reward = moving_shapes(args.batch, args.time, args.size, generator=g,
                                       device=args.device)
        data = TensorDict({"next": {"pixels": pixels, "reward": reward}},
                          batch_size=[args.batch, args.time])
        out, _ = compute_losses(data)
        loss = out["loss_model_kl"] + out["loss_model_reco"] + out["loss_model_reward"]
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
        if step == 1:
            sync(args.device)
            warm = time.perf_counter()
            first = warm - start
        if step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps:
            losses = {k: float(v.detach()) for k, v in out.items()}
            if step == 1:
                shown = (f"first step {first:.2f} s, compilation included" if args.compile else
                         f"first step {first:.2f} s")
            else:
                shown = f"{(step - 1) / (time.perf_counter() - warm):.1f} steps/s"
            print(f"step {step:5d}  kl {losses['loss_model_kl']:8.4f}  "
                  f"reco {losses['loss_model_reco']:10.4f}  "
                  f"reward {losses['loss_model_reward']:8.5f}  ({shown})", flush=True)
    sync(args.device)
    if args.steps > 1:
        rate = (args.steps - 1) / (time.perf_counter() - warm)
        print(f"{rate:.1f} steps/s over steps 2-{args.steps}; the first step took {first:.2f} s"
              f"{' (torch.compile included)' if args.compile else ''}")
    return losses


if __name__ == "__main__":
    main()
