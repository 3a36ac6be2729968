"""Torch's autograd contract on the fused behaviour losses: a gradient handed out is never written
afterwards, and repeated backward, ``.grad`` accumulation, in-place changes to a handed-out
gradient, loss scaling, hooks and ``create_graph`` give the torch backend's numbers. Also
``torch.compile(fullgraph=True)`` of the whole objective, and the percentiles taken over two
data-parallel ranks (gloo, on the CPU)."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
from tests.behavior_v3.helpers_behavior import replay, rollout

from fused_dreamer_loss.behavior_v3 import (
    BEHAVIOR_CONVENTIONS,
    dreamer_v3_behavior_loss,
    lambda_returns,
    return_scale,
)

BACKENDS = ("triton", "torch")
KEYS = ("reward", "next_value", "continuation", "baseline", "log_prob", "entropy",
        "value_logits")
LOSSES = ("loss_actor", "loss_value", "loss_replay_value")


def _leaves(x, rep):
    return [x[k] for k in KEYS] + [rep["value_pred"]]


def _fresh(base):
    return {k: (v.detach().clone().requires_grad_(v.requires_grad) if v.is_floating_point()
                else v) for k, v in base.items()}


def _losses(x, rep, backend, reinforce, dtype=torch.float64, low=None, high=None, **options):
    if low is None:
        low, high = torch.zeros(1, dtype=dtype), torch.zeros(1, dtype=dtype)
    out = dreamer_v3_behavior_loss(
        x["reward"], x["next_value"], x["value_logits"], low, high, x["continuation"],
        x["root_continuation"], baseline=x["baseline"], log_prob=x["log_prob"],
        entropy=x["entropy"], slow_value=x["slow_logits"], replay_value_pred=rep["value_pred"],
        replay_reward=rep["reward"], replay_done=rep["done"], replay_terminated=rep["terminated"],
        replay_slow_value=rep["slow_value"],
        **dict(BEHAVIOR_CONVENTIONS["dreamerv3-2024"], use_reinforce=reinforce), **options,
        backend=backend)
    return [out[k] for k in LOSSES]


def both(steps, reinforce, dtype=torch.float64):
    """Run ``steps(leaves, losses)`` on both backends with the same leaf inputs; what it returned
    for each."""
    base_x = rollout((2, 3), 4, R=7, dtype=dtype, seed=4)
    base_rep = replay(2, 3, R=7, dtype=dtype, seed=5)
    out = {}
    for backend in BACKENDS:
        x, rep = _fresh(base_x), _fresh(base_rep)
        out[backend] = steps(_leaves(x, rep), _losses(x, rep, backend, reinforce, dtype))
    return out["triton"], out["torch"]


def assert_same(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None or not a.any(), f"{what} [{i}]"
            continue
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what} [{i}]: {m}")


REINFORCE = pytest.mark.parametrize("reinforce", [False, True], ids=["reparam", "reinforce"])


@REINFORCE
def test_a_returned_gradient_is_never_written_again(reinforce):
    def steps(leaves, losses):
        total = sum(losses)
        g1 = torch.autograd.grad(total, leaves, retain_graph=True, allow_unused=True)
        copies = [None if g is None else g.clone() for g in g1]
        versions = [None if g is None else g._version for g in g1]
        g2 = torch.autograd.grad(2 * total, leaves, allow_unused=True)
        for g, c, v in zip(g1, copies, versions):
            if g is not None:
                assert torch.equal(g, c) and g._version == v
        return [*g1, *g2]

    got, want = both(steps, reinforce)
    assert_same(got, want, "grads")


@REINFORCE
def test_a_returned_gradient_may_be_modified_in_place(reinforce):
    def steps(leaves, losses):
        total = sum(losses)
        first = torch.autograd.grad(total, leaves, retain_graph=True, allow_unused=True)
        for g in first:
            if g is not None:
                g.mul_(2.0)
        total.backward()
        return [*first, *(t.grad for t in leaves)]

    got, want = both(steps, reinforce)
    assert_same(got, want, "grads")


@REINFORCE
def test_grad_accumulates_and_scales(reinforce):
    """``.grad`` after ``backward(retain_graph)``, then the losses scaled differently (0.5, −3,
    a loss scaler's 1024) through the same graph, then one term alone."""
    def steps(leaves, losses):
        actor, value, replay_value = losses
        (actor + value + replay_value).backward(retain_graph=True)
        (0.5 * actor - 3.0 * value + 1024.0 * replay_value).backward(retain_graph=True)
        value.backward()
        return [t.grad for t in leaves]

    got, want = both(steps, reinforce)
    assert_same(got, want, ".grad")


def test_hooks_see_the_same_gradients():
    def steps(leaves, losses):
        seen = {}

        def hook(i):
            def double(g):
                seen[i] = g.clone()
                return g * 2
            return double

        for i, t in enumerate(leaves):
            t.register_hook(hook(i))
        sum(losses).backward()
        return [*(seen[i] for i in sorted(seen)), *(t.grad for t in leaves)]

    got, want = both(steps, False)
    assert_same(got, want, "hooks")


@REINFORCE
def test_create_graph_gives_torch_second_derivatives(reinforce):
    def steps(leaves, losses):
        total = sum(losses)
        grads = torch.autograd.grad(total, leaves, create_graph=True, allow_unused=True)
        norm = sum((g * g).sum() for g in grads if g is not None)
        return list(torch.autograd.grad(norm, leaves, allow_unused=True))

    got, want = both(steps, reinforce)
    assert_same(got, want, "second derivatives")


def test_lambda_returns_contract():
    """The λ-returns' backward (an adjoint scan into fresh buffers after the first) under
    repeated backward with different upstream gradients, and create_graph."""
    base = rollout((3,), 5, R=2, dtype=torch.float64)
    out = {}
    for backend in BACKENDS:
        x = _fresh(base)
        leaves = [x["reward"], x["next_value"], x["continuation"]]
        returns, _ = lambda_returns(*leaves, x["root_continuation"], gamma=0.9, backend=backend)
        g1 = torch.autograd.grad(returns.sum(), leaves, retain_graph=True)
        copies = [g.clone() for g in g1]
        g2 = torch.autograd.grad((returns ** 2).sum(), leaves, retain_graph=True,
                                 create_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(g1, copies))
        g3 = torch.autograd.grad(sum(g.sum() for g in g2), leaves)
        out[backend] = [*g1, *g2, *g3]
    assert_same(out["triton"], out["torch"], "returns")


# ---- torch.compile -------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_objective_matches_eager(fresh_dynamo, compiler):
    """The whole objective traced in one graph (fullgraph=True; the returns kernel is a custom op
    that writes the statistics in place): losses, gradients and the updated statistics are
    eager's, bit for bit, over two steps."""
    base_x = rollout((2, 3), 4, R=7, seed=6)
    base_rep = replay(2, 3, R=7, seed=7)

    def step(x, rep, low, high):
        out = dreamer_v3_behavior_loss(
            x["reward"], x["next_value"], x["value_logits"], low, high, x["continuation"],
            x["root_continuation"], baseline=x["baseline"], log_prob=x["log_prob"],
            entropy=x["entropy"], slow_value=x["slow_logits"],
            replay_value_pred=rep["value_pred"], replay_reward=rep["reward"],
            replay_done=rep["done"], replay_terminated=rep["terminated"],
            replay_slow_value=rep["slow_value"], **BEHAVIOR_CONVENTIONS["torchrl-recipe"],
            backend="triton")
        return torch.stack([out[k] for k in LOSSES]), out["return_scale"], low.clone()

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    runs = {}
    for name, fn in (("compiled", compiled), ("eager", step)):
        x, rep = _fresh(base_x), _fresh(base_rep)
        low, high = torch.zeros(1), torch.zeros(1)
        results = []
        for _ in range(2):
            losses, scale, low_seen = fn(x, rep, low, high)
            grads = torch.autograd.grad(losses, _leaves(x, rep),
                                        torch.tensor([1.0, -2.0, 0.5]), allow_unused=True)
            results.append([losses, scale, low_seen, low.clone(), high.clone(), *grads])
        runs[name] = results
    for step_got, step_want in zip(runs["compiled"], runs["eager"]):
        for i, (a, b) in enumerate(zip(step_got, step_want)):
            if b is None:
                assert a is None or not a.any(), i
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"[{i}]: {m}")


# ---- percentiles over data-parallel ranks --------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scale_worker(rank: int, world: int, port: int, backend: str, shards, out_dir: str,
                  alone_first: bool):
    """One rank: the return scale and the whole objective, gathering the returns of every rank;
    with ``alone_first``, rank 0 makes both calls alone in a world of one first (the same
    signature, options and ``process_group=True``: another number of returns gathered)."""
    import traceback

    import torch.distributed as dist
    try:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        x, rep = rollout((2, 3), 4, R=7, seed=rank), replay(2, 3, R=7, seed=rank)
        if alone_first and rank == 0:
            dist.init_process_group("gloo", init_method=f"file://{out_dir}/alone", rank=0,
                                    world_size=1)
            return_scale(shards[0], torch.zeros(1), torch.zeros(1), rate=0.5,
                         process_group=True, backend=backend)
            _losses(x, rep, backend, True, torch.float32, torch.zeros(1), torch.zeros(1),
                    process_group=True)
            dist.destroy_process_group()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=60))
        low, high = torch.zeros(1), torch.zeros(1)
        scale = return_scale(shards[rank], low, high, rate=0.5, process_group=True,
                             backend=backend)
        whole = []
        for b in (backend, "torch"):  # the whole objective, gathering its returns
            stats = torch.zeros(1), torch.zeros(1)
            losses = _losses(x, rep, b, True, torch.float32, *stats, process_group=True)
            whole.append([*(t.detach() for t in losses), *stats])
        torch.save([low, high, scale, whole], os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)  # as the V1 DDP test: gloo's destructor can deadlock on the GIL


@pytest.mark.parametrize("backend, alone_first", [("torch", False), ("triton", False),
                                                  ("triton", True)])
def test_percentiles_over_every_rank(tmp_path, backend, alone_first):
    """Two CPU processes, each with its own returns: with ``process_group``, both take the
    quantiles of all of them (every rank's statistics equal one process's on the concatenation);
    the whole objective gathers its returns the same way on either backend. ``alone_first``:
    rank 0's calls were prepared in a world of one before (the key holds ``True``, not the world
    size)."""
    from fused_dreamer_loss.core import machinery
    if backend == "triton" and not machinery.INTERPRET:
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(0)
    shards = [torch.randn(6, 5, 1, generator=g) * 10, torch.randn(6, 5, 1, generator=g) + 40]
    torch.multiprocessing.spawn(_scale_worker, args=(2, _free_port(), backend, shards,
                                                     str(tmp_path), alone_first),
                                nprocs=2, join=True)
    low, high = torch.zeros(1), torch.zeros(1)
    want = return_scale(torch.cat(shards), low, high, rate=0.5, backend="torch")
    alone = return_scale(shards[0], torch.zeros(1), torch.zeros(1), rate=0.5, backend="torch")
    assert not torch.equal(alone, want)
    for rank in range(2):
        *got, whole = torch.load(tmp_path / f"rank{rank}.pt")
        for a, b in zip(got, [low, high, want]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for a, b in zip(*whole):  # the fused objective's gathered statistics and losses
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
