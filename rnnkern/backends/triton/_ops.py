"""The Triton layer ops (docs/internals.md signatures) as torch.library.triton_op, with autograd.

rnnkern::triton_rnn_layer_forward / rnnkern::triton_rnn_layer_backward run the recurrence in the
cell modules' kernels (lstm.py, gru.py, rnn.py); the input projection lives in the driver and the
weight gradients are large GEMMs here, after the loop. Every step of the bookkeeping is a device
torch op or a kernel launch whose row range is read on the device, so torch.compile traces the
ops (triton_op makes the kernels visible to Inductor).

Under the Triton interpreter the kernels are plain Python, which would run on fake tensors while
tracing; there the ops are opaque custom_ops instead (same names and schemas), launching the kernels
as they are, so opcheck and torch.compile work on CPU tensors too. Either way the fake kernels are the
shared ones of _layer_ops (the explicit shapes of docs/internals.md).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.library import custom_op, triton_op, wrap_triton

from ... import _cells
from .._layer_ops import register_layer_op
from . import _common, gru, lstm, rnn


# the op definer: triton_op for real kernels, custom_op under the interpreter (see above)
_define = custom_op if _common.INTERPRETER else triton_op


def _run_interpreted(kernel):
    """The interpreted kernel as it is: inside an opaque custom_op there is nothing for wrap_triton to
    record, and some torch releases (2.11) reject interpreted kernels there ("wrap_triton only works
    on functions annotated with triton.jit or triton.autotune")."""
    return kernel


# how the cell modules launch a kernel
_wrap = _run_interpreted if _common.INTERPRETER else wrap_triton


def _launch(cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse):
    n_rows, batch = xp.shape[0], h0.shape[0]
    plan = _common.step_plan(batch_sizes, n_rows, batch, reverse, xp.device)
    hidden = w_hh.shape[0] // _cells.GATES[cell]
    loop = _common.use_loop(_cells.GATES[cell], hidden, h0.shape[1], w_hr is not None, xp.dtype)
    return plan, hidden, loop, _common.kernel_types(xp.dtype)


def _check(cell, xp, h0, w_hh):
    if cell not in _cells.GATES:
        raise ValueError(f"rnnkern triton: unknown cell id {cell}")
    if xp.dim() != 2 or h0.dim() != 2 or w_hh.dim() != 2:
        raise ValueError("rnnkern triton: xp, h0 and w_hh must be 2-D")
    if xp.dtype not in _common.TL_DTYPES:
        raise TypeError(f"rnnkern triton: unsupported dtype {xp.dtype}")


@_define("rnnkern::triton_rnn_layer_forward", mutates_args=())
def triton_rnn_layer_forward(cell: int, xp: Tensor, batch_sizes: Tensor, h0: Tensor,
                             c0: Optional[Tensor], w_hh: Tensor, b_hh: Optional[Tensor],
                             w_hr: Optional[Tensor], reverse: bool, clip: float,
                             norm_probe: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One layer, one direction. xp [N, G*H]; batch_sizes [T] int64 (CPU); h0 [B, P]; c0 [B, H]
    (LSTM); w_hh [G*H, P]; b_hh [G*H]; w_hr [P, H]; norm_probe unused (its gradient is the norms).
    Returns out [N, P], h_n [B, P], c_n [B, H] (LSTM) or [0], workspace [N, S*H] (acc dtype)."""
    _check(cell, xp, h0, w_hh)
    xp, h0, w_hh = xp.contiguous(), h0.contiguous(), w_hh.contiguous()
    b_hh = None if b_hh is None else b_hh.contiguous()
    plan, hidden, loop, types = _launch(cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse)
    n_rows, (batch, size_h) = xp.shape[0], h0.shape
    out = xp.new_empty((n_rows, size_h))
    h_n = xp.new_empty((batch, size_h))
    workspace = xp.new_empty((n_rows, _cells.WORKSPACE_SLOTS[cell] * hidden), dtype=types.acc_torch)
    if cell == _cells.LSTM:
        c0 = xp.new_zeros((batch, hidden)) if c0 is None else c0.contiguous()
        w_hr = None if w_hr is None else w_hr.contiguous()
        c_n = xp.new_empty((batch, hidden))
        lstm.forward(xp, plan, h0, c0, w_hh, b_hh, w_hr, out, h_n, c_n, workspace, types,
                     _wrap, loop)
    elif cell == _cells.GRU:
        c_n = xp.new_empty((0,))
        gru.forward(xp, plan, h0, w_hh, b_hh, out, h_n, workspace, types, _wrap, loop)
    else:
        c_n = xp.new_empty((0,))
        rnn.forward(cell == _cells.RNN_RELU, xp, plan, h0, w_hh, b_hh, out, h_n, types,
                    _wrap, loop)
    return out, h_n, c_n, workspace


@_define("rnnkern::triton_rnn_layer_backward", mutates_args=())
def triton_rnn_layer_backward(cell: int, grad_out: Tensor, grad_h_n: Tensor,
                              grad_c_n: Optional[Tensor], batch_sizes: Tensor, h0: Tensor,
                              c0: Optional[Tensor], w_hh: Tensor, b_hh: Optional[Tensor],
                              w_hr: Optional[Tensor], reverse: bool, clip: float, record_norms: bool,
                              out: Tensor, workspace: Tensor
                              ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward of triton_rnn_layer_forward (docs/internals.md): returns grad_xp [N, G*H],
    grad_h0 [B, P], grad_c0 [B, H] or [0], grad_w_hh [G*H, P], grad_b_hh [G*H] or [0],
    grad_w_hr [P, H] or [0], norms [2, N] float32 (‖g_t‖, ‖dc_t‖ per row; zeros unless
    record_norms). Norms are computed by the kernels that produce g and dc."""
    _check(cell, out, h0, w_hh)
    dtype = out.dtype
    grad_out, grad_h_n, h0, w_hh = (grad_out.contiguous(), grad_h_n.contiguous(), h0.contiguous(),
                                    w_hh.contiguous())
    out = out.contiguous()
    plan, hidden, loop, types = _launch(cell, out, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse)
    acc = types.acc_torch
    n_rows, (batch, size_h) = out.shape[0], h0.shape
    dgates = out.new_empty((n_rows, w_hh.shape[0]), dtype=acc)
    g = out.new_empty((n_rows + batch, size_h), dtype=acc)
    # Σ g² and Σ dc² per row, in float64 (see sum_sq). Two separate tensors, not views of one: under
    # torch.compile the kernels' mutations are functionalised per argument, and mutated views of a
    # shared base came back wrong on the GPU (the c row).
    # Per column tile of the kernels that produce g and dc (summed in a fixed order: deterministic).
    norm2_h = out.new_zeros((_common.norm_tiles(size_h, loop), n_rows + batch), dtype=torch.float64)
    norm2_c = out.new_zeros((_common.norm_tiles(hidden, loop), n_rows + batch), dtype=torch.float64)
    # the clip threshold reaches the kernels as a tensor in the accumulation dtype
    clip_t = torch.full((1,), clip, dtype=acc, device=out.device)
    grad_xp = None
    grad_c0 = out.new_empty((0,))
    grad_w_hr = out.new_empty((0,))
    if cell == _cells.LSTM:
        dc = (out.new_zeros((batch, hidden), dtype=acc) if grad_c_n is None
              else grad_c_n.to(acc).contiguous().clone())
        c0_used = out.new_zeros((batch, hidden)) if c0 is None else c0.contiguous()
        w_hr_used = None if w_hr is None else w_hr.contiguous()
        lstm.backward(grad_out, grad_h_n, plan, c0_used, w_hh, w_hr_used, clip_t, workspace,
                      dc, dgates, g, norm2_h, norm2_c, types, _wrap, loop)
        if c0 is not None:
            grad_c0 = dc.to(dtype)
    elif cell == _cells.GRU:
        grad_xp = out.new_empty((n_rows, w_hh.shape[0]))
        gru.backward(grad_out, grad_h_n, plan, h0, w_hh, clip_t, out, workspace, dgates, grad_xp, g,
                     norm2_h, types, _wrap, loop)
    else:
        rnn.backward(cell == _cells.RNN_RELU, grad_out, grad_h_n, plan, w_hh, clip_t, out, dgates,
                     g, norm2_h, types, _wrap, loop)
    norm = torch.stack((norm2_h.sum(0)[:n_rows], norm2_c.sum(0)[:n_rows])).sqrt()
    if grad_xp is None:
        grad_xp = dgates.to(dtype)
    grad_h0 = g[n_rows:].to(dtype, copy=True)  # an own tensor, not a view into g
    # the weight gradients: large GEMMs over every row, outside the recurrence
    h_prev = _common.previous_states(plan, out, h0).to(acc)
    grad_w_hh = torch.mm(dgates.t(), h_prev).to(dtype)
    grad_b_hh = dgates.sum(0).to(dtype) if b_hh is not None else out.new_empty((0,))
    if cell == _cells.LSTM and w_hr is not None:
        g_clipped = g[:n_rows] * _common.clip_factor(norm[0], clip).to(g.dtype).unsqueeze(1)
        grad_w_hr = torch.mm(g_clipped.t(), lstm.unprojected_output(workspace, hidden)).to(dtype)
    if record_norms:
        norms = norm.to(torch.float32)
    else:
        norms = out.new_zeros((2, n_rows), dtype=torch.float32)
    return grad_xp, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr, norms


register_layer_op(triton_rnn_layer_forward, triton_rnn_layer_backward)
