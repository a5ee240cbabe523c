// CPU implementations of rnnkern::rnn_layer_forward / rnn_layer_backward: the shared layer driver
// with the CPU step kernels of the instruction set ATen runs.
#include <dlfcn.h>

#include <cstdlib>
#if defined(__x86_64__)
#include <omp.h>
#include <pmmintrin.h>
#include <xmmintrin.h>
#endif

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

// The BLAS torch itself calls for float32/float64 matmuls on the CPU (its bundled MKL, or OpenBLAS),
// reached through its Fortran symbols in the loaded libtorch_cpu: ATen's own CPU BLAS wrappers are not
// exported, and at::mm_out on views costs more host time than a small step's product (dispatch,
// views, checks), which is what bounds small layers here.
template <typename T>
using FortranGemm = void (*)(const char*, const char*, const int*, const int*, const int*, const T*,
                             const T*, const int*, const T*, const int*, const T*, T*, const int*);

// MKL's cblas_gemm_bf16bf16f32: C (float32) = A·op(B) for bfloat16 A and B, float32 accumulation
// (row-major: layout 101, no transpose 111, transpose 112; LP64 sizes).
using GemmBf16 = void (*)(int, int, int, int, int, int, float, const void*, int, const void*, int, float, float*,
                          int);

// MKL's packed float32 GEMM (CBLAS, LP64): the size of a packed matrix, the packing, the product.
using SgemmPackGetSize = size_t (*)(int identifier, int m, int n, int k);
using SgemmPack = void (*)(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                           const float* src, int ld, float* dest);
using SgemmCompute = void (*)(int layout, int transa, int transb, int m, int n, int k, const float* a,
                              int lda, const float* b, int ldb, float beta, float* c, int ldc);
// (CBLAS's enumerators, as mkl_cblas.h numbers them)
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;

struct Blas {
  FortranGemm<float> sgemm = nullptr;
  FortranGemm<double> dgemm = nullptr;
  GemmBf16 gemm_bf16 = nullptr;  // torch's MKL has it; OpenBLAS builds do not
  SgemmPackGetSize sgemm_pack_get_size = nullptr;  // the same
  SgemmPack sgemm_pack = nullptr;
  SgemmCompute sgemm_compute = nullptr;
};

const Blas& blas() {
  static const Blas api = [] {
    Blas b;
    void* lib = dlopen("libtorch_cpu.so", RTLD_NOW | RTLD_NOLOAD);
    if (lib != nullptr) {
      b.sgemm = reinterpret_cast<FortranGemm<float>>(dlsym(lib, "sgemm_"));
      b.dgemm = reinterpret_cast<FortranGemm<double>>(dlsym(lib, "dgemm_"));
      b.gemm_bf16 = reinterpret_cast<GemmBf16>(dlsym(lib, "cblas_gemm_bf16bf16f32"));
      b.sgemm_pack_get_size = reinterpret_cast<SgemmPackGetSize>(dlsym(lib, "cblas_sgemm_pack_get_size"));
      b.sgemm_pack = reinterpret_cast<SgemmPack>(dlsym(lib, "cblas_sgemm_pack"));
      b.sgemm_compute = reinterpret_cast<SgemmCompute>(dlsym(lib, "cblas_sgemm_compute"));
    }
    return b;
  }();
  return api;
}

template <typename T>
bool fortran_gemm(FortranGemm<T> gemm, bool b_nk, int64_t m, int64_t n, int64_t k, const void* a,
                  int64_t lda, const void* b, int64_t ldb, void* c, int64_t ldc) {
  constexpr int64_t kMax = 0x7fffffff;  // LP64 BLAS: 32-bit sizes
  if (gemm == nullptr || m > kMax || n > kMax || k > kMax || lda > kMax || ldb > kMax || ldc > kMax) {
    return false;
  }
  // Row-major C = A·op(B) is the column-major product Cᵀ = op(B)ᵀ·Aᵀ.
  const char ta = b_nk ? 'T' : 'N', tb = 'N';
  const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const T one = 1, zero = 0;
  gemm(&ta, &tb, &mi, &ni, &ki, &one, static_cast<const T*>(b), &la, static_cast<const T*>(a), &lb,
       &zero, static_cast<T*>(c), &lc);
  return true;
}

}  // namespace

const char* cpu_gemm_path() { return blas().sgemm && blas().dgemm ? "blas" : "aten"; }

bool cpu_has_packed_gemm() {
  const Blas& b = blas();
  return b.sgemm_pack_get_size != nullptr && b.sgemm_pack != nullptr && b.sgemm_compute != nullptr;
}

// Packing B spares the GEMM re-packing it at every step (2 threads, one product alone: 64 x 256 x 1024
// from a contiguous Bᵀ 125 µs, packed 96; packing costs about one such product). In the layer, 8 steps
// of an LSTM at H = 256, B = 8: forward 1.45x, forward+backward 1.12x against the transposed copy. Not
// for a B of fewer than kPackFromElements elements (H = 128, 64K: in L2 either way, 0.92x / 0.95x) nor
// for products of one row (B = 1: BLAS's matrix-vector path, which packs nothing; H = 512: 0.83x /
// 0.76x). RNNKERN_CPU_PACKED_WEIGHTS: 0 never, 1 at every size (the tests), else by that rule.
constexpr int64_t kPackFromElements = int64_t{1} << 17;

at::Tensor cpu_pack_weight(DType dtype, bool b_nk, int64_t m, int64_t n, int64_t k, const void* b,
                           int64_t ldb) {
  constexpr int64_t kMax = 0x7fffffff;  // LP64: 32-bit sizes
  const char* setting = std::getenv("RNNKERN_CPU_PACKED_WEIGHTS");
  const bool never = setting != nullptr && *setting == '0', always = setting != nullptr && *setting == '1';
  if (dtype != DType::F32 || !cpu_has_packed_gemm() || never || m <= 0 || n <= 0 || k <= 0 || m > kMax ||
      n > kMax || k > kMax || ldb > kMax || (!always && (n * k < kPackFromElements || m < 2))) {
    return at::Tensor();
  }
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const size_t bytes = blas().sgemm_pack_get_size(kBMatrix, mi, ni, ki);
  // float elements, so that ATen's allocator aligns it as any float tensor (64 bytes)
  at::Tensor packed = at::empty({static_cast<int64_t>((bytes + sizeof(float) - 1) / sizeof(float))},
                                at::TensorOptions().dtype(at::kFloat));
  // B as gemm takes it: row-major [n, k] read transposed (b_nk), or [k, n]
  blas().sgemm_pack(kRowMajor, kBMatrix, b_nk ? kTrans : kNoTrans, mi, ni, ki, 1.0f,
                    static_cast<const float*>(b), static_cast<int>(ldb), packed.data_ptr<float>());
  return packed;
}

void cpu_gemm_packed(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const at::Tensor& packed,
                     float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  // (ldb is ignored for a packed B; m, n, k within 32 bits: cpu_pack_weight checked n, k and a larger m)
  blas().sgemm_compute(kRowMajor, kNoTrans, kPacked, static_cast<int>(m), static_cast<int>(n),
                       static_cast<int>(k), a, static_cast<int>(lda), packed.data_ptr<float>(),
                       static_cast<int>(k), 0.0f, c, static_cast<int>(ldc));
}

bool cpu_native_16bit_gemm(DType dtype) {
  // bfloat16 through MKL where the CPU has bfloat16 dot products (AVX512-BF16, AMX): measured 3x a
  // float32 GEMM of the same sizes (64 x 256 x 1024: 38 against 128 µs); without them MKL converts,
  // and the float32 copies of the weights (StepKernels::gemm_float_b) are no slower. (MKL's float16
  // GEMM measured as slow as float32 on this AVX512-FP16 machine: not used.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const bool bf16_dot = __builtin_cpu_supports("avx512bf16");
#else
  static const bool bf16_dot = false;
#endif
  // RNNKERN_CPU_NATIVE_16BIT=0: the float32 weights anyway (to compare, and so that the tests run that
  // path on such a CPU too)
  const char* forced = std::getenv("RNNKERN_CPU_NATIVE_16BIT");
  return dtype == DType::BF16 && bf16_dot && blas().gemm_bf16 != nullptr && !(forced && *forced == '0');
}

bool cpu_gemm_16bit_into_float(DType dtype, bool b_nk, int64_t m, int64_t n, int64_t k, const void* a,
                               int64_t lda, const void* b, int64_t ldb, float* c, int64_t ldc) {
  constexpr int64_t kMax = 0x7fffffff;
  if (!cpu_native_16bit_gemm(dtype) || m > kMax || n > kMax || k > kMax || lda > kMax || ldb > kMax ||
      ldc > kMax) {
    return false;
  }
  blas().gemm_bf16(101, 111, b_nk ? 112 : 111, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
                   1.0f, a, static_cast<int>(lda), b, static_cast<int>(ldb), 0.0f, c, static_cast<int>(ldc));
  return true;
}

void cpu_gemm(DType dtype, bool b_nk, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
              const void* b, int64_t ldb, void* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  // float16 / bfloat16: ATen's (oneDNN where the CPU has 16-bit dot products, float accumulation,
  // the result rounded to the layer's dtype, as the GPU's per-step products)
  const bool done = dtype == DType::F64   ? fortran_gemm(blas().dgemm, b_nk, m, n, k, a, lda, b, ldb, c, ldc)
                    : dtype == DType::F32 ? fortran_gemm(blas().sgemm, b_nk, m, n, k, a, lda, b, ldb, c, ldc)
                                          : false;
  if (!done) aten_gemm(at::kCPU, dtype, b_nk, m, n, k, a, lda, b, ldb, c, ldc);
}

namespace {

// torch.set_flush_denormal(True) sets flush-to-zero / denormals-are-zero on the calling thread only,
// but the time loop also runs on OpenMP workers (the pointwise passes, the BLAS, the per-thread sample
// loops), where the denormals that vanishing gradients turn into cost ~100 cycles per operation (a
// tanh RNN whose gradient vanishes: 3-6x slower). Each op gives the workers the caller's mode, with
// one parallel region per change of mode. Remembered per calling thread: OpenMP (libgomp) keeps a
// team of workers for each thread that starts parallel regions, so a second Python thread's team
// needs the mode handed on by that thread (one process-wide memory skipped it there). Unknown until
// the thread's first op (its workers took whatever mode it had when they started), and handed on
// again when the team's size changes (new workers start with the mode their thread had then).
#if defined(__x86_64__)
void propagate_denormal_mode() {
  constexpr unsigned kBits = _MM_FLUSH_ZERO_ON | _MM_DENORMALS_ZERO_ON;
  thread_local unsigned propagated = ~0u;
  thread_local int team = 0;
  const unsigned mode = _mm_getcsr() & kBits;
  const int threads = omp_get_max_threads();
  if (propagated == mode && team == threads) return;
#pragma omp parallel
  { _mm_setcsr((_mm_getcsr() & ~kBits) | mode); }
  propagated = mode;
  team = threads;
}
#else
void propagate_denormal_mode() {}
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    int64_t cell, const at::Tensor& xp, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr, bool reverse,
    double /*clip*/, const std::optional<at::Tensor>& /*norm_probe*/) {
  propagate_denormal_mode();
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
  propagate_denormal_mode();
  return layer_backward(step_kernels_cpu(), cell, grad_out, grad_h_n, grad_c_n, batch_sizes, h0,
                        c0, w_hh, b_hh, w_hr, reverse, clip, record_norms, out, workspace);
}

}  // namespace
}  // namespace rnnkern

TORCH_LIBRARY_IMPL(rnnkern, CPU, m) {
  m.impl("rnn_layer_forward", &rnnkern::forward_cpu);
  m.impl("rnn_layer_backward", &rnnkern::backward_cpu);
}
