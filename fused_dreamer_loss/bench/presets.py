"""The benchmark's presets and inputs: the input sizes of each loss, the implementations, modes and
dtypes a run chooses from, the inputs of each loss at a preset, and the minimal-traffic model of
each loss (DESIGN §3, DESIGN-V3 §5: each input read once, each needed gradient written once), the
bytes against which every row's bandwidth is reported."""

from __future__ import annotations

import torch

from ..world_model_v3.validation import V3Options

PRESETS = {
    # name: (batch, time, image shape, latent dim): the Dreamer loss (--loss v1)
    "tiny": (4, 8, (3, 16, 16), 30),
    "small": (16, 50, (3, 64, 64), 30),
    "default": (200, 50, (3, 64, 64), 30),
    "large": (1024, 64, (3, 64, 64), 30),
    "v1-wide-latents": (16, 64, (3, 64, 64), 1024),
}
V3_PRESETS = {
    # name: (batch, time, uint8 image shape, categoricals, classes): the DreamerV3 loss
    # (--loss v3), DESIGN-V3 §6
    "v3-tiny": (2, 4, (3, 8, 8), 4, 4),
    "v3": (16, 64, (3, 64, 64), 32, 32),
    "v3-r2": (16, 64, (3, 64, 64), 32, 16),
    "v3-large": (256, 64, (3, 64, 64), 32, 64),
}
#: The options of a --loss v3 run unless --convention names others.
DEFAULT_CONVENTION = "dreamerv3-2024"
IMPLS = ("fused", "eager", "compiled", "torchrl")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DISTANCES = ("l2", "l1", "smooth_l1")
#: Input sets the timer rotates through, so that the cache is not what is timed.
ROTATION = 3
#: Inputs that need a gradient in a training step: the latents, the decoded frames, the predicted
#: reward (not the targets).
NEEDS_GRAD = (True, True, True, True, False, True, False, True)
#: The same for the DreamerV3 loss, in its argument order (posterior and prior logits, pixels,
#: reco_pixels, true_reward, reward logits, continue logits, terminated): the network's outputs.
V3_NEEDS_GRAD = (True, True, False, True, False, True, True, False)
#: The names of those arguments.
V3_ARGS = ("posterior_logits", "prior_logits", "pixels", "reco_pixels", "true_reward",
           "reward_pred", "continue_pred", "terminated")
#: The dtypes of the DreamerV3 loss's targets whatever ``--dtype`` (which is the network outputs'):
#: what a replay buffer holds.
V3_TARGET_DTYPES = {"pixels": torch.uint8, "true_reward": torch.float32, "terminated": torch.bool}
#: The widths of the V3 train step's world model (models_v3.CategoricalWorldModel) at each preset,
#: whose latent is the preset's S categoricals of K classes. v3-tiny: a CPU smoke test. The others:
#: 15 M parameters at v3, 25 M at v3-large, whose 16,384 frames of 3x64x64 make the world model's
#: float32 forward save about 7 GiB for the backward (counted with saved-tensor hooks on 128
#: frames, scaled): far within an H100's 80 GB.
V3_WORLD_MODELS = {
    "v3-tiny": {"channels": 4, "embed_dim": 32, "belief_dim": 32, "hidden_dim": 32},
    **dict.fromkeys(("v3", "v3-r2", "v3-large"),
                    {"channels": 16, "embed_dim": 256, "belief_dim": 256, "hidden_dim": 256}),
}
#: The implementations the V3 train step compares: the loss modules.
V3_TRAIN_STEP_IMPLS = ("fused", "eager", "torchrl")


def minimal_bytes(frames: int, image_numel: int, latent_dim: int, itemsize: int, mode: str) -> int:
    """Fewest bytes a pass must move: read all eight inputs once, and for fwd+bwd write each needed
    gradient once (4 latents, reco_pixels, pred_reward)."""
    reads = (4 * latent_dim + 2 * image_numel + 2) * frames
    writes = (4 * latent_dim + image_numel + 1) * frames if mode == "fwd+bwd" else 0
    return (reads + writes) * itemsize


def make_inputs(preset: str, dtype: torch.dtype, device: str, seed: int) -> list[torch.Tensor]:
    batch, steps, image, latent_dim = PRESETS[preset]
    g = torch.Generator(device).manual_seed(seed)
    B = (batch, steps)

    def rand(*shape, lo=0.0, width=1.0):
        return torch.rand(*shape, generator=g, device=device) * width + lo

    tensors = [
        torch.randn(*B, latent_dim, generator=g, device=device),
        rand(*B, latent_dim, lo=0.1, width=1.5),
        torch.randn(*B, latent_dim, generator=g, device=device),
        rand(*B, latent_dim, lo=0.1, width=1.5),
        rand(*B, *image),
        rand(*B, *image, lo=-0.5, width=2.0),
        torch.randn(*B, 1, generator=g, device=device),
        torch.randn(*B, 1, generator=g, device=device),
    ]
    return [t.to(dtype).requires_grad_(n) for t, n in zip(tensors, NEEDS_GRAD)]


def minimal_bytes_v3(rows: int, image_numel: int, logits: int, reward_bins: int, continues: bool,
                     itemsize: int, mode: str) -> int:
    """Fewest bytes a pass of the DreamerV3 loss must move (DESIGN-V3 §5): read each input once
    and, for fwd+bwd, write the gradient of each network output once. Per row, the outputs
    (``itemsize`` bytes an element) are the predicted frame, the posterior and prior logits
    (``logits`` each), the reward logits and, when the convention ``continues``, the continue
    logit; the targets (in :data:`V3_TARGET_DTYPES`, read only) the frame, the reward and the
    terminal flag."""
    outputs = image_numel + 2 * logits + reward_bins + continues
    targets = (image_numel * V3_TARGET_DTYPES["pixels"].itemsize
               + V3_TARGET_DTYPES["true_reward"].itemsize
               + continues * V3_TARGET_DTYPES["terminated"].itemsize)
    passes = 2 if mode == "fwd+bwd" else 1
    return rows * (outputs * itemsize * passes + targets)


def make_v3_inputs(preset: str, dtype: torch.dtype, device: str, seed: int,
                   opts: V3Options) -> list[torch.Tensor]:
    """The arguments of :func:`dreamer_v3_model_loss` for ``preset`` (:data:`V3_ARGS`): the
    network's outputs in ``dtype`` (logits ~ 2·N(0, 1), predicted frames in [−0.5, 1.5)), the
    targets in :data:`V3_TARGET_DTYPES` (frames in 0…255, rewards ~ 3·N(0, 1), 5% terminal); the
    continue logits and terminal flags only when ``opts`` has the continue term."""
    batch, steps, image, categoricals, classes = V3_PRESETS[preset]
    g = torch.Generator(device).manual_seed(seed)
    B = (batch, steps)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device) * scale

    tensors = [
        randn(*B, categoricals, classes, scale=2.0),
        randn(*B, categoricals, classes, scale=2.0),
        torch.randint(0, 256, (*B, *image), generator=g, device=device,
                      dtype=V3_TARGET_DTYPES["pixels"]),
        torch.rand(*B, *image, generator=g, device=device) * 2.0 - 0.5,
        randn(*B, 1, scale=3.0).to(V3_TARGET_DTYPES["true_reward"]),
        randn(*B, opts.reward_width),
        randn(*B, 1, scale=2.0),
        torch.rand(*B, 1, generator=g, device=device) < 0.05,
    ]
    inputs = [t.to(dtype).requires_grad_() if needs_grad else t
              for t, needs_grad in zip(tensors, V3_NEEDS_GRAD)]
    return inputs if opts.has_continue else inputs[:-2]


def make_v3_batch(preset: str, device: str, seed: int):
    """A replay-buffer batch of ``preset`` for the V3 train step, as the loss modules read it: under
    ``"next"``, uint8 frames, rewards ~ 3·N(0, 1) (float32) and terminal flags (5%)."""
    from tensordict import TensorDict

    batch, steps_, image, _, _ = V3_PRESETS[preset]
    g = torch.Generator(device).manual_seed(seed)
    B = (batch, steps_)
    return TensorDict({"next": {
        "pixels": torch.randint(0, 256, (*B, *image), generator=g, device=device,
                                dtype=V3_TARGET_DTYPES["pixels"]),
        "reward": torch.randn(*B, 1, generator=g, device=device) * 3.0,
        "terminated": torch.rand(*B, 1, generator=g, device=device) < 0.05,
    }}, batch_size=list(B), device=device)


#: --loss v3-behavior: name: (replay batch, replay time, horizon H, critic bins R); the
#: imagination starts from every replay state: N = batch × time.
BEHAVIOR_PRESETS = {"behavior-tiny": (2, 4, 5, 255), "behavior": (16, 64, 15, 255),
                    "behavior-large": (64, 64, 15, 255)}
#: --loss v3-behavior's convention when --convention is not given.
DEFAULT_BEHAVIOR_CONVENTION = "torchrl-recipe"
