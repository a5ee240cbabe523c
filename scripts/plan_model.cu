// The cluster kernels' planner (csrc/cuda/persistent_cluster.cu: make_cluster_plan) on a modelled
// Hopper GPU, without one: what tiles, cluster sizes, units per block, copies and shared memory it
// chooses for a layer (tests/test_cluster_plan.py checks them). Built with nvcc from the planner's own
// translation unit; the CUDA runtime calls the planner makes (function attributes, occupancy) are
// answered by the model of hopper_model.h instead of a driver.
// This file is plain C++ (compiled as such: the runtime's device-side declarations would clash with the
// definitions below), linked with the planner compiled by nvcc (scripts/build_plan_model.sh).
//   ./plan_model tanh:f16:cluster/1:16:256 lstm:f32:async@16:16:256 ...   # scripts/layer_case.h
// One line per case: the plan's fields as key=value.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "hopper_model.h"
#include "layer_case.h"
#include "persistent.h"

using namespace rnnkern;
using namespace rnnkern::persistent;


// The planner's view of the device and of its kernels (each cell's unit supplies cluster_kernel; here
// an address per (cell, pass, dtype, exchange, tf32), never launched).
namespace rnnkern {
namespace persistent {
namespace detail {

// (Declared in persistent_cluster_layout.cuh and persistent_common.cuh, which hold device code.)
const cudaDeviceProp* device_properties(int device);
template <Cell C>
const void* cluster_kernel(bool forward, DType dtype, Exchange exchange, bool tf32);

const cudaDeviceProp* device_properties(int) {
  static const cudaDeviceProp prop = hopper_model::device();
  return &prop;
}

template <Cell C>
const void* cluster_kernel(bool forward, DType dtype, Exchange exchange, bool tf32) {
  static char kernels[2][4][3][2];  // one per instantiation, i.e. per cell
  return &kernels[forward][static_cast<int>(dtype)][static_cast<int>(exchange)][tf32];
}
template const void* cluster_kernel<Cell::LSTM>(bool, DType, Exchange, bool);
template const void* cluster_kernel<Cell::GRU>(bool, DType, Exchange, bool);
template const void* cluster_kernel<Cell::RNN_TANH>(bool, DType, Exchange, bool);
template const void* cluster_kernel<Cell::RNN_RELU>(bool, DType, Exchange, bool);

}  // namespace detail
}  // namespace persistent
}  // namespace rnnkern

// Launches: none (the model's other runtime calls: hopper_model.h).
extern "C" {

cudaError_t CUDARTAPI cudaLaunchKernelExC(const cudaLaunchConfig_t*, const void*, void**) {
  return hopper_model::fail(cudaErrorNoDevice);  // planning only
}

}  // extern "C"

// Each case CELL:DTYPE:KERNEL[/N][@R]:B:H (scripts/layer_case.h) prints its plan (plan_of: KERNEL auto
// is what the backend "auto" takes on the kernels on clusters, ok=0 where that pays off nowhere).
int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    LayerCase c;
    if (!parse_layer_case(argv[i], c)) {
      std::fprintf(stderr, "bad case %s (CELL:DTYPE:KERNEL[/N][@R]:B:H)\n", argv[i]);
      return 2;
    }
    const Plan p = plan_of(c);
    std::printf("%s ok=%d reason=%d cluster=%d blocks=%d units=%d tile_rows=%d resident=%d copies=%d tf32=%d "
                "exchange=%d smem_forward=%zu smem_backward=%zu optin=%zu\n",
                argv[i], p.ok ? 1 : 0, static_cast<int>(p.reason), p.cluster, p.blocks, p.units, p.tile_rows,
                p.resident_clusters, p.copies, p.tf32 ? 1 : 0, static_cast<int>(p.exchange), p.smem_forward,
                p.smem_backward, hopper_model::device().sharedMemPerBlockOptin);
  }
  return 0;
}
