"""The loss inside real training code: autocast, DDP, CUDA graphs, and the example script."""

from __future__ import annotations

import copy
import datetime
import importlib.util
import math
import os
import pathlib

import pytest
import torch
from tests.world_model_v1.helpers_v1 import make_inputs
from tensordict import TensorDict

from fused_dreamer_loss import FusedDreamerModelLoss, dreamer_model_loss, reference
from fused_dreamer_loss.models import make_world_model

ROOT = pathlib.Path(__file__).resolve().parents[2]
#: Relative error of a float32 sum of a few hundred thousand terms, either summation order.
FLOAT32_ROUNDING = 1e-6


def load_example():
    spec = importlib.util.spec_from_file_location("train_world_model",
                                                  ROOT / "examples" / "train_world_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("compile_flag", [[], ["--compile"]], ids=["eager", "compiled"])
def test_example_trains_a_few_steps(device, compile_flag):
    torch._dynamo.reset()
    losses = load_example().main(["--steps", "3", "--batch", "2", "--time", "4", "--size", "16",
                                  "--device", str(device), *compile_flag])
    assert set(losses) == {"loss_model_kl", "loss_model_reco", "loss_model_reward"}
    assert all(math.isfinite(v) for v in losses.values())


def torchrl_bf16(inputs, free_nats):
    """torchrl's arithmetic on the same tensors: kl_loss and distance_loss in their dtype."""
    from torch import nn
    from torchrl.objectives import DreamerModelLoss
    from torchrl.objectives.utils import distance_loss

    loss = DreamerModelLoss(nn.ModuleList([nn.Sequential(nn.Identity()), nn.Identity()]),
                            free_nats=free_nats)
    pm, ps, qm, qs, x, y, r, r_hat = inputs
    return (loss.kl_loss(pm, ps, qm, qs),
            distance_loss(x, y, "l2").sum((-3, -2, -1)).mean(),
            distance_loss(r, r_hat, "l2").squeeze(-1).mean())


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_autocast_bf16_is_closer_to_float64_than_torchrl(device, backend):
    """bf16 world-model outputs under autocast: our fused loss accumulates in float32 and rounds
    once, so each term lands at least as close to the float64 value as torchrl's arithmetic under
    autocast (the torch backend is torchrl's arithmetic, so equal)."""
    pytest.importorskip("torchrl")
    inputs = [t.detach().to(torch.bfloat16)
              for t in make_inputs((16, 50), 30, (3, 32, 32), torch.float32, device, seed=40)]
    exact = reference.dreamer_model_loss(*(t.double() for t in inputs), free_nats=1.0)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        ours = dreamer_model_loss(*inputs, free_nats=1.0, backend=backend)
        theirs = torchrl_bf16(inputs, free_nats=1.0)
    for name, o, t, e in zip(("kl", "reco", "reward"), ours, theirs, exact):
        # fused: float32 losses under autocast; torch backend: whatever autocast gives torchrl
        # (its KL stays bf16 under CPU autocast, where log and pow are not on the float32 list)
        assert o.dtype == (torch.float32 if backend == "triton" else t.dtype), name
        err_ours, err_theirs = abs(float(o) - float(e)), abs(float(t) - float(e))
        if t.dtype == torch.bfloat16 and backend == "triton":
            # torchrl rounds to bf16 along the way; ours must be strictly closer
            assert err_ours < err_theirs, f"{name}: ours {err_ours:.3e} vs {err_theirs:.3e}"
        else:
            # both float32 (or identical arithmetic): not worse, up to float32 rounding
            assert err_ours <= max(err_theirs, FLOAT32_ROUNDING * abs(float(e))), (
                f"{name}: ours {err_ours:.3e} > torchrl {err_theirs:.3e}")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ddp_worker(rank: int, world: int, port: int, backend: str, state, data, out_dir: str):
    import traceback

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    try:
        # Loopback only, and a deadline: a stuck collective fails the test instead of hanging it.
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=60))
        loss_module = FusedDreamerModelLoss(
            make_world_model((3, 16, 16), latent_dim=8, stochastic=False), free_nats=0.5,
            backend=backend)
        loss_module.load_state_dict(state)
        ddp = DDP(loss_module)
        shard = data[rank * (data.shape[0] // world):(rank + 1) * (data.shape[0] // world)]
        losses, _ = ddp(shard)
        sum(losses.values()).sum().backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in loss_module.named_parameters()},
                       os.path.join(out_dir, "grads.pt"))
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    # Leave without tearing down: freeing DDP's reducer can deadlock in torch's gloo process
    # group destructor (it joins gloo's run-loop thread while holding the GIL; seen with torch
    # 2.13 on CPU, about one run in three).
    os._exit(0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ddp_gloo_matches_one_process_on_the_full_batch(tmp_path, backend):
    """Two CPU processes, each half the batch, average their gradients (DDP); that is the
    gradient of the whole batch in one process, since every term is a mean over rows."""
    from fused_dreamer_loss.core import machinery

    if backend == "triton" and not machinery.INTERPRET:
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    torch.manual_seed(0)
    loss_module = FusedDreamerModelLoss(
        make_world_model((3, 16, 16), latent_dim=8, stochastic=False), free_nats=0.5,
        backend=backend)
    g = torch.Generator().manual_seed(1)
    data = TensorDict({"next": {"pixels": torch.rand(4, 5, 3, 16, 16, generator=g),
                                "reward": torch.randn(4, 5, 1, generator=g)}}, batch_size=[4, 5])
    state = copy.deepcopy(loss_module.state_dict())
    losses, _ = loss_module(data)
    sum(losses.values()).sum().backward()
    expected = {n: p.grad for n, p in loss_module.named_parameters()}

    torch.multiprocessing.spawn(ddp_worker, args=(2, free_port(), backend, state, data,
                                                  str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "grads.pt")
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_step_captured_in_a_cuda_graph():
    """World model forward, fused loss, backward and Adam step in one CUDA graph, replayed on new
    batches, against the same steps run eagerly."""
    torch.manual_seed(0)
    torch.backends.cudnn.allow_tf32 = False
    eager = FusedDreamerModelLoss(make_world_model((3, 32, 32), stochastic=False)).cuda()
    graphed = copy.deepcopy(eager)
    opt_eager = torch.optim.Adam(eager.parameters(), lr=1e-3, capturable=True)
    opt_graph = torch.optim.Adam(graphed.parameters(), lr=1e-3, capturable=True)
    static = TensorDict({"next": {"pixels": torch.rand(4, 8, 3, 32, 32, device="cuda"),
                                  "reward": torch.randn(4, 8, 1, device="cuda")}},
                        batch_size=[4, 8])

    def step(module, optimizer, data):
        optimizer.zero_grad(set_to_none=False)
        losses, _ = module(data)
        sum(losses.values()).sum().backward()
        optimizer.step()
        return losses

    # warm up both on identical batches, so their optimizer states stay identical
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(eager, opt_eager, static)
            step(graphed, opt_graph, static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_losses = step(graphed, opt_graph, static)
    for seed in range(3):
        g = torch.Generator("cuda").manual_seed(seed)
        batch = TensorDict({"next": {"pixels": torch.rand(4, 8, 3, 32, 32, device="cuda",
                                                          generator=g),
                                     "reward": torch.randn(4, 8, 1, device="cuda",
                                                           generator=g)}}, batch_size=[4, 8])
        static.update_(batch)
        graph.replay()
        losses = step(eager, opt_eager, batch)
        for name in losses.keys():
            torch.testing.assert_close(static_losses[name], losses[name], rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(graphed.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
