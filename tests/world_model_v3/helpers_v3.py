"""Inputs, float64 comparisons and torchrl's module, shared by the DreamerV3 tests."""

from __future__ import annotations

import torch
from tests.helpers import assert_close
from torch import nn

LOSS_NAMES = ("loss_model_kl", "loss_model_dynamic", "loss_model_representation",
              "loss_model_reco", "loss_model_reward", "loss_model_continue")


def make_v3_inputs(batch_shape=(2, 3), S=4, K=4, head_shapes=((3, 4, 4),), *, uint8=True,
                   reward_width=255, dtype=torch.float32, seed=0,
                   device="cpu") -> dict[str, object]:
    """Random inputs, keyed by argument name: logits ~ 2·N(0, 1), targets uint8 or in [0, 1),
    predictions in [−0.5, 1.5), rewards ~ 3·N(0, 1), terminated bool with both values present.
    One head gives tensors, two or more give lists. Every float tensor requires grad."""
    g = torch.Generator().manual_seed(seed)
    B = tuple(batch_shape)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    def leaf(t):
        return t.to(device).requires_grad_()

    pixels, reco = [], []
    for shape in head_shapes:
        if uint8:
            pixels.append(torch.randint(0, 256, (*B, *shape), generator=g,
                                        dtype=torch.uint8).to(device))
        else:
            pixels.append(leaf(torch.rand(*B, *shape, generator=g, dtype=torch.float64).to(dtype)))
        reco.append(leaf((torch.rand(*B, *shape, generator=g, dtype=torch.float64) * 2 - 0.5)
                         .to(dtype)))
    terminated = torch.rand(*B, 1, generator=g) < 0.3
    flags = terminated.view(-1)
    flags[:2] = torch.tensor([True, False])[:flags.numel()]
    return {
        "posterior_logits": leaf(randn(*B, S, K, scale=2.0)),
        "prior_logits": leaf(randn(*B, S, K, scale=2.0)),
        "pixels": pixels[0] if len(pixels) == 1 else pixels,
        "reco_pixels": reco[0] if len(reco) == 1 else reco,
        "true_reward": leaf(randn(*B, 1, scale=3.0)),
        "reward_pred": leaf(randn(*B, reward_width)),
        "continue_pred": leaf(randn(*B, 1, scale=2.0)),
        "terminated": terminated.to(device),
    }


def leaves(inputs: dict) -> list[torch.Tensor]:
    """The float tensors of ``inputs`` that require grad, in a fixed order."""
    flat = []
    for value in inputs.values():
        flat.extend(value if isinstance(value, list) else [value])
    return [t for t in flat if t.requires_grad]


def kl_values(inputs: dict, kl_mode: str, unimix: float) -> torch.Tensor:
    """What the free nats compare, in float64: the KL per categorical (balanced) or per row
    (separate)."""
    def probs(logits):
        s = torch.softmax(logits.detach().double(), -1)
        if kl_mode == "balanced":
            return s.clamp(min=1e-8)
        return (1 - unimix) * s + unimix / logits.shape[-1]

    q, p = probs(inputs["posterior_logits"]), probs(inputs["prior_logits"])
    kl = (q * (q.log() - p.log())).sum(-1)
    return kl.flatten() if kl_mode == "balanced" else kl.sum(-1).flatten()


def free_bits_for(values: torch.Tensor, clamp: str) -> float:
    """Free nats that clamp "none" (0: torchrl's separate mode then skips the clamp), "some" (the
    middle of the widest gap near the median) or "all" of ``values``."""
    if clamp == "none":
        return 0.0
    values = values.sort().values
    if clamp == "all":
        return float(values[-1]) + 1.0
    gaps = values[1:] - values[:-1]
    mid = len(values) // 2
    i = max(range(max(mid - 3, 0), min(mid + 3, len(gaps))), key=lambda j: float(gaps[j]))
    return float(values[i] + values[i + 1]) / 2


class _Writes(nn.Module):
    """A stand-in world model: writes the given predictions under ``next``."""

    def __init__(self, outputs: dict):
        super().__init__()
        self.outputs = outputs

    def forward(self, td):
        for key, value in self.outputs.items():
            td.set(("next", key), value)
        return td


def torchrl_losses(torchrl_v3, inputs: dict, **options) -> dict[str, torch.Tensor]:
    """torchrl's DreamerV3ModelLoss on ``inputs``: its losses, squeezed to 0-dim."""
    from tensordict import TensorDict

    targets, predictions = inputs["pixels"], inputs["reco_pixels"]
    many = isinstance(targets, list)
    targets, predictions = (targets, predictions) if many else ([targets], [predictions])
    target_keys = [f"pixels{i}" for i in range(len(targets))]
    prediction_keys = [f"reco_pixels{i}" for i in range(len(targets))]
    batch = inputs["true_reward"].shape[:-1]
    data = TensorDict({"next": {**dict(zip(target_keys, targets)),
                                "reward": inputs["true_reward"],
                                "terminated": inputs["terminated"]}}, batch)
    reward_key = "reward_logits" if options.get("reward_two_hot", True) else "reward"
    world_model = _Writes({"posterior_logits": inputs["posterior_logits"],
                           "prior_logits": inputs["prior_logits"],
                           **dict(zip(prediction_keys, predictions)),
                           reward_key: inputs["reward_pred"],
                           "continue_pred": inputs["continue_pred"]})
    loss = torchrl_v3.DreamerV3ModelLoss(world_model, **options)
    loss.set_keys(pixels=target_keys if many else target_keys[0],
                  reco_pixels=prediction_keys if many else prediction_keys[0])
    out, _ = loss(data)
    return {key: value.squeeze(0) for key, value in out.items()}


def compare(ours: dict, theirs: dict, wrt: list[torch.Tensor], dtype: torch.dtype, what: str,
            wrt_theirs: list[torch.Tensor] | None = None):
    """Same keys, values within ``dtype``'s tolerance, and the same gradients of a weighted sum
    (distinct weights, so that a gradient routed to the wrong term shows) with respect to ``wrt``
    (``wrt_theirs`` for ``theirs`` when those were computed from other leaves)."""
    assert set(ours) == set(theirs), f"{what}: keys {sorted(ours)} vs {sorted(theirs)}"
    for key in ours:
        assert ours[key].shape == (), f"{what}: {key} has shape {ours[key].shape}"
        assert_close(ours[key].detach(), theirs[key].detach(), ours[key].dtype, f"{what} {key}")
    weights = {key: 1.0 + 0.25 * i for i, key in enumerate(LOSS_NAMES)}
    grads_ours = torch.autograd.grad(sum(weights[k] * v for k, v in ours.items()), wrt,
                                     allow_unused=True)
    grads_theirs = torch.autograd.grad(sum(weights[k] * v for k, v in theirs.items()),
                                       wrt if wrt_theirs is None else wrt_theirs,
                                       allow_unused=True)
    for i, (a, b) in enumerate(zip(grads_ours, grads_theirs)):
        assert (a is None) == (b is None), f"{what}: gradient {i} present in one only"
        if a is not None:
            assert_close(a, b, dtype, f"{what} gradient {i}")
