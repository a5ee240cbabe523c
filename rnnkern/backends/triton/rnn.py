"""Elman RNN (tanh or ReLU) in Triton: h_t = act(xp_t + h_{t-1} W_hhᵀ + b_hh).

Forward: one kernel per step (the dot and the activation of a tile of hidden units), or one
launch for the whole time loop with W_hh held in registers (small H). Backward: per step
_common.grad_h_step_kernel (g, its norm) then rnn_backward_step_kernel (clip, act'), or one launch.
The workspace is empty: the backward reads act' from `out`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _common
from ._common import (clip_scale, step_rows, tanh, tile_sum, step_tile, loop_tile, loop_time,
                      loop_incoming_grad, recurrent_dots)


@triton.jit
def _act(pre, RELU: tl.constexpr):
    if RELU:
        # x < 0 (not x > 0) so that NaN passes through, as torch.relu does
        return tl.where(pre < 0, 0.0, pre)
    else:
        return tanh(pre)


@triton.jit
def _act_grad(h, dh, RELU: tl.constexpr):
    if RELU:
        # torch.relu backward: 0 where h <= 0, dh elsewhere (a NaN h lets dh through)
        return tl.where(h <= 0, 0.0, dh)
    else:
        return dh * (1.0 - h * h)


@triton.jit
def rnn_forward_step_kernel(step_rows_ptr, t, prev_row_ptr, xp_ptr, h0_ptr, w_hh_ptr, b_hh_ptr,
                            out_ptr, h_n_ptr, H,
                            RELU: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr,
                            BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
                            PREC: tl.constexpr):
    """Step t, a tile of rows × hidden units: out[row, j] = act(xp + h_prev @ W_hh[j]ᵀ + b_hh)."""
    b, row, row_mask, j, j_mask = step_tile(step_rows_ptr, t, H, BLOCK_B, BLOCK_H)
    prev = tl.load(prev_row_ptr + row, mask=row_mask, other=-1)
    acc, _, _, _ = recurrent_dots(out_ptr, h0_ptr, w_hh_ptr, prev, b, row_mask, j, j_mask, H, H, 1,
                                  BLOCK_B, BLOCK_H, BLOCK_K, ACC, PREC)
    tile = row_mask[:, None] & j_mask[None, :]
    pre = acc + tl.load(xp_ptr + row[:, None] * H + j[None, :], mask=tile, other=0.0).to(ACC)
    if HAS_BIAS:
        pre += tl.load(b_hh_ptr + j, mask=j_mask, other=0.0).to(ACC)[None, :]
    h = _act(pre, RELU).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row[:, None] * H + j[None, :], h, mask=tile)
    tl.store(h_n_ptr + b[:, None] * H + j[None, :], h, mask=tile)


@triton.jit
def rnn_forward_loop_kernel(step_rows_ptr, T, xp_ptr, h0_ptr, w_hh_ptr, b_hh_ptr, out_ptr, h_n_ptr,
                            B, H,
                            RELU: tl.constexpr, REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr,
                            BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, ACC: tl.constexpr,
                            PREC: tl.constexpr):
    """The whole time loop for one tile of samples; W_hhᵀ and h stay in registers."""
    b, b_mask, j, j_mask = loop_tile(B, H, BLOCK_B, BLOCK_H)
    w = tl.load(w_hh_ptr + j[None, :] * H + j[:, None], mask=j_mask[:, None] & j_mask[None, :],
                other=0.0)  # [k, j] = W_hh[j, k]
    bias = tl.zeros((BLOCK_H,), dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(b_hh_ptr + j, mask=j_mask, other=0.0).to(ACC)
    h = tl.load(h0_ptr + b[:, None] * H + j[None, :], mask=b_mask[:, None] & j_mask[None, :], other=0.0)
    for s in range(0, T):
        t = loop_time(s, T, False, REVERSE)
        row, active = step_rows(step_rows_ptr, t, b)
        tile = active[:, None] & j_mask[None, :]
        pre = tl.dot(h, w, input_precision=PREC, out_dtype=ACC)
        pre += tl.load(xp_ptr + row[:, None] * H + j[None, :], mask=tile, other=0.0).to(ACC)
        pre += bias[None, :]
        h_new = _act(pre, RELU).to(h.dtype)
        tl.store(out_ptr + row[:, None] * H + j[None, :], h_new, mask=tile)
        # (the padding columns stay 0: a dot's would be inf * 0 = NaN for an infinite h, and flow into
        # every column at the next step)
        h = tl.where(active[:, None] & j_mask[None, :], h_new, h)
    tl.store(h_n_ptr + b[:, None] * H + j[None, :], h, mask=b_mask[:, None] & j_mask[None, :])


@triton.jit
def rnn_backward_step_kernel(step_rows_ptr, t, g_ptr, norm2_ptr, clip_ptr, out_ptr, dgates_ptr, H,
                             norm2_tiles, norm2_stride,
                             RELU: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                             ACC: tl.constexpr):
    """Step t after grad_h_step_kernel: clip g with its (complete) row norm and apply act'."""
    clip = tl.load(clip_ptr)  # a tensor: a Python float would reach the kernel as float32
    b, row, row_mask, j, j_mask = step_tile(step_rows_ptr, t, H, BLOCK_B, BLOCK_H)
    tile = row_mask[:, None] & j_mask[None, :]
    scale = clip_scale(tl.sqrt(tile_sum(norm2_ptr, row, row_mask, norm2_tiles, norm2_stride)), clip)
    dh = tl.load(g_ptr + row[:, None] * H + j[None, :], mask=tile, other=0.0) * scale[:, None]
    h = tl.load(out_ptr + row[:, None] * H + j[None, :], mask=tile, other=0.0).to(ACC)
    tl.store(dgates_ptr + row[:, None] * H + j[None, :], _act_grad(h, dh, RELU), mask=tile)


@triton.jit
def rnn_backward_loop_kernel(step_rows_ptr, T, grad_out_ptr, grad_h_n_ptr, out_ptr, w_hh_ptr,
                             dgates_ptr, g_ptr, norm2_ptr, clip_ptr, B, N, H,
                             RELU: tl.constexpr, REVERSE: tl.constexpr, BLOCK_B: tl.constexpr,
                             BLOCK_H: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                             PREC: tl.constexpr):
    """The whole backward loop for one tile of samples; the carry dh and W_hh stay in registers.
    Writes g rows (unclipped), their Σg², dgates rows, and grad_h0 into g rows N.. ."""
    clip = tl.load(clip_ptr)  # a tensor: a Python float would reach the kernel as float32
    b, b_mask, j, j_mask = loop_tile(B, H, BLOCK_B, BLOCK_H)
    w = tl.load(w_hh_ptr + j[:, None] * H + j[None, :], mask=j_mask[:, None] & j_mask[None, :],
                other=0.0).to(DOT)  # [j, k] = W_hh[j, k]
    carry = tl.load(grad_h_n_ptr + b[:, None] * H + j[None, :], mask=b_mask[:, None] & j_mask[None, :],
                    other=0.0).to(ACC)
    for s in range(0, T):
        t = loop_time(s, T, True, REVERSE)
        row, active = step_rows(step_rows_ptr, t, b)
        tile = active[:, None] & j_mask[None, :]
        dh = loop_incoming_grad(carry, grad_out_ptr, g_ptr, norm2_ptr, row, active, j, j_mask, H, clip, ACC)
        h = tl.load(out_ptr + row[:, None] * H + j[None, :], mask=tile, other=0.0).to(ACC)
        dpre = _act_grad(h, dh, RELU)
        tl.store(dgates_ptr + row[:, None] * H + j[None, :], dpre, mask=tile)
        dh_prev = tl.dot(dpre.to(DOT), w, input_precision=PREC, out_dtype=ACC)
        carry = tl.where(active[:, None], dh_prev, carry)
    tl.store(g_ptr + (N + b)[:, None] * H + j[None, :], carry, mask=b_mask[:, None] & j_mask[None, :])


def forward(cell_relu, xp, plan, h0, w_hh, b_hh, out, h_n, types, wrap, loop):
    """Fill out [N, H] and h_n [B, H]."""
    H = w_hh.shape[1]
    block_b = _common.block_rows(plan.B)
    if loop:
        wrap(rnn_forward_loop_kernel)[(triton.cdiv(plan.B, block_b),)](
            plan.step_rows, plan.T, xp, h0, w_hh, b_hh if b_hh is not None else w_hh, out, h_n,
            plan.B, H, RELU=cell_relu, REVERSE=plan.reverse, HAS_BIAS=b_hh is not None,
            BLOCK_B=block_b, BLOCK_H=_common.pow2(H), ACC=types.acc, PREC=types.prec)
        return
    block_h = _common.block_cols(H)
    grid = (triton.cdiv(plan.B, block_b), triton.cdiv(H, block_h))
    for t in plan.order():
        wrap(rnn_forward_step_kernel)[grid](
            plan.step_rows, t, plan.prev_row, xp, h0, w_hh, b_hh if b_hh is not None else w_hh,
            out, h_n, H, RELU=cell_relu, HAS_BIAS=b_hh is not None, BLOCK_B=block_b,
            BLOCK_H=block_h, BLOCK_K=_common.block_k(H), ACC=types.acc, PREC=types.prec)


def backward(cell_relu, grad_out, grad_h_n, plan, w_hh, clip, out, dgates, g, norm2, types, wrap, loop):
    """Fill dgates [N, H], g [N+B, H] (rows N..: grad_h0) and norm2 [tiles, N+B] (per-tile Σg²; _common.norm_tiles)."""
    H = w_hh.shape[1]
    block_b = _common.block_rows(plan.B)
    if loop:
        wrap(rnn_backward_loop_kernel)[(triton.cdiv(plan.B, block_b),)](
            plan.step_rows, plan.T, grad_out, grad_h_n, out, w_hh, dgates, g, norm2, clip,
            plan.B, plan.N, H, RELU=cell_relu, REVERSE=plan.reverse, BLOCK_B=block_b,
            BLOCK_H=_common.pow2(H), ACC=types.acc, DOT=types.dot, PREC=types.prec)
        return
    block_h = _common.block_cols(H)
    grid = (triton.cdiv(plan.B, block_b), triton.cdiv(H, block_h))
    for t in plan.order(backward=True):
        _common.launch_grad_h_step(plan, t, grad_out, grad_h_n, dgates, w_hh, None, g, norm2,
                                   types, wrap)
        wrap(rnn_backward_step_kernel)[grid](
            plan.step_rows, t, g, norm2, clip, out, dgates, H, norm2.shape[0], norm2.stride(0),
            RELU=cell_relu, BLOCK_B=block_b,
            BLOCK_H=block_h, ACC=types.acc)
    _common.launch_grad_h_step(plan, plan.T, grad_out, grad_h_n, dgates, w_hh, None, g, norm2,
                               types, wrap)
