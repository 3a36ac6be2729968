"""Fused Triton kernels for the DreamerV3 behaviour losses and their launchers.

The terms of :mod:`fused_dreamer_loss.behavior_v3.reference`, in its order, with their
gradients; the finalize, the autograd.Function and the custom ops are the shared ones of
:mod:`fused_dreamer_loss.core.machinery`, plus one custom op here for the returns kernel (it is no
autograd function: the returns it hands the terms are constants there).

Launches of :func:`~fused_dreamer_loss.behavior_v3.dreamer_v3_behavior_loss` (any shape):

    1  _returns_kernel     one program: the λ-returns and discount weights of every start (a
                           scan over H per tile of starts); then both quantiles of all the returns
                           by a radix select over their bits (no sort), the EMA of ``low`` /
                           ``high`` updated in place, and the scale
    2  _terms_fwd_kernel   programs in segments: actor start tiles | critic row tiles | replay
                           step tiles; each writes its partial sums and its gradients for a
                           ``grad_output`` of 1 (the reparameterised actor's through the returns,
                           by the adjoint scan)
    3  finalize            the shared one: each loss is the sum of its segment's partials
    4  _terms_bwd_kernel   the backward: the tiles again, times each loss's ``grad_output`` (its
                           programs return at once when the factors are 1)

The phase functions launch parts of these: :func:`lambda_returns` the scan (a grid of start
tiles) and, in its backward, the adjoint scan; :func:`return_scale` the select; each loss the
terms kernel with its segment, the finalize and the backward.

The math (M the number of steps averaged over; ``w`` the weights, ``s`` the scale)::

    returns   R_t = r_t + γ c_t ((1 − λ) v_t + λ R_{t+1}),  R_H = v_{H−1}
    adjoint   G_t = ∂L/∂R_t + γ λ c_{t−1} G_{t−1}:  ∂r_t = G_t,  ∂v_t = G_t γ c_t (1 − λ)
              (+ G_{H−1} γ c_{H−1} λ at H − 1),  ∂c_t = G_t γ ((1 − λ) v_t + λ R_{t+1})
    quantile  x_(k) by 8-bit radix digits of the order-preserving integer keys of the floats;
              lerp(x_(⌊q(n−1)⌋), x_(⌈q(n−1)⌉), frac) as torch.quantile
    actor     REINFORCE  −w·log π·sg(A) / M,  A = (R − b) [/ s]   ∂log π = −w A / M
              reparam.   −w (R − b) / (s M)                        ∂R = −w / (s M) = −∂b
              entropy    −η w H / M                                ∂H = −η w / M
    critic    w (ce(R) + reg·ce(slow)),  ce = lse(l) − (w_lo l_lo + w_hi l_hi)
              ∂l = w ((1 + reg) softmax(l) − two_hot(R) − reg·two_hot(slow)) / M
              symlog_mse: w ((symlog v̂ − symlog R)² + reg (…)²),  ∂v̂ = 2 w (d + reg d') / ((1 + |v̂|) M)
    replay    g_{T−1} = v'_{T−1};  R_k = r_{k+1} + γ ((1 − λ) v'_{k+1} + λ g),  g = v'_{k+1} if
              done_{k+1} else R_{k+1};  then the critic rows with w = ¬done_k
"""

# No `from __future__ import annotations`: Triton reads the "fp64" annotations as written.
import functools
import math
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..core import machinery
from ..core.machinery import (acc_dtype, backward_programs, code_dtype, contiguous_strides,
                              dtype_code, scalar, store, symexp, symlog, term_factor,
                              two_hot_weights)
from . import reference
from .validation import (DISCOUNT_WEIGHTS, ActorOptions, CriticOptions, ReplayOptions,
                         ReturnOptions, ScaleOptions)

__all__ = ["RETURNS_KERNELS", "TERMS_KERNELS", "ReturnsCall", "returns_call",
           "run_lambda_returns", "run_terms", "scale_values", "TermsCall"]

#: Starts per scan tile.
SCAN_BLOCK = 1024
#: Returns per step of the radix select.
SELECT_BLOCK = 1024
#: Bits per radix digit, and the buckets of one digit.
RADIX_BITS = 8
RADIX = 1 << RADIX_BITS
#: Order statistics selected at once: below and above each of the two quantiles.
N_RANKS = 4
#: Starts per actor program.
ACTOR_BLOCK = 256
#: Elements of one critic or replay program's [steps, R] tile (at least one step).
CRITIC_TILE = 1024
#: Warps per program.
NUM_WARPS = 8

#: The scan writes no weights (the backward's recomputation of the returns).
NO_WEIGHTS = tl.constexpr(-1)
#: What the returns kernel does with the scale: none (a grid of scan tiles), write 1 (no
#: normalisation), read the buffers, or update them first.
SCALE_NONE, SCALE_ONE, SCALE_READ, SCALE_UPDATE = range(4)


# ---------------------------------------------------------------------------------------------
# Returns, weights and the return scale
# ---------------------------------------------------------------------------------------------


@triton.jit
def _scan_tile(reward_ptr, value_ptr, cont_ptr, root_ptr, returns_ptr, weights_ptr, n_starts, H,
               tile, gamma, lmbda, one_minus_lmbda, HAS_CONT: tl.constexpr,
               HAS_ROOT: tl.constexpr, DISCOUNT: tl.constexpr, WEIGHTS: tl.constexpr,
               BLOCK: tl.constexpr, ACC: tl.constexpr):
    """λ-returns and weights of BLOCK starts: R backwards over H, then w forwards (WEIGHTS 0:
    inclusive, 1: inclusive_gamma, 2: exclusive; NO_WEIGHTS: none written)."""
    starts = tile * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = starts < n_starts
    row = starts * H
    ret = tl.load(value_ptr + row + H - 1, mask=ok, other=0.0).to(ACC)
    for i in range(H):
        t = H - 1 - i
        r = tl.load(reward_ptr + row + t, mask=ok, other=0.0).to(ACC)
        v = tl.load(value_ptr + row + t, mask=ok, other=0.0).to(ACC)
        c = 1.0
        if HAS_CONT:
            c = tl.load(cont_ptr + row + t, mask=ok, other=0.0).to(ACC)
        ret = r + gamma * c * (one_minus_lmbda * v + lmbda * ret)
        store(returns_ptr + row + t, ret, ok)
    if WEIGHTS == NO_WEIGHTS:
        return
    w = tl.full([BLOCK], 1.0, ACC)
    previous = tl.full([BLOCK], 1.0, ACC)
    for t in range(H):
        rc = tl.full([BLOCK], 1.0, ACC)
        if HAS_ROOT:
            rc = tl.load(root_ptr + row + t, mask=ok, other=0.0).to(ACC)
        if DISCOUNT:
            if WEIGHTS == 0:
                w = w * tl.where(t == 0, rc, gamma * rc)
            elif WEIGHTS == 1:
                w = w * (gamma * rc)
            else:
                w = w * tl.where(t == 0, 1.0, gamma * previous)
                previous = rc
        store(weights_ptr + row + t, w, ok)


@triton.jit
def _order_keys(x, KEY_BITS: tl.constexpr):
    """Unsigned integers in the order of the floats ``x``: the sign bit flipped for a positive
    float, every bit for a negative one."""
    if KEY_BITS == 64:
        bits = x.to(tl.uint64, bitcast=True)
    else:
        bits = x.to(tl.uint32, bitcast=True)
    negative = bits >> (KEY_BITS - 1)
    sign_bit = (negative * 0 + 1) << (KEY_BITS - 1)
    return bits ^ ((0 - negative) | sign_bit)


@triton.jit
def _key_values(key, KEY_BITS: tl.constexpr, VALUE: tl.constexpr):
    """The floats of :func:`_order_keys`' integers."""
    positive = key >> (KEY_BITS - 1)
    sign_bit = (positive * 0 + 1) << (KEY_BITS - 1)
    return (key ^ ((positive - 1) | sign_bit)).to(VALUE, bitcast=True)


@triton.jit
def _select(values_ptr, n, ranks, KEY_BITS: tl.constexpr, VALUE: tl.constexpr,
            BLOCK: tl.constexpr):
    """The keys of the order statistics of ``values_ptr[:n]`` (read in VALUE) at the N_RANKS
    0-based ``ranks``: one 8-bit digit per pass, from the top, each the bucket of a histogram of
    the keys that share the digits chosen so far."""
    which = tl.arange(0, 4)
    buckets = tl.arange(0, 256)
    remaining = ranks
    if KEY_BITS == 64:
        prefix = tl.zeros([4], tl.uint64)
    else:
        prefix = tl.zeros([4], tl.uint32)
    for p in tl.static_range(KEY_BITS // 8):
        shift = KEY_BITS - 8 * (p + 1)
        hist = tl.zeros([4 * 256], tl.int32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK).to(tl.int64)
            ok = offs < n
            key = _order_keys(tl.load(values_ptr + offs, mask=ok, other=0.0).to(VALUE), KEY_BITS)
            digit = ((key >> shift) & 255).to(tl.int32)
            match = ok[None, :] & (which[:, None] >= 0)
            if p > 0:
                match = match & ((key[None, :] >> (shift + 8)) == (prefix[:, None] >> (shift + 8)))
            flat = tl.reshape(digit[None, :] + which[:, None] * 256, [4 * BLOCK])
            hist += tl.histogram(flat, 4 * 256, mask=tl.reshape(match, [4 * BLOCK]))
        counts = tl.reshape(hist, [4, 256])
        chosen = tl.sum((tl.cumsum(counts, axis=1) <= remaining[:, None]).to(tl.int32), axis=1)
        remaining -= tl.sum(tl.where(buckets[None, :] < chosen[:, None], counts, 0), axis=1)
        prefix = prefix | (chosen.to(prefix.dtype) << shift)
    return prefix


@triton.jit
def _lerp(start, end, weight):
    """torch.lerp's formula."""
    return tl.where(tl.abs(weight) < 0.5, start + weight * (end - start),
                    end - (end - start) * (1.0 - weight))


@triton.jit
def _pick(vector, which, j: tl.constexpr):
    return tl.sum(tl.where(which == j, vector, 0.0), axis=0)


@triton.jit
def _quantiles(values_ptr, n, q_lo, q_hi, KEY_BITS: tl.constexpr, VALUE: tl.constexpr,
               BLOCK: tl.constexpr):
    """torch.quantile's linear interpolation at q_lo and q_hi over ``values_ptr[:n]``, in VALUE
    (NaN if a value is NaN)."""
    last = (n - 1).to(VALUE)
    pos_lo = q_lo.to(VALUE) * last
    pos_hi = q_hi.to(VALUE) * last
    below_lo = pos_lo.to(tl.int64)
    below_hi = pos_hi.to(tl.int64)
    above_lo = below_lo + (pos_lo > below_lo.to(VALUE)).to(tl.int64)
    above_hi = below_hi + (pos_hi > below_hi.to(VALUE)).to(tl.int64)
    which = tl.arange(0, 4)
    ranks = tl.where(which == 0, below_lo, tl.where(which == 1, above_lo,
                                                    tl.where(which == 2, below_hi, above_hi)))
    values = _key_values(_select(values_ptr, n, ranks, KEY_BITS, VALUE, BLOCK), KEY_BITS, VALUE)
    nans = tl.zeros([BLOCK], tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        x = tl.load(values_ptr + offs, mask=offs < n, other=0.0).to(VALUE)
        nans += (x != x).to(tl.int32)
    nan = tl.sum(nans, axis=0) > 0
    low = _lerp(_pick(values, which, 0), _pick(values, which, 1), pos_lo - below_lo.to(VALUE))
    high = _lerp(_pick(values, which, 2), _pick(values, which, 3), pos_hi - below_hi.to(VALUE))
    return tl.where(nan, float("nan"), low), tl.where(nan, float("nan"), high)


@triton.jit
def _returns_kernel(
    reward_ptr, value_ptr, cont_ptr, root_ptr, returns_ptr, weights_ptr, low_ptr, high_ptr,
    low_out_ptr, high_out_ptr, scale_ptr, n_starts, H, n_values,
    gamma: "fp64", lmbda: "fp64", one_minus_lmbda: "fp64", q_lo: "fp64", q_hi: "fp64",
    rate: "fp64", min_scale: "fp64",
    SCAN: tl.constexpr, SCALE: tl.constexpr, HAS_CONT: tl.constexpr, HAS_ROOT: tl.constexpr,
    DISCOUNT: tl.constexpr, WEIGHTS: tl.constexpr, KEY_BITS: tl.constexpr,
    SCAN_BLOCK: tl.constexpr, SELECT_BLOCK: tl.constexpr, ACC: tl.constexpr, BUF: tl.constexpr,
):
    """With SCALE_NONE, a grid of scan tiles; otherwise one program: the scan of every tile (when
    SCAN), then the quantiles of ``returns_ptr[:n_values]`` and the EMA (SCALE_UPDATE: into
    ``low_out`` / ``high_out``, the statistics themselves in eager mode), and the scale (1 with
    SCALE_ONE)."""
    g = scalar(gamma, ACC)
    lam = scalar(lmbda, ACC)
    one_minus = scalar(one_minus_lmbda, ACC)
    if SCAN:
        if SCALE == 0:
            _scan_tile(reward_ptr, value_ptr, cont_ptr, root_ptr, returns_ptr, weights_ptr,
                       n_starts, H, tl.program_id(0).to(tl.int64), g, lam, one_minus, HAS_CONT,
                       HAS_ROOT, DISCOUNT, WEIGHTS, SCAN_BLOCK, ACC)
        else:
            for tile in range(0, tl.cdiv(n_starts, SCAN_BLOCK)):
                _scan_tile(reward_ptr, value_ptr, cont_ptr, root_ptr, returns_ptr, weights_ptr,
                           n_starts, H, tile, g, lam, one_minus, HAS_CONT, HAS_ROOT, DISCOUNT,
                           WEIGHTS, SCAN_BLOCK, ACC)
            tl.debug_barrier()  # the returns are read back by other threads of this program
    if SCALE == 1:
        tl.store(scale_ptr, tl.full([], 1.0, BUF))
    if SCALE >= 2:
        low = tl.load(low_ptr).to(BUF)
        high = tl.load(high_ptr).to(BUF)
        if SCALE == 3:
            batch_low, batch_high = _quantiles(returns_ptr, n_values, scalar(q_lo, tl.float64),
                                               scalar(q_hi, tl.float64), KEY_BITS, BUF,
                                               SELECT_BLOCK)
            r = scalar(rate, BUF)
            low = _lerp(low, batch_low, r)
            high = _lerp(high, batch_high, r)
            tl.store(low_out_ptr, low.to(low_out_ptr.dtype.element_ty))
            tl.store(high_out_ptr, high.to(high_out_ptr.dtype.element_ty))
        span = high - low
        floor = scalar(min_scale, BUF)
        tl.store(scale_ptr, tl.where(span < floor, floor, span))  # torch's clamp: NaN stays NaN


@triton.jit
def _returns_bwd_kernel(grad_ptr, reward_ptr, value_ptr, cont_ptr, returns_ptr, g_reward_ptr,
                        g_value_ptr, g_cont_ptr, n_starts, H, gamma: "fp64", lmbda: "fp64",
                        one_minus_lmbda: "fp64", HAS_CONT: tl.constexpr,
                        GRAD_REWARD: tl.constexpr, GRAD_VALUE: tl.constexpr,
                        GRAD_CONT: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """The adjoint scan of the λ-returns for an upstream gradient ``grad_ptr`` [N, H], after the
    returns are recomputed into ``returns_ptr`` (scratch)."""
    g = scalar(gamma, ACC)
    lam = scalar(lmbda, ACC)
    one_minus = scalar(one_minus_lmbda, ACC)
    tile = tl.program_id(0).to(tl.int64)
    if GRAD_CONT:
        _scan_tile(reward_ptr, value_ptr, cont_ptr, cont_ptr, returns_ptr, returns_ptr, n_starts,
                   H, tile, g, lam, one_minus, HAS_CONT, False, False, NO_WEIGHTS, BLOCK, ACC)
        tl.debug_barrier()  # read back across threads
    starts = tile * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = starts < n_starts
    row = starts * H
    carry = tl.zeros([BLOCK], ACC)
    for t in range(H):
        adjoint = tl.load(grad_ptr + row + t, mask=ok, other=0.0).to(ACC) + carry
        carry = _returns_adjoint(adjoint, value_ptr, cont_ptr, returns_ptr, g_reward_ptr,
                                 g_value_ptr, g_cont_ptr, row, ok, t, H, g, lam, one_minus,
                                 HAS_CONT, GRAD_REWARD, GRAD_VALUE, GRAD_CONT, ACC)


@triton.jit
def _returns_adjoint(adjoint, value_ptr, cont_ptr, returns_ptr, g_reward_ptr, g_value_ptr,
                     g_cont_ptr, row, ok, t, H, gamma, lmbda, one_minus_lmbda,
                     HAS_CONT: tl.constexpr, GRAD_REWARD: tl.constexpr, GRAD_VALUE: tl.constexpr,
                     GRAD_CONT: tl.constexpr, ACC: tl.constexpr):
    """Step t of the adjoint scan: given ``G_t`` (``adjoint``), store the gradients of r_t, v_t
    and c_t; return what R_{t+1}'s adjoint receives, ``γ λ c_t G_t``."""
    v = tl.load(value_ptr + row + t, mask=ok, other=0.0).to(ACC)
    c = tl.full(adjoint.shape, 1.0, ACC)
    if HAS_CONT:
        c = tl.load(cont_ptr + row + t, mask=ok, other=0.0).to(ACC)
    if GRAD_REWARD:
        store(g_reward_ptr + row + t, adjoint, ok)
    last = t == H - 1
    if GRAD_VALUE:
        dv = adjoint * gamma * c * one_minus_lmbda
        store(g_value_ptr + row + t, tl.where(last, dv + adjoint * gamma * c * lmbda, dv), ok)
    if GRAD_CONT:
        # R_{t+1}; at the last step the index stays in the row (the value is replaced by v_t), so
        # the load needs no mask beyond ok (triton 3.9's interpreter refuses ok & (t + 1 < H)).
        later = tl.load(returns_ptr + row + tl.minimum(t + 1, H - 1), mask=ok, other=0.0).to(ACC)
        later = tl.where(last, v, later)
        store(g_cont_ptr + row + t, adjoint * gamma * (one_minus_lmbda * v + lmbda * later), ok)
    return adjoint * gamma * lmbda * c


# ---------------------------------------------------------------------------------------------
# Actor, critic and replay terms
# ---------------------------------------------------------------------------------------------


@triton.jit
def _actor_tile(ret_ptr, w_ptr, scale_ptr, value_ptr, cont_ptr, base_ptr, lp_ptr, ent_ptr,
                g_ret_ptr, g_reward_ptr, g_value_ptr, g_cont_ptr, g_base_ptr, g_lp_ptr, g_ent_ptr,
                n_starts, H, tile, gamma, lmbda, one_minus_lmbda, bonus, unit,
                REINFORCE: tl.constexpr, NORMALIZE: tl.constexpr, HAS_BASE: tl.constexpr,
                HAS_ENT: tl.constexpr, WEIGHT_ENT: tl.constexpr, ADJOINT: tl.constexpr,
                HAS_CONT: tl.constexpr, GRAD_RET: tl.constexpr, GRAD_REWARD: tl.constexpr,
                GRAD_VALUE: tl.constexpr, GRAD_CONT: tl.constexpr, GRAD_BASE: tl.constexpr,
                GRAD_LP: tl.constexpr, GRAD_ENT: tl.constexpr, BLOCK: tl.constexpr,
                ACC: tl.constexpr):
    """The actor terms of BLOCK starts over H steps: ``(−Σ objective − η Σ entropy term,
    Σ entropy term)``; the gradients times ``unit`` (``factor / M``)."""
    starts = tile * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = starts < n_starts
    row = starts * H
    scale = tl.load(scale_ptr).to(ACC)
    objective = tl.zeros([BLOCK], ACC)
    entropy = tl.zeros([BLOCK], ACC)
    carry = tl.zeros([BLOCK], ACC)
    for t in range(H):
        w = tl.load(w_ptr + row + t, mask=ok, other=0.0).to(ACC)
        target = tl.load(ret_ptr + row + t, mask=ok, other=0.0).to(ACC)
        if HAS_BASE:
            target = target - tl.load(base_ptr + row + t, mask=ok, other=0.0).to(ACC)
        if REINFORCE:
            advantage = target
            if NORMALIZE:
                advantage = advantage / scale
            lp = tl.load(lp_ptr + row + t, mask=ok, other=0.0).to(ACC)
            objective += w * lp * advantage
            if GRAD_LP:
                store(g_lp_ptr + row + t, -(w * advantage) * unit, ok)
        else:
            objective += w * target / scale
            d_ret = -(w / scale) * unit
            if GRAD_BASE:
                store(g_base_ptr + row + t, -d_ret, ok)
            if ADJOINT:
                carry = _returns_adjoint(d_ret + carry, value_ptr, cont_ptr, ret_ptr,
                                         g_reward_ptr, g_value_ptr, g_cont_ptr, row, ok, t, H,
                                         gamma, lmbda, one_minus_lmbda, HAS_CONT, GRAD_REWARD,
                                         GRAD_VALUE, GRAD_CONT, ACC)
            if GRAD_RET:
                store(g_ret_ptr + row + t, d_ret, ok)
        if HAS_ENT:
            e = tl.load(ent_ptr + row + t, mask=ok, other=0.0).to(ACC)
            if WEIGHT_ENT:
                entropy += w * e
                if GRAD_ENT:
                    store(g_ent_ptr + row + t, -(bonus * w) * unit, ok)
            else:
                entropy += e
                if GRAD_ENT:
                    store(g_ent_ptr + row + t, tl.full([BLOCK], 0.0, ACC) - bonus * unit, ok)
    objective = tl.sum(tl.where(ok, objective, 0.0), axis=0)
    entropy = tl.sum(tl.where(ok, entropy, 0.0), axis=0)
    return -objective - bonus * entropy, entropy


@triton.jit
def _slow_targets(slow_ptr, rows, row_ok, bins, cls, n_bins, SLOW_LOGITS: tl.constexpr,
                  SYMLOG_SPACE: tl.constexpr, ACC: tl.constexpr):
    """The slow critic's value per row: read, or its logits' expectation over the bins (raw, or
    symexp of the expectation over the symlog bins)."""
    if SLOW_LOGITS:
        cls_ok = cls < n_bins
        mask = row_ok[:, None] & cls_ok[None, :]
        logits = tl.load(slow_ptr + rows[:, None] * n_bins + cls[None, :], mask=mask,
                         other=0.0).to(ACC)
        logits = tl.where(cls_ok[None, :], logits, float("-inf"))
        e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        mean = tl.sum(e * bins[None, :], axis=1) / tl.sum(e, axis=1)
        if SYMLOG_SPACE:
            mean = symexp(mean)
        return mean
    return tl.load(slow_ptr + rows, mask=row_ok, other=0.0).to(ACC)


@triton.jit
def _critic_rows(pred_ptr, g_pred_ptr, bins_ptr, slow_ptr, rows, row_ok, target, weight, n_bins,
                 reg, unit, TWO_HOT: tl.constexpr, SYMLOG_SPACE: tl.constexpr,
                 HAS_SLOW: tl.constexpr, SLOW_LOGITS: tl.constexpr, GRAD: tl.constexpr,
                 BLOCK_BINS: tl.constexpr, ACC: tl.constexpr):
    """The critic loss of ``rows`` against ``target``, weighted: ``(w (ce + reg ce_slow),
    w ce_slow)`` per row; the gradient of the logits (or values) times ``unit``."""
    cls = tl.arange(0, BLOCK_BINS)
    cls_ok = cls < n_bins
    if TWO_HOT:
        mask = row_ok[:, None] & cls_ok[None, :]
        logits = tl.load(pred_ptr + rows[:, None] * n_bins + cls[None, :], mask=mask,
                         other=0.0).to(ACC)
        logits = tl.where(cls_ok[None, :], logits, float("-inf"))
        raw_bins = tl.load(bins_ptr + cls, mask=cls_ok, other=0.0).to(ACC)
        bins = raw_bins
        x = target
        if SYMLOG_SPACE:
            bins, _ = symlog(raw_bins)
            x, _ = symlog(target)
        m = tl.max(logits, axis=1)
        e = tl.exp(logits - m[:, None])
        z = tl.sum(e, axis=1)
        lse = m + tl.log(z)
        is_lo, is_up, w_lo, w_up = two_hot_weights(x, bins, cls, n_bins)
        ce = lse - (w_lo * tl.sum(tl.where(is_lo, logits, 0.0), axis=1)
                    + w_up * tl.sum(tl.where(is_up, logits, 0.0), axis=1))
        hot = tl.where(is_lo, w_lo[:, None], 0.0) + tl.where(is_up, w_up[:, None], 0.0)
        probs = e / z[:, None]
        grad = probs - hot
        slow = tl.zeros(ce.shape, ACC)
        if HAS_SLOW:
            xs = _slow_targets(slow_ptr, rows, row_ok, bins, cls, n_bins, SLOW_LOGITS,
                               SYMLOG_SPACE, ACC)
            if SYMLOG_SPACE:
                xs, _ = symlog(xs)
            s_lo, s_up, ws_lo, ws_up = two_hot_weights(xs, bins, cls, n_bins)
            slow = lse - (ws_lo * tl.sum(tl.where(s_lo, logits, 0.0), axis=1)
                          + ws_up * tl.sum(tl.where(s_up, logits, 0.0), axis=1))
            slow_hot = tl.where(s_lo, ws_lo[:, None], 0.0) + tl.where(s_up, ws_up[:, None], 0.0)
            grad += reg * (probs - slow_hot)
        if GRAD:
            store(g_pred_ptr + rows[:, None] * n_bins + cls[None, :],
                  grad * (weight * unit)[:, None], mask)
    else:
        v, dv = symlog(tl.load(pred_ptr + rows, mask=row_ok, other=0.0).to(ACC))
        t, _ = symlog(target)
        d = v - t
        ce = d * d
        slope = 2.0 * d
        slow = tl.zeros(ce.shape, ACC)
        if HAS_SLOW:
            s, _ = symlog(_slow_targets(slow_ptr, rows, row_ok, tl.zeros([BLOCK_BINS], ACC), cls,
                                        n_bins, False, False, ACC))
            ds = v - s
            slow = ds * ds
            slope += reg * 2.0 * ds
        if GRAD:
            store(g_pred_ptr + rows, slope * dv * weight * unit, row_ok)
    loss = weight * (ce + reg * slow)
    return tl.where(row_ok, loss, 0.0), tl.where(row_ok, weight * slow, 0.0)


@triton.jit
def _critic_tile(pred_ptr, g_pred_ptr, bins_ptr, slow_ptr, ret_ptr, w_ptr, n_rows, n_bins, tile,
                 reg, unit, HAS_WEIGHTS: tl.constexpr, TWO_HOT: tl.constexpr,
                 SYMLOG_SPACE: tl.constexpr, HAS_SLOW: tl.constexpr, SLOW_LOGITS: tl.constexpr,
                 GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_BINS: tl.constexpr,
                 ACC: tl.constexpr):
    """The critic terms of ROWS imagined steps: ``(Σ loss, Σ slow term)``."""
    rows = tile * ROWS + tl.arange(0, ROWS).to(tl.int64)
    ok = rows < n_rows
    target = tl.load(ret_ptr + rows, mask=ok, other=0.0).to(ACC)
    weight = tl.full([ROWS], 1.0, ACC)
    if HAS_WEIGHTS:
        weight = tl.load(w_ptr + rows, mask=ok, other=0.0).to(ACC)
    loss, slow = _critic_rows(pred_ptr, g_pred_ptr, bins_ptr, slow_ptr, rows, ok, target, weight,
                              n_bins, reg, unit, TWO_HOT, SYMLOG_SPACE, HAS_SLOW, SLOW_LOGITS,
                              GRAD, BLOCK_BINS, ACC)
    return tl.sum(loss, axis=0), tl.sum(slow, axis=0)


@triton.jit
def _replay_tile(pred_ptr, g_pred_ptr, bins_ptr, slow_ptr, reward_ptr, done_ptr, term_ptr,
                 boot_ptr, s_boot_b, s_boot_t, T, blocks, n_bins, tile, gamma, lmbda,
                 one_minus_lmbda, reg, unit, TWO_HOT: tl.constexpr, SYMLOG_SPACE: tl.constexpr,
                 HAS_SLOW: tl.constexpr, SLOW_LOGITS: tl.constexpr, GRAD: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK_BINS: tl.constexpr, ACC: tl.constexpr):
    """ROWS replay steps of one sequence: their λ-returns by the scan from its end, then the
    critic rows weighted by ¬done (the last step, without a target, by 0): ``Σ loss``."""
    b = tile // blocks
    first = (tile % blocks) * ROWS
    steps = first + tl.arange(0, ROWS).to(tl.int64)
    ok = steps < T
    targets = tl.zeros([ROWS], ACC)
    later = tl.zeros([], ACC)
    for i in range(tl.maximum(T - 1 - first, 0)):
        j = T - 1 - i
        at = b * T + j
        boot = tl.load(boot_ptr + b * s_boot_b + j * s_boot_t).to(ACC)
        value = tl.where(tl.load(term_ptr + at) != 0, 0.0, boot)
        later = tl.where((tl.load(done_ptr + at) != 0) | (i == 0), value, later)
        later = tl.load(reward_ptr + at).to(ACC) + gamma * (one_minus_lmbda * value
                                                             + lmbda * later)
        targets = tl.where(steps == j - 1, later, targets)
    rows = b * T + steps
    done = tl.load(done_ptr + rows, mask=ok, other=1) != 0
    keep = tl.where(done | (steps == T - 1), 0.0, 1.0).to(ACC)
    loss, _ = _critic_rows(pred_ptr, g_pred_ptr, bins_ptr, slow_ptr, rows, ok, targets, keep,
                           n_bins, reg, unit, TWO_HOT, SYMLOG_SPACE, HAS_SLOW, SLOW_LOGITS,
                           GRAD, BLOCK_BINS, ACC)
    return tl.sum(loss, axis=0)


@triton.jit
def _terms_fwd_kernel(
    ret_ptr, w_ptr, scale_ptr, value_ptr, cont_ptr, base_ptr, lp_ptr, ent_ptr, pred_ptr,
    slow_ptr, bins_ptr, r_pred_ptr, r_reward_ptr, r_done_ptr, r_term_ptr, boot_ptr, r_slow_ptr,
    g_ret_ptr, g_reward_ptr, g_value_ptr, g_cont_ptr, g_base_ptr, g_lp_ptr, g_ent_ptr, g_pred_ptr,
    g_r_pred_ptr, partials_ptr,
    n_starts, H, n_bins, T, s_boot_b, s_boot_t, replay_blocks, actor_programs, critic_programs,
    programs,
    gamma: "fp64", lmbda: "fp64", one_minus_lmbda: "fp64", bonus: "fp64", reg: "fp64",
    r_gamma: "fp64", r_lmbda: "fp64", r_one_minus_lmbda: "fp64", actor_unit: "fp64",
    critic_unit: "fp64", replay_unit: "fp64",
    REINFORCE: tl.constexpr, NORMALIZE: tl.constexpr, HAS_BASE: tl.constexpr,
    HAS_ENT: tl.constexpr, WEIGHT_ENT: tl.constexpr, ADJOINT: tl.constexpr,
    HAS_CONT: tl.constexpr, HAS_WEIGHTS: tl.constexpr, TWO_HOT: tl.constexpr,
    SYMLOG_SPACE: tl.constexpr, HAS_SLOW: tl.constexpr, SLOW_LOGITS: tl.constexpr,
    R_SLOW_LOGITS: tl.constexpr, GRAD_RET: tl.constexpr, GRAD_REWARD: tl.constexpr,
    GRAD_VALUE: tl.constexpr, GRAD_CONT: tl.constexpr, GRAD_BASE: tl.constexpr,
    GRAD_LP: tl.constexpr, GRAD_ENT: tl.constexpr, GRAD_PRED: tl.constexpr,
    GRAD_R_PRED: tl.constexpr, ACTOR_BLOCK: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_BINS: tl.constexpr, ACC: tl.constexpr,
):
    """Main forward: one program per actor, critic or replay tile (in that order); each stores
    its partial sums, already divided by its term's count (the second one, the entropy or the
    slow term, at ``programs + pid``), and its gradients."""
    pid = tl.program_id(0)
    if pid < actor_programs:
        loss, entropy = _actor_tile(
            ret_ptr, w_ptr, scale_ptr, value_ptr, cont_ptr, base_ptr, lp_ptr, ent_ptr, g_ret_ptr,
            g_reward_ptr, g_value_ptr, g_cont_ptr, g_base_ptr, g_lp_ptr, g_ent_ptr, n_starts, H,
            pid.to(tl.int64), scalar(gamma, ACC), scalar(lmbda, ACC), scalar(one_minus_lmbda, ACC),
            scalar(bonus, ACC), scalar(actor_unit, ACC), REINFORCE, NORMALIZE, HAS_BASE, HAS_ENT,
            WEIGHT_ENT, ADJOINT, HAS_CONT, GRAD_RET, GRAD_REWARD, GRAD_VALUE, GRAD_CONT,
            GRAD_BASE, GRAD_LP, GRAD_ENT, ACTOR_BLOCK, ACC)
        unit = scalar(actor_unit, ACC)
        tl.store(partials_ptr + pid, loss * unit)
        tl.store(partials_ptr + programs + pid, entropy * unit)
    elif pid < actor_programs + critic_programs:
        unit = scalar(critic_unit, ACC)
        loss, slow = _critic_tile(
            pred_ptr, g_pred_ptr, bins_ptr, slow_ptr, ret_ptr, w_ptr, n_starts * H, n_bins,
            (pid - actor_programs).to(tl.int64), scalar(reg, ACC), unit, HAS_WEIGHTS, TWO_HOT,
            SYMLOG_SPACE, HAS_SLOW, SLOW_LOGITS, GRAD_PRED, ROWS, BLOCK_BINS, ACC)
        tl.store(partials_ptr + pid, loss * unit)
        tl.store(partials_ptr + programs + pid, slow * unit)
    else:
        unit = scalar(replay_unit, ACC)
        loss = _replay_tile(
            r_pred_ptr, g_r_pred_ptr, bins_ptr, r_slow_ptr, r_reward_ptr, r_done_ptr, r_term_ptr,
            boot_ptr, s_boot_b, s_boot_t, T, replay_blocks, n_bins,
            (pid - actor_programs - critic_programs).to(tl.int64), scalar(r_gamma, ACC),
            scalar(r_lmbda, ACC), scalar(r_one_minus_lmbda, ACC), scalar(reg, ACC), unit,
            TWO_HOT, SYMLOG_SPACE, HAS_SLOW, R_SLOW_LOGITS, GRAD_R_PRED, ROWS, BLOCK_BINS, ACC)
        tl.store(partials_ptr + pid, loss * unit)


@triton.jit
def _terms_bwd_kernel(
    ret_ptr, w_ptr, scale_ptr, value_ptr, cont_ptr, base_ptr, lp_ptr, ent_ptr, pred_ptr,
    slow_ptr, bins_ptr, r_pred_ptr, r_reward_ptr, r_done_ptr, r_term_ptr, boot_ptr, r_slow_ptr,
    g_ret_ptr, g_reward_ptr, g_value_ptr, g_cont_ptr, g_base_ptr, g_lp_ptr, g_ent_ptr, g_pred_ptr,
    g_r_pred_ptr, keep_ptr, grad_outs,
    n_starts, H, n_bins, T, s_boot_b, s_boot_t, replay_blocks, actor_programs, critic_programs,
    replay_programs,
    gamma: "fp64", lmbda: "fp64", one_minus_lmbda: "fp64", bonus: "fp64", reg: "fp64",
    r_gamma: "fp64", r_lmbda: "fp64", r_one_minus_lmbda: "fp64", actor_unit: "fp64",
    critic_unit: "fp64", replay_unit: "fp64",
    T_ACTOR: tl.constexpr, T_VALUE: tl.constexpr, T_REPLAY: tl.constexpr, SKIP: tl.constexpr,
    REINFORCE: tl.constexpr, NORMALIZE: tl.constexpr, HAS_BASE: tl.constexpr,
    HAS_ENT: tl.constexpr, WEIGHT_ENT: tl.constexpr, ADJOINT: tl.constexpr,
    HAS_CONT: tl.constexpr, HAS_WEIGHTS: tl.constexpr, TWO_HOT: tl.constexpr,
    SYMLOG_SPACE: tl.constexpr, HAS_SLOW: tl.constexpr, SLOW_LOGITS: tl.constexpr,
    R_SLOW_LOGITS: tl.constexpr, GRAD_RET: tl.constexpr, GRAD_REWARD: tl.constexpr,
    GRAD_VALUE: tl.constexpr, GRAD_CONT: tl.constexpr, GRAD_BASE: tl.constexpr,
    GRAD_LP: tl.constexpr, GRAD_ENT: tl.constexpr, GRAD_PRED: tl.constexpr,
    GRAD_R_PRED: tl.constexpr, ACTOR_BLOCK: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_BINS: tl.constexpr, ACC: tl.constexpr,
):
    """Backward: the forward's tiles again, gradients only, times each loss's factor; every
    program strides over the tiles of each term with gradients to write. ``SKIP`` has one bit per
    output: skip that term's tiles when its factor is 1 (the buffers hold the forward's)."""
    first = tl.program_id(0).to(tl.int64)
    step = tl.num_programs(0)
    ACTOR_GRADS: tl.constexpr = (GRAD_RET | GRAD_REWARD | GRAD_VALUE | GRAD_CONT | GRAD_BASE
                                 | GRAD_LP | GRAD_ENT)
    if ACTOR_GRADS:
        factor, work = term_factor(grad_outs[T_ACTOR], keep_ptr, T_ACTOR, (SKIP >> T_ACTOR) & 1,
                                   ACC)
        if work:
            unit = scalar(actor_unit, ACC) * factor
            for tile in range(first, actor_programs, step):
                _actor_tile(ret_ptr, w_ptr, scale_ptr, value_ptr, cont_ptr, base_ptr, lp_ptr,
                            ent_ptr, g_ret_ptr, g_reward_ptr, g_value_ptr, g_cont_ptr, g_base_ptr,
                            g_lp_ptr, g_ent_ptr, n_starts, H, tile, scalar(gamma, ACC),
                            scalar(lmbda, ACC), scalar(one_minus_lmbda, ACC), scalar(bonus, ACC),
                            unit, REINFORCE, NORMALIZE, HAS_BASE, HAS_ENT, WEIGHT_ENT, ADJOINT,
                            HAS_CONT, GRAD_RET, GRAD_REWARD, GRAD_VALUE, GRAD_CONT, GRAD_BASE,
                            GRAD_LP, GRAD_ENT, ACTOR_BLOCK, ACC)
    if GRAD_PRED:
        factor, work = term_factor(grad_outs[T_VALUE], keep_ptr, T_VALUE, (SKIP >> T_VALUE) & 1,
                                   ACC)
        if work:
            unit = scalar(critic_unit, ACC) * factor
            for tile in range(first, critic_programs, step):
                _critic_tile(pred_ptr, g_pred_ptr, bins_ptr, slow_ptr, ret_ptr, w_ptr,
                             n_starts * H, n_bins, tile, scalar(reg, ACC), unit, HAS_WEIGHTS,
                             TWO_HOT, SYMLOG_SPACE, HAS_SLOW, SLOW_LOGITS, True, ROWS,
                             BLOCK_BINS, ACC)
    if GRAD_R_PRED:
        factor, work = term_factor(grad_outs[T_REPLAY], keep_ptr, T_REPLAY,
                                   (SKIP >> T_REPLAY) & 1, ACC)
        if work:
            unit = scalar(replay_unit, ACC) * factor
            for tile in range(first, replay_programs, step):
                _replay_tile(r_pred_ptr, g_r_pred_ptr, bins_ptr, r_slow_ptr, r_reward_ptr,
                             r_done_ptr, r_term_ptr, boot_ptr, s_boot_b, s_boot_t, T,
                             replay_blocks, n_bins, tile, scalar(r_gamma, ACC),
                             scalar(r_lmbda, ACC), scalar(r_one_minus_lmbda, ACC),
                             scalar(reg, ACC), unit, TWO_HOT, SYMLOG_SPACE, HAS_SLOW,
                             R_SLOW_LOGITS, True, ROWS, BLOCK_BINS, ACC)


# ---------------------------------------------------------------------------------------------
# Host side: the returns and the scale
# ---------------------------------------------------------------------------------------------


_MODULE = sys.modules[__name__]


def _flat(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A tensor readable at flat contiguous offsets (itself when it is contiguous)."""
    return None if t is None else t.contiguous()


def _returns_floats(returns: Optional[ReturnOptions], scale: Optional[ScaleOptions]) -> list:
    floats = [0.0, 0.0, 0.0] if returns is None else [returns.gamma, returns.lmbda,
                                                        1.0 - returns.lmbda]
    if scale is None:
        return floats + [0.0, 1.0, 0.0, 1.0]
    return floats + [*scale.quantiles, scale.rate, scale.min_scale]


def _returns_ints(returns: Optional[ReturnOptions], scale_mode: int) -> list:
    if returns is None:
        return [0, scale_mode, 0, 0]
    return [1, scale_mode, int(returns.discount_loss),
            DISCOUNT_WEIGHTS.index(returns.discount_weights)]


def _scale_mode(scale: Optional[ScaleOptions]) -> int:
    """SCALE_ONE without normalisation, else SCALE_UPDATE or SCALE_READ."""
    if scale is None:
        return SCALE_ONE
    return SCALE_UPDATE if scale.update else SCALE_READ


def returns_tuning() -> tuple:
    """The module constants a returns launch is worked out from (the tests shrink them)."""
    return (SCAN_BLOCK, SELECT_BLOCK, NUM_WARPS)


class _ReturnsLaunch:
    """The returns kernel for inputs of one signature and the options ``(floats, ints)``: its
    outputs' shapes and dtypes, grid, sizes and constexprs, worked out once; call it as
    :func:`_launch_returns` without the options. The inputs are read flat: as they are where
    they are contiguous, else copied at each call."""

    __slots__ = ("floats", "tuning", "scan", "mode", "dtype", "shape", "device", "scale_dtype",
                 "scale_shape", "scale_device", "copied", "sizes", "launch")

    def __init__(self, reward, next_value, continuation, root, values, low,
                 floats: Sequence[float], ints: Sequence[int]):
        self.floats, self.tuning = tuple(floats), returns_tuning()
        scan, mode, discount, weights_code = ints
        self.scan, self.mode = scan, mode
        read = (reward, next_value, continuation, root) if scan else (values,)
        acc, acc_tl = acc_dtype(*read)
        self.dtype = acc if scan else values.dtype
        self.shape = reward.shape if scan else (0,)
        self.device = read[0].device
        self.scale_dtype = self.dtype if mode == SCALE_ONE else low.dtype
        self.scale_shape = () if mode != SCALE_NONE else (0,)
        self.scale_device = low.device
        self.copied = tuple(t is not None and not t.is_contiguous() for t in read)
        H = reward.shape[-2] if scan else 1
        n_starts = reward.numel() // H if scan else 0
        self.sizes = (n_starts, H, read[0].numel())
        # the statistics' buffers hold the returns' bits with SCALE_READ and SCALE_UPDATE
        buf = low.dtype if mode >= SCALE_READ else self.dtype
        programs = machinery.cdiv(n_starts, SCAN_BLOCK) if mode == SCALE_NONE else 1
        self.launch = machinery.Launch(_MODULE, "_returns_kernel", programs, dict(
            SCAN=bool(scan), SCALE=mode, HAS_CONT=bool(scan) and continuation is not None,
            HAS_ROOT=bool(scan) and root is not None, DISCOUNT=bool(discount),
            WEIGHTS=weights_code, KEY_BITS=64 if buf == torch.float64 else 32,
            SCAN_BLOCK=SCAN_BLOCK,
            SELECT_BLOCK=SELECT_BLOCK, ACC=acc_tl,
            BUF=tl.float64 if buf == torch.float64 else tl.float32, num_warps=NUM_WARPS))

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kernel's outputs, unwritten: ``(returns, weights, scale)``, the first two in
        float32 (float64 for a float64 input), empty without a scan, the scale empty with
        SCALE_NONE."""
        returns, weights = (torch.empty(self.shape, dtype=self.dtype, device=self.device)
                            for _ in range(2))
        scale = torch.empty(self.scale_shape, dtype=self.scale_dtype, device=self.scale_device)
        return returns, weights, scale

    def __call__(self, reward, next_value, continuation, root, values, low, high, low_out,
                 high_out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        outs = self.outputs()
        if self.scan:
            returns, weights = outs[0], outs[1]
            flat = [t.contiguous() if copy else t for t, copy in
                    zip((reward, next_value, continuation, root), self.copied)]
        else:
            returns = weights = values.contiguous() if self.copied[0] else values  # read
            flat = [returns, returns, None, None]
        scale = outs[2] if self.mode != SCALE_NONE else returns
        with machinery.on_device(returns):
            self.launch(*[returns if t is None else t for t in flat], returns, weights, low,
                        high, low_out, high_out, scale, *self.sizes, *self.floats)
        return outs


def _launch_returns(reward: Optional[torch.Tensor], next_value: Optional[torch.Tensor],
                    continuation: Optional[torch.Tensor], root: Optional[torch.Tensor],
                    values: Optional[torch.Tensor], low: torch.Tensor, high: torch.Tensor,
                    floats: list[float], ints: list[int], low_out: torch.Tensor,
                    high_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The returns kernel: ``(returns, weights, scale)`` (see :meth:`_ReturnsLaunch.outputs`),
    the returns and weights of the rollout when ``reward`` is given; with SCALE_UPDATE the
    updated statistics into ``low_out`` and ``high_out``. Without a rollout the quantiles are
    those of ``values``."""
    launch = _ReturnsLaunch(reward, next_value, continuation, root, values, low, floats, ints)
    return launch(reward, next_value, continuation, root, values, low, high, low_out, high_out)


def _returns_functional(reward: Optional[torch.Tensor], next_value: Optional[torch.Tensor],
                        continuation: Optional[torch.Tensor], root: Optional[torch.Tensor],
                        values: Optional[torch.Tensor], low: torch.Tensor, high: torch.Tensor,
                        floats: list[float], ints: list[int]) -> list[torch.Tensor]:
    """The returns kernel writing nothing it reads: ``(returns, weights, scale, low', high')``,
    the updated statistics in fresh tensors (written with SCALE_UPDATE only)."""
    new_low, new_high = torch.empty_like(low), torch.empty_like(high)
    outs = _launch_returns(reward, next_value, continuation, root, values, low, high, floats,
                           ints, new_low, new_high)
    return [*outs, new_low, new_high]


def _returns_functional_fake(reward, next_value, continuation, root, values, low, high, floats,
                             ints):
    outs = _ReturnsLaunch(reward, next_value, continuation, root, values, low, floats,
                          ints).outputs()
    return [*outs, torch.empty_like(low), torch.empty_like(high)]


# How torch.compile sees the returns kernel: a functional op, its updated statistics copied into
# the buffers after it (declaring the op as mutating them instead lets inductor hand out the
# buffer itself for a later ``low.clone()``, torch 2.13).
returns_op = torch.library.custom_op("fused_dreamer_loss::behavior_returns", _returns_functional,
                                     mutates_args=())
returns_op.register_fake(_returns_functional_fake)


class ReturnsCall:
    """The returns kernel of one entry point's prepared call (options, and inputs of one
    signature: :func:`fused_dreamer_loss.core.dispatch.call_key` of the entry point's own),
    the statistics updated in place (by the kernel; under torch.compile by a copy after the
    custom op); ``grid``: the scan alone, over a grid of start tiles. Its
    :class:`_ReturnsLaunch` is made from the first inputs and kept (made again where the module
    constants changed, or the number of ``values``, which all-gathered returns change with the
    world size). Call it with ``(reward, next_value, continuation, root, values, low,
    high)``: ``(returns, weights, scale)``."""

    __slots__ = ("floats", "ints", "launch")

    def __init__(self, returns: Optional[ReturnOptions], scale: Optional[ScaleOptions],
                 grid: bool = False):
        self.ints = _returns_ints(returns, SCALE_NONE if grid else _scale_mode(scale))
        self.floats = _returns_floats(returns, scale)
        self.launch: Optional[_ReturnsLaunch] = None

    def __call__(self, reward, next_value, continuation, root, values, low,
                 high) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            if torch.compiler.is_compiling():
                *outs, new_low, new_high = returns_op(reward, next_value, continuation, root,
                                                      values, low, high, self.floats, self.ints)
                if self.ints[1] == SCALE_UPDATE:
                    low.copy_(new_low)
                    high.copy_(new_high)
                return tuple(outs)
            launch = self.launch
            # the values' count is the world size's times (all-gathered): not in the key
            if (launch is None or launch.tuning != returns_tuning()
                    or values is not None and values.numel() != launch.sizes[2]):
                launch = self.launch = _ReturnsLaunch(reward, next_value, continuation, root,
                                                      values, low, self.floats, self.ints)
            return launch(reward, next_value, continuation, root, values, low, high, low, high)


def scale_values(returns: torch.Tensor, low: torch.Tensor, opts: ScaleOptions,
                 process_group=None) -> torch.Tensor:
    """The returns whose quantiles :func:`fused_dreamer_loss.behavior_v3.return_scale` takes:
    flat, all-gathered over ``process_group`` (in the buffers' dtype) when the statistics are
    updated."""
    values = returns.detach().reshape(-1)
    if process_group is not None and opts.update:
        values = reference.gather_returns(values.to(low.dtype), process_group)
    return values


# ---- λ-returns as a fused loss: the scan forward, the adjoint scan backward --------------------

REWARD_IN, VALUE_IN, CONT_IN, ROOT_IN = range(4)


def _returns_grad(inputs, i):
    t = inputs[i]
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


class _ReturnsPlan(machinery.TunedPlan):
    """The λ-returns loss's launches for inputs of one signature and ``(floats, ints)``: the
    scan (:class:`_ReturnsLaunch`) and the adjoint scan's grid, sizes and constexprs, worked out
    once. The gradients are made unwritten by the forward, written by the backward (they depend
    on the upstream gradient of every return)."""

    tunables = staticmethod(returns_tuning)

    def __init__(self, inputs: Sequence[Optional[torch.Tensor]], floats: Sequence[float],
                 ints: Sequence[int]):
        self.floats, self.ints, self.tuning = list(floats), list(ints), returns_tuning()
        reward = inputs[REWARD_IN]
        self.scan = _ReturnsLaunch(*inputs, None, reward, floats, [1, SCALE_NONE, *ints[2:4]])
        self.copied = tuple(t is not None and not t.is_contiguous()
                            for t in inputs[:CONT_IN + 1])
        H = reward.shape[-2]
        n_starts = reward.numel() // H
        self.sizes = (n_starts, H, *floats[:3])
        self.programs = machinery.cdiv(n_starts, SCAN_BLOCK)
        self.has_cont = inputs[CONT_IN] is not None
        self._launches: dict[tuple, machinery.Launch] = {}

    def forward(self, inputs, needs) -> tuple:
        """``([returns, weights], keep, grads)``, the gradients unwritten."""
        anchor = inputs[REWARD_IN]
        returns, weights, _ = self.scan(*inputs, None, anchor, anchor, anchor, anchor)
        keep = torch.empty(2, dtype=returns.dtype, device=returns.device)
        return [returns, weights], keep, [_returns_grad(inputs, i) if n else None
                                          for i, n in enumerate(needs)]

    def backward(self, inputs, keep, grad_outputs, grads, skip_if_one) -> None:
        """The adjoint scan for ``grad_outputs[0]`` (the weights are detached: no gradient)."""
        upstream = grad_outputs[0]
        flags = tuple([g is not None for g in grads[:CONT_IN + 1]])
        if upstream is None or True not in flags:
            return
        reward, value, cont = (t.contiguous() if copy else t
                               for t, copy in zip(inputs[:CONT_IN + 1], self.copied))
        scratch = torch.empty(reward.shape, dtype=keep.dtype, device=reward.device)
        launch = self._launches.get(flags)
        if launch is None:
            launch = self._launches[flags] = machinery.Launch(
                _MODULE, "_returns_bwd_kernel", self.programs, dict(
                    HAS_CONT=self.has_cont, GRAD_REWARD=flags[REWARD_IN],
                    GRAD_VALUE=flags[VALUE_IN], GRAD_CONT=flags[CONT_IN], BLOCK=SCAN_BLOCK,
                    ACC=acc_dtype(keep)[1], num_warps=NUM_WARPS))
        launch(upstream.contiguous(), reward, value, reward if cont is None else cont, scratch,
               *[g if g is not None else scratch for g in grads[:CONT_IN + 1]], *self.sizes)


def _returns_forward(inputs, floats, ints, needs):
    """Launch the forward on validated inputs (see :func:`machinery.planned_forward`)."""
    return machinery.planned_forward(_ReturnsPlan(inputs, floats, ints), inputs, needs)


def _returns_forward_fake(inputs, floats, ints, needs):
    anchor = inputs[REWARD_IN]
    outs = _ReturnsLaunch(*inputs, None, anchor, floats, [1, SCALE_NONE, *ints[2:4]]).outputs()
    keep = torch.empty(2, dtype=outs[0].dtype, device=outs[0].device)
    return [*outs[:2], keep, *(_returns_grad(inputs, i) for i, n in enumerate(needs) if n)]


def _returns_backward(inputs, floats, ints, keep, grad_outputs, grads, skip_if_one):
    """Launch the backward (see :meth:`_ReturnsPlan.backward`)."""
    _ReturnsPlan(inputs, floats, ints).backward(inputs, keep, grad_outputs, grads, skip_if_one)


def _returns_encode(opts: ReturnOptions, shapes) -> tuple[list[float], list[int]]:
    return _returns_floats(opts, None), _returns_ints(opts, SCALE_NONE)


def _returns_reference(inputs, opts: ReturnOptions, shapes):
    reward, value, cont, root = inputs
    return [reference.lambda_returns(reward, value, cont, opts, shapes.dtype),
            reference.discount_weights(root, shapes.steps, opts, shapes.dtype, reward.device)]


RETURNS_KERNELS = machinery.register(machinery.LossKernels(
    name="behavior_returns", terms=lambda ints, n: (0,) * n, forward=_returns_forward,
    forward_fake=_returns_forward_fake, backward=_returns_backward, empty_grad=_returns_grad,
    encode=_returns_encode, reference=_returns_reference, plan=_ReturnsPlan,
))


def returns_call(opts: ReturnOptions, shapes) -> machinery.KeptCall:
    """The λ-returns as a fused loss for one ``(opts, shapes)``, kept per signature by
    :func:`fused_dreamer_loss.behavior_v3.lambda_returns` (see :func:`run_lambda_returns`)."""
    return machinery.KeptCall(RETURNS_KERNELS, opts, shapes)


def run_lambda_returns(prepared: machinery.KeptCall, reward, next_value, continuation,
                       root_continuation) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fused_dreamer_loss.behavior_v3.lambda_returns` on validated inputs."""
    roots = None if root_continuation is None else root_continuation.detach()  # no gradient
    returns, weights = prepared([reward, next_value, continuation, roots])
    return returns, weights.detach()


# ---------------------------------------------------------------------------------------------
# Host side: the terms
# ---------------------------------------------------------------------------------------------

#: The inputs of the terms loss, in order (:func:`run_terms` takes them by these names).
TERMS_INPUTS = ("returns", "weights", "scale", "reward", "next_value", "continuation",
                "baseline", "log_prob", "entropy", "value_pred", "slow_value", "bins",
                "replay_pred", "replay_reward", "replay_done", "replay_terminated", "bootstrap",
                "replay_slow")
(RETURNS, WEIGHTS, SCALE, REWARD, NEXT_VALUE, CONTINUATION, BASELINE, LOG_PROB, ENTROPY,
 VALUE_PRED, SLOW_VALUE, BINS, REPLAY_PRED, REPLAY_REWARD, REPLAY_DONE, REPLAY_TERMINATED,
 BOOTSTRAP, REPLAY_SLOW) = range(len(TERMS_INPUTS))
#: The inputs whose gradient the actor loss gives.
ACTOR_INPUTS = (RETURNS, REWARD, NEXT_VALUE, CONTINUATION, BASELINE, LOG_PROB, ENTROPY)


@dataclass(frozen=True, eq=False)
class TermsOptions:
    """The segments of one terms call and their options: the actor, the critic on the imagined
    steps (``critic`` with ``imagined``), the replay rows (``replay``, sharing ``critic``),
    ``returns`` for the adjoint scan of the whole objective's reparameterised actor, the replay
    term's weight."""

    actor: Optional[ActorOptions] = None
    critic: Optional[CriticOptions] = None
    imagined: bool = False
    replay: Optional[ReplayOptions] = None
    returns: Optional[ReturnOptions] = None
    replay_weight: float = 1.0


@dataclass(frozen=True)
class TermsShapes:
    """Each segment's loss dtype (None: no segment) and whether the slow values are logits."""

    actor_dtype: Optional[torch.dtype] = None
    critic_dtype: Optional[torch.dtype] = None
    replay_dtype: Optional[torch.dtype] = None
    slow_logits: bool = False
    replay_slow_logits: bool = False
    replay_steps: Optional[torch.Size] = None


def _outputs(ints: Sequence[int]) -> list[str]:
    """The losses in the order the kernels write them: the one statement of that order."""
    actor, critic, replay = ints[0], ints[1], ints[2]
    return ([*(["loss_actor", "actor_entropy"] if actor else []),
             *(["loss_value", "value_slow_loss"] if critic else []),
             *(["loss_replay_value"] if replay else [])])


def _term_indices(ints: Sequence[int]) -> tuple[int, int, int]:
    """The output index of the actor, critic and replay losses (0 for an absent segment: no
    program reads it)."""
    index = {name: i for i, name in enumerate(_outputs(ints))}
    return (index.get("loss_actor", 0), index.get("loss_value", 0),
            index.get("loss_replay_value", 0))


def _terms(ints: Sequence[int], n_inputs: int) -> tuple[int, ...]:
    t_actor, t_value, t_replay = _term_indices(ints)
    terms = [0] * n_inputs
    for i in ACTOR_INPUTS:
        terms[i] = t_actor
    terms[VALUE_PRED], terms[REPLAY_PRED] = t_value, t_replay
    return tuple(terms)


#: The option flags in the ints of the terms loss, in order (the loss dtypes follow).
_FLAGS = ("actor", "critic", "replay", "reinforce", "normalize", "weight_entropy", "two_hot",
          "symlog_space", "has_slow", "slow_logits", "replay_slow_logits", "sum")


def _terms_encode(opts: TermsOptions, shapes: TermsShapes) -> tuple[list[float], list[int]]:
    actor, critic, replay, returns = opts.actor, opts.critic, opts.replay, opts.returns
    floats = [returns.gamma if returns else 0.0, returns.lmbda if returns else 0.0,
              1.0 - returns.lmbda if returns else 0.0,
              actor.entropy_bonus if actor and actor.has_entropy else 0.0,
              critic.slow_critic_regularization if critic else 0.0,
              replay.gamma if replay else 0.0, replay.lmbda if replay else 0.0,
              1.0 - replay.lmbda if replay else 0.0, opts.replay_weight]
    flags = [actor is not None, critic is not None and opts.imagined, replay is not None,
             bool(actor and actor.use_reinforce), bool(actor and actor.normalize_advantage),
             bool(actor and actor.weight_entropy), bool(critic and critic.two_hot),
             bool(critic and critic.two_hot_space == "symlog"), bool(critic and critic.has_slow),
             shapes.slow_logits, shapes.replay_slow_logits,
             bool(critic and critic.reduction == "sum")]
    dtypes = [d for d, n in ((shapes.actor_dtype, 2), (shapes.critic_dtype, 2),
                             (shapes.replay_dtype, 1)) if d is not None for _ in range(n)]
    return floats, [int(f) for f in flags] + [dtype_code(d) for d in dtypes]


@dataclass(frozen=True)
class _Options:
    """The launchers' view of :class:`TermsOptions` (see :func:`_terms_encode`)."""

    gamma: float
    lmbda: float
    one_minus_lmbda: float
    bonus: float
    reg: float
    replay_gamma: float
    replay_lmbda: float
    replay_one_minus_lmbda: float
    replay_weight: float
    flags: dict
    loss_dtypes: tuple[torch.dtype, ...]

    @classmethod
    def decode(cls, floats: Sequence[float], ints: Sequence[int]) -> "_Options":
        flags = dict(zip(_FLAGS, (bool(i) for i in ints[:len(_FLAGS)])))
        return cls(*floats[:9], flags, tuple(code_dtype(c) for c in ints[len(_FLAGS):]))


def _rows_per_tile(block_bins: int) -> int:
    return max(1, CRITIC_TILE // block_bins)


def tuning() -> tuple:
    """The module constants a terms plan is worked out from (the tests shrink them)."""
    return (ACTOR_BLOCK, CRITIC_TILE, NUM_WARPS, machinery.FINALIZE_BLOCK)


#: The inputs both terms kernels read, in their argument order: all but the reward (the actor
#: reads none: the reward's gradient is the adjoint itself).
_READ = tuple(i for i in range(len(TERMS_INPUTS)) if i != REWARD)
#: The inputs whose gradients the kernels write, in their argument order.
_GRADS = (RETURNS, REWARD, NEXT_VALUE, CONTINUATION, BASELINE, LOG_PROB, ENTROPY, VALUE_PRED,
          REPLAY_PRED)


class _TermsPlan(machinery.TunedPlan):
    """Both terms kernels' launches for inputs of one signature (shapes, strides, dtypes, device,
    which are absent) and the options ``(floats, ints)``: the segments' grids, the sizes, scalars
    and constexprs, worked out once; :meth:`forward` and :meth:`backward` then only allocate and
    launch.

    The kernels read every input flat, as it is where it is contiguous, else copied at each call
    (:meth:`_args`), but the replay's bootstrap, which they read as ``[B, T]`` (its batch dims
    merged) with its strides where it has such a view."""

    tunables = staticmethod(tuning)

    def __init__(self, inputs: Sequence[Optional[torch.Tensor]], floats: Sequence[float],
                 ints: Sequence[int]):
        self.floats, self.ints, self.tuning = list(floats), list(ints), tuning()
        o = self.o = _Options.decode(floats, ints)
        f = o.flags
        present = [i for i, t in enumerate(inputs) if t is not None]
        self.anchor = present[0]  # the pointer passed for an absent input (never read)
        n_starts, H, n_bins, T, s_boot, replay_blocks, B = 0, 1, 2, 2, (0, 0), 1, 0
        if f["actor"] or f["critic"]:
            H = inputs[RETURNS].shape[-2]
            n_starts = inputs[RETURNS].numel() // H
        pred = inputs[VALUE_PRED] if f["critic"] else inputs[REPLAY_PRED]
        if f["two_hot"]:
            n_bins = pred.shape[-1]
        block_bins = machinery.next_power_of_2(n_bins)
        rows = _rows_per_tile(block_bins) if f["two_hot"] else CRITIC_TILE
        # RETURNS without an actor or critic is only the device's anchor (never read)
        read = [i for i in present if i != BOOTSTRAP and (f["actor"] or f["critic"]
                                                           or i != RETURNS)]
        copied = [i for i in read if not inputs[i].is_contiguous()]
        if f["replay"]:  # [*B, T, ·] steps, read as B = prod(*B) rows of T
            steps = inputs[REPLAY_PRED].shape[:-1]
            B, T = math.prod(steps[:-1]), steps[-1]
            try:
                s_boot = inputs[BOOTSTRAP].view(B, T).stride()
            except RuntimeError:  # batch dims that do not merge: read through a copy
                copied.append(BOOTSTRAP)
                s_boot = (T, 1)
            replay_blocks = machinery.cdiv(T, rows)
        self.copied = tuple(copied)
        self.actor_programs = machinery.cdiv(n_starts, ACTOR_BLOCK) if f["actor"] else 0
        self.critic_programs = machinery.cdiv(n_starts * H, rows) if f["critic"] else 0
        self.replay_programs = B * replay_blocks if f["replay"] else 0
        self.programs = self.actor_programs + self.critic_programs + self.replay_programs
        anchor = inputs[self.anchor]
        self.device = anchor.device
        self.backward_programs = min(self.programs, backward_programs(self.device))
        self.acc, acc = acc_dtype(*inputs)
        self.grad_specs = [None if t is None else (t.shape, contiguous_strides(t.shape), t.dtype)
                           for t in inputs]
        steps = n_starts * H
        count = 1.0 if f["sum"] else 1.0 / max(steps, 1)
        replay_count = 1.0 if f["sum"] else 1.0 / (B * (T - 1)) if f["replay"] else 0.0
        self.sizes = (n_starts, H, n_bins, T, *s_boot, replay_blocks, self.actor_programs,
                      self.critic_programs)
        self.scalars = (o.gamma, o.lmbda, o.one_minus_lmbda, o.bonus, o.reg, o.replay_gamma,
                        o.replay_lmbda, o.replay_one_minus_lmbda, 1.0 / max(steps, 1), count,
                        o.replay_weight * replay_count)
        self.meta = dict(
            REINFORCE=f["reinforce"], NORMALIZE=f["normalize"],
            HAS_BASE=inputs[BASELINE] is not None, HAS_ENT=inputs[ENTROPY] is not None,
            WEIGHT_ENT=f["weight_entropy"],
            ADJOINT=inputs[REWARD] is not None and not f["reinforce"],
            HAS_CONT=inputs[CONTINUATION] is not None, HAS_WEIGHTS=inputs[WEIGHTS] is not None,
            TWO_HOT=f["two_hot"], SYMLOG_SPACE=f["symlog_space"], HAS_SLOW=f["has_slow"],
            SLOW_LOGITS=f["slow_logits"], R_SLOW_LOGITS=f["replay_slow_logits"],
            ACTOR_BLOCK=ACTOR_BLOCK, ROWS=rows, BLOCK_BINS=block_bins, ACC=acc,
            num_warps=NUM_WARPS,
        )
        t_actor, t_value, t_replay = _term_indices(ints)
        self.bwd_meta = dict(T_ACTOR=t_actor, T_VALUE=t_value, T_REPLAY=t_replay)
        names = _outputs(ints)
        self.finalize = machinery.Finalize(self._ranges(names), [1.0] * len(names), acc)
        self._launches: dict[tuple, machinery.Launch] = {}

    def _ranges(self, names: Sequence[str]) -> list[tuple[int, int]]:
        """Each output's partials: the losses first, the second sums after all programs."""
        a, c, p = self.actor_programs, self.critic_programs, self.programs
        where = {"loss_actor": (0, a), "actor_entropy": (p, p + a), "loss_value": (a, a + c),
                 "value_slow_loss": (p + a, p + a + c), "loss_replay_value": (a + c, p)}
        return [where[name] for name in names]

    def _args(self, inputs, grads) -> list:
        """The arguments both kernels start with: the inputs they read and the gradients (a
        harmless pointer where absent: the constexpr flags keep the kernels off it)."""
        if self.copied:
            inputs = list(inputs)
            for i in self.copied:
                inputs[i] = inputs[i].contiguous()
        anchor = inputs[self.anchor]
        return [*[anchor if inputs[i] is None else inputs[i] for i in _READ],
                *[anchor if grads[i] is None else grads[i] for i in _GRADS]]

    def _launch(self, name: str, programs: int, flags: tuple[bool, ...],
                skip: Optional[tuple[bool, ...]]) -> machinery.Launch:
        """The launch of kernel ``name`` writing the gradients ``flags`` marks (in :data:`_GRADS`
        order; and, for the backward, leaving the terms in ``skip`` alone when their factor is
        1, see :func:`machinery.term_factor`), made once."""
        key = (name, flags, skip)
        launch = self._launches.get(key)
        if launch is None:
            extra = {} if skip is None else dict(self.bwd_meta, SKIP=machinery.bits(skip))
            meta = dict(self.meta, **dict(zip(
                ("GRAD_RET", "GRAD_REWARD", "GRAD_VALUE", "GRAD_CONT", "GRAD_BASE", "GRAD_LP",
                 "GRAD_ENT", "GRAD_PRED", "GRAD_R_PRED"), flags)), **extra)
            launch = self._launches[key] = machinery.Launch(_MODULE, name, programs, meta)
        return launch

    def forward(self, inputs, needs) -> tuple:
        """``(losses, keep, grads)``: the losses in :func:`_outputs` order, one gradient per
        input, made for a ``grad_output`` of 1, None where ``needs`` asks for none."""
        losses, partials, keep, grads = self.empty_forward(2 * self.programs, needs)
        flags = tuple([needs[i] for i in _GRADS])
        self._launch("_terms_fwd_kernel", self.programs, flags, None)(
            *self._args(inputs, grads), partials, *self.sizes, self.programs, *self.scalars)
        self.finalize(partials, losses, keep)
        return losses, keep, grads

    def backward(self, inputs, keep, grad_outputs, grads, skip_if_one) -> None:
        """``factor × gradient`` into each non-None ``grads[i]``."""
        flags = tuple([grads[i] is not None for i in _GRADS])
        if True not in flags:
            return
        launch = self._launch("_terms_bwd_kernel", self.backward_programs, flags,
                              tuple(skip_if_one))
        launch(*self._args(inputs, grads), keep,
               tuple([keep if g is None else g for g in grad_outputs]), *self.sizes,
               self.replay_programs, *self.scalars)


def _terms_grad(inputs, i):
    t = inputs[i]
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _terms_forward(inputs, floats, ints, needs):
    """Launch the forward on validated inputs (see :func:`machinery.planned_forward`)."""
    return machinery.planned_forward(_TermsPlan(inputs, floats, ints), inputs, needs)


def _terms_forward_fake(inputs, floats, ints, needs):
    return machinery.empty_outputs(inputs, _Options.decode(floats, ints).loss_dtypes, needs,
                                   _terms_grad)


def _terms_backward(inputs, floats, ints, keep, grad_outputs, grads, skip_if_one):
    """Launch the backward: ``factor × gradient`` into each non-None ``grads[i]``."""
    if any(g is not None for g in grads):
        _TermsPlan(inputs, floats, ints).backward(inputs, keep, grad_outputs, grads, skip_if_one)


def _terms_reference(inputs, opts: TermsOptions, shapes: TermsShapes):
    """The reference's losses in the kernels' output order, differentiable twice."""
    out = []
    returns = inputs[RETURNS]
    if opts.actor is not None:
        if inputs[REWARD] is not None and not opts.actor.use_reinforce:
            returns = reference.lambda_returns(inputs[REWARD], inputs[NEXT_VALUE],
                                               inputs[CONTINUATION], opts.returns,
                                               shapes.actor_dtype)
        losses = reference.actor_loss(returns, inputs[WEIGHTS], inputs[SCALE], inputs[BASELINE],
                                      inputs[LOG_PROB], inputs[ENTROPY], opts.actor,
                                      shapes.actor_dtype)
        out += [losses["loss_actor"], losses["actor_entropy"]]
    if opts.critic is not None and opts.imagined:
        losses = reference.value_loss(inputs[VALUE_PRED], inputs[RETURNS], inputs[WEIGHTS],
                                      inputs[SLOW_VALUE], opts.critic, shapes.slow_logits,
                                      shapes.critic_dtype)
        out += [losses["loss_value"], losses["value_slow_loss"]]
    if opts.replay is not None:
        loss = reference.replay_value_loss(
            inputs[REPLAY_PRED], inputs[REPLAY_REWARD], inputs[REPLAY_DONE],
            inputs[REPLAY_TERMINATED], inputs[BOOTSTRAP], inputs[REPLAY_SLOW], opts.replay,
            opts.critic, shapes.replay_steps, shapes.replay_slow_logits,
            shapes.replay_dtype)
        out.append(opts.replay_weight * loss)
    return out


TERMS_KERNELS = machinery.register(machinery.LossKernels(
    name="behavior_terms", terms=_terms, forward=_terms_forward,
    forward_fake=_terms_forward_fake, backward=_terms_backward, empty_grad=_terms_grad,
    encode=_terms_encode, reference=_terms_reference, plan=_TermsPlan,
))


@functools.lru_cache(maxsize=None)
def _default_bins(num_bins: int, device: torch.device) -> torch.Tensor:
    return reference.default_bins(num_bins, device)


def value_support(critic: CriticOptions, width: int, device: torch.device) -> torch.Tensor:
    """The two-hot bins on ``device``: the user's, or torchrl's default (built once per size and
    device in eager mode)."""
    if critic.value_bins is not None:  # read flat by the kernels; no gradient
        return critic.value_bins.detach().to(device=device).contiguous()
    if torch.compiler.is_compiling():
        return reference.default_bins(width, device)
    return _default_bins(width, device)


class TermsCall:
    """The terms loss for one ``(opts, shapes)``: the output names and the
    :class:`~fused_dreamer_loss.core.machinery.KeptCall` (the entry points keep one per
    signature of their own inputs, which fixes the terms' inputs')."""

    __slots__ = ("opts", "names", "kept")

    def __init__(self, opts: TermsOptions, shapes: TermsShapes):
        self.opts = opts
        self.names = _outputs(_terms_encode(opts, shapes)[1])
        self.kept = machinery.KeptCall(TERMS_KERNELS, opts, shapes)


def run_terms(prepared: TermsCall, **tensors: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The terms kernels of ``prepared`` on validated inputs, given by name (``returns=``,
    ``value_pred=``, ...): the losses by name."""
    opts = prepared.opts
    inputs = [tensors.get(name) for name in TERMS_INPUTS]
    if inputs[RETURNS] is None:  # the machinery reads the device from the first input: an
        # alias of the bootstrap (torch.compile refuses a tensor passed twice to a Function)
        inputs[RETURNS] = inputs[BOOTSTRAP].detach()
    critic = opts.critic
    if critic is not None and critic.two_hot:
        pred = inputs[VALUE_PRED] if opts.imagined else inputs[REPLAY_PRED]
        inputs[BINS] = value_support(critic, pred.shape[-1], pred.device)
    out = dict(zip(prepared.names, prepared.kept(inputs)))
    for name in ("actor_entropy", "value_slow_loss"):
        if name in out:
            out[name] = out[name].detach()
    return out
