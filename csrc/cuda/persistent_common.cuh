// Device helpers shared by the persistent kernels: the grid-wide ones (persistent.cu) and the
// thread-block-cluster ones (persistent_cluster_kernels.cuh). No ATen (compile time).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "device_utils.cuh"
#include "persistent.h"
#include "rnnkern/cell_math.h"

// The kernels' dynamic shared memory (the emulator, scripts/emulator: one buffer per emulated block).
#ifdef RNNKERN_EMULATE
#define RNNKERN_DYNAMIC_SHARED(name) unsigned char* const name = ::rnnkern_emu::dynamic_shared()
#else
#define RNNKERN_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif
// A device function kept out of line (the host compiler of the emulator has no __noinline__).
#ifdef RNNKERN_EMULATE
#define RNNKERN_NOINLINE __attribute__((noinline))
#else
#define RNNKERN_NOINLINE __noinline__
#endif

namespace rnnkern {
namespace persistent {
namespace detail {

constexpr int kThreads = 256;

// cells.h's helpers are host-only constexpr functions; these are their compile-time twins.
template <Cell C>
constexpr int kGates = C == Cell::LSTM ? 4 : (C == Cell::GRU ? 3 : 1);
template <Cell C>
constexpr int kSlots = C == Cell::LSTM ? 5 : (C == Cell::GRU ? 4 : 0);

using cuda::AccOf;

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
// Loads of data other blocks wrote during this launch: through L2 (L1 is not coherent).
__device__ __forceinline__ float load_cg(const float* p) { return __ldcg(p); }
__device__ __forceinline__ double load_cg(const double* p) { return __ldcg(p); }
__device__ __forceinline__ float load_cg(const __half* p) { return __half2float(__ldcg(p)); }
__device__ __forceinline__ float load_cg(const __nv_bfloat16* p) {
  return __bfloat162float(__ldcg(p));
}
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Threads per (row, unit) pair for a dot product: a power of two <= 32 so that a group sits inside
// one warp and reduces with shuffles; identical in every thread of the block.
__device__ __forceinline__ int lanes_per_pair(int pairs) {
  int lanes = pairs > 0 ? kThreads / pairs : 32;
  lanes = lanes < 1 ? 1 : (lanes > 32 ? 32 : lanes);
  return 1 << (31 - __clz(lanes));
}

// Each value of an R x N register tile summed over its aligned group of `lanes` lanes (a power of two
// <= 32) by a fixed butterfly tree, all R x N shuffles of a level issued together: one loop per value
// made each value's shuffle-add chain wait for the one before (the float FMA product's 16 sums were
// ~1,000 cycles of latency a step; its SASS).
template <int R, int N, typename A>
__device__ __forceinline__ void group_sum_each(A (&v)[R][N], int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) {
    A got[R][N];
#pragma unroll
    for (int i = 0; i < R; ++i) {
#pragma unroll
      for (int j = 0; j < N; ++j) got[i][j] = __shfl_xor_sync(0xffffffffu, v[i][j], offset);
    }
#pragma unroll
    for (int i = 0; i < R; ++i) {
#pragma unroll
      for (int j = 0; j < N; ++j) v[i][j] += got[i][j];
    }
  }
}

// The same for N values: one row of the tree above, so the same bits.
template <int N, typename A>
__device__ __forceinline__ void group_sum_each(A (&v)[N], int lanes) {
  A row[1][N];
#pragma unroll
  for (int j = 0; j < N; ++j) row[0][j] = v[j];
  group_sum_each(row, lanes);
#pragma unroll
  for (int j = 0; j < N; ++j) v[j] = row[0][j];
}

// One value's group sum: the same tree, so the same bits as group_sum_each.
template <typename A>
__device__ __forceinline__ A group_sum(A v, int lanes) {
  A one[1] = {v};
  group_sum_each(one, lanes);
  return one[0];
}


// v through the storage dtype T and back: the state another step will read as T (GRU's h) is kept
// rounded as if it had been stored.
template <typename T, typename A>
__device__ __forceinline__ A through(A v) {
  T tmp;
  store(&tmp, v);
  return A(load(&tmp));
}

// How many steps ahead the kernels on clusters prefetch a step's global inputs into L2 (prefetch_l2):
// a step's registers are loaded during the step before it, and the backward's loads of a step also
// read the rows of the step after it (LSTM c_{t-1}, GRU h_{t-1}), so two would be one step late there.
constexpr int kL2PrefetchSteps = 3;

// Brings global memory [p, p + bytes) into L2: part `part` of `parts` (the blocks of a tile), by one
// bulk prefetch from the block's thread 0 (cp.async.bulk.prefetch.L2: 16-byte aligned, whole 16-byte
// pieces, so up to 15 bytes at either end of a part may stay out). A hint with no result: unlike a load
// it leaves no scoreboard for a later instruction to wait on. Why: each step's loads of its global
// inputs (the forward's x projection, the backward's grad_out and saved activations) go out a step
// ahead into registers, but ptxas tracks a warp's global loads on one scoreboard and waits on it
// wherever that scoreboard's other users are read (the SASS: the float32 forward's cells and the
// backward's phase C waited for them, until rearranged; any change may bring such a wait back), and
// then their round trip from DRAM stands in the step; from L2 it is the shorter L2 one. (The emulator
// reads each part's first and last bytes: an address past a buffer hits its guard page.)
__device__ __forceinline__ void prefetch_l2(const void* p, int64_t bytes, int part, int parts) {
  if (threadIdx.x != 0) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p);
  const uintptr_t from = (begin + static_cast<uintptr_t>(bytes * part / parts) + 15) & ~uintptr_t{15};
  const uintptr_t to = (begin + static_cast<uintptr_t>(bytes * (part + 1) / parts)) & ~uintptr_t{15};
  if (to <= from) return;
#ifdef RNNKERN_EMULATE
  (void)*reinterpret_cast<const volatile char*>(from);
  (void)*reinterpret_cast<const volatile char*>(to - 1);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(from), "r"(static_cast<uint32_t>(to - from))
               : "memory");
#endif
}

// v, of which the compiler may assume nothing: what is worked out from it stays where it is written
// instead of being hoisted out of a loop into registers held through it.
__device__ __forceinline__ int64_t opaque(int64_t v) {
#ifndef RNNKERN_EMULATE
  asm volatile("" : "+l"(v));
#endif
  return v;
}

// Time geometry shared by both kernels (docs/internals.md).
struct Geometry {
  const int64_t* sizes;
  const int64_t* offsets;
  int64_t steps;
  bool reverse;
  __device__ int64_t t_of(int64_t k) const { return reverse ? steps - 1 - k : k; }
  // The steps processed before and after t in the forward recurrence (-1: none).
  __device__ int64_t prev(int64_t t) const { return reverse ? (t + 1 < steps ? t + 1 : -1) : t - 1; }
  __device__ int64_t next(int64_t t) const { return reverse ? t - 1 : (t + 1 < steps ? t + 1 : -1); }
};


// The arguments' pointers with their types (storage dtype T; the workspace in the accumulation
// dtype A), unpacked by the kernels with structured bindings.
template <typename T, typename A>
struct ForwardPointers {
  const T* w_hh;
  const T* xp;
  const T* b_hh;
  const T* h0;
  const T* c0;
  T* out;
  A* ws;
  T* h_n;
  T* c_n;
};

template <typename T, typename A>
__device__ __forceinline__ ForwardPointers<T, A> typed(const ForwardArgs& a) {
  return {static_cast<const T*>(a.w_hh), static_cast<const T*>(a.xp), static_cast<const T*>(a.b_hh),
          static_cast<const T*>(a.h0),   static_cast<const T*>(a.c0), static_cast<T*>(a.out),
          static_cast<A*>(a.ws),         static_cast<T*>(a.h_n),      static_cast<T*>(a.c_n)};
}

template <typename T, typename A>
struct BackwardPointers {
  const T* w_hh;
  const T* grad_out;
  const T* grad_h_n;
  const T* grad_c_n;
  const T* h0;
  const T* c0;
  const T* out;
  const A* ws;
  T* dgates_x;
  T* dgates_h;  // the recurrent-side gate gradients: GRU's own rows, else dgates_x
  T* grad_h0;
  T* grad_c0;
};

template <Cell C, typename T, typename A>
__device__ __forceinline__ BackwardPointers<T, A> typed(const BackwardArgs& a) {
  return {static_cast<const T*>(a.w_hh),   static_cast<const T*>(a.grad_out),
          static_cast<const T*>(a.grad_h_n), static_cast<const T*>(a.grad_c_n),
          static_cast<const T*>(a.h0),     static_cast<const T*>(a.c0),
          static_cast<const T*>(a.out),    static_cast<const A*>(a.ws),
          static_cast<T*>(a.dgates_x),     static_cast<T*>(C == Cell::GRU ? a.dgates_h : a.dgates_x),
          static_cast<T*>(a.grad_h0),      static_cast<T*>(a.grad_c0)};
}

// Rows of a tile of batch rows [tile0, tile0 + rows) below n.
__device__ __forceinline__ int rows_below(int64_t n, int tile0, int rows) {
  const int64_t v = n - tile0;
  return static_cast<int>(v < 0 ? 0 : (v > rows ? rows : v));
}

// Step t of the recurrence for a tile of batch rows (a cluster's; the whole batch for the grid-wide
// kernels): the global rows of the tile's first sample at t and at the step the forward processed
// before t, and how many of the tile's rows are active at t, continue from that previous step, and
// continue into the next one.
struct TileStep {
  int64_t row0, prev_row0;
  int rows, rows_prev, rows_next;
};

// What tile_step reads of the geometry (global memory) for step t, as loaded: a kernel that reads a
// step ahead issues these loads early and does the arithmetic, which waits for them, later.
struct StepLoads {
  int64_t offset, prev_offset;           // first rows of t and of the step processed before it
  int64_t size, prev_size, next_size;    // batch sizes of t and of the steps before and after (0: none)
};

__device__ __forceinline__ StepLoads load_step(const Geometry& geo, int64_t t) {
  const int64_t p = geo.prev(t), n = geo.next(t);
  return {geo.offsets[t], p < 0 ? 0 : geo.offsets[p], geo.sizes[t], p < 0 ? 0 : geo.sizes[p],
          n < 0 ? 0 : geo.sizes[n]};
}

__device__ __forceinline__ TileStep tile_step(const StepLoads& l, int tile0, int tile_rows) {
  return {l.offset + tile0, l.prev_offset + tile0, rows_below(l.size, tile0, tile_rows),
          rows_below(min(l.size, l.prev_size), tile0, tile_rows),
          rows_below(min(l.size, l.next_size), tile0, tile_rows)};
}

// The same read where it is used (the grid-wide kernels: with the loads all issued first, as in
// load_step, ptxas spilled three of their float64 backward kernels).
__device__ __forceinline__ TileStep tile_step(const Geometry& geo, int64_t t, int tile0, int tile_rows) {
  const int64_t p = geo.prev(t), n = geo.next(t);
  return {geo.offsets[t] + tile0, (p < 0 ? 0 : geo.offsets[p]) + tile0, rows_below(geo.sizes[t], tile0, tile_rows),
          rows_below(p < 0 ? 0 : min(geo.sizes[t], geo.sizes[p]), tile0, tile_rows),
          rows_below(n < 0 ? 0 : min(geo.sizes[t], geo.sizes[n]), tile0, tile_rows)};
}

// The cell of one (row, unit) in a persistent forward step. x: x_t's projection (b_ih included) and
// hh: h_{t-1} W_hhᵀ + b_hh, one per gate; prev: c_{t-1} (LSTM) or h_{t-1} (GRU), unused by the RNN.
// Saves what the backward needs in the workspace row `wr` (unit u of H) and returns h_t; c_t in `c`.
template <Cell C, typename A>
__device__ __forceinline__ A forward_unit(const A* x, const A* hh, A prev, A* wr, int H, int u, A& c) {
  A h;
  if constexpr (C == Cell::LSTM) {
    LstmGates<A> gates;
    lstm_forward_unit<A>(x[0] + hh[0], x[1] + hh[1], x[2] + hh[2], x[3] + hh[3], prev, gates, c, h);
    wr[u] = gates.i;
    wr[H + u] = gates.f;
    wr[2 * H + u] = gates.g;
    wr[3 * H + u] = gates.o;
    wr[4 * H + u] = c;
  } else if constexpr (C == Cell::GRU) {
    // Xp and Hp enter the GRU separately (b_hn stays inside r ⊙ (...)).
    GruGates<A> gates;
    gru_forward_unit<A>(x[0], x[1], x[2], hh[0], hh[1], hh[2], prev, gates, h);
    wr[u] = gates.r;
    wr[H + u] = gates.z;
    wr[2 * H + u] = gates.n;
    wr[3 * H + u] = hh[2];
  } else {
    h = rnn_forward_unit<C == Cell::RNN_RELU, A>(x[0] + hh[0]);
  }
  return h;
}

// The gate gradients of one (row, unit) in a persistent backward step, from dh, the gradient at
// h_t after clipping. saved[k * stride]: the unit's workspace slot k (its row in the workspace with
// stride H, or a copy in registers with stride 1); prev: c_{t-1} (LSTM) or h_{t-1} (GRU); h: h_t (RNN);
// dc_in: the cell-state gradient arriving from t+1 (LSTM). Stores the input-side gate gradients in
// the grad_xp row `dx` and (GRU) the recurrent-side ones in `dhh`; returns in dg[g] what the dh
// product multiplies by W_hh, in dc / dc_prev the LSTM's total and propagated cell-state
// gradients, and in direct GRU's z ⊙ dh.
template <Cell C, typename T, typename A>
__device__ __forceinline__ void backward_unit(A dh, A dc_in, const A* saved, int stride, A prev, A h, int H,
                                              int u, T* dx, T* dhh, A* dg, A& dc, A& dc_prev, A& direct) {
  if constexpr (C == Cell::LSTM) {
    const LstmGates<A> gates{saved[0], saved[stride], saved[2 * stride], saved[3 * stride]};
    LstmGates<A> d;
    lstm_backward_unit<A>(dh, dc_in, gates, saved[4 * stride], prev, d, dc, dc_prev);
    dg[0] = d.i;
    dg[1] = d.f;
    dg[2] = d.g;
    dg[3] = d.o;
  } else if constexpr (C == Cell::GRU) {
    const GruGates<A> gates{saved[0], saved[stride], saved[2 * stride]};
    GruGates<A> gx, gh;
    gru_backward_unit<A>(dh, gates, saved[3 * stride], prev, gx, gh, direct);
    store(dx + u, gx.r);
    store(dx + H + u, gx.z);
    store(dx + 2 * H + u, gx.n);
    dg[0] = gh.r;
    dg[1] = gh.z;
    dg[2] = gh.n;
    dx = dhh;  // the recurrent side goes to dhh below
  } else {
    dg[0] = rnn_backward_unit<C == Cell::RNN_RELU, A>(dh, h);
  }
#pragma unroll
  for (int g = 0; g < kGates<C>; ++g) store(dx + g * H + u, dg[g]);
}

// backward_unit's state inputs for one (sample, unit u) at step t as loaded, before any conversion (a
// conversion waits for its load, so a kernel that prefetches them keeps them raw until they are used):
// `stored` in the storage dtype (LSTM: c0 where the sample starts; GRU: h_{t-1}, from `out` or h0;
// RNN: h_t), `acc` the LSTM's c_{t-1} from the workspace where the sample continues. `row` is the
// sample's row at t, `prev_row` its row at the step the forward processed before t.
template <typename T, typename A>
struct UnitStateLoads {
  T stored;
  A acc;
};

template <Cell C, typename T, typename A>
__device__ __forceinline__ UnitStateLoads<T, A> load_unit_state(const BackwardPointers<T, A>& p, int64_t sample,
                                                                int64_t row, int64_t prev_row, bool starts, int H,
                                                                int u) {
  UnitStateLoads<T, A> l{};
  if constexpr (C == Cell::LSTM) {
    if (starts) {
      l.stored = p.c0[sample * H + u];
    } else {
      l.acc = p.ws[prev_row * kSlots<C> * H + 4 * H + u];
    }
  } else if constexpr (C == Cell::GRU) {
    l.stored = starts ? p.h0[sample * H + u] : p.out[prev_row * H + u];
  } else {
    l.stored = p.out[row * H + u];
  }
  return l;
}

// The state inputs from their loads: prev = c_{t-1} (LSTM) or h_{t-1} (GRU), h = h_t (RNN).
template <Cell C, typename T, typename A>
__device__ __forceinline__ void unit_state(const UnitStateLoads<T, A>& l, bool starts, A& prev, A& h) {
  prev = h = A(0);
  if constexpr (C == Cell::LSTM) {
    prev = starts ? A(load(&l.stored)) : l.acc;
  } else if constexpr (C == Cell::GRU) {
    prev = A(load(&l.stored));
  } else {
    h = A(load(&l.stored));
  }
}

// Both at once.
template <Cell C, typename T, typename A>
__device__ __forceinline__ void backward_unit_state(const BackwardPointers<T, A>& p, int64_t sample, int64_t row,
                                                    int64_t prev_row, bool starts, int H, int u, A& prev, A& h) {
  unit_state<C, T, A>(load_unit_state<C, T, A>(p, sample, row, prev_row, starts, H, u), starts, prev, h);
}

// The LSTM's cell-state gradient arriving at step t for (sample, unit u): *dc_next where the sample
// continues into the next step, else grad_c_n (or 0). Other cells: 0 (backward_unit ignores it).
template <Cell C, typename T, typename A>
__device__ __forceinline__ A incoming_dc(const BackwardPointers<T, A>& p, int64_t sample, bool continues,
                                         const A* dc_next, int H, int u) {
  if constexpr (C != Cell::LSTM) return A(0);
  return continues ? *dc_next : (p.grad_c_n ? A(load(p.grad_c_n + sample * H + u)) : A(0));
}

// The declines every persistent plan shares (projections, empty layers): true when `plan` declines.
inline bool declines_layer(Plan& plan, bool has_proj, int64_t batch, int64_t hidden) {
  plan.reason = has_proj ? Decline::Projection : (hidden <= 0 || batch <= 0) ? Decline::Empty : Decline::None;
  return plan.reason != Decline::None;
}

// Bytes of a storage dtype, and of its accumulation type.
inline size_t storage_size(DType dtype) { return dtype == DType::F64 ? 8 : (dtype == DType::F32 ? 4 : 2); }
inline size_t acc_size(DType dtype) { return dtype == DType::F64 ? sizeof(double) : sizeof(float); }

// The device's properties, read once per device (cudaGetDeviceProperties takes milliseconds); null
// when they cannot be read. Defined in persistent.cu.
const cudaDeviceProp* device_properties(int device);

// Float64 elements of the cluster kernels' backward scratch (persistent_cluster_layout.cuh): the
// wide kernels' (Exchange::Grid) exchanged buffers, then the recorded norms' partial sums of `rows` rows.
size_t cluster_scratch_elements(const Plan& plan, int64_t rows, bool record_norms);

// The cluster kernels' launches (persistent_cluster.cu); forward()/backward() dispatch to them.
cudaError_t cluster_forward(const Plan& plan, const ForwardArgs& args, cudaStream_t stream);
cudaError_t cluster_backward(const Plan& plan, const BackwardArgs& args, cudaStream_t stream);

}  // namespace detail
}  // namespace persistent
}  // namespace rnnkern
