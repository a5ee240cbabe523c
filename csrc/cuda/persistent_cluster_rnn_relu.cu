// The ReLU RNN cluster kernels (persistent_cluster_kernels.cuh): a translation unit per cell, so that
// the build compiles the cells' kernels side by side.
#include "persistent_cluster_kernels.cuh"

namespace rnnkern {
namespace persistent {
namespace detail {

template const void* cluster_kernel<Cell::RNN_RELU>(bool, DType, Exchange, bool);
#ifdef RNNKERN_STEP_TRACE
template cudaError_t set_cluster_step_trace<Cell::RNN_RELU>(unsigned long long*);
#endif

}  // namespace detail
}  // namespace persistent
}  // namespace rnnkern
