// Shared by the per-ISA step-kernel files (pointwise_avx2.cpp, pointwise_avx512.cpp): include it
// first, before the file's `#pragma GCC target`, so that the non-vector headers are compiled for the
// baseline target and the inline functions they define are not emitted with AVX2/AVX-512
// instructions; only what follows the pragma is. Then include isa_macros.h.
#pragma once

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
