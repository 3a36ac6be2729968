"""The fused kernels against the float64 reference: values and every gradient."""

from __future__ import annotations

import itertools

import pytest
import torch
from tests.helpers import LaunchSpy, assert_close
from tests.world_model_v1.helpers_v1 import NAMES, free_nats_for, make_inputs, oracle

from fused_dreamer_loss import dreamer_model_loss

DISTANCES = ("l2", "l1", "smooth_l1")
DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def check_against_reference(inputs, grad_weights=(0.75, -1.25, 2.5), **options):
    """Fused losses and gradients (with non-unit grad_outputs) against the float64 oracle."""
    dtype = inputs[0].dtype
    losses = dreamer_model_loss(*inputs, backend="triton", **options)
    weights = [torch.tensor(w, dtype=dtype, device=inputs[0].device) for w in grad_weights]
    wanted = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad(losses, wanted, weights) if wanted else []
    ref_losses, ref_grads = oracle(inputs, grad_outputs=weights, **options)
    for name, loss, ref in zip(("loss_kl", "loss_reco", "loss_reward"), losses, ref_losses):
        assert loss.shape == ()
        assert_close(loss, ref, dtype, name)
    names = [n for n, t in zip(NAMES, inputs) if t.requires_grad]
    for name, grad, ref, t in zip(names, grads, ref_grads, wanted):
        assert grad.shape == t.shape
        assert_close(grad, ref, t.dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("global_average", [False, True])
@pytest.mark.parametrize("delayed_clamp", [False, True])
@pytest.mark.parametrize("reward_loss", DISTANCES)
@pytest.mark.parametrize("reco_loss", DISTANCES)
def test_every_option_combination(device, small_blocks, reco_loss, reward_loss, delayed_clamp,
                                  global_average, dtype):
    inputs = make_inputs((3, 4), 7, (3, 5, 6), dtype, device, seed=11)
    check_against_reference(
        inputs, reco_loss=reco_loss, reward_loss=reward_loss, delayed_clamp=delayed_clamp,
        global_average=global_average,
        free_nats=free_nats_for(inputs, global_average and not delayed_clamp, "some"),
        lambda_kl=0.5, lambda_reco=1.5, lambda_reward=2.0,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clamp", ["some", "all", "none"])
@pytest.mark.parametrize("global_average", [False, True])
@pytest.mark.parametrize("delayed_clamp", [False, True])
def test_free_nats_clamps_some_all_or_none(device, small_blocks, delayed_clamp, global_average,
                                          clamp, dtype):
    inputs = make_inputs((4, 5), 6, (2, 3, 3), dtype, device, seed=3)
    per_element = global_average and not delayed_clamp
    if delayed_clamp and clamp == "some":
        pytest.skip("the delayed clamp acts on one number: it clamps all or none")
    check_against_reference(inputs, delayed_clamp=delayed_clamp, global_average=global_average,
                            free_nats=free_nats_for(inputs, per_element, clamp))


def boundary_inputs(device, dtype):
    """Latents whose KL is exact in every dtype: ps = qs = 1 so kl = (pm − qm)² / 2, and pm − qm
    is 0, 1 or 2, so the row sums are small integers and halves, summed exactly in any order."""
    batch, D = (3, 4), 8
    g = torch.Generator().manual_seed(5)
    diff = torch.randint(0, 3, (*batch, D), generator=g).double()
    qm = torch.randn(*batch, D, generator=g).round()
    inputs = make_inputs(batch, D, (2, 3, 2), torch.float64, "cpu", seed=9, requires_grad=False)
    inputs[0], inputs[1] = qm + diff, torch.ones(*batch, D, dtype=torch.float64)
    inputs[2], inputs[3] = qm, torch.ones(*batch, D, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in inputs]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("global_average", [False, True])
def test_clamp_boundary_passes_the_gradient(device, global_average, dtype):
    """torch's clamp_min passes the gradient where x == free_nats: some rows (or elements) sit
    exactly on the boundary, some above, some below."""
    inputs = boundary_inputs(device, dtype)
    values = (inputs[0] - inputs[2]).detach().double() ** 2 / 2
    values = values.flatten() if global_average else values.sum(-1).flatten()
    free_nats = float(values.median())
    on_boundary = int((values == free_nats).sum())
    assert on_boundary >= 1 and (values < free_nats).any() and (values > free_nats).any()
    check_against_reference(inputs, free_nats=free_nats, global_average=global_average)
    # and the gradient really passes where the value sits on the boundary
    losses = dreamer_model_loss(*inputs, backend="triton", free_nats=free_nats,
                                global_average=global_average)
    (grad,) = torch.autograd.grad(losses[0], inputs[0])
    on = values == free_nats
    grad_on = grad.reshape(len(values), -1)[on]
    diff_on = (inputs[0] - inputs[2]).detach().reshape(len(values), -1)[on]
    assert (diff_on != 0).any()
    assert (grad_on[diff_on != 0] != 0).all()


@pytest.mark.parametrize("latent_dim", [1, 5, 37])
@pytest.mark.parametrize("batch_shape", [(6,), (2, 3), (2, 2, 3)], ids=str)
def test_shapes(device, small_blocks, batch_shape, latent_dim):
    """1, 2 and 3 batch dims; D = 1 and sizes that are no multiple of the block."""
    inputs = make_inputs(batch_shape, latent_dim, (3, 5, 7), torch.float32, device, seed=2)
    check_against_reference(inputs, free_nats=free_nats_for(inputs, False, "some"))


@pytest.mark.parametrize("image_shape", [(17,), (3, 5, 7), (2, 3, 4, 5)], ids=str)
def test_any_number_of_image_dims(device, image_shape):
    inputs = make_inputs((2, 3), 4, image_shape, torch.float32, device, seed=4)
    check_against_reference(inputs, free_nats=0.5)


def test_default_blocks_many_programs(device):
    """The shipped tile sizes, with images spanning several programs."""
    inputs = make_inputs((3, 5), 30, (3, 16, 16), torch.float32, device, seed=8)
    check_against_reference(inputs, free_nats=free_nats_for(inputs, False, "some"))


@pytest.mark.parametrize("same_layout", [True, False])
def test_channels_last_images(device, small_blocks, same_layout):
    inputs = make_inputs((6,), 5, (3, 4, 5), torch.float32, device, seed=6, requires_grad=False)
    inputs[5] = inputs[5].contiguous(memory_format=torch.channels_last)
    if same_layout:
        inputs[4] = inputs[4].contiguous(memory_format=torch.channels_last)
    inputs = [t.requires_grad_() for t in inputs]
    check_against_reference(inputs, reco_loss="smooth_l1")


def test_channels_last_is_read_without_a_copy(device):
    """Dense images sharing a layout go to the kernel as they are (no .contiguous() copy)."""
    from fused_dreamer_loss.core.machinery import flat_pair

    x = torch.rand(4, 3, 5, 6, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.rand(4, 3, 5, 6, device=device).contiguous(memory_format=torch.channels_last)
    fx, fy = flat_pair(x, y)
    assert fx.data_ptr() == x.data_ptr() and fy.data_ptr() == y.data_ptr()
    fx, fy = flat_pair(x, y.contiguous())
    assert fx.is_contiguous() and fy.is_contiguous()


def test_channels_last_3d_two_batch_dims(device):
    inputs = make_inputs((2, 3), 5, (3, 4, 5), torch.float32, device, seed=7, requires_grad=False)
    inputs[4] = inputs[4].contiguous(memory_format=torch.channels_last_3d)
    inputs[5] = inputs[5].contiguous(memory_format=torch.channels_last_3d)
    check_against_reference([t.requires_grad_() for t in inputs], reco_loss="l1")


@pytest.mark.parametrize("kind", ["sliced", "transposed"])
def test_non_contiguous_latents(device, small_blocks, kind):
    inputs = make_inputs((4, 3), 6, (2, 3, 3), torch.float32, device, seed=10, requires_grad=False)
    for i in range(4):
        if kind == "sliced":  # a view with a row stride of 2 D: no copy needed
            wide = torch.cat([inputs[i], inputs[i] * 3], dim=-1)
            inputs[i] = wide[..., :6]
        else:  # [T, B, D] transposed to [B, T, D]: cannot be viewed as [B*T, D]
            inputs[i] = inputs[i].transpose(0, 1).contiguous().transpose(0, 1)
        assert not inputs[i].is_contiguous()
    check_against_reference([t.requires_grad_() for t in inputs],
                            free_nats=free_nats_for(inputs, False, "some"))


def test_only_some_inputs_need_grad(device):
    """Typical training: the targets (pixels, true_reward) need no gradient."""
    inputs = make_inputs((2, 3), 5, (3, 4, 4), torch.float32, device, seed=12)
    inputs[4].requires_grad_(False)
    inputs[6].requires_grad_(False)
    check_against_reference(inputs, free_nats=free_nats_for(inputs, False, "some"))


@pytest.mark.parametrize("mode", ["no_grad", "no_input_requires_grad"])
def test_no_gradient_work_in_eval(device, monkeypatch, mode):
    from fused_dreamer_loss.world_model_v1 import kernels as k

    spy = LaunchSpy(k._dreamer_loss_fwd_kernel)
    monkeypatch.setattr(k, "_dreamer_loss_fwd_kernel", spy)
    inputs = make_inputs(device=device, requires_grad=(mode == "no_grad"))
    with torch.set_grad_enabled(mode != "no_grad"):
        losses = dreamer_model_loss(*inputs, backend="triton")
    assert not any(loss.requires_grad for loss in losses)
    flags = {k: v for k, v in spy.calls[0][1].items() if k.startswith("GRAD_")}
    assert len(flags) == 8 and not any(flags.values())
    ref, _ = oracle([t.detach() for t in inputs])
    for loss, r in zip(losses, ref):
        assert_close(loss, r, torch.float32, "loss")


def test_launch_counts(device, monkeypatch):
    """Forward: one main launch and one finalize; backward: one launch."""
    from fused_dreamer_loss.world_model_v1 import kernels as k
    from fused_dreamer_loss.core import machinery

    where = {"_dreamer_loss_fwd_kernel": k, "finalize_kernel": machinery,
             "_dreamer_loss_bwd_kernel": k}
    spies = {name: LaunchSpy(getattr(module, name)) for name, module in where.items()}
    for name, module in where.items():
        monkeypatch.setattr(module, name, spies[name])
    inputs = make_inputs(device=device)
    losses = dreamer_model_loss(*inputs, backend="triton")
    assert [len(s.calls) for s in spies.values()] == [1, 1, 0]
    sum(losses).backward()
    assert [len(s.calls) for s in spies.values()] == [1, 1, 1]


def test_unit_grad_output_returns_forward_gradients_untouched(device):
    """With grad_output == 1 the backward leaves the gradients made in forward as they are."""
    inputs = make_inputs((2, 3), 5, (3, 4, 4), torch.float32, device, seed=13)
    losses = dreamer_model_loss(*inputs, backend="triton", free_nats=0.0)
    grads = torch.autograd.grad(sum(losses), inputs)
    _, ref = oracle(inputs, free_nats=0.0)
    for name, g, r, t in zip(NAMES, grads, ref, inputs):
        assert_close(g, r, torch.float32, f"grad {name}")


def test_repeated_backward_gives_each_call_its_own_gradients(device):
    inputs = make_inputs((2, 3), 5, (3, 4, 4), torch.float64, device, seed=14)
    losses = dreamer_model_loss(*inputs, backend="triton", free_nats=0.5)
    for weight in (2.0, -3.0, 1.0, 0.5):
        w = torch.tensor(weight, dtype=torch.float64, device=device)
        grads = torch.autograd.grad(losses, inputs, [w, w * 2, w * 3], retain_graph=True)
        _, ref = oracle(inputs, grad_outputs=[w, w * 2, w * 3], free_nats=0.5)
        for name, g, r in zip(NAMES, grads, ref):
            assert_close(g, r, torch.float64, f"grad {name} at weight {weight}")


def test_only_one_term_backward(device):
    """Gradients flow only to the term that is differentiated; others stay None."""
    inputs = make_inputs((2, 3), 5, (3, 4, 4), torch.float32, device, seed=15)
    losses = dreamer_model_loss(*inputs, backend="triton", free_nats=0.1)
    grads = torch.autograd.grad(losses[1], inputs, allow_unused=True)
    assert [g is not None for g in grads] == [False] * 4 + [True, True] + [False] * 2
    _, ref = oracle(inputs, grad_outputs=[torch.tensor(0.0), torch.tensor(1.0),
                                          torch.tensor(0.0)], free_nats=0.1)
    assert_close(grads[5], ref[5], torch.float32, "grad reco_pixels")


@pytest.mark.parametrize("delayed_clamp", [False, True])
def test_bitwise_deterministic(device, small_blocks, delayed_clamp):
    inputs = make_inputs((4, 5), 9, (3, 6, 6), torch.float32, device, seed=16)
    runs = []
    for _ in range(2):
        losses = dreamer_model_loss(*inputs, backend="triton", delayed_clamp=delayed_clamp)
        grads = torch.autograd.grad(losses, inputs, [torch.tensor(0.3, device=device)] * 3)
        runs.append([*losses, *grads])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_inputs_are_not_modified(device, small_blocks):
    inputs = make_inputs((3, 4), 6, (3, 4, 5), torch.float32, device, seed=17)
    before = [t.detach().clone() for t in inputs]
    versions = [t._version for t in inputs]
    losses = dreamer_model_loss(*inputs, backend="triton", delayed_clamp=True)
    torch.autograd.grad(losses, inputs, [torch.tensor(1.7, device=device)] * 3)
    for name, t, b, v in zip(NAMES, inputs, before, versions):
        assert torch.equal(t.detach(), b), name
        assert t._version == v, name


def test_gradients_do_not_alias_inputs(device):
    inputs = make_inputs(device=device)
    grads = torch.autograd.grad(dreamer_model_loss(*inputs, backend="triton"), inputs,
                                allow_unused=True)
    storages = {t.untyped_storage().data_ptr() for t in inputs}
    assert all(g.untyped_storage().data_ptr() not in storages for g in grads)


@pytest.mark.parametrize("where", [0, 1, 4, 5, 6, 7])
def test_nan_in_gives_nan_out(device, where):
    inputs = make_inputs(device=device, requires_grad=False)
    inputs[where] = inputs[where].clone()
    inputs[where].view(-1)[0] = float("nan")
    losses = dreamer_model_loss(*inputs, backend="triton")
    term = {0: 0, 1: 0, 4: 1, 5: 1, 6: 2, 7: 2}[where]
    assert torch.isnan(losses[term])
    assert all(torch.isfinite(losses[i]) for i in range(3) if i != term)


def test_auto_backend_matches_torch_backend(device):
    inputs = make_inputs(device=device)
    auto = dreamer_model_loss(*inputs)
    torch_ = dreamer_model_loss(*inputs, backend="torch")
    fused = dreamer_model_loss(*inputs, backend="triton")
    for a, t, f in zip(auto, torch_, fused):
        torch.testing.assert_close(a, t, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, f, rtol=1e-5, atol=1e-6)


def test_dtypes_mixed_within_a_term_promote(device):
    """As under autocast: bf16 network outputs beside float32 ones. Each loss takes its term's
    promoted dtype, each gradient its input's dtype; the numbers are the reference's."""
    inputs = make_inputs((3, 4), 6, (3, 4, 5), torch.float32, device, seed=18, requires_grad=False)
    low = (0, 3, 5, 7)  # prior_mean, posterior_std, reco_pixels, pred_reward in bfloat16
    inputs = [(t.to(torch.bfloat16) if i in low else t).requires_grad_()
              for i, t in enumerate(inputs)]
    losses = dreamer_model_loss(*inputs, backend="triton", free_nats=0.5)
    assert [loss.dtype for loss in losses] == [torch.float32] * 3
    grads = torch.autograd.grad(losses, inputs)
    ref_losses, ref_grads = oracle(inputs, free_nats=0.5)
    for name, loss, ref in zip(("kl", "reco", "reward"), losses, ref_losses):
        torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=0, msg=name)
    for name, g, r, t in zip(NAMES, grads, ref_grads, inputs):
        assert_close(g, r, t.dtype, f"grad {name}")
    torch_losses = dreamer_model_loss(*inputs, backend="torch", free_nats=0.5)
    assert [loss.dtype for loss in torch_losses] == [torch.float32] * 3


@pytest.mark.parametrize("dtypes", list(itertools.product(DTYPES, repeat=2))[1:4], ids=str)
def test_terms_may_have_different_dtypes(device, dtypes):
    """Each loss takes its own term's dtype, as torchrl's does."""
    inputs = make_inputs(device=device, requires_grad=False)
    inputs[:4] = [t.to(dtypes[0]) for t in inputs[:4]]
    inputs[4:6] = [t.to(dtypes[1]) for t in inputs[4:6]]
    losses = dreamer_model_loss(*[t.requires_grad_() for t in inputs], backend="triton")
    assert [loss.dtype for loss in losses] == [dtypes[0], dtypes[1], torch.float32]
