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

}  // namespace cuda
}  // namespace rnnkern
