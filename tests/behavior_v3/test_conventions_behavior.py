"""Each preset of BEHAVIOR_CONVENTIONS against an independent float64 computation of that
codebase's behaviour losses, written from DESIGN-BEHAVIOR §3 in each codebase's own form: returns
over state-indexed sequences (state 0 the start, states 1..H imagined), weights as each codebase
forms them, percentiles by sorting, the critic's symlog space over ``linspace(−20, 20)`` bins."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from tests.behavior_v3.helpers_behavior import replay, rollout
from tests.helpers import assert_close

from fused_dreamer_loss.behavior_v3 import BEHAVIOR_CONVENTIONS, dreamer_v3_behavior_loss

ETA = 3e-4
RATE = 0.01


@dataclass(frozen=True)
class Codebase:
    """What DESIGN-BEHAVIOR §3 says a codebase does (the presets are not read here)."""

    gamma: float
    weights: str            # "root-first" ĉ_0 Π γ ĉ_i, "gamma-first" Π γ ĉ_i, "previous" Π_{i<t}
    estimator: str          # "reinforce", "backprop" (−R/scale), "backprop-baseline"
    normalized_advantage: bool
    weighted_entropy: bool
    critic: str             # "raw", "symlog" (two-hot spaces), "mse"
    replay: float


CODEBASES = {
    "torchrl": Codebase(0.99, "root-first", "backprop", True, True, "mse", 0.3),
    "torchrl-recipe": Codebase(1.0, "root-first", "reinforce", True, True, "raw", 0.3),
    "dreamerv3-2024": Codebase(1.0, "root-first", "reinforce", True, True, "raw", 0.3),
    "dreamerv3-2023": Codebase(1 - 1 / 333, "root-first", "reinforce", True, True, "symlog", 0.0),
    "r2dreamer": Codebase(0.997, "gamma-first", "reinforce", True, True, "raw", 0.3),
    "dreamerv3-torch": Codebase(0.997, "previous", "backprop-baseline", False, False, "symlog",
                                0.0),
    "sheeprl": Codebase(1 - 1 / 333, "root-first", "reinforce", True, True, "symlog", 0.0),
}


def _symlog(x):
    return torch.sign(x) * torch.log1p(x.abs())


def _symexp(x):
    return torch.sign(x) * torch.expm1(x.abs())


def _percentile(x, q):
    """Linear interpolation between order statistics (numpy's default), float64."""
    s = torch.sort(x.reshape(-1).double()).values
    pos = q * (s.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def _two_hot_ce(logits, target, bins):
    """−Σ two_hot(target) · log_softmax(logits), the two-hot built bin by bin."""
    logp = torch.log_softmax(logits, -1)
    x = target.clamp(float(bins[0]), float(bins[-1]))
    idx = torch.searchsorted(bins, x.detach(), right=True).clamp(1, bins.numel() - 1) - 1
    lo, hi = bins[idx], bins[idx + 1]
    w_hi = (x - lo) / (hi - lo)
    return -((1 - w_hi) * logp.gather(-1, idx[..., None])[..., 0]
             + w_hi * logp.gather(-1, (idx + 1)[..., None])[..., 0])


class Critic:
    """A codebase's two-hot critic: bins in raw values (torchrl's symexp grid) or in symlog space
    (``linspace(−20, 20, R)``, the 2023 reference's DiscDist)."""

    def __init__(self, space, R):
        self.space = space
        grid = torch.linspace(-20.0, 20.0, R, dtype=torch.float64)
        self.bins = grid if space == "symlog" else _symexp(grid)

    def loss(self, logits, target):
        t = _symlog(target) if self.space == "symlog" else target
        return _two_hot_ce(logits, t, self.bins)

    def mean(self, logits):
        m = (torch.softmax(logits, -1) * self.bins).sum(-1)
        return _symexp(m) if self.space == "symlog" else m


def _states(x):
    """The rollout as state-indexed float64 sequences [N, H + 1]: rew[t], con[t], val[t] of state
    t (state 0 is the start; its reward is unused, its continuation is the first root's)."""
    d = {k: v.double().reshape(-1, v.shape[-2], v.shape[-1]) for k, v in x.items()}
    N = d["reward"].shape[0]
    zero = torch.zeros(N, 1, dtype=torch.float64)
    rew = torch.cat([zero, d["reward"][..., 0]], 1)
    con = torch.cat([d["root_continuation"][:, :1, 0], d["continuation"][..., 0]], 1)
    val = torch.cat([zero, d["next_value"][..., 0]], 1)
    return rew, con, val, d


def _returns_scan(rew, con, val, gamma, lam):
    """The references' lambda_return: ``R_t = rew_{t+1} + γ con_{t+1} ((1 − λ) val_{t+1} +
    λ R_{t+1})`` from ``R_H = val_H``."""
    H = rew.shape[1] - 1
    rets = [val[:, -1]]
    for t in reversed(range(H)):
        rets.append(rew[:, t + 1] + gamma * con[:, t + 1]
                    * ((1 - lam) * val[:, t + 1] + lam * rets[-1]))
    return torch.stack(rets[1:][::-1], 1)


def _returns_static_scan(rew, con, val, gamma, lam):
    """dreamerv3-torch's tools.lambda_return: inputs = r + pcont·next·(1 − λ), then
    ``agg = inputs + pcont·λ·agg`` backwards from the bootstrap."""
    pcont = gamma * con[:, 1:]
    inputs = rew[:, 1:] + pcont * val[:, 1:] * (1 - lam)
    agg, out = val[:, -1], []
    for t in reversed(range(inputs.shape[1])):
        agg = inputs[:, t] + pcont[:, t] * lam * agg
        out.append(agg)
    return torch.stack(out[::-1], 1)


def _weights(con, gamma, mode):
    """torchrl / the references / SheepRL: cumprod(γ·con)/γ; r2dreamer: cumprod(γ·con);
    dreamerv3-torch: cumprod(cat([1, γ·con[:-1]]))."""
    H = con.shape[1] - 1
    roots = con[:, :H]
    if mode == "root-first":
        return torch.cumprod(gamma * roots, 1) / gamma
    if mode == "gamma-first":
        return torch.cumprod(gamma * roots, 1)
    ones = torch.ones_like(roots[:, :1])
    return torch.cumprod(torch.cat([ones, gamma * roots[:, :-1]], 1), 1)


def _replay_returns(r, d, term, boot, horizon, lam):
    """Replay TD(λ) by its definition, step by step: target k from step k + 1 on."""
    gamma = 1 - 1 / horizon
    B, T = r.shape
    out = torch.zeros(B, T - 1, dtype=torch.float64)
    for b in range(B):
        for k in range(T - 1):
            ret, coef = 0.0, 1.0  # ret = Σ of the λ-weighted n-step returns
            j = k + 1
            while True:
                nv = 0.0 if term[b, j] else boot[b, j]
                last = j == T - 1 or d[b, j]
                ret += coef * (r[b, j] + gamma * (1 - lam if not last else 1) * nv)
                if last:
                    break
                coef *= gamma * lam
                j += 1
            out[b, k] = ret
    return out


def independent(name, x, rep, low, high):
    """Every loss of codebase ``name``, in float64, from its own formulas."""
    c = CODEBASES[name]
    gamma, lam = c.gamma, 0.95
    rew, con, val, d = _states(x)
    scan = _returns_static_scan if name == "dreamerv3-torch" else _returns_scan
    R = scan(rew, con, val, gamma, lam)
    w = _weights(con.detach(), gamma, c.weights)  # sg(weight) everywhere
    lo = low + RATE * (_percentile(R.detach().float(), 0.05) - low)
    hi = high + RATE * (_percentile(R.detach().float(), 0.95) - high)
    S = max(1.0, float(hi - lo))
    base, logp, ent = d["baseline"][..., 0], d["log_prob"][..., 0], d["entropy"][..., 0]
    if c.estimator == "reinforce":
        adv = (R - base) / (S if c.normalized_advantage else 1.0)
        actor = -logp * adv.detach()
    elif c.estimator == "backprop-baseline":  # normed target minus normed baseline
        actor = -((R - lo) / S - (base - lo) / S)
    else:
        actor = -R / S
    if c.weighted_entropy:
        loss_actor = (w * (actor - ETA * ent)).mean()
        actor_entropy = (w * ent).mean()
    else:
        loss_actor = (w * actor).mean() - ETA * ent.mean()
        actor_entropy = ent.mean()
    losses = {"loss_actor": loss_actor, "actor_entropy": actor_entropy}
    logits = d["value_logits"]
    if c.critic != "mse":
        critic = Critic(c.critic, logits.shape[-1])
        slow = critic.mean(d["slow_logits"])
        ce_ret, ce_slow = critic.loss(logits, R.detach()), critic.loss(logits, slow)
        losses["loss_value"] = (w * (ce_ret + ce_slow)).mean()
        losses["value_slow_loss"] = (w * ce_slow).mean()
    else:
        v = logits[..., 0]
        losses["loss_value"] = (w * (_symlog(v) - _symlog(R.detach())) ** 2).mean()
        losses["value_slow_loss"] = torch.zeros((), dtype=torch.float64)
    if c.replay:
        rp = {k: v.double() if v.is_floating_point() else v for k, v in rep.items()}
        B, T = rp["reward"].shape[:2]
        target = _replay_returns(rp["reward"][..., 0], rp["done"][..., 0],
                                 rp["terminated"][..., 0], R[:, 0].detach().reshape(B, T), 333.0,
                                 lam)
        keep = (~rep["done"][:, :-1, 0]).double()
        pred = rp["value_pred"][:, :-1]
        if c.critic != "mse":
            slow = critic.mean(rp["slow_value"][:, :-1])
            per_step = critic.loss(pred, target) + critic.loss(pred, slow)
        else:
            per_step = (_symlog(pred[..., 0]) - _symlog(target)) ** 2
        losses["loss_replay_value"] = c.replay * (keep * per_step).mean()
    return losses, R, w, S, (lo, hi)


def _inputs(name, N_shape=(2, 3), H=6, R=41):
    x = rollout(N_shape, H, R=R, seed=len(name))
    if CODEBASES[name].critic == "mse":
        x["value_logits"] = x["value_logits"][..., :1].detach().requires_grad_()
        x["slow_logits"] = x["slow_logits"][..., :1]
    rep = replay(N_shape[0], N_shape[1], R=x["value_logits"].shape[-1], seed=7)
    return x, rep


def test_every_codebase_has_a_preset():
    assert sorted(CODEBASES) == sorted(BEHAVIOR_CONVENTIONS)


@pytest.mark.parametrize("name", sorted(CODEBASES))
def test_convention_matches_its_codebase(name):
    x, rep = _inputs(name)
    low, high = torch.tensor([-2.0]), torch.tensor([3.0])
    want, R, w, S, (lo, hi) = independent(name, x, rep, -2.0, 3.0)
    R, w = R.detach(), w.detach()
    o = BEHAVIOR_CONVENTIONS[name]
    replay_kwargs = {}
    if CODEBASES[name].replay:
        replay_kwargs = dict(replay_value_pred=rep["value_pred"], replay_reward=rep["reward"],
                             replay_done=rep["done"], replay_terminated=rep["terminated"],
                             replay_slow_value=rep["slow_value"])
    # torchrl's reparameterised actor takes no baseline; dreamerv3-torch's subtracts it.
    with_baseline = CODEBASES[name].estimator != "backprop"
    got = dreamer_v3_behavior_loss(
        x["reward"], x["next_value"], x["value_logits"], low, high, x["continuation"],
        x["root_continuation"], baseline=x["baseline"] if with_baseline else None, log_prob=x["log_prob"],
        entropy=x["entropy"], slow_value=x["slow_logits"], **replay_kwargs, **o, backend="torch")
    assert_close(got["lambda_target"][..., 0].reshape(R.shape), R, torch.float32, "returns")
    assert_close(got["discount_weight"][..., 0].reshape(w.shape), w, torch.float32, "weights")
    assert_close(got["return_scale"], torch.tensor(S, dtype=torch.float64), torch.float32,
                 "scale")
    assert_close(low[0], lo, torch.float32, "low")
    assert_close(high[0], hi, torch.float32, "high")
    assert sorted(k for k in got if k.startswith("loss_")) == sorted(
        k for k in want if k.startswith("loss_"))
    for key, value in want.items():
        assert_close(got[key].detach(), value.detach(), torch.float32, f"{name}: {key}")
    differentiable = ["reward", "next_value", "continuation", "baseline", "log_prob", "entropy",
                      "value_logits"]
    leaves = [x[k] for k in differentiable]
    for loss in [k for k in want if k.startswith("loss_")]:
        extra = [rep["value_pred"]] if loss == "loss_replay_value" else []
        ours = torch.autograd.grad(got[loss], leaves + extra, allow_unused=True,
                                   retain_graph=True)
        theirs = _grads_of(independent, name, x, rep, loss, differentiable, bool(extra))
        for label, a, b in zip(differentiable + ["replay_value_pred"], ours, theirs):
            a = torch.zeros_like(b, dtype=torch.float32) if a is None else a
            assert_close(a, b, torch.float32, f"{name}: d {loss} / d {label}")


def _grads_of(fn, name, x, rep, loss, keys, with_replay):
    """The gradients of the independent float64 ``loss`` with respect to ``keys`` of the rollout
    (and the replay logits), zeros where it does not depend on them."""
    x64 = {k: v.detach().double().requires_grad_(k in keys) for k, v in x.items()}
    rep64 = {k: (v.detach().double().requires_grad_(k == "value_pred")
                 if v.is_floating_point() else v) for k, v in rep.items()}
    losses = fn(name, x64, rep64, -2.0, 3.0)[0]
    leaves = [x64[k] for k in keys] + ([rep64["value_pred"]] if with_replay else [])
    grads = torch.autograd.grad(losses[loss], leaves, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
