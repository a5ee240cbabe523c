// Launchers of the CUDA per-step fused kernels (step_forward.cu, step_backward.cu). Plain header:
// no ATen, so that it is shared by the .cu files and the ATen glue (layer_cuda.cpp). Each launcher
// enqueues one kernel on `stream` and returns cudaGetLastError() for the caller to check.
#pragma once

#include <cuda_runtime_api.h>

#include "rnnkern/step_args.h"

namespace rnnkern {
namespace cuda {

cudaError_t launch_forward_step(const ForwardStepArgs& args, cudaStream_t stream);
cudaError_t launch_backward_step(const BackwardStepArgs& args, cudaStream_t stream);
cudaError_t launch_proj_grad_step(const ProjGradStepArgs& args, cudaStream_t stream);

// How the per-step products run: "cublas" (cublasGemmEx, found in the loaded library) or "aten".
const char* cuda_gemm_path();

// C[m, n] = A[m, k] · Bᵀ (b_nk: B is [n, k]) or A · B (B is [k, n]), row-major with leading
// dimensions, on the current stream of the current device (step_gemm.cpp).
void step_gemm(DType dtype, bool b_nk, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
               const void* b, int64_t ldb, void* c, int64_t ldc);

}  // namespace cuda
}  // namespace rnnkern
