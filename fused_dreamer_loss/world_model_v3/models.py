"""A small DreamerV3-style world model for the V3 example and tests: no torchrl, no downloads.

An encoder of two strided convolutions; a recurrent state-space model with categorical latents (a
GRU belief ``h``, a prior ``p(z | h)`` and a posterior ``q(z | h, frame)`` over ``S`` categoricals
of ``K`` classes, sampled straight-through with a uniform mixture); a decoder of two transposed
convolutions predicting ``pixels / 255`` (the DreamerV3 image target), or, with
``reco_symlog=True``, the symlog of the raw pixel values (for losses that symlog raw uint8 frames,
as torchrl's); a reward head of two-hot logits and a continue head, both reading ``(z, h)``. Every input of the DreamerV3 loss is a real
network output, under the keys :class:`fused_dreamer_loss.FusedDreamerV3ModelLoss` reads by
default.
"""

from __future__ import annotations

import math

import torch
from tensordict.nn import TensorDictModule
from torch import nn
from torch.nn import functional as F

from .validation import DEFAULT_NUM_REWARD_BINS
from ..core.math import symexp
from .reference import default_reward_bins

#: The decoder's output at initialisation is centred on mid-grey: 0.5 in ``pixels / 255`` units, or
#: symlog(127.5) = log(1 + 127.5) with ``reco_symlog=True``.
MID_GREY = 0.5
SYMLOG_RAW_MID_GREY = math.log1p(127.5)

#: Keys the world model writes, under "next", in FusedDreamerV3ModelLoss's default key names.
OUT_KEYS = [("next", k) for k in ("prior_logits", "posterior_logits", "reco_pixels",
                                  "reward_logits", "reward", "continue_pred")]


def straight_through_sample(logits: torch.Tensor, unimix: float) -> torch.Tensor:
    """A one-hot sample of each categorical of ``logits [..., K]`` (mixed with ``unimix`` of the
    uniform distribution) whose gradient is that of its probabilities."""
    probs = torch.softmax(logits, -1)
    if unimix:
        probs = (1 - unimix) * probs + unimix / logits.shape[-1]
    index = torch.multinomial(probs.detach().reshape(-1, probs.shape[-1]), 1)
    one_hot = F.one_hot(index.reshape(probs.shape[:-1]), probs.shape[-1]).to(probs.dtype)
    return probs + (one_hot - probs).detach()


class CategoricalWorldModel(nn.Module):
    """``pixels [*B, T, C, H, W]`` (uint8, or float in [0, 1]; H and W divisible by 4) to the
    DreamerV3 loss's inputs.

    Args:
        image_shape: ``(C, H, W)``.
        num_categoricals, num_classes: the latent, ``S`` categoricals of ``K`` classes.
        belief_dim: size of the GRU belief.
        channels: width of the first convolution (the second has twice as many).
        embed_dim: size of the frame embedding.
        hidden_dim: width of the heads' hidden layer.
        num_reward_bins: the reward head's logits (torchrl's default support of that size decodes
            them).
        unimix: the uniform mixture of the sampled categoricals.
        reco_symlog: the decoder predicts ``symlog(pixels)`` of the raw values (0…255) and the
            reconstruction written is its ``symexp``, in raw pixel units: what a loss with
            ``reco_symlog=True`` on uint8 frames compares (the ``torchrl`` and ``torchrl-recipe``
            conventions), whose symlog of it is the decoder's output. ``False``: the decoder
            predicts ``pixels / 255`` (the other conventions).

    Returns from ``forward``:
        ``(prior_logits, posterior_logits, reco_pixels, reward_logits, reward, continue_pred)``:
        logits ``[*B, T, S, K]``, the reconstruction ``[*B, T, C, H, W]`` (in ``pixels / 255``
        units, or raw pixel units with ``reco_symlog``), reward logits ``[*B, T, R]``, the decoded reward and the continue logit
        ``[*B, T, 1]``.
    """

    def __init__(self, image_shape=(3, 64, 64), num_categoricals: int = 8, num_classes: int = 8,
                 belief_dim: int = 64, channels: int = 16, embed_dim: int = 128,
                 hidden_dim: int = 64, num_reward_bins: int = DEFAULT_NUM_REWARD_BINS,
                 unimix: float = 0.01, reco_symlog: bool = False) -> None:
        super().__init__()
        c, h, w = image_shape
        if h % 4 or w % 4:
            raise ValueError(f"image height and width must be divisible by 4, got {image_shape}")
        self.latent_shape = (num_categoricals, num_classes)
        self.unimix = unimix
        self.reco_symlog = reco_symlog
        self.feature_shape = (2 * channels, h // 4, w // 4)
        features = 2 * channels * (h // 4) * (w // 4)
        latent = num_categoricals * num_classes
        self.encoder = nn.Sequential(
            nn.Conv2d(c, channels, 4, 2, 1), nn.SiLU(),
            nn.Conv2d(channels, 2 * channels, 4, 2, 1), nn.SiLU(),
            nn.Flatten(), nn.Linear(features, embed_dim), nn.SiLU(),
        )
        self.gru = nn.GRUCell(latent, belief_dim)
        self.prior = nn.Sequential(nn.Linear(belief_dim, hidden_dim), nn.SiLU(),
                                   nn.Linear(hidden_dim, latent))
        self.posterior = nn.Sequential(nn.Linear(belief_dim + embed_dim, hidden_dim), nn.SiLU(),
                                       nn.Linear(hidden_dim, latent))
        self.decoder_in = nn.Linear(latent + belief_dim, features)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(2 * channels, channels, 4, 2, 1), nn.SiLU(),
            nn.ConvTranspose2d(channels, c, 4, 2, 1),
        )
        self.reward_head = nn.Sequential(nn.Linear(latent + belief_dim, hidden_dim), nn.SiLU(),
                                         nn.Linear(hidden_dim, num_reward_bins))
        self.continue_head = nn.Sequential(nn.Linear(latent + belief_dim, hidden_dim), nn.SiLU(),
                                           nn.Linear(hidden_dim, 1))
        with torch.no_grad():  # as DreamerV3: the reward head starts at the uniform distribution
            self.reward_head[-1].weight.zero_()
            self.reward_head[-1].bias.zero_()
        self.register_buffer("bins", default_reward_bins(num_reward_bins), persistent=False)

    def forward(self, pixels: torch.Tensor):
        lead, steps = pixels.shape[:-4], pixels.shape[-4]
        x = pixels if pixels.is_floating_point() else pixels.float() / 255
        x = x.reshape(-1, steps, *x.shape[-3:])  # [N, T, C, H, W]
        embed = self.encoder(x.flatten(0, 1) - 0.5).unflatten(0, x.shape[:2])
        belief = embed.new_zeros(x.shape[0], self.gru.hidden_size)
        state = embed.new_zeros(x.shape[0], self.gru.input_size)
        priors, posteriors, states, beliefs = [], [], [], []
        for t in range(steps):  # h_t = GRU(z_{t-1}, h_{t-1}); p(z_t | h_t); q(z_t | h_t, x_t)
            belief = self.gru(state, belief)
            priors.append(self.prior(belief).unflatten(-1, self.latent_shape))
            posterior = self.posterior(torch.cat([belief, embed[:, t]], -1))
            posteriors.append(posterior.unflatten(-1, self.latent_shape))
            state = straight_through_sample(posteriors[-1], self.unimix).flatten(-2)
            states.append(state)
            beliefs.append(belief)
        features = torch.cat([torch.stack(states, 1), torch.stack(beliefs, 1)], -1)  # [N, T, F]
        hidden = self.decoder_in(features).unflatten(-1, self.feature_shape)
        reco = self.decoder(hidden.flatten(0, 1)).unflatten(0, features.shape[:2])
        if self.reco_symlog:
            reco = symexp(reco + SYMLOG_RAW_MID_GREY)
        else:
            reco = reco + MID_GREY
        reward_logits = self.reward_head(features)
        reward = (torch.softmax(reward_logits, -1) * self.bins).sum(-1, keepdim=True)
        outputs = (torch.stack(priors, 1), torch.stack(posteriors, 1), reco, reward_logits,
                   reward, self.continue_head(features))
        return tuple(out.reshape(*lead, steps, *out.shape[2:]) for out in outputs)


def make_world_model_v3(image_shape=(3, 64, 64), **kwargs) -> TensorDictModule:
    """:class:`CategoricalWorldModel` as a tensordict module reading ``("next", "pixels")``.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from fused_dreamer_loss import FusedDreamerV3ModelLoss
        >>> from fused_dreamer_loss.models_v3 import make_world_model_v3
        >>> world_model = make_world_model_v3((3, 16, 16), num_categoricals=4, num_classes=4,
        ...                                   num_reward_bins=16)
        >>> loss = FusedDreamerV3ModelLoss(world_model, num_reward_bins=16, lambda_continue=1.0,
        ...                                reco_symlog=False, backend="torch")
        >>> data = TensorDict({"next": {
        ...     "pixels": torch.randint(0, 256, (2, 3, 3, 16, 16), dtype=torch.uint8),
        ...     "reward": torch.rand(2, 3, 1),
        ...     "terminated": torch.zeros(2, 3, 1, dtype=torch.bool)}}, batch_size=[2, 3])
        >>> losses, _ = loss(data)
        >>> sorted(losses.keys())
        ['loss_model_continue', 'loss_model_kl', 'loss_model_reco', 'loss_model_reward']
    """
    return TensorDictModule(CategoricalWorldModel(image_shape, **kwargs),
                            in_keys=[("next", "pixels")], out_keys=OUT_KEYS)
