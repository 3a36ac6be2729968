"""The fused behaviour kernels (``backend="triton"``; Triton's interpreter without CUDA) against the
reference in float64 on the same values: every phase function and the whole objective, every
option, odd shapes, H = 1, terminal states inside a rollout, all-equal returns, returns spanning
many orders of magnitude, bfloat16 and float64; float64 gradcheck; launches and host syncs."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
import torch.utils._python_dispatch
from tests.behavior_v3.helpers_behavior import replay, rollout, uncached
from tests.helpers import TOLERANCES, LaunchSpy, assert_close

from fused_dreamer_loss.behavior_v3 import (
    BEHAVIOR_CONVENTIONS,
    dreamer_v3_actor_loss,
    dreamer_v3_behavior_loss,
    dreamer_v3_value_loss,
    lambda_returns,
    replay_value_loss,
    return_scale,
)

SHAPES = [((4,), 5), ((3,), 1), ((2, 3), 4), ((7,), 15)]
ROLLOUT_KEYS = ("reward", "next_value", "continuation", "baseline", "log_prob", "entropy",
                "value_logits")


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiles small enough that test shapes span several programs, scan tiles, select steps,
    backward strides and finalize steps."""
    from fused_dreamer_loss.behavior_v3 import kernels
    from fused_dreamer_loss.core import machinery
    for name, value in (("SCAN_BLOCK", 2), ("SELECT_BLOCK", 4), ("ACTOR_BLOCK", 2),
                        ("CRITIC_TILE", 32)):
        monkeypatch.setattr(kernels, name, value)
    monkeypatch.setattr(machinery, "FINALIZE_BLOCK", 4)


def _cast(x: dict, dtype: torch.dtype, like: torch.dtype | None = None) -> dict:
    """Leaf copies of the float tensors in ``dtype`` (requires_grad kept), flags as they are;
    with ``like``, the values rounded to ``like`` first (the float64 oracle of ``like`` inputs)."""
    out = {}
    for k, v in x.items():
        if v.is_floating_point():
            v0 = v.detach() if like is None else v.detach().to(like)
            out[k] = v0.to(dtype).requires_grad_(v.requires_grad)
        else:
            out[k] = v
    return out


def _compare(got, want, dtype, what):
    """Fused outputs (``dtype`` inputs) against the float64 reference (dict or tensor)."""
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), what
        for k in want:
            _compare(got[k], want[k], got[k].dtype, f"{what}: {k}")
        return
    expected_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    assert_close(got.detach(), want.detach(), got.dtype if got.dtype in TOLERANCES
                 else expected_dtype, what)


def _grads(loss, leaves):
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


def _check_grads(got_loss, want_loss, got_leaves, want_leaves, names, dtype, what):
    for name, a, b in zip(names, _grads(got_loss, got_leaves), _grads(want_loss, want_leaves)):
        assert a.dtype == dtype, f"{what}: d/d {name} has dtype {a.dtype}"
        assert_close(a, b, dtype, f"{what}: d/d {name}")


# ---- λ-returns -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch, H", SHAPES, ids=str)
def test_lambda_returns(batch, H, dtype, small_blocks):
    base = rollout(batch, H, R=2, seed=H)
    for gamma, lmbda, weights, with_cont in [(0.99, 0.95, "inclusive", True),
                                             (0.9, 0.5, "inclusive_gamma", True),
                                             (1.0, 1.0, "exclusive", False)]:
        x, x64 = _cast(base, dtype), _cast(base, torch.float64, dtype)
        kwargs = dict(gamma=gamma, lmbda=lmbda, discount_weights=weights)
        cont = (lambda d: d["continuation"]) if with_cont else (lambda d: None)
        got = lambda_returns(x["reward"], x["next_value"], cont(x), x["root_continuation"],
                             backend="triton", **kwargs)
        want = lambda_returns(x64["reward"], x64["next_value"], cont(x64),
                              x64["root_continuation"], backend="torch", **kwargs)
        what = f"{gamma}, {lmbda}, {weights}"
        for a, b, name in zip(got, want, ("returns", "weights")):
            assert a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            _compare(a, b, dtype, f"{name}, {what}")
        assert not got[1].requires_grad
        up = torch.randn(got[0].shape, generator=torch.Generator().manual_seed(1))
        names = ["reward", "next_value"] + (["continuation"] if with_cont else [])
        _check_grads((got[0] * up.to(got[0].dtype)).sum(), (want[0] * up.double()).sum(),
                     [x[n] for n in names], [x64[n] for n in names], names, dtype, what)


# ---- return normalisation ------------------------------------------------------------------------


def _returns_cases():
    g = torch.Generator().manual_seed(0)
    yield "normal", torch.randn(64, 15, 1, generator=g) * 30
    yield "all-equal", torch.full((10, 3, 1), 2.5)
    yield "magnitudes", (torch.randn(16, 15, 1, generator=g)
                         * 10.0 ** torch.randint(-30, 30, (16, 15, 1), generator=g))
    yield "signed zeros and infinities", torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), 1.0, -2.0, 0.0, 5e-45, -5e-45])
    yield "odd", torch.randn(7, 3, 1, generator=g)
    yield "one", torch.randn(1, 1, 1, generator=g)
    yield "bfloat16", (torch.randn(9, 5, generator=g) * 4).to(torch.bfloat16)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's inf − inf
@pytest.mark.parametrize("buffers, rate, quantiles", [
    (torch.float32, 0.01, (0.05, 0.95)), (torch.float64, 0.5, (0.0, 1.0)),
    (torch.float32, 1.0, (0.1, 0.7)), (torch.float64, 0.3, (0.5, 0.5000001))], ids=str)
def test_return_scale_equals_the_reference(buffers, rate, quantiles):
    """The fused EMA and scale after each batch equal the reference's: the quantiles are the same
    order statistics, interpolated by torch.lerp's formula."""
    state = {b: (torch.zeros(1, dtype=buffers), torch.zeros(1, dtype=buffers))
             for b in ("triton", "torch")}
    for name, returns in _returns_cases():
        scales = {b: return_scale(returns, *state[b], quantiles=quantiles, rate=rate, backend=b)
                  for b in state}
        for a, b in zip((*state["triton"], scales["triton"]), (*state["torch"], scales["torch"])):
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=2 * torch.finfo(buffers).eps, atol=0,
                                       equal_nan=True, msg=lambda m: f"{name}: {m}")


def test_return_scale_in_small_steps(small_blocks):
    """Select steps of 4 returns and scan tiles of 2 starts, at the whole objective's scale."""
    returns = torch.randn(9, 7, generator=torch.Generator().manual_seed(2)) * 3
    state = {b: (torch.zeros(1), torch.zeros(1)) for b in ("triton", "torch")}
    scales = {b: return_scale(returns, *state[b], rate=0.5, backend=b) for b in state}
    for a, b in zip((*state["triton"], scales["triton"]), (*state["torch"], scales["torch"])):
        torch.testing.assert_close(a, b, rtol=2e-7, atol=0)


def test_return_scale_with_nan_is_nan():
    low, high = torch.zeros(1), torch.zeros(1)
    scale = return_scale(torch.tensor([1.0, float("nan"), 2.0]), low, high, backend="triton")
    assert torch.isnan(low).all() and torch.isnan(high).all() and torch.isnan(scale)


@pytest.mark.parametrize("update", [True, False])
def test_return_scale_update_flag(update):
    low, high = torch.tensor([-3.0]), torch.tensor([4.0])
    ptrs = low.data_ptr(), high.data_ptr()
    scale = return_scale(torch.arange(100.0) * 10, low, high, update=update, min_scale=0.5,
                         backend="triton")
    assert (low.data_ptr(), high.data_ptr()) == ptrs
    if update:
        assert low.item() != -3.0 and high.item() != 4.0
    else:
        assert (low.item(), high.item(), scale.item()) == (-3.0, 4.0, 7.0)
    assert not scale.requires_grad and scale.shape == ()


# ---- actor ---------------------------------------------------------------------------------------


ACTOR_CASES = [
    dict(use_reinforce=True), dict(use_reinforce=True, normalize_advantage=False),
    dict(use_reinforce=True, entropy_bonus=0.0), dict(use_reinforce=False),
    dict(use_reinforce=False, weight_entropy=False, entropy_bonus=0.2),
    dict(use_reinforce=False, baseline=True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ACTOR_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in
                                                                      c.items()))
@pytest.mark.parametrize("batch, H", SHAPES[:3], ids=str)
def test_actor_loss(batch, H, case, dtype, small_blocks):
    case = dict(case)
    with_baseline = case.pop("baseline", case["use_reinforce"])
    base = rollout(batch, H, R=2, seed=H + 3)
    runs = {}
    for backend, d in (("triton", dtype), ("torch", torch.float64)):
        x = _cast(base, d, dtype)
        returns, w = lambda_returns(x["reward"], x["next_value"], x["continuation"],
                                    x["root_continuation"], gamma=0.99, backend="torch")
        squeeze = len(batch) == 2
        lp, ent = ((t.squeeze(-1) if squeeze else t) for t in (x["log_prob"], x["entropy"]))
        scale = torch.tensor(1.7).to(dtype).to(d)
        losses = dreamer_v3_actor_loss(returns, w, scale,
                                       baseline=x["baseline"] if with_baseline else None,
                                       log_prob=lp, entropy=ent, backend=backend, **case)
        runs[backend] = (x, losses)
    (x, got), (x64, want) = runs["triton"], runs["torch"]
    _compare(got, want, dtype, "actor")
    names = ["reward", "next_value", "continuation", "baseline", "log_prob", "entropy"]
    _check_grads(got["loss_actor"], want["loss_actor"], [x[n] for n in names],
                 [x64[n] for n in names], names, dtype, "actor")


# ---- critic --------------------------------------------------------------------------------------


CRITIC_CASES = [
    dict(value_loss="two_hot"), dict(value_loss="two_hot", slow="logits", reg=1.0),
    dict(value_loss="two_hot", slow="value", reg=0.3, reduction="sum"),
    dict(value_loss="two_hot", space="symlog", slow="logits", reg=1.0),
    dict(value_loss="two_hot", space="symlog", slow="value", reg=1.0, weights=False),
    dict(value_loss="two_hot", bins="linear", slow="logits", reg=1.0),
    dict(value_loss="symlog_mse"), dict(value_loss="symlog_mse", slow="value", reg=0.5,
                                        reduction="sum"),
]


def _with_slow_values(base: dict, logits: str) -> dict:
    """``base`` with ``"slow_v"``, slow values made from its slow ``logits`` (before any cast, so
    that every dtype's run sees the same values)."""
    from fused_dreamer_loss.core.math import symexp
    return {**base, "slow_v": symexp(base[logits][..., :1] * 3)}


def _critic_kwargs(case, x, dtype, width):
    kwargs = dict(value_loss=case["value_loss"], reduction=case.get("reduction", "mean"),
                  two_hot_space=case.get("space", "raw"),
                  slow_critic_regularization=case.get("reg", 0.0))
    if case.get("bins") == "linear":
        kwargs["value_bins"] = torch.linspace(-30.0, 30.0, width, dtype=dtype)
    slow = case.get("slow")
    if slow == "logits":
        kwargs["slow_value"] = x["slow_logits"]
    elif slow == "value":
        kwargs["slow_value"] = x["slow_v"]
    return kwargs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CRITIC_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in
                                                                       c.items()))
@pytest.mark.parametrize("batch, H", SHAPES[:3], ids=str)
def test_value_loss(batch, H, case, dtype, small_blocks):
    R = 9 if case["value_loss"] == "two_hot" else 1
    base = rollout(batch, H, R=max(R, 2), seed=H + 5)
    if R == 1:
        base["value_logits"] = base["value_logits"][..., :1].detach().requires_grad_()
        base["slow_logits"] = base["slow_logits"][..., :1]
    base = _with_slow_values(base, "slow_logits")
    runs = {}
    for backend, d in (("triton", dtype), ("torch", torch.float64)):
        x = _cast(base, d, dtype)
        returns, w = lambda_returns(x["reward"], x["next_value"], x["continuation"],
                                    x["root_continuation"], gamma=0.99, backend="torch")
        losses = dreamer_v3_value_loss(x["value_logits"], returns,
                                       w if case.get("weights", True) else None,
                                       backend=backend, **_critic_kwargs(case, x, d, R))
        runs[backend] = (x, losses)
    (x, got), (x64, want) = runs["triton"], runs["torch"]
    _compare(got, want, dtype, "critic")
    _check_grads(got["loss_value"], want["loss_value"], [x["value_logits"]],
                 [x64["value_logits"]], ["value_pred"], dtype, "critic")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CRITIC_CASES[1::2], ids=lambda c: ",".join(
    f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("B, T", [(3, 6), (1, 2), (2, 9)], ids=str)
def test_replay_value_loss(B, T, case, dtype, small_blocks):
    R = 9 if case["value_loss"] == "two_hot" else 1
    base = replay(B, T, R=max(R, 2), seed=T)
    if R == 1:
        base["value_pred"] = base["value_pred"][..., :1].detach().requires_grad_()
        base["slow_value"] = base["slow_value"][..., :1]
    base["done"] = base["done"].float() if T == 9 else base["done"]  # flags as numbers
    base = _with_slow_values(base, "slow_value")
    runs = {}
    for backend, d in (("triton", dtype), ("torch", torch.float64)):
        x = _cast(base, d, dtype)
        kwargs = _critic_kwargs(case, {"slow_logits": x["slow_value"], "slow_v": x["slow_v"]},
                                d, R)
        bootstrap = x["bootstrap"].unsqueeze(-1) if T == 6 else x["bootstrap"]
        loss = replay_value_loss(x["value_pred"], x["reward"], x["done"], x["terminated"],
                                 bootstrap, horizon=20.0, lmbda=0.9, backend=backend, **kwargs)
        runs[backend] = (x, loss)
    (x, got), (x64, want) = runs["triton"], runs["torch"]
    _compare(got, want, dtype, "replay")
    _check_grads(got, want, [x["value_pred"]], [x64["value_pred"]], ["value_pred"], dtype,
                 "replay")


# ---- the whole objective -------------------------------------------------------------------------


def _behavior(x, rep, backend, low, high, **options):
    kwargs = {}
    if options.get("replay_value_weight"):
        kwargs = dict(replay_value_pred=rep["value_pred"], replay_reward=rep["reward"],
                      replay_done=rep["done"], replay_terminated=rep["terminated"],
                      replay_slow_value=rep["slow_value"])
    with_baseline = options.pop("baseline", False) or options.get("use_reinforce", False)
    baseline = x["baseline"] if with_baseline else None
    return dreamer_v3_behavior_loss(
        x["reward"], x["next_value"], x["value_logits"], low, high, x["continuation"],
        x["root_continuation"], baseline=baseline, log_prob=x["log_prob"], entropy=x["entropy"],
        slow_value=x["slow_logits"], **kwargs, **options, backend=backend)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a non-contiguous leaf (every other element of a wider tensor's last
    dim), requiring grad where ``t`` does."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t.detach()
    out = wide[..., ::2]
    assert not out.is_contiguous()
    return out.requires_grad_(t.requires_grad)


def _run_behavior(base, rep_base, dtype, strided=False, **options):
    """Both backends on ``base`` and ``rep_base``: the fused one in ``dtype`` (every input a
    non-contiguous view with ``strided``), the reference in float64."""
    runs = {}
    for backend, d in (("triton", dtype), ("torch", torch.float64)):
        x, rep = _cast(base, d, dtype), _cast(rep_base, d, dtype)
        if strided and backend == "triton":
            x, rep = ({k: _strided(v) for k, v in inputs.items()} for inputs in (x, rep))
        low, high = torch.tensor([-2.0]), torch.tensor([3.0])
        with uncached() if backend == "torch" else contextlib.nullcontext():
            losses = _behavior(x, rep, backend, low, high, **dict(options))
        runs[backend] = (x, rep, losses, low, high)
    return runs


def _check_behavior(runs, dtype, what):
    (x, rep, got, low, high), (x64, rep64, want, low64, high64) = runs["triton"], runs["torch"]
    _compare(got, want, dtype, what)
    assert_close(low, low64.float(), torch.float32, f"{what}: low")
    assert_close(high, high64.float(), torch.float32, f"{what}: high")
    names = list(ROLLOUT_KEYS)
    for loss in [k for k in want if k.startswith("loss_")]:
        leaves = [x[n] for n in names] + [rep["value_pred"]]
        leaves64 = [x64[n] for n in names] + [rep64["value_pred"]]
        _check_grads(got[loss], want[loss], leaves, leaves64, names + ["replay_value_pred"],
                     dtype, f"{what}: {loss}")


def _behavior_inputs(name_or_loss, batch=(2, 3), H=6, R=9, seed=0):
    x = rollout(batch, H, R=R, seed=seed)
    if name_or_loss == "symlog_mse":
        x["value_logits"] = x["value_logits"][..., :1].detach().requires_grad_()
        x["slow_logits"] = x["slow_logits"][..., :1]
    rep = replay(batch[0], batch[1] if len(batch) > 1 else 1, R=x["value_logits"].shape[-1],
                 seed=seed + 1)
    return x, rep


@pytest.mark.parametrize("name", sorted(BEHAVIOR_CONVENTIONS))
def test_every_preset(name, small_blocks):
    options = dict(BEHAVIOR_CONVENTIONS[name])
    x, rep = _behavior_inputs(options["value_loss"], seed=len(name))
    options["baseline"] = name == "dreamerv3-torch"
    _check_behavior(_run_behavior(x, rep, torch.float32, **options), torch.float32, name)


@pytest.mark.parametrize("name", ["torchrl-recipe", "dreamerv3-2024"])
def test_strided_inputs(name, small_blocks):
    """Every input a non-contiguous view, between two calls on contiguous inputs of the same
    shapes (each signature keeps its own prepared call): the reference's losses, statistics and
    gradients each time."""
    options = dict(BEHAVIOR_CONVENTIONS[name], replay_value_weight=0.3)
    x, rep = _behavior_inputs(options["value_loss"], (2, 3), 5, seed=4)
    for strided in (False, True, False):
        what = f"{name}, {'strided' if strided else 'contiguous'}"
        _check_behavior(_run_behavior(x, rep, torch.float32, strided, **options), torch.float32,
                        what)


@pytest.mark.parametrize("shape", ["[B, T]", "[B, T, 1]"])
def test_replay_strided_bootstrap(shape, small_blocks):
    """The replay loss reads its bootstrap with the bootstrap's own strides, its other inputs
    through contiguous copies."""
    base = replay(3, 6, R=9, seed=2)
    if shape == "[B, T, 1]":
        base["bootstrap"] = base["bootstrap"].unsqueeze(-1)
    runs = {}
    for backend, d in (("triton", torch.float32), ("torch", torch.float64)):
        x = _cast(base, d, torch.float32)
        if backend == "triton":
            x = {k: _strided(v) for k, v in x.items()}
        loss = replay_value_loss(x["value_pred"], x["reward"], x["done"], x["terminated"],
                                 x["bootstrap"], horizon=20.0, lmbda=0.9, value_loss="two_hot",
                                 backend=backend)
        runs[backend] = (x, loss)
    (x, got), (x64, want) = runs["triton"], runs["torch"]
    _compare(got, want, torch.float32, "replay")
    _check_grads(got, want, [x["value_pred"]], [x64["value_pred"]], ["value_pred"],
                 torch.float32, "replay")


BEHAVIOR_CASES = [
    ("bf16", torch.bfloat16, (2, 3), 6, dict(BEHAVIOR_CONVENTIONS["torchrl-recipe"])),
    ("fp64", torch.float64, (2, 3), 6, dict(BEHAVIOR_CONVENTIONS["dreamerv3-2024"])),
    ("H=1", torch.float32, (3, 2), 1, dict(BEHAVIOR_CONVENTIONS["torchrl-recipe"])),
    ("odd", torch.float32, (5, 3), 7, dict(BEHAVIOR_CONVENTIONS["dreamerv3-torch"],
                                           baseline=True)),
    ("no normalisation", torch.float32, (2, 3), 4,
     dict(BEHAVIOR_CONVENTIONS["torchrl"], return_normalization=False)),
    ("eval", torch.float32, (2, 3), 4, dict(BEHAVIOR_CONVENTIONS["r2dreamer"], update=False)),
    ("reparameterised replay", torch.float32, (3, 3), 5,
     dict(BEHAVIOR_CONVENTIONS["dreamerv3-2024"], use_reinforce=False)),
]


@pytest.mark.parametrize("what, dtype, batch, H, options", BEHAVIOR_CASES,
                         ids=[c[0] for c in BEHAVIOR_CASES])
def test_behavior_cases(what, dtype, batch, H, options, small_blocks):
    x, rep = _behavior_inputs(options["value_loss"], batch, H, seed=H)
    _check_behavior(_run_behavior(x, rep, dtype, **options), dtype, what)


def test_all_equal_returns_and_magnitudes():
    """Returns all equal (zero rewards, constant values: the quantiles are that value), then
    rewards spanning 1e-20 … 1e20 (the quantiles are far apart, the scale huge)."""
    x, rep = _behavior_inputs("two_hot", (2, 2), 5)
    with torch.no_grad():
        x["reward"].zero_()
        x["next_value"].fill_(1.5)
        x["continuation"].fill_(1.0)
    options = dict(BEHAVIOR_CONVENTIONS["dreamerv3-2024"], gamma=1.0)
    runs = _run_behavior(x, rep, torch.float32, **options)
    _check_behavior(runs, torch.float32, "all equal")
    assert torch.all(runs["triton"][2]["lambda_target"] == 1.5)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        x["reward"].copy_(torch.randn(x["reward"].shape, generator=g)
                          * 10.0 ** torch.randint(-20, 20, x["reward"].shape, generator=g))
    runs = _run_behavior(x, rep, torch.float32, **options)
    _check_behavior(runs, torch.float32, "magnitudes")
    assert runs["triton"][2]["return_scale"] > 1e10


# ---- float64 gradcheck ---------------------------------------------------------------------------


def test_gradcheck_float64():
    """Each fused loss against finite differences, with respect to the inputs it passes a
    gradient to (a stopped gradient, the critic's target say, would differ from finite
    differences by design); the scale held constant by its floor (the quantiles are stopped)."""
    x = _cast(rollout((2,), 3, R=5, seed=9), torch.float64)
    rep = _cast(replay(1, 2, R=5, seed=9), torch.float64)

    def returns_fn(r, v, c):
        return lambda_returns(r, v, c, backend="triton", gamma=0.9, lmbda=0.8)[0]

    torch.autograd.gradcheck(returns_fn, (x["reward"], x["next_value"], x["continuation"]),
                             fast_mode=True)

    def behavior(loss, reinforce, **inputs):
        t = {**x, **inputs}
        low, high = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        losses = dreamer_v3_behavior_loss(
            t["reward"], t["next_value"], t["value_logits"], low, high, t["continuation"],
            t["root_continuation"], baseline=t["baseline"], log_prob=t["log_prob"],
            entropy=t["entropy"], slow_value=t["slow_logits"],
            replay_value_pred=inputs.get("replay", rep["value_pred"]),
            replay_reward=rep["reward"], replay_done=rep["done"],
            replay_terminated=rep["terminated"], replay_slow_value=rep["slow_value"],
            **dict(BEHAVIOR_CONVENTIONS["dreamerv3-2024"], use_reinforce=reinforce,
                   min_scale=1e3), backend="triton")
        return losses[loss]

    for loss, reinforce, names in [
            ("loss_actor", False, ("reward", "next_value", "continuation", "baseline",
                                   "entropy")),
            ("loss_actor", True, ("log_prob", "entropy")),
            ("loss_value", True, ("value_logits",)), ("loss_replay_value", True, ("replay",))]:
        leaves = [rep["value_pred"] if n == "replay" else x[n] for n in names]
        torch.autograd.gradcheck(
            lambda *t: behavior(loss, reinforce, **dict(zip(names, t))), leaves, fast_mode=True)


# ---- launches and host synchronisations ----------------------------------------------------------

#: ATen ops that compute nothing on a device (allocation, views, metadata).
NO_LAUNCH = {"empty", "empty_strided", "new_empty", "promote_types", "view", "_unsafe_view", "reshape", "as_strided", "detach",
             "alias", "expand", "slice", "select", "unsqueeze", "squeeze", "t", "permute",
             "transpose", "unbind", "split", "lift_fresh", "_to_copy_noop"}
#: ATen ops that synchronise the host with a CUDA device.
SYNCING = {"_local_scalar_dense", "nonzero", "is_nonzero", "item", "equal", "any", "all"}


class AtenOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The ATen ops called while active, by name (overload packet), outside kernel launches
    (Triton's interpreter copies a launch's tensors through ATen ops of its own)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.launching = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.launching:
            self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


class CountingSpy(LaunchSpy):
    """A LaunchSpy that tells ``ops`` when a launch is under way."""

    def __init__(self, kernel, ops: AtenOps):
        super().__init__(kernel)
        self.ops = ops

    def __getitem__(self, grid):
        run = super().__getitem__(grid)

        def launch(*args, **kwargs):
            self.ops.launching += 1
            try:
                return run(*args, **kwargs)
            finally:
                self.ops.launching -= 1

        return launch


def test_the_whole_objective_is_four_launches_and_no_sync(monkeypatch):
    """Forward and backward of dreamer_v3_behavior_loss at the recipe's options (the count does
    not depend on the shapes: the benchmark counts the real ones): the returns kernel, the terms
    kernel, the finalize, the terms backward (for a grad_output that is not 1, so that it
    computes); no other ATen op computes but autograd's own (the grad_output, the sum of the
    losses), none synchronises. The first call builds the default bins (cached per device)."""
    from fused_dreamer_loss.behavior_v3 import kernels
    from fused_dreamer_loss.core import machinery
    ops = AtenOps()
    spies = {}
    for module, name in ((kernels, "_returns_kernel"), (kernels, "_terms_fwd_kernel"),
                         (machinery, "finalize_kernel"), (kernels, "_terms_bwd_kernel")):
        spies[name] = CountingSpy(getattr(module, name), ops)
        monkeypatch.setattr(module, name, spies[name])
    x, rep = _behavior_inputs("two_hot", (4, 4), 5, R=255)
    low, high = torch.zeros(1), torch.zeros(1)
    _behavior(x, rep, "triton", low, high, **BEHAVIOR_CONVENTIONS["torchrl-recipe"])
    for spy in spies.values():
        spy.calls.clear()
    with ops:
        losses = _behavior(x, rep, "triton", low, high, **BEHAVIOR_CONVENTIONS["torchrl-recipe"])
        total = losses["loss_actor"] + losses["loss_value"] + losses["loss_replay_value"]
        torch.autograd.backward([total], [torch.tensor(0.5)])
    assert {name: len(spy.calls) for name, spy in spies.items()} == dict.fromkeys(spies, 1)
    computing = [n for n in ops.names if n not in NO_LAUNCH]
    assert not [n for n in computing if n in SYNCING], computing
    assert set(computing) <= {"add", "ones_like", "mul", "lift_fresh", "lift_fresh_copy",
                              "promote_types"}, computing


def test_lambda_returns_and_scale_launch_once_each(monkeypatch):
    from fused_dreamer_loss.behavior_v3 import kernels
    spy = LaunchSpy(kernels._returns_kernel)
    monkeypatch.setattr(kernels, "_returns_kernel", spy)
    bwd = LaunchSpy(kernels._returns_bwd_kernel)
    monkeypatch.setattr(kernels, "_returns_bwd_kernel", bwd)
    x = rollout((4,), 5, R=2)
    returns, _ = lambda_returns(x["reward"], x["next_value"], x["continuation"],
                                backend="triton")
    return_scale(returns, torch.zeros(1), torch.zeros(1), backend="triton")
    returns.sum().backward()
    assert len(spy.calls) == 2 and len(bwd.calls) == 1


@pytest.mark.parametrize("combo", list(itertools.product([True, False], [0.0, 1.0])),
                         ids=str)
def test_inputs_are_not_modified(combo):
    reinforce, reg = combo
    x, rep = _behavior_inputs("two_hot", (2, 2), 3)
    before = {k: v.detach().clone() for k, v in {**x, **rep}.items()}
    low, high = torch.zeros(1), torch.zeros(1)
    losses = _behavior(x, rep, "triton", low, high,
                       **dict(BEHAVIOR_CONVENTIONS["torchrl-recipe"], use_reinforce=reinforce,
                              slow_critic_regularization=reg))
    sum(v for k, v in losses.items() if k.startswith("loss_")).backward()
    for k, v in {**x, **rep}.items():
        assert torch.equal(v.detach(), before[k]), k


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_stopped_gradients_are_none(backend):
    """Inputs whose gradient every term stops (the root continuations of the weights, the bins,
    the slow critic, the replay flags and rewards) get none, even when they require grad: no
    unwritten buffer is handed out."""
    x, rep = _behavior_inputs("two_hot", (2, 2), 3)
    stopped = [x["root_continuation"].requires_grad_(), x["slow_logits"].requires_grad_(),
               rep["reward"].requires_grad_(), rep["slow_value"].requires_grad_()]
    bins = torch.linspace(-20.0, 20.0, 9, requires_grad=True)
    returns, _ = lambda_returns(x["reward"], x["next_value"], x["continuation"],
                                x["root_continuation"], backend=backend)
    low, high = torch.zeros(1), torch.zeros(1)
    losses = _behavior(x, rep, backend, low, high, value_bins=bins,
                       **BEHAVIOR_CONVENTIONS["torchrl-recipe"])
    total = returns.sum() + sum(v for k, v in losses.items() if k.startswith("loss_"))
    assert all(g is None for g in torch.autograd.grad(total, [*stopped, bins],
                                                      allow_unused=True))
