// CPU step kernels for the baseline instruction set (ATen's DEFAULT vectors).
#define RNNKERN_CPU_ISA cpu_default
#include "pointwise_impl.h"
