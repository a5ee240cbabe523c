// CUDA implementations of rnnkern::rnn_layer_forward / rnn_layer_backward: the shared layer driver
// (cuBLAS GEMMs through ATen, on the current stream) with the fused CUDA step kernels.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "kernels.h"
#include "rnnkern/layer_driver.h"

namespace rnnkern {
namespace {

// Launches on the current stream of the current device (set by the guard in the op) and checks it.
class CudaStepKernels final : public StepKernels {
 public:
  void forward_step(const ForwardStepArgs& a) const override {
    C10_CUDA_CHECK(cuda::launch_forward_step(a, c10::cuda::getCurrentCUDAStream()));
  }
  void backward_step(const BackwardStepArgs& a) const override {
    C10_CUDA_CHECK(cuda::launch_backward_step(a, c10::cuda::getCurrentCUDAStream()));
  }
  void proj_grad_step(const ProjGradStepArgs& a) const override {
    C10_CUDA_CHECK(cuda::launch_proj_grad_step(a, c10::cuda::getCurrentCUDAStream()));
  }
};

const StepKernels& step_kernels_cuda() {
  static const CudaStepKernels kernels;
  return kernels;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "rnnkern cuda backend: ", name, " must be a CUDA tensor, got ",
              t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    int64_t cell, const at::Tensor& xp, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr, bool reverse,
    double /*clip*/, const std::optional<at::Tensor>& /*norm_probe*/) {
  check_cuda(xp, "xp");
  const c10::cuda::CUDAGuard guard(xp.device());
  return layer_forward(step_kernels_cuda(), cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr,
                       reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
backward_cuda(int64_t cell, const at::Tensor& grad_out, const at::Tensor& grad_h_n,
              const std::optional<at::Tensor>& grad_c_n, const at::Tensor& batch_sizes,
              const at::Tensor& h0, const std::optional<at::Tensor>& c0, const at::Tensor& w_hh,
              const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
              bool reverse, double clip, bool record_norms, const at::Tensor& out,
              const at::Tensor& workspace) {
  check_cuda(out, "out");
  const c10::cuda::CUDAGuard guard(out.device());
  return layer_backward(step_kernels_cuda(), cell, grad_out, grad_h_n, grad_c_n, batch_sizes, h0,
                        c0, w_hh, b_hh, w_hr, reverse, clip, record_norms, out, workspace);
}

}  // namespace
}  // namespace rnnkern

TORCH_LIBRARY_IMPL(rnnkern, CUDA, m) {
  m.impl("rnn_layer_forward", &rnnkern::forward_cuda);
  m.impl("rnn_layer_backward", &rnnkern::backward_cuda);
}
