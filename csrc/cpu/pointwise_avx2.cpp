// CPU step kernels for AVX2 + FMA, selected at run time when ATen itself runs AVX2.
#include "isa_prelude.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
#include "isa_macros.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define RNNKERN_CPU_ISA cpu_avx2
// (GCC 12 reports its own intrinsics headers' `__Y` as maybe uninitialised wherever ATen's 16-bit
// conversions are inlined: a false positive, hundreds of lines of it per build.)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "pointwise_impl.h"
#else
namespace rnnkern::cpu_avx2 {
const StepKernels* cpu_step_kernels() { return nullptr; }
}  // namespace rnnkern::cpu_avx2
#endif
