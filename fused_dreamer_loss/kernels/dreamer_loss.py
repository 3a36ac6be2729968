"""Fused Triton kernels for the Dreamer world-model loss, their launchers and the autograd.Function.

One forward pass computes the three loss terms *and* the gradient of every input that needs one
(DESIGN §3): a training step reads ``pixels`` and ``reco_pixels`` once and writes
``grad(reco_pixels)`` once, three passes over the image tensors where eager torch makes eight or more.

Launches:
    forward   1 main kernel    programs split in three segments, in this order:
                               KL row tiles | reward tiles | image tiles;
                               each writes one partial sum to ``partials[pid]``
              1 finalize       one program reduces the partials of each segment in a fixed order
                               (bitwise deterministic, no atomics), applies the delayed clamp and
                               the lambdas, and writes the three losses
    backward  at most 1        scales the gradients made in forward by ``grad_output`` (and the
                               delayed-clamp mask), in place, deciding on the device: a grid of a
                               few programs per multiprocessor; when no scale changes they return
                               without touching memory

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
import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._validation import LossOptions, LossShapes

#: True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1`` was set before triton was
#: imported); then the kernels accept CPU tensors.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

DISTANCE_KIND = {"l2": 0, "l1": 1, "smooth_l1": 2}

#: Bytes of one image program's tile, per tensor (8192 float32 or 16384 bfloat16 elements);
#: chosen with NUM_WARPS by bench/sweep.py (bench/NOTES.md).
IMAGE_TILE_BYTES = 32768
#: Elements of one reward program's tile.
REWARD_BLOCK = 1024
#: Elements of one KL program's [rows, latents] tile.
LATENT_TILE = 2048
#: Widest latent chunk a KL program holds at once; wider latents loop over chunks.
MAX_LATENT_BLOCK_D = 1024
#: Elements of one tile in the in-place backward scale.
BACKWARD_BLOCK = 4096
#: Backward programs per multiprocessor; each loops over tiles (grid-stride), so that a backward
#: with nothing to rescale is a few hundred programs that return at once, not one per tile.
BACKWARD_PROGRAMS_PER_SM = 4
#: Backward programs under Triton's interpreter (no multiprocessors to count).
INTERPRETER_BACKWARD_PROGRAMS = 4
#: Partials one finalize step reads.
FINALIZE_BLOCK = 4096
NUM_WARPS = 16

# Layout of the small per-call state buffer: the delayed-clamp keep flag (1 or 0), then two slots of
# the scale already applied to each term's gradients (kl, reco, reward); backward call k reads slot
# k % 2 and writes slot (k + 1) % 2, so no program reads what another writes in the same launch.
STATE_KEEP = tl.constexpr(0)
STATE_SLOT = tl.constexpr(1)
STATE_TERMS = tl.constexpr(3)
STATE_SIZE = STATE_SLOT.value + 2 * STATE_TERMS.value


@triton.jit
def _scalar(value, ACC: tl.constexpr):
    """A runtime scalar argument (fp64 when compiled, a Python float when interpreted) in ACC."""
    return tl.full([], value, ACC)


@triton.jit
def _distance(d, KIND: tl.constexpr):
    """Distance of ``d = prediction − target`` and its derivative with respect to the prediction."""
    if KIND == 0:
        loss = d * d
        dloss = 2.0 * d
    elif KIND == 1:
        loss = tl.abs(d)
        # sign(d) with sign(0) = 0; `d * 0.0` also carries a NaN through.
        dloss = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, d * 0.0))
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
        tl.store(grad_pred_ptr + offs, (dloss * scale).to(grad_pred_ptr.dtype.element_ty), mask=mask)
    if GRAD_TARGET:
        tl.store(grad_target_ptr + offs, (-dloss * scale).to(grad_target_ptr.dtype.element_ty),
                 mask=mask)
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
        tl.store(g_pm_ptr + offs, (diff / ps2 * scale).to(g_pm_ptr.dtype.element_ty), mask=mask)
    if GRAD_QM:
        tl.store(g_qm_ptr + offs, (-diff / ps2 * scale).to(g_qm_ptr.dtype.element_ty), mask=mask)
    if GRAD_PS:
        g_ps = 1.0 / ps - (qs * qs + diff * diff) / (ps2 * ps)
        tl.store(g_ps_ptr + offs, (g_ps * scale).to(g_ps_ptr.dtype.element_ty), mask=mask)
    if GRAD_QS:
        g_qs = qs / ps2 - 1.0 / qs
        tl.store(g_qs_ptr + offs, (g_qs * scale).to(g_qs_ptr.dtype.element_ty), mask=mask)


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
    free_nats: "fp64", kl_scale: "fp64", reco_scale: "fp64", reward_scale: "fp64",
    GLOBAL_AVERAGE: tl.constexpr, DELAYED_CLAMP: tl.constexpr,
    RECO_KIND: tl.constexpr, REWARD_KIND: tl.constexpr,
    GRAD_PM: tl.constexpr, GRAD_PS: tl.constexpr, GRAD_QM: tl.constexpr, GRAD_QS: tl.constexpr,
    GRAD_PIXELS: tl.constexpr, GRAD_RECO: tl.constexpr,
    GRAD_TRUE_REWARD: tl.constexpr, GRAD_PRED_REWARD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    IMAGE_BLOCK: tl.constexpr, REWARD_BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """Main forward: one program per KL row tile, reward tile or image tile (in that order)."""
    pid = tl.program_id(0)
    if pid < kl_programs:
        partial = _kl_rows(pm_ptr, ps_ptr, qm_ptr, qs_ptr, s_pm_r, s_pm_d, s_ps_r, s_ps_d,
                           s_qm_r, s_qm_d, s_qs_r, s_qs_d, g_pm_ptr, g_ps_ptr, g_qm_ptr, g_qs_ptr,
                           n_rows, latent_dim, pid, _scalar(free_nats, ACC),
                           _scalar(kl_scale, ACC), GLOBAL_AVERAGE, DELAYED_CLAMP, GRAD_PM,
                           GRAD_PS, GRAD_QM, GRAD_QS, BLOCK_R, BLOCK_D, ACC)
        tl.store(partials_ptr + pid, partial)
    elif pid < kl_programs + reward_programs:
        start = (pid - kl_programs).to(tl.int64) * REWARD_BLOCK
        partial = _distance_tile(true_reward_ptr, pred_reward_ptr, g_true_reward_ptr,
                                 g_pred_reward_ptr, n_reward, start, _scalar(reward_scale, ACC),
                                 REWARD_KIND, REWARD_BLOCK, GRAD_TRUE_REWARD, GRAD_PRED_REWARD,
                                 ACC)
        tl.store(partials_ptr + pid, partial)
    else:
        start = (pid - kl_programs - reward_programs).to(tl.int64) * IMAGE_BLOCK
        partial = _distance_tile(pixels_ptr, reco_ptr, g_pixels_ptr, g_reco_ptr, n_image, start,
                                 _scalar(reco_scale, ACC), RECO_KIND, IMAGE_BLOCK, GRAD_PIXELS,
                                 GRAD_RECO, ACC)
        tl.store(partials_ptr + pid, partial)


@triton.jit
def _sum_range(ptr, lo, hi, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Sum of ``ptr[lo:hi]`` in a fixed order."""
    acc = tl.zeros([BLOCK], ACC)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(ptr + offs, mask=offs < hi, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _dreamer_loss_finalize_kernel(
    partials_ptr, kl_programs, reward_programs, total_programs,
    out_kl_ptr, out_reco_ptr, out_reward_ptr, state_ptr,
    free_nats: "fp64", lambda_kl: "fp64", lambda_reco: "fp64", lambda_reward: "fp64",
    kl_count: "fp64", reco_count: "fp64", reward_count: "fp64",
    DELAYED_CLAMP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """One program: reduce each segment's partials, average, clamp if delayed, apply lambdas."""
    kl = _sum_range(partials_ptr, 0, kl_programs, BLOCK, ACC) / _scalar(kl_count, ACC)
    reward = (_sum_range(partials_ptr, kl_programs, kl_programs + reward_programs, BLOCK, ACC)
              / _scalar(reward_count, ACC))
    reco = (_sum_range(partials_ptr, kl_programs + reward_programs, total_programs, BLOCK, ACC)
            / _scalar(reco_count, ACC))
    keep = _scalar(1.0, ACC)
    if DELAYED_CLAMP:
        fn = _scalar(free_nats, ACC)
        keep = tl.where(kl >= fn, 1.0, 0.0).to(ACC)
        kl = tl.where(kl < fn, fn, kl)
    tl.store(out_kl_ptr, (_scalar(lambda_kl, ACC) * kl).to(out_kl_ptr.dtype.element_ty))
    tl.store(out_reco_ptr, (_scalar(lambda_reco, ACC) * reco).to(out_reco_ptr.dtype.element_ty))
    tl.store(out_reward_ptr,
             (_scalar(lambda_reward, ACC) * reward).to(out_reward_ptr.dtype.element_ty))
    tl.store(state_ptr + STATE_KEEP, keep)
    # Both slots: the gradients carry scale 1; the second slot is written too, so that every
    # element of the state is defined (the forward's outputs are deterministic, bit for bit).
    for i in tl.static_range(2 * STATE_TERMS):
        tl.store(state_ptr + STATE_SLOT + i, _scalar(1.0, ACC))


@triton.jit
def _rescale_tile(grad_ptr, start, n, factor, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """``grad[start:start + BLOCK] *= factor``, in place."""
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(grad_ptr + offs, (grad * factor).to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _term_scale(grad_out_ptr, state_ptr, slot, TERM: tl.constexpr, ACTIVE: tl.constexpr,
                ACC: tl.constexpr):
    """The scale a backward call asks of one term, and the scale its gradients carry now."""
    applied = tl.load(state_ptr + STATE_SLOT + slot * STATE_TERMS + TERM)
    wanted = applied
    if ACTIVE:
        wanted = tl.load(grad_out_ptr).to(ACC)
        if TERM == 0:
            wanted = wanted * tl.load(state_ptr + STATE_KEEP)
    return wanted, applied


@triton.jit
def _dreamer_loss_bwd_kernel(
    g_pm_ptr, g_ps_ptr, g_qm_ptr, g_qs_ptr, g_pixels_ptr, g_reco_ptr,
    g_true_reward_ptr, g_pred_reward_ptr,
    grad_kl_ptr, grad_reco_ptr, grad_reward_ptr, state_ptr, slot,
    n_latent, n_image, n_reward,
    KL_ACTIVE: tl.constexpr, RECO_ACTIVE: tl.constexpr, REWARD_ACTIVE: tl.constexpr,
    GRAD_PM: tl.constexpr, GRAD_PS: tl.constexpr, GRAD_QM: tl.constexpr, GRAD_QS: tl.constexpr,
    GRAD_PIXELS: tl.constexpr, GRAD_RECO: tl.constexpr,
    GRAD_TRUE_REWARD: tl.constexpr, GRAD_PRED_REWARD: tl.constexpr,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """Rescale the forward's gradients from the scale they carry to ``grad_output × keep``.

    Flat over the contiguous gradients, tile by tile, each program taking every ``num_programs``-th
    tile of each term. A term that already carries the wanted scale (the usual
    ``grad_output == 1``) costs no memory traffic. Program 0 records the new scales in the other
    slot of the state buffer.
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    first = pid.to(tl.int64)
    kl_want, kl_have = _term_scale(grad_kl_ptr, state_ptr, slot, 0, KL_ACTIVE, ACC)
    reco_want, reco_have = _term_scale(grad_reco_ptr, state_ptr, slot, 1, RECO_ACTIVE, ACC)
    rew_want, rew_have = _term_scale(grad_reward_ptr, state_ptr, slot, 2, REWARD_ACTIVE, ACC)
    if pid == 0:
        next_slot = state_ptr + STATE_SLOT + (1 - slot) * STATE_TERMS
        tl.store(next_slot + 0, kl_want)
        tl.store(next_slot + 1, reco_want)
        tl.store(next_slot + 2, rew_want)
    if KL_ACTIVE:
        if kl_want != kl_have:
            factor = kl_want / kl_have
            for tile in range(first, tl.cdiv(n_latent, BLOCK), programs):
                start = tile * BLOCK
                if GRAD_PM:
                    _rescale_tile(g_pm_ptr, start, n_latent, factor, BLOCK, ACC)
                if GRAD_PS:
                    _rescale_tile(g_ps_ptr, start, n_latent, factor, BLOCK, ACC)
                if GRAD_QM:
                    _rescale_tile(g_qm_ptr, start, n_latent, factor, BLOCK, ACC)
                if GRAD_QS:
                    _rescale_tile(g_qs_ptr, start, n_latent, factor, BLOCK, ACC)
    if REWARD_ACTIVE:
        if rew_want != rew_have:
            factor = rew_want / rew_have
            for tile in range(first, tl.cdiv(n_reward, BLOCK), programs):
                start = tile * BLOCK
                if GRAD_TRUE_REWARD:
                    _rescale_tile(g_true_reward_ptr, start, n_reward, factor, BLOCK, ACC)
                if GRAD_PRED_REWARD:
                    _rescale_tile(g_pred_reward_ptr, start, n_reward, factor, BLOCK, ACC)
    if RECO_ACTIVE:
        if reco_want != reco_have:
            factor = reco_want / reco_have
            for tile in range(first, tl.cdiv(n_image, BLOCK), programs):
                start = tile * BLOCK
                if GRAD_PIXELS:
                    _rescale_tile(g_pixels_ptr, start, n_image, factor, BLOCK, ACC)
                if GRAD_RECO:
                    _rescale_tile(g_reco_ptr, start, n_image, factor, BLOCK, ACC)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _acc_dtype(*tensors: torch.Tensor) -> tuple[torch.dtype, tl.dtype]:
    """fp64 accumulation when any input is fp64, fp32 otherwise."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def _is_dense(t: torch.Tensor) -> bool:
    """True when ``t``'s elements fill a contiguous stretch of memory in some dim order."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _flat_images(pixels: torch.Tensor, reco: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two image tensors, readable as flat arrays in the same element order.

    Dense tensors that share a layout (contiguous, channels_last, any permutation) are used as they
    are: the image reduction is flat, so the order does not matter. Anything else is copied once.
    """
    if pixels.stride() == reco.stride() and _is_dense(pixels):
        return pixels, reco
    return pixels.contiguous(), reco.contiguous()


@dataclass(frozen=True)
class _Launch:
    """Grid segments and tile sizes of one forward call."""

    block_r: int
    block_d: int
    image_block: int
    kl_programs: int
    reward_programs: int
    image_programs: int

    @property
    def programs(self) -> int:
        return self.kl_programs + self.reward_programs + self.image_programs


def _plan(rows: int, latent_dim: int, image_numel: int, image_itemsize: int) -> _Launch:
    block_d = min(triton.next_power_of_2(latent_dim), MAX_LATENT_BLOCK_D)
    block_r = max(1, LATENT_TILE // block_d)
    image_block = IMAGE_TILE_BYTES // image_itemsize
    return _Launch(
        block_r=block_r,
        block_d=block_d,
        image_block=image_block,
        kl_programs=triton.cdiv(rows, block_r),
        reward_programs=triton.cdiv(rows, REWARD_BLOCK),
        image_programs=triton.cdiv(image_numel, image_block),
    )


@functools.lru_cache(maxsize=None)
def _backward_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_BACKWARD_PROGRAMS
    return BACKWARD_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _kernel_views(prior_mean, prior_std, posterior_mean, posterior_std, pixels, reco_pixels,
                  true_reward, pred_reward):
    """The inputs as the kernels read them: latents ``[rows, D]`` (strided), the images flat in one
    shared layout, the rewards flat and contiguous."""
    D = prior_mean.shape[-1]
    R = prior_mean.numel() // D
    latents = [t.reshape(R, D) for t in (prior_mean, prior_std, posterior_mean, posterior_std)]
    images = list(_flat_images(pixels, reco_pixels))
    rewards = [t.reshape(-1).contiguous() for t in (true_reward, pred_reward)]
    return latents, images, rewards


def _empty_outputs(latents, images, rewards, loss_dtypes, needs):
    """The forward's outputs, unwritten: ``[loss_kl, loss_reco, loss_reward, state, *grads]`` with
    a gradient for each input in ``needs`` only (latents and rewards contiguous, images in the
    layout of the flat image pair). Shared by the launcher and its fake implementation."""
    acc_torch, _ = _acc_dtype(*latents, *images, *rewards)
    device = latents[0].device
    losses = [torch.empty((), dtype=d, device=device) for d in loss_dtypes]
    state = torch.empty(STATE_SIZE, dtype=acc_torch, device=device)
    grads = ([torch.empty(t.shape, dtype=t.dtype, device=device) for t in latents]
             + [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
                for t in images]
             + [torch.empty(t.shape, dtype=t.dtype, device=device) for t in rewards])
    return [*losses, state, *(g for g, n in zip(grads, needs) if n)]


def _by_input(made: list[torch.Tensor], needs: list[bool]) -> list[torch.Tensor | None]:
    """The gradients the forward made, one per input: None where ``needs`` asked for none."""
    made_iter = iter(made)
    return [next(made_iter) if n else None for n in needs]


def _forward(prior_mean: torch.Tensor, prior_std: torch.Tensor, posterior_mean: torch.Tensor,
             posterior_std: torch.Tensor, pixels: torch.Tensor, reco_pixels: torch.Tensor,
             true_reward: torch.Tensor, pred_reward: torch.Tensor, lambda_kl: float,
             lambda_reco: float, lambda_reward: float, reco_loss: str, reward_loss: str,
             free_nats: float, delayed_clamp: bool, global_average: bool,
             kl_dtype: torch.dtype, reco_dtype: torch.dtype, reward_dtype: torch.dtype,
             needs: list[bool]) -> list[torch.Tensor]:
    """Launch the forward on validated inputs: ``[loss_kl, loss_reco, loss_reward, state,
    *grads]``, the gradients (of the inputs in ``needs``, in input order) already scaled as for
    ``grad_output == 1``. The arguments are :class:`LossOptions`' fields, flat, so that this is
    also the ``fused_dreamer_loss::forward`` custom op."""
    latents, images, rewards = _kernel_views(prior_mean, prior_std, posterior_mean, posterior_std,
                                             pixels, reco_pixels, true_reward, pred_reward)
    out_kl, out_reco, out_reward, state, *made = _empty_outputs(
        latents, images, rewards, (kl_dtype, reco_dtype, reward_dtype), needs)
    # Absent gradients get a harmless pointer: the kernels never touch it (constexpr flags).
    g_ptrs = [latents[0] if g is None else g for g in _by_input(made, needs)]

    R, D = latents[0].shape
    image_numel = images[0].numel()
    launch = _plan(R, D, image_numel, images[0].element_size())
    _, acc = _acc_dtype(state)  # the state buffer has the accumulation dtype
    kl_count = R * D if global_average else R
    reco_count = image_numel if global_average else R
    reward_count = R
    partials = torch.empty(launch.programs, dtype=state.dtype, device=state.device)
    strides = [s for t in latents for s in t.stride()]
    _dreamer_loss_fwd_kernel[(launch.programs,)](
        *latents, *strides, *g_ptrs[0:4],
        *images, *g_ptrs[4:6],
        *rewards, *g_ptrs[6:8],
        partials,
        R, D, image_numel, R, launch.kl_programs, launch.reward_programs,
        free_nats, lambda_kl / kl_count, lambda_reco / reco_count, lambda_reward / reward_count,
        GLOBAL_AVERAGE=global_average, DELAYED_CLAMP=delayed_clamp,
        RECO_KIND=DISTANCE_KIND[reco_loss], REWARD_KIND=DISTANCE_KIND[reward_loss],
        GRAD_PM=needs[0], GRAD_PS=needs[1], GRAD_QM=needs[2], GRAD_QS=needs[3],
        GRAD_PIXELS=needs[4], GRAD_RECO=needs[5],
        GRAD_TRUE_REWARD=needs[6], GRAD_PRED_REWARD=needs[7],
        BLOCK_R=launch.block_r, BLOCK_D=launch.block_d,
        IMAGE_BLOCK=launch.image_block, REWARD_BLOCK=REWARD_BLOCK, ACC=acc,
        num_warps=NUM_WARPS,
    )
    _dreamer_loss_finalize_kernel[(1,)](
        partials, launch.kl_programs, launch.reward_programs, launch.programs,
        out_kl, out_reco, out_reward, state,
        free_nats, lambda_kl, lambda_reco, lambda_reward,
        float(kl_count), float(reco_count), float(reward_count),
        DELAYED_CLAMP=delayed_clamp, BLOCK=FINALIZE_BLOCK, ACC=acc, num_warps=NUM_WARPS,
    )
    return [out_kl, out_reco, out_reward, state, *made]


def _forward_fake(prior_mean, prior_std, posterior_mean, posterior_std, pixels, reco_pixels,
                  true_reward, pred_reward, lambda_kl, lambda_reco, lambda_reward, reco_loss,
                  reward_loss, free_nats, delayed_clamp, global_average, kl_dtype, reco_dtype,
                  reward_dtype, needs):
    """What :func:`_forward` returns (shapes, strides, dtypes), for tracing."""
    views = _kernel_views(prior_mean, prior_std, posterior_mean, posterior_std, pixels,
                          reco_pixels, true_reward, pred_reward)
    return _empty_outputs(*views, (kl_dtype, reco_dtype, reward_dtype), needs)


def _backward_(state: torch.Tensor, g_pm: torch.Tensor | None, g_ps: torch.Tensor | None,
               g_qm: torch.Tensor | None, g_qs: torch.Tensor | None,
               g_pixels: torch.Tensor | None, g_reco: torch.Tensor | None,
               g_true_reward: torch.Tensor | None, g_pred_reward: torch.Tensor | None,
               grad_kl: torch.Tensor | None, grad_reco: torch.Tensor | None,
               grad_reward: torch.Tensor | None, slot: int) -> None:
    """Launch the backward: rescale the forward's gradients in place to ``grad_output`` (times the
    delayed-clamp keep flag), reading the applied scales from state slot ``slot`` and writing the
    new ones to the other. A term whose ``grad_*`` is None is left alone. Also the
    ``fused_dreamer_loss::backward_`` custom op."""
    grads = [g_pm, g_ps, g_qm, g_qs, g_pixels, g_reco, g_true_reward, g_pred_reward]
    has = [g is not None for g in grads]
    sizes = [next((g.numel() for g in group if g is not None), 0)
             for group in (grads[0:4], grads[4:6], grads[6:8])]
    active = [out is not None and n > 0 for out, n in zip((grad_kl, grad_reco, grad_reward), sizes)]
    tiles = max([triton.cdiv(n, BACKWARD_BLOCK) for n, on in zip(sizes, active) if on], default=0)
    if not tiles:
        return
    ptrs = [state if g is None else g for g in grads]
    outs = [state if g is None else g for g in (grad_kl, grad_reco, grad_reward)]
    _dreamer_loss_bwd_kernel[(min(tiles, _backward_programs(state.device)),)](
        *ptrs, *outs, state, slot, *sizes,
        KL_ACTIVE=active[0], RECO_ACTIVE=active[1], REWARD_ACTIVE=active[2],
        GRAD_PM=has[0], GRAD_PS=has[1], GRAD_QM=has[2], GRAD_QS=has[3],
        GRAD_PIXELS=has[4], GRAD_RECO=has[5],
        GRAD_TRUE_REWARD=has[6], GRAD_PRED_REWARD=has[7],
        BLOCK=BACKWARD_BLOCK, ACC=_acc_dtype(state)[1], num_warps=NUM_WARPS,
    )


# ---------------------------------------------------------------------------------------------
# Custom ops: how torch.compile sees the launchers
# ---------------------------------------------------------------------------------------------
# Dynamo cannot trace a Triton launch (nor Triton's interpreter), so under torch.compile the
# autograd.Function calls the launchers as torch.library custom ops: opaque to the tracer, with
# fake implementations for shapes, and the backward's in-place update declared as a mutation (which
# AOTAutograd functionalizes). In eager mode the Function calls the launchers directly and skips
# the dispatcher (about 20 µs of host time per call, measured on this project's CPU VM).

forward_op = torch.library.custom_op("fused_dreamer_loss::forward", _forward, mutates_args=())
forward_op.register_fake(_forward_fake)
backward_op = torch.library.custom_op(
    "fused_dreamer_loss::backward_", _backward_,
    mutates_args=("state", "g_pm", "g_ps", "g_qm", "g_qs", "g_pixels", "g_reco",
                  "g_true_reward", "g_pred_reward"))
backward_op.register_fake(lambda *args: None)


def _launchers():
    """The custom ops while torch.compile traces, the plain launchers otherwise."""
    if torch.compiler.is_compiling():
        return forward_op, backward_op
    return _forward, _backward_


class FusedDreamerLossFunction(torch.autograd.Function):
    """Autograd over the fused kernels.

    ``forward`` computes the three losses and, in the same pass, ``d loss / d input`` for every
    input in ``ctx.needs_input_grad``, as if ``grad_output`` were 1. ``backward`` rescales those
    gradients in place on the device (no work when the scale is already right, no host sync) and
    returns them. Backward may run more than once (``retain_graph=True``): each call rescales from
    the scale the previous one left. The one case this cannot undo is a call with a ``grad_output``
    of exactly 0 followed by one with a non-zero ``grad_output``: that gives non-finite gradients
    (NaN or inf), never a silently wrong finite number. Double backward (``create_graph=True``) is
    not supported.

    Under ``torch.compile`` the same launchers run as the custom ops ``fused_dreamer_loss::forward``
    and ``fused_dreamer_loss::backward_``, so a compiled function traces without graph breaks.
    """

    @staticmethod
    def forward(ctx, prior_mean, prior_std, posterior_mean, posterior_std, pixels, reco_pixels,
                true_reward, pred_reward, shapes: LossShapes, opts: LossOptions,
                grad_enabled: bool):
        ctx.set_materialize_grads(False)
        # Under torch.no_grad() autograd still reports needs_input_grad for inputs that require
        # grad; the caller's grad mode says whether a backward can follow at all.
        needs = list(ctx.needs_input_grad[:8]) if grad_enabled else [False] * 8
        forward, _ = _launchers()
        out_kl, out_reco, out_reward, state, *made = forward(
            prior_mean, prior_std, posterior_mean, posterior_std, pixels, reco_pixels,
            true_reward, pred_reward, opts.lambda_kl, opts.lambda_reco, opts.lambda_reward,
            opts.reco_loss, opts.reward_loss, opts.free_nats, opts.delayed_clamp,
            opts.global_average, *shapes.loss_dtypes, needs)
        if any(needs):
            ctx.save_for_backward(state, *_by_input(made, needs))
            ctx.input_shapes = [t.shape for t in (prior_mean, prior_std, posterior_mean,
                                                  posterior_std, true_reward, pred_reward)]
            ctx.backward_calls = 0
        return out_kl, out_reco, out_reward

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl, grad_reco, grad_reward):
        state, *grads = ctx.saved_tensors
        _, backward = _launchers()
        backward(state, *grads, grad_kl, grad_reco, grad_reward, ctx.backward_calls % 2)
        ctx.backward_calls += 1
        g_pm, g_ps, g_qm, g_qs, g_x, g_y, g_tr, g_pr = grads
        shapes = ctx.input_shapes
        latent_out = [g.view(s) if (g is not None and grad_kl is not None) else None
                      for g, s in zip((g_pm, g_ps, g_qm, g_qs), shapes[0:4])]
        image_out = [g if grad_reco is not None else None for g in (g_x, g_y)]
        reward_out = [g.view(s) if (g is not None and grad_reward is not None) else None
                      for g, s in zip((g_tr, g_pr), shapes[4:6])]
        return (*latent_out, *image_out, *reward_out, None, None, None)


def fused_dreamer_model_loss(prior_mean, prior_std, posterior_mean, posterior_std, pixels,
                             reco_pixels, true_reward, pred_reward, shapes: LossShapes,
                             opts: LossOptions):
    """Run the fused kernels on validated inputs (see :func:`fused_dreamer_loss.dreamer_model_loss`)."""
    return FusedDreamerLossFunction.apply(prior_mean, prior_std, posterior_mean, posterior_std,
                                          pixels, reco_pixels, true_reward, pred_reward, shapes,
                                          opts, torch.is_grad_enabled())
