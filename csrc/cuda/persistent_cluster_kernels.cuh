// Persistent recurrence on thread-block clusters (issue 9; sm_90 and newer), selected with
// RNNKERN_CUDA_KERNEL=cluster (or auto), cluster-async and wide (Exchange, persistent.h): the same
// kernels with three ways to exchange state; the description below is the cluster barrier's, the
// others differ as the kernels' comments say (st.async: docs/internals.md; wide: through L2 with
// grid barriers, a tile's blocks spread over a cooperative grid for layers beyond one cluster).
//
// Where a layer's W_hh fits in the shared memory of one cluster (up to 16 blocks on Hopper), each
// cluster runs the whole time loop of a tile of batch rows. Its blocks split the hidden units as the
// grid-wide kernels do (block r owns units [r*U, r*U + U) and keeps those units' rows of W_hh,
// all G gates, in shared memory), but what the blocks exchange each step goes straight into the other
// blocks' shared memory (distributed shared memory), and the step barrier is the cluster's hardware
// barrier: no global-memory round trip and no grid-wide barrier on the recurrence's critical path.
// Clusters share nothing (each owns its batch rows), so they need no co-residency.
//
// Forward step s: h_{t-1} of the tile is in stage[s % 2] (all H columns, as stored: type T); each
// block multiplies it by its W_hh rows, applies the gate math for its units, writes h_t to `out`
// (global) and into its own stage[(s + 1) % 2], then copies its columns of it into every other
// block's stage[(s + 1) % 2] in 16-byte chunks (a remote store costs about as much per instruction
// whatever its width: measured, scripts/persistent_probe.cu); one cluster barrier.
//
// Backward step (reverse order), with the same W_hh rows:
//   A. g = grad_out + dh_next for own units; Σ g² over own units per row -> part_g[r] of every
//      block (with clipping, which needs ‖g‖ before the cell, or with one copy: see below);
//                                                                                  cluster barrier
//      (otherwise, where ‖g‖ is recorded, to the row's slot of the global norm partials, with no
//      barrier: they are summed after the loop)
//   B. with clipping, ‖g‖ per row (the partials summed in rank order: the same bits in every
//      block) and the clipping; the gate gradients of own units -> dgates rows (global, for the
//      weight GEMMs) and `dgate` (local); LSTM: Σ dc² over own units -> the global norm partials;
//   C. this block's share of dh_prev = dgates @ W_hh: the product of its own gate columns with its
//      W_hh rows, a partial sum for ALL H units, each sent to the unit's owner (inbox[r]): a
//      reduce-scatter of B×H values per block instead of gathering all B×G×H gate gradients;
//                                                                                  cluster barrier
//   D. dh_prev of own units = Σ_r inbox[r] in rank order (+ GRU's direct term) -> dh_next, or
//      grad_h0 where a sample starts.
// After the loop, one barrier, then the tile's blocks turn the norm partials into ‖dc_t‖ (and,
// without clipping, ‖g_t‖) for every row, each summed in rank order. (Summed every step by block 0
// they were on the critical path: block 0's phase D took ~0.45 µs longer than the others' on the
// H100, and the next step's exchange waited for it.)
// Without clipping a step has one barrier, so the exchanged buffers have two copies by step parity:
// a block writes step s + 2's only after the barrier of step s + 1, which every reader of step s's
// passes after reading it. (The forward's stage is double-buffered the same way.) Where two copies do
// not fit in shared memory (Plan::copies = 1), the norms are exchanged first, as with clipping.
//
// This header holds the kernels; persistent_cluster_<cell>.cu instantiate them, one cell per
// translation unit (persistent_cluster_layout.cuh: cluster_kernel), and persistent_cluster.cu plans
// and launches them.
#pragma once

#include <cooperative_groups.h>

#include <algorithm>
#include <type_traits>

#include "persistent_cluster_layout.cuh"
#include "step_trace.cuh"
#include "rnnkern/cell_math.h"

namespace cg = cooperative_groups;

namespace rnnkern {
namespace persistent {
namespace {

using namespace detail;
using cuda::FastDiv;

// The K step of one mma.sync: 16 for 16-bit operands, 8 for TF32.
template <typename T>
constexpr int kMmaK = sizeof(T) == 2 ? 16 : 8;

// The kernels' bodies are compiled for sm_90 and newer only (and parsed in the host pass).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define RNNKERN_HAS_CLUSTERS 1
#endif

#ifdef RNNKERN_HAS_CLUSTERS
// Where a block works: its cluster's size, its rank there, its hidden units [u0, u0 + nu) (nu may be
// 0 in the last blocks) of `units` per block, and its cluster's batch rows [tile0, tile0 + tile_rows).
struct Place {
  int blocks, rank, units, tile_rows, u0, nu, tile0;
  int used;  // blocks [0, used) own units; the others (the cluster is a power of two of blocks) none
};

__device__ __forceinline__ Place place(const cg::cluster_group& cluster, const ClusterShape& shape, int hidden) {
  const int blocks = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int u0 = rank * shape.units;
  return {blocks, rank, shape.units, shape.tile_rows, u0, max(0, min(shape.units, hidden - u0)),
          static_cast<int>(blockIdx.x) / blocks * shape.tile_rows, (hidden + shape.units - 1) / shape.units};
}

// Exchange::Grid: the same in a cooperative grid without clusters, `shape.group` blocks per tile (all
// of them own units).
__device__ __forceinline__ Place place_in_grid(const ClusterShape& shape, int hidden) {
  const int blocks = shape.group, rank = static_cast<int>(blockIdx.x) % blocks, u0 = rank * shape.units;
  return {blocks, rank, shape.units, shape.tile_rows, u0, max(0, min(shape.units, hidden - u0)),
          static_cast<int>(blockIdx.x) / blocks * shape.tile_rows, blocks};
}

// The barrier that ends an exchange: the cluster's, or (Exchange::Grid) the cooperative grid's.
template <Exchange X>
__device__ __forceinline__ void exchange_barrier(const cg::cluster_group& cluster) {
  if constexpr (X == Exchange::Grid) {
    cg::this_grid().sync();
  } else {
    cluster.sync();
  }
}

// Zeroes `bytes` (a multiple of 4) of shared memory from the 4-byte aligned `p`, block-wide.
__device__ __forceinline__ void zero_words(void* p, int bytes) {
  uint32_t* words = static_cast<uint32_t*>(p);
  for (int i = threadIdx.x; i < bytes / 4; i += kThreads) words[i] = 0u;
}

__device__ __forceinline__ uint32_t pair_at(const void* p) { return *static_cast<const uint32_t*>(p); }

// Four consecutive float or double values at a 16-byte aligned address, in 16-byte accesses (`p` may
// be a distributed-shared-memory address for the stores).
__device__ __forceinline__ void load4(float (&v)[4], const float* p) {
  const float4 q = *reinterpret_cast<const float4*>(p);
  v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
}
__device__ __forceinline__ void load4(double (&v)[4], const double* p) {
  const double2 q0 = reinterpret_cast<const double2*>(p)[0], q1 = reinterpret_cast<const double2*>(p)[1];
  v[0] = q0.x, v[1] = q0.y, v[2] = q1.x, v[3] = q1.y;
}
__device__ __forceinline__ void store4(float* p, const float (&v)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store4(double* p, const double (&v)[4]) {
  reinterpret_cast<double2*>(p)[0] = make_double2(v[0], v[1]);
  reinterpret_cast<double2*>(p)[1] = make_double2(v[2], v[3]);
}

// Exchange::Grid reads what other blocks stored before the last grid barrier: through L2 (L1 is not
// coherent), and several loads in flight per thread (an L2 round trip each).
__device__ __forceinline__ void load4_cg(float (&v)[4], const float* p) {
  const float4 q = __ldcg(reinterpret_cast<const float4*>(p));
  v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
}
__device__ __forceinline__ void load4_cg(double (&v)[4], const double* p) {
  const double2 q0 = __ldcg(reinterpret_cast<const double2*>(p)), q1 = __ldcg(reinterpret_cast<const double2*>(p) + 1);
  v[0] = q0.x, v[1] = q0.y, v[2] = q1.x, v[3] = q1.y;
}

// Copies elements [0, total) block-wide, `kBatch` loads in flight per thread: load(i) then store(i, v).
template <int kBatch, typename Load, typename Store>
__device__ __forceinline__ void copy_batched(int total, Load load, Store store) {
  for (int base = 0; base < total; base += kBatch * kThreads) {
    decltype(load(0)) v[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int i = base + j * kThreads + static_cast<int>(threadIdx.x);
      if (i < total) v[j] = load(i);
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int i = base + j * kThreads + static_cast<int>(threadIdx.x);
      if (i < total) store(i, v[j]);
    }
  }
}

// Rows [0, rows) of `cols` columns of the row-major `src` (row length src_ld; global memory written by
// other blocks before the last grid barrier, so read through L2) into `dst` (row length ld),
// block-wide: 16-byte loads where the rows are whole 16-byte chunks, eight loads in flight per thread
// (wide LSTM B16 H768: the 1,536 chunks of h_{t-1} in one L2 round trip per thread instead of two);
// `by_row` divides by the 16-byte chunks of a row (cols / V) on that path (FastDiv: a caller that
// reads the same shape every step builds it once).
template <typename T>
__device__ __forceinline__ void load_rows_cg(T* dst, int ld, const T* src, int src_ld, int cols, int rows,
                                             const FastDiv& by_row) {
  constexpr int V = kChunk / static_cast<int>(sizeof(T));
  if (cols % V == 0 && src_ld % V == 0 && ld % V == 0 && reinterpret_cast<uintptr_t>(src) % kChunk == 0 &&
      reinterpret_cast<uintptr_t>(dst) % kChunk == 0) {
    const int per_row = cols / V;
    copy_batched<8>(
        rows * per_row,
        [&](int i) {
          const int r = by_row.div(i);
          return __ldcg(reinterpret_cast<const uint4*>(src + static_cast<int64_t>(r) * src_ld) + (i - r * per_row));
        },
        [&](int i, const uint4& v) {
          const int r = by_row.div(i);
          reinterpret_cast<uint4*>(dst + r * ld)[i - r * per_row] = v;
        });
  } else {
    copy_batched<8>(
        rows * cols, [&](int i) { return __ldcg(src + static_cast<int64_t>(i / cols) * src_ld + i % cols); },
        [&](int i, const T& v) { dst[i / cols * ld + i % cols] = v; });
  }
}

// The wide forward's exchange of h_t through L2 without a grid barrier (Exchange::Grid,
// ForwardArgs::exchange): each element as kTaggedWords 32-bit words, a 16-bit piece of its bytes in
// the low half and its step's tag in the high half. A 32-bit access is single-copy atomic (a vector
// access is a set of them), so each word alone says whether it holds step s's piece: the readers
// load h_{t-1} and load again only the words not yet there. The grid barrier put three L2 round
// trips on every step's path (its fence, its arrival, its poll) before the loads of h_{t-1}; this
// puts none. Two planes [2][batch][H * kTaggedWords], by step parity: a block writes plane s % 2 at
// step s only after it has read every block's step s - 1 words, which each of them wrote after
// reading plane s % 2's step s - 2 words (its data depend on them). The launch fills both planes
// with 0xff bytes: tag 0xffff, which no step has (step_tag).
template <typename T>
constexpr int kTaggedWords = static_cast<int>(sizeof(T)) / 2;

__device__ __forceinline__ uint32_t step_tag(int64_t s) { return static_cast<uint32_t>(s) & 0x7fffu; }

__device__ __forceinline__ bool tagged(uint32_t word, uint32_t tag) { return (word >> 16) == tag; }
__device__ __forceinline__ bool tagged(const uint4& v, uint32_t tag) {
  return tagged(v.x, tag) && tagged(v.y, tag) && tagged(v.z, tag) && tagged(v.w, tag);
}

// Element v of step `tag` into its words at `dst` (aligned to its kTaggedWords words).
template <typename T>
__device__ __forceinline__ void store_tagged(uint32_t* dst, T v, uint32_t tag) {
  constexpr int W = kTaggedWords<T>;
  uint16_t pieces[W];
  memcpy(pieces, &v, sizeof(T));
  uint32_t w[4];
#pragma unroll
  for (int j = 0; j < W; ++j) w[j] = pieces[j] | (tag << 16);
#ifdef RNNKERN_EMULATE
  for (int j = 0; j < W; ++j) dst[j] = w[j];
  ::rnnkern_emu::note_progress();
#else
  if constexpr (W == 1) {
    asm volatile("st.relaxed.gpu.global.b32 [%0], %1;\n" ::"l"(dst), "r"(w[0]) : "memory");
  } else if constexpr (W == 2) {
    asm volatile("st.relaxed.gpu.global.v2.b32 [%0], {%1, %2};\n" ::"l"(dst), "r"(w[0]), "r"(w[1]) : "memory");
  } else {
    asm volatile("st.relaxed.gpu.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "r"(w[0]), "r"(w[1]),
                 "r"(w[2]), "r"(w[3])
                 : "memory");
  }
#endif
}

__device__ __forceinline__ uint4 load_words(const uint32_t* p) {
#ifdef RNNKERN_EMULATE
  return uint4{p[0], p[1], p[2], p[3]};
#else
  uint4 v;
  asm volatile("ld.relaxed.gpu.global.v4.b32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p)
               : "memory");
  return v;
#endif
}

__device__ __forceinline__ uint32_t load_word(const uint32_t* p) {
#ifdef RNNKERN_EMULATE
  return *p;
#else
  uint32_t v;
  asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
#endif
}

// A reader's pause before it loads a word again. Gives up (a trap: the launch fails, no hang) after
// ~2^24 tries, seconds, where a word never comes.
__device__ __forceinline__ void pause_for_words(unsigned& tries) {
#ifdef RNNKERN_EMULATE
  (void)tries;
  ::rnnkern_emu::spin("tagged exchange");  // (the scheduler reports a hang where nothing moves)
#else
  if (++tries > (1u << 24)) __trap();
  __nanosleep(32);
#endif
}

// Word(s) `v`, loaded by `load()`, once they all have `tag`: loaded again, after a pause, until then.
template <typename V, typename Load>
__device__ __forceinline__ V with_tag(V v, uint32_t tag, Load load) {
  unsigned tries = 0;
  while (!tagged(v, tag)) {
    pause_for_words(tries);
    v = load();
  }
  return v;
}

// Rows [0, rows) of `cols` elements of step `tag` from the plane rows at `src` (row length
// cols * kTaggedWords words) into `dst` (row length ld), block-wide, as load_rows_cg: 16-byte loads
// where a row is whole vectors of 4 words (8 bytes of payload each), eight in flight per thread
// (16-bit: sixteen, twice load_rows_cg's, as the words are twice the bytes: B16 H1024 then still
// takes one L2 round trip; wider types spilled), each loaded again until all its words have the
// tag; else word by word.
// `by_vectors` divides by a row's vectors (cols * kTaggedWords / 4).
template <typename T>
__device__ __forceinline__ void load_tagged_rows(T* dst, int ld, const uint32_t* src, int cols, int rows, uint32_t tag,
                                                 const FastDiv& by_vectors) {
  const int row_words = cols * kTaggedWords<T>;
  if (row_words % 4 == 0 && (ld * sizeof(T)) % 8 == 0 && reinterpret_cast<uintptr_t>(dst) % 8 == 0 &&
      reinterpret_cast<uintptr_t>(src) % 16 == 0) {
    const int per_row = row_words / 4;
    const auto vector = [&](int i) { return load_words(src + 4 * i); };
    copy_batched<sizeof(T) == 2 ? 16 : 8>(rows * per_row, vector, [&](int i, uint4 v) {
      v = with_tag(v, tag, [&] { return vector(i); });
      const int r = by_vectors.div(i);
      const uint2 payload{(v.x & 0xffffu) | (v.y << 16), (v.z & 0xffffu) | (v.w << 16)};
      reinterpret_cast<uint2*>(dst + r * ld)[i - r * per_row] = payload;
    });
  } else {
    const auto word = [&](int i) { return load_word(src + i); };
    copy_batched<8>(rows * row_words, word, [&](int i, uint32_t w) {
      w = with_tag(w, tag, [&] { return word(i); });
      const int r = i / row_words;
      reinterpret_cast<uint16_t*>(dst + r * ld)[i - r * row_words] = static_cast<uint16_t>(w & 0xffffu);
    });
  }
}

// The st.async exchange (Exchange::ClusterAsync). A receiver's mbarrier completes a phase when its own
// thread 0 has arrived (announcing the bytes it expects that phase, arrive.expect_tx) and the senders'
// st.async stores have delivered those bytes (each decrements the transaction count by its size, which
// may run ahead of the announcement: the count may go negative within a phase). The receiver then
// waits for the phase, not for the whole cluster, and no GPU-scope fence is involved: each block
// waits only for the data it reads. (PTX ISA: mbarrier, st.async.)
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// One arrival per phase: the receiver's own expect_tx.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar) {
#ifdef RNNKERN_EMULATE
  ::rnnkern_emu::mbarrier_init(bar, 1);
#else
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(shared_address(bar)) : "memory");
#endif
}

// Makes the initialisations visible to the cluster's other blocks (before the cluster barrier that
// precedes any send).
__device__ __forceinline__ void mbarrier_init_fence() {
#ifndef RNNKERN_EMULATE  // (the emulator's stores are visible at once)
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void mbarrier_expect(uint64_t* bar, uint32_t bytes) {
#ifdef RNNKERN_EMULATE
  ::rnnkern_emu::mbarrier_arrive_expect_tx(bar, bytes);
#else
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(shared_address(bar)), "r"(bytes)
               : "memory");
#endif
}

// Waits for the phase of `bar` with this parity, with acquire semantics at cluster scope: the data
// came from the cluster's other blocks (their st.async completes with release at cluster scope).
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
#ifdef RNNKERN_EMULATE
  ::rnnkern_emu::mbarrier_wait_parity(bar, parity);
#else
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(shared_address(bar)), "r"(parity)
        : "memory");
  } while (!done);
#endif
}

// Where the shared-memory object at `local` (this block) is in block `rank` of the cluster.
__device__ __forceinline__ uint32_t remote_address(const void* local, int rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(shared_address(local)), "r"(rank));
  return remote;
}

// st.async of 16 bytes or of one double to `dst` in block `rank`, completing on that block's twin of
// `bar`.
__device__ __forceinline__ void send_async(void* dst, const uint4& v, int rank, uint64_t* bar) {
#ifdef RNNKERN_EMULATE
  ::rnnkern_emu::st_async(dst, &v, sizeof(v), rank, bar);
#else
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];\n" ::"r"(
                   remote_address(dst, rank)),
               "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(remote_address(bar, rank))
               : "memory");
#endif
}
__device__ __forceinline__ void send_async(void* dst, double v, int rank, uint64_t* bar) {
#ifdef RNNKERN_EMULATE
  ::rnnkern_emu::st_async(dst, &v, sizeof(v), rank, bar);
#else
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b64 [%0], %1, [%2];\n" ::"r"(
                   remote_address(dst, rank)),
               "l"(__double_as_longlong(v)), "r"(remote_address(bar, rank))
               : "memory");
#endif
}
// Four float or double values (16 or 32 bytes, 16-byte aligned) in 16-byte pieces.
template <typename A>
__device__ __forceinline__ void send4_async(A* dst, const A (&v)[4], int rank, uint64_t* bar) {
  static_assert(sizeof(A) == 4 || sizeof(A) == 8);
  const uint4* words = reinterpret_cast<const uint4*>(v);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(A)) / 4; ++i) send_async(reinterpret_cast<uint4*>(dst) + i, words[i], rank, bar);
}

// Which chunks a block sends to whom (broadcast_columns), fixed for the launch: `per_row` 16-byte
// chunks of own columns per state row, to `receivers - 1` other blocks (the divisions once: FastDiv).
// warp_level: own units are a whole number of chunks (all but a last block with a ragged share of H),
// so the 32 (row, unit) pairs of a warp's pass are whole chunks (pair / V is the chunk), and each
// warp can send its own as soon as its cells are done.
struct ColumnSends {
  int per_row, others, receivers;
  bool warp_level;
  FastDiv by_others, by_per_row;
  __device__ ColumnSends(int nu, int receivers_, int elems_per_chunk)
      : per_row((nu + elems_per_chunk - 1) / elems_per_chunk), others(receivers_ - 1), receivers(receivers_),
        warp_level(nu % elems_per_chunk == 0), by_others(max(receivers_ - 1, 1)), by_per_row(max(per_row, 1)) {}
};

// Copies chunks [c_begin, c_end) of the block's columns [u0, u0 + nu) of `stage` (row length ld,
// type T; chunk c: row c / per_row, columns u0 + (c % per_row) * V ...) into the same place of the
// other blocks [0, receivers), the (chunk, destination) pairs shared by the threads `first`,
// `first + stride`, ... (the block's or one warp's). u0 and ld are whole chunks, and the last chunk
// of a row past nu holds padding columns (zeros), which it copies as they are. Async: each chunk an
// st.async completing on the receiver's twin of `bar` (a receiver expects rows * (Σ over the other
// blocks of their chunks per row) * 16 bytes, in any order); otherwise a plain remote store, which
// the cluster barrier that follows makes visible.
template <bool Async, typename T>
__device__ __forceinline__ void broadcast_columns(const cg::cluster_group& cluster, T* stage, int ld, int u0,
                                                  const ColumnSends& cs, int rank, uint64_t* bar, int c_begin,
                                                  int c_end, int first, int stride) {
  constexpr int V = kChunk / static_cast<int>(sizeof(T));
  for (int i = first; i < (c_end - c_begin) * cs.others; i += stride) {
    const int q = cs.by_others.div(i), chunk = c_begin + q;
    int dest = rank + 1 + (i - q * cs.others);  // spread the destinations
    if (dest >= cs.receivers) dest -= cs.receivers;
    const int row = cs.by_per_row.div(chunk);
    T* p = stage + row * ld + u0 + (chunk - row * cs.per_row) * V;
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    if constexpr (Async) {
      send_async(p, v, dest, bar);
    } else {
      *reinterpret_cast<uint4*>(cluster.map_shared_rank(p, dest)) = v;
    }
  }
}

// A float32 value as a TF32 operand, rounded to nearest (ties away), as cuBLAS's TF32 mode rounds.
__device__ __forceinline__ uint32_t tf32_at(const float* p) {
#ifdef RNNKERN_EMULATE
  return ::rnnkern_emu::tf32_round(*p);
#else
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(*p));
  return r;
#endif
}

// Fragments of mma.m16n8k16 (16-bit) and mma.m16n8k8 (TF32) (PTX ISA, "matrix fragments for mma"),
// lane = 4 * gid + tig. A: rows [0, 16), columns [k0, k0 + kMmaK) of the row-major `m` (leading
// dimension ld), rows 8 to 15 `hi` elements after rows 0 to 7 (8 ld; 0 where the table has only 8
// rows there: rows 8 to 15 of the product then repeat rows 0 to 7).
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* m, int ld, int k0, int gid, int tig, int hi) {
  if constexpr (sizeof(T) == 4) {  // TF32: one element per register, columns tig and tig + 4
    const float* r0 = m + gid * ld + k0 + tig;
    const float* r8 = r0 + hi;
    a[0] = tf32_at(r0);
    a[1] = tf32_at(r8);
    a[2] = tf32_at(r0 + 4);
    a[3] = tf32_at(r8 + 4);
  } else {  // 16-bit: element pairs, columns 2 tig (+1) and 2 tig + 8 (+1)
    const T* r0 = m + gid * ld + k0 + 2 * tig;
    const T* r8 = r0 + hi;
    a[0] = pair_at(r0);
    a[1] = pair_at(r8);
    a[2] = pair_at(r0 + 8);
    a[3] = pair_at(r8 + 8);
  }
}

// B (kMmaK x 8, "col"): element (k, n) at m[n * ld + k], n in [n0, n0 + 8), k in [k0, k0 + kMmaK).
template <typename T>
__device__ __forceinline__ void load_b(uint32_t (&b)[2], const T* m, int ld, int n0, int k0, int gid, int tig) {
  if constexpr (sizeof(T) == 4) {
    const float* r = m + (n0 + gid) * ld + k0 + tig;
    b[0] = tf32_at(r);
    b[1] = tf32_at(r + 4);
  } else {
    const T* r = m + (n0 + gid) * ld + k0 + 2 * tig;
    b[0] = pair_at(r);
    b[1] = pair_at(r + 8);
  }
}

// d += A B (one K step) on the tensor cores, float32 accumulation. d[0], d[1]: row gid, columns
// 2 tig + {0, 1}; d[2], d[3]: row gid + 8.
template <typename T>
__device__ __forceinline__ void mma_step(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef RNNKERN_EMULATE
  ::rnnkern_emu::mma_m16n8(std::is_same_v<T, float> ? ::rnnkern_emu::kMmaTF32
                           : std::is_same_v<T, __half> ? ::rnnkern_emu::kMmaF16 : ::rnnkern_emu::kMmaBF16, d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, float>) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// A thread's (row, unit) pairs of a step whose global reads are loaded during the step before (the
// forward's x_t, the backward's FirstPair): the first two.
constexpr int kPrefetchPairs = 2;

// A warp's tiles in one pass: its A tile's first row m0, its first B tile (of 8 rows), how many
// (0: none; warp-uniform) and the part of K it takes (forward: ForwardMmaTiling; else 0).
struct WarpTiles {
  int m0, first, count, k_part;
};
// The backward's tensor-core product's work split: warp w takes the 8-row column tiles w, w + 8, ...
// of a 16-row tile, up to kMmaGroup of them at a time, which share each K step's A fragment (one load
// of A per K step instead of one per tile: the fragment loads, not the mma.sync, bound the product's
// shared-memory traffic where a warp has several tiles). With fewer column tiles than warps, the
// spare warps take further row tiles instead (one tile each). (The forward's: ForwardMmaTiling.)
// Worked out once per launch for a table of `n_tiles` (>= 1) column tiles: the divisions by n_tiles
// and the like would otherwise open every step's product (SASS: four of them, ~20 dependent
// instructions each); per step only the row tiles vary (packed sequences).
struct WarpTiling {
  bool narrow;    // fewer column tiles than warps: `per` row tiles a pass, one column tile a warp
  int per, sub;   // narrow: row tiles a pass, this warp's among them
  int col;        // narrow: this warp's column tile
  int n_tiles, groups;  // otherwise: passes over the column tiles per row tile
  FastDiv by_per, by_groups;
  __device__ WarpTiling(int n_tiles_, int warp) : n_tiles(n_tiles_) {
    narrow = n_tiles < kWarps;
    per = narrow ? kWarps / n_tiles : 1;
    sub = narrow ? warp / n_tiles : 0;
    col = narrow ? warp % n_tiles : warp;
    groups = narrow ? 1 : (n_tiles + kWarps * kMmaGroup - 1) / (kWarps * kMmaGroup);
    by_per = FastDiv(per);
    by_groups = FastDiv(groups);
  }
  // The passes over `m_tiles` row tiles (each warp's loop bound: tiles(item, ...) for item < this).
  __device__ __forceinline__ int passes(int m_tiles) const {
    return narrow ? by_per.div(m_tiles + per - 1) : m_tiles * groups;
  }
  __device__ __forceinline__ WarpTiles tiles(int item, int m_tiles) const {
    if (narrow) {
      const int m_tile = item * per + sub;
      return {m_tile * 16, col, sub < per && m_tile < m_tiles ? 1 : 0, 0};
    }
    const int row_tile = by_groups.div(item);
    const int first = (item - row_tile * groups) * kWarps * kMmaGroup + col;
    const int count = first < n_tiles ? min(kMmaGroup, (n_tiles - first + kWarps - 1) / kWarps) : 0;
    return {row_tile * 16, first, count, 0};
  }
};

// The forward's tensor-core product (hpᵀ = W_hh h_{t-1}ᵀ; forward_mma_splits): its items are (16-row
// tile of W_hh, group of up to kMmaGroup 8-row tiles of the batch), item = m_tile * n_groups + group;
// warp w takes items w, w + 8, ..., or, with K split, item w % items and part w / items of K (while
// that part exists). Fixed for the launch; per step only the batch's tiles vary (packed sequences).
struct ForwardMmaTiling {
  int items, n_groups, first_item, k_part;
  FastDiv by_groups;
  __device__ ForwardMmaTiling(int m_tiles, int n_groups_, int splits, int warp)
      : items(m_tiles * n_groups_), n_groups(n_groups_), by_groups(n_groups_) {
    first_item = splits > 1 ? warp % items : warp;
    k_part = splits > 1 ? warp / items : 0;
    if (k_part >= splits) first_item = items;  // a warp past the parts: idle
  }
  // Item `item`'s tiles at a step with `n_tiles` 8-row tiles of the batch (count 0: none).
  __device__ __forceinline__ WarpTiles tiles(int item, int n_tiles) const {
    const int m_tile = by_groups.div(item), first = (item - m_tile * n_groups) * kMmaGroup;
    return {m_tile * 16, first, max(0, min(kMmaGroup, n_tiles - first)), k_part};
  }
};

// d[i] = A B_iᵀ over K for the column tiles t.first + stride * i, i < t.count: A the 16 rows from `a`
// (row-major, leading dimension lda; rows 8 to 15 from a + a_hi: load_a), B_i the 8 rows from
// b + (t.first + stride * i) * 8 * ldb, K in
// steps of kMmaK (columns past K are zeros in both tables). One tile: kMmaGroup accumulators over
// the K steps in turn instead, summed pairwise at the end (each mma.sync waits for the one before on
// the same accumulator: four chains of K / 4 steps instead of one of K), over [k_begin, K) (a part of K:
// WarpTiles::k_part); two tiles: two accumulators each.
template <typename T>
__device__ __forceinline__ void mma_warp_tiles(float (&d)[kMmaGroup][4], const T* a, int lda, const T* b, int ldb,
                                               const WarpTiles& t, int K, int gid, int tig, int k_begin, int stride,
                                               int a_hi) {
#pragma unroll
  for (int i = 0; i < kMmaGroup; ++i) d[i][0] = d[i][1] = d[i][2] = d[i][3] = 0.f;
  uint32_t fa[4], fb[2];
  if (t.count == 1) {
    for (int k0 = k_begin; k0 < K; k0 += kMmaGroup * kMmaK<T>) {
#pragma unroll
      for (int i = 0; i < kMmaGroup; ++i) {
        if (k0 + i * kMmaK<T> < K) {
          load_a(fa, a, lda, k0 + i * kMmaK<T>, gid, tig, a_hi);
          load_b(fb, b, ldb, t.first * 8, k0 + i * kMmaK<T>, gid, tig);
          mma_step<T>(d[i], fa, fb);
        }
      }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) d[0][e] = (d[0][e] + d[1][e]) + (d[2][e] + d[3][e]);
    return;
  }
  if (t.count == 2) {  // two accumulators a tile over alternate K steps (LSTM H512: chains of 16, not 32)
    for (int k0 = k_begin; k0 < K; k0 += 2 * kMmaK<T>) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        if (k0 + half * kMmaK<T> < K) {
          load_a(fa, a, lda, k0 + half * kMmaK<T>, gid, tig, a_hi);
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            load_b(fb, b, ldb, (t.first + stride * i) * 8, k0 + half * kMmaK<T>, gid, tig);
            mma_step<T>(d[2 * i + half], fa, fb);
          }
        }
      }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float tile0 = d[0][e] + d[1][e], tile1 = d[2][e] + d[3][e];
      d[0][e] = tile0;
      d[1][e] = tile1;
    }
    return;
  }
  for (int k0 = k_begin; k0 < K; k0 += kMmaK<T>) {
    load_a(fa, a, lda, k0, gid, tig, a_hi);
#pragma unroll
    for (int i = 0; i < kMmaGroup; ++i) {
      if (i < t.count) {
        load_b(fb, b, ldb, (t.first + stride * i) * 8, k0, gid, tig);
        mma_step<T>(d[i], fa, fb);
      }
    }
  }
}

#endif  // RNNKERN_HAS_CLUSTERS

// The FMA forward product's split of the hp table (ncols rows n of W_hh x the tile's rows) into
// register tiles of 4 x 4, each `lanes` lanes over K, fixed for the launch: worked out for the tile's
// rows at their most, so that no step re-derives it (divisions; see FastDiv); a step with fewer rows
// (packed sequences) leaves the tiles past them idle.
struct FmaSplit {
  int ncols, rt, tiles, lanes, lane_bits;
  FastDiv by_rt;
  __device__ FmaSplit(int ncols_, int tile_rows)
      : ncols(ncols_), rt((tile_rows + 3) / 4), tiles(rt * ((ncols_ + 3) / 4)), lanes(lanes_per_pair(tiles)),
        lane_bits(0), by_rt(rt) {
    while ((1 << lane_bits) < lanes) ++lane_bits;  // (lanes: a power of two)
  }
};

// The FMA backward product's split (phase C): `tiles` register tiles of 4 rows x 4 units k, each over
// 2^part_bits adjacent lanes that take every such group of the block's gate columns (4 columns for
// float, whose loads go in flight together; 1 for double), summed by a fixed butterfly
// (group_sum_each). Where a tile's rows leave fewer register tiles than threads (8-row tiles: half the
// threads had idled with the whole column loop on the others), the spare lanes share the columns.
// Fixed for the launch: for the tile's rows at their most, and this block's units (at most its column
// groups). (Only part_bits is kept through the loop: the rest is the launch's shape, in the constant
// bank; a register more had spilled the GRU's float32 backward.)
__device__ __forceinline__ int dh_tiles(int tile_rows, int hidden) {
  return (tile_rows + 3) / 4 * ((hidden + 3) / 4);
}

__device__ __forceinline__ int dh_part_bits(int tile_rows, int hidden, int column_groups) {
  const int most = min(lanes_per_pair(dh_tiles(tile_rows, hidden)), column_groups);
  int bits = 0;  // (a loop, not 31 - __clz: that form spilled the GRU float32 backward under ptxas)
  while ((2 << bits) <= most) ++bits;
  return bits;
}

// X: how the blocks exchange state (Plan::exchange). Async: the st.async exchange (mbarriers, no
// cluster barrier per step). Grid: through global memory (`out`; the backward's scratch) with the
// grid's barrier where the others have the cluster's ("wide": a tile's blocks need not fit in one
// cluster). Mma: the products on tensor cores (uses_mma).
// __launch_bounds__(kThreads, kMinBlocks): one block per SM is all a tile's cluster needs (it runs the
// whole sequence; the plan counts resident clusters), so the float64 and wide kernels may use up to
// 255 registers a thread (with the default heuristic ptxas held some to 64 and spilled, to local
// memory whose L1 lines each step's barrier or acquire invalidates). The 16-bit and float32 cluster
// kernels are held to 128 (two blocks an SM): the H100 then runs two clusters' blocks on an SM where
// shared memory allows, and large batches all their tiles at once (LSTM B256 H256: 16 clusters of 16
// blocks on 132 SMs). They fit in 128 without spills (ptxas, sm_90; the float32 forward keeps its two
// K chunks in flight); the others: no spills, at most 218 (the wide backward's 16 loads in flight).
template <typename T, Exchange X, bool Mma>
constexpr int kMinBlocks = ((Mma || sizeof(T) == 4) && X != Exchange::Grid) ? 2 : 1;

template <Cell C, typename T, Exchange X, bool Mma>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T, X, Mma>) cluster_forward_kernel(ForwardArgs a, ClusterShape shape) {
#ifndef RNNKERN_HAS_CLUSTERS
  __trap();  // make_cluster_plan declines devices below sm_90: never launched there
#else
  using A = typename AccOf<T>::type;
  constexpr int G = kGates<C>;
  constexpr int S = kSlots<C>;
  constexpr bool Async = X == Exchange::ClusterAsync, Grid = X == Exchange::Grid;
  StepClock clock;  // (records only in the RNNKERN_STEP_TRACE build)
  clock.start();
  cg::cluster_group cluster = cg::this_cluster();
  const int H = static_cast<int>(a.hidden);
  const int GH = G * H;
  const auto [blocks, rank, U, Bt, u0, nu, tile0, used] = Grid ? place_in_grid(shape, H) : place(cluster, shape, H);
  const Tables tb = make_tables(sizeof(T), Mma, H, G, U, Bt);
  const int LD = tb.ld, HP = tb.hp_ld;
  const ForwardLayout lay = forward_layout(tb, G, U, Bt, sizeof(A), sizeof(T), X);
  RNNKERN_DYNAMIC_SHARED(smem_raw);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem_raw + lay.bars);  // Async: [2], stage[k] complete
  A* bias = reinterpret_cast<A*>(smem_raw + lay.bias);    // [G][U]: b_hh of own units
  A* own_c = reinterpret_cast<A*>(smem_raw + lay.own_c);  // [Bt][U]: LSTM c_{t-1} of own units
  A* hp = reinterpret_cast<A*>(smem_raw + lay.hp);        // [state_rows][HP]: h_{t-1} W_hhᵀ, own rows n
  T* w = reinterpret_cast<T*>(smem_raw + lay.w);          // [w_rows][LD]: W_hh rows g*H + u0 + ul
  T* stage = reinterpret_cast<T*>(smem_raw + lay.stage);  // [2][state_rows][LD]: h_{t-1}, by parity (Grid: [1])
  const auto [w_hh, xp, b_hh, h0, c0, out, ws, h_n, c_n] = typed<T, A>(a);
  const Geometry geo{a.sizes, a.offsets, a.steps, a.reverse};

  // Zeros first: the product tiles read the padding (rows, columns) of both tables.
  zero_words(w, static_cast<int>(lay.bytes - lay.w));
  __syncthreads();
  for (int i = threadIdx.x; i < G * nu * H; i += kThreads) {
    const int k = i % H, r = i / H, ul = r % nu, g = r / nu;
    w[(g * U + ul) * LD + k] = w_hh[static_cast<int64_t>(g * H + u0 + ul) * H + k];
  }
  for (int i = threadIdx.x; i < G * nu; i += kThreads) {
    const int g = i / nu, ul = i % nu;
    bias[g * U + ul] = b_hh ? A(load(b_hh + g * H + u0 + ul)) : A(0);
  }
  // Async: only the blocks [0, used) that own units take part (a block without units would only
  // receive, so nothing would keep the senders from running more than a step ahead of it and into
  // its next phase); the chunks of a state row the others send (a block owns ceil(its units / V)).
  int others_chunks = 0;
  if constexpr (Async) {
    constexpr int V = kChunk / static_cast<int>(sizeof(T));
    for (int r = 0; r < used; ++r) {
      if (r != rank) others_chunks += (min(U, H - r * U) + V - 1) / V;
    }
    if (threadIdx.x == 0) {
      mbarrier_init(&full[0]);
      mbarrier_init(&full[1]);
      mbarrier_init_fence();
    }
  }
  uint32_t parity = 0u;  // Async: bit k, the parity of stage k's next phase
  // Async: rows the blocks sent at the step before (0: none, so no phase to wait for). A tile's rows
  // are monotone in time, so steps without rows come first or last and the steps that exchange
  // follow each other: each block's phases stay in step with every other's.
  int rows_sent = 0;
  // Every block runs (and has its tables) before any block writes into it. Grid: nobody writes into
  // another block's shared memory, but the block's own threads must see its tables.
  if constexpr (Grid) {
    __syncthreads();
  } else {
    cluster.sync();
  }

  // Each step's geometry is loaded at the top of the step before it (the barrier or the acquire that
  // opens a step invalidates L1 (CCTL.IVALL), so every read of it is an L2 round trip, which this way
  // overlaps a step's work), and turned into a TileStep after that step's product, where the prefetch
  // of x needs it (the arithmetic would wait for the loads).
  TileStep next_step = tile_step(geo, geo.t_of(0), tile0, Bt);
  StepLoads upcoming{};
  // x_t's projection for this thread's first (row, unit) pair of a step, loaded during the step before
  // (into x_upcoming before its cell phase, moved to x_first at its end), so that its L2 latency
  // overlaps that step's cells, sends and exchange instead of this step's product; kept in the storage
  // dtype until the cell phase (a conversion would wait for the loads). (Issued after the cell phase,
  // the loads had only the sends to land in: the next step's top waited for them, its own loads sharing
  // their scoreboard in the SASS.) Nothing in this launch writes xp.
  // Two pairs a thread (kPrefetchPairs) on tensor cores: at 512 pairs a block (LSTM H512 on 16 blocks)
  // the second pair's loads had been on demand, an L2 round trip inside the cell phase. One for the
  // FMA products, whose tiles (4 rows by default) rarely have more than 256 pairs: with two, ptxas
  // spilled the float32 LSTM forward once its cells were written as two passes (cell_pass).
  constexpr int P = Mma ? kPrefetchPairs : 1;
  T x_first[P][G], x_upcoming[P][G];
  // The step's divisions, worked out once (FastDiv): pairs by units, the tensor-core tiles, the sends.
  const FastDiv by_nu(max(nu, 1));
  const int k_splits = tb.hp_splits, hp_copy = tb.state_rows * HP;  // (FMA: 1)
  const ForwardMmaTiling tiling(Mma ? (tb.w_rows + 15) / 16 : 1, forward_mma_groups(Bt), k_splits,
                                static_cast<int>(threadIdx.x) / 32);  // (FMA: unused)
  // This warp's part of K (all of it unless split), in whole MMA K steps.
  const int k_padded = round_up(H, kMmaK<T>), k_per_part = round_up((k_padded + k_splits - 1) / k_splits, kMmaK<T>);
  const int k_begin = min(k_padded, tiling.k_part * k_per_part), k_end = min(k_padded, k_begin + k_per_part);
  const ColumnSends sends(nu, Async ? used : blocks, kChunk / static_cast<int>(sizeof(T)));
  const FmaSplit fma(G * U, Bt);
  const FastDiv by_h_chunks(max(H * static_cast<int>(sizeof(T)) / kChunk, 1));  // Grid: load_rows_cg
  // Grid: h_t through the tagged words (load_tagged_rows), or, without them, `out` and the grid's barrier.
  uint32_t* const tagged_h = Grid ? static_cast<uint32_t*>(a.exchange) : nullptr;
  const int64_t tagged_plane = a.batch * H * kTaggedWords<T>;
  uint32_t* const tagged_tile = tagged_h != nullptr ? tagged_h + static_cast<int64_t>(tile0) * H * kTaggedWords<T> : nullptr;
  const FastDiv by_tagged_vectors(max(H * kTaggedWords<T> / 4, 1));
  const auto load_x = [&](T (&into)[P][G], const TileStep& st) {
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const int pair = static_cast<int>(threadIdx.x) + j * kThreads;
      if (pair >= st.rows * nu) break;
      const int b = by_nu.div(pair);
      const T* x = xp + (st.row0 + b) * GH + u0 + (pair - b * nu);
#pragma unroll
      for (int g = 0; g < G; ++g) into[j][g] = x[g * H];
    }
  };
  load_x(x_first, next_step);
  // (A block without units sends nothing: with the st.async or tagged exchange nobody waits for it.)
  const int64_t steps = ((Async || tagged_h != nullptr) && nu == 0) ? 0 : a.steps;
  clock.loop_start();
  for (int64_t s = 0; s < steps; ++s) {
    [[maybe_unused]] const auto [row0, prev_row0, rows, rows_prev, rows_next] = next_step;  // a copy
    // (Unconditional, the last step reloading itself: a branch around loads makes ptxas wait for every
    // load in flight on the same scoreboard, the x_t prefetch included.)
    upcoming = load_step(geo, geo.t_of(min(s + 1, a.steps - 1)));
    if (a.full_batch > 0 && s + kL2PrefetchSteps < a.steps && rank < used) {
      // A later step's x projection into L2 (prefetch_l2): the tile's rows, all G * H columns.
      const int64_t ahead = geo.t_of(s + kL2PrefetchSteps) * a.full_batch + tile0;
      prefetch_l2(xp + ahead * GH, int64_t{rows_below(a.full_batch, tile0, Bt)} * GH * sizeof(T), rank, used);
    }
    const int pairs = rows * nu;
    T* cur = stage + (Grid ? 0 : (s & 1) * tb.state_rows * LD);
    T* nxt = stage + (Grid ? 0 : ((s + 1) & 1) * tb.state_rows * LD);
    if constexpr (Async) {
      // h_{t-1}: the other blocks' columns of stage s % 2 (sent at step s - 1; step 0 reads h0).
      if (rows_sent > 0) {
        mbarrier_wait(&full[s & 1], (parity >> (s & 1)) & 1u);
        parity ^= 1u << (s & 1);
      }
    }
    if constexpr (Grid) {
      // h_{t-1} of the continuing samples, all H columns (columns past H keep their zeros): the step
      // before's tagged words, or as every block stored it to `out` before the grid barrier that
      // ended the step before.
      if (tagged_h != nullptr) {
        if (rows_prev > 0) {
          load_tagged_rows(cur, LD, tagged_tile + ((s - 1) & 1) * tagged_plane, H, rows_prev, step_tag(s - 1),
                           by_tagged_vectors);
        }
      } else {
        load_rows_cg(cur, LD, out + prev_row0 * H, H, H, rows_prev, by_h_chunks);
      }
    }
    for (int i = threadIdx.x; i < (rows - rows_prev) * H; i += kThreads) {  // samples starting here
      const int b = rows_prev + i / H, k = i % H;
      cur[b * LD + k] = h0[static_cast<int64_t>(tile0 + b) * H + k];
    }
    if constexpr (C == Cell::LSTM) {
      // Their c0 of own units, where the cells read c_{t-1} (loaded in the cells, on the path of every
      // pair, the load's scoreboard was waited for there with the next step's x loads on it).
      for (int i = threadIdx.x; i < (rows - rows_prev) * nu; i += kThreads) {
        const int b = rows_prev + i / nu, ul = i % nu;
        own_c[b * U + ul] = A(load(c0 + static_cast<int64_t>(tile0 + b) * H + u0 + ul));
      }
    }
    __syncthreads();
    clock.mark(0);  // h_{t-1} in: the wait for it (Async), its loads (Grid)
    if constexpr (Async) {
      // What this block will receive into stage (s + 1) % 2: the others' columns of this step's rows.
      // That stage's previous phase completed at step s - 1 (waited for before the barrier above).
      if (threadIdx.x == 0 && used > 1 && s + 1 < a.steps && rows > 0) {
        mbarrier_expect(&full[(s + 1) & 1], static_cast<uint32_t>(rows * others_chunks * kChunk));
      }
    }

    // hp = h_{t-1} W_hhᵀ for the block's rows n = g * U + ul.
    if constexpr (Mma) {
      // 16 x 8 tiles of hpᵀ (16 rows n of W_hh from m0, 8 state rows b), a warp's item's tiles
      // together (ForwardMmaTiling, mma_warp_tiles: W_hh's fragment shared by its batch tiles).
      const int gid = (threadIdx.x % 32) / 4, tig = threadIdx.x % 4;
      const int n_tiles = (rows + 7) / 8;
      for (int item = tiling.first_item; item < tiling.items; item += kWarps) {
        const WarpTiles t = tiling.tiles(item, n_tiles);
        if (t.count == 0) continue;  // (warp-uniform)
        float d[kMmaGroup][4];
        // (W_hh's last tile may have 8 rows: w_rows is a multiple of 8; its rows 8 to 15 then repeat
        // rows 0 to 7 and are not stored.)
        const bool whole = t.m0 + 16 <= tb.w_rows;  // (warp-uniform)
        mma_warp_tiles<T>(d, w + t.m0 * LD, LD, cur, LD, t, k_end, gid, tig, k_begin, 1, whole ? 8 * LD : 0);  // columns past H: zeros
        clock.mark(1);  // thread 0's fragment loads and MMAs
#pragma unroll
        for (int i = 0; i < kMmaGroup; ++i) {
          if (i < t.count) {
            // d[i]: rows n = m0 + gid (+ 8) of W_hh, state rows b = 2 tig (+ 1) of the tile (rows past
            // `rows`: not read)
            A* r0 = hp + t.k_part * hp_copy + ((t.first + i) * 8 + 2 * tig) * HP + t.m0 + gid;
            r0[0] = d[i][0];
            r0[HP] = d[i][1];
            if (whole) {
              r0[8] = d[i][2];
              r0[HP + 8] = d[i][3];
            }
          }
        }
        clock.mark(2);  // its results to hp
      }
    } else if (nu > 0) {
      // Register tiles of 4 rows x 4 rows n of W_hh, K split over `lanes` lanes in chunks of 4
      // columns (16-byte loads for float; one load then feeds 4 FMAs per operand instead of one).
      // Tiles run row-fastest, so the lanes of a warp share W_hh chunks (broadcast reads). The split
      // is the launch's (fma: for the tile's rows at their most), rows past `rows` left idle.
      const int tile = static_cast<int>(threadIdx.x) >> fma.lane_bits;
      const int lane = static_cast<int>(threadIdx.x) & (fma.lanes - 1);
      for (int base = 0; base < fma.tiles; base += kThreads >> fma.lane_bits) {  // uniform trip count: shuffles
        const int r_tile = fma.by_rt.div(base + tile), r0 = 4 * (base + tile - r_tile * fma.rt);
        const int c0 = 4 * r_tile;
        const bool valid = base + tile < fma.tiles && r0 < rows;
        A acc[16];
#pragma unroll
        for (int i = 0; i < 16; ++i) acc[i] = A(0);
        if (valid) {
          const T* h_rows[4];
          const T* w_rows[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) {  // clamped: the extra rows' results are not stored
            h_rows[i] = cur + min(r0 + i, rows - 1) * LD;
            w_rows[i] = w + min(c0 + i, fma.ncols - 1) * LD;
          }
          // One chunk of 4 columns from k: its loads, and its 64 FMAs.
          const auto load_chunk = [&](A (&hv)[4][4], A (&wv)[4][4], int k) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              load4(hv[i], h_rows[i] + k);
              load4(wv[i], w_rows[i] + k);
            }
          };
          const auto fma_chunk = [&](const A (&hv)[4][4], const A (&wv)[4][4]) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
#pragma unroll
              for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i * 4 + j] += hv[i][e] * wv[j][e];
              }
            }
          };
          const int step = 4 * fma.lanes;  // columns past H are zeros in both tables
          if constexpr (sizeof(A) == 4) {
            // Two chunks in flight: the next one's loads issued before this one's FMAs, so that the
            // shared-memory latency overlaps them (the plain loop waited for its loads every chunk;
            // float only: a double chunk is twice the registers).
            A h0[4][4], w0[4][4], h1[4][4], w1[4][4];
            int k = 4 * lane;
            if (k < H) load_chunk(h0, w0, k);
            for (; k < H; k += 2 * step) {
              if (k + step < H) load_chunk(h1, w1, k + step);
              fma_chunk(h0, w0);
              if (k + step >= H) break;
              if (k + 2 * step < H) load_chunk(h0, w0, k + 2 * step);
              fma_chunk(h1, w1);
            }
          } else {
            for (int k = 4 * lane; k < H; k += step) {
              A hv[4][4], wv[4][4];
              load_chunk(hv, wv, k);
              fma_chunk(hv, wv);
            }
          }
        }
        clock.mark(1);  // thread 0's loads and FMAs (its lanes' part of K)
        group_sum_each(acc, fma.lanes);
        if (valid && lane == 0) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              if (r0 + i < rows && c0 + j < fma.ncols) hp[(r0 + i) * HP + c0 + j] = acc[i * 4 + j];
            }
          }
        }
        clock.mark(2);  // its K sum (the lanes' shuffle tree) and results to hp
      }
    }
    __syncthreads();
    clock.mark(3);  // the other warps' products (the barrier after them)
    if (Mma && k_splits > 1) {
      // K's parts of each own pair's G values, in part order, into the first copy of hp, before the
      // next step's x loads are issued: read in the cells, after them, the parts' shared-memory loads
      // had ptxas wait for the x loads too (their scoreboard), an L2 round trip a step.
      for (int pair = threadIdx.x; pair < pairs; pair += kThreads) {
        const int b = by_nu.div(pair), ul = pair - b * nu;
#pragma unroll
        for (int g = 0; g < G; ++g) {
          A* at = hp + b * HP + g * U + ul;
          A sum = at[0];
#pragma unroll
          for (int k = 1; k < kSubPartitions; ++k) {  // (forward_mma_splits: at most kSubPartitions)
            if (k < k_splits) sum += at[k * hp_copy];
          }
          at[0] = sum;  // (this thread's pair alone reads it)
        }
      }
    }
    if (s + 1 < a.steps) {
      next_step = tile_step(upcoming, tile0, Bt);
      load_x(x_upcoming, next_step);
    }

    // The cell for each (row, own unit); h_t to `out` and into every block's next stage: sent by each
    // warp as soon as its pairs' cells are done where they are whole chunks (ColumnSends::warp_level),
    // else by the block after them all.
    constexpr int V = kChunk / static_cast<int>(sizeof(T));
    const bool sending = !Grid && blocks > 1 && nu > 0 && s + 1 < a.steps;
    // Grid: where this step's h_t goes as tagged words (none after the last step)
    uint32_t* const tagged_step =
        (tagged_h != nullptr && s + 1 < a.steps) ? tagged_tile + (s & 1) * tagged_plane : nullptr;
    const bool warp_sends = sending && sends.warp_level;
    uint64_t* const sent_bar = Async ? &full[(s + 1) & 1] : nullptr;  // Async: only to the blocks with units (`used`)
    // One pass of the block's threads over pairs [base, base + kThreads), x_t's projection of a pair
    // from x_of(g, row, u). Written once, inlined twice below: for the passes whose x was loaded the
    // step before, and for the rest, loaded here. (One pass with both sources had the loaded path
    // join the prefetched one before x's first use, so ptxas waited there for every global load in
    // flight: the next step's x loads, an L2 or DRAM round trip in every step's cells (the float32
    // SASS). Apart, only the loaded path waits, and only for its own loads.)
    const auto cell_pass = [&](int base, const auto& x_of) {
      const int pair = base + static_cast<int>(threadIdx.x);
      if (pair < pairs) {
        const int b = by_nu.div(pair), ul = pair - b * nu, u = u0 + ul;
        const int64_t row = row0 + b;
        A xv[G];  // x_t's projection
#pragma unroll
        for (int g = 0; g < G; ++g) xv[g] = x_of(g, row, u);
        A hh[G];  // h_{t-1} W_hhᵀ + b_hh
#pragma unroll
        for (int g = 0; g < G; ++g) {
          hh[g] = hp[b * HP + g * U + ul] + bias[g * U + ul];  // (K's parts: summed above)
        }
        const bool last = b >= rows_next;  // the sample ends here: h_n (and c_n)
        A prev = A(0), c = A(0);  // c_{t-1} (LSTM) or h_{t-1} (GRU); c_t
        if constexpr (C == Cell::LSTM) {
          prev = own_c[b * U + ul];  // (c0 of the samples starting here: put there at the step's top)
        } else if constexpr (C == Cell::GRU) {
          prev = A(load(cur + b * LD + u));
        }
        const A h = forward_unit<C, A>(xv, hh, prev, ws + row * S * H, H, u, c);
        if constexpr (C == Cell::LSTM) {
          own_c[b * U + ul] = c;
          if (last) store(c_n + static_cast<int64_t>(tile0 + b) * H + u, c);
        }
        store(out + row * H + u, h);
        if (last) store(h_n + static_cast<int64_t>(tile0 + b) * H + u, h);
        if constexpr (!Grid) store(nxt + b * LD + u, h);  // as the next step would read it from `out`
        // Grid with tagged words: h_t into the stage's own column (this thread's pair alone reads it
        // there, GRU's h_{t-1} above; the product has read the stage), for the stores below.
        if (Grid && tagged_step != nullptr) store(cur + b * LD + u, h);
      }
      clock.mark(4);  // thread 0's cells
      if (warp_sends) {
        __syncwarp();  // the warp's h values in nxt
        const int p0 = base + (static_cast<int>(threadIdx.x) & ~31), p1 = min(p0 + 32, pairs);
        if (p0 < p1) {
          broadcast_columns<Async>(cluster, nxt, LD, u0, sends, rank, sent_bar, p0 / V, p1 / V,
                                   static_cast<int>(threadIdx.x) & 31, 32);
        }
      }
      clock.mark(6);  // thread 0's warp's sends (where the warps send)
    };
    const auto x_first_of = [&](int g, int64_t, int) { return A(load(&x_first[0][g])); };
    for (int base = 0; base < pairs; base += kThreads) {  // uniform trip count: the warps' sends sync
      if (base < P * kThreads) {
        if (base > 0) {  // the second pair's x where the first's was (constant indices: registers)
#pragma unroll
          for (int g = 0; g < G; ++g) x_first[0][g] = x_first[P - 1][g];
        }
        cell_pass(base, x_first_of);
      } else {
        cell_pass(base, [&](int g, int64_t row, int u) { return A(load(xp + row * GH + g * H + u)); });
      }
    }
    if (Grid && tagged_step != nullptr) {
      // This step's h_t of the samples that go on, as tagged words: each thread its own pairs (read
      // back from the stage where it put them; stored from the cells themselves, ptxas had the
      // GRU's cells wait for the next step's x loads).
      for (int pair = threadIdx.x; pair < rows_next * nu; pair += kThreads) {
        const int b = by_nu.div(pair), u = u0 + (pair - b * nu);
        store_tagged(tagged_step + (b * H + u) * kTaggedWords<T>, cur[b * LD + u], step_tag(s));
      }
    }
    if (sending && !warp_sends) {
      __syncthreads();
      clock.mark(5);  // the other threads' cells
      broadcast_columns<Async>(cluster, nxt, LD, u0, sends, rank, sent_bar, 0, rows * sends.per_row,
                               static_cast<int>(threadIdx.x), kThreads);
      clock.mark(6);  // thread 0's sends
    } else {
      clock.sync_mark(5);  // (trace build only: where nothing follows to wait in)
    }
    rows_sent = (used > 1 && s + 1 < a.steps) ? rows : 0;
    // Async: no barrier. A block sends into stage (s + 1) % 2 of another only after its cells of step
    // s; that stage was last read there by the product of step s - 1, and that block sent its step
    // s - 1 chunks only after the __syncthreads that ends the product: this block had all of them
    // before it started step s. hp is rewritten only after the next step's first __syncthreads, which
    // every thread reaches after its last read of it here.
    if constexpr (Grid) {
      if (s + 1 < a.steps) {  // no shared memory to keep alive after the last step
        if (tagged_h != nullptr) {
          // The block's threads start the next step together, as after the barrier. (Not needed for
          // the stage: a pair's column is rewritten there only from its tagged word, which its thread
          // stores after its last read of it; nor for hp, rewritten after the next step's loads.)
          __syncthreads();
        } else {
          exchange_barrier<X>(cluster);
        }
      }
    } else if constexpr (!Async) {
      cluster.sync();
    }
#pragma unroll
    for (int j = 0; j < P; ++j) {
#pragma unroll
      for (int g = 0; g < G; ++g) x_first[j][g] = x_upcoming[j][g];  // (after the sends: the moves wait for the loads)
    }
    clock.mark(7);  // the barrier (Async: nothing)
  }
  clock.finish(steps);
  // Async: every block has received everything sent to it (each waited for its stages); the barrier
  // keeps the cluster's shared memory alive until no block can still address it.
  if constexpr (Async) cluster.sync();
#endif
}

// After the backward's loop, the recorded norms (norm_g, norm_c: either may be null) of a tile's rows
// from its blocks' partial sums (norm_parts: [N][2][slots][blocks]; the first `stored` slots of the
// first `used` blocks, in slot and rank order: the same bits in every run), the tile's (step, row)
// pairs spread over its `blocks` blocks. Not inlined: inlined, its loops moved ptxas's scoreboards in
// the time loop before it (the LSTM float16 cluster-async kernel's phase D then waited for the next
// step's loads: scripts/sass_waits.py).
__device__ RNNKERN_NOINLINE void sum_recorded_norms(const int64_t* sizes, const int64_t* offsets, int64_t steps,
                                                    const double* norm_parts, int slots, int stored, int used,
                                                    float* norm_g, float* norm_c, int rank, int blocks, int tile0,
                                                    int tile_rows) {
  const int64_t pairs_all = steps * tile_rows;
  for (int64_t i = static_cast<int64_t>(rank) * kThreads + threadIdx.x; i < pairs_all;
       i += static_cast<int64_t>(blocks) * kThreads) {
    const int64_t t = i / tile_rows;
    const int b = static_cast<int>(i % tile_rows);
    if (b >= rows_below(sizes[t], tile0, tile_rows)) continue;
    const int64_t row = offsets[t] + tile0 + b;
    const double* g_parts = norm_parts + row * 2 * slots * blocks;
    const double* c_parts = g_parts + slots * blocks;
    double sum_g = 0.0, sum_c = 0.0;
    for (int part = 0; part < stored; ++part) {
      for (int r = 0; r < used; ++r) {
        if (norm_g != nullptr) sum_g += __ldcg(g_parts + part * blocks + r);
        if (norm_c != nullptr) sum_c += __ldcg(c_parts + part * blocks + r);
      }
    }
    if (norm_g != nullptr) norm_g[row] = static_cast<float>(sqrt(sum_g));
    if (norm_c != nullptr) norm_c[row] = static_cast<float>(sqrt(sum_c));
  }
}

template <Cell C, typename T, Exchange X, bool Mma>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T, X, Mma>) cluster_backward_kernel(BackwardArgs a, ClusterShape shape) {
#ifndef RNNKERN_HAS_CLUSTERS
  __trap();  // make_cluster_plan declines devices below sm_90: never launched there
#else
  using A = typename AccOf<T>::type;
  constexpr int G = kGates<C>;
  constexpr int S = kSlots<C>;
  constexpr bool Async = X == Exchange::ClusterAsync, Grid = X == Exchange::Grid;
  StepClock clock;  // (records only in the RNNKERN_STEP_TRACE build)
  clock.start();
  cg::cluster_group cluster = cg::this_cluster();
  const int H = static_cast<int>(a.hidden);
  const int GH = G * H;
  const auto [blocks, rank, U, Bt, u0, nu, tile0, used] = Grid ? place_in_grid(shape, H) : place(cluster, shape, H);
  const Tables tb = make_tables(sizeof(T), Mma, H, G, U, Bt);
  const int LD = tb.ld, LDN = tb.ldn, BtP = round_up(Bt, 4);
  const int copies = Grid ? 2 : shape.copies;
  const BackwardLayout lay = backward_layout(tb, G, U, Bt, blocks, sizeof(A), sizeof(T), Mma, X, copies);
  RNNKERN_DYNAMIC_SHARED(smem_raw);
  // Async: full_g[k] completes when the partials of Σ g² of a step of parity k are in (norms_first);
  // full_in[k] when this block's inbox of that step is; with one copy, full_in[0] every step.
  uint64_t* full_g = reinterpret_cast<uint64_t*>(smem_raw + lay.bars);
  uint64_t* full_in = full_g + 2;
  double* part_g_base = reinterpret_cast<double*>(smem_raw + lay.part_g);
  A* row_scale = reinterpret_cast<A*>(smem_raw + lay.row_scale);  // each row's clipping scale
  A* dh_next = reinterpret_cast<A*>(smem_raw + lay.dh_next);
  A* dc_next = reinterpret_cast<A*>(smem_raw + lay.dc_next);
  A* gbuf = reinterpret_cast<A*>(smem_raw + lay.gbuf);
  A* direct = reinterpret_cast<A*>(smem_raw + lay.direct);
  A* inbox = reinterpret_cast<A*>(smem_raw + lay.inbox);
  // Grid: the tile's part of the global scratch (grid_scratch): the [blocks][Bt] partial sums of g²
  // (copied into part_g to be summed), the inboxes; `copy`, `inbox_copy`: the distance to the other
  // parity's copy.
  // norm_parts: [N][2][shape.norm_slots][blocks], row n's partial sums of g² ([0], norms_g_late below)
  // and dc² ([1]) from each block of its tile (slot 0 only unless seg_rows), summed after the loop
  // (scratch_elements); after the Grid scratch.
  double* grid_part_g = nullptr;
  double* norm_parts = static_cast<double*>(a.scratch);
  const size_t staged = static_cast<size_t>(blocks) * Bt;  // between the copies in shared memory
  size_t copy = staged, inbox_copy = staged * U;
  if constexpr (Grid) {
    const GridScratch gs = grid_scratch(static_cast<int>(gridDim.x) / blocks, blocks, Bt, U);
    double* scratch = static_cast<double*>(a.scratch);
    norm_parts = scratch + gs.elements;
    const size_t tile = blockIdx.x / blocks;
    grid_part_g = scratch + gs.part_g + tile * blocks * Bt;
    inbox = reinterpret_cast<A*>(scratch + gs.inbox) + tile * blocks * blocks * Bt * U;
    copy = gs.partials;
    inbox_copy = gs.inboxes;
  }
  // Without clipping, ‖g_t‖ is not needed before the cell backward: with two copies of the exchanged
  // buffers, its partial sums are stored for after the loop, as the partial sums of ‖dc_t‖ always
  // are, and a step has one barrier (or mbarrier wait) instead of two.
  const bool clipping = a.clip > 0.0;
  const bool norms_first = clipping || copies == 1;  // the Σ g² exchange before the cell
  const bool norms_g_late = !norms_first && a.norm_g != nullptr, norms_c = C == Cell::LSTM && a.norm_c != nullptr;
  // A row's partial sums of squares per block: shape.norm_slots where that is more than one (every
  // block with units has U of them) and the sums wait for the loop's end (the Σ g² exchanged before
  // the cell, norms_first, has one a block), else one.
  const bool seg_rows = !norms_first && shape.norm_slots > 1;
  // A row's own units are aligned segments of norm_lanes(nu) lanes of a warp: all of them (nu a power
  // of two up to 32), or several (seg_rows): the Σ g² and Σ dc² partials by shuffles where the values
  // are computed (row_squares), one per segment. Otherwise one thread a row sums them from gbuf after
  // a __syncthreads (own_squares). (The segments' sizes and slots are worked out where used, from
  // constants and nu: kept in registers, or divided, they spilled 16-bit cluster-barrier backwards.)
  const bool lane_rows = nu > 0 && ((nu <= 32 && (nu & (nu - 1)) == 0) || seg_rows);
  const auto row_lanes = [&] { return norm_lanes(max(nu, 1)); };
  // Where unit ul's segment starts, and its slot (ul / row_lanes: a shift, row_lanes a power of two).
  const auto segment_starts = [&](int ul) { return (ul & (row_lanes() - 1)) == 0; };
  const auto segment_of = [&](int ul) { return ul >> (31 - __clz(row_lanes())); };
  // The dh product's operands. FMA: dgate[n][b] (acc dtype, transposed: a register tile's 4 rows
  // in one load) and W_hh rows w[n][k], n = g * U + ul. MMA: dgate16[b][n] as stored (T, state_rows x
  // LDN) and W_hhᵀ rows wt[k][n] (wt_rows x LDN).
  A* dgate = reinterpret_cast<A*>(smem_raw + lay.dgate);
  T* w = reinterpret_cast<T*>(smem_raw + lay.w);
  T* dgate16 = reinterpret_cast<T*>(smem_raw + lay.dgate16);
  T* wt = reinterpret_cast<T*>(smem_raw + lay.wt);
  const BackwardPointers<T, A> ptrs = typed<C, T, A>(a);
  const auto& [w_hh, grad_out, grad_h_n, grad_c_n, h0, c0, out, ws, dgates_x, dgates_h, grad_h0, grad_c0] = ptrs;
  const Geometry geo{a.sizes, a.offsets, a.steps, a.reverse};

  if constexpr (Mma) {
    zero_words(dgate16, static_cast<int>(lay.bytes - lay.dgate16));  // the tiles' padding
    __syncthreads();
    for (int i = threadIdx.x; i < G * nu * H; i += kThreads) {
      const int k = i % H, r = i / H, ul = r % nu, g = r / nu;
      wt[k * LDN + g * U + ul] = w_hh[static_cast<int64_t>(g * H + u0 + ul) * H + k];
    }
  } else {
    zero_words(w, static_cast<int>(lay.bytes - lay.w));  // padding columns and the rows of absent units
    __syncthreads();
    for (int i = threadIdx.x; i < G * nu * H; i += kThreads) {
      const int k = i % H, r = i / H, ul = r % nu, g = r / nu;
      w[(g * U + ul) * LD + k] = w_hh[static_cast<int64_t>(g * H + u0 + ul) * H + k];
    }
  }
  for (int i = threadIdx.x; i < 2 * Bt * U; i += kThreads) dh_next[i] = A(0);  // dh_next, dc_next
  // Async: the bytes per batch row this block receives in its inbox each step: the partials of its
  // units from every other block that owns units (4-unit pieces: send_partials).
  uint32_t inbox_row_bytes = 0;
  uint32_t parity = 0u;  // Async: bit k: full_g[k]; bit 2 + k: full_in[k]
  if constexpr (Async) {
    if (nu > 0) {
      inbox_row_bytes = (used - 1) * ((nu + 3) / 4) * 4 * sizeof(A);
    }
    if (threadIdx.x == 0) {
      for (int k = 0; k < 4; ++k) mbarrier_init(&full_g[k]);
      mbarrier_init_fence();
    }
  }
  // Every block runs (and its mbarriers exist) before any block writes into it. Grid: the exchanged
  // buffers are global; each is written before it is read in every step. Either way the prologue's
  // zeros of dh_next/dc_next must land before any thread's phase B writes them: without norms no
  // barrier comes earlier in the step, and a late zero erased dc_{t-1} (wide LSTM, the GPU's and the
  // emulator's racecheck, 2026-11-26).
  if constexpr (Grid) {
    __syncthreads();
  } else {
    cluster.sync();
  }

  // Each thread's first kPrefetchPairs (row, unit) pairs of a step: what phases A and B read of them
  // from global memory (grad_out, the saved workspace slots, c/h of the step before, h_t), loaded
  // during the step before (after its phase B), so that their latency overlaps that step's product,
  // exchange and sums instead of opening this one. Nothing in this launch writes them.
  // They stay in their storage dtypes until used (a conversion would wait for the loads).
  // (LSTM: one pair; its two spilled under the 128-register cap, to local memory whose L1 lines each
  // step's barrier or acquire invalidates.)
  constexpr int P = C == Cell::LSTM ? 1 : kPrefetchPairs;
  struct FirstPair {
    T g_out;
    UnitStateLoads<T, A> state;
    A saved[S > 0 ? S : 1];
  } first[P];
  // The step's divisions, worked out once (FastDiv): pairs by units, the tensor-core tiles, the
  // reduce-scatter's owners.
  const FastDiv by_nu(max(nu, 1)), by_units(U), by_k_quads((H + 3) / 4), by_blocks(blocks);
  const WarpTiling tiling((H + 7) / 8, static_cast<int>(threadIdx.x) / 32);
  const int dh_bits = Mma ? 0 : dh_part_bits(Bt, H, sizeof(A) == 4 ? (nu + 3) / 4 : nu);  // (MMA: unused)
  const auto load_first = [&](const TileStep& st) {
#pragma unroll
    for (int k_pair = 0; k_pair < P; ++k_pair) {
      const int pair = static_cast<int>(threadIdx.x) + k_pair * kThreads;
      if (pair >= st.rows * nu) break;
      const int b = by_nu.div(pair), u = u0 + (pair - b * nu);
      const int64_t row = st.row0 + b;
      FirstPair& f = first[k_pair];
      f.g_out = ptrs.grad_out[row * H + u];
#pragma unroll
      for (int k = 0; k < S; ++k) f.saved[k] = ptrs.ws[(row * S + k) * H + u];
      f.state = load_unit_state<C, T, A>(ptrs, tile0 + b, row, st.prev_row0 + b, b >= st.rows_prev, H, u);
    }
  };

  // Where every step has the whole batch, the rows of step `step` + kL2PrefetchSteps into L2
  // (prefetch_l2): the tile's rows of grad_out, of the saved activations and (GRU: h_{t-1} of the step
  // before, RNN: h_t) of out. (From an opaque batch: with its products hoisted out of the loop, ptxas
  // spilled the 16-bit GRU and the float32 LSTM backward.)
  const auto prefetch_ahead = [&](int64_t step) {
    if (a.full_batch > 0 && step + kL2PrefetchSteps < a.steps && rank < used) {
      const int64_t batch = opaque(a.full_batch);
      const int64_t ahead = geo.t_of(a.steps - 1 - (step + kL2PrefetchSteps)) * batch + tile0;
      const int64_t ahead_rows = rows_below(batch, tile0, Bt);
      prefetch_l2(ptrs.grad_out + ahead * H, ahead_rows * H * sizeof(T), rank, used);
      if constexpr (S > 0) prefetch_l2(ptrs.ws + ahead * S * H, ahead_rows * S * H * sizeof(A), rank, used);
      if constexpr (C != Cell::LSTM) prefetch_l2(ptrs.out + ahead * H, ahead_rows * H * sizeof(T), rank, used);
    }
  };

  // The steps in reverse of the forward order; each one's geometry loaded at the top of the step
  // before and turned into a TileStep after its phase B (see the forward).
  TileStep next_step = tile_step(geo, geo.t_of(a.steps - 1), tile0, Bt);
  StepLoads upcoming{};
  load_first(next_step);
  clock.loop_start();
  for (int64_t s = 0; s < a.steps; ++s) {
    const auto [row0, prev_row0, rows, rows_prev, rows_next] = next_step;  // a copy
    upcoming = load_step(geo, geo.t_of(a.steps - 1 - min(s + 1, a.steps - 1)));  // unconditional: see the forward
    const int pairs = rows * nu;
    // Every exchanged buffer by step parity (copies == 2): a block writes the copy of step s + 2 only
    // after it has the data of step s + 1 from every block that reads it (their reduce-scatter sends,
    // issued after their reads of step s), so one barrier or wait per step suffices where the norms are
    // not needed before the cell (no clipping). With one copy, the norms' exchange (norms_first) keeps
    // every block within a step of the others.
    const int par = static_cast<int>(s & 1), pin = copies == 2 ? par : 0;  // pin: inbox, full_in
    double* part_g = part_g_base + (Grid ? 0 : (part_g_copies(X, copies) == 2 ? par : 0) * copy);  // Grid: staging
    A* inbox_s = inbox + pin * inbox_copy;
    // Where block `owner`'s inbox of this step is: in its shared memory (the same offset as here), or
    // (Grid) its own [blocks][Bt][U] of the tile's scratch.
    const auto inbox_of = [&](int owner) { return Grid ? inbox_s + static_cast<size_t>(owner) * blocks * Bt * U : inbox_s; };
    double* grid_part_g_s = Grid ? grid_part_g + par * copy : nullptr;
    // Σ over own units of gbuf² in row b (g in phase A, dc after phase B).
    const auto own_squares = [&](int b) {
      double sum = 0.0;
      for (int ul = 0; ul < nu; ++ul) sum += cuda::square(gbuf[b * U + ul]);
      return sum;
    };
    // With lane_rows, the same sums by shuffles where the values are computed (phases A and B):
    // each row's nu pairs are aligned segments of row_lanes lanes in every pass of those phases'
    // uniform loops, so every lane calls it (invalid ones add 0); a segment's sum, a fixed tree, is in
    // its first lane (segment_starts; its slot: segment_of). No pass over gbuf by one thread a row
    // after a __syncthreads (it held up warp 0).
    const auto row_squares = [&](A v, bool valid) {
      double sum = valid ? cuda::square(v) : 0.0;
      for (int offset = row_lanes() / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
      return sum;
    };
    // Without clipping the recorded norms' partials are not needed in the loop: where the step's pairs
    // take one pass, each thread keeps its g² and dc² and the rows' shuffle sums run after phase C's
    // sends, while the exchange is in flight (in phases A and B they were on the critical path).
    const bool defer_squares = !norms_first && lane_rows && pairs <= kThreads && (norms_g_late || norms_c);
    double late_g2 = 0.0, late_c2 = 0.0;  // (defer_squares: this thread's pair; 0 where it has none)
    // Row b's partial sum of g² (kind 0) or dc² (kind 1) to this block's slot `part` of the norm
    // partials, summed after the loop: a global store nothing in the loop waits for.
    const auto square_for_later = [&](int kind, int b, int part, double sum) {
      norm_parts[((((row0 + b) * 2 + kind) * shape.norm_slots + part) * blocks + rank)] = sum;
    };
    const auto squares_for_later = [&](int kind) {  // every row, from gbuf
      for (int b = threadIdx.x; b < rows; b += kThreads) square_for_later(kind, b, 0, own_squares(b));
    };
    if constexpr (Async) {
      // This step's phases: each barrier's previous phase (two steps back; one for full_in[0] with one
      // copy) was waited for before this step. Steps without rows exchange nothing and have no phases;
      // they come first or last (a tile's rows are monotone in time), so the steps that exchange
      // follow each other and every block's phases stay in step.
      if (threadIdx.x == 0 && rows > 0) {
        if (norms_first && blocks > 1) {
          mbarrier_expect(&full_g[par], static_cast<uint32_t>((blocks - 1) * rows * sizeof(double)));
        }
        if (inbox_row_bytes > 0) mbarrier_expect(&full_in[pin], static_cast<uint32_t>(rows) * inbox_row_bytes);
      }
    }

    // A: g for own units; its squares summed over own units, to every block (norms_first: with
    // clipping each needs the norms for the cell), else to the norm partials (recorded norms). With
    // lane_rows the row sums come from the lanes: norms_first puts them in the own slot of part_g
    // (Grid: of the scratch), from where they are sent below; otherwise they are stored from here.
    const bool g_squares = norms_first || norms_g_late, g_squares_by_lanes = g_squares && lane_rows;
    for (int base = 0; base < pairs; base += kThreads) {  // uniform trip count: row_squares shuffles
      const int pair = base + static_cast<int>(threadIdx.x);
      const bool valid = pair < pairs;
      const int b = by_nu.div(pair), ul = pair - b * nu, u = u0 + ul;
      A g = A(0);
      if (valid) {
        const A incoming = b < rows_next ? dh_next[b * U + ul]
                                         : A(load(grad_h_n + static_cast<int64_t>(tile0 + b) * H + u));
        // (constant indices into `first`: it stays in registers)
        A out_grad;
        if (base == 0) {
          out_grad = A(load(&first[0].g_out));
        } else if (P > 1 && base == kThreads) {
          out_grad = A(load(&first[P - 1].g_out));
        } else {
          out_grad = A(load(grad_out + (row0 + b) * H + u));
        }
        g = out_grad + incoming;
        gbuf[b * U + ul] = g;
      }
      if (g_squares_by_lanes && defer_squares) {
        late_g2 = valid ? cuda::square(g) : 0.0;
      } else if (g_squares_by_lanes) {
        const double sum = row_squares(g, valid);
        if (valid && segment_starts(ul)) {  // (norms_first: one slot, row_lanes == nu, so ul == 0)
          if (!norms_first) {
            square_for_later(0, b, segment_of(ul), sum);
          } else if constexpr (Grid) {
            grid_part_g_s[rank * Bt + b] = sum;
          } else {
            part_g[rank * Bt + b] = sum;
          }
        }
      }
    }
    if (norms_first || (norms_g_late && !lane_rows)) __syncthreads();  // the loops below read other threads' g
    clock.mark(0);  // A
    if (norms_first) {
      // (Grid with lane_rows: each row's one slot was written in the loop above: nothing to send.)
      const int items = Grid ? (lane_rows ? 0 : rows) : rows * blocks;
      for (int i = threadIdx.x; i < items; i += kThreads) {
        const int q = by_blocks.div(i), b = Grid ? i : q, r = Grid ? rank : i - q * blocks;
        if (lane_rows && r == rank) continue;  // the own slot: written in the loop above
        const double sum = lane_rows ? part_g[rank * Bt + b] : own_squares(b);
        if constexpr (Grid) {
          grid_part_g_s[rank * Bt + b] = sum;
        } else if constexpr (Async) {
          if (r == rank) {
            part_g[rank * Bt + b] = sum;
          } else {
            send_async(part_g + rank * Bt + b, sum, r, &full_g[par]);
          }
        } else {
          *cluster.map_shared_rank(part_g + rank * Bt + b, r) = sum;
        }
      }
      if constexpr (Async) {
        __syncthreads();  // the own partials
        if (blocks > 1 && rows > 0) {
          mbarrier_wait(&full_g[par], (parity >> par) & 1u);
          parity ^= 1u << par;
        }
      } else {
        exchange_barrier<X>(cluster);
      }
      if constexpr (Grid) {  // every block's partials at once (one L2 round trip), then as in a cluster
        load_rows_cg(part_g, Bt, grid_part_g_s, Bt, rows, blocks,
                     FastDiv(max(rows / (kChunk / static_cast<int>(sizeof(double))), 1)));
        __syncthreads();
      }
      // B: the full norms (the same bits in every block: summed in rank order), for the clipping.
      for (int b = threadIdx.x; b < rows; b += kThreads) {
        double sum = 0.0;
        for (int r = 0; r < blocks; ++r) sum += part_g[r * Bt + b];
        const double norm = sqrt(sum);
        row_scale[b] = clip_scale_of<A>(norm, a.clip);
        if (rank == 0 && a.norm_g != nullptr) a.norm_g[row0 + b] = static_cast<float>(norm);
      }
    } else if (norms_g_late && nu > 0 && !lane_rows) {  // blocks without units add nothing
      squares_for_later(0);
    }
    // (gbuf is rewritten below, and row_scale read; otherwise each thread reads only its own units' g)
    if (norms_first || (norms_g_late && !lane_rows)) __syncthreads();
    clock.mark(1);  // the Σ g² partials: exchanged (norms_first), or stored for after the loop

    // B: clipping, the gate gradients of own units (LSTM with lane_rows: Σ dc² stored from here).
    const bool c_squares_by_lanes = norms_c && lane_rows;
    for (int base = 0; base < pairs; base += kThreads) {  // uniform trip count: row_squares shuffles
      const int pair = base + static_cast<int>(threadIdx.x);
      const bool valid = pair < pairs;
      const int b = by_nu.div(pair), ul = pair - b * nu, u = u0 + ul;
      A dc_out = A(0);  // LSTM: this pair's dc_t, for the norms
      if (valid) {
        const int64_t row = row0 + b;
        const A dh = clipping ? gbuf[b * U + ul] * row_scale[b] : gbuf[b * U + ul];
        const bool starts = b >= rows_prev;  // the sample's first step: gradients go to h0/c0
        A saved[S > 0 ? S : 1], prev, h;
        if (base == 0) {
#pragma unroll
          for (int k = 0; k < S; ++k) saved[k] = first[0].saved[k];
          unit_state<C, T, A>(first[0].state, starts, prev, h);
        } else if (P > 1 && base == kThreads) {
#pragma unroll
          for (int k = 0; k < S; ++k) saved[k] = first[P - 1].saved[k];
          unit_state<C, T, A>(first[P - 1].state, starts, prev, h);
        } else {
#pragma unroll
          for (int k = 0; k < S; ++k) saved[k] = ws[(row * S + k) * H + u];
          backward_unit_state<C, T, A>(ptrs, tile0 + b, row, prev_row0 + b, starts, H, u, prev, h);
        }
        const A dc_in = incoming_dc<C>(ptrs, tile0 + b, b < rows_next, dc_next + b * U + ul, H, u);
        A dg[G], dc_total, dc_prev, dh_direct;
        backward_unit<C, T, A>(dh, dc_in, saved, 1, prev, h, H, u, dgates_x + row * GH, dgates_h + row * GH, dg,
                               dc_total, dc_prev, dh_direct);
        // The product's operand, as stored (the per-step path reads the dgates rows back).
#pragma unroll
        for (int g = 0; g < G; ++g) {
          if constexpr (Mma) {
            store(dgate16 + b * LDN + g * U + ul, dg[g]);
          } else {
            dgate[(g * U + ul) * BtP + b] = through<T>(dg[g]);
          }
        }
        if constexpr (C == Cell::LSTM) {
          gbuf[b * U + ul] = dc_total;  // g is no longer needed: reuse for the dc partial
          dc_out = dc_total;
          if (starts) {
            if (grad_c0) store(grad_c0 + static_cast<int64_t>(tile0 + b) * H + u, dc_prev);
          } else {
            dc_next[b * U + ul] = dc_prev;
          }
        } else if constexpr (C == Cell::GRU) {
          direct[b * U + ul] = dh_direct;
        }
      }
      if constexpr (C == Cell::LSTM) {
        if (c_squares_by_lanes && defer_squares) {
          late_c2 = valid ? cuda::square(dc_out) : 0.0;
        } else if (c_squares_by_lanes) {
          const double sum = row_squares(dc_out, valid);
          if (valid && segment_starts(ul)) square_for_later(1, b, segment_of(ul), sum);
        }
      }
    }
    __syncthreads();
    clock.mark(2);  // B: the cells
    if (s + 1 < a.steps) {
      next_step = tile_step(upcoming, tile0, Bt);
      // The next step's first pairs (a thread last read this step's in phase B). With the cluster's
      // barrier to end the exchange, now, to land during phase C; Async: after phase C; Grid: after
      // the grid's barrier (below).
      if constexpr (X == Exchange::ClusterBarrier) load_first(next_step);
    }
    if constexpr (C == Cell::LSTM) {
      // blocks without units add nothing
      if (norms_c && nu > 0 && !lane_rows) squares_for_later(1);
    }

    // C: this block's gate columns times its W_hh rows: a partial dh_prev for every unit k, sent to
    // the unit's owner, four units (16 bytes for float) per store: a remote store costs about the
    // same per instruction whatever its width (scripts/persistent_probe.cu). Units k..k + 3 (k a
    // multiple of 4, and so is U: one owner; past H, slots nobody reads) of row b.
    const auto send_partials = [&](int b, int k, const A (&v)[4]) {
      const int owner = by_units.div(k);
      A* slot = inbox_of(owner) + (rank * Bt + b) * U + (k - owner * U);
      if constexpr (Grid) {
        store4(slot, v);
      } else if constexpr (Async) {
        if (owner == rank) {
          store4(slot, v);
        } else {
          send4_async(slot, v, owner, &full_in[pin]);
        }
      } else {
        store4(cluster.map_shared_rank(slot, owner), v);
      }
    };
    if constexpr (Mma) {
      // 16 x 8 tiles: 16 rows b from m0, 8 output units k, a warp's share of a row tile together
      // (mma_warp_tiles; K: the block's G * U gate columns).
      const int gid = (threadIdx.x % 32) / 4, tig = threadIdx.x % 4;
      const int m_tiles = (rows + 15) / 16;
      const int passes = nu > 0 ? tiling.passes(m_tiles) : 0;
      for (int item = 0; item < passes; ++item) {
        const WarpTiles t = tiling.tiles(item, m_tiles);
        if (t.count == 0) continue;  // (warp-uniform)
        float d[kMmaGroup][4];
        mma_warp_tiles<T>(d, dgate16 + t.m0 * LDN, LDN, wt, LDN, t, G * U, gid, tig, 0, kWarps, 8 * LDN);  // columns past G * U: zeros
        clock.mark(3);  // C: thread 0's fragment loads and MMAs
#pragma unroll
        for (int i = 0; i < kMmaGroup; ++i) {
          if (i < t.count) {
            // A lane holds columns 2 tig, 2 tig + 1 of rows gid and gid + 8; lanes tig and tig ^ 1
            // trade halves so that the even one holds columns 4 (tig / 2) .. + 3 of row gid, the odd
            // one those of row gid + 8. (Warp-uniform: every lane shuffles.)
            const bool odd = tig & 1;
            const float got0 = __shfl_xor_sync(0xffffffffu, odd ? d[i][0] : d[i][2], 1);
            const float got1 = __shfl_xor_sync(0xffffffffu, odd ? d[i][1] : d[i][3], 1);
            const float v[4] = {odd ? got0 : d[i][0], odd ? got1 : d[i][1], odd ? d[i][2] : got0, odd ? d[i][3] : got1};
            const int b = t.m0 + gid + (odd ? 8 : 0), k = (t.first + kWarps * i) * 8 + 4 * (tig / 2);
            if (b < rows && k < H) send_partials(b, k, v);
          }
        }
        clock.mark(4);  // C: its partials sent
      }
    } else if (nu > 0) {
      // Register tiles of 4 rows x 4 consecutive units k (units-fastest: a warp reads contiguous
      // W_hh chunks), each over 2^dh_bits adjacent lanes (dh_part_bits); the 4 partials of a row go
      // to their owner (U is a multiple of 4) in one 16-byte store. (A uniform trip count: the lanes
      // of a tile shuffle; tiles past the step's rows idle.)
      const int kt = (H + 3) / 4, parts = 1 << dh_bits, tiles = dh_tiles(Bt, H);
      const int part = static_cast<int>(threadIdx.x) & (parts - 1);
      for (int base = 0; base < tiles; base += kThreads >> dh_bits) {
        const int tile = base + (static_cast<int>(threadIdx.x) >> dh_bits);
        const int r_tile = by_k_quads.div(tile), r0 = r_tile * 4, k0 = (tile - r_tile * kt) * 4;
        const bool valid = tile < tiles && r0 < rows;
        A acc[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = A(0);
        }
        // Gate column n's contribution: its 4 rows of dgate (rows past `rows`: stale values, results
        // not stored) times its W_hh row's 4 units (columns past H: zeros).
        const auto load_column = [&](A (&dv)[4], A (&wv)[4], int n) {
          load4(dv, dgate + n * BtP + r0);
          load4(wv, w + n * LD + k0);
        };
        const auto fma_column = [&](const A (&dv)[4], const A (&wv)[4]) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] += dv[i] * wv[j];
          }
        };
#pragma unroll
        for (int g = 0; g < (valid ? G : 0); ++g) {
          if constexpr (sizeof(A) == 4) {
            // Four columns' loads in flight before their FMAs (the plain loop waited for its two
            // loads every 16 FMAs; float only: a double column is twice the registers).
            for (int ul = 4 * part; ul < nu; ul += 4 * parts) {
              A dv[4][4], wv[4][4];
#pragma unroll
              for (int q = 0; q < 4; ++q) {
                if (ul + q < nu) load_column(dv[q], wv[q], g * U + ul + q);
              }
#pragma unroll
              for (int q = 0; q < 4; ++q) {
                if (ul + q < nu) fma_column(dv[q], wv[q]);
              }
            }
          } else {
            for (int ul = part; ul < nu; ul += parts) {
              A dv[4], wv[4];
              load_column(dv, wv, g * U + ul);
              fma_column(dv, wv);
            }
          }
        }
        clock.mark(3);  // C: thread 0's loads and FMAs (its lanes' gate columns)
        if (parts > 1) group_sum_each(acc, parts);
        if (valid && part == 0) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            if (r0 + i < rows) send_partials(r0 + i, k0, acc[i]);
          }
        }
        clock.mark(4);  // C: its sum over the lanes (shuffle tree) and partials sent
      }
    }
    if (defer_squares) {  // (block-uniform: every lane shuffles; the two sums' trees interleaved)
      for (int offset = row_lanes() / 2; offset > 0; offset /= 2) {
        const double got_g = __shfl_xor_sync(0xffffffffu, late_g2, offset);
        const double got_c = __shfl_xor_sync(0xffffffffu, late_c2, offset);
        late_g2 += got_g;
        late_c2 += got_c;
      }
      const int b = by_nu.div(threadIdx.x), ul = static_cast<int>(threadIdx.x) - b * nu;
      if (static_cast<int>(threadIdx.x) < pairs && segment_starts(ul)) {
        if (norms_g_late) square_for_later(0, b, segment_of(ul), late_g2);
        if (norms_c) square_for_later(1, b, segment_of(ul), late_c2);
      }
    }
    clock.mark(5);  // C: the recorded norms' row sums (defer_squares)
    // Async: a later step's rows into L2 and the next step's first pairs, to land during the
    // exchange's wait and phase D. (Issued after phase B, C's first instructions waited on their
    // scoreboard in nearly every backward kernel (the SASS: scripts/sass_waits.py), so C began with
    // their round trip; from here the first wait on it is at the next step's top. With a barrier,
    // whose fence may wait for the loads in flight, they stay before C.)
    if constexpr (Async) {
      prefetch_ahead(s);
      if (s + 1 < a.steps) load_first(next_step);
      __syncthreads();  // the own partials
      if (inbox_row_bytes > 0 && rows > 0) {
        mbarrier_wait(&full_in[pin], (parity >> (2 + pin)) & 1u);
        parity ^= 1u << (2 + pin);
      }
    } else {
      exchange_barrier<X>(cluster);
      // Grid: the next step's first pairs land during phase D's loads of the inbox from L2 (issued
      // before phase C, as with the cluster's barrier, C's product began with a wait for them in the
      // SASS, and the barrier's fence would wait for them anyway).
      if constexpr (Grid) {
        if (s + 1 < a.steps) load_first(next_step);
      }
    }
    clock.mark(6);  // the exchange's barrier or wait

    // D: own units' dh_prev, summed over the blocks in rank order (+ GRU's direct term).
    const auto finish_unit = [&](int b, int ul, A sum) {
      if (b < rows_prev) {
        dh_next[b * U + ul] = sum;
      } else {
        store(grad_h0 + static_cast<int64_t>(tile0 + b) * H + u0 + ul, sum);
      }
    };
    if constexpr (Grid) {
      // The inbox is in L2: each thread sums 4 consecutive units of a row over a range of senders,
      // with up to kLoads 16-byte loads in flight (64 registers), and `parts` adjacent lanes split
      // the senders (a fixed shuffle tree combines their ranges, so the sum is the same in every run):
      // at B = 16, H = 768 over 48 blocks, 12 senders a thread, one L2 round trip.
      const A* own = inbox_of(rank);
      const int quads = (nu + 3) / 4, items = rows * quads;
      int parts = 1;
      while (parts < 8 && items * parts * 2 <= kThreads) parts *= 2;
      const int per_part = (used + parts - 1) / parts;
      for (int base = 0; base < items * parts; base += kThreads) {  // uniform trip count: shuffles stay safe
        const int i = base + static_cast<int>(threadIdx.x), part = i % parts;
        const bool valid = i < items * parts;
        const int b = valid ? i / parts / quads : 0, q = valid ? i / parts % quads : 0;
        A acc[4] = {A(0), A(0), A(0), A(0)};
        const int r_end = valid ? min(used, (part + 1) * per_part) : 0;
        constexpr int kLoads = 64 / static_cast<int>(sizeof(A));
        for (int r0 = part * per_part; r0 < r_end; r0 += kLoads) {
          A v[kLoads][4];
#pragma unroll
          for (int j = 0; j < kLoads; ++j) {
            if (r0 + j < r_end) {
              load4_cg(v[j], own + ((r0 + j) * Bt + b) * U + 4 * q);
            } else {
              v[j][0] = v[j][1] = v[j][2] = v[j][3] = A(0);
            }
          }
#pragma unroll
          for (int j = 0; j < kLoads; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[e] += v[j][e];
          }
        }
        group_sum_each(acc, parts);
        if (valid && part == 0) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int ul = 4 * q + e;
            if (ul < nu) finish_unit(b, ul, acc[e] + (C == Cell::GRU ? direct[b * U + ul] : A(0)));
          }
        }
      }
    } else {
      for (int pair = threadIdx.x; pair < pairs; pair += kThreads) {
        const int b = by_nu.div(pair), ul = pair - b * nu;
        A sum = C == Cell::GRU ? direct[b * U + ul] : A(0);
        for (int r = 0; r < used; ++r) sum += inbox_s[(r * Bt + b) * U + ul];
        finish_unit(b, ul, sum);
      }
    }
    if constexpr (!Async) prefetch_ahead(s);  // (at the step's top, ptxas spilled the float32 LSTM's)
    __syncthreads();
    clock.mark(7);  // D: the sums of the partials
  }
  clock.finish(a.steps);
  if (norms_g_late || norms_c) {
    // Every block's partials are stored (the barrier's release and acquire; read from L2). Each row's
    // norms from the blocks with units, summed in slot and rank order (sum_recorded_norms); the
    // tile's (step, row) pairs spread over its blocks. The barrier also keeps an async cluster's
    // shared memory alive (below).
    exchange_barrier<X>(cluster);
    float* const g = norms_g_late ? a.norm_g : nullptr;
    float* const c = norms_c ? a.norm_c : nullptr;
    sum_recorded_norms(a.sizes, a.offsets, a.steps, norm_parts, shape.norm_slots, seg_rows ? shape.norm_slots : 1,
                       used, g, c, rank, blocks, tile0, Bt);
  } else if constexpr (Async) {
    cluster.sync();  // as in the forward, no block leaves while another can still address its shared memory
  }
#endif
}

template <Cell C, typename T, Exchange X, bool Mma>
const void* kernel_of(bool forward) {
  return forward ? reinterpret_cast<const void*>(cluster_forward_kernel<C, T, X, Mma>)
                 : reinterpret_cast<const void*>(cluster_backward_kernel<C, T, X, Mma>);
}

template <Cell C, typename T, bool Mma>
const void* kernel_of(bool forward, Exchange exchange) {
  switch (exchange) {
    case Exchange::ClusterAsync: return kernel_of<C, T, Exchange::ClusterAsync, Mma>(forward);
    case Exchange::Grid: return kernel_of<C, T, Exchange::Grid, Mma>(forward);
    default: return kernel_of<C, T, Exchange::ClusterBarrier, Mma>(forward);
  }
}

}  // namespace

namespace detail {

// 16-bit always on tensor cores, float32 there with `tf32`, float64 never.
template <Cell C>
const void* cluster_kernel(bool forward, DType dtype, Exchange exchange, bool tf32) {
  switch (dtype) {
    case DType::F32:
      return tf32 ? kernel_of<C, float, true>(forward, exchange) : kernel_of<C, float, false>(forward, exchange);
    case DType::F64: return kernel_of<C, double, false>(forward, exchange);
    case DType::F16: return kernel_of<C, __half, true>(forward, exchange);
    default: return kernel_of<C, __nv_bfloat16, true>(forward, exchange);
  }
}

#ifdef RNNKERN_STEP_TRACE
template <Cell C>
cudaError_t set_cluster_step_trace(unsigned long long* buffer) {
  return cudaMemcpyToSymbol(g_step_trace, &buffer, sizeof(buffer));
}
#endif

}  // namespace detail
}  // namespace persistent
}  // namespace rnnkern

// The kernels of cell `CELL` (a Cell enumerator), instantiated in the translation unit that says this
// (persistent_cluster_<cell>.cu), with the trace build's setter of that unit's g_step_trace.
#ifdef RNNKERN_STEP_TRACE
#define RNNKERN_CLUSTER_STEP_TRACE_OF(CELL) \
  template cudaError_t rnnkern::persistent::detail::set_cluster_step_trace<rnnkern::Cell::CELL>(unsigned long long*);
#else
#define RNNKERN_CLUSTER_STEP_TRACE_OF(CELL)
#endif
#define RNNKERN_CLUSTER_KERNELS_OF(CELL) \
  template const void* rnnkern::persistent::detail::cluster_kernel<rnnkern::Cell::CELL>( \
      bool, rnnkern::DType, rnnkern::persistent::Exchange, bool); \
  RNNKERN_CLUSTER_STEP_TRACE_OF(CELL)
