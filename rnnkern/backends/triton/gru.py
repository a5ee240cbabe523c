"""GRU in Triton (torch.nn.GRU's definition: b_hn stays inside r ⊙ (h W_hnᵀ + b_hn)).

Forward per step: gru_forward_step_kernel, the three gate dots of a slice of hidden units and the
gate math; or gru_forward_loop_kernel for the whole loop (small H). Backward per step:
_common.grad_h_step_kernel (g = grad_out + dgates_h,next W_hh + z_next ⊙ g_next, ‖g‖²), then
gru_backward_step_kernel (clip, gate gradients, z ⊙ g for the previous step); or the loop kernel.
Workspace [N, 4H]: r, z, n, hn = h_{t-1} W_hnᵀ + b_hn (acc dtype).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _common
from ._common import (clip_scale, load_rows_or_init, sigmoid, step_rows, tanh, tile_sum, step_tile,
                      loop_tile, loop_time, loop_incoming_grad, recurrent_dots)


@triton.jit
def store_saved(ws_ptr, row, j, tile, H, gate_r, gate_z, gate_n, hn):
    """The workspace row of a step (docs/internals.md, GRU: r, z, n, and hn = W_hn h + b_hn)."""
    ws_ptrs = ws_ptr + row[:, None] * (4 * H) + j[None, :]
    tl.store(ws_ptrs, gate_r, mask=tile)
    tl.store(ws_ptrs + H, gate_z, mask=tile)
    tl.store(ws_ptrs + 2 * H, gate_n, mask=tile)
    tl.store(ws_ptrs + 3 * H, hn, mask=tile)


@triton.jit
def load_saved(ws_ptr, row, j, tile, H):
    """(r, z, n, hn) of the workspace row of a step, as store_saved wrote them."""
    ws_ptrs = ws_ptr + row[:, None] * (4 * H) + j[None, :]
    return (tl.load(ws_ptrs, mask=tile, other=0.0), tl.load(ws_ptrs + H, mask=tile, other=0.0),
            tl.load(ws_ptrs + 2 * H, mask=tile, other=0.0), tl.load(ws_ptrs + 3 * H, mask=tile, other=0.0))


@triton.jit
def store_gate_grads(grad_xp_ptr, dgates_ptr, row, j, tile, H, dh, h_prev, gate_r, gate_z, gate_n, hn):
    """A step's gate gradients (from the clipped dh): w.r.t. the x side (grad_xp rows: r, z, n, input
    dtype) and the h side (dgates rows: r, z, and n scaled by r, since hn entered as r ⊙ hn);
    returns (d_r, d_z, d_hn) for the time-looped kernel's dh_{t-1} dots."""
    d_n = (dh - dh * gate_z) * (1.0 - gate_n * gate_n)  # (as torch.nn's: see cell_math.h)
    d_z = dh * (h_prev - gate_n) * gate_z * (1.0 - gate_z)
    d_r = d_n * hn * gate_r * (1.0 - gate_r)
    d_hn = d_n * gate_r
    x_ptrs = grad_xp_ptr + row[:, None] * (3 * H) + j[None, :]
    xdt = grad_xp_ptr.dtype.element_ty
    tl.store(x_ptrs, d_r.to(xdt), mask=tile)
    tl.store(x_ptrs + H, d_z.to(xdt), mask=tile)
    tl.store(x_ptrs + 2 * H, d_n.to(xdt), mask=tile)
    d_ptrs = dgates_ptr + row[:, None] * (3 * H) + j[None, :]
    tl.store(d_ptrs, d_r, mask=tile)
    tl.store(d_ptrs + H, d_z, mask=tile)
    tl.store(d_ptrs + 2 * H, d_hn, mask=tile)
    return d_r, d_z, d_hn


@triton.jit
def gru_forward_step_kernel(step_rows_ptr, t, prev_row_ptr, xp_ptr, h0_ptr, w_hh_ptr, b_hh_ptr,
                            out_ptr, ws_ptr, h_n_ptr, H,
                            HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                            BLOCK_K: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Step t, tile of rows × hidden units j: the r, z, n dots and h_t."""
    b, row, row_mask, j, j_mask = step_tile(step_rows_ptr, t, H, BLOCK_B, BLOCK_H)
    prev = tl.load(prev_row_ptr + row, mask=row_mask, other=-1)
    acc_r, acc_z, acc_n, _ = recurrent_dots(out_ptr, h0_ptr, w_hh_ptr, prev, b, row_mask, j, j_mask, H, H,
                                            3, BLOCK_B, BLOCK_H, BLOCK_K, ACC, PREC)
    if HAS_BIAS:
        acc_r += tl.load(b_hh_ptr + j, mask=j_mask, other=0.0).to(ACC)[None, :]
        acc_z += tl.load(b_hh_ptr + H + j, mask=j_mask, other=0.0).to(ACC)[None, :]
        acc_n += tl.load(b_hh_ptr + 2 * H + j, mask=j_mask, other=0.0).to(ACC)[None, :]
    tile = row_mask[:, None] & j_mask[None, :]
    x_ptrs = xp_ptr + row[:, None] * (3 * H) + j[None, :]
    gate_r = sigmoid(acc_r + tl.load(x_ptrs, mask=tile, other=0.0).to(ACC))
    gate_z = sigmoid(acc_z + tl.load(x_ptrs + H, mask=tile, other=0.0).to(ACC))
    gate_n = tanh(tl.load(x_ptrs + 2 * H, mask=tile, other=0.0).to(ACC) + gate_r * acc_n)
    h_prev_j = load_rows_or_init(out_ptr, H, h0_ptr, H, prev, b, j, row_mask, j_mask).to(ACC)
    h = ((1.0 - gate_z) * gate_n + gate_z * h_prev_j).to(out_ptr.dtype.element_ty)
    store_saved(ws_ptr, row, j, tile, H, gate_r, gate_z, gate_n, acc_n)
    tl.store(out_ptr + row[:, None] * H + j[None, :], h, mask=tile)
    tl.store(h_n_ptr + b[:, None] * H + j[None, :], h, mask=tile)


@triton.jit
def gru_forward_loop_kernel(step_rows_ptr, T, xp_ptr, h0_ptr, w_hh_ptr, b_hh_ptr, out_ptr, ws_ptr,
                            h_n_ptr, B, H,
                            REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr,
                            BLOCK_H: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """The whole time loop for a tile of samples; W_hh and h stay in registers."""
    b, b_mask, j, j_mask = loop_tile(B, H, BLOCK_B, BLOCK_H)
    w_mask = j_mask[:, None] & j_mask[None, :]
    w_ptrs = w_hh_ptr + j[None, :] * H + j[:, None]  # [k, j] = W_hh[gate*H + j, k]
    w_r = tl.load(w_ptrs, mask=w_mask, other=0.0)
    w_z = tl.load(w_ptrs + H * H, mask=w_mask, other=0.0)
    w_n = tl.load(w_ptrs + 2 * H * H, mask=w_mask, other=0.0)
    bias_r = tl.zeros((BLOCK_H,), dtype=ACC)
    bias_z = tl.zeros((BLOCK_H,), dtype=ACC)
    bias_n = tl.zeros((BLOCK_H,), dtype=ACC)
    if HAS_BIAS:
        bias_r = tl.load(b_hh_ptr + j, mask=j_mask, other=0.0).to(ACC)
        bias_z = tl.load(b_hh_ptr + H + j, mask=j_mask, other=0.0).to(ACC)
        bias_n = tl.load(b_hh_ptr + 2 * H + j, mask=j_mask, other=0.0).to(ACC)
    h = tl.load(h0_ptr + b[:, None] * H + j[None, :], mask=b_mask[:, None] & j_mask[None, :], other=0.0)
    for s in range(0, T):
        t = loop_time(s, T, False, REVERSE)
        row, active = step_rows(step_rows_ptr, t, b)
        tile = active[:, None] & j_mask[None, :]
        x_ptrs = xp_ptr + row[:, None] * (3 * H) + j[None, :]
        pre_r = tl.dot(h, w_r, input_precision=PREC, out_dtype=ACC) + bias_r[None, :]
        pre_z = tl.dot(h, w_z, input_precision=PREC, out_dtype=ACC) + bias_z[None, :]
        hn = tl.dot(h, w_n, input_precision=PREC, out_dtype=ACC) + bias_n[None, :]
        gate_r = sigmoid(pre_r + tl.load(x_ptrs, mask=tile, other=0.0).to(ACC))
        gate_z = sigmoid(pre_z + tl.load(x_ptrs + H, mask=tile, other=0.0).to(ACC))
        gate_n = tanh(tl.load(x_ptrs + 2 * H, mask=tile, other=0.0).to(ACC) + gate_r * hn)
        h_new = ((1.0 - gate_z) * gate_n + gate_z * h.to(ACC)).to(h.dtype)
        store_saved(ws_ptr, row, j, tile, H, gate_r, gate_z, gate_n, hn)
        tl.store(out_ptr + row[:, None] * H + j[None, :], h_new, mask=tile)
        h = tl.where(tile, h_new, h)  # (padding columns stay 0: see rnn.py's loop)
    tl.store(h_n_ptr + b[:, None] * H + j[None, :], h, mask=b_mask[:, None] & j_mask[None, :])


@triton.jit
def gru_backward_step_kernel(step_rows_ptr, t, prev_row_ptr, g_ptr, norm2_ptr, clip_ptr, ws_ptr,
                             out_ptr, h0_ptr, dgates_ptr, grad_xp_ptr, carry_ptr, H, norm2_tiles,
                             norm2_stride,
                             BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, ACC: tl.constexpr):
    """Step t after grad_h_step_kernel: clip g with its complete row norm, gate gradients w.r.t.
    the x side (grad_xp, input dtype) and the h side (dgates, n scaled by r), carry[b] = z ⊙ g."""
    clip = tl.load(clip_ptr)  # a tensor: a Python float would reach the kernel as float32
    b, row, row_mask, j, j_mask = step_tile(step_rows_ptr, t, H, BLOCK_B, BLOCK_H)
    tile = row_mask[:, None] & j_mask[None, :]
    scale = clip_scale(tl.sqrt(tile_sum(norm2_ptr, row, row_mask, norm2_tiles, norm2_stride)), clip)
    dh = tl.load(g_ptr + row[:, None] * H + j[None, :], mask=tile, other=0.0) * scale[:, None]
    gate_r, gate_z, gate_n, hn = load_saved(ws_ptr, row, j, tile, H)
    prev = tl.load(prev_row_ptr + row, mask=row_mask, other=-1)
    h_prev = load_rows_or_init(out_ptr, H, h0_ptr, H, prev, b, j, row_mask, j_mask).to(ACC)
    store_gate_grads(grad_xp_ptr, dgates_ptr, row, j, tile, H, dh, h_prev, gate_r, gate_z, gate_n, hn)
    tl.store(carry_ptr + b[:, None] * H + j[None, :], dh * gate_z, mask=tile)


@triton.jit
def gru_backward_loop_kernel(step_rows_ptr, T, prev_row_ptr, grad_out_ptr, grad_h_n_ptr, w_hh_ptr,
                             ws_ptr, out_ptr, h0_ptr, dgates_ptr, grad_xp_ptr, g_ptr, norm2_ptr, clip_ptr,
                             B, N, H,
                             REVERSE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                             ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """The whole backward loop for a tile of samples, the carry and W_hh in registers. Writes g
    (unclipped) rows, their Σg², dgates and grad_xp rows, and grad_h0 into g rows N.. ."""
    clip = tl.load(clip_ptr)  # a tensor: a Python float would reach the kernel as float32
    b, b_mask, j, j_mask = loop_tile(B, H, BLOCK_B, BLOCK_H)
    w_mask = j_mask[:, None] & j_mask[None, :]
    w_ptrs = w_hh_ptr + j[:, None] * H + j[None, :]  # [j, k] = W_hh[gate*H + j, k]
    w_r = tl.load(w_ptrs, mask=w_mask, other=0.0).to(DOT)
    w_z = tl.load(w_ptrs + H * H, mask=w_mask, other=0.0).to(DOT)
    w_n = tl.load(w_ptrs + 2 * H * H, mask=w_mask, other=0.0).to(DOT)
    state = b_mask[:, None] & j_mask[None, :]
    carry = tl.load(grad_h_n_ptr + b[:, None] * H + j[None, :], mask=state, other=0.0).to(ACC)
    for s in range(0, T):
        t = loop_time(s, T, True, REVERSE)
        row, active = step_rows(step_rows_ptr, t, b)
        tile = active[:, None] & j_mask[None, :]
        dh = loop_incoming_grad(carry, grad_out_ptr, g_ptr, norm2_ptr, row, active, j, j_mask, H, clip, ACC)
        gate_r, gate_z, gate_n, hn = load_saved(ws_ptr, row, j, tile, H)
        prev = tl.load(prev_row_ptr + row, mask=active, other=-1)
        h_prev = load_rows_or_init(out_ptr, H, h0_ptr, H, prev, b, j, active, j_mask).to(ACC)
        d_r, d_z, d_hn = store_gate_grads(grad_xp_ptr, dgates_ptr, row, j, tile, H, dh, h_prev, gate_r,
                                          gate_z, gate_n, hn)
        dh_prev = tl.dot(d_r.to(DOT), w_r, dh * gate_z, input_precision=PREC, out_dtype=ACC)
        dh_prev = tl.dot(d_z.to(DOT), w_z, dh_prev, input_precision=PREC, out_dtype=ACC)
        dh_prev = tl.dot(d_hn.to(DOT), w_n, dh_prev, input_precision=PREC, out_dtype=ACC)
        carry = tl.where(active[:, None], dh_prev, carry)
    tl.store(g_ptr + (N + b)[:, None] * H + j[None, :], carry, mask=state)


def forward(xp, plan, h0, w_hh, b_hh, out, h_n, workspace, types, wrap, loop):
    """Fill out [N, H], h_n [B, H] and the workspace [N, 4H]."""
    H = w_hh.shape[1]
    bias = b_hh if b_hh is not None else w_hh
    block_b = _common.block_rows(plan.B)
    if loop:
        wrap(gru_forward_loop_kernel)[(triton.cdiv(plan.B, block_b),)](
            plan.step_rows, plan.T, xp, h0, w_hh, bias, out, workspace, h_n, plan.B, H,
            REVERSE=plan.reverse, HAS_BIAS=b_hh is not None, BLOCK_B=block_b,
            BLOCK_H=_common.pow2(H), ACC=types.acc, PREC=types.prec)
        return
    block_h = _common.block_cols(H)
    grid = (triton.cdiv(plan.B, block_b), triton.cdiv(H, block_h))
    for t in plan.order():
        wrap(gru_forward_step_kernel)[grid](
            plan.step_rows, t, plan.prev_row, xp, h0, w_hh, bias, out, workspace, h_n, H,
            HAS_BIAS=b_hh is not None, BLOCK_B=block_b, BLOCK_H=block_h,
            BLOCK_K=_common.block_k(H), ACC=types.acc, PREC=types.prec)


def backward(grad_out, grad_h_n, plan, h0, w_hh, clip, out, workspace, dgates, grad_xp, g, norm2,
             types, wrap, loop):
    """Fill dgates [N, 3H] (h side), grad_xp [N, 3H] (x side), g [N+B, H] (rows N..: grad_h0) and
    norm2 [tiles, N+B] (per-tile Σg²; _common.norm_tiles)."""
    H = w_hh.shape[1]
    block_b = _common.block_rows(plan.B)
    if loop:
        wrap(gru_backward_loop_kernel)[(triton.cdiv(plan.B, block_b),)](
            plan.step_rows, plan.T, plan.prev_row, grad_out, grad_h_n, w_hh, workspace, out, h0,
            dgates, grad_xp, g, norm2, clip, plan.B, plan.N, H, REVERSE=plan.reverse,
            BLOCK_B=block_b, BLOCK_H=_common.pow2(H), ACC=types.acc, DOT=types.dot,
            PREC=types.prec)
        return
    carry = g.new_empty((plan.B, H))
    block_h = _common.block_cols(H)
    grid = (triton.cdiv(plan.B, block_b), triton.cdiv(H, block_h))
    for t in plan.order(backward=True):
        _common.launch_grad_h_step(plan, t, grad_out, grad_h_n, dgates, w_hh, carry, g, norm2,
                                   types, wrap)
        wrap(gru_backward_step_kernel)[grid](
            plan.step_rows, t, plan.prev_row, g, norm2, clip, workspace, out, h0, dgates, grad_xp,
            carry, H, norm2.shape[0], norm2.stride(0), BLOCK_B=block_b, BLOCK_H=block_h, ACC=types.acc)
    _common.launch_grad_h_step(plan, plan.T, grad_out, grad_h_n, dgates, w_hh, carry, g, norm2,
                               types, wrap)
