// Arguments of the per-step fused pointwise kernels, shared by the device-agnostic layer driver
// (csrc/cpu/layer_driver.cpp) and the device kernels (csrc/cpu/pointwise_*.cpp, csrc/cuda/*.cu).
// Plain C++: no ATen, so that .cu files can include it.
//
// All matrices are row-major with the given leading dimension (elements). "input dtype" is the
// dtype of the layer's tensors; "acc dtype" is double for float64, else float (docs/internals.md).
// Row b of a step is sample b (sorted order) at that step.
#pragma once

#include <stdint.h>

#include "rnnkern/cells.h"

namespace rnnkern {

enum class DType : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

// Where row b's previous state lives: rows [0, n_from_step) continue from the previously processed
// step (from_step + b * ld_step); the others start from the initial state (from_init + b * ld_init).
struct PrevState {
  const void* from_step = nullptr;
  int64_t ld_step = 0;
  const void* from_init = nullptr;
  int64_t ld_init = 0;
  int64_t n_from_step = 0;
};

// One forward step: gate math, state update, saving the workspace.
struct ForwardStepArgs {
  Cell cell = Cell::LSTM;
  DType dtype = DType::F32;
  int64_t rows = 0;    // batch_sizes[t]
  int64_t hidden = 0;  // H
  const void* xp = nullptr;    // [rows, G*H] input dtype: x W_ihᵀ + b_ih
  const void* hp = nullptr;    // [rows, G*H] input dtype: h_prev W_hhᵀ (without bias)
  const void* b_hh = nullptr;  // [G*H] input dtype (zeros when the layer has no bias)
  PrevState h_prev;            // GRU: h_{t-1}, input dtype, [., H]
  PrevState c_prev;            // LSTM: c_{t-1}, acc dtype, [., H]
  void* h_out = nullptr;       // [rows, H] input dtype (out rows, or o*tanh(c) before a projection)
  int64_t ld_h_out = 0;
  void* ws = nullptr;          // [rows, S*H] acc dtype (LSTM i,f,g,o,c; GRU r,z,n,hn); null for RNN
};

// The gradient g arriving at h_t, as the backward steps assemble it (docs/internals.md):
//   rows [0, n_next):   grad_out + dh_next (+ dh_direct, GRU)
//   rows [n_next, rows): grad_out + grad_h_n[b]  (the sample's final step)
struct IncomingGrad {
  int64_t size = 0;              // P: features of h
  const void* grad_out = nullptr;  // [rows, P] input dtype
  const void* dh_next = nullptr;   // [>= n_next, P] input dtype: dgates_{next} @ W_hh
  const void* grad_h_n = nullptr;  // [B, P] input dtype
  int64_t n_next = 0;
};

// One backward step of the cell. Unless `dh_pre` is given (LSTM with projection, where g was
// assembled, normed and clipped by the ProjGradStepArgs kernel and multiplied by W_hr), it assembles
// g, records ‖g‖ per row (before clipping), clips it, then computes the gate gradients.
struct BackwardStepArgs {
  Cell cell = Cell::LSTM;
  DType dtype = DType::F32;
  int64_t rows = 0;
  int64_t hidden = 0;
  double clip = 0.0;      // <= 0: no clipping
  IncomingGrad grad;      // g (unused when dh_pre is given)
  const void* dh_pre = nullptr;  // LSTM with projection: [rows, H] input dtype, g_clipped @ W_hr
  const void* dh_direct = nullptr;  // GRU: [>= n_next, H] acc dtype, z ⊙ g of the next step
  const void* grad_c_n = nullptr;   // LSTM: [B, H] input dtype, or null (zeros)
  void* dc = nullptr;     // LSTM: [B, H] acc: in: dc from the next step (rows < n_next); out: dc_{t-1}
  const void* ws = nullptr;     // [rows, S*H] acc dtype, the forward's workspace rows of this step
  const void* h_out = nullptr;  // RNN: [rows, H] input dtype, this step's output rows
  PrevState h_prev;             // GRU: h_{t-1} (input dtype)
  PrevState c_prev;             // LSTM: c_{t-1} (acc dtype)
  void* dgates_x = nullptr;     // [rows, G*H] input dtype: grad_xp rows
  void* dgates_h = nullptr;     // GRU: [rows, 3H] input dtype (n-gate scaled by r)
  void* dh_direct_out = nullptr;  // GRU: [rows, H] acc dtype, z ⊙ g (may alias dh_direct)
  void* hpre_out = nullptr;     // LSTM with projection: [rows, H] input dtype, o*tanh(c)
  float* norm_g = nullptr;      // [rows] ‖g‖ before clipping, or null (not recorded)
  float* norm_c = nullptr;      // LSTM: [rows] ‖dc_t‖, or null
};

// LSTM with projection, first kernel of a backward step: assemble g (size P), record its norm,
// clip, and write it for the GEMM g @ W_hr.
struct ProjGradStepArgs {
  DType dtype = DType::F32;
  int64_t rows = 0;
  double clip = 0.0;
  IncomingGrad grad;
  void* g_out = nullptr;    // [rows, P] input dtype, clipped g
  float* norm_g = nullptr;  // [rows] or null
};

}  // namespace rnnkern
