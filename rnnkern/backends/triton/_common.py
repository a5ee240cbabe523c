"""Pieces every Triton cell shares: activations, clipping, two-source row loads, the backward's
grad-h step kernel, the packed-step bookkeeping and the backend's settings.

Conventions of all kernels (see docs/internals.md for the layer-op contract):
- Rows follow the packed layout. Kernels never read batch_sizes on the host: a launch for step `t`
  reads `(row offset, row count)` from the device table `step_rows[t]` and masks rows `b >= count`,
  so the whole op traces under torch.compile (the host only knows T, B and N, which are shapes).
- `prev_row[r]` is the row of the same sample at the previous processed step, or -1 where that
  sample starts from h0/c0; `next_row[r]` the row at the next processed step, or -1 at the sample's
  final step (where grad_h_n / grad_c_n enter the backward).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _layer_ops

# The interpreter is decided when triton.jit wraps our kernels, i.e. at import of this package.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _interpreter_probe_kernel(out_ptr, steps):
    # a time loop over a run-time bound, as the cells' loop kernels and the packed steps have
    total = tl.zeros((2,), dtype=tl.float32)
    for _ in range(0, steps):
        total += 1.0
    tl.store(out_ptr + tl.arange(0, 2), total)


_interpreter_fault: Optional[str] = None
_interpreter_probed = False


def interpreter_fault() -> Optional[str]:
    """Why this Triton's interpreter cannot run the kernels, or None; probed once by a small kernel.
    (Triton 3.6's interpreter takes int() of a one-element array for a run-time loop bound, which NumPy
    2.4 and newer refuse.)"""
    global _interpreter_fault, _interpreter_probed
    if not _interpreter_probed:
        try:
            # real tensors, whatever mode the first caller runs in (fake tensors, a meta device context)
            with torch.utils._python_dispatch._disable_current_modes():
                out = torch.zeros(2, device="cpu")
                _interpreter_probe_kernel[(1,)](out, 3)
            fault = None if out.tolist() == [3.0, 3.0] else f"a loop of 3 steps gave {out.tolist()}"
        except Exception as error:  # any failure: the interpreter cannot run the kernels here
            fault = f"{type(error).__name__}: {error}"
        if fault is not None:
            import numpy

            fault = (f"this Triton's interpreter (triton {triton.__version__}, numpy {numpy.__version__}) "
                     f"fails on a kernel with a run-time loop bound ({fault})")
        _interpreter_fault, _interpreter_probed = fault, True
    return _interpreter_fault


@dataclass
class Settings:
    """Run-time switches (plain attributes, read at each call).

    variant: "auto" (time-looped kernel when the weights fit on chip, else per-step kernels),
             "step" or "loop" to force one. None (default): env var RNNKERN_TRITON_VARIANT, read
             at each call, else "auto".
    allow_tf32: let float32 dots use TF32 tensor cores (faster, ~1e-3 relative error). None
             (default): env var RNNKERN_TRITON_TF32=1 read at each call; off otherwise, so that
             float32 is computed exactly ("ieee").
    loop_max_weight_bytes: the size rule of "auto": the time-looped kernel keeps every weight
             tile on chip for the whole loop, G*BH*BP (+ BH*BP for a projection) elements of the
             input dtype, BH/BP the padded hidden/projection sizes. Compiled for sm_90, the
             backward loop kernels take about twice that in shared memory (the dot operands), so
             64 KiB of weights stays well under the 227 KiB a block may use.
    """

    variant: Optional[str] = None
    allow_tf32: Optional[bool] = None
    loop_max_weight_bytes: int = 65536
    # Caps on the tile extents (rows per program, columns per program of the per-step kernels);
    # None: the defaults. Tests set 16 to run several tiles per row / per step on tiny sizes.
    max_block_rows: Optional[int] = None
    max_block_cols: Optional[int] = None

    def current_variant(self) -> str:
        return self.variant or os.environ.get("RNNKERN_TRITON_VARIANT", "auto")

    def current_tf32(self) -> bool:
        if self.allow_tf32 is not None:
            return self.allow_tf32
        return os.environ.get("RNNKERN_TRITON_TF32", "0") == "1"


SETTINGS = Settings()

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}


def pow2(n: int, minimum: int = 16) -> int:
    """The padded tile extent for n (tl.dot needs every extent >= 16)."""
    return max(minimum, triton.next_power_of_2(max(int(n), 1)))


def use_loop(gates: int, hidden: int, proj: int, has_proj: bool, dtype: torch.dtype) -> bool:
    """Whether to run the time-looped (one launch) kernel for these sizes."""
    variant = SETTINGS.current_variant()
    if variant == "loop":
        return True
    if variant == "step":
        return False
    if variant != "auto":
        raise ValueError(f"rnnkern triton: unknown variant {variant!r} (valid: 'auto', 'step', 'loop')")
    elems = gates * pow2(hidden) * pow2(proj) + (pow2(hidden) * pow2(proj) if has_proj else 0)
    return elems * dtype.itemsize <= SETTINGS.loop_max_weight_bytes


@dataclass
class KernelTypes:
    """Compile-time dtypes of one call: ACC (accumulation / cell state), DOT (the operands of the
    backward's dots: the input dtype for 16-bit inputs, so that they run on tensor cores with
    float32 accumulation), PREC (tl.dot input_precision for float32)."""

    acc_torch: torch.dtype
    acc: object
    dot: object
    prec: str


def kernel_types(dtype: torch.dtype) -> KernelTypes:
    acc_torch = _layer_ops.acc_dtype(dtype)
    prec = "tf32" if (SETTINGS.current_tf32() and dtype == torch.float32 and not INTERPRETER) else "ieee"
    return KernelTypes(acc_torch, TL_DTYPES[acc_torch], TL_DTYPES[dtype], prec)


def block_rows(batch: int) -> int:
    """Rows (samples) per program."""
    cap = SETTINGS.max_block_rows or (32 if INTERPRETER else 16)
    return min(pow2(batch), pow2(cap))


def block_cols(n: int) -> int:
    """Hidden / projection columns per program of the per-step kernels."""
    cap = SETTINGS.max_block_cols or (64 if INTERPRETER else 32)
    return min(pow2(n), pow2(cap))


def norm_tiles(n: int, loop: bool) -> int:
    """Column tiles whose partial Σ squares make a row's: the per-step kernels' programs per row
    (block_cols), one for the time-looped kernels (a program holds whole rows)."""
    return 1 if loop else triton.cdiv(n, block_cols(n))


def block_k(n: int) -> int:
    """The reduction chunk of the dots of the per-step kernels."""
    return min(pow2(n), pow2(SETTINGS.max_block_cols or 64))


# ----------------------------------------------------------------------------------------------
# Device-side helpers.

@triton.jit
def sigmoid(x):
    # e = e^{-|x|} in (0, 1] never overflows: 1 / (1 + e) for x >= 0, e / (1 + e) below, which keeps the
    # tiny values of a very negative x (float32 denormals below -87; 1 / (1 + e^-x) rounded them to 0).
    # Saturates to exactly 0 and 1 and propagates NaN.
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def tanh(x):
    # The interpreter has no tl.tanh, so one formula everywhere, from m = expm1(-2|x|) in (-1, 0]:
    # tanh|x| = -m / (2 + m), which never overflows, is exactly ±1 once e^{-2|x|} < ulp, and keeps
    # NaN. expm1 by Kahan's identity (e - 1) y / log(e), e = e^y, accurate to a few ulp where e - 1
    # alone cancels (|x| small: (1 - e) / (1 + e) lost all of tanh(1e-8) in float32, half of
    # tanh(1e-12)'s digits in float64); past |x| = 1/2 nothing cancels and e - 1 is used as it is
    # (also where log(e) would be -inf).
    y = -2.0 * tl.abs(x)
    e = tl.exp(y)
    inside = (y > -1.0) & (e < 1.0)  # (elsewhere the identity's e is a dummy: no log(0) or 0 / 0)
    e_in = tl.where(inside, e, 0.5)
    m = tl.where(inside, (e_in - 1.0) * y / tl.log(e_in), tl.where(y > -1.0, y, e - 1.0))
    t = -m / (2.0 + m)
    return tl.where(x < 0, -t, t)


@triton.jit
def clip_scale(norm, clip):
    # Rescale to norm min(‖g‖, clip); clip <= 0 disables; a NaN norm compares false (NaN flows on).
    # The norm may be float64 (sum_sq); the scale comes back in the clip's (accumulation) dtype.
    over = norm > tl.where(clip > 0, clip, float("inf"))
    return tl.where(over, clip / tl.where(over, norm, 1.0), 1.0).to(clip.dtype)


@triton.jit
def sum_sq(x):
    # Row sums of squares in float64: float32 squares underflow below ~1e-19, and vanishing
    # gradients — what the norms are for — would read 0.
    x = x.to(tl.float64)
    return tl.sum(x * x, axis=1)


@triton.jit
def step_rows(step_rows_ptr, t, b):
    """Rows of step t for batch indices b, and which of them exist: step_rows_ptr holds (first row,
    row count) per step (see the module docstring)."""
    row0 = tl.load(step_rows_ptr + 2 * t)
    count = tl.load(step_rows_ptr + 2 * t + 1)
    return row0 + b, b < count


@triton.jit
def step_tile(step_rows_ptr, t, n_cols, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """The tile of a per-step kernel's program: its sample slots b, their rows at step t (and which
    are active), its columns c (program axis 1) and which exist (< n_cols)."""
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row, row_mask = step_rows(step_rows_ptr, t, b)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return b, row, row_mask, c, c < n_cols


@triton.jit
def loop_tile(B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """The tile of a time-looped kernel's program: its samples b (< B) and all hidden columns j (< H)."""
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    j = tl.arange(0, BLOCK_H)
    return b, b < B, j, j < H


@triton.jit
def loop_time(s, T, BACKWARD: tl.constexpr, REVERSE: tl.constexpr):
    """The t of the s-th step a time-looped kernel processes: forward order (t = s, or T-1-s for the
    reverse direction), or its reverse for the backward kernels."""
    t = s
    if BACKWARD != REVERSE:
        t = T - 1 - s
    return t


@triton.jit
def loop_incoming_grad(carry, grad_out_ptr, g_ptr, norm2_ptr, row, active, cols, col_mask, width,
                       clip, ACC: tl.constexpr):
    """A time-looped backward step's g = carry + grad_out rows: stores g (unclipped) and each row's
    Σ g², returns g clipped to the row norm `clip`."""
    tile = active[:, None] & col_mask[None, :]
    g = carry + tl.load(grad_out_ptr + row[:, None] * width + cols[None, :], mask=tile, other=0.0).to(ACC)
    g = tl.where(tile, g, 0.0)
    norm2 = sum_sq(g)
    tl.store(g_ptr + row[:, None] * width + cols[None, :], g, mask=tile)
    tl.store(norm2_ptr + row, norm2, mask=active)
    return g * clip_scale(tl.sqrt(norm2), clip)[:, None]


@triton.jit
def load_rows_or_init(src_ptr, src_stride, init_ptr, init_stride, prev, b, cols, row_mask, col_mask):
    """Tile [rows, cols]: row `prev` of src where prev >= 0, else row `b` of init (h0/c0)."""
    from_src = row_mask & (prev >= 0)
    from_init = row_mask & (prev < 0)
    src = tl.load(src_ptr + tl.maximum(prev, 0)[:, None] * src_stride + cols[None, :],
                  mask=from_src[:, None] & col_mask[None, :], other=0.0)
    init = tl.load(init_ptr + b[:, None] * init_stride + cols[None, :],
                   mask=from_init[:, None] & col_mask[None, :], other=0.0)
    return tl.where(from_src[:, None], src, init)


@triton.jit
def recurrent_dots(out_ptr, h0_ptr, w_hh_ptr, prev, b, row_mask, j, j_mask, H, P,
                   GATES: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_K: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """h_{t-1} @ W_hh[gate*H + j]ᵀ for a per-step tile, gate by gate (GATES of them, at most 4; the
    others stay 0): h_{t-1} [rows, P] is the previous step's out rows (prev >= 0) or h0's."""
    acc0 = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC)
    acc1 = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC)
    acc2 = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC)
    acc3 = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC)
    for k0 in range(0, P, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < P
        h_prev = load_rows_or_init(out_ptr, P, h0_ptr, P, prev, b, k, row_mask, k_mask)
        w_mask = k_mask[:, None] & j_mask[None, :]
        w_ptrs = w_hh_ptr + j[None, :] * P + k[:, None]  # [k, j] = W_hh[gate*H + j, k]
        acc0 = tl.dot(h_prev, tl.load(w_ptrs, mask=w_mask, other=0.0), acc0, input_precision=PREC,
                      out_dtype=ACC)
        if GATES > 1:
            acc1 = tl.dot(h_prev, tl.load(w_ptrs + H * P, mask=w_mask, other=0.0), acc1,
                          input_precision=PREC, out_dtype=ACC)
        if GATES > 2:
            acc2 = tl.dot(h_prev, tl.load(w_ptrs + 2 * H * P, mask=w_mask, other=0.0), acc2,
                          input_precision=PREC, out_dtype=ACC)
        if GATES > 3:
            acc3 = tl.dot(h_prev, tl.load(w_ptrs + 3 * H * P, mask=w_mask, other=0.0), acc3,
                          input_precision=PREC, out_dtype=ACC)
    return acc0, acc1, acc2, acc3


@triton.jit
def grad_h_step_kernel(step_rows_ptr, t, next_row_ptr, grad_out_ptr, grad_h_n_ptr, dgates_ptr,
                       w_hh_ptr, carry_ptr, g_ptr, norm2_ptr, norm2_stride, N, P, GH,
                       HAS_CARRY: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
                       BLOCK_K: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                       PREC: tl.constexpr):
    """Backward, first kernel of step t: g = grad_out + dgates_next @ W_hh (+ carry) for rows with a
    next step, or + grad_h_n at the sample's final step; stores g (unclipped) and the row's Σ g²
    over this column tile into norm2[tile, row] (tile_sum adds the tiles up, in a fixed order).

    Step t = T is the pseudo-step (rows N..N+B-1, no grad_out) whose g is grad_h0.
    dgates [N, GH] (ACC); w_hh [GH, P]; carry [B, P] (GRU's z ⊙ g term); g [N+B, P] (ACC).
    """
    b, row, row_mask, p, p_mask = step_tile(step_rows_ptr, t, P, BLOCK_B, BLOCK_P)
    nxt = tl.load(next_row_ptr + row, mask=row_mask, other=-1)
    has_next = row_mask & (nxt >= 0)
    nxt0 = tl.maximum(nxt, 0)
    acc = tl.zeros((BLOCK_B, BLOCK_P), dtype=ACC)
    for k0 in range(0, GH, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < GH
        a = tl.load(dgates_ptr + nxt0[:, None] * GH + k[None, :],
                    mask=has_next[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_hh_ptr + k[:, None] * P + p[None, :], mask=k_mask[:, None] & p_mask[None, :],
                    other=0.0)
        acc = tl.dot(a.to(DOT), w.to(DOT), acc, input_precision=PREC, out_dtype=ACC)
    # (rows with no next step add nothing: their zero rows of dgates times an infinite weight are NaN)
    acc = tl.where(has_next[:, None], acc, 0.0)
    tile = row_mask[:, None] & p_mask[None, :]
    grad_out = tl.load(grad_out_ptr + row[:, None] * P + p[None, :],
                       mask=tile & (row < N)[:, None], other=0.0)
    final = row_mask & (nxt < 0)
    grad_h_n = tl.load(grad_h_n_ptr + b[:, None] * P + p[None, :], mask=final[:, None] & p_mask[None, :],
                       other=0.0)
    g = acc + grad_out.to(ACC) + grad_h_n.to(ACC)
    if HAS_CARRY:
        g += tl.load(carry_ptr + b[:, None] * P + p[None, :], mask=has_next[:, None] & p_mask[None, :],
                     other=0.0)
    tl.store(g_ptr + row[:, None] * P + p[None, :], g, mask=tile)
    # (padding columns out of the sum: the dot leaves inf * 0 = NaN there for an infinite gradient)
    tl.store(norm2_ptr + tl.program_id(1) * norm2_stride + row, sum_sq(tl.where(tile, g, 0.0)), mask=row_mask)


@triton.jit
def tile_sum(partials_ptr, row, row_mask, tiles, stride):
    """Σ over column tiles of per-tile partial sums [tiles, stride] at `row`, tile by tile in order:
    the same value in every program and from run to run (atomic adds across tiles were neither)."""
    total = tl.load(partials_ptr + row, mask=row_mask, other=0.0)
    for i in range(1, tiles):
        total += tl.load(partials_ptr + i * stride + row, mask=row_mask, other=0.0)
    return total


# ----------------------------------------------------------------------------------------------
# Host-side bookkeeping (torch ops on the device only, so that it traces under torch.compile).

@dataclass
class StepPlan:
    """Device tables of one layer call; see the module docstring.

    step_rows: int32 [T+1, 2] (row offset, row count) per step, entry T = (N, B) the pseudo-step.
    prev_row: int32 [N]. next_row: int32 [N+B] (entries N.. : each sample's first processed row).
    first_row: int64 [B]. T, B, N: ints.
    """

    step_rows: torch.Tensor
    prev_row: torch.Tensor
    next_row: torch.Tensor
    first_row: torch.Tensor
    T: int
    B: int
    N: int
    reverse: bool

    def order(self, backward: bool = False) -> range:
        """The steps in processing order (forward) or in the backward's order."""
        if self.reverse != backward:
            return range(self.T - 1, -1, -1)
        return range(self.T)


def step_plan(batch_sizes: torch.Tensor, n_rows: int, batch: int, reverse: bool,
              device: torch.device) -> StepPlan:
    steps = batch_sizes.shape[0]
    sizes = batch_sizes.to(device=device, dtype=torch.int64)
    offsets = torch.cumsum(sizes, 0) - sizes
    arange_t = torch.arange(steps, device=device)
    step_of_row = torch.repeat_interleave(arange_t, sizes, output_size=n_rows)
    b_of_row = torch.arange(n_rows, device=device) - offsets[step_of_row]
    last = steps - 1
    later = (step_of_row + 1).clamp(max=last)
    earlier = (step_of_row - 1).clamp(min=0)
    # the sample has a row at the later step iff b < batch_sizes[t+1]; every earlier step has it
    later_ok = (step_of_row < last) & (b_of_row < sizes[later])
    earlier_ok = step_of_row > 0
    if reverse:
        prev_step, prev_ok, next_step, next_ok = later, later_ok, earlier, earlier_ok
    else:
        prev_step, prev_ok, next_step, next_ok = earlier, earlier_ok, later, later_ok
    minus_one = torch.full_like(b_of_row, -1)
    prev_row = torch.where(prev_ok, offsets[prev_step] + b_of_row, minus_one)
    next_row = torch.where(next_ok, offsets[next_step] + b_of_row, minus_one)
    samples = torch.arange(batch, device=device)
    if reverse:
        lengths = (sizes.unsqueeze(1) > samples.unsqueeze(0)).sum(0)
        first_row = offsets[lengths - 1] + samples
    else:
        first_row = samples
    step_rows = torch.stack([offsets, sizes], dim=1)
    pseudo = torch.tensor([[n_rows, batch]], device=device, dtype=torch.int64)
    step_rows = torch.cat([step_rows, pseudo], dim=0).to(torch.int32).contiguous()
    next_row = torch.cat([next_row, first_row]).to(torch.int32).contiguous()
    return StepPlan(step_rows, prev_row.to(torch.int32).contiguous(), next_row, first_row,
                    steps, batch, n_rows, reverse)


def previous_states(plan: StepPlan, out: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """h_{t-1} for every row [N, P] (rows of `out` or of h0), for the weight-gradient GEMM."""
    prev = plan.prev_row.to(torch.int64)
    samples = torch.arange(plan.N, device=out.device) - _row_offsets(plan)
    return torch.cat([out, h0], dim=0)[torch.where(prev >= 0, prev, plan.N + samples)]


def _row_offsets(plan: StepPlan) -> torch.Tensor:
    """For every row, the offset of its step (so row - offset = its sample index b)."""
    sizes = plan.step_rows[: plan.T, 1].to(torch.int64)
    offsets = plan.step_rows[: plan.T, 0].to(torch.int64)
    return torch.repeat_interleave(offsets, sizes, output_size=plan.N)


def clip_factor(norm: torch.Tensor, clip: float) -> torch.Tensor:
    """The per-row scale the kernels applied (same rule as clip_scale)."""
    if clip > 0:
        return torch.where(norm > clip, clip / norm, torch.ones_like(norm))
    return torch.ones_like(norm)


def launch_grad_h_step(plan: StepPlan, t: int, grad_out, grad_h_n, dgates, w_hh, carry, g, norm2,
                        types: KernelTypes, wrap):
    """One launch of grad_h_step_kernel for step t (t = plan.T: the grad_h0 pseudo-step)."""
    P = w_hh.shape[1]
    GH = w_hh.shape[0]
    block_b = block_rows(plan.B)
    block_p = block_cols(P)
    grid = (triton.cdiv(plan.B, block_b), triton.cdiv(P, block_p))
    wrap(grad_h_step_kernel)[grid](
        plan.step_rows, t, plan.next_row, grad_out, grad_h_n, dgates, w_hh,
        carry if carry is not None else g, g, norm2, norm2.stride(0), plan.N, P, GH,
        HAS_CARRY=carry is not None, BLOCK_B=block_b, BLOCK_P=block_p,
        BLOCK_K=block_k(GH), ACC=types.acc, DOT=types.dot, PREC=types.prec)
