"""Fused Triton kernels for the Dreamer world-model loss (V1) and their launchers.

One forward pass computes the three loss terms *and* the gradient of every input that needs one
(DESIGN §3): a training step reads ``pixels`` and ``reco_pixels`` once and writes
``grad(reco_pixels)`` once, three passes over the image tensors where eager torch makes eight or more.
The finalize, the autograd.Function and the custom ops are shared with every fused loss
(:mod:`fused_dreamer_loss.kernels.machinery`); this module adds the Dreamer loss's terms.

Launches:
    forward   1 main kernel    programs split in three segments, in this order:
                               KL row tiles | reward tiles | image tiles;
                               each writes one partial sum (divided by its term's count) to
                               ``partials[pid]`` and the tile's gradients for ``grad_output`` 1
              1 finalize       the shared one: each loss is ``lambda × Σ partials`` of its
                               segment, in a fixed order; the delayed clamp
    backward  at most 1        the same tiles, a few programs per multiprocessor striding over
                               them; each term's factor ``where(keep, grad_output, 0)`` is read on
                               the device, and the gradients are recomputed from the inputs times
                               that factor, or, the first time, left as they are when it is 1

The math, per element, with ``diff = pm − qm`` (p = prior, q = posterior; see ``reference.py``):

    kl      = log(ps / qs) + (qs² + diff²) / (2 ps²) − 1/2
    ∂kl/∂pm = diff / ps²                    ∂kl/∂qm = −diff / ps²
    ∂kl/∂ps = 1/ps − (qs² + diff²) / ps³    ∂kl/∂qs = qs / ps² − 1/qs

and with ``d = prediction − target`` for the reconstruction and the reward:

    l2        d²                              ∂/∂prediction = 2 d
    l1        |d|                             ∂/∂prediction = sign(d)
    smooth_l1 0.5 d² if |d| < 1 else |d| − ½  ∂/∂prediction = clamp(d, −1, 1)
    and ∂/∂target = −∂/∂prediction.

Each gradient is multiplied by ``lambda / count`` and, where the free-nats clamp cuts the term off,
by zero (torch's ``clamp_min`` passes the gradient where ``x >= free_nats``).
"""

# No `from __future__ import annotations` here: Triton reads the "fp64" scalar annotations as
# written, and postponed evaluation would turn them into quoted strings.
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from . import reference
from .validation import (DISTANCES, IMAGE_NAMES, LATENT_NAMES, REWARD_NAMES, LossOptions,
                         LossShapes)
from ..core import machinery
from ..core.machinery import (NO_CLAMP, acc_dtype, backward_programs, code_dtype,
                              contiguous_strides, dtype_code, scalar, store, term_factor)

__all__ = ["KERNELS", "prepare", "run"]

#: Bytes of one image program's tile, per tensor (8192 float32 or 16384 bfloat16 elements);
#: chosen with NUM_WARPS by bench/sweep.py (bench/NOTES.md).
IMAGE_TILE_BYTES = 32768
#: Elements of one reward program's tile.
REWARD_BLOCK = 1024
#: Elements of one KL program's [rows, latents] tile.
LATENT_TILE = 2048
#: Widest latent chunk a KL program holds at once; wider latents loop over chunks.
MAX_LATENT_BLOCK_D = 1024
NUM_WARPS = 16

#: Output (term) order, and the term of each of the eight inputs.
KL, RECO, REWARD = 0, 1, 2
INPUT_TERMS = (KL, KL, KL, KL, RECO, RECO, REWARD, REWARD)
INPUT_NAMES = (*LATENT_NAMES, *IMAGE_NAMES, *REWARD_NAMES)


@triton.jit
def _distance(d, KIND: tl.constexpr):
    """Distance of ``d = prediction − target`` and its derivative with respect to the prediction."""
    if KIND == 0:
        loss = d * d
        dloss = 2.0 * d
    elif KIND == 1:
        loss = tl.abs(d)
        # torch's sign(d): 0 at 0 and at NaN (|d|'s gradient there)
        dloss = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    else:
        ad = tl.abs(d)
        loss = tl.where(ad < 1.0, 0.5 * d * d, ad - 0.5)
        dloss = tl.where(d > 1.0, 1.0, tl.where(d < -1.0, -1.0, d))
    return loss, dloss


@triton.jit
def _distance_tile(target_ptr, pred_ptr, grad_target_ptr, grad_pred_ptr, n, start, scale,
                   KIND: tl.constexpr, BLOCK: tl.constexpr, GRAD_TARGET: tl.constexpr,
                   GRAD_PRED: tl.constexpr, ACC: tl.constexpr):
    """Sum of the distance over one flat tile; stores the scaled gradients of the tile."""
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    target = tl.load(target_ptr + offs, mask=mask, other=0.0).to(ACC)
    pred = tl.load(pred_ptr + offs, mask=mask, other=0.0).to(ACC)
    loss, dloss = _distance(pred - target, KIND)
    if GRAD_PRED:
        store(grad_pred_ptr + offs, dloss * scale, mask)
    if GRAD_TARGET:
        store(grad_target_ptr + offs, -dloss * scale, mask)
    # Masked lanes have d = 0, hence loss 0.
    return tl.sum(loss, axis=0)


@triton.jit
def _kl_tile(pm_ptr, ps_ptr, qm_ptr, qs_ptr, s_pm_r, s_pm_d, s_ps_r, s_ps_d, s_qm_r, s_qm_d,
             s_qs_r, s_qs_d, rows, cols, mask, ACC: tl.constexpr):
    """Loads one [rows, cols] tile of the four latents; returns them in ACC and the KL per element."""
    pm = tl.load(pm_ptr + rows * s_pm_r + cols * s_pm_d, mask=mask, other=0.0).to(ACC)
    ps = tl.load(ps_ptr + rows * s_ps_r + cols * s_ps_d, mask=mask, other=1.0).to(ACC)
    qm = tl.load(qm_ptr + rows * s_qm_r + cols * s_qm_d, mask=mask, other=0.0).to(ACC)
    qs = tl.load(qs_ptr + rows * s_qs_r + cols * s_qs_d, mask=mask, other=1.0).to(ACC)
    diff = pm - qm
    ps2 = ps * ps
    kl = tl.log(ps / qs) + (qs * qs + diff * diff) / (2.0 * ps2) - 0.5
    return pm, ps, qm, qs, kl


@triton.jit
def _kl_grad_store(g_pm_ptr, g_ps_ptr, g_qm_ptr, g_qs_ptr, offs, mask, pm, ps, qm, qs, scale,
                   GRAD_PM: tl.constexpr, GRAD_PS: tl.constexpr, GRAD_QM: tl.constexpr,
                   GRAD_QS: tl.constexpr):
    """Stores ``scale`` times the KL's derivatives for the latents that need them."""
    diff = pm - qm
    ps2 = ps * ps
    if GRAD_PM:
        store(g_pm_ptr + offs, diff / ps2 * scale, mask)
    if GRAD_QM:
        store(g_qm_ptr + offs, -diff / ps2 * scale, mask)
    if GRAD_PS:
        g_ps = 1.0 / ps - (qs * qs + diff * diff) / (ps2 * ps)
        store(g_ps_ptr + offs, g_ps * scale, mask)
    if GRAD_QS:
        g_qs = qs / ps2 - 1.0 / qs
        store(g_qs_ptr + offs, g_qs * scale, mask)


@triton.jit
def _kl_rows(pm_ptr, ps_ptr, qm_ptr, qs_ptr, s_pm_r, s_pm_d, s_ps_r, s_ps_d, s_qm_r, s_qm_d,
             s_qs_r, s_qs_d, g_pm_ptr, g_ps_ptr, g_qm_ptr, g_qs_ptr, n_rows, latent_dim, row_block,
             free_nats, scale, GLOBAL_AVERAGE: tl.constexpr, DELAYED_CLAMP: tl.constexpr,
             GRAD_PM: tl.constexpr, GRAD_PS: tl.constexpr, GRAD_QM: tl.constexpr,
             GRAD_QS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
             ACC: tl.constexpr):
    """The KL term of BLOCK_R rows: the sum of their (clamped) KL, and their gradients.

    Without ``global_average`` and ``delayed_clamp`` each row's clamp decision needs the full row
    sum, so the gradients come from a second sweep over the row chunks (the tile just read, hot in
    cache); the other modes store the gradients in the first sweep.
    """
    ANY_GRAD: tl.constexpr = GRAD_PM or GRAD_PS or GRAD_QM or GRAD_QS
    ROW_CLAMP: tl.constexpr = (not GLOBAL_AVERAGE) and (not DELAYED_CLAMP)
    ELEMENT_CLAMP: tl.constexpr = GLOBAL_AVERAGE and (not DELAYED_CLAMP)
    rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)[:, None]
    row_ok = rows < n_rows
    row_sum = tl.zeros([BLOCK_R, 1], ACC)
    for d0 in range(0, latent_dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)[None, :]
        mask = row_ok & (cols < latent_dim)
        pm, ps, qm, qs, kl = _kl_tile(pm_ptr, ps_ptr, qm_ptr, qs_ptr, s_pm_r, s_pm_d, s_ps_r,
                                      s_ps_d, s_qm_r, s_qm_d, s_qs_r, s_qs_d, rows, cols, mask,
                                      ACC)
        if ELEMENT_CLAMP:
            keep = kl >= free_nats
            kl = tl.where(kl < free_nats, free_nats, kl)
        row_sum += tl.sum(tl.where(mask, kl, 0.0), axis=1, keep_dims=True)
        if ANY_GRAD and not ROW_CLAMP:
            grad_scale = scale
            if ELEMENT_CLAMP:
                grad_scale = tl.where(keep, scale, 0.0)
            _kl_grad_store(g_pm_ptr, g_ps_ptr, g_qm_ptr, g_qs_ptr, rows * latent_dim + cols, mask,
                           pm, ps, qm, qs, grad_scale, GRAD_PM, GRAD_PS, GRAD_QM, GRAD_QS)
    if ROW_CLAMP:
        keep_row = row_sum >= free_nats
        row_sum = tl.where(row_sum < free_nats, free_nats, row_sum)
        row_sum = tl.where(row_ok, row_sum, 0.0)
        if ANY_GRAD:
            grad_scale = tl.where(keep_row, scale, 0.0)
            for d0 in range(0, latent_dim, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)[None, :]
                mask = row_ok & (cols < latent_dim)
                pm, ps, qm, qs, kl = _kl_tile(pm_ptr, ps_ptr, qm_ptr, qs_ptr, s_pm_r, s_pm_d,
                                              s_ps_r, s_ps_d, s_qm_r, s_qm_d, s_qs_r, s_qs_d, rows,
                                              cols, mask, ACC)
                _kl_grad_store(g_pm_ptr, g_ps_ptr, g_qm_ptr, g_qs_ptr, rows * latent_dim + cols,
                               mask, pm, ps, qm, qs, grad_scale, GRAD_PM, GRAD_PS, GRAD_QM,
                               GRAD_QS)
    return tl.sum(tl.sum(row_sum, axis=1), axis=0)


@triton.jit
def _dreamer_loss_fwd_kernel(
    pm_ptr, ps_ptr, qm_ptr, qs_ptr,
    s_pm_r, s_pm_d, s_ps_r, s_ps_d, s_qm_r, s_qm_d, s_qs_r, s_qs_d,
    g_pm_ptr, g_ps_ptr, g_qm_ptr, g_qs_ptr,
    pixels_ptr, reco_ptr, g_pixels_ptr, g_reco_ptr,
    true_reward_ptr, pred_reward_ptr, g_true_reward_ptr, g_pred_reward_ptr,
    partials_ptr,
    n_rows, latent_dim, n_image, n_reward, kl_programs, reward_programs,
    free_nats: "fp64", kl_count: "fp64", reco_count: "fp64", reward_count: "fp64",
    kl_scale: "fp64", reco_scale: "fp64", reward_scale: "fp64",
    GLOBAL_AVERAGE: tl.constexpr, DELAYED_CLAMP: tl.constexpr,
    RECO_KIND: tl.constexpr, REWARD_KIND: tl.constexpr,
    GRAD_PM: tl.constexpr, GRAD_PS: tl.constexpr, GRAD_QM: tl.constexpr, GRAD_QS: tl.constexpr,
    GRAD_PIXELS: tl.constexpr, GRAD_RECO: tl.constexpr,
    GRAD_TRUE_REWARD: tl.constexpr, GRAD_PRED_REWARD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    IMAGE_BLOCK: tl.constexpr, REWARD_BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """Main forward: one program per KL row tile, reward tile or image tile (in that order); each
    stores its partial sum over its term's count, and its gradients times ``*_scale``."""
    pid = tl.program_id(0)
    if pid < kl_programs:
        partial = _kl_rows(pm_ptr, ps_ptr, qm_ptr, qs_ptr, s_pm_r, s_pm_d, s_ps_r, s_ps_d,
                           s_qm_r, s_qm_d, s_qs_r, s_qs_d, g_pm_ptr, g_ps_ptr, g_qm_ptr, g_qs_ptr,
                           n_rows, latent_dim, pid, scalar(free_nats, ACC),
                           scalar(kl_scale, ACC), GLOBAL_AVERAGE, DELAYED_CLAMP, GRAD_PM,
                           GRAD_PS, GRAD_QM, GRAD_QS, BLOCK_R, BLOCK_D, ACC)
        tl.store(partials_ptr + pid, partial / scalar(kl_count, ACC))
    elif pid < kl_programs + reward_programs:
        start = (pid - kl_programs).to(tl.int64) * REWARD_BLOCK
        partial = _distance_tile(true_reward_ptr, pred_reward_ptr, g_true_reward_ptr,
                                 g_pred_reward_ptr, n_reward, start, scalar(reward_scale, ACC),
                                 REWARD_KIND, REWARD_BLOCK, GRAD_TRUE_REWARD, GRAD_PRED_REWARD,
                                 ACC)
        tl.store(partials_ptr + pid, partial / scalar(reward_count, ACC))
    else:
        start = (pid - kl_programs - reward_programs).to(tl.int64) * IMAGE_BLOCK
        partial = _distance_tile(pixels_ptr, reco_ptr, g_pixels_ptr, g_reco_ptr, n_image, start,
                                 scalar(reco_scale, ACC), RECO_KIND, IMAGE_BLOCK, GRAD_PIXELS,
                                 GRAD_RECO, ACC)
        tl.store(partials_ptr + pid, partial / scalar(reco_count, ACC))


@triton.jit
def _dreamer_loss_bwd_kernel(
    pm_ptr, ps_ptr, qm_ptr, qs_ptr,
    s_pm_r, s_pm_d, s_ps_r, s_ps_d, s_qm_r, s_qm_d, s_qs_r, s_qs_d,
    g_pm_ptr, g_ps_ptr, g_qm_ptr, g_qs_ptr,
    pixels_ptr, reco_ptr, g_pixels_ptr, g_reco_ptr,
    true_reward_ptr, pred_reward_ptr, g_true_reward_ptr, g_pred_reward_ptr,
    keep_ptr, grad_kl_ptr, grad_reco_ptr, grad_reward_ptr,
    n_rows, latent_dim, n_image, n_reward, kl_programs, reward_programs, image_programs,
    free_nats: "fp64", kl_scale: "fp64", reco_scale: "fp64", reward_scale: "fp64",
    GLOBAL_AVERAGE: tl.constexpr, DELAYED_CLAMP: tl.constexpr,
    RECO_KIND: tl.constexpr, REWARD_KIND: tl.constexpr,
    GRAD_PM: tl.constexpr, GRAD_PS: tl.constexpr, GRAD_QM: tl.constexpr, GRAD_QS: tl.constexpr,
    GRAD_PIXELS: tl.constexpr, GRAD_RECO: tl.constexpr,
    GRAD_TRUE_REWARD: tl.constexpr, GRAD_PRED_REWARD: tl.constexpr,
    SKIP_KL: tl.constexpr, SKIP_RECO: tl.constexpr, SKIP_REWARD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    IMAGE_BLOCK: tl.constexpr, REWARD_BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """Backward: the forward's tiles again, gradients only, times each term's factor; every
    program strides over the tiles of each term that has gradients to write."""
    first = tl.program_id(0).to(tl.int64)
    programs = tl.num_programs(0)
    if GRAD_PM or GRAD_PS or GRAD_QM or GRAD_QS:
        factor, work = term_factor(grad_kl_ptr, keep_ptr, 0, SKIP_KL, ACC)
        if work:
            for tile in range(first, kl_programs, programs):
                _kl_rows(pm_ptr, ps_ptr, qm_ptr, qs_ptr, s_pm_r, s_pm_d, s_ps_r, s_ps_d,
                         s_qm_r, s_qm_d, s_qs_r, s_qs_d, g_pm_ptr, g_ps_ptr, g_qm_ptr, g_qs_ptr,
                         n_rows, latent_dim, tile, scalar(free_nats, ACC),
                         scalar(kl_scale, ACC) * factor, GLOBAL_AVERAGE, DELAYED_CLAMP, GRAD_PM,
                         GRAD_PS, GRAD_QM, GRAD_QS, BLOCK_R, BLOCK_D, ACC)
    if GRAD_TRUE_REWARD or GRAD_PRED_REWARD:
        factor, work = term_factor(grad_reward_ptr, keep_ptr, 2, SKIP_REWARD, ACC)
        if work:
            for tile in range(first, reward_programs, programs):
                _distance_tile(true_reward_ptr, pred_reward_ptr, g_true_reward_ptr,
                               g_pred_reward_ptr, n_reward, tile * REWARD_BLOCK,
                               scalar(reward_scale, ACC) * factor, REWARD_KIND, REWARD_BLOCK,
                               GRAD_TRUE_REWARD, GRAD_PRED_REWARD, ACC)
    if GRAD_PIXELS or GRAD_RECO:
        factor, work = term_factor(grad_reco_ptr, keep_ptr, 1, SKIP_RECO, ACC)
        if work:
            for tile in range(first, image_programs, programs):
                _distance_tile(pixels_ptr, reco_ptr, g_pixels_ptr, g_reco_ptr, n_image,
                               tile * IMAGE_BLOCK, scalar(reco_scale, ACC) * factor,
                               RECO_KIND, IMAGE_BLOCK, GRAD_PIXELS, GRAD_RECO, ACC)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def tuning() -> tuple:
    """The module constants a plan is worked out from (the tests shrink them)."""
    return (IMAGE_TILE_BYTES, REWARD_BLOCK, LATENT_TILE, MAX_LATENT_BLOCK_D, NUM_WARPS,
            machinery.FINALIZE_BLOCK)


@dataclass(frozen=True)
class _Options:
    """The launchers' view of :class:`LossOptions` and the loss dtypes (see :func:`_encode`)."""

    lambdas: tuple[float, float, float]
    free_nats: float
    reco_kind: int
    reward_kind: int
    delayed_clamp: bool
    global_average: bool
    loss_dtypes: tuple[torch.dtype, torch.dtype, torch.dtype]

    @classmethod
    def decode(cls, floats: Sequence[float], ints: Sequence[int]) -> "_Options":
        return cls(tuple(floats[0:3]), floats[3], ints[0], ints[1], bool(ints[2]), bool(ints[3]),
                   tuple(code_dtype(c) for c in ints[4:7]))


def _encode(opts: LossOptions, shapes: LossShapes) -> tuple[list[float], list[int]]:
    floats = [opts.lambda_kl, opts.lambda_reco, opts.lambda_reward, opts.free_nats]
    ints = [DISTANCES.index(opts.reco_loss), DISTANCES.index(opts.reward_loss),
            int(opts.delayed_clamp), int(opts.global_average),
            *(dtype_code(d) for d in shapes.loss_dtypes)]
    return floats, ints


def _views_as_is(inputs: Sequence[torch.Tensor], rows: int, latent_dim: int) -> tuple[bool, ...]:
    """For each input, whether the kernels read it as it is (the latents as ``[rows, D]``
    views, the images flat in the layout they share, the rewards flat), or a copy."""
    def viewable(t):
        try:
            t.view(rows, latent_dim)
        except RuntimeError:
            return False
        return True

    pair = machinery.pair_as_is(inputs[4], inputs[5])
    return (*(viewable(t) for t in inputs[0:4]), pair, pair,
            *(t.is_contiguous() for t in inputs[6:8]))


def _copy_for_kernels(t: torch.Tensor, i: int, rows: int, latent_dim: int) -> torch.Tensor:
    """Input ``i`` copied into the layout the kernels read (see :func:`_views_as_is`)."""
    if INPUT_TERMS[i] == KL:
        return t.reshape(rows, latent_dim)
    return t.contiguous()


def _empty_grad(inputs: Sequence[Optional[torch.Tensor]], i: int) -> torch.Tensor:
    """An unwritten gradient of input ``i``: contiguous, except the images, which take the layout
    the kernels read them in (that of the pair when both are dense and share it)."""
    t = inputs[i]
    if INPUT_TERMS[i] == RECO:
        return machinery.empty_pair_grad(t, inputs[4], inputs[5])
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


#: The gradient flags of the two kernels, in input order.
GRAD_FLAGS = ("GRAD_PM", "GRAD_PS", "GRAD_QM", "GRAD_QS", "GRAD_PIXELS", "GRAD_RECO",
              "GRAD_TRUE_REWARD", "GRAD_PRED_REWARD")


class _Plan(machinery.TunedPlan):
    """Both kernels' launches for inputs of one signature (shapes, strides, dtypes, device) and
    the options ``(floats, ints)``: grid segments, tile sizes, strides, scalars and constexprs,
    worked out once; :meth:`forward` and :meth:`backward` then only allocate and launch.

    The latents are read as ``[rows, D]`` with their own strides, the images flat in the layout
    they share, the rewards flat: as they are where their layout allows (:func:`_views_as_is`),
    else copied at each call.
    """

    tunables = staticmethod(tuning)

    def __init__(self, inputs: Sequence[torch.Tensor], floats: Sequence[float],
                 ints: Sequence[int]):
        self.floats, self.ints = list(floats), list(ints)
        self.tuning = tuning()
        o = self.o = _Options.decode(floats, ints)
        prior_mean, pixels = inputs[0], inputs[4]
        D = prior_mean.shape[-1]
        R = prior_mean.numel() // D
        self.rows, self.latent_dim = R, D
        self.as_is = _views_as_is(inputs, R, D)
        self.copied = tuple(i for i, ok in enumerate(self.as_is) if not ok)
        self.latent_strides = tuple(s for t, ok in zip(inputs[0:4], self.as_is)
                                    for s in (t.view(R, D).stride() if ok else (D, 1)))
        image_numel = pixels.numel()
        self.device = prior_mean.device
        self.acc, acc = acc_dtype(*inputs)
        # each gradient in its input's layout where the kernels read that as it is
        self.grad_specs = [(t.shape, t.stride() if INPUT_TERMS[i] == RECO and ok
                            else contiguous_strides(t.shape), t.dtype)
                           for i, (t, ok) in enumerate(zip(inputs, self.as_is))]
        block_d = min(machinery.next_power_of_2(D), MAX_LATENT_BLOCK_D)
        block_r = max(1, LATENT_TILE // block_d)
        image_block = IMAGE_TILE_BYTES // pixels.element_size()
        kl_programs = machinery.cdiv(R, block_r)
        reward_programs = machinery.cdiv(R, REWARD_BLOCK)
        image_programs = machinery.cdiv(image_numel, image_block)
        self.programs = kl_programs + reward_programs + image_programs
        counts = (R * D, image_numel, R) if o.global_average else (R, R, R)
        scales = tuple(lam / c for lam, c in zip(o.lambdas, counts))
        self.sizes = (R, D, image_numel, R, kl_programs, reward_programs)
        self.fwd_scalars = (o.free_nats, *(float(c) for c in counts), *scales)
        self.bwd_sizes = (*self.sizes, image_programs)
        self.bwd_scalars = (o.free_nats, *scales)
        self.meta = dict(GLOBAL_AVERAGE=o.global_average, DELAYED_CLAMP=o.delayed_clamp,
                         RECO_KIND=o.reco_kind, REWARD_KIND=o.reward_kind, BLOCK_R=block_r,
                         BLOCK_D=block_d, IMAGE_BLOCK=image_block, REWARD_BLOCK=REWARD_BLOCK,
                         ACC=acc, num_warps=NUM_WARPS)
        kl_end = kl_programs
        reward_end = kl_end + reward_programs
        self.finalize = machinery.Finalize(
            ((0, kl_end), (reward_end, self.programs), (kl_end, reward_end)), o.lambdas, acc,
            clamp=KL if o.delayed_clamp else NO_CLAMP, clamp_value=o.free_nats)
        self.backward_programs = min(self.programs, backward_programs(self.device))
        self._launches: dict[tuple, machinery.Launch] = {}

    def _views(self, inputs: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """The inputs as the kernels read them: themselves, or copies where
        :func:`_views_as_is` says so."""
        if not self.copied:
            return inputs
        views = list(inputs)
        for i in self.copied:
            views[i] = _copy_for_kernels(views[i], i, self.rows, self.latent_dim)
        return views

    def _launch(self, name: str, programs: int, flags: tuple[bool, ...],
                extra: tuple = ()) -> machinery.Launch:
        key = (name, flags, extra)
        launch = self._launches.get(key)
        if launch is None:
            meta = dict(self.meta, **dict(zip(GRAD_FLAGS, flags)))
            meta.update(zip(("SKIP_KL", "SKIP_RECO", "SKIP_REWARD"), extra))
            launch = self._launches[key] = machinery.Launch(_MODULE, name, programs, meta)
        return launch

    def forward(self, inputs: Sequence[torch.Tensor], needs: Sequence[bool]) -> tuple:
        """``((loss_kl, loss_reco, loss_reward), keep, grads)``: one gradient per input, made for
        a ``grad_output`` of 1, None where ``needs`` asks for none."""
        (out_kl, out_reco, out_reward), partials, keep, grads = self.empty_forward(
            self.programs, needs)
        pm, ps, qm, qs, pixels, reco, true_reward, pred_reward = self._views(inputs)
        g = [keep if t is None else t for t in grads]
        self._launch("_dreamer_loss_fwd_kernel", self.programs, tuple(needs))(
            pm, ps, qm, qs, *self.latent_strides, g[0], g[1], g[2], g[3], pixels, reco, g[4],
            g[5], true_reward, pred_reward, g[6], g[7], partials, *self.sizes,
            *self.fwd_scalars)
        self.finalize(partials, (out_kl, out_reco, out_reward), keep)
        return (out_kl, out_reco, out_reward), keep, grads

    def backward(self, inputs: Sequence[torch.Tensor], keep: torch.Tensor,
                 grad_outputs: Sequence[Optional[torch.Tensor]],
                 grads: Sequence[Optional[torch.Tensor]], skip_if_one: Sequence[bool]) -> None:
        """``factor × gradient`` into each non-None ``grads[i]``."""
        flags = tuple([t is not None for t in grads])
        if True not in flags:
            return
        pm, ps, qm, qs, pixels, reco, true_reward, pred_reward = self._views(inputs)
        g = [keep if t is None else t for t in grads]
        go = [keep if t is None else t for t in grad_outputs]
        self._launch("_dreamer_loss_bwd_kernel", self.backward_programs, flags,
                     tuple(skip_if_one))(
            pm, ps, qm, qs, *self.latent_strides, g[0], g[1], g[2], g[3], pixels, reco, g[4],
            g[5], true_reward, pred_reward, g[6], g[7], keep, go[0], go[1], go[2],
            *self.bwd_sizes, *self.bwd_scalars)


_MODULE = sys.modules[__name__]


def _forward(inputs: list[torch.Tensor], floats: list[float], ints: list[int],
             needs: list[bool]) -> list[torch.Tensor]:
    """Launch the forward on validated inputs (see :func:`machinery.planned_forward`)."""
    return machinery.planned_forward(_Plan(inputs, floats, ints), inputs, needs)


def _forward_fake(inputs, floats, ints, needs):
    """What :func:`_forward` returns (shapes, strides, dtypes), for tracing."""
    return machinery.empty_outputs(inputs, _Options.decode(floats, ints).loss_dtypes, needs,
                                   _empty_grad)


def _backward(inputs: list[torch.Tensor], floats: list[float], ints: list[int],
              keep: torch.Tensor, grad_outputs: list[Optional[torch.Tensor]],
              grads: list[Optional[torch.Tensor]], skip_if_one: list[bool]) -> None:
    """Launch the backward: ``factor × gradient`` into each non-None ``grads[i]``."""
    if any(t is not None for t in grads):
        _Plan(inputs, floats, ints).backward(inputs, keep, grad_outputs, grads, skip_if_one)


def _reference(inputs, opts: LossOptions, shapes: LossShapes):
    return reference.checked_dreamer_model_loss(*inputs, opts, len(shapes.batch_shape))


KERNELS = machinery.register(machinery.LossKernels(
    name="dreamer", terms=lambda ints, n_inputs: INPUT_TERMS, forward=_forward,
    forward_fake=_forward_fake, backward=_backward, empty_grad=_empty_grad, encode=_encode,
    reference=_reference, plan=_Plan, input_names=lambda ints, n_inputs: INPUT_NAMES,
))


def prepare(opts: LossOptions, shapes: LossShapes,
            inputs: Sequence[torch.Tensor]) -> machinery.FusedCall:
    """The fused loss prepared for inputs of this signature, in the current grad mode (see
    :func:`fused_dreamer_loss.dreamer_model_loss`); run it with :func:`run`."""
    return machinery.FusedCall(KERNELS, opts, shapes, inputs, torch.is_grad_enabled())


run = machinery.run
