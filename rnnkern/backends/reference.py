"""The reference backend: the recurrence of design §3 in plain PyTorch ops, step by step.

It is the correctness oracle of the fused backends, so it is written for clarity, not speed: autograd
differentiates it, and the per-timestep norms and the clipping of design §2 are applied by
``_NormTap``, an identity whose backward sees the *total* gradient of each h_t (and c_t).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import _cells, _compat
from ..functional import batch_size_list
from . import Backend


class _NormTap(torch.autograd.Function):
    """Identity on a state h_t [b, F]. Its backward receives ∂L/∂h_t summed over every use of h_t
    (output, next step, h_n), records the per-row norm as the gradient of `probe` [b], and rescales
    the gradient to norm min(‖g‖, clip) when clip > 0."""

    @staticmethod
    def forward(ctx, state, probe, clip):
        ctx.clip = clip
        ctx.probe_dtype = None if probe is None else probe.dtype
        return state.clone()

    @staticmethod
    def backward(ctx, grad):
        # The norm in float64 (float32 squares underflow below ~1e-19: vanishing gradients would read 0);
        # the scaling in float32 (float64 for float64), as the fused kernels do.
        acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
        norm64 = torch.linalg.vector_norm(grad.to(torch.float64), dim=1)
        norm = norm64.to(acc)
        if ctx.clip > 0:
            # scale only where ‖g‖ > clip; NaN norms compare False and propagate unscaled. The scale from
            # the norm in float64: a float32 row's norm may pass float32's range (its scale would be 0).
            # (A tensor divided, not a number: `clip / norm` is computed as clip * (1 / norm), whose 1 / norm
            # overflows to inf in float32 for a norm below ~3e-39.)
            scale = torch.where(norm64 > ctx.clip, torch.full_like(norm64, ctx.clip) / norm64,
                                torch.ones_like(norm64)).to(acc)
            grad = (grad.to(acc) * scale.unsqueeze(1)).to(grad.dtype)
        probe_grad = None if ctx.probe_dtype is None else norm.to(ctx.probe_dtype)
        return grad, probe_grad, None


class _DualNormTap(_NormTap):
    """_NormTap with a forward-mode formula, for calls inside a forward-mode AD level (Dynamo traces no
    autograd.Function that defines jvp, so the plain one goes without)."""

    @staticmethod
    def jvp(ctx, state_tangent, _probe_tangent, _clip_tangent):
        return state_tangent.clone()  # an identity: the clipping acts on the backward only


def _tap(state: Tensor, probe: Optional[Tensor], clip: float) -> Tensor:
    if probe is None and clip <= 0:
        return state
    return (_DualNormTap if _compat.forward_ad_active() else _NormTap).apply(state, probe, clip)


def reference_layer(cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, clip, norm_probe):
    """One layer, one direction (docs/internals.md), differentiable by autograd.

    xp [N, G*H]; batch_sizes [T] int64 (CPU); h0 [B, P]; c0 [B, H] (LSTM); w_hh [G*H, P];
    b_hh [G*H] | None; w_hr [P, H] | None; norm_probe [2, N] | None (its gradient gets the norms).
    Returns out [N, P], h_n [B, P], c_n [B, H] (LSTM; else an empty tensor).
    """
    sizes = batch_size_list(batch_sizes, xp.shape[0], h0.shape[0])
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    steps = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    h, c = h0, c0
    outputs = [None] * len(sizes)
    for t in steps:
        size, start = sizes[t], offsets[t]
        rows = slice(start, start + size)
        full = size == h.shape[0]  # no slicing/concatenation when every sample is still running
        h_prev = h if full else h[:size]
        hp = torch.mm(h_prev, w_hh.t())
        if b_hh is not None:
            hp = hp + b_hh
        x_t = xp[rows]
        h_probe = None if norm_probe is None else norm_probe[0, rows]
        if cell == _cells.LSTM:
            i, f, g, o = (x_t + hp).chunk(4, dim=1)
            c_new = torch.sigmoid(f) * (c if full else c[:size]) + torch.sigmoid(i) * torch.tanh(g)
            c_new = _tap(c_new, None if norm_probe is None else norm_probe[1, rows], 0.0)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            if w_hr is not None:
                h_new = torch.mm(h_new, w_hr.t())
            c = c_new if full else torch.cat([c_new, c[size:]], dim=0)
        elif cell == _cells.GRU:
            xr, xz, xn = x_t.chunk(3, dim=1)
            hr, hz, hn = hp.chunk(3, dim=1)
            r = torch.sigmoid(xr + hr)
            z = torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            h_new = (h_prev - n) * z + n  # torch.nn's form: its autograd (NaN/Inf included) is theirs
        elif cell == _cells.RNN_TANH:
            h_new = torch.tanh(x_t + hp)
        elif cell == _cells.RNN_RELU:
            h_new = torch.relu(x_t + hp)
        else:
            raise ValueError(f"unknown cell id {cell}")
        h_new = _tap(h_new, h_probe, clip)
        outputs[t] = h_new
        h = h_new if full else torch.cat([h_new, h[size:]], dim=0)
    out = torch.cat(outputs, dim=0) if outputs else xp.new_empty((0, h0.shape[1]))
    c_n = c if cell == _cells.LSTM else xp.new_empty((0,))
    return out, h, c_n


class ReferenceBackend(Backend):
    """Plain PyTorch, every device and dtype torch supports; slow (one autograd node per op per step)."""

    name = "reference"

    def layer(self, cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, clip, norm_probe,
              xp_source=None):
        # (xp_source unused: these layers are differentiable as they are)
        if torch.jit.is_tracing():
            # (torch.nn's trace holds one op, and so do the fused backends': theirs run any shape)
            warnings.warn("rnnkern's reference backend runs the time loop in Python: this trace holds the "
                          "example input's sequence length and batch size only", torch.jit.TracerWarning)
        return reference_layer(cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, clip,
                               norm_probe)


BACKEND = ReferenceBackend()
