// CPU implementations of rnnkern::rnn_layer_forward / rnn_layer_backward: the shared layer driver
// with the CPU step kernels of the instruction set ATen runs.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include "pointwise.h"
#include "rnnkern/layer_driver.h"

namespace rnnkern {

const StepKernels& step_kernels_cpu() {
  static const StepKernels* chosen = [] {
    const std::string isa = at::get_cpu_capability();
    const StepKernels* k = nullptr;
    if (isa == "AVX512") k = cpu_avx512::cpu_step_kernels();
    if (k == nullptr && (isa == "AVX512" || isa == "AVX2")) k = cpu_avx2::cpu_step_kernels();
    return k != nullptr ? k : cpu_default::cpu_step_kernels();
  }();
  return *chosen;
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    int64_t cell, const at::Tensor& xp, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr, bool reverse,
    double /*clip*/, const std::optional<at::Tensor>& /*norm_probe*/) {
  return layer_forward(step_kernels_cpu(), cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr,
                       reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
backward_cpu(int64_t cell, const at::Tensor& grad_out, const at::Tensor& grad_h_n,
             const std::optional<at::Tensor>& grad_c_n, const at::Tensor& batch_sizes,
             const at::Tensor& h0, const std::optional<at::Tensor>& c0, const at::Tensor& w_hh,
             const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
             bool reverse, double clip, bool record_norms, const at::Tensor& out,
             const at::Tensor& workspace) {
  return layer_backward(step_kernels_cpu(), cell, grad_out, grad_h_n, grad_c_n, batch_sizes, h0,
                        c0, w_hh, b_hh, w_hr, reverse, clip, record_norms, out, workspace);
}

}  // namespace
}  // namespace rnnkern

TORCH_LIBRARY_IMPL(rnnkern, CPU, m) {
  m.impl("rnn_layer_forward", &rnnkern::forward_cpu);
  m.impl("rnn_layer_backward", &rnnkern::backward_cpu);
}
