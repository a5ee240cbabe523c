// The cluster kernels' planner (csrc/cuda/persistent_cluster.cu: make_cluster_plan) on a modelled
// Hopper GPU, without one: what tiles, cluster sizes, units per block, copies and shared memory it
// chooses for a layer (tests/test_cluster_plan.py checks them). Built with nvcc from the planner's own
// translation unit; the CUDA runtime calls the planner makes (function attributes, occupancy) are
// answered here by a model of the device instead of a driver:
//   - a kernel takes at most sharedMemPerBlockOptin bytes of dynamic shared memory;
//   - one block per SM (the kernels use up to 255 registers of 256 threads: the whole register file);
//   - a cluster's blocks are on one GPC: clusters of c blocks resident at once = Σ over the GPCs of
//     floor(SMs of the GPC / c). The GPC sizes are a model (132 SMs as on H100 SXM / H200), not
//     measured; the planner's logic, not the device's exact numbers, is what is checked.
// This file is plain C++ (compiled as such: the runtime's device-side declarations would clash with the
// definitions below), linked with the planner compiled by nvcc (scripts/build_plan_model.sh).
//   ./plan_model lstm:f16:cluster:256:256 tanh:f16:cluster/1:16:256 ...   # scripts/layer_case.h
// One line per case: the plan's fields as key=value.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "layer_case.h"
#include "persistent.h"

using namespace rnnkern;
using namespace rnnkern::persistent;

namespace {

const int kGpcSms[] = {18, 18, 18, 18, 16, 16, 14, 14};  // 132 SMs

cudaDeviceProp model_device() {
  cudaDeviceProp prop;
  std::memset(&prop, 0, sizeof(prop));
  std::strcpy(prop.name, "modelled Hopper (132 SMs)");
  prop.major = 9;
  prop.minor = 0;
  prop.multiProcessorCount = 0;
  for (int sms : kGpcSms) prop.multiProcessorCount += sms;
  prop.sharedMemPerBlockOptin = 232448;
  prop.sharedMemPerMultiprocessor = 233472;
  prop.cooperativeLaunch = 1;
  prop.maxThreadsPerBlock = 1024;
  return prop;
}

int cluster_size_of(const cudaLaunchConfig_t* config) {
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    if (config->attrs[i].id == cudaLaunchAttributeClusterDimension) {
      return static_cast<int>(config->attrs[i].val.clusterDim.x);
    }
  }
  return 1;
}

cudaError_t last_error = cudaSuccess;

cudaError_t fail(cudaError_t err) {
  last_error = err;
  return err;
}

}  // namespace

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
  static const cudaDeviceProp prop = model_device();
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

// The runtime calls of the planner, answered by the model (these definitions take the place of the
// CUDA runtime's in this program).
extern "C" {

cudaError_t CUDARTAPI cudaFuncSetAttribute(const void*, enum cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize &&
      (value < 0 || value > static_cast<int>(model_device().sharedMemPerBlockOptin))) {
    return fail(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int threads,
                                                                   size_t smem) {
  *blocks = (threads <= 1024 && smem <= model_device().sharedMemPerBlockOptin) ? 1 : 0;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaOccupancyMaxActiveClusters(int* clusters, const void*, const cudaLaunchConfig_t* config) {
  const int size = cluster_size_of(config);
  if (size < 1 || size > 16 || config->dynamicSmemBytes > model_device().sharedMemPerBlockOptin) {
    *clusters = 0;
    return fail(cudaErrorInvalidClusterSize);
  }
  *clusters = 0;
  for (int sms : kGpcSms) *clusters += sms / size;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaGetLastError(void) {
  const cudaError_t err = last_error;
  last_error = cudaSuccess;
  return err;
}

cudaError_t CUDARTAPI cudaLaunchKernelExC(const cudaLaunchConfig_t*, const void*, void**) {
  return fail(cudaErrorNoDevice);  // planning only
}

}  // extern "C"

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    LayerCase c;
    if (!parse_layer_case(argv[i], c)) {
      std::fprintf(stderr, "bad case %s (CELL:DTYPE:KERNEL[/N]:B:H)\n", argv[i]);
      return 2;
    }
    const Plan p = make_cluster_plan(c.cell, c.dtype, c.batch, c.hidden, false, 0, c.exchange, c.tf32, c.max_cluster);
    std::printf("%s ok=%d reason=%d cluster=%d blocks=%d units=%d tile_rows=%d resident=%d copies=%d tf32=%d "
                "smem_forward=%zu smem_backward=%zu optin=%zu\n",
                argv[i], p.ok ? 1 : 0, static_cast<int>(p.reason), p.cluster, p.blocks, p.units, p.tile_rows,
                p.resident_clusters, p.copies, p.tf32 ? 1 : 0, p.smem_forward, p.smem_backward,
                model_device().sharedMemPerBlockOptin);
  }
  return 0;
}
