"""Inputs shared by the behaviour-loss tests: an imagined rollout's tensors and a replay batch."""

from __future__ import annotations

from unittest import mock

import torch


def rollout(batch=(4,), H=5, R=255, *, dtype=torch.float32, seed=0, device="cpu",
            terminal=True, scale=3.0) -> dict[str, torch.Tensor]:
    """Random imagined tensors ``[*batch, H, ·]``, keyed by argument name: rewards and values
    ~ scale·N(0, 1), continuations in (0.9, 1) with, when ``terminal``, a terminal state (0)
    inside the first rollout, value logits ~ 2·N(0, 1), log-probs < 0, entropies ~ N(1, 0.3).
    Every float tensor requires grad but the continuations' roots."""
    g = torch.Generator().manual_seed(seed)
    B = tuple(batch)

    def randn(*shape, s=1.0, mean=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s + mean).to(dtype)

    def leaf(t):
        return t.to(device).requires_grad_()

    cont = 0.9 + 0.1 * torch.rand(*B, H, 1, generator=g, dtype=torch.float64)
    if terminal and H > 1:
        cont.view(-1, H, 1)[0, H // 2] = 0.0
    cont = cont.to(dtype)
    first = (0.9 + 0.1 * torch.rand(*B, 1, 1, generator=g, dtype=torch.float64)).to(dtype)
    root = torch.cat([first, cont[..., :-1, :]], dim=-2)
    return {
        "reward": leaf(randn(*B, H, 1, s=scale)),
        "next_value": leaf(randn(*B, H, 1, s=scale)),
        "continuation": leaf(cont.clone()),
        "root_continuation": root.to(device),
        "baseline": leaf(randn(*B, H, 1, s=scale)),
        "log_prob": leaf(-randn(*B, H, 1).abs() - 0.1),
        "entropy": leaf(randn(*B, H, 1, s=0.3, mean=1.0)),
        "value_logits": leaf(randn(*B, H, R, s=2.0)),
        "slow_logits": randn(*B, H, R, s=2.0).to(device),
    }


def replay(B=3, T=6, R=255, *, dtype=torch.float32, seed=0, device="cpu") -> dict:
    """A random replay batch ``[B, T, ·]``: rewards ~ N(0, 1), done with terminated and truncated
    steps inside, bootstraps ~ 3·N(0, 1), value logits ~ 2·N(0, 1)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype).to(device)

    terminated = torch.zeros(B, T, 1, dtype=torch.bool)
    truncated = torch.zeros(B, T, 1, dtype=torch.bool)
    if T > 2:
        terminated[0, T // 2] = True
        truncated[-1, 1] = True
    return {
        "value_pred": randn(B, T, R, s=2.0).requires_grad_(),
        "reward": randn(B, T, 1),
        "done": (terminated | truncated).to(device),
        "terminated": terminated.to(device),
        "bootstrap": randn(B, T, s=3.0),
        "slow_value": randn(B, T, R, s=2.0),
    }


def uncached():
    """A context in which the behaviour entry points prepare every call afresh (the oracle of a
    cache test: a key that missed an option would otherwise serve the reference stale too)."""
    from fused_dreamer_loss.behavior_v3 import functional
    return mock.patch.object(functional, "cacheable", lambda: False)
