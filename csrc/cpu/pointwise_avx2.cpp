// CPU step kernels for AVX2 + FMA, selected at run time when ATen itself runs AVX2.
//
// The non-vector headers come first, compiled for the baseline target, so that the inline
// functions they define are not emitted with AVX2 instructions; only what follows the pragma is.
#include "pointwise.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
// g++ does not define the ISA macros for a target pragma; ATen's and Sleef's headers test them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __BMI__
#define __BMI__ 1
#endif
#ifndef __BMI2__
#define __BMI2__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define RNNKERN_CPU_ISA cpu_avx2
#include "pointwise_impl.h"
#else
namespace rnnkern::cpu_avx2 {
const StepKernels* cpu_step_kernels() { return nullptr; }
}  // namespace rnnkern::cpu_avx2
#endif
