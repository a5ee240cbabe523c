// The per-step recurrent products of the CUDA layers (StepKernels::gemm): one cublasGemmEx call with
// raw pointers. A step of a small layer is a few microseconds of GPU work, and at::mm_out on views
// costs more than that in host time (dispatch, views, checks); the time loop is host-bound without
// this.
//
// cuBLAS is reached through the library torch has already loaded (dlopen RTLD_NOLOAD + dlsym of its
// stable C API): the CUDA toolkits this is built with (CI's included) need not ship cuBLAS headers or
// libraries, and ATen's own wrapper header pulls in cuSPARSE's. Where the symbols are not found, the
// products fall back to at::mm_out on tensors over the same memory.
#include <dlfcn.h>

#include <array>
#include <mutex>
#include <unordered_map>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <library_types.h>

#include "kernels.h"
#include "rnnkern/layer_driver.h"

namespace rnnkern {
namespace cuda {
namespace {

// The few cuBLAS declarations used (cublas_api.h, stable since CUDA 11).
using CublasHandle = void*;
using CublasStatus = int;
constexpr CublasStatus kCublasSuccess = 0;
constexpr int kOpN = 0, kOpT = 1;                                     // cublasOperation_t
constexpr int kCompute32F = 68, kCompute64F = 70, kCompute32FFastTF32 = 77;  // cublasComputeType_t
constexpr int kGemmDefault = -1;                                      // cublasGemmAlgo_t

struct Cublas {
  CublasStatus (*create)(CublasHandle*) = nullptr;
  CublasStatus (*set_stream)(CublasHandle, cudaStream_t) = nullptr;
  CublasStatus (*gemm_ex)(CublasHandle, int, int, int, int, int, const void*, const void*,
                          cudaDataType, int, const void*, cudaDataType, int, const void*, void*,
                          cudaDataType, int, int, int) = nullptr;
  bool ok() const { return create && set_stream && gemm_ex; }
};

const Cublas& cublas() {
  static const Cublas api = [] {
    Cublas c;
    void* lib = nullptr;
    for (const char* name : {"libcublas.so.13", "libcublas.so.12", "libcublas.so"}) {
      lib = dlopen(name, RTLD_NOW | RTLD_NOLOAD);
      if (lib != nullptr) break;
    }
    if (lib == nullptr) return c;
    c.create = reinterpret_cast<decltype(c.create)>(dlsym(lib, "cublasCreate_v2"));
    c.set_stream = reinterpret_cast<decltype(c.set_stream)>(dlsym(lib, "cublasSetStream_v2"));
    c.gemm_ex = reinterpret_cast<decltype(c.gemm_ex)>(dlsym(lib, "cublasGemmEx"));
    return c;
  }();
  return api;
}

// One handle per thread and device (a cuBLAS handle is bound to the device current at creation and
// is not safe to share between threads); created on first use, kept for the process.
CublasHandle handle_for(int device) {
  thread_local std::unordered_map<int, CublasHandle> handles;
  auto it = handles.find(device);
  if (it != handles.end()) return it->second;
  CublasHandle h = nullptr;
  TORCH_CHECK(cublas().create(&h) == kCublasSuccess, "rnnkern: cublasCreate failed");
  handles.emplace(device, h);
  return h;
}

cudaDataType data_type(DType dtype) {
  switch (dtype) {
    case DType::F64: return CUDA_R_64F;
    case DType::F16: return CUDA_R_16F;
    case DType::BF16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
  }
}

}  // namespace

const char* cuda_gemm_path() { return cublas().ok() ? "cublas" : "aten"; }

void step_gemm(DType dtype, bool b_nk, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
               const void* b, int64_t ldb, void* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (!cublas().ok()) {
    aten_gemm(at::Device(at::kCUDA, c10::cuda::current_device()), dtype, b_nk, m, n, k, a, lda, b,
              ldb, c, ldc);
    return;
  }
  CublasHandle h = handle_for(c10::cuda::current_device());
  TORCH_CHECK(cublas().set_stream(h, stream) == kCublasSuccess, "rnnkern: cublasSetStream failed");
  // Accumulate in float32 for the 16-bit types (as torch.nn does) and float64 for float64; float32
  // uses TF32 tensor cores only where torch allows them for matmuls.
  const bool f64 = dtype == DType::F64;
  const int compute = f64 ? kCompute64F
                          : (dtype == DType::F32 && at::globalContext().allowTF32CuBLAS()
                                 ? kCompute32FFastTF32 : kCompute32F);
  const double one64 = 1.0, zero64 = 0.0;
  const float one32 = 1.0f, zero32 = 0.0f;
  const void* alpha = f64 ? static_cast<const void*>(&one64) : &one32;
  const void* beta = f64 ? static_cast<const void*>(&zero64) : &zero32;
  const cudaDataType type = data_type(dtype);
  // Row-major C = A·op(B) is the column-major product Cᵀ = op(B)ᵀ·Aᵀ.
  const CublasStatus status = cublas().gemm_ex(
      h, b_nk ? kOpT : kOpN, kOpN, static_cast<int>(n), static_cast<int>(m), static_cast<int>(k),
      alpha, b, type, static_cast<int>(ldb), a, type, static_cast<int>(lda), beta, c, type,
      static_cast<int>(ldc), compute, kGemmDefault);
  TORCH_CHECK(status == kCublasSuccess, "rnnkern: cublasGemmEx failed with status ", status);
}

}  // namespace cuda
}  // namespace rnnkern
