"""A small convolutional world model, for the train-step benchmark and the example (no downloads).

An encoder of two strided convolutions, an RSSM-like latent head (a posterior from the current
frame's embedding, a prior from the previous frame's), a decoder of two transposed convolutions and
a reward head: enough to make every input of the Dreamer loss a real network output.
"""

from __future__ import annotations

import torch
from tensordict.nn import TensorDictModule
from torch import nn
from torch.nn import functional as F

#: Keys the world model writes, under "next", in FusedDreamerModelLoss's default key names.
OUT_KEYS = [("next", k) for k in ("prior_mean", "prior_std", "posterior_mean", "posterior_std",
                                  "reco_pixels", "reward")]
MIN_STD = 0.1


class ConvWorldModel(nn.Module):
    """``pixels [*B, T, C, H, W]`` (H and W divisible by 4) to the Dreamer loss's inputs.

    Args:
        image_shape: ``(C, H, W)``.
        latent_dim: size of the latent state.
        channels: width of the first convolution (the second has twice as many).
        embed_dim: size of the frame embedding.
        stochastic: sample the latent state from the posterior (``True``, as Dreamer does) or
            take its mean (reproducible runs, e.g. comparing data-parallel and single runs).
    """

    def __init__(self, image_shape=(3, 64, 64), latent_dim: int = 30, channels: int = 16,
                 embed_dim: int = 128, stochastic: bool = True) -> None:
        super().__init__()
        self.stochastic = stochastic
        c, h, w = image_shape
        if h % 4 or w % 4:
            raise ValueError(f"image height and width must be divisible by 4, got {image_shape}")
        self.feature_shape = (2 * channels, h // 4, w // 4)
        features = 2 * channels * (h // 4) * (w // 4)
        self.encoder = nn.Sequential(
            nn.Conv2d(c, channels, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 4, 2, 1), nn.ReLU(),
            nn.Flatten(), nn.Linear(features, embed_dim), nn.ReLU(),
        )
        self.posterior = nn.Linear(embed_dim, 2 * latent_dim)
        self.prior = nn.Linear(embed_dim, 2 * latent_dim)
        self.decoder_in = nn.Linear(latent_dim, features)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(2 * channels, channels, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(channels, c, 4, 2, 1),
        )
        self.reward = nn.Sequential(nn.Linear(latent_dim, 64), nn.ELU(), nn.Linear(64, 1))

    @staticmethod
    def _gaussian(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw_std = params.chunk(2, dim=-1)
        return mean, F.softplus(raw_std) + MIN_STD

    def forward(self, pixels: torch.Tensor):
        batch = pixels.shape[:-3]
        embed = self.encoder(pixels.flatten(0, -4)).unflatten(0, batch)
        posterior_mean, posterior_std = self._gaussian(self.posterior(embed))
        # The prior at step t sees the embedding of step t - 1 (zeros before the first step).
        previous = torch.cat([torch.zeros_like(embed[..., :1, :]), embed[..., :-1, :]], dim=-2)
        prior_mean, prior_std = self._gaussian(self.prior(previous))
        state = posterior_mean
        if self.stochastic:
            state = state + posterior_std * torch.randn_like(posterior_std)
        features = self.decoder_in(state).unflatten(-1, self.feature_shape)
        reco = self.decoder(features.flatten(0, -4)).unflatten(0, batch)
        return prior_mean, prior_std, posterior_mean, posterior_std, reco, self.reward(state)


def make_world_model(image_shape=(3, 64, 64), latent_dim: int = 30, **kwargs) -> TensorDictModule:
    """:class:`ConvWorldModel` as a tensordict module reading ``("next", "pixels")``."""
    return TensorDictModule(ConvWorldModel(image_shape, latent_dim, **kwargs),
                            in_keys=[("next", "pixels")], out_keys=OUT_KEYS)
