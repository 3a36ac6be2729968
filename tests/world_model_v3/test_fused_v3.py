"""The fused DreamerV3 kernels against the float64 reference and torchrl: values and every gradient,
the option grid, dtypes, shapes, layouts, the autograd contract, launches, torch.compile."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from tests.helpers import Allocations, LaunchSpy, assert_close
from tests.world_model_v3.helpers_v3 import free_bits_for, kl_values, leaves, make_v3_inputs, torchrl_losses

from fused_dreamer_loss import dreamer_v3_model_loss
from fused_dreamer_loss.world_model_v3.validation import V3Options, as_heads, validate_v3_inputs
from fused_dreamer_loss.world_model_v3 import kernels as k3
from fused_dreamer_loss.core import machinery

BACKENDS = ("triton", "torch")
#: Lambdas other than 1, so that a gradient scaled by the wrong one shows.
LAMBDAS = dict(lambda_kl=0.9, lambda_reco=1.1, lambda_reward=0.6, lambda_dynamic=0.8,
               lambda_representation=0.3, kl_alpha=0.7, continue_target_scale=0.997)
#: The option axes of the issue; the grid below covers every pair of their values.
AXES = {
    "kl_mode": ("balanced", "separate"),
    "unimix": (0.0, 0.01),
    "clamp": ("none", "some", "all"),
    "reco_symlog": (True, False, "target"),
    "reco_loss": ("l2", "l1"),
    "two_hot": ("raw", "symlog", "off"),
    "continue": (True, False),
    "global_average": (False, True),
    "heads": (1, 2),
    "uint8": (True, False),
}


def pairwise(axes: dict, seed: int = 0) -> list[dict]:
    """A small set of combinations in which every pair of values of two axes occurs (greedy)."""
    names = list(axes)
    uncovered = {(a, va, b, vb) for a, b in itertools.combinations(names, 2)
                 for va in axes[a] for vb in axes[b]}
    rng = random.Random(seed)
    chosen = []
    while uncovered:
        candidates = [{n: rng.choice(axes[n]) for n in names} for _ in range(60)]

        def gain(c):
            return sum((a, c[a], b, c[b]) in uncovered for a, b in itertools.combinations(names, 2))

        best = max(candidates, key=gain)
        uncovered -= {(a, best[a], b, best[b]) for a, b in itertools.combinations(names, 2)}
        chosen.append(best)
    return chosen


GRID = pairwise(AXES)


@pytest.fixture
def small_v3_blocks(monkeypatch):
    """Tiles shrunk so that small test shapes span many programs of every segment."""
    monkeypatch.setattr(k3, "KL_TILE", 16)
    monkeypatch.setattr(k3, "REWARD_TILE", 64)
    monkeypatch.setattr(k3, "ROW_BLOCK", 4)
    monkeypatch.setattr(k3, "IMAGE_TILE_BYTES", 64)
    monkeypatch.setattr(machinery, "FINALIZE_BLOCK", 4)


def case(combo: dict, dtype=torch.float64, device="cpu", batch_shape=(2, 3), S=3, K=5, seed=0):
    """Inputs and options of one grid combination."""
    two_hot = combo["two_hot"] != "off"
    heads = ((3, 4, 4),) if combo["heads"] == 1 else ((3, 4, 4), (7,))
    inputs = make_v3_inputs(batch_shape, S, K, heads, uint8=combo["uint8"],
                            reward_width=17 if two_hot else 1, dtype=dtype, seed=seed,
                            device=device)
    if two_hot:  # the fused two-hot loss has no gradient for its target
        inputs["true_reward"] = inputs["true_reward"].detach()
    options = dict(LAMBDAS, kl_mode=combo["kl_mode"], unimix=combo["unimix"],
                   reco_symlog=combo["reco_symlog"], reco_loss=combo["reco_loss"],
                   reward_two_hot=two_hot, num_reward_bins=17,
                   lambda_continue=0.7 if combo["continue"] else 0.0,
                   global_average=combo["global_average"],
                   free_bits=free_bits_for(kl_values(inputs, combo["kl_mode"], combo["unimix"]),
                                           combo["clamp"]))
    if combo["two_hot"] == "symlog":
        options["two_hot_space"] = "symlog"
    return inputs, options


def float64_twin(inputs: dict) -> dict:
    """The same values in float64, as fresh leaves where the original requires grad."""
    def twin(t):
        if not t.is_floating_point():
            return t
        return t.detach().double().requires_grad_(t.requires_grad)

    return {k: [twin(t) for t in v] if isinstance(v, list) else twin(v)
            for k, v in inputs.items()}


def check_against_reference(inputs: dict, options: dict, what: str):
    """Fused losses and gradients against the reference in float64 on the same values: a first
    backward with grad outputs 1 (the forward's gradients) and a second, through the retained
    graph, with other grad outputs (recomputed ones)."""
    wrt = leaves(inputs)
    ours = dreamer_v3_model_loss(**inputs, **options, backend="triton")
    twin = float64_twin(inputs)
    theirs = dreamer_v3_model_loss(**twin, **options, backend="torch")
    assert list(ours) == list(theirs), what
    for name in ours:
        assert ours[name].shape == ()
        want_dtype = torch.float64 if wrt[0].dtype == torch.float64 else torch.float32
        assert ours[name].dtype == want_dtype, f"{what} {name}: {ours[name].dtype}"
        assert_close(ours[name].detach(), theirs[name].detach(), ours[name].dtype,
                     f"{what} {name}")
    for weights in ([1.0] * len(ours), [1.0 + 0.25 * i for i in range(len(ours))]):
        got = torch.autograd.grad(list(ours.values()), wrt,
                                  [torch.tensor(w, dtype=v.dtype, device=v.device)
                                   for w, v in zip(weights, ours.values())],
                                  retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(list(theirs.values()), leaves(twin),
                                   [torch.tensor(w, dtype=torch.float64, device=v.device)
                                    for w, v in zip(weights, theirs.values())],
                                   retain_graph=True, allow_unused=True)
        for i, (a, b, t) in enumerate(zip(got, want, wrt)):
            assert (a is None) == (b is None), f"{what}: gradient {i} present in one only"
            if a is not None:
                assert a.dtype == t.dtype and a.shape == t.shape
                assert_close(a, b, t.dtype, f"{what}: gradient {i}, weights {weights}")


@pytest.mark.parametrize("combo", GRID, ids=[f"grid{i}" for i in range(len(GRID))])
def test_option_grid(device, small_v3_blocks, combo):
    """Every pair of option values, in float64, on tiles shrunk to span many programs."""
    inputs, options = case(combo, device=device, seed=len(str(combo)))
    check_against_reference(inputs, options, str(combo))


def test_categoricals_exactly_on_the_free_bits_boundary(device):
    """Balanced mode, free bits 0: a categorical whose posterior and prior logits are equal has a
    KL of exactly 0 in any arithmetic, on the boundary, where torch's clamp_min passes the
    gradient. With one class under the 1e-8 floor the prior's gradient at that class is not 0:
    the kernel must pass it (``>=``), as the reference does."""
    combo = dict(GRID[0], kl_mode="balanced", clamp="none", heads=1)
    inputs, options = case(combo, device=device, S=3, K=5)
    with torch.no_grad():
        inputs["prior_logits"][..., 0, :] = inputs["posterior_logits"][..., 0, :]
        inputs["prior_logits"][..., 0, 2] = inputs["posterior_logits"][..., 0, 2] = -40.0
    options["free_bits"] = 0.0
    check_against_reference(inputs, options, "on the boundary")
    losses = dreamer_v3_model_loss(**inputs, **options, backend="triton")
    grad = torch.autograd.grad(losses["loss_model_kl"], inputs["prior_logits"])[0]
    assert bool((grad[..., 0, 2] != 0).all())  # the floored class: s·(0 − Σ s G) ≠ 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kl_mode", ["balanced", "separate"])
def test_dtypes(device, dtype, kl_mode):
    combo = dict(GRID[0], kl_mode=kl_mode, unimix=0.01, two_hot="raw", heads=2)
    inputs, options = case(combo, dtype=dtype, device=device, seed=3)
    check_against_reference(inputs, options, f"{dtype} {kl_mode}")


@pytest.mark.parametrize("K", [4, 16, 32, 64])
@pytest.mark.parametrize("batch_shape", [(7,), (2, 3), (2, 1, 3)], ids=str)
def test_categorical_sizes_and_batch_dims(device, K, batch_shape):
    S = {4: 3, 16: 32, 32: 32, 64: 32}[K]
    combo = dict(GRID[1], kl_mode="separate" if K % 32 else "balanced", clamp="some")
    inputs, options = case(combo, device=device, batch_shape=batch_shape, S=S, K=K, seed=K)
    check_against_reference(inputs, options, f"K={K} {batch_shape}")


def test_layouts_without_copies(device):
    """Logits transposed from time-major, channels_last images, strided reward logits."""
    combo = dict(GRID[2], heads=1, two_hot="raw", uint8=False)
    inputs, options = case(combo, device=device, batch_shape=(4, 3), seed=5)
    for key in ("posterior_logits", "prior_logits"):
        t = inputs[key].detach()
        inputs[key] = t.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    for key in ("pixels", "reco_pixels"):  # [B, T, C, H, W]
        inputs[key] = inputs[key].detach().contiguous(
            memory_format=torch.channels_last_3d).requires_grad_()
    wide = torch.cat([inputs["reward_pred"].detach()] * 2, dim=-1)
    inputs["reward_pred"] = wide[..., ::2].requires_grad_()
    check_against_reference(inputs, options, "layouts")


@pytest.mark.parametrize("reco_symlog", [True, "target"])
def test_symlog_of_small_values(device, reco_symlog):
    """symlog(v) ≈ v for tiny v: float32 keeps its relative precision (log1p, not log(1 + v))."""
    combo = dict(GRID[0], heads=2, uint8=False, reco_symlog=reco_symlog)
    inputs, options = case(combo, dtype=torch.float32, device=device)
    for key in ("pixels", "reco_pixels"):
        inputs[key] = [(t.detach() * 1e-5).requires_grad_() for t in inputs[key]]
    check_against_reference(inputs, options, "tiny values")


def test_finite_where_torchrl_is_nan(device):
    """unimix 0 and a class whose softmax underflows: torchrl's 0·log 0 is NaN, ours the finite
    value of the float64 log-softmax computation."""
    inputs, options = case(dict(GRID[0], kl_mode="separate", unimix=0.0, clamp="none"),
                           dtype=torch.float32, device=device)
    with torch.no_grad():
        inputs["posterior_logits"][..., 0] = -200.0
    losses = dreamer_v3_model_loss(**inputs, **options, backend="triton")
    grads = torch.autograd.grad(sum(losses.values()), leaves(inputs), allow_unused=True)
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(bool(torch.isfinite(g).all()) for g in grads if g is not None)
    check_against_reference(inputs, options, "underflow")


def test_matches_torchrl_module(device):
    """The numbers of torchrl's DreamerV3ModelLoss (its defaults and its recipe's options)."""
    torchrl_v3 = pytest.importorskip("torchrl.objectives.dreamer_v3")
    for options in ({}, dict(kl_mode="separate", unimix=0.01, lambda_continue=1.0,
                             continue_target_scale=1 - 1 / 333, reco_symlog=False)):
        inputs = make_v3_inputs(device=device, seed=11)
        theirs = torchrl_losses(torchrl_v3, inputs, **options)
        wrt = [t for t in leaves(inputs) if t is not inputs["true_reward"]]
        want = torch.autograd.grad(sum(theirs.values()), wrt, allow_unused=True)
        inputs["true_reward"] = inputs["true_reward"].detach()
        ours = dreamer_v3_model_loss(**inputs, **options, backend="triton")
        assert set(ours) == set(theirs)
        for name in ours:
            assert_close(ours[name].detach(), theirs[name].detach(), torch.float32, name)
        got = torch.autograd.grad(sum(ours.values()), wrt, allow_unused=True)
        for i, (a, b) in enumerate(zip(got, want)):
            assert (a is None) == (b is None), f"gradient {i} {options}"
            if a is not None:
                assert_close(a, b, torch.float32, f"gradient {i} {options}")


@pytest.mark.parametrize("kl_mode", ["balanced", "separate"])
def test_gradcheck(device, kl_mode):
    """gradcheck in float64. The KL terms stop the gradient of one side (sg(q) or sg(p)), which a
    numerical Jacobian does not see: each side is checked with the other held constant, against
    the output(s) its gradient comes from (balanced: kl_alpha 1 for the prior, 0 for the
    posterior)."""
    combo = dict(GRID[0], kl_mode=kl_mode, unimix=0.01, two_hot="off", heads=2, uint8=False,
                 clamp="some", **{"continue": True})
    inputs, options = case(combo, device=device, batch_shape=(2, 2), S=2, K=3)
    others = [k for k, v in inputs.items() if k not in ("posterior_logits", "prior_logits")
              and (isinstance(v, list) or v.requires_grad)]
    flat = [t for k in others for t in (inputs[k] if isinstance(inputs[k], list) else [inputs[k]])]
    sides = {"prior_logits": ("loss_model_dynamic", 1.0), "posterior_logits":
             ("loss_model_representation", 0.0)}
    for side, (kl_name, alpha) in sides.items():
        opts = dict(options, kl_alpha=alpha)

        def fn(logits, *tensors, side=side, kl_name=kl_name, opts=opts):
            given = dict(inputs, **{side: logits})
            it = iter(tensors)
            for k in others:
                given[k] = ([next(it) for _ in inputs[k]] if isinstance(inputs[k], list)
                            else next(it))
            losses = dreamer_v3_model_loss(**given, **opts, backend="triton")
            name = "loss_model_kl" if kl_mode == "balanced" else kl_name
            return tuple(v for k, v in losses.items() if k == name or "kl" not in k and
                         k not in ("loss_model_dynamic", "loss_model_representation"))

        assert torch.autograd.gradcheck(fn, (inputs[side], *flat), eps=1e-6, atol=1e-7,
                                        rtol=1e-5, fast_mode=True)


def test_launch_counts(device, monkeypatch):
    """Forward: one main launch and the finalize, for two heads and every term; backward: one."""
    where = {"_v3_fwd_kernel": k3, "finalize_kernel": machinery, "_v3_bwd_kernel": k3}
    spies = {name: LaunchSpy(getattr(module, name)) for name, module in where.items()}
    for name, module in where.items():
        monkeypatch.setattr(module, name, spies[name])
    inputs, options = case(dict(GRID[0], heads=2, **{"continue": True}), device=device)
    losses = dreamer_v3_model_loss(**inputs, **options, backend="triton")
    assert [len(s.calls) for s in spies.values()] == [1, 1, 0]
    sum(losses.values()).backward()
    assert [len(s.calls) for s in spies.values()] == [1, 1, 1]


def test_unit_backward_allocates_no_image(device):
    inputs, options = case(dict(GRID[0], heads=2, uint8=False), device=device)
    losses = dreamer_v3_model_loss(**inputs, **options, backend="triton")
    with Allocations() as allocations:
        sum(losses.values()).backward()
    head = inputs["reco_pixels"][0]
    assert not [n for n in allocations.numels if n >= head.numel()]


@pytest.mark.parametrize("where,term", [("reco_pixels", "loss_model_reco"),
                                        ("posterior_logits", "loss_model_kl"),
                                        ("prior_logits", "loss_model_kl"),
                                        ("reward_pred", "loss_model_reward")])
def test_nan_in_gives_nan_out(device, where, term):
    """Balanced mode included: its 1e-8 floor must not turn a NaN probability into 1e-8 (a
    max that drops NaN would, on a GPU)."""
    inputs, options = case(dict(GRID[0], heads=1, kl_mode="balanced", clamp="none"),
                           dtype=torch.float32, device=device)
    with torch.no_grad():
        inputs[where].view(-1)[3] = float("nan")
    losses = dreamer_v3_model_loss(**inputs, **options, backend="triton")
    assert torch.isnan(losses[term])
    assert all(torch.isfinite(v) for k, v in losses.items() if k != term)


# inf / inf in a discarded branch of log1p, on purpose; numpy, under the interpreter, warns.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_user_bins_with_strides_and_an_infinite_reward(device):
    """A strided ``reward_bins`` (read flat by the kernel), and an infinite reward, whose symlog
    is inf and whose two-hot target is the last bin: the reference's numbers."""
    combo = dict(GRID[0], two_hot="symlog", heads=1)
    inputs, options = case(combo, device=device)
    options.pop("num_reward_bins")
    options["reward_bins"] = torch.linspace(-8, 8, 34, dtype=torch.float64, device=device)[::2]
    with torch.no_grad():
        inputs["true_reward"].view(-1)[0] = float("inf")
        inputs["true_reward"].view(-1)[1] = float("-inf")
    check_against_reference(inputs, options, "strided bins, infinite rewards")


# ---------------------------------------------------------------------------------------------
# The autograd contract, on the V3 path, against the torch backend
# ---------------------------------------------------------------------------------------------


def run_both(device, steps, combo=None, dtype=torch.float64):
    combo = combo or dict(GRID[0], heads=2, kl_mode="separate", **{"continue": True})
    base, options = case(combo, dtype=dtype, device=device, seed=17)
    out = {}
    for backend in BACKENDS:
        inputs = float64_twin(base) if dtype == torch.float64 else base
        inputs = {k: ([t.detach().clone().requires_grad_(t.requires_grad) for t in v]
                      if isinstance(v, list) else
                      v.detach().clone().requires_grad_(v.requires_grad))
                  for k, v in inputs.items()}
        losses = dreamer_v3_model_loss(**inputs, **options, backend=backend)
        out[backend] = steps(inputs, losses)
    return out["triton"], out["torch"]


def assert_pairs(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), f"{what} {i}"
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, equal_nan=True,
                                       msg=lambda m: f"{what} {i}: {m}")


def test_contract_gradients_stay_and_accumulate(device):
    def steps(inputs, losses):
        total = sum(losses.values())
        wrt = leaves(inputs)
        first = torch.autograd.grad(total, wrt, retain_graph=True)
        copies = [g.clone() for g in first]
        total.backward(retain_graph=True)
        (2 * total).backward()
        for g, c in zip(first, copies):
            assert torch.equal(g, c), "a returned gradient changed"
        return [*first, *(t.grad for t in wrt)]

    got, want = run_both(device, steps)
    assert_pairs(got, want, "gradient")


# inf × 0 is NaN on purpose here; numpy, under Triton's interpreter, warns about it.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("value", [0.0, -0.0, float("inf"), float("nan"), 65536.0])
def test_contract_special_grad_output_then_one(device, value):
    def steps(inputs, losses):
        wrt = leaves(inputs)
        special = [torch.tensor(value, dtype=v.dtype, device=v.device) for v in losses.values()]
        first = torch.autograd.grad(list(losses.values()), wrt, special, retain_graph=True)
        second = torch.autograd.grad(sum(losses.values()), wrt)
        return [*first, *second]

    got, want = run_both(device, steps)
    n = len(got) // 2
    if value not in (float("inf"),):  # inf: NaN vs ±inf by decomposition, see the V1 test
        assert_pairs(got[:n], want[:n], f"grad output {value}")
    else:
        for a, b in zip(got[:n], want[:n]):
            assert torch.equal(torch.isfinite(a), torch.isfinite(b))
    assert_pairs(got[n:], want[n:], f"then 1 after {value}")


def test_contract_create_graph(device):
    def steps(inputs, losses):
        wrt = leaves(inputs)
        total = sum(losses.values())
        grads = torch.autograd.grad(total, wrt, create_graph=True)
        penalty = sum((g * g).sum() for g in grads)
        return torch.autograd.grad(total + penalty, wrt)

    got, want = run_both(device, steps)
    assert_pairs(got, want, "gradient penalty")


def test_contract_one_term_at_a_time(device):
    def steps(inputs, losses):
        names = list(losses)
        for i, name in enumerate(names):
            (-(i + 1) * losses[name]).backward(retain_graph=True)
        sum(losses.values()).backward()
        return [t.grad for t in leaves(inputs)]

    got, want = run_both(device, steps)
    assert_pairs(got, want, ".grad")


# ---------------------------------------------------------------------------------------------
# torch.compile, torch.func, meta
# ---------------------------------------------------------------------------------------------


def test_compiled_matches_eager(device):
    torch._dynamo.reset()
    inputs, options = case(dict(GRID[0], heads=2, kl_mode="separate", **{"continue": True}),
                           dtype=torch.float32, device=device)

    def total(**tensors):
        return torch.stack(list(dreamer_v3_model_loss(**tensors, **options,
                                                      backend="triton").values()))

    got = torch.compile(total, fullgraph=True, backend="aot_eager")(**inputs)
    want = total(**inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    weights = torch.linspace(0.5, 1.5, len(want), device=device)
    for a, b in zip(torch.autograd.grad((got * weights).sum(), leaves(inputs)),
                    torch.autograd.grad((want * weights).sum(), leaves(inputs))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch._dynamo.reset()


def test_custom_ops_pass_opcheck(device):
    inputs, options = case(dict(GRID[0], heads=2, uint8=True, **{"continue": True}),
                           dtype=torch.float32, device=device)
    plain = {k: ([t.detach() for t in v] if isinstance(v, list) else v.detach())
             for k, v in inputs.items()}
    opts = V3Options(**{k: v for k, v in options.items()})
    pixels, reco = as_heads("pixels", plain["pixels"]), as_heads("reco_pixels",
                                                                  plain["reco_pixels"])
    shapes = validate_v3_inputs(plain["posterior_logits"], plain["prior_logits"], pixels, reco,
                                plain["true_reward"], plain["reward_pred"],
                                plain["continue_pred"], plain["terminated"], opts)
    bins = k3.reward_support(opts, torch.device(device), shapes.reward_dtype)
    tensors = [plain["posterior_logits"], plain["prior_logits"], plain["true_reward"],
               plain["reward_pred"], plain["continue_pred"], plain["terminated"], bins,
               *(t for pair in zip(pixels, reco) for t in pair)]
    floats, ints = k3.KERNELS.encode(opts, shapes)
    needs = [t is not None and t.is_floating_point() and i not in (k3.TRUE_REWARD, k3.BINS)
             for i, t in enumerate(tensors)]
    torch.library.opcheck(machinery.forward_op, ("dreamer_v3", tensors, floats, ints, needs))
    n_out = len(k3.output_names(opts))
    keep = machinery.forward_op("dreamer_v3", tensors, floats, ints, needs)[n_out]
    grad_outputs = [torch.tensor(0.5 + i, device=device) for i in range(n_out)]
    torch.library.opcheck(machinery.gradients_op,
                          ("dreamer_v3", tensors, floats, ints, keep, grad_outputs, needs))


def test_torch_func_and_meta_take_the_reference(device):
    inputs, options = case(dict(GRID[0], heads=1, uint8=False), device=device)
    plain = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def reco_loss(reco, backend):
        return dreamer_v3_model_loss(**dict(plain, reco_pixels=reco), **options,
                                     backend=backend)["loss_model_reco"]

    got = torch.func.grad(reco_loss)(plain["reco_pixels"], "triton")
    want = torch.func.grad(reco_loss)(plain["reco_pixels"], "torch")
    torch.testing.assert_close(got, want)
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in plain.items()}
    losses = dreamer_v3_model_loss(**meta, **options, backend="triton")
    assert all(v.device.type == "meta" and v.shape == () for v in losses.values())
