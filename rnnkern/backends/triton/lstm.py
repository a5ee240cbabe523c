"""LSTM (with optional projection) in Triton.

Forward per step: lstm_forward_step_kernel multiplies a tile of h_{t-1} by the W_hh rows of all four
gates (i, f, g, o) of a slice of hidden units and applies the gate math in registers; with a
projection, lstm_project_step_kernel then forms h_t = (o ⊙ tanh c_t) W_hrᵀ. For small sizes
lstm_forward_loop_kernel runs the whole time loop in one launch with the weights in registers.

Backward per step: _common.grad_h_step_kernel (g = grad_out + dgates_next W_hh, ‖g‖²), then
lstm_backward_step_kernel (clip, g W_hr, dc and ‖dc‖², gate gradients, dc to the previous step);
or lstm_backward_loop_kernel for the whole loop. Workspace [N, 5H]: i, f, g, o, c_t (acc dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (clip_scale, load_rows_or_init, sigmoid, step_rows, sum_sq, tanh, tile_sum,
                      step_tile, loop_tile, loop_time, loop_incoming_grad, recurrent_dots)


@triton.jit
def store_saved(ws_ptr, row, j, tile, H, gate_i, gate_f, gate_g, gate_o, c):
    """The workspace row of a step (docs/internals.md, LSTM: i, f, g, o, c)."""
    ws_ptrs = ws_ptr + row[:, None] * (5 * H) + j[None, :]
    tl.store(ws_ptrs, gate_i, mask=tile)
    tl.store(ws_ptrs + H, gate_f, mask=tile)
    tl.store(ws_ptrs + 2 * H, gate_g, mask=tile)
    tl.store(ws_ptrs + 3 * H, gate_o, mask=tile)
    tl.store(ws_ptrs + 4 * H, c, mask=tile)


@triton.jit
def load_saved(ws_ptr, row, j, tile, H):
    """(i, f, g, o, c) of the workspace row of a step, as store_saved wrote them."""
    ws_ptrs = ws_ptr + row[:, None] * (5 * H) + j[None, :]
    return (tl.load(ws_ptrs, mask=tile, other=0.0), tl.load(ws_ptrs + H, mask=tile, other=0.0),
            tl.load(ws_ptrs + 2 * H, mask=tile, other=0.0), tl.load(ws_ptrs + 3 * H, mask=tile, other=0.0),
            tl.load(ws_ptrs + 4 * H, mask=tile, other=0.0))


@triton.jit
def store_gate_grads(dgates_ptr, row, j, tile, H, dh, dc, gate_i, gate_f, gate_g, gate_o, tanh_c, c_prev):
    """The four gate gradients of a step (from the clipped dh and the total dc) into its dgates
    row; returned for the time-looped kernel's dh_{t-1} dots."""
    d_i = dc * gate_g * gate_i * (1.0 - gate_i)
    d_f = dc * c_prev * gate_f * (1.0 - gate_f)
    d_g = dc * gate_i * (1.0 - gate_g * gate_g)
    d_o = dh * tanh_c * gate_o * (1.0 - gate_o)
    d_ptrs = dgates_ptr + row[:, None] * (4 * H) + j[None, :]
    tl.store(d_ptrs, d_i, mask=tile)
    tl.store(d_ptrs + H, d_f, mask=tile)
    tl.store(d_ptrs + 2 * H, d_g, mask=tile)
    tl.store(d_ptrs + 3 * H, d_o, mask=tile)
    return d_i, d_f, d_g, d_o


@triton.jit
def lstm_forward_step_kernel(step_rows_ptr, t, prev_row_ptr, xp_ptr, h0_ptr, c0_ptr, w_hh_ptr,
                             b_hh_ptr, out_ptr, ws_ptr, h_n_ptr, c_n_ptr, h_pre_ptr, H, P,
                             HAS_BIAS: tl.constexpr, HAS_PROJ: tl.constexpr, BLOCK_B: tl.constexpr,
                             BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
                             PREC: tl.constexpr):
    """Step t, tile of rows × hidden units j: the 4 gate dots, c_t, o ⊙ tanh(c_t)."""
    b, row, row_mask, j, j_mask = step_tile(step_rows_ptr, t, H, BLOCK_B, BLOCK_H)
    prev = tl.load(prev_row_ptr + row, mask=row_mask, other=-1)
    acc_i, acc_f, acc_g, acc_o = recurrent_dots(out_ptr, h0_ptr, w_hh_ptr, prev, b, row_mask, j, j_mask,
                                                H, P, 4, BLOCK_B, BLOCK_H, BLOCK_K, ACC, PREC)
    tile = row_mask[:, None] & j_mask[None, :]
    x_ptrs = xp_ptr + row[:, None] * (4 * H) + j[None, :]
    acc_i += tl.load(x_ptrs, mask=tile, other=0.0).to(ACC)
    acc_f += tl.load(x_ptrs + H, mask=tile, other=0.0).to(ACC)
    acc_g += tl.load(x_ptrs + 2 * H, mask=tile, other=0.0).to(ACC)
    acc_o += tl.load(x_ptrs + 3 * H, mask=tile, other=0.0).to(ACC)
    if HAS_BIAS:
        acc_i += tl.load(b_hh_ptr + j, mask=j_mask, other=0.0).to(ACC)[None, :]
        acc_f += tl.load(b_hh_ptr + H + j, mask=j_mask, other=0.0).to(ACC)[None, :]
        acc_g += tl.load(b_hh_ptr + 2 * H + j, mask=j_mask, other=0.0).to(ACC)[None, :]
        acc_o += tl.load(b_hh_ptr + 3 * H + j, mask=j_mask, other=0.0).to(ACC)[None, :]
    c_prev = load_rows_or_init(ws_ptr + 4 * H, 5 * H, c0_ptr, H, prev, b, j, row_mask, j_mask).to(ACC)
    gate_i = sigmoid(acc_i)
    gate_f = sigmoid(acc_f)
    gate_g = tanh(acc_g)
    gate_o = sigmoid(acc_o)
    c = gate_f * c_prev + gate_i * gate_g
    h = (gate_o * tanh(c)).to(out_ptr.dtype.element_ty)
    store_saved(ws_ptr, row, j, tile, H, gate_i, gate_f, gate_g, gate_o, c)
    tl.store(c_n_ptr + b[:, None] * H + j[None, :], c.to(c_n_ptr.dtype.element_ty), mask=tile)
    if HAS_PROJ:
        tl.store(h_pre_ptr + b[:, None] * H + j[None, :], h, mask=tile)
    else:
        tl.store(out_ptr + row[:, None] * H + j[None, :], h, mask=tile)
        tl.store(h_n_ptr + b[:, None] * H + j[None, :], h, mask=tile)


@triton.jit
def lstm_project_step_kernel(step_rows_ptr, t, h_pre_ptr, w_hr_ptr, out_ptr, h_n_ptr, H, P,
                             BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                             ACC: tl.constexpr, PREC: tl.constexpr):
    """Step t with a projection: out[row, p] = h_pre[b] @ W_hr[p]ᵀ (h_pre [B, H], W_hr [P, H])."""
    b, row, row_mask, p, p_mask = step_tile(step_rows_ptr, t, P, BLOCK_B, BLOCK_P)
    acc = tl.zeros((BLOCK_B, BLOCK_P), dtype=ACC)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < H
        a = tl.load(h_pre_ptr + b[:, None] * H + k[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w = tl.load(w_hr_ptr + p[None, :] * H + k[:, None], mask=k_mask[:, None] & p_mask[None, :],
                    other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PREC, out_dtype=ACC)
    tile = row_mask[:, None] & p_mask[None, :]
    h = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row[:, None] * P + p[None, :], h, mask=tile)
    tl.store(h_n_ptr + b[:, None] * P + p[None, :], h, mask=tile)


@triton.jit
def lstm_forward_loop_kernel(step_rows_ptr, T, xp_ptr, h0_ptr, c0_ptr, w_hh_ptr, b_hh_ptr, w_hr_ptr,
                             out_ptr, ws_ptr, h_n_ptr, c_n_ptr, B, H, P,
                             REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PROJ: tl.constexpr,
                             BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
                             ACC: tl.constexpr, PREC: tl.constexpr):
    """The whole time loop for a tile of samples; W_hh (and W_hr), h and c stay in registers."""
    b, b_mask, j, j_mask = loop_tile(B, H, BLOCK_B, BLOCK_H)
    p = tl.arange(0, BLOCK_P)
    p_mask = p < P
    w_mask = p_mask[:, None] & j_mask[None, :]
    w_ptrs = w_hh_ptr + j[None, :] * P + p[:, None]  # [k, j] = W_hh[gate*H + j, k]
    w_i = tl.load(w_ptrs, mask=w_mask, other=0.0)
    w_f = tl.load(w_ptrs + H * P, mask=w_mask, other=0.0)
    w_g = tl.load(w_ptrs + 2 * H * P, mask=w_mask, other=0.0)
    w_o = tl.load(w_ptrs + 3 * H * P, mask=w_mask, other=0.0)
    bias_i = tl.zeros((BLOCK_H,), dtype=ACC)
    bias_f = tl.zeros((BLOCK_H,), dtype=ACC)
    bias_g = tl.zeros((BLOCK_H,), dtype=ACC)
    bias_o = tl.zeros((BLOCK_H,), dtype=ACC)
    if HAS_BIAS:
        bias_i = tl.load(b_hh_ptr + j, mask=j_mask, other=0.0).to(ACC)
        bias_f = tl.load(b_hh_ptr + H + j, mask=j_mask, other=0.0).to(ACC)
        bias_g = tl.load(b_hh_ptr + 2 * H + j, mask=j_mask, other=0.0).to(ACC)
        bias_o = tl.load(b_hh_ptr + 3 * H + j, mask=j_mask, other=0.0).to(ACC)
    if HAS_PROJ:
        # [k, p] = W_hr[p, k]
        w_r = tl.load(w_hr_ptr + p[None, :] * H + j[:, None], mask=j_mask[:, None] & p_mask[None, :],
                      other=0.0)
    h = tl.load(h0_ptr + b[:, None] * P + p[None, :], mask=b_mask[:, None] & p_mask[None, :], other=0.0)
    c = tl.load(c0_ptr + b[:, None] * H + j[None, :], mask=b_mask[:, None] & j_mask[None, :],
                other=0.0).to(ACC)
    for s in range(0, T):
        t = loop_time(s, T, False, REVERSE)
        row, active = step_rows(step_rows_ptr, t, b)
        tile = active[:, None] & j_mask[None, :]
        x_ptrs = xp_ptr + row[:, None] * (4 * H) + j[None, :]
        pre_i = tl.dot(h, w_i, input_precision=PREC, out_dtype=ACC) + bias_i[None, :]
        pre_f = tl.dot(h, w_f, input_precision=PREC, out_dtype=ACC) + bias_f[None, :]
        pre_g = tl.dot(h, w_g, input_precision=PREC, out_dtype=ACC) + bias_g[None, :]
        pre_o = tl.dot(h, w_o, input_precision=PREC, out_dtype=ACC) + bias_o[None, :]
        gate_i = sigmoid(pre_i + tl.load(x_ptrs, mask=tile, other=0.0).to(ACC))
        gate_f = sigmoid(pre_f + tl.load(x_ptrs + H, mask=tile, other=0.0).to(ACC))
        gate_g = tanh(pre_g + tl.load(x_ptrs + 2 * H, mask=tile, other=0.0).to(ACC))
        gate_o = sigmoid(pre_o + tl.load(x_ptrs + 3 * H, mask=tile, other=0.0).to(ACC))
        c_new = gate_f * c + gate_i * gate_g
        h_pre = (gate_o * tanh(c_new)).to(h.dtype)
        store_saved(ws_ptr, row, j, tile, H, gate_i, gate_f, gate_g, gate_o, c_new)
        if HAS_PROJ:  # (padding columns zeroed first: see rnn.py's loop)
            h_new = tl.dot(tl.where(tile, h_pre, 0.0), w_r, input_precision=PREC, out_dtype=ACC).to(h.dtype)
        else:
            h_new = h_pre
        tl.store(out_ptr + row[:, None] * P + p[None, :], h_new, mask=active[:, None] & p_mask[None, :])
        h = tl.where(active[:, None] & p_mask[None, :], h_new, h)  # (padding columns stay 0)
        c = tl.where(tile, c_new, c)
    tl.store(h_n_ptr + b[:, None] * P + p[None, :], h, mask=b_mask[:, None] & p_mask[None, :])
    tl.store(c_n_ptr + b[:, None] * H + j[None, :], c.to(c_n_ptr.dtype.element_ty),
             mask=b_mask[:, None] & j_mask[None, :])


@triton.jit
def lstm_backward_step_kernel(step_rows_ptr, t, prev_row_ptr, g_ptr, norm2_ptr, norm2_c_ptr, clip_ptr,
                              w_hr_ptr, ws_ptr, c0_ptr, dc_ptr, dgates_ptr, H, P, norm2_tiles,
                              norm2_stride,
                              HAS_PROJ: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                              BLOCK_K: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                              PREC: tl.constexpr):
    """Step t after grad_h_step_kernel, tile of rows × hidden units j: clip g with its complete row
    norm, dh = g W_hr (projection), dc (+ its Σdc² over this tile into norm2_c[tile]), the four gate gradients into
    dgates, and dc ⊙ f into dc[b] for the previous step (dc [B, H] holds grad_c_n at first)."""
    clip = tl.load(clip_ptr)  # a tensor: a Python float would reach the kernel as float32
    b, row, row_mask, j, j_mask = step_tile(step_rows_ptr, t, H, BLOCK_B, BLOCK_H)
    tile = row_mask[:, None] & j_mask[None, :]
    scale = clip_scale(tl.sqrt(tile_sum(norm2_ptr, row, row_mask, norm2_tiles, norm2_stride)), clip)
    if HAS_PROJ:
        acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC)
        for k0 in range(0, P, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < P
            g = tl.load(g_ptr + row[:, None] * P + k[None, :], mask=row_mask[:, None] & k_mask[None, :],
                        other=0.0)
            w = tl.load(w_hr_ptr + k[:, None] * H + j[None, :], mask=k_mask[:, None] & j_mask[None, :],
                        other=0.0)
            acc = tl.dot(g.to(DOT), w.to(DOT), acc, input_precision=PREC, out_dtype=ACC)
        dh = acc * scale[:, None]
    else:
        dh = tl.load(g_ptr + row[:, None] * H + j[None, :], mask=tile, other=0.0) * scale[:, None]
    gate_i, gate_f, gate_g, gate_o, c = load_saved(ws_ptr, row, j, tile, H)
    prev = tl.load(prev_row_ptr + row, mask=row_mask, other=-1)
    c_prev = load_rows_or_init(ws_ptr + 4 * H, 5 * H, c0_ptr, H, prev, b, j, row_mask, j_mask).to(ACC)
    dc_ptrs = dc_ptr + b[:, None] * H + j[None, :]
    tanh_c = tanh(c)
    dc = tl.load(dc_ptrs, mask=tile, other=0.0) + dh * gate_o * (1.0 - tanh_c * tanh_c)
    # (padding columns out of the sum: a projection's dot leaves NaN there for an infinite g)
    tl.store(norm2_c_ptr + tl.program_id(1) * norm2_stride + row, sum_sq(tl.where(tile, dc, 0.0)),
             mask=row_mask)
    store_gate_grads(dgates_ptr, row, j, tile, H, dh, dc, gate_i, gate_f, gate_g, gate_o, tanh_c, c_prev)
    tl.store(dc_ptrs, dc * gate_f, mask=tile)


@triton.jit
def lstm_backward_loop_kernel(step_rows_ptr, T, prev_row_ptr, grad_out_ptr, grad_h_n_ptr, w_hh_ptr,
                              w_hr_ptr, ws_ptr, c0_ptr, dc_ptr, dgates_ptr, g_ptr, norm2_ptr,
                              norm2_c_ptr, clip_ptr, B, N, H, P,
                              REVERSE: tl.constexpr, HAS_PROJ: tl.constexpr, BLOCK_B: tl.constexpr,
                              BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr,
                              DOT: tl.constexpr, PREC: tl.constexpr):
    """The whole backward loop for a tile of samples, carries and weights in registers. Writes g
    (unclipped) rows and their Σg², Σdc², dgates rows; grad_h0 into g rows N.., grad_c0 into dc."""
    clip = tl.load(clip_ptr)  # a tensor: a Python float would reach the kernel as float32
    b, b_mask, j, j_mask = loop_tile(B, H, BLOCK_B, BLOCK_H)
    p = tl.arange(0, BLOCK_P)
    p_mask = p < P
    w_mask = j_mask[:, None] & p_mask[None, :]
    w_ptrs = w_hh_ptr + j[:, None] * P + p[None, :]  # [j, k] = W_hh[gate*H + j, k]
    w_i = tl.load(w_ptrs, mask=w_mask, other=0.0).to(DOT)
    w_f = tl.load(w_ptrs + H * P, mask=w_mask, other=0.0).to(DOT)
    w_g = tl.load(w_ptrs + 2 * H * P, mask=w_mask, other=0.0).to(DOT)
    w_o = tl.load(w_ptrs + 3 * H * P, mask=w_mask, other=0.0).to(DOT)
    if HAS_PROJ:
        # [p, j] = W_hr[p, j]
        w_r = tl.load(w_hr_ptr + p[:, None] * H + j[None, :], mask=p_mask[:, None] & j_mask[None, :],
                      other=0.0).to(DOT)
    state_p = b_mask[:, None] & p_mask[None, :]
    state_h = b_mask[:, None] & j_mask[None, :]
    carry_h = tl.load(grad_h_n_ptr + b[:, None] * P + p[None, :], mask=state_p, other=0.0).to(ACC)
    carry_c = tl.load(dc_ptr + b[:, None] * H + j[None, :], mask=state_h, other=0.0).to(ACC)
    for s in range(0, T):
        t = loop_time(s, T, True, REVERSE)
        row, active = step_rows(step_rows_ptr, t, b)
        tile = active[:, None] & j_mask[None, :]
        g = loop_incoming_grad(carry_h, grad_out_ptr, g_ptr, norm2_ptr, row, active, p, p_mask, P, clip, ACC)
        if HAS_PROJ:
            dh = tl.dot(g.to(DOT), w_r, input_precision=PREC, out_dtype=ACC)
        else:
            dh = g
        gate_i, gate_f, gate_g, gate_o, c = load_saved(ws_ptr, row, j, tile, H)
        prev = tl.load(prev_row_ptr + row, mask=active, other=-1)
        c_prev = load_rows_or_init(ws_ptr + 4 * H, 5 * H, c0_ptr, H, prev, b, j, active,
                                   j_mask).to(ACC)
        tanh_c = tanh(c)
        dc = tl.where(tile, carry_c + dh * gate_o * (1.0 - tanh_c * tanh_c), 0.0)
        tl.store(norm2_c_ptr + row, sum_sq(dc), mask=active)
        d_i, d_f, d_g, d_o = store_gate_grads(dgates_ptr, row, j, tile, H, dh, dc, gate_i, gate_f, gate_g,
                                              gate_o, tanh_c, c_prev)
        dh_prev = tl.dot(d_i.to(DOT), w_i, input_precision=PREC, out_dtype=ACC)
        dh_prev = tl.dot(d_f.to(DOT), w_f, dh_prev, input_precision=PREC, out_dtype=ACC)
        dh_prev = tl.dot(d_g.to(DOT), w_g, dh_prev, input_precision=PREC, out_dtype=ACC)
        dh_prev = tl.dot(d_o.to(DOT), w_o, dh_prev, input_precision=PREC, out_dtype=ACC)
        carry_h = tl.where(active[:, None], dh_prev, carry_h)
        carry_c = tl.where(active[:, None], dc * gate_f, carry_c)
    tl.store(g_ptr + (N + b)[:, None] * P + p[None, :], carry_h, mask=state_p)
    tl.store(dc_ptr + b[:, None] * H + j[None, :], carry_c, mask=state_h)


def forward(xp, plan, h0, c0, w_hh, b_hh, w_hr, out, h_n, c_n, workspace, types, wrap, loop):
    """Fill out [N, P], h_n [B, P], c_n [B, H] and the workspace [N, 5H]."""
    H = w_hh.shape[0] // 4
    P = h0.shape[1]
    has_proj = w_hr is not None
    bias = b_hh if b_hh is not None else w_hh
    block_b = _common.block_rows(plan.B)
    if loop:
        wrap(lstm_forward_loop_kernel)[(triton.cdiv(plan.B, block_b),)](
            plan.step_rows, plan.T, xp, h0, c0, w_hh, bias, w_hr if has_proj else w_hh, out,
            workspace, h_n, c_n, plan.B, H, P, REVERSE=plan.reverse, HAS_BIAS=b_hh is not None,
            HAS_PROJ=has_proj, BLOCK_B=block_b, BLOCK_H=_common.pow2(H), BLOCK_P=_common.pow2(P),
            ACC=types.acc, PREC=types.prec)
        return
    h_pre = xp.new_empty((plan.B, H)) if has_proj else out
    block_h = _common.block_cols(H)
    block_p = _common.block_cols(P)
    grid = (triton.cdiv(plan.B, block_b), triton.cdiv(H, block_h))
    grid_p = (triton.cdiv(plan.B, block_b), triton.cdiv(P, block_p))
    for t in plan.order():
        wrap(lstm_forward_step_kernel)[grid](
            plan.step_rows, t, plan.prev_row, xp, h0, c0, w_hh, bias, out, workspace, h_n, c_n, h_pre,
            H, P, HAS_BIAS=b_hh is not None, HAS_PROJ=has_proj, BLOCK_B=block_b, BLOCK_H=block_h,
            BLOCK_K=_common.block_k(P), ACC=types.acc, PREC=types.prec)
        if has_proj:
            wrap(lstm_project_step_kernel)[grid_p](
                plan.step_rows, t, h_pre, w_hr, out, h_n, H, P, BLOCK_B=block_b, BLOCK_P=block_p,
                BLOCK_K=_common.block_k(H), ACC=types.acc, PREC=types.prec)


def backward(grad_out, grad_h_n, plan, c0, w_hh, w_hr, clip, workspace, dc, dgates, g, norm2_h, norm2_c, types,
             wrap, loop):
    """Fill dgates [N, 4H], g [N+B, P] (rows N..: grad_h0), norm2_h [P tiles, N+B] and norm2_c
    [H tiles, N+B] (per-tile Σg², Σdc²; _common.norm_tiles) and leave
    grad_c0 in dc [B, H] (which holds grad_c_n on entry)."""
    H = w_hh.shape[0] // 4
    P = w_hh.shape[1]
    has_proj = w_hr is not None
    w_hr_arg = w_hr if has_proj else w_hh
    block_b = _common.block_rows(plan.B)
    if loop:
        wrap(lstm_backward_loop_kernel)[(triton.cdiv(plan.B, block_b),)](
            plan.step_rows, plan.T, plan.prev_row, grad_out, grad_h_n, w_hh, w_hr_arg, workspace, c0,
            dc, dgates, g, norm2_h, norm2_c, clip, plan.B, plan.N, H, P, REVERSE=plan.reverse,
            HAS_PROJ=has_proj, BLOCK_B=block_b, BLOCK_H=_common.pow2(H), BLOCK_P=_common.pow2(P),
            ACC=types.acc, DOT=types.dot, PREC=types.prec)
        return
    block_h = _common.block_cols(H)
    grid = (triton.cdiv(plan.B, block_b), triton.cdiv(H, block_h))
    for t in plan.order(backward=True):
        _common.launch_grad_h_step(plan, t, grad_out, grad_h_n, dgates, w_hh, None, g, norm2_h,
                                   types, wrap)
        wrap(lstm_backward_step_kernel)[grid](
            plan.step_rows, t, plan.prev_row, g, norm2_h, norm2_c, clip, w_hr_arg, workspace, c0,
            dc, dgates, H, P, norm2_h.shape[0], norm2_h.stride(0), HAS_PROJ=has_proj, BLOCK_B=block_b, BLOCK_H=block_h,
            BLOCK_K=_common.block_k(P), ACC=types.acc, DOT=types.dot, PREC=types.prec)
    _common.launch_grad_h_step(plan, plan.T, grad_out, grad_h_n, dgates, w_hh, None, g, norm2_h,
                               types, wrap)


def unprojected_output(workspace: torch.Tensor, hidden: int) -> torch.Tensor:
    """o ⊙ tanh(c_t) for every row [N, H] (acc dtype), from the workspace: the projection's input."""
    return workspace[:, 3 * hidden:4 * hidden] * torch.tanh(workspace[:, 4 * hidden:5 * hidden])
