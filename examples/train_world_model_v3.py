"""Train a small DreamerV3 world model on synthetic uint8 video with FusedDreamerV3ModelLoss.

The world model (:mod:`fused_dreamer_loss.models_v3`) has categorical latents, a two-hot reward
head and a continue head; the data are the moving coloured squares of ``train_world_model.py``
stored as uint8 frames, the reward is the mean brightness of the frame's centre and a step is
terminal when that brightness passes a threshold. The loss follows one of
``fused_dreamer_loss.V3_CONVENTIONS`` (default: the current DreamerV3 reference,
``dreamerv3-2024``).
The decoder predicts in the space the convention compares: ``pixels / 255``, or the symlog of
the raw values for the conventions that symlog raw uint8 frames (``torchrl``, ``torchrl-recipe``).
Runs on CUDA or on a CPU. It prints which backend ran and why, the loss terms, and the steps per
second after the first step (whose time is shown apart).

    python examples/train_world_model_v3.py --steps 200 [--compile] [--device cpu]
        [--backend torch] [--convention torchrl]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from tensordict import TensorDict

from fused_dreamer_loss import V3_CONVENTIONS, FusedDreamerV3ModelLoss
from fused_dreamer_loss.models_v3 import make_world_model_v3

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_world_model import (  # noqa: E402  (the V1 example's data and helpers)
    backend_line, moving_shapes, parse_training_arguments, sync, training_arguments)

#: A step is terminal when the centre of the frame is lit above this mean brightness.
TERMINAL_BRIGHTNESS = 0.07


def make_batch(batch: int, steps: int, size: int, generator, device: str) -> TensorDict:
    """uint8 frames, reward and terminal flags, as a replay buffer would hand them to the loss."""
    pixels, reward = moving_shapes(batch, steps, size, generator=generator, device=device)
    frames = (pixels * 255).round().to(torch.uint8)
    return TensorDict({"next": {"pixels": frames, "reward": reward,
                                "terminated": reward > TERMINAL_BRIGHTNESS}},
                      batch_size=[batch, steps], device=device)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = training_arguments(__doc__.splitlines()[0], frames_per_clip=16)
    p.add_argument("--convention", choices=sorted(V3_CONVENTIONS), default="dreamerv3-2024",
                   help="the loss options of an implementation (default: dreamerv3-2024)")
    p.add_argument("--bins", type=int, default=255, help="reward bins (default 255)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile(fullgraph=True) the loss module (world model and loss)")
    args = parse_training_arguments(p, argv)
    if args.bins < 2:
        p.error(f"--bins must be at least 2, got {args.bins}")

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    options = dict(V3_CONVENTIONS[args.convention])
    # A convention that symlogs the raw uint8 frames (torchrl's) compares the symlog of the
    # prediction with that of 0...255: the decoder predicts in that space (the others: pixels / 255).
    world_model = make_world_model_v3((3, args.size, args.size), num_reward_bins=args.bins,
                                      reco_symlog=options["reco_symlog"] is True)
    loss_module = FusedDreamerV3ModelLoss(world_model, num_reward_bins=args.bins,
                                          backend=args.backend, **options).to(args.device)
    optimizer = torch.optim.Adam(loss_module.parameters(), lr=3e-4)
    compute_losses = torch.compile(loss_module, fullgraph=True) if args.compile else loss_module
    print(f"training on {args.device}: {args.batch} clips x {args.time} uint8 frames of "
          f"3x{args.size}x{args.size}, {sum(p.numel() for p in loss_module.parameters())} "
          f"parameters, the {args.convention} convention")
    print(backend_line(args.backend, args.device))

    def step(data: TensorDict) -> dict[str, torch.Tensor]:
        losses, _ = compute_losses(data)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).sum().backward()
        optimizer.step()
        return losses

    start, warm, values = time.perf_counter(), None, {}
    for i in range(1, args.steps + 1):
        data = make_batch(args.batch, args.time, args.size, g, args.device)
        losses = step(data)
        if i == 1:
            sync(args.device)
            warm = time.perf_counter()
            first = warm - start
        if i == 1 or i % max(1, args.steps // 10) == 0 or i == args.steps:
            values = {k: float(v.detach()) for k, v in losses.items()}
            shown = (f"first step {first:.2f} s{', compilation included' if args.compile else ''}"
                     if i == 1 else f"{(i - 1) / (time.perf_counter() - warm):.1f} steps/s")
            terms = "  ".join(f"{k.removeprefix('loss_model_')} {v:.4f}" for k, v in values.items())
            print(f"step {i:5d}  {terms}  ({shown})", flush=True)
    sync(args.device)
    if args.steps > 1:
        rate = (args.steps - 1) / (time.perf_counter() - warm)
        print(f"{rate:.1f} steps/s over steps 2-{args.steps}; the first step took {first:.2f} s"
              f"{' (torch.compile included)' if args.compile else ''}")
    return values


if __name__ == "__main__":
    main()
