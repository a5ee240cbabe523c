// CPU step kernels for AVX-512 (F, BW, VL, DQ), selected at run time when ATen itself runs AVX512.
#include "isa_prelude.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")
#include "isa_macros.h"
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define RNNKERN_CPU_ISA cpu_avx512
// (GCC 12 reports its own intrinsics headers' `__Y` as maybe uninitialised wherever ATen's 16-bit
// conversions are inlined: a false positive, hundreds of lines of it per build.)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "pointwise_impl.h"
#else
namespace rnnkern::cpu_avx512 {
const StepKernels* cpu_step_kernels() { return nullptr; }
}  // namespace rnnkern::cpu_avx512
#endif
