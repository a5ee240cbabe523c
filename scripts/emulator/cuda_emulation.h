// CUDA device code on the CPU, for the kernels' correctness without a GPU (scripts/emulator/README.md).
// Force-included (g++ -include) before the kernels' sources, which are compiled as plain C++ with
// RNNKERN_EMULATE defined: each emulated GPU thread is a fiber, and every point where GPU threads
// wait for each other (__syncthreads, a cluster's or a grid's barrier, a warp's shuffle or mma.sync,
// an mbarrier's phase) is where the scheduler switches fibers, in an order drawn from a seed. Shared
// memory is one buffer per block (distributed shared memory maps between them); st.async stores are
// delivered late, in random order. What it checks: the results, against a float64 oracle; hangs
// (every thread waiting, reported with where each waits); accesses outside any buffer (guard pages);
// warps whose lanes disagree on a collective. What it cannot: timing, and the memory model's weaker
// orderings (a fiber's stores are visible to the next fiber at once).
#pragma once

#ifndef RNNKERN_EMULATE
#error "cuda_emulation.h is for the emulator build (scripts/emulator/build.sh)"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace rnnkern_emu {

// The calling fiber's lane in its warp.
int lane();

// Waits: the block's barrier, the cluster's (all threads of its blocks), the whole grid's.
void sync_block();
void sync_cluster();
void sync_grid();
unsigned cluster_blocks();
unsigned cluster_rank();
// `p` (in this block's shared memory) in block `rank` of the cluster.
void* map_shared_rank(const void* p, unsigned rank);
// This block's dynamic shared memory.
unsigned char* dynamic_shared();
// Offset of `p` in this block's shared memory (what __cvta_generic_to_shared returns).
uint32_t shared_offset(const void* p);

// A warp collective: every lane of the warp deposits `bytes` from `in`, waits for all 32, and may
// then read every lane's deposit through the returned table (valid until its next collective).
// `what` names the collective, to report lanes that disagree.
constexpr int kWarpSlot = 48;  // bytes a lane may deposit (mma.sync: A, B and C fragments)
const unsigned char* warp_exchange(const char* what, const void* in, int bytes);

// mbarrier (PTX ISA): init with an arrival count, arrive.expect_tx, try_wait.parity (acquire).
void mbarrier_init(uint64_t* bar, unsigned count);
void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes);
void mbarrier_wait_parity(uint64_t* bar, uint32_t parity);
// st.async: `bytes` from `src` to `dst` (this block's shared memory) in block `rank`, completing
// that many transaction bytes on that block's twin of `bar`; delivered later (in random order).
void st_async(void* dst, const void* src, int bytes, unsigned rank, uint64_t* bar);

// A store another thread may be waiting for in a loop (the tagged exchange's): counts as progress.
void note_progress();
// A thread that polls memory (`where`) and has not found what it waits for: back to the scheduler.
// Where no thread makes progress in a whole pass, the scheduler reports a hang.
void spin(const char* where);

[[noreturn]] void trap(const char* why);

template <typename V>
V shfl_xor(unsigned mask, V v, int lane_mask, int width) {
  static_assert(sizeof(V) <= kWarpSlot);
    if (mask != 0xffffffffu || width != 32) trap("__shfl_xor_sync: only full-warp masks are emulated");
  const unsigned char* all = warp_exchange("__shfl_xor_sync", &v, sizeof(V));
  V r;
  std::memcpy(&r, all + (lane() ^ lane_mask) * kWarpSlot, sizeof(V));
  return r;
}

template <typename V>
V shfl_down(unsigned mask, V v, unsigned delta, int width) {
  static_assert(sizeof(V) <= kWarpSlot);
  if (mask != 0xffffffffu || width != 32) trap("__shfl_down_sync: only full-warp masks are emulated");
  const unsigned char* all = warp_exchange("__shfl_down_sync", &v, sizeof(V));
  const int src = lane() + static_cast<int>(delta);
  V r;
  std::memcpy(&r, all + (src < 32 ? src : lane()) * kWarpSlot, sizeof(V));
  return r;
}

// cvt.rna.tf32.f32: float32 rounded to 10 mantissa bits, to nearest, ties away from zero.
inline uint32_t tf32_round(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  if ((bits & 0x7f800000u) == 0x7f800000u) return bits;  // inf, NaN as they are
  return (bits + 0x1000u) & 0xffffe000u;
}

// mma.sync.aligned.{m16n8k16 (f16, bf16), m16n8k8 (tf32)}.row.col.f32 with float32 accumulation:
// the warp's fragments put together by the PTX ISA's fragment layouts ("Matrix Fragments for mma"),
// D = A B + C computed in double and rounded once.
void mma_m16n8(int kind, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
constexpr int kMmaF16 = 0, kMmaBF16 = 1, kMmaTF32 = 2;

}  // namespace rnnkern_emu

// The CUDA names the kernels use, on the emulator.
#define __launch_bounds__(...)
// The running fiber's coordinates: set by the scheduler each time it switches to a fiber (one runs
// at a time).
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

inline void __syncthreads() { ::rnnkern_emu::sync_block(); }
// The warp's barrier: a collective with nothing to exchange (every lane waits for all 32).
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) ::rnnkern_emu::trap("__syncwarp: only full-warp masks are emulated");
  const char nothing = 0;
  ::rnnkern_emu::warp_exchange("__syncwarp", &nothing, 0);
}
[[noreturn]] inline void __trap() { ::rnnkern_emu::trap("__trap"); }
template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32) {
  return ::rnnkern_emu::shfl_xor(mask, v, lane_mask, width);
}
template <typename V>
inline V __shfl_down_sync(unsigned mask, V v, unsigned delta, int width = 32) {
  return ::rnnkern_emu::shfl_down(mask, v, delta, width);
}
template <typename V>
inline V __ldcg(const V* p) { return *p; }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline size_t __cvta_generic_to_shared(const void* p) { return ::rnnkern_emu::shared_offset(p); }
inline long long __double_as_longlong(double v) {
  long long r;
  std::memcpy(&r, &v, 8);
  return r;
}
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }
