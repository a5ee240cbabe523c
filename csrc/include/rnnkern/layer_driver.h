// The device-agnostic layer driver: the time loop of rnnkern::rnn_layer_forward / _backward
// (docs/internals.md), written once. The GEMMs are ATen ops (oneDNN/BLAS on CPU, cuBLAS on CUDA)
// into preallocated buffers; the per-step pointwise work is delegated to the device's StepKernels.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "rnnkern/step_args.h"

namespace rnnkern {

// A whole recurrence in one go (the persistent CUDA kernels): what the per-step loop computes, with
// the same outputs. Layers without a projection only. The driver offers each layer to it first; a
// `false` return (the device declines this shape) means the per-step loop runs instead.
struct SequenceForward {
  Cell cell;
  const at::Tensor& batch_sizes;  // CPU int64 [T]
  bool reverse;
  const at::Tensor& xp;      // [N, G*H]
  const at::Tensor& w_hh;    // [G*H, H]
  const at::Tensor& b_hh;    // [G*H] or undefined
  const at::Tensor& h0;      // [B, H]
  const at::Tensor& c0;      // LSTM [B, H] or undefined (zeros)
  at::Tensor& out;           // [N, H]
  at::Tensor& workspace;     // [N, S*H] acc dtype
  at::Tensor& h_n;           // [B, H]
  at::Tensor& c_n;           // LSTM [B, H]
};

struct SequenceBackward {
  Cell cell;
  const at::Tensor& batch_sizes;
  bool reverse;
  double clip;
  const at::Tensor& grad_out;   // [N, H]
  const at::Tensor& grad_h_n;   // [B, H]
  const at::Tensor& grad_c_n;   // LSTM [B, H] (zeros when absent)
  const at::Tensor& w_hh;
  const at::Tensor& h0;
  const at::Tensor& c0;         // LSTM [B, H] or undefined (zeros)
  const at::Tensor& out;
  const at::Tensor& workspace;
  at::Tensor& grad_xp;          // [N, G*H]
  at::Tensor& dgates_h;         // GRU [N, 3H]; else the same tensor as grad_xp
  at::Tensor& grad_h0;          // [B, H]
  at::Tensor& grad_c0;          // LSTM [B, H] when c0 is defined, else [0]
  at::Tensor& norms;            // [2, N] float32 (zeros), filled when record_norms
  bool record_norms;
};

// The fused per-step kernels of one device. Each call handles the rows of one timestep and is
// issued in order with the driver's ATen ops (CUDA: on the current stream).
class StepKernels {
 public:
  virtual ~StepKernels() = default;
  virtual void forward_step(const ForwardStepArgs& args) const = 0;
  virtual void backward_step(const BackwardStepArgs& args) const = 0;
  virtual void proj_grad_step(const ProjGradStepArgs& args) const = 0;
  // C[m, n] = A[m, k] · Bᵀ with B [n, k] (b_nk) or A[m, k] · B with B [k, n]; row-major with leading
  // dimensions, all three in the layer's dtype. The per-step products come through here with raw
  // pointers: ATen's dispatch and views cost more host time per step than a small step's GPU work.
  virtual void gemm(DType dtype, bool b_nk, int64_t m, int64_t n, int64_t k, const void* a,
                    int64_t lda, const void* b, int64_t ldb, void* c, int64_t ldc) const = 0;
  // Whether the per-step products of `dtype` layers take their weight operand in float32
  // (gemm_float_b; the driver converts the weights once per call): the CPU's for float16 and bfloat16,
  // whose small 16-bit products cost several times a float32 one there (ATen's mm, oneDNN's per-call
  // set-up). Products of 16-bit values are exact in float32, so the results are those of a 16-bit GEMM
  // with float32 accumulation.
  virtual bool float_step_weights(DType /*dtype*/) const { return false; }
  // gemm with B in float32: C (dtype) = A (dtype) · B, accumulated and rounded once, as gemm.
  virtual void gemm_float_b(DType /*dtype*/, bool /*b_nk*/, int64_t /*m*/, int64_t /*n*/, int64_t /*k*/,
                            const void* /*a*/, int64_t /*lda*/, const float* /*b*/, int64_t /*ldb*/,
                            void* /*c*/, int64_t /*ldc*/) const {
    TORCH_CHECK(false, "rnnkern: this device has no per-step products with float32 weights");
  }
  // The weight operand B of a call's per-step products (as gemm's: [n, k] when b_nk, else [k, n]),
  // packed once into the BLAS's own layout for products of up to m rows, or an undefined tensor where
  // the device has no such packing for dtype. The CPU's: MKL's sgemm_pack, which spares the GEMM
  // re-packing B at every step (W_hh read once per call instead of once per step).
  virtual at::Tensor pack_weight(DType /*dtype*/, bool /*b_nk*/, int64_t /*m*/, int64_t /*n*/, int64_t /*k*/,
                                 const void* /*b*/, int64_t /*ldb*/) const {
    return at::Tensor();
  }
  // gemm with B from pack_weight (the same n and k, m no more than its).
  virtual void gemm_packed(DType /*dtype*/, int64_t /*m*/, int64_t /*n*/, int64_t /*k*/,
                           const void* /*a*/, int64_t /*lda*/, const at::Tensor& /*packed*/, void* /*c*/,
                           int64_t /*ldc*/) const {
    TORCH_CHECK(false, "rnnkern: this device has no packed per-step products");
  }
  virtual bool sequence_forward(const SequenceForward&) const { return false; }
  virtual bool sequence_backward(const SequenceBackward&) const { return false; }
};

DType dtype_of(const at::Tensor& t);

// StepKernels::gemm through ATen (at::mm_out on tensors over the caller's memory, on `device`): the
// fallback of the devices' direct BLAS calls where those are not found.
void aten_gemm(const at::Device& device, DType dtype, bool b_nk, int64_t m, int64_t n, int64_t k,
               const void* a, int64_t lda, const void* b, int64_t ldb, void* c, int64_t ldc);

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
