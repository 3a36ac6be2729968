"""Torch's autograd contract, on both backends: a gradient the loss hands out is never written
afterwards, and every way of calling backward gives the torch backend's numbers.

Each test runs the same steps on ``backend="triton"`` (Triton's interpreter without CUDA) and on
``backend="torch"`` (the pure-torch reference), and compares what the user sees.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from tests.helpers import Allocations, assert_close
from tests.world_model_v1.helpers_v1 import NAMES, free_nats_for, make_inputs, oracle

from fused_dreamer_loss import FusedDreamerModelLoss, dreamer_model_loss
from fused_dreamer_loss.models import make_world_model

BACKENDS = ("triton", "torch")
#: Grad outputs that are not plain numbers.
SPECIAL = (0.0, -0.0, 1e-39, float("inf"), float("-inf"), float("nan"))


def fresh(inputs):
    """Leaf copies of ``inputs`` (same values, same requires_grad, no .grad)."""
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str):
    """The triton backend's gradient against the torch backend's, to the dtype's rounding. Where
    the torch backend is not finite the fused one must not be either: with an infinite
    grad_output, torch's decomposition of the KL derivative gives inf − inf = NaN where the fused
    kernel's single expression gives ±inf."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    finite = torch.isfinite(want)
    assert not torch.isfinite(got[~finite]).any(), f"{what}: finite where torch is not"
    assert torch.isfinite(got[finite]).all(), f"{what}: not finite where torch is"
    exact_scale = want[finite].abs().max() if finite.any() else torch.tensor(0.0)
    tiny = torch.finfo(want.dtype).tiny * torch.finfo(want.dtype).eps  # the smallest subnormal
    rtol = {torch.float64: 1e-10, torch.float32: 2e-5}.get(want.dtype, 2e-2)
    atol = max(float(exact_scale) * rtol / 10, 64 * tiny)
    torch.testing.assert_close(got[finite], want[finite], rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def losses_of(inputs, backend, **options):
    return dreamer_model_loss(*inputs, backend=backend, **options)


@pytest.fixture(params=[torch.float64, torch.float32], ids=str)
def dtype(request):
    return request.param


def both(device, dtype, steps, seed=0, **options):
    """Run ``steps(inputs, losses)`` on both backends with the same leaf inputs; return what it
    returned for each."""
    base = make_inputs((3, 4), 5, (2, 3, 4), dtype, device, seed=seed)
    options.setdefault("free_nats", free_nats_for(base, False, "some"))
    out = {}
    for backend in BACKENDS:
        inputs = fresh(base)
        out[backend] = steps(inputs, losses_of(inputs, backend, **options))
    return out["triton"], out["torch"]


def test_a_returned_gradient_is_never_written_again(device, dtype):
    def steps(inputs, losses):
        total = sum(losses)
        g1 = torch.autograd.grad(total, inputs, retain_graph=True)
        versions = [g._version for g in g1]
        copies = [g.clone() for g in g1]
        g2 = torch.autograd.grad(2 * total, inputs)
        for name, g, c, v in zip(NAMES, g1, copies, versions):
            assert torch.equal(g, c), f"{name}: the first gradient changed"
            assert g._version == v, name
        return [*g1, *g2]

    got, want = both(device, dtype, steps)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_same(a, b, NAMES[i % 8])


def test_a_returned_gradient_may_be_modified_in_place(device, dtype):
    """torch allows writing to a gradient it handed out; a later backward through the retained
    graph must not refuse (a saved tensor's version check would)."""
    def steps(inputs, losses):
        total = sum(losses)
        first = torch.autograd.grad(total, inputs, retain_graph=True)
        for g in first:
            g.mul_(2.0)
        total.backward()
        return [*first, *(t.grad for t in inputs)]

    got, want = both(device, dtype, steps)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_same(a, b, NAMES[i % 8])


def test_grad_accumulates_over_backward_calls(device, dtype):
    """.grad of leaves after ``backward(retain_graph=True)`` then ``(2 * total).backward()`` is 3g."""
    def steps(inputs, losses):
        total = sum(losses)
        total.backward(retain_graph=True)
        (2 * total).backward()
        return [t.grad for t in inputs]

    got, want = both(device, dtype, steps)
    for name, a, b in zip(NAMES, got, want):
        assert_same(a, b, name)


def test_one_term_at_a_time_then_all(device, dtype):
    """``kl.backward; (-rew).backward; (kl + reco + rew).backward``: pred_reward.grad is 0."""
    def steps(inputs, losses):
        kl, reco, rew = losses
        kl.backward(retain_graph=True)
        (-rew).backward(retain_graph=True)
        (kl + reco + rew).backward()
        return [t.grad for t in inputs]

    got, want = both(device, dtype, steps)
    for name, a, b in zip(NAMES, got, want):
        assert_same(a, b, name)
    assert torch.equal(got[7], torch.zeros_like(got[7]))


def test_a_hook_sees_a_gradient_that_stays(device, dtype):
    def steps(inputs, losses):
        seen = {i: [] for i in range(len(inputs))}
        for i, t in enumerate(inputs):
            t.register_hook(lambda g, i=i: seen[i].append((g, g.clone())))
        total = sum(losses)
        total.backward(retain_graph=True)
        (5 * total).backward()
        for calls in seen.values():
            for g, copy in calls:
                assert torch.equal(g, copy), "a gradient passed to a hook changed"
        return [g for i in seen for g, _ in seen[i]]

    got, want = both(device, dtype, steps)
    for a, b in zip(got, want):
        assert_same(a, b, "hook")


# inf × 0 is NaN on purpose here; numpy, under Triton's interpreter, warns about it.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("value", SPECIAL, ids=str)
def test_special_grad_output_then_one(device, value):
    """A grad_output of 0, −0.0, a subnormal, ±inf or NaN, then 1, through a retained graph."""
    def steps(inputs, losses):
        special = [torch.tensor(value, dtype=torch.float32, device=device)] * 3
        first = torch.autograd.grad(losses, inputs, special, retain_graph=True)
        second = torch.autograd.grad(sum(losses), inputs)
        return [*first, *second]

    got, want = both(device, torch.float32, steps)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_same(a, b, f"{NAMES[i % 8]}, call {i // 8 + 1}")


def test_a_tiny_grad_output_then_one_is_exact(device):
    """fp32, grad_output 1e-37 then 1: both calls against the float64 oracle."""
    inputs = make_inputs((3, 4), 5, (2, 3, 4), torch.float32, device, seed=3)
    losses = losses_of(inputs, "triton", free_nats=0.5)
    tiny = torch.tensor(1e-37, device=device)
    first = torch.autograd.grad(losses, inputs, [tiny] * 3, retain_graph=True)
    second = torch.autograd.grad(sum(losses), inputs)
    _, ref_first = oracle(inputs, grad_outputs=[tiny] * 3, free_nats=0.5)
    _, ref_second = oracle(inputs, free_nats=0.5)
    for name, a, b in zip(NAMES, first, ref_first):
        assert_close(a, b, torch.float32, f"{name} at 1e-37")
    for name, a, b in zip(NAMES, second, ref_second):
        assert_close(a, b, torch.float32, f"{name} at 1")


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 2.0])
def test_delayed_clamp_that_clamps_passes_no_gradient(device, value):
    """The delayed clamp cuts the KL off: its gradient is 0 whatever the grad_output."""
    def steps(inputs, losses):
        g = torch.tensor(value, dtype=torch.float32, device=device)
        return torch.autograd.grad(losses[0], inputs[:4], g)

    got, want = both(device, torch.float32, steps, delayed_clamp=True, free_nats=1e6)
    for name, a, b in zip(NAMES, got, want):
        assert torch.equal(b, torch.zeros_like(b))
        assert_same(a, b, name)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # as above
def test_random_sequences_of_backward_calls(device):
    """1–4 backward calls through one graph, random grad outputs per term (special values, None),
    random subsets of inputs requiring grad: every .grad as the torch backend's."""
    rng = random.Random(1234)
    values = [1.0, 1.0, 2.0, -0.5, 0.0, -0.0, 3e-39, 65536.0, float("inf"), float("nan")]
    for trial in range(12):
        requires = [rng.random() < 0.8 for _ in range(8)]
        requires[5] = True
        calls = [[rng.choice(values) if rng.random() < 0.85 else None for _ in range(3)]
                 for _ in range(rng.randint(1, 4))]
        calls = [c if any(v is not None for v in c) else [1.0, None, None] for c in calls]
        options = {"delayed_clamp": rng.random() < 0.3, "global_average": rng.random() < 0.3,
                   "reco_loss": rng.choice(["l2", "l1", "smooth_l1"])}
        dtype = rng.choice([torch.float32, torch.float64])
        base = make_inputs((2, 3), 4, (2, 3, 3), dtype, device, seed=trial)
        options["free_nats"] = free_nats_for(base, options["global_average"]
                                             and not options["delayed_clamp"], "some")
        grads = {}
        for backend in BACKENDS:
            inputs = [t.detach().clone().requires_grad_(r) for t, r in zip(base, requires)]
            losses = losses_of(inputs, backend, **options)
            for k, call in enumerate(calls):
                used = [(loss, torch.tensor(v, dtype=loss.dtype, device=device))
                        for loss, v in zip(losses, call) if v is not None and loss.requires_grad]
                if not used:
                    continue
                torch.autograd.backward([u[0] for u in used], [u[1] for u in used],
                                        retain_graph=k < len(calls) - 1)
            grads[backend] = [t.grad for t in inputs]
        for name, a, b in zip(NAMES, grads["triton"], grads["torch"]):
            what = f"trial {trial} {calls} {options} {dtype}: {name}"
            assert (a is None) == (b is None), what
            if a is not None:
                assert_same(a, b, what)


# ---------------------------------------------------------------------------------------------
# create_graph
# ---------------------------------------------------------------------------------------------


def test_gradient_penalty(device, dtype):
    """``create_graph=True``: a penalty on the gradient's norm, differentiated again."""
    def steps(inputs, losses):
        total = sum(losses)
        grads = torch.autograd.grad(total, inputs, create_graph=True)
        penalty = sum((g * g).sum() for g in grads)
        return torch.autograd.grad(total + penalty, inputs)

    got, want = both(device, dtype, steps, free_nats=0.1)
    for name, a, b in zip(NAMES, got, want):
        assert_same(a, b, name)


def test_hessian_and_jvp_through_the_gradient(device):
    base = make_inputs((2, 2), 3, (2, 2, 2), torch.float64, device, seed=5)
    results = {}
    for backend in BACKENDS:
        def total(pm, reco, backend=backend):
            inputs = [t.detach() for t in base]
            inputs[0], inputs[5] = pm, reco
            return sum(losses_of(inputs, backend, free_nats=0.1))

        hessian = torch.autograd.functional.hessian(total, (base[0].detach(), base[5].detach()))
        vectors = (torch.ones_like(base[0]), torch.full_like(base[5], 0.5))
        _, jvp = torch.autograd.functional.jvp(
            lambda pm, reco, total=total: torch.autograd.grad(total(pm, reco), (pm, reco),
                                                              create_graph=True),
            (base[0].detach().requires_grad_(), base[5].detach().requires_grad_()), vectors)
        results[backend] = [h for row in hessian for h in row] + list(jvp)
    assert any(bool((h != 0).any()) for h in results["torch"])
    for a, b in zip(results["triton"], results["torch"]):
        assert_same(a, b, "hessian / jvp")


# ---------------------------------------------------------------------------------------------
# Precision of the gradients under loss scaling
# ---------------------------------------------------------------------------------------------


#: Units in the last place a gradient may be from the float64 value: fp16 and bf16 gradients are
#: computed in fp32 and rounded once (truncated, under Triton's interpreter: below one ulp too);
#: fp32 ones go through a few fp32 roundings.
ULPS = {torch.float16: 1.0, torch.bfloat16: 1.0, torch.float32: 4.0}
#: Absolute slack, as a fraction of the largest gradient: the float64 oracle's own rounding, and
#: for the latents, whose KL derivatives cancel (qs / ps² − 1/qs), fp32's.
NOISE = {"well-conditioned": 1e-12, "cancelling": 2.0**-20}
LATENTS = range(4)


def assert_rounded_once(got: torch.Tensor, exact: torch.Tensor, what: str, noise: float):
    """``got`` within ULPS of ``exact`` (float64) rounded to got's dtype, give or take ``noise`` ×
    the largest gradient, and zero only where that rounded value is (no gradient flushed to zero
    by an intermediate that underflowed)."""
    want = exact.to(got.dtype)
    finfo = torch.finfo(got.dtype)
    slack = noise * float(exact.abs().max())
    flushed = (got == 0) & (want != 0) & (exact.abs() > slack)
    assert not flushed.any(), f"{what}: {int(flushed.sum())} gradients flushed to zero"
    ulp = torch.clamp(want.double().abs() * finfo.eps, min=finfo.tiny * finfo.eps)
    err = (got.double() - want.double()).abs()
    worst = float((err / (ULPS[got.dtype] * ulp + slack)).max())
    assert worst <= 1.0, f"{what}: {worst * ULPS[got.dtype]:.2f} ulp from the float64 value"


def check_scaled_gradients(inputs, grads, scale, free_nats, what):
    weights = [torch.tensor(scale, dtype=torch.float64)] * 3
    _, exact = oracle(inputs, grad_outputs=weights, free_nats=free_nats)
    for i, (name, a, b) in enumerate(zip(NAMES, grads, exact)):
        kind = "cancelling" if i in LATENTS else "well-conditioned"
        assert_rounded_once(a, b, f"{what} {name}", NOISE[kind])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("scale", [65536.0, 1.0, 2.0**-16], ids=str)
def test_loss_scaled_gradients_are_rounded_once(device, dtype, scale):
    """``grad_output`` 2¹⁶, 1 and 2⁻¹⁶ on a 50 × 50 batch. Under autocast (how float16 losses are
    scaled in practice) the losses are float32, so 2¹⁶ is a representable grad_output."""
    inputs = make_inputs((50, 50), 6, (3, 8, 8), dtype, device, seed=6)
    free_nats = free_nats_for(inputs, False, "some")
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        losses = losses_of(inputs, "triton", free_nats=free_nats)
    g = torch.tensor(scale, dtype=torch.float32, device=device)
    grads = torch.autograd.grad(losses, inputs, [g, g, g])
    check_scaled_gradients(inputs, grads, scale, free_nats, f"scale {scale}")


def test_grad_scaler_step_in_float16(device):
    """A real GradScaler step: float32 parameters cast to float16 for the loss under autocast."""
    base = make_inputs((50, 50), 6, (3, 8, 8), torch.float32, device, seed=7)
    params = [torch.nn.Parameter(t.detach().clone()) for t in base]
    scaler = torch.amp.GradScaler(device.type, init_scale=65536.0)
    optimizer = torch.optim.SGD(params, lr=0.1)
    halves = [p.half() for p in params]
    for h in halves:
        h.retain_grad()
    free_nats = free_nats_for(halves, False, "some")
    with torch.autocast(device.type, dtype=torch.float16):
        losses = losses_of(halves, "triton", free_nats=free_nats)
    scaler.scale(sum(losses)).backward()
    check_scaled_gradients([h.detach() for h in halves], [h.grad for h in halves], 65536.0,
                           free_nats, "GradScaler")
    before = [p.detach().clone() for p in params]
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 65536.0  # no inf or NaN found: the step was taken
    assert all(not torch.equal(b, p) for b, p in zip(before, params))


# ---------------------------------------------------------------------------------------------
# The rest of the table
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_modified_in_place_after_forward(device, backend):
    inputs = make_inputs(device=device)
    reco = inputs[5].detach().clone().requires_grad_()
    pred = reco * 1.0  # a non-leaf we can modify in place
    inputs[5] = pred
    losses = losses_of(inputs, backend)
    with torch.no_grad():
        pred.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        sum(losses).backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,value", [("free_nats", 1e300), ("lambda_kl", -1e39),
                                        ("lambda_reco", 1e300), ("lambda_reward", 3.5e38)])
def test_options_the_dtype_cannot_hold(device, backend, name, value):
    inputs = make_inputs(device=device)
    with pytest.raises(ValueError, match=f"{name}=.*does not fit in torch.float32"):
        losses_of(inputs, backend, **{name: value})
    halves = [t.detach().half() for t in inputs]
    with pytest.raises(ValueError, match="free_nats=.*does not fit in torch.float16"):
        losses_of(halves, backend, free_nats=1e5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_transforms(device, backend):
    base = make_inputs((2, 3), 4, (2, 3, 3), torch.float64, device, seed=8, requires_grad=False)

    def total(reco, pm, backend=backend):
        inputs = list(base)
        inputs[5], inputs[0] = reco, pm
        return sum(losses_of(inputs, backend, free_nats=0.1))

    want = torch.autograd.grad(total(base[5].requires_grad_(), base[0].requires_grad_(),
                                     backend="torch"), (base[5], base[0]))
    base[5].requires_grad_(False)
    base[0].requires_grad_(False)
    got = torch.func.grad(total, argnums=(0, 1))(base[5], base[0])
    for a, b in zip(got, want):
        assert_same(a, b, "torch.func.grad")
    batched = torch.stack([base[5], base[5] * 2])
    values = torch.func.vmap(total, in_dims=(0, None))(batched, base[0])
    torch.testing.assert_close(values[1], total(base[5] * 2, base[0], backend="torch"))
    jac = torch.func.jacrev(total)(base[5], base[0])
    assert_same(jac, want[0], "jacrev")
    jac = torch.autograd.functional.jacobian(lambda r: torch.stack(losses_of(
        [*base[:5], r, *base[6:]], backend, free_nats=0.1)), base[5], vectorize=True)
    ref = torch.autograd.functional.jacobian(lambda r: torch.stack(losses_of(
        [*base[:5], r, *base[6:]], "torch", free_nats=0.1)), base[5])
    assert_same(jac, ref, "jacobian(vectorize=True)")


def test_torch_func_over_captured_inputs(device):
    """A transformed function whose loss inputs are plain tensors it captured (the transform
    wraps only its argument, the scale): torch's numbers, not autograd.Function's refusal of a
    Function without ``setup_context`` under a transform."""
    base = make_inputs((2, 3), 4, (2, 3, 3), torch.float64, device, seed=9)
    got, want = (torch.func.grad(lambda s, b=b: s * sum(losses_of(base, b)))(
        torch.tensor(2.0, dtype=torch.float64, device=device)) for b in BACKENDS)
    assert_same(got.detach(), want.detach(), "torch.func.grad over captured inputs")


def test_outputs_require_grad_as_torchs(device):
    """A loss whose inputs get no gradient does not require grad (torch's), and its backward
    alone raises as torch's does; the others train."""
    inputs = make_inputs((2, 3), 4, (2, 3, 3), torch.float64, device, seed=10,
                         requires_grad=False)
    inputs[5].requires_grad_()  # reco_pixels only
    for backend in BACKENDS:
        losses = losses_of(inputs, backend)
        assert [loss.requires_grad for loss in losses] == [False, True, False], backend
        with pytest.raises(RuntimeError, match="does not require grad"):
            losses[0].backward()
    got = torch.autograd.grad(sum(losses_of(inputs, "triton")), inputs[5])
    want = torch.autograd.grad(sum(losses_of(inputs, "torch")), inputs[5])
    assert_same(got[0], want[0], "gradient beside non-differentiable losses")


def test_batched_grad_outputs_give_gradients_without_a_graph(device):
    """``is_grads_batched=True`` (vmap over the grad outputs): torch's gradients, which carry no
    graph."""
    inputs = make_inputs((2, 3), 4, (2, 3, 3), torch.float64, device, seed=11)
    eye = torch.eye(3, dtype=torch.float64, device=device)
    results = []
    for backend in BACKENDS:
        losses = torch.stack(losses_of(inputs, backend))
        (jac,) = torch.autograd.grad(losses, inputs[5], eye, is_grads_batched=True)
        assert jac.grad_fn is None and not jac.requires_grad, backend
        results.append(jac)
    assert_same(results[0], results[1], "batched grad outputs")


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_tensors(backend):
    inputs = [t.to("meta").requires_grad_() for t in make_inputs(requires_grad=False)]
    inputs[4] = inputs[4].detach().to(torch.bfloat16).requires_grad_()
    losses = losses_of(inputs, backend)
    assert [loss.shape for loss in losses] == [torch.Size([])] * 3
    assert [loss.dtype for loss in losses] == [torch.float32] * 3
    assert all(loss.device.type == "meta" for loss in losses)
    grads = torch.autograd.grad(sum(losses), inputs)
    assert [g.shape for g in grads] == [t.shape for t in inputs]


def test_float64_beside_bfloat16(device):
    """One float64 input and bf16 reco_pixels: the image term accumulates in float64 and the bf16
    gradient is written through float32."""
    inputs = make_inputs((3, 4), 5, (2, 3, 4), torch.float64, device, seed=9, requires_grad=False)
    inputs[5] = inputs[5].to(torch.bfloat16)
    inputs = [t.requires_grad_() for t in inputs]
    losses = losses_of(inputs, "triton", free_nats=0.5)
    grads = torch.autograd.grad(losses, inputs)
    _, ref = oracle(inputs, free_nats=0.5)
    assert bool((grads[5] != 0).any())
    for name, a, b, t in zip(NAMES, grads, ref, inputs):
        assert_close(a, b, t.dtype, name)


# ---------------------------------------------------------------------------------------------
# The fast path stays fast
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight,untouched", [(1.0, True), (2.0, False)])
def test_unit_grad_output_neither_allocates_nor_writes_images(device, weight, untouched):
    """``(kl + reco + reward).backward()``: the backward hands over the forward's image gradients
    as they are. A sentinel written into them after the forward comes out unchanged (with a
    weight of 2 the kernel must overwrite it: the test can fail), and no image-sized tensor is
    allocated."""
    inputs = make_inputs((3, 4), 5, (3, 8, 8), torch.float32, device, seed=10)
    losses = losses_of(inputs, "triton")
    buffers = losses[1].grad_fn.forward_grads[4:6]  # the image gradients the forward made
    assert all(b is not None and b.shape == inputs[5].shape for b in buffers)
    for buffer in buffers:
        buffer.fill_(123.0)
    with Allocations() as allocations:
        (weight * (losses[0] + losses[1] + losses[2])).backward()
    for t in inputs[4:6]:
        assert torch.equal(t.grad, torch.full_like(t.grad, 123.0)) == untouched
    assert not [n for n in allocations.numels if n >= inputs[5].numel()]


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------


def test_module_parameter_grads_over_retained_backward_calls(device):
    torch.manual_seed(0)
    model = make_world_model((3, 8, 8), latent_dim=6, channels=4, embed_dim=16, stochastic=False)
    g = torch.Generator().manual_seed(1)
    from tensordict import TensorDict

    data = TensorDict({"next": {"pixels": torch.rand(2, 3, 3, 8, 8, generator=g),
                                "reward": torch.randn(2, 3, 1, generator=g)}},
                      batch_size=[2, 3]).to(device)
    grads = {}
    for backend in BACKENDS:
        module = FusedDreamerModelLoss(model, free_nats=0.1, backend=backend).to(device)
        module.zero_grad(set_to_none=True)
        losses, _ = module(data)
        kl, reco, rew = (losses[k].sum() for k in ("loss_model_kl", "loss_model_reco",
                                                   "loss_model_reward"))
        (kl + reco).backward(retain_graph=True)
        (-3 * rew + 0.5 * reco).backward(retain_graph=True)
        (kl + reco + rew).backward()
        grads[backend] = [p.grad.clone() for p in module.parameters()]
    for (name, _), a, b in zip(model.named_parameters(), grads["triton"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())),
                                   msg=lambda m: f"{name}: {m}")
    assert math.isfinite(float(sum(g.abs().sum() for g in grads["triton"])))
