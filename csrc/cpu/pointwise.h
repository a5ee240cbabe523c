// The CPU step kernels, compiled once per instruction set (pointwise_impl.h); step_kernels_cpu()
// picks the one matching ATen's own CPU capability (so ATEN_CPU_CAPABILITY applies here too).
#pragma once

#include "rnnkern/layer_driver.h"

namespace rnnkern {
namespace cpu_default {
const StepKernels* cpu_step_kernels();
}
namespace cpu_avx2 {
const StepKernels* cpu_step_kernels();  // null when not compiled for this platform
}
namespace cpu_avx512 {
const StepKernels* cpu_step_kernels();  // null when not compiled for this platform
}

const StepKernels& step_kernels_cpu();

// How the CPU per-step products run: "blas" (torch's sgemm_/dgemm_, found) or "aten" (at::mm_out).
const char* cpu_gemm_path();

// A CPU product through torch's BLAS called directly for float32/float64, ATen's mm for float16 and
// bfloat16 (layer_cpu.cpp), shared by every ISA. (The step kernels' 16-bit products do not come here:
// cpu_gemm_16bit_into_float or float32 weights, pointwise_impl.h.)
void cpu_gemm(DType dtype, bool b_nk, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
              const void* b, int64_t ldb, void* c, int64_t ldc);

// B of a CPU product packed by MKL (cblas_sgemm_pack) for products of up to m rows: float32 where
// torch's BLAS exports the packing (its MKL), for a B large enough to gain (layer_cpu.cpp;
// RNNKERN_CPU_PACKED_WEIGHTS=0: never, =1: always) whose sizes fit 32-bit integers; else an undefined
// tensor. (StepKernels::pack_weight.)
at::Tensor cpu_pack_weight(DType dtype, bool b_nk, int64_t m, int64_t n, int64_t k, const void* b,
                           int64_t ldb);
// C = A · B with B from cpu_pack_weight (cblas_sgemm_compute).
void cpu_gemm_packed(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const at::Tensor& packed,
                     float* c, int64_t ldc);
// Whether torch's BLAS exports MKL's packed GEMM (build_info).
bool cpu_has_packed_gemm();

// Whether 16-bit `dtype` products run as such (MKL's bfloat16 GEMM on a CPU with bfloat16 dot
// products), else on float32 copies of the weights (StepKernels::gemm_float_b).
bool cpu_native_16bit_gemm(DType dtype);
// C (float32) = A·op(B) with A and B of the 16-bit `dtype`, float32 accumulation; false where
// cpu_native_16bit_gemm(dtype) is not (nothing computed).
bool cpu_gemm_16bit_into_float(DType dtype, bool b_nk, int64_t m, int64_t n, int64_t k, const void* a,
                               int64_t lda, const void* b, int64_t ldb, float* c, int64_t ldc);
}  // namespace rnnkern
