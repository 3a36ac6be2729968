"""Fused Triton kernels for the DreamerV3 world-model loss and their launchers.

The terms of :mod:`fused_dreamer_loss.world_model_v3.reference`, in its order, with their gradients, in one main
launch; the finalize, the autograd.Function and the custom ops are the shared ones of
:mod:`fused_dreamer_loss.kernels.machinery`.

Launches:
    forward   1 main kernel    programs split in segments, in this order:
                               KL row tiles | reward row tiles | continue tiles | image tiles of
                               head 0 | head 1 | ...; each writes one partial sum (divided by its
                               term's count) and the tile's gradients for ``grad_output`` 1
              1 finalize       the shared one: each loss is ``multiplier × Σ partials`` of its
                               segments, in a fixed order
    backward  at most 1        the same tiles, striding; per term the factor ``grad_output`` read on
                               the device; the first backward leaves the forward's gradients as
                               they are where it is 1

The math per categorical (``s = softmax(l)``, q posterior, p prior; DESIGN-V3 §3), with
``G = ∂L/∂probs`` the softmax Jacobian gives ``∂L/∂l_j = s_j (G_j − Σ_k s_k G_k)``:

    separate  q, p = (1 − u) s + u/K (log-softmax when u = 0)    kl_row = Σ_{S,K} q (log q − log p)
              dyn → prior:      G = −(1 − u) q / p        (u = 0: ∂/∂l = s_p − q, no division)
              rep → posterior:  G = (1 − u)(log q − log p)
              both × 1[kl_row ≥ free] (when free ≠ 0) × λ / rows
    balanced  q, p = max(s, 1e-8)                               kl_cat = Σ_K q (log q − log p)
              prior (α):        G = −q / p · 1[s_p ≥ 1e-8]
              posterior (1−α):  G = (log q − log p + 1) · 1[s_q ≥ 1e-8]
              both × 1[kl_cat ≥ free] × λ / (rows · S)

    two-hot   lse(l) − (w_lo l_lo + w_hi l_hi)                  ∂/∂l = softmax(l) − two_hot
              (lse shifted by the row's max, or by 0 where that max is ±inf, as torch's)
    symlog    (symlog r − symlog r̂)²                           ∂/∂r̂ = −2 d / (1 + |r̂|)
    continue  (1 − c) l − min(l, 0) + log1p(e^{−|l|})           ∂/∂l = sigmoid(l) − c
              (torch's (1 − c) l − log sigmoid(l): its inf and NaN at infinite logits)
    image     e = T(x) − T'(y), e² or |e|                       ∂/∂y = −2e T'(y)' or −sign(e) T'(y)'
"""

# No `from __future__ import annotations`: Triton reads the "fp64" annotations as written.
import functools
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from . import reference
from .validation import (KL_MODES, RECO_LOSSES, SYMLOG_BOTH, SYMLOG_NONE, SYMLOG_TARGET,
                              TWO_HOT_SPACES, V3Options, V3Shapes)
from ..core import machinery
from ..core.machinery import (acc_dtype, backward_programs, code_dtype, contiguous_strides,
                              dtype_code, scalar, store, term_factor, two_hot_weights)
from ..core.machinery import log1p as _log1p
from ..core.machinery import symlog as _symlog

__all__ = ["KERNELS", "Prepared", "kernel_inputs", "reward_support"]

#: Elements of one KL program's [rows, S, K] tile (at least one row).
KL_TILE = 2048
#: Elements of one reward program's [rows, R] tile (at least one row): 1024 keeps the two-hot
#: segment's registers near the image segment's, which shares the kernel.
REWARD_TILE = 1024
#: Rows of one continue program, and of one symlog-reward program.
ROW_BLOCK = 1024
#: Bytes of one image program's tile, per prediction tensor.
IMAGE_TILE_BYTES = 32768
#: Warps per program. Compiled for sm_90 (ptxas, on a CPU) at the v3 preset: 16 warps spill no
#: register (forward 87 registers in bf16, 57 in fp32); 8 warps spilled 1.2 KB in bf16.
NUM_WARPS = 16
#: Balanced mode floors each probability at this value before its log (torchrl's clamp). A
#: constexpr: compiled Triton reads no other global.
PROB_FLOOR = tl.constexpr(reference.BALANCED_PROB_FLOOR)

#: Per-head transform codes, two bits per head in the kernels' ``HEAD_MODES``.
HEAD_MODE = {SYMLOG_NONE: 0, SYMLOG_BOTH: 1, SYMLOG_TARGET: 2}

#: Positions in the inputs list of the fused loss.
POSTERIOR, PRIOR, TRUE_REWARD, REWARD_PRED, CONTINUE_PRED, TERMINATED, BINS = range(7)
FIRST_HEAD = 7


# ---------------------------------------------------------------------------------------------
# Segments: each computes one tile's sum and stores its gradients times ``scale``
# ---------------------------------------------------------------------------------------------


@triton.jit
def _softmax(logits, mask):
    """Softmax over the last axis of a [rows, S, K] tile whose padding classes hold −inf:
    ``(s, log_s)``, both 0 where ``mask`` is false."""
    m = tl.max(logits, axis=2, keep_dims=True)
    shifted = logits - m
    e = tl.exp(shifted)
    z = tl.sum(e, axis=2, keep_dims=True)
    return e / z, tl.where(mask, shifted - tl.log(z), 0.0)


@triton.jit
def _softmax_backward(s, g, mask):
    """``s_j (g_j − Σ_k s_k g_k)`` over the last axis."""
    g = tl.where(mask, g, 0.0)
    return s * (g - tl.sum(s * g, axis=2, keep_dims=True))


@triton.jit
def _kl_tile(q_ptr, p_ptr, g_q_ptr, g_p_ptr, s_q_r, s_q_s, s_q_k, s_p_r, s_p_s, s_p_k,
             n_rows, n_cat, n_cls, tile, unimix, free, scale_q, scale_p,
             BALANCED: tl.constexpr, UNIMIX: tl.constexpr, GRAD_Q: tl.constexpr,
             GRAD_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
             BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """The KL of BLOCK_R rows of S categoricals: the sum of the clamped KL (per row, separate; per
    categorical, balanced), and the gradients of the posterior (q) and prior (p) logits."""
    rows = tile * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)[:, None, None]
    cats = tl.arange(0, BLOCK_S)[None, :, None]
    cls = tl.arange(0, BLOCK_K)[None, None, :]
    row_ok = rows < n_rows
    cat_ok = row_ok & (cats < n_cat)
    mask = cat_ok & (cls < n_cls)
    lq = tl.load(q_ptr + rows * s_q_r + cats * s_q_s + cls * s_q_k, mask=mask, other=0.0).to(ACC)
    lp = tl.load(p_ptr + rows * s_p_r + cats * s_p_s + cls * s_p_k, mask=mask, other=0.0).to(ACC)
    cls_ok = cls < n_cls  # padding classes get −inf; padding rows and categoricals stay finite
    sq, log_sq = _softmax(tl.where(cls_ok, lq, float("-inf")), mask)
    sp, log_sp = _softmax(tl.where(cls_ok, lp, float("-inf")), mask)
    if BALANCED:
        q = tl.where(sq < PROB_FLOOR, PROB_FLOOR, sq)  # torch's clamp: NaN stays NaN
        p = tl.where(sp < PROB_FLOOR, PROB_FLOOR, sp)
        log_q = tl.where(mask, tl.log(q), 0.0)
        log_p = tl.where(mask, tl.log(p), 0.0)
    elif UNIMIX:
        q = (1.0 - unimix) * sq + unimix / n_cls
        p = (1.0 - unimix) * sp + unimix / n_cls
        log_q = tl.where(mask, tl.log(q), 0.0)
        log_p = tl.where(mask, tl.log(p), 0.0)
    else:
        q = sq
        p = sp
        log_q = log_sq
        log_p = log_sp
    diff = log_q - log_p
    kl_cat = tl.sum(tl.where(mask, q * diff, 0.0), axis=2, keep_dims=True)  # [R, S, 1]
    if BALANCED:
        keep = kl_cat >= free
        kept = tl.where(cat_ok, tl.where(kl_cat < free, free, kl_cat), 0.0)
        total = tl.sum(tl.sum(tl.sum(kept, axis=2), axis=1), axis=0)
    else:
        kl_row = tl.sum(kl_cat, axis=1, keep_dims=True)  # [R, 1, 1]
        keep = tl.full([BLOCK_R, 1, 1], 1, tl.int1)  # no clamp when free is 0, as torchrl
        if free != 0:
            keep = kl_row >= free
            kl_row = tl.where(kl_row < free, free, kl_row)
        total = tl.sum(tl.sum(tl.sum(tl.where(row_ok, kl_row, 0.0), axis=2), axis=1), axis=0)
    offs = rows * (n_cat * n_cls) + cats * n_cls + cls
    if GRAD_P:
        if BALANCED:
            g = _softmax_backward(sp, tl.where(sp >= PROB_FLOOR, -q / p, 0.0), mask)
        elif UNIMIX:
            g = _softmax_backward(sp, -(1.0 - unimix) * q / p, mask)
        else:
            g = sp - q
        store(g_p_ptr + offs, g * tl.where(keep, scale_p, 0.0), mask)
    if GRAD_Q:
        if BALANCED:
            g = _softmax_backward(sq, tl.where(sq >= PROB_FLOOR, diff + 1.0, 0.0), mask)
        else:
            g = _softmax_backward(sq, (1.0 - unimix) * diff, mask)
        store(g_q_ptr + offs, g * tl.where(keep, scale_q, 0.0), mask)
    return total


@triton.jit
def _two_hot_tile(true_ptr, logits_ptr, bins_ptr, g_logits_ptr, s_l_r, s_l_k, n_rows, n_bins,
                  tile, scale, SYMLOG_SPACE: tl.constexpr, GRAD_LOGITS: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """Two-hot cross-entropy of BLOCK_R reward rows over the bins (the last axis)."""
    rows = tile * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cls = tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    cls_ok = cls < n_bins
    mask = row_ok[:, None] & cls_ok[None, :]
    logits = tl.load(logits_ptr + rows[:, None] * s_l_r + cls[None, :] * s_l_k, mask=mask,
                     other=0.0).to(ACC)
    logits = tl.where(cls_ok[None, :], logits, float("-inf"))
    x = tl.load(true_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    bins = tl.load(bins_ptr + cls, mask=cls_ok, other=0.0).to(ACC)
    if SYMLOG_SPACE:
        x, _ = _symlog(x)
        bins, _ = _symlog(bins)
    is_lower, is_upper, w_lower, w_upper = two_hot_weights(x, bins, cls, n_bins)
    m = tl.max(logits, axis=1)
    m = tl.where(tl.abs(m) == float("inf"), 0.0, m)  # torch's logsumexp: inf stays inf
    e = tl.exp(logits - m[:, None])
    z = tl.sum(e, axis=1)
    at_lower = tl.sum(tl.where(is_lower, logits, 0.0), axis=1)
    at_upper = tl.sum(tl.where(is_upper, logits, 0.0), axis=1)
    loss = (m + tl.log(z)) - (w_lower * at_lower + w_upper * at_upper)
    if GRAD_LOGITS:
        target = tl.where(is_lower, w_lower[:, None], 0.0) + tl.where(is_upper, w_upper[:, None],
                                                                        0.0)
        g = e / z[:, None] - target
        store(g_logits_ptr + rows[:, None] * n_bins + cls[None, :], g * scale, mask)
    return tl.sum(tl.where(row_ok, loss, 0.0), axis=0)


@triton.jit
def _symlog_reward_tile(true_ptr, pred_ptr, g_true_ptr, g_pred_ptr, n_rows, tile, scale,
                        GRAD_TRUE: tl.constexpr, GRAD_PRED: tl.constexpr, BLOCK: tl.constexpr,
                        ACC: tl.constexpr):
    """(symlog r − symlog r̂)² of BLOCK rows."""
    offs = tile * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n_rows
    r, dr = _symlog(tl.load(true_ptr + offs, mask=mask, other=0.0).to(ACC))
    r_hat, dr_hat = _symlog(tl.load(pred_ptr + offs, mask=mask, other=0.0).to(ACC))
    d = r - r_hat
    if GRAD_PRED:
        store(g_pred_ptr + offs, -2.0 * d * dr_hat * scale, mask)
    if GRAD_TRUE:
        store(g_true_ptr + offs, 2.0 * d * dr * scale, mask)
    return tl.sum(tl.where(mask, d * d, 0.0), axis=0)


@triton.jit
def _continue_tile(logit_ptr, term_ptr, g_logit_ptr, g_term_ptr, n_rows, tile, target_scale,
                   scale, GRAD_LOGIT: tl.constexpr, GRAD_TERM: tl.constexpr, BLOCK: tl.constexpr,
                   ACC: tl.constexpr):
    """Binary cross-entropy with logits of BLOCK rows against c = (1 − terminated)·target_scale."""
    offs = tile * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n_rows
    logit = tl.load(logit_ptr + offs, mask=mask, other=0.0).to(ACC)
    c = (1.0 - tl.load(term_ptr + offs, mask=mask, other=0).to(ACC)) * target_scale
    loss = (1.0 - c) * logit - tl.minimum(logit, 0.0) + _log1p(tl.exp(-tl.abs(logit)))
    if GRAD_LOGIT:
        store(g_logit_ptr + offs, (tl.sigmoid(logit) - c) * scale, mask)
    if GRAD_TERM:
        store(g_term_ptr + offs, logit * target_scale * scale, mask)
    return tl.sum(tl.where(mask, loss, 0.0), axis=0)


@triton.jit
def _image_tile(x_ptr, y_ptr, g_x_ptr, g_y_ptr, n, tile, pixels_scale, pixels_offset, scale,
                MODE: tl.constexpr, INT_TARGET: tl.constexpr, L1: tl.constexpr,
                GRAD_X: tl.constexpr, GRAD_Y: tl.constexpr, BLOCK: tl.constexpr,
                ACC: tl.constexpr):
    """One head's distance over one flat tile: e = T(x) − T'(y), e² or |e|. MODE 0: no transform
    (integer targets x·pixels_scale + pixels_offset), 1: symlog of both, 2: symlog of x only."""
    offs = tile * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
    dx = 1.0
    dy = 1.0
    if MODE == 0:
        if INT_TARGET:
            x = x * pixels_scale + pixels_offset
    else:
        x, dx = _symlog(x)
        if MODE == 1:
            y, dy = _symlog(y)
    e = tl.where(mask, x - y, 0.0)
    if L1:
        loss = tl.abs(e)
        de = tl.where(e > 0, 1.0, tl.where(e < 0, -1.0, 0.0))  # torch's sign: 0 at NaN
    else:
        loss = e * e
        de = 2.0 * e
    if GRAD_Y:
        store(g_y_ptr + offs, -de * dy * scale, mask)
    if GRAD_X:
        store(g_x_ptr + offs, de * dx * scale, mask)
    return tl.sum(loss, axis=0)


# ---------------------------------------------------------------------------------------------
# The kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _head(xs, ys, g_xs, g_ys, numels, h: tl.constexpr, tile, pixels_scale, pixels_offset, scale,
          HEAD_MODES: tl.constexpr, INT_TARGETS: tl.constexpr, GRAD_XS: tl.constexpr,
          GRAD_YS: tl.constexpr, L1: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    return _image_tile(xs[h], ys[h], g_xs[h], g_ys[h], numels[h], tile, pixels_scale,
                       pixels_offset, scale, (HEAD_MODES >> (2 * h)) & 3, (INT_TARGETS >> h) & 1,
                       L1, (GRAD_XS >> h) & 1, (GRAD_YS >> h) & 1, BLOCK, ACC)


@triton.jit
def _v3_fwd_kernel(
    q_ptr, p_ptr, s_q_r, s_q_s, s_q_k, s_p_r, s_p_s, s_p_k, g_q_ptr, g_p_ptr,
    true_ptr, reward_ptr, bins_ptr, s_rw_r, s_rw_k, g_true_ptr, g_reward_ptr,
    cont_ptr, term_ptr, g_cont_ptr, g_term_ptr,
    xs, ys, g_xs, g_ys, numels, head_counts, head_starts,
    partials_ptr, n_rows, n_cat, n_cls, n_bins, kl_programs, reward_programs, cont_programs,
    unimix: "fp64", free: "fp64", target_scale: "fp64", pixels_scale: "fp64",
    pixels_offset: "fp64", kl_count: "fp64", rows_count: "fp64",
    scale_q: "fp64", scale_p: "fp64", scale_reward: "fp64", scale_cont: "fp64", lambda_reco: "fp64",
    BALANCED: tl.constexpr, UNIMIX: tl.constexpr, TWO_HOT: tl.constexpr,
    SYMLOG_SPACE: tl.constexpr, N_HEADS: tl.constexpr,
    HEAD_MODES: tl.constexpr, INT_TARGETS: tl.constexpr, L1: tl.constexpr,
    GRAD_Q: tl.constexpr, GRAD_P: tl.constexpr, GRAD_TRUE: tl.constexpr,
    GRAD_REWARD: tl.constexpr, GRAD_CONT: tl.constexpr, GRAD_TERM: tl.constexpr,
    GRAD_XS: tl.constexpr, GRAD_YS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
    REWARD_ROWS: tl.constexpr, BLOCK_BINS: tl.constexpr, ROW_BLOCK: tl.constexpr,
    IMAGE_BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """Main forward: one program per KL, reward, continue or image tile (in that order); each
    stores its partial sum over its term's count, and its gradients."""
    pid = tl.program_id(0)
    if pid < kl_programs:
        partial = _kl_tile(q_ptr, p_ptr, g_q_ptr, g_p_ptr, s_q_r, s_q_s, s_q_k, s_p_r, s_p_s,
                           s_p_k, n_rows, n_cat, n_cls, pid.to(tl.int64), scalar(unimix, ACC),
                           scalar(free, ACC), scalar(scale_q, ACC), scalar(scale_p, ACC),
                           BALANCED, UNIMIX, GRAD_Q, GRAD_P, BLOCK_R, BLOCK_S, BLOCK_K, ACC)
        tl.store(partials_ptr + pid, partial / scalar(kl_count, ACC))
    elif pid < kl_programs + reward_programs:
        tile = (pid - kl_programs).to(tl.int64)
        if TWO_HOT:
            partial = _two_hot_tile(true_ptr, reward_ptr, bins_ptr, g_reward_ptr, s_rw_r, s_rw_k,
                                    n_rows, n_bins, tile, scalar(scale_reward, ACC),
                                    SYMLOG_SPACE, GRAD_REWARD, REWARD_ROWS, BLOCK_BINS, ACC)
        else:
            partial = _symlog_reward_tile(true_ptr, reward_ptr, g_true_ptr, g_reward_ptr, n_rows,
                                          tile, scalar(scale_reward, ACC), GRAD_TRUE,
                                          GRAD_REWARD, ROW_BLOCK, ACC)
        tl.store(partials_ptr + pid, partial / scalar(rows_count, ACC))
    elif pid < kl_programs + reward_programs + cont_programs:
        partial = _continue_tile(cont_ptr, term_ptr, g_cont_ptr, g_term_ptr, n_rows,
                                 (pid - kl_programs - reward_programs).to(tl.int64),
                                 scalar(target_scale, ACC), scalar(scale_cont, ACC), GRAD_CONT,
                                 GRAD_TERM, ROW_BLOCK, ACC)
        tl.store(partials_ptr + pid, partial / scalar(rows_count, ACC))
    else:
        for h in tl.static_range(N_HEADS):
            if pid >= head_starts[h]:
                if pid < head_starts[h + 1]:
                    count = scalar(head_counts[h], ACC)
                    partial = _head(xs, ys, g_xs, g_ys, numels, h,
                                    (pid - head_starts[h]).to(tl.int64),
                                    scalar(pixels_scale, ACC), scalar(pixels_offset, ACC),
                                    scalar(lambda_reco, ACC) / count, HEAD_MODES, INT_TARGETS,
                                    GRAD_XS, GRAD_YS, L1, IMAGE_BLOCK, ACC)
                    tl.store(partials_ptr + pid, partial / count)


@triton.jit
def _v3_bwd_kernel(
    q_ptr, p_ptr, s_q_r, s_q_s, s_q_k, s_p_r, s_p_s, s_p_k, g_q_ptr, g_p_ptr,
    true_ptr, reward_ptr, bins_ptr, s_rw_r, s_rw_k, g_true_ptr, g_reward_ptr,
    cont_ptr, term_ptr, g_cont_ptr, g_term_ptr,
    xs, ys, g_xs, g_ys, numels, head_counts, head_starts,
    keep_ptr, grad_outs,
    n_rows, n_cat, n_cls, n_bins, kl_programs, reward_programs, cont_programs,
    unimix: "fp64", free: "fp64", target_scale: "fp64", pixels_scale: "fp64",
    pixels_offset: "fp64",
    scale_q: "fp64", scale_p: "fp64", scale_reward: "fp64", scale_cont: "fp64", lambda_reco: "fp64",
    T_Q: tl.constexpr, T_P: tl.constexpr, T_REWARD: tl.constexpr, T_CONT: tl.constexpr,
    T_RECO: tl.constexpr, SKIP: tl.constexpr,
    BALANCED: tl.constexpr, UNIMIX: tl.constexpr, TWO_HOT: tl.constexpr,
    SYMLOG_SPACE: tl.constexpr, N_HEADS: tl.constexpr,
    HEAD_MODES: tl.constexpr, INT_TARGETS: tl.constexpr, L1: tl.constexpr,
    GRAD_Q: tl.constexpr, GRAD_P: tl.constexpr, GRAD_TRUE: tl.constexpr,
    GRAD_REWARD: tl.constexpr, GRAD_CONT: tl.constexpr, GRAD_TERM: tl.constexpr,
    GRAD_XS: tl.constexpr, GRAD_YS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
    REWARD_ROWS: tl.constexpr, BLOCK_BINS: tl.constexpr, ROW_BLOCK: tl.constexpr,
    IMAGE_BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """Backward: the forward's tiles again, gradients only, times each term's factor; every
    program strides over the tiles of each term with gradients to write. ``SKIP`` has one bit per
    output: skip that term's tiles when its factor is 1 (the buffers hold the forward's)."""
    first = tl.program_id(0).to(tl.int64)
    programs = tl.num_programs(0)
    if GRAD_Q or GRAD_P:
        f_q, work_q = term_factor(grad_outs[T_Q], keep_ptr, T_Q, (SKIP >> T_Q) & 1, ACC)
        f_p, work_p = term_factor(grad_outs[T_P], keep_ptr, T_P, (SKIP >> T_P) & 1, ACC)
        if work_q | work_p:
            for tile in range(first, kl_programs, programs):
                _kl_tile(q_ptr, p_ptr, g_q_ptr, g_p_ptr, s_q_r, s_q_s, s_q_k, s_p_r, s_p_s, s_p_k,
                         n_rows, n_cat, n_cls, tile, scalar(unimix, ACC), scalar(free, ACC),
                         scalar(scale_q, ACC) * f_q, scalar(scale_p, ACC) * f_p, BALANCED,
                         UNIMIX, GRAD_Q, GRAD_P, BLOCK_R, BLOCK_S, BLOCK_K, ACC)
    if GRAD_TRUE or GRAD_REWARD:
        factor, work = term_factor(grad_outs[T_REWARD], keep_ptr, T_REWARD,
                                   (SKIP >> T_REWARD) & 1, ACC)
        if work:
            for tile in range(first, reward_programs, programs):
                if TWO_HOT:
                    _two_hot_tile(true_ptr, reward_ptr, bins_ptr, g_reward_ptr, s_rw_r, s_rw_k,
                                  n_rows, n_bins, tile, scalar(scale_reward, ACC) * factor,
                                  SYMLOG_SPACE, GRAD_REWARD, REWARD_ROWS, BLOCK_BINS, ACC)
                else:
                    _symlog_reward_tile(true_ptr, reward_ptr, g_true_ptr, g_reward_ptr, n_rows,
                                        tile, scalar(scale_reward, ACC) * factor, GRAD_TRUE,
                                        GRAD_REWARD, ROW_BLOCK, ACC)
    if GRAD_CONT or GRAD_TERM:
        factor, work = term_factor(grad_outs[T_CONT], keep_ptr, T_CONT, (SKIP >> T_CONT) & 1, ACC)
        if work:
            for tile in range(first, cont_programs, programs):
                _continue_tile(cont_ptr, term_ptr, g_cont_ptr, g_term_ptr, n_rows, tile,
                               scalar(target_scale, ACC), scalar(scale_cont, ACC) * factor,
                               GRAD_CONT, GRAD_TERM, ROW_BLOCK, ACC)
    if GRAD_XS | GRAD_YS:
        factor, work = term_factor(grad_outs[T_RECO], keep_ptr, T_RECO, (SKIP >> T_RECO) & 1, ACC)
        if work:
            for h in tl.static_range(N_HEADS):
                if ((GRAD_XS >> h) & 1) | ((GRAD_YS >> h) & 1):
                    scale = scalar(lambda_reco, ACC) / scalar(head_counts[h], ACC) * factor
                    for tile in range(first, head_starts[h + 1] - head_starts[h], programs):
                        _head(xs, ys, g_xs, g_ys, numels, h, tile, scalar(pixels_scale, ACC),
                              scalar(pixels_offset, ACC), scale, HEAD_MODES, INT_TARGETS,
                              GRAD_XS, GRAD_YS, L1, IMAGE_BLOCK, ACC)


# ---------------------------------------------------------------------------------------------
# Host side: options, plan, launches
# ---------------------------------------------------------------------------------------------


def _encode(opts: V3Options, shapes: V3Shapes) -> tuple[list[float], list[int]]:
    floats = [opts.lambda_kl, opts.lambda_reco, opts.lambda_reward, opts.lambda_continue,
              opts.lambda_dynamic, opts.lambda_representation, opts.unimix,
              opts.continue_target_scale, opts.kl_alpha, opts.free_bits, opts.pixels_scale,
              opts.pixels_offset]
    kl_dtypes = [shapes.kl_dtype] * (1 if opts.kl_mode == "balanced" else 2)
    cont = [shapes.continue_dtype] if opts.has_continue else []
    dtypes = [*kl_dtypes, shapes.reward_dtype, *cont, shapes.reco_dtype]
    ints = [KL_MODES.index(opts.kl_mode) == 0, RECO_LOSSES.index(opts.reco_loss) == 1,
            opts.reward_two_hot, TWO_HOT_SPACES.index(opts.two_hot_space) == 1,
            opts.global_average, opts.has_continue, shapes.heads,
            *(HEAD_MODE[m] for m in shapes.head_symlog), *(dtype_code(d) for d in dtypes)]
    return floats, [int(i) for i in ints]


@dataclass(frozen=True)
class _Options:
    """The launchers' view of :class:`V3Options` and the loss dtypes (see :func:`_encode`)."""

    lambda_kl: float
    lambda_reco: float
    lambda_reward: float
    lambda_continue: float
    lambda_dynamic: float
    lambda_representation: float
    unimix: float
    continue_target_scale: float
    kl_alpha: float
    free_bits: float
    pixels_scale: float
    pixels_offset: float
    balanced: bool
    l1: bool
    two_hot: bool
    symlog_space: bool
    global_average: bool
    has_continue: bool
    head_modes: tuple[int, ...]
    loss_dtypes: tuple[torch.dtype, ...]

    @classmethod
    def decode(cls, floats: Sequence[float], ints: Sequence[int]) -> "_Options":
        heads = ints[6]
        flags = [bool(i) for i in ints[:6]]
        return cls(*floats[:12], *flags, tuple(ints[7:7 + heads]),
                   tuple(code_dtype(c) for c in ints[7 + heads:]))

    @property
    def kl_outputs(self) -> int:
        return 1 if self.balanced else 2


def _outputs(balanced: bool, has_continue: bool) -> list[tuple[str, str]]:
    """The kernels' losses in the order they write them, each with the segment of programs whose
    partial sums it adds: the one statement of that order (the names, the finalize's ranges and
    multipliers, and the backward's term indices are read from it)."""
    kl = ([("loss_model_kl", "kl")] if balanced else
          [("loss_model_dynamic", "kl"), ("loss_model_representation", "kl")])
    cont = [("loss_model_continue", "continue")] if has_continue else []
    return [*kl, ("loss_model_reward", "reward"), *cont, ("loss_model_reco", "reco")]


def _term_indices(o: _Options) -> dict[str, int]:
    """Each term's output index: the posterior's (q) and the prior's (p) KL term, the others
    (without a continue term, its index is the reward's: no program reads it)."""
    index = {name: i for i, (name, _) in enumerate(_outputs(o.balanced, o.has_continue))}
    q = index["loss_model_kl" if o.balanced else "loss_model_representation"]
    p = index["loss_model_kl" if o.balanced else "loss_model_dynamic"]
    reward = index["loss_model_reward"]
    return {"q": q, "p": p, "reward": reward,
            "continue": index.get("loss_model_continue", reward), "reco": index["loss_model_reco"]}


def _terms(ints: Sequence[int], n_inputs: int) -> tuple[int, ...]:
    o = _Options.decode([0.0] * 12, ints)
    t = _term_indices(o)
    fixed = (t["q"], t["p"], t["reward"], t["reward"], t["continue"], t["continue"], t["reward"])
    return fixed + (t["reco"],) * (n_inputs - FIRST_HEAD)


def tuning() -> tuple:
    """The module constants a plan is worked out from (the tests shrink them)."""
    return (KL_TILE, REWARD_TILE, ROW_BLOCK, IMAGE_TILE_BYTES, NUM_WARPS,
            machinery.FINALIZE_BLOCK)


def _empty_grad(inputs: Sequence[Optional[torch.Tensor]], i: int) -> torch.Tensor:
    """An unwritten gradient of input ``i``: contiguous, except a head's pair, which takes the
    layout the kernels read it in (that of the pair when both are dense and share it)."""
    t = inputs[i]
    if i >= FIRST_HEAD:
        h = FIRST_HEAD + (i - FIRST_HEAD) // 2 * 2
        return machinery.empty_pair_grad(t, inputs[h], inputs[h + 1])
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _viewable(t: torch.Tensor, *shape: int) -> bool:
    try:
        t.view(*shape)
    except RuntimeError:
        return False
    return True


class _Plan(machinery.TunedPlan):
    """Both kernels' launches for inputs of one signature (shapes, strides, dtypes, device) and
    the options ``(floats, ints)``: grid segments, tile sizes, strides, scalars and constexprs,
    worked out once; :meth:`forward` and :meth:`backward` then only allocate and launch.

    The logits are read as ``[rows, S, K]`` and two-hot reward logits as ``[rows, R]`` with
    their own strides, each head's pair flat in the layout it shares, the other row inputs flat:
    as they are where their layout allows, else copied at each call (:meth:`_views`).
    """

    tunables = staticmethod(tuning)

    def __init__(self, inputs: Sequence[Optional[torch.Tensor]], floats: Sequence[float],
                 ints: Sequence[int]):
        self.floats, self.ints = list(floats), list(ints)
        self.tuning = tuning()
        o = self.o = _Options.decode(floats, ints)
        q = inputs[POSTERIOR]
        n_cat, n_cls = q.shape[-2:]
        rows = q.numel() // (n_cat * n_cls)
        self.rows, self.n_cat, self.n_cls = rows, n_cat, n_cls
        reward = inputs[REWARD_PRED]
        width = reward.shape[-1]
        as_is = [_viewable(q, rows, n_cat, n_cls), _viewable(inputs[PRIOR], rows, n_cat, n_cls),
                 inputs[TRUE_REWARD].is_contiguous(),
                 _viewable(reward, rows, width) if o.two_hot else reward.is_contiguous(),
                 *(t is None or t.is_contiguous() for t in inputs[CONTINUE_PRED:BINS]),
                 True]  # the bins are contiguous (reward_support)
        heads = inputs[FIRST_HEAD:]
        for x, y in zip(heads[0::2], heads[1::2]):
            as_is += [machinery.pair_as_is(x, y)] * 2
        self.as_is = as_is
        self.copied = tuple(i for i, ok in enumerate(as_is) if not ok)
        logit_strides = [t.view(rows, n_cat, n_cls).stride() if ok else (n_cat * n_cls, n_cls, 1)
                         for t, ok in zip(inputs[:2], as_is)]
        reward_strides = (1, 1)  # a flat symlog reward
        if o.two_hot:
            reward_strides = reward.view(rows, width).stride() if as_is[REWARD_PRED] else (width, 1)
        n_bins = width if o.two_hot else 2
        self.device = q.device
        self.acc, acc = acc_dtype(*inputs)
        self.grad_specs = [None if t is None else
                           (t.shape, t.stride() if i >= FIRST_HEAD and as_is[i]
                            else contiguous_strides(t.shape), t.dtype)
                           for i, t in enumerate(inputs)]

        block_s, block_k = machinery.next_power_of_2(n_cat), machinery.next_power_of_2(n_cls)
        block_r = max(1, KL_TILE // (block_s * block_k))
        block_bins = machinery.next_power_of_2(n_bins)
        reward_rows = max(1, REWARD_TILE // block_bins)
        kl_programs = machinery.cdiv(rows, block_r)
        reward_programs = machinery.cdiv(rows, reward_rows if o.two_hot else ROW_BLOCK)
        cont_programs = machinery.cdiv(rows, ROW_BLOCK) if o.has_continue else 0
        numels = tuple(y.numel() for y in heads[1::2])
        image_block = IMAGE_TILE_BYTES // max(y.element_size() for y in heads[1::2])
        starts = [kl_programs + reward_programs + cont_programs]
        for n in numels:
            starts.append(starts[-1] + machinery.cdiv(n, image_block))
        self.programs = starts[-1]
        self.backward_programs = min(self.programs, backward_programs(self.device))
        counts = tuple(x.numel() if o.global_average else rows for x in heads[0::2])
        self.strides = (*logit_strides[0], *logit_strides[1])
        self.reward_strides = reward_strides
        self.head_sizes = (numels, counts, tuple(starts))
        self.sizes = (rows, n_cat, n_cls, n_bins, kl_programs, reward_programs, cont_programs)
        kl_count = rows * n_cat if o.balanced else rows
        self.counts = (float(kl_count), float(rows))
        if o.balanced:
            scale_q = o.lambda_kl * (1.0 - o.kl_alpha) / kl_count
            scale_p = o.lambda_kl * o.kl_alpha / kl_count
        else:
            scale_q = o.lambda_kl * o.lambda_representation / kl_count
            scale_p = o.lambda_kl * o.lambda_dynamic / kl_count
        self.scalars = (o.unimix, o.free_bits, o.continue_target_scale, o.pixels_scale,
                        o.pixels_offset)
        self.scales = (scale_q, scale_p, o.lambda_reward / rows, o.lambda_continue / rows,
                       o.lambda_reco)
        self.meta = dict(
            BALANCED=o.balanced, UNIMIX=o.unimix != 0.0, TWO_HOT=o.two_hot,
            SYMLOG_SPACE=o.symlog_space, N_HEADS=len(numels),
            HEAD_MODES=sum(m << (2 * h) for h, m in enumerate(o.head_modes)),
            INT_TARGETS=machinery.bits(not x.dtype.is_floating_point for x in heads[0::2]),
            L1=o.l1,
            BLOCK_R=block_r, BLOCK_S=block_s, BLOCK_K=block_k, REWARD_ROWS=reward_rows,
            BLOCK_BINS=block_bins, ROW_BLOCK=ROW_BLOCK, IMAGE_BLOCK=image_block, ACC=acc,
            num_warps=NUM_WARPS)
        t = self.term = _term_indices(o)
        kl_end = kl_programs
        reward_end = kl_end + reward_programs
        segments = {"kl": (0, kl_end), "reward": (kl_end, reward_end),
                    "continue": (reward_end, reward_end + cont_programs),
                    "reco": (starts[0], starts[-1])}
        # Balanced: α·m + (1 − α)·m, both sides of the one KL loss have the same value m.
        multipliers = {"loss_model_kl": o.lambda_kl,
                       "loss_model_dynamic": o.lambda_kl * o.lambda_dynamic,
                       "loss_model_representation": o.lambda_kl * o.lambda_representation,
                       "loss_model_reward": o.lambda_reward,
                       "loss_model_continue": o.lambda_continue,
                       "loss_model_reco": o.lambda_reco}
        order = _outputs(o.balanced, o.has_continue)
        self.finalize = machinery.Finalize([segments[segment] for _, segment in order],
                                           [multipliers[name] for name, _ in order], acc)
        self.bwd_meta = dict(T_Q=t["q"], T_P=t["p"], T_REWARD=t["reward"],
                             T_CONT=t["continue"], T_RECO=t["reco"])
        self._launches: dict[tuple, machinery.Launch] = {}

    def _views(self, inputs: Sequence[Optional[torch.Tensor]]):
        """The inputs as the kernels read them: themselves, or copies in the layout the kernels
        read (contiguous: the logits as ``[rows, S, K]``, two-hot logits as ``[rows, R]``)."""
        if not self.copied:
            return inputs
        views = list(inputs)
        for i in self.copied:
            views[i] = views[i].contiguous()
        return views

    def _args(self, views, grads) -> list:
        """The arguments both kernels start with: the inputs, their gradients (a harmless
        pointer where absent: the constexpr flags keep the kernels off it) and the heads."""
        dummy = views[POSTERIOR]
        g = [dummy if t is None else t for t in grads]
        cont = views[CONTINUE_PRED], views[TERMINATED]
        if cont[0] is None:
            cont = dummy, dummy
        bins = views[BINS]
        heads = views[FIRST_HEAD:]
        return [views[POSTERIOR], views[PRIOR], *self.strides, g[POSTERIOR], g[PRIOR],
                views[TRUE_REWARD], views[REWARD_PRED], dummy if bins is None else bins,
                *self.reward_strides, g[TRUE_REWARD], g[REWARD_PRED], *cont, g[CONTINUE_PRED],
                g[TERMINATED], tuple(heads[0::2]), tuple(heads[1::2]),
                tuple(g[FIRST_HEAD::2]), tuple(g[FIRST_HEAD + 1::2]), *self.head_sizes]

    def _launch(self, name: str, programs: int, flags: tuple[bool, ...],
                skip: Optional[tuple[bool, ...]]) -> machinery.Launch:
        """The launch of kernel ``name`` writing the gradients ``flags`` marks (and, for the
        backward, leaving the terms in ``skip`` alone when their factor is 1, see
        :func:`machinery.term_factor`), made once."""
        key = (name, flags, skip)
        launch = self._launches.get(key)
        if launch is None:
            extra = {} if skip is None else dict(self.bwd_meta, SKIP=machinery.bits(skip))
            meta = dict(self.meta, GRAD_Q=flags[POSTERIOR], GRAD_P=flags[PRIOR],
                        GRAD_TRUE=flags[TRUE_REWARD], GRAD_REWARD=flags[REWARD_PRED],
                        GRAD_CONT=flags[CONTINUE_PRED], GRAD_TERM=flags[TERMINATED],
                        GRAD_XS=machinery.bits(flags[FIRST_HEAD::2]),
                        GRAD_YS=machinery.bits(flags[FIRST_HEAD + 1::2]), **extra)
            launch = self._launches[key] = machinery.Launch(_MODULE, name, programs, meta)
        return launch

    def forward(self, inputs, needs) -> tuple:
        """``(losses, keep, grads)``: the losses in :func:`output_names` order, one gradient per
        input, made for a ``grad_output`` of 1, None where ``needs`` asks for none."""
        losses, partials, keep, grads = self.empty_forward(self.programs, needs)
        self._launch("_v3_fwd_kernel", self.programs, tuple(needs), None)(
            *self._args(self._views(inputs), grads), partials, *self.sizes, *self.scalars,
            *self.counts, *self.scales)
        self.finalize(partials, losses, keep)
        return losses, keep, grads

    def backward(self, inputs, keep, grad_outputs, grads, skip_if_one) -> None:
        """``factor × gradient`` into each non-None ``grads[i]``."""
        flags = tuple([t is not None for t in grads])
        if True not in flags:
            return
        launch = self._launch("_v3_bwd_kernel", self.backward_programs, flags,
                              tuple(skip_if_one))
        launch(*self._args(self._views(inputs), grads), keep,
               tuple([keep if g is None else g for g in grad_outputs]), *self.sizes,
               *self.scalars, *self.scales)


_MODULE = sys.modules[__name__]


def _forward(inputs: list[Optional[torch.Tensor]], floats: list[float], ints: list[int],
             needs: list[bool]) -> list[torch.Tensor]:
    """Launch the forward on validated inputs (see :func:`machinery.planned_forward`)."""
    return machinery.planned_forward(_Plan(inputs, floats, ints), inputs, needs)


def _forward_fake(inputs, floats, ints, needs):
    """What :func:`_forward` returns (shapes, strides, dtypes), for tracing."""
    return machinery.empty_outputs(inputs, _Options.decode(floats, ints).loss_dtypes, needs,
                                   _empty_grad)


def _backward(inputs: list[Optional[torch.Tensor]], floats: list[float], ints: list[int],
              keep: torch.Tensor, grad_outputs: list[Optional[torch.Tensor]],
              grads: list[Optional[torch.Tensor]], skip_if_one: list[bool]) -> None:
    """Launch the backward: ``factor × gradient`` into each non-None ``grads[i]``."""
    if any(t is not None for t in grads):
        _Plan(inputs, floats, ints).backward(inputs, keep, grad_outputs, grads, skip_if_one)


def _reference(inputs, opts: V3Options, shapes: V3Shapes):
    """The reference's losses in the kernels' output order."""
    heads = inputs[FIRST_HEAD:]
    losses = reference.checked_dreamer_v3_model_loss(
        inputs[POSTERIOR], inputs[PRIOR], tuple(heads[0::2]), tuple(heads[1::2]),
        inputs[TRUE_REWARD], inputs[REWARD_PRED], inputs[CONTINUE_PRED], inputs[TERMINATED],
        opts, shapes)
    return [losses[name] for name in output_names(opts)]


def _input_names(ints: Sequence[int], n_inputs: int) -> tuple[str, ...]:
    heads = (n_inputs - FIRST_HEAD) // 2
    suffixes = [f"[{h}]" for h in range(heads)] if heads > 1 else [""]
    return ("posterior_logits", "prior_logits", "true_reward", "reward_pred", "continue_pred",
            "terminated", "reward_bins",
            *(name + s for s in suffixes for name in ("pixels", "reco_pixels")))


KERNELS = machinery.register(machinery.LossKernels(
    name="dreamer_v3", terms=_terms, forward=_forward, forward_fake=_forward_fake,
    backward=_backward, empty_grad=_empty_grad, encode=_encode, reference=_reference,
    plan=_Plan, input_names=_input_names,
))


def output_names(opts: V3Options) -> list[str]:
    """The loss names in the order the kernels write them."""
    return [name for name, _ in _outputs(opts.kl_mode == "balanced", opts.has_continue)]


@functools.lru_cache(maxsize=None)
def _default_bins(num_bins: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):  # kept for later calls: never an inference tensor
        return reference.default_reward_bins(num_bins, device).to(dtype)


def reward_support(opts: V3Options, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The two-hot bins on ``device`` in ``dtype``: the user's, or torchrl's default (built once
    per size, device and dtype in eager mode). Never an inference tensor unless the user's bins
    are one and need no copy."""
    if opts.reward_bins is not None:  # read flat by the kernel
        with torch.inference_mode(False):
            return opts.reward_bins.to(device=device, dtype=dtype).contiguous()
    if torch.compiler.is_compiling():
        return reference.default_reward_bins(opts.num_reward_bins, device).to(dtype)
    return _default_bins(opts.num_reward_bins, device, dtype)


def kernel_inputs(posterior_logits, prior_logits, pixels, reco_pixels, true_reward, reward_pred,
                  continue_pred, terminated, bins, opts: V3Options) -> list:
    """The fused loss's inputs in the kernels' order (:data:`POSTERIOR` ... ``FIRST_HEAD``): the
    continue inputs None without the continue term, then each head's target and prediction."""
    if not opts.has_continue:
        continue_pred = terminated = None
    heads = [t for pair in zip(pixels, reco_pixels) for t in pair]
    return [posterior_logits, prior_logits, true_reward, reward_pred, continue_pred, terminated,
            bins, *heads]


class Prepared:
    """The fused loss prepared for inputs of one signature, in the current grad mode: called with
    the inputs in the kernels' order (:func:`kernel_inputs`, the bins included), it returns the
    losses by name in the reference's order."""

    __slots__ = ("call", "order")

    def __init__(self, opts: V3Options, shapes: V3Shapes, inputs: Sequence):
        self.call = machinery.FusedCall(KERNELS, opts, shapes, inputs, torch.is_grad_enabled())
        names = output_names(opts)
        self.order = [(name, names.index(name)) for name in reference_order(opts)]

    def __call__(self, inputs: Sequence) -> dict[str, torch.Tensor]:
        losses = machinery.run(self.call, inputs)
        return {name: losses[i] for name, i in self.order}


def reference_order(opts: V3Options) -> list[str]:
    """The order of the reference's dict: reco, reward, the KL terms, continue."""
    names = output_names(opts)
    return ["loss_model_reco", "loss_model_reward",
            *(n for n in names if n not in ("loss_model_reco", "loss_model_reward"))]
