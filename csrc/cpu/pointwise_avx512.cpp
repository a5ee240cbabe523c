// CPU step kernels for AVX-512 (F, BW, VL, DQ), selected at run time when ATen itself runs AVX512.
// See pointwise_avx2.cpp for why the non-vector headers come before the target pragma.
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
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")
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
#include "pointwise_impl.h"
#else
namespace rnnkern::cpu_avx512 {
const StepKernels* cpu_step_kernels() { return nullptr; }
}  // namespace rnnkern::cpu_avx512
#endif
