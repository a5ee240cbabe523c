// Device helpers shared by the step kernels: storage <-> accumulation conversions, row lookup,
// and a deterministic block reduction. No ATen (compile time).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "rnnkern/cell_math.h"
#include "rnnkern/step_args.h"

namespace rnnkern {
namespace cuda {

// Accumulation type of a storage type (docs/internals.md): double stays double, the rest float.
template <typename S>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename A>
__device__ __forceinline__ A to_acc(float v) { return static_cast<A>(v); }
template <typename A>
__device__ __forceinline__ A to_acc(double v) { return static_cast<A>(v); }
template <typename A>
__device__ __forceinline__ A to_acc(__half v) { return static_cast<A>(__half2float(v)); }
template <typename A>
__device__ __forceinline__ A to_acc(__nv_bfloat16 v) { return static_cast<A>(__bfloat162float(v)); }

template <typename S>
__device__ __forceinline__ S from_acc(float v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename S>
__device__ __forceinline__ S from_acc(double v) { return static_cast<S>(v); }

// v² in double: norms sum their squares in double, since float squares underflow below ~1e-19 and
// vanishing gradients — what the norms are for — would read 0.
template <typename A>
__device__ __forceinline__ double square(A v) {
  return static_cast<double>(v) * static_cast<double>(v);
}

// Loads element i of a storage-typed array as the accumulation type.
template <typename A, typename S>
__device__ __forceinline__ A ld(const S* p, int64_t i) { return to_acc<A>(p[i]); }

template <typename S>
__device__ __forceinline__ const S* prev_row(const PrevState& p, int64_t b) {
  return b < p.n_from_step ? static_cast<const S*>(p.from_step) + b * p.ld_step
                           : static_cast<const S*>(p.from_init) + b * p.ld_init;
}

// Sum over the block, identical in every thread. Fixed order (warp shuffles, then warp 0 over the
// per-warp partials): deterministic for a given block size. blockDim.x must be a multiple of 32,
// `scratch` at least 32 elements of shared memory.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x >> 5;
    v = lane < warps ? scratch[lane] : T(0);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  const T total = scratch[0];
  __syncthreads();  // scratch may be reused right after
  return total;
}

// Division by a divisor fixed for a whole launch (units per block, tiles per row, ...) as a
// multiply-high, an add and a shift: a division by a value known only at run time is ~20 dependent
// instructions, and the persistent kernels had several on every step's critical path (their SASS).
// Granlund & Montgomery, "Division by invariant integers using multiplication" (1994), fig. 4.1,
// for 1 <= d < 2^31 and 0 <= n < 2^31 (so that umulhi(n, m) + n < 2^32): s = ceil(log2 d),
// m = floor(2^32 (2^s - d) / d) + 1, n / d = (umulhi(n, m) + n) >> s.
struct FastDiv {
  uint32_t d = 1, m = 1, s = 0;
  FastDiv() = default;
  __host__ __device__ explicit FastDiv(int divisor) : d(static_cast<uint32_t>(divisor)) {
    while ((uint64_t(1) << s) < d) ++s;
    m = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << s) - d)) / d + 1);
  }
  __host__ __device__ __forceinline__ int div(int n) const {
#ifdef __CUDA_ARCH__
    const uint32_t hi = __umulhi(static_cast<uint32_t>(n), m);
#else
    const uint32_t hi = static_cast<uint32_t>((uint64_t(static_cast<uint32_t>(n)) * m) >> 32);
#endif
    return static_cast<int>((hi + static_cast<uint32_t>(n)) >> s);
  }
  __host__ __device__ __forceinline__ int mod(int n) const { return n - div(n) * static_cast<int>(d); }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads per row-block: a multiple of 32 covering `units` where possible, at most 256.
inline int row_block_threads(int64_t units) {
  const int64_t t = ceil_div(units, 32) * 32;
  return static_cast<int>(t < 32 ? 32 : (t > 256 ? 256 : t));
}

}  // namespace cuda
}  // namespace rnnkern
