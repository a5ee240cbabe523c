// The LSTM cluster kernels (persistent_cluster_kernels.cuh): a translation unit per cell, so that
// the build compiles the cells' kernels side by side.
#include "persistent_cluster_kernels.cuh"

RNNKERN_CLUSTER_KERNELS_OF(LSTM)
