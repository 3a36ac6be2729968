"""The five phase functions (``lambda_returns``, ``return_scale``, ``dreamer_v3_actor_loss``,
``dreamer_v3_value_loss``, ``replay_value_loss``) prepare a call once per input signature and reuse
it, as the whole objective does: a change of any part of the signature between calls gets a call
of its own (the reference's numbers), and bad input raises the same error at every call."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tests.behavior_v3.helpers_behavior import replay, rollout, uncached
from tests.behavior_v3.test_fused_behavior import _cast, _check_grads, _compare, _strided
from tests.helpers import LaunchSpy

from fused_dreamer_loss.behavior_v3 import (
    dreamer_v3_actor_loss,
    dreamer_v3_value_loss,
    lambda_returns,
    replay_value_loss,
    return_scale,
)


def _returns(x, backend, **options):
    returns, weights = lambda_returns(x["reward"], x["next_value"], x["continuation"],
                                      x["root_continuation"], backend=backend, **options)
    return {"returns": returns, "weights": weights}


def _scale(x, backend, **options):
    low, high = torch.tensor([-2.0]), torch.tensor([3.0])
    scale = return_scale(x["next_value"], low, high, backend=backend, **options)
    return {"scale": scale, "low": low, "high": high}


def _actor(x, backend, **options):
    return dreamer_v3_actor_loss(x["reward"], x["root_continuation"], torch.tensor(2.0),
                                 baseline=x["baseline"], log_prob=x["log_prob"],
                                 entropy=x["entropy"], backend=backend, **options)


def _value(x, backend, **options):
    return dreamer_v3_value_loss(x["value_logits"], x["next_value"].detach(),
                                 x["root_continuation"], slow_value=x["slow_logits"],
                                 backend=backend, **{"value_loss": "two_hot", **options})


def _replay(x, backend, **options):
    loss = replay_value_loss(x["r_value_pred"], x["r_reward"], x["r_done"], x["r_terminated"],
                             x["r_bootstrap"], slow_value=x["r_slow_value"], backend=backend,
                             **options)
    return {"loss_replay_value": loss}


#: Each phase: its call, the inputs whose gradients are checked, its base options, and a value
#: of each option other than its base one (each of which changes the numbers).
PHASES = {
    "lambda_returns": (_returns, ("reward", "next_value", "continuation"), {},
                       {"gamma": 0.9, "lmbda": 0.8, "discount_loss": False,
                        "discount_weights": "exclusive"}),
    "return_scale": (_scale, (), {}, {"quantiles": (0.1, 0.9), "rate": 0.5, "min_scale": 10.0,
                                      "update": False}),
    "actor": (_actor, ("reward", "baseline", "log_prob", "entropy"), {"use_reinforce": True},
              {"entropy_bonus": 1e-2, "use_reinforce": False, "normalize_advantage": False,
               "weight_entropy": False}),
    "value": (_value, ("value_logits",), {}, {"slow_critic_regularization": 0.5,
                                              "reduction": "sum", "two_hot_space": "symlog"}),
    "replay": (_replay, ("r_value_pred",), {}, {"horizon": 20.0, "lmbda": 0.5,
                                                "slow_critic_regularization": 0.5,
                                                "reduction": "sum", "two_hot_space": "symlog"}),
}


def _inputs(batch=(2, 3), H=4, seed=0):
    """A rollout ``[*batch, H, ·]`` and a replay batch ``[3, 6, ·]`` (``r_``, long enough for
    λ to count between its cut steps)."""
    x = rollout(batch, H, R=9, seed=seed)
    rep = replay(3, 6, R=9, seed=seed + 1)
    return {**x, **{f"r_{k}": v for k, v in rep.items()}}


def _check(phase, x, dtype=torch.float32, strided=False, **options):
    """The fused call in ``dtype`` (on non-contiguous views with ``strided``) against the
    reference in float64 on the same values (prepared afresh): every output, and the gradients
    of each one that has any."""
    call, leaves, base, _ = PHASES[phase]
    options = {**base, **options}
    runs = {}
    for backend, d in (("triton", dtype), ("torch", torch.float64)):
        xd = _cast(x, d, dtype)
        if strided and backend == "triton":
            xd = {k: _strided(v) for k, v in xd.items()}
        with uncached() if backend == "torch" else contextlib.nullcontext():
            runs[backend] = (xd, call(xd, backend, **options))
    (x_got, got), (x_want, want) = runs["triton"], runs["torch"]
    _compare(got, want, dtype, phase)
    for name, out in want.items():
        names = [n for n in leaves if x_want[n].requires_grad]
        if out.requires_grad and names:
            _check_grads(got[name].sum(), out.sum(), [x_got[n] for n in names],
                         [x_want[n] for n in names], names, dtype, f"{phase}: {name}")
    return got


@pytest.mark.parametrize("phase, option",
                         [(p, o) for p, (*_, changed) in PHASES.items() for o in changed])
def test_each_option_changed_between_calls(phase, option):
    x = _inputs(seed=1)
    _check(phase, x)
    _check(phase, x, **{option: PHASES[phase][3][option]})
    _check(phase, x)


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_shape_dtype_requires_grad_and_grad_mode_changed_between_calls(phase):
    x = _inputs(seed=2)
    _check(phase, x)
    _check(phase, _inputs((2, 3), 5, seed=2))
    _check(phase, _inputs((3, 2), 4, seed=2))
    _check(phase, x, torch.float64)
    frozen = {k: v.detach() for k, v in x.items()}
    for out in _check(phase, frozen).values():
        assert not out.requires_grad
    with torch.no_grad():
        got = PHASES[phase][0](x, "triton", **PHASES[phase][2])
    assert not any(out.requires_grad for out in got.values())
    _check(phase, x)


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_strides_changed_between_calls(phase):
    """Every input a non-contiguous view (read through copies), between calls on contiguous
    inputs of the same shapes."""
    x = _inputs(seed=5)
    for strided in (False, True, False):
        _check(phase, x, strided=strided)


def test_tile_sizes_changed_between_calls(monkeypatch):
    """The tests shrink the tiles: the returns launches kept by ``lambda_returns`` and
    ``return_scale`` must not be reused with the old ones."""
    from fused_dreamer_loss.behavior_v3 import kernels
    x = _inputs(seed=6)
    for phase in ("lambda_returns", "return_scale"):
        _check(phase, x)
    scan, adjoint = LaunchSpy(kernels._returns_kernel), LaunchSpy(kernels._returns_bwd_kernel)
    monkeypatch.setattr(kernels, "_returns_kernel", scan)
    monkeypatch.setattr(kernels, "_returns_bwd_kernel", adjoint)
    monkeypatch.setattr(kernels, "SCAN_BLOCK", 2)
    monkeypatch.setattr(kernels, "SELECT_BLOCK", 4)
    for phase in ("lambda_returns", "return_scale"):
        _check(phase, x)
    assert [(kw["SCAN_BLOCK"], kw["SELECT_BLOCK"]) for _, kw in scan.calls] == [(2, 4)] * 2
    assert adjoint.calls and all(kw["BLOCK"] == 2 for _, kw in adjoint.calls)


@pytest.mark.parametrize("given", ["tensor", "list of 0-dim tensors"])
@pytest.mark.parametrize("phase", ["value", "replay"])
def test_value_bins_changed_in_place_between_calls(phase, given):
    """Bins a call cannot key by value (a tensor: by identity and version; a list of 0-dim
    tensors: not at all) modified in place: the next call is checked and prepared again."""
    x = _inputs(seed=3)
    values = torch.linspace(-6.0, 6.0, 9)
    bins = values if given == "tensor" else list(values.unbind())
    _check(phase, x, value_bins=bins)
    with torch.no_grad():
        values.mul_(2.0)
    _check(phase, x, value_bins=bins)
    with torch.no_grad():
        values[0] = values[1]  # no longer strictly ascending: the check runs again
    with pytest.raises(ValueError, match="value_bins"):
        _check(phase, x, value_bins=bins)


def test_replay_batch_of_several_dims():
    """Replay steps ``[A, B, T]`` (read as A·B rows of T), the bootstrap in a layout whose batch
    dims do not merge (read through a copy), and the flags squeezed."""
    base = replay(6, 6, R=9, seed=7)
    rows = {k: v.detach().reshape(2, 3, *v.shape[1:]).transpose(0, 1) for k, v in base.items()}
    for k in ("reward", "done", "terminated"):
        rows[k] = rows[k][..., 0]  # [3, 2, 6]
    wide = torch.randn(2, 3, 2 * 6, generator=torch.Generator().manual_seed(0))
    rows["bootstrap"] = wide[..., ::2].transpose(0, 1)  # [3, 2, 6], strides (12, 36, 2)
    assert not rows["bootstrap"].is_contiguous()
    rows["value_pred"].requires_grad_()
    runs = {}
    for backend, d in (("triton", torch.float32), ("torch", torch.float64)):
        r = _cast(rows, d, torch.float32)
        with uncached() if backend == "torch" else contextlib.nullcontext():
            loss = replay_value_loss(r["value_pred"], r["reward"], r["done"], r["terminated"],
                                     r["bootstrap"], slow_value=r["slow_value"],
                                     slow_critic_regularization=0.5, backend=backend)
        runs[backend] = (r, loss)
    (r, got), (r64, want) = runs["triton"], runs["torch"]
    _compare(got, want, torch.float32, "replay [A, B, T]")
    _check_grads(got, want, [r["value_pred"]], [r64["value_pred"]], ["value_pred"],
                 torch.float32, "replay [A, B, T]")


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_compiled_phase_matches_eager(phase):
    """Each phase traced in one graph (``fullgraph=True``, aot_eager): eager's outputs and
    gradients (the prepared-call tables are not used while compiling)."""
    torch._dynamo.reset()
    call, leaves, base, _ = PHASES[phase]
    x = _inputs(seed=8)
    compiled = torch.compile(lambda x: call(x, "triton", **base), fullgraph=True,
                             backend="aot_eager")
    runs = []
    for fn in (compiled, lambda x: call(x, "triton", **base)):
        xd = _cast(x, torch.float32)
        out = fn(xd)
        names = [n for n in leaves if xd[n].requires_grad]
        grads = {}
        for name, value in out.items():
            if value.requires_grad and names:
                grads[name] = torch.autograd.grad(value.sum(), [xd[n] for n in names],
                                                  allow_unused=True)
        runs.append(({k: v.detach() for k, v in out.items()}, grads))
    torch._dynamo.reset()
    (got, got_grads), (want, want_grads) = runs
    torch.testing.assert_close(got, want)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        for a, b in zip(got_grads[name], want_grads[name]):
            assert (a is None) == (b is None)
            if b is not None:
                torch.testing.assert_close(a, b)


#: Each phase's bad option, and the error it raises.
BAD = {
    "lambda_returns": ({"lmbda": 2.0}, ValueError, "lmbda"),
    "return_scale": ({"quantiles": (0.9, 0.1)}, ValueError, "quantiles must satisfy"),
    "actor": ({"use_reinforce": 1}, TypeError, "use_reinforce"),
    "value": ({"reduction": "max"}, ValueError, "reduction"),
    "replay": ({"horizon": 0.5}, ValueError, "horizon"),
}


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_bad_input_raises_at_every_call(phase):
    """Between good calls: a bad option raises each time, as does a bad tensor (a reward or value
    of another horizon)."""
    x = _inputs(seed=4)
    call = PHASES[phase][0]
    bad, error, match = BAD[phase]
    short = {**x, **{k: x[k][..., :-1, :] for k in ("reward", "next_value", "r_reward")}}
    for _ in range(2):
        with pytest.raises(error, match=match):
            call(x, "triton", **bad)
        if phase != "return_scale":  # which takes returns of any shape
            with pytest.raises(ValueError):
                call(short, "triton")
        _check(phase, x)
