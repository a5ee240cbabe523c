// Persistent CUDA recurrence (issue 9): the whole time loop of one layer and direction in ONE
// cooperative launch. Each block owns a slice of hidden units and keeps its slice of W_hh (forward)
// or of W_hh's columns (backward) in shared memory for the whole sequence; h_t is exchanged through
// L2 with one grid-wide barrier per step (two in the backward: one to reduce ‖g_t‖ across blocks
// before clipping, one to exchange the gate gradients). Plain C++ header: no ATen.
//
// The kernels produce exactly what the per-step path produces (docs/internals.md): forward: out rows,
// workspace rows, h_n, c_n; backward: grad_xp (= dgates_x), dgates_h (GRU), grad_h0, grad_c0 and
// norms. The weight gradients are the layer driver's GEMMs after the loop, as on the per-step path.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime.h>

#include <mutex>

#include "rnnkern/step_args.h"

namespace rnnkern {
namespace persistent {

// Held from setting a kernel's dynamic shared-memory limit (cudaFuncSetAttribute: per kernel, for the
// whole process) to the launch or occupancy query that relies on it: a planner in another host thread
// may set a smaller limit in between, and the launch would then fail.
inline std::mutex& kernel_attribute_mutex() {
  static std::mutex mutex;
  return mutex;
}

// How the persistent kernels would run a layer, or why they cannot.
// Why a layer is not run persistently (rnnkern/explain.py has the texts).
enum class Decline : int {
  None = 0, Projection = 1, Empty = 2, NoCooperativeLaunch = 3, SharedMemory = 4, Occupancy = 5,
  Forced = 6, Heuristic = 7, NoClusters = 8
};

// How the blocks of the cluster kernels (persistent_cluster_kernels.cuh) exchange state each step.
enum class Exchange : int {
  ClusterBarrier = 0,  // remote shared-memory stores, then the cluster's barrier
  // st.async stores completing on each receiver's mbarriers, with no cluster barrier per step (each
  // block waits only for the data it reads; the barrier's GPU-scope fence also waits for the step's
  // global stores)
  ClusterAsync = 1,
  // Through L2 with grid barriers, for a layer spread over more blocks than one cluster holds (up to
  // every SM, cooperative launch): "wide". The same work split and products as in a cluster.
  Grid = 2,
};

struct Plan {
  bool ok = false;
  Decline reason = Decline::None;  // when !ok
  int blocks = 0;           // cooperative grid size (<= co-resident blocks)
  int units = 0;            // hidden units per block
  int threads = 0;
  size_t smem_forward = 0;
  size_t smem_backward = 0;
  int chunk_forward = 0;    // columns of h_{t-1} staged per tile (the whole row where it fits)
  int chunk_backward = 0;   // columns of the dgates rows staged per tile
  // > 0: the cluster kernels (persistent_cluster_kernels.cuh), blocks per cluster (Exchange::Grid: per tile,
  // the blocks that share a tile's time loop, launched without clusters)
  int cluster = 0;
  int tile_rows = 0;        // cluster kernels: batch rows per tile (one cluster, or a group of blocks for Grid)
  int resident_clusters = 0;  // cluster kernels: clusters of this plan the device runs at once
  Exchange exchange = Exchange::ClusterBarrier;  // cluster kernels
  // Cluster kernels' backward: 2 where its exchanged buffers have two copies by step parity (then,
  // without clipping, one exchange per step instead of two), 1 where only one copy fits in shared
  // memory (two exchanges per step, as with clipping).
  int copies = 2;
  // Cluster kernels, float32: the recurrent products on TF32 tensor cores (operands rounded to TF32,
  // float32 accumulation) instead of exact FMA dot products.
  bool tf32 = false;
};

// Plan for a layer of `hidden` units and a batch of `batch` rows on `device`. Projections
// (proj_size > 0) are not handled here (the per-step path runs them).
Plan make_plan(Cell cell, DType dtype, int64_t batch, int64_t hidden, bool has_proj, int device);

// Plan for the thread-block-cluster kernels (sm_90+, persistent_cluster.cu): each cluster of up to
// 16 blocks holds all of W_hh and runs the time loop for a tile of batch rows, exchanging state
// through distributed shared memory (`exchange`: Plan::exchange). Declines (SharedMemory) where W_hh
// and the tile's rows do not fit in one cluster's shared memory. Exchange::Grid ("wide") spreads each
// tile over as many blocks as the device runs at once instead, and declines where even that does not
// fit. `tf32` (float32 only; ignored otherwise): Plan::tf32. `max_cluster` (not for Grid): 0, the
// largest cluster that fits (the smallest share of W_hh per block), or smaller ones where a batch's
// 16-row tiles need more clusters than run at once; else a power of two from 1 to 16, the most
// blocks a cluster may have (fewer blocks trade a longer product for a cheaper exchange), and
// larger tiles where those clusters are not all resident. `max_tile_rows`: 0, tiles of at most 4
// batch rows for the exact FMA products (float32 without TF32, float64; their work scales with the
// rows), 8 for the 16-bit ones, on the largest cluster where all of them run at once (wide: where
// their blocks fit in the device), else twice as many rows, and so on, as from 16 (one tensor-core
// row tile; TF32's first size); else a power of two from 1 to 64, the first size tried in their
// place (RNNKERN_TILE_ROWS).
Plan make_cluster_plan(Cell cell, DType dtype, int64_t batch, int64_t hidden, bool has_proj,
                       int device, Exchange exchange = Exchange::ClusterBarrier, bool tf32 = false,
                       int max_cluster = 0, int max_tile_rows = 0);

// The plan backend "auto" takes on the kernels on clusters (float32 and 16-bit; persistent_cluster.cu:
// cluster_pays_off, exact_beats_tf32), or one that is not ok where none pays off. `tf32`: torch allows
// TF32 matmuls.
Plan auto_cluster_plan(Cell cell, DType dtype, int64_t batch, int64_t hidden, bool has_proj, int device,
                       bool tf32, int max_cluster = 0, int max_tile_rows = 0);

struct ForwardArgs {
  Cell cell = Cell::LSTM;
  DType dtype = DType::F32;
  int64_t steps = 0, batch = 0, hidden = 0;
  const int64_t* sizes = nullptr;    // device [T]: batch_sizes
  const int64_t* offsets = nullptr;  // device [T]: first row of each step
  bool reverse = false;
  // The rows of every step where all steps have the same (padded input), else 0 (packed): where they
  // do, the kernels on clusters prefetch later steps' rows into L2 (prefetch_l2).
  int64_t full_batch = 0;
  const void* xp = nullptr;    // [N, G*H] input dtype
  const void* w_hh = nullptr;  // [G*H, H] input dtype
  const void* b_hh = nullptr;  // [G*H] input dtype or null
  const void* h0 = nullptr;    // [B, H] input dtype
  const void* c0 = nullptr;    // LSTM: [B, H] input dtype
  void* out = nullptr;         // [N, H] input dtype
  void* ws = nullptr;          // [N, S*H] acc dtype
  void* h_n = nullptr;         // [B, H] input dtype
  void* c_n = nullptr;         // LSTM: [B, H] input dtype
  // The wide kernels' (Exchange::Grid on clusters) exchange of h_t as tagged words, exchange_words()
  // of them (the launch fills them), or null: through `out`, with the grid's barrier every step.
  void* exchange = nullptr;
};

// 32-bit words of ForwardArgs::exchange for `plan` (0: a plan without it) and a batch of `batch`.
size_t exchange_words(const Plan& plan, DType dtype, int64_t batch, int64_t hidden);

struct BackwardArgs {
  Cell cell = Cell::LSTM;
  DType dtype = DType::F32;
  int64_t steps = 0, batch = 0, hidden = 0;
  const int64_t* sizes = nullptr;
  const int64_t* offsets = nullptr;
  bool reverse = false;
  int64_t full_batch = 0;  // as ForwardArgs'
  double clip = 0.0;
  const void* grad_out = nullptr;  // [N, H] input dtype
  const void* grad_h_n = nullptr;  // [B, H] input dtype
  const void* grad_c_n = nullptr;  // LSTM: [B, H] input dtype or null
  const void* w_hh = nullptr;      // [G*H, H]
  const void* h0 = nullptr;
  const void* c0 = nullptr;
  const void* out = nullptr;       // forward's out rows
  const void* ws = nullptr;        // forward's workspace
  void* dgates_x = nullptr;        // [N, G*H] input dtype (grad_xp)
  void* dgates_h = nullptr;        // GRU: [N, 3H] input dtype; else null (equal to dgates_x)
  void* grad_h0 = nullptr;         // [B, H] input dtype
  void* grad_c0 = nullptr;         // LSTM: [B, H] input dtype or null
  float* norm_g = nullptr;         // [N] or null (not recorded)
  float* norm_c = nullptr;         // LSTM: [N] or null
  void* scratch = nullptr;         // float64, scratch_elements(plan, batch, N, norms recorded) elements
};

// Elements (float64) of the backward's cross-block scratch buffer for a layer of `rows` packed rows
// (N) and `batch` samples: the grid-wide kernels' partial sums of squares; the wide kernels' reduce-
// scatter of dh; and for every kernel on clusters, where norms are recorded, each row's partial
// sums of squares from each block of its tile ([N][2][blocks per tile][norm_slots(units)], summed
// after the loop).
size_t scratch_elements(const Plan& plan, int64_t batch, int64_t rows, bool record_norms);

// Run the kernels `plan` chose (grid-wide or cluster).
cudaError_t forward(const Plan& plan, const ForwardArgs& args, cudaStream_t stream);
cudaError_t backward(const Plan& plan, const BackwardArgs& args, cudaStream_t stream);

}  // namespace persistent
}  // namespace rnnkern
