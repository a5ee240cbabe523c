// Device helpers shared by the persistent kernels: the grid-wide ones (persistent.cu) and the
// thread-block-cluster ones (persistent_cluster.cu). No ATen (compile time).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "device_utils.cuh"
#include "persistent.h"

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

template <typename A>
__device__ __forceinline__ A group_sum(A v, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}


// v through the storage dtype T and back: the state another step will read as T (GRU's h) is kept
// rounded as if it had been stored.
template <typename T, typename A>
__device__ __forceinline__ A through(A v) {
  T tmp;
  store(&tmp, v);
  return A(load(&tmp));
}

// Time geometry shared by both kernels (docs/internals.md).
struct Geometry {
  const int64_t* sizes;
  const int64_t* offsets;
  int64_t steps;
  bool reverse;
  __device__ int64_t t_of(int64_t k) const { return reverse ? steps - 1 - k : k; }
  // Step processed before t in the forward recurrence (-1: none) and rows continuing from it.
  __device__ int64_t prev(int64_t t) const { return reverse ? (t + 1 < steps ? t + 1 : -1) : t - 1; }
  __device__ int64_t n_prev(int64_t t) const {
    const int64_t p = prev(t);
    return p < 0 ? 0 : min(sizes[t], sizes[p]);
  }
  // Step processed after t in the forward recurrence (-1: none) and rows continuing into it.
  __device__ int64_t next(int64_t t) const { return reverse ? t - 1 : (t + 1 < steps ? t + 1 : -1); }
  __device__ int64_t n_next(int64_t t) const {
    const int64_t n = next(t);
    return n < 0 ? 0 : min(sizes[t], sizes[n]);
  }
};


// Accumulation-type bytes of a storage dtype.
inline size_t acc_size(DType dtype) { return dtype == DType::F64 ? sizeof(double) : sizeof(float); }

// The device's properties, read once per device (cudaGetDeviceProperties takes milliseconds); null
// when they cannot be read. Defined in persistent.cu.
const cudaDeviceProp* device_properties(int device);

// The cluster kernels' launches (persistent_cluster.cu); forward()/backward() dispatch to them.
cudaError_t cluster_forward(const Plan& plan, const ForwardArgs& args, cudaStream_t stream);
cudaError_t cluster_backward(const Plan& plan, const BackwardArgs& args, cudaStream_t stream);

}  // namespace detail
}  // namespace persistent
}  // namespace rnnkern
