// Where a cluster kernel's step spends its time: a diagnostic build only (scripts/step_trace.cu,
// the "probe" stage of scripts/gpu_check.sh). Built with RNNKERN_STEP_TRACE defined, thread 0 of each
// block reads the SM's cycle counter at the step's phase boundaries and sums each phase over the
// steps; the sums go to a buffer after the loop, so nothing is stored inside it. Without the macro
// (the extension) StepClock's members are empty and the kernels compile to the same SASS.
#pragma once

#include <stdint.h>

#include <cuda_runtime.h>

namespace rnnkern {
namespace persistent {
namespace detail {

// Phases a kernel's step is split into (the kernels' comments at each mark name them).
constexpr int kTracePhases = 8;
// Per block: the cycles of each phase summed over the steps, then the prologue's cycles (before the
// loop), the steps, the loop's cycles and the global timer's nanoseconds over the whole kernel (the
// SM clock's rate), the kernel's cycles, and the SM it ran on (whether two blocks shared one).
enum TraceSlot : int {
  kTracePrologue = kTracePhases, kTraceSteps, kTraceLoopCycles, kTraceNs, kTraceCycles, kTraceSm, kTraceSlots
};

#ifdef RNNKERN_STEP_TRACE
// [blocks][kTraceSlots] of the next launch (set_step_trace).
static __device__ unsigned long long* g_step_trace;

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ unsigned clock32() {
  unsigned t;
  asm volatile("mov.u32 %0, %%clock;" : "=r"(t));
  return t;
}

// The phases' sums and the last mark in 32 bits (differences wrap correctly; a launch's phase stays far
// below 2^32 cycles, ~2 s): half the registers of 64-bit ones, which every thread of the trace build
// holds (the float32 kernels at their 128-register cap spilled more with 64-bit sums of 8 phases).
struct StepClock {
  unsigned long long begin = 0, begin_ns = 0, loop = 0;
  unsigned last = 0;
  unsigned sum[kTracePhases] = {};
  __device__ __forceinline__ void start() {
    if (threadIdx.x == 0) {
      begin_ns = global_ns();
      begin = clock64();
    }
  }
  __device__ __forceinline__ void loop_start() {
    if (threadIdx.x == 0) {
      loop = clock64();
      last = clock32();
    }
  }
  // The end of `phase` (a constant, so that `sum` stays in registers) in this step.
  __device__ __forceinline__ void mark(int phase) {
    if (threadIdx.x == 0) {
      const unsigned now = clock32();
      sum[phase] += now - last;
      last = now;
    }
  }
  // mark(phase) after the block's threads meet, where the kernel has no barrier of its own (then the
  // wait for the slowest thread falls in `phase`, as where it has one); block-uniform control flow.
  __device__ __forceinline__ void sync_mark(int phase) {
    __syncthreads();
    mark(phase);
  }
  __device__ __forceinline__ void finish(int64_t steps) {
    if (threadIdx.x != 0 || g_step_trace == nullptr) return;
    const unsigned long long end = clock64(), end_ns = global_ns();
    unsigned long long* slot = g_step_trace + static_cast<size_t>(blockIdx.x) * kTraceSlots;
#pragma unroll
    for (int k = 0; k < kTracePhases; ++k) slot[k] = sum[k];
    slot[kTracePrologue] = loop - begin;
    slot[kTraceSteps] = static_cast<unsigned long long>(steps);
    slot[kTraceLoopCycles] = end - loop;
    slot[kTraceNs] = end_ns - begin_ns;
    slot[kTraceCycles] = end - begin;
    unsigned sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    slot[kTraceSm] = sm;
  }
};

// Where the next launches write their blocks' sums (null: nowhere).
cudaError_t set_step_trace(unsigned long long* buffer);
#else
struct StepClock {
  __device__ __forceinline__ void start() {}
  __device__ __forceinline__ void loop_start() {}
  __device__ __forceinline__ void mark(int) {}
  __device__ __forceinline__ void sync_mark(int) {}
  __device__ __forceinline__ void finish(int64_t) {}
};
#endif

}  // namespace detail
}  // namespace persistent
}  // namespace rnnkern
