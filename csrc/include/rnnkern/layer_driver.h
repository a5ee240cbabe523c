// The device-agnostic layer driver: the time loop of rnnkern::rnn_layer_forward / _backward
// (docs/internals.md), written once. The GEMMs are ATen ops (oneDNN/BLAS on CPU, cuBLAS on CUDA)
// into preallocated buffers; the per-step pointwise work is delegated to the device's StepKernels.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "rnnkern/step_args.h"

namespace rnnkern {

// The fused per-step kernels of one device. Each call handles the rows of one timestep and is
// issued in order with the driver's ATen ops (CUDA: on the current stream).
class StepKernels {
 public:
  virtual ~StepKernels() = default;
  virtual void forward_step(const ForwardStepArgs& args) const = 0;
  virtual void backward_step(const BackwardStepArgs& args) const = 0;
  virtual void proj_grad_step(const ProjGradStepArgs& args) const = 0;
};

DType dtype_of(const at::Tensor& t);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_forward(
    const StepKernels& kernels, int64_t cell, const at::Tensor& xp, const at::Tensor& batch_sizes,
    const at::Tensor& h0, const std::optional<at::Tensor>& c0, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr, bool reverse);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_backward(const StepKernels& kernels, int64_t cell, const at::Tensor& grad_out,
               const at::Tensor& grad_h_n, const std::optional<at::Tensor>& grad_c_n,
               const at::Tensor& batch_sizes, const at::Tensor& h0,
               const std::optional<at::Tensor>& c0, const at::Tensor& w_hh,
               const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
               bool reverse, double clip, bool record_norms, const at::Tensor& out,
               const at::Tensor& workspace);

}  // namespace rnnkern
