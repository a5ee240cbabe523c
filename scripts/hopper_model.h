// A modelled Hopper GPU in place of the CUDA runtime's device, attribute and occupancy calls, for the
// programs that run the planner without a GPU (plan_model.cu, emulator/emulate_layer.cpp):
//   - a kernel takes at most sharedMemPerBlockOptin bytes of dynamic shared memory;
//   - one block per SM (the kernels use up to 255 registers of 256 threads: the whole register file).
//     A floor: the device runs two where a kernel takes at most 128 registers and both blocks' shared
//     memory fits (an H100 ran 19 clusters of 8 blocks of the float16 LSTM at H = 64, B = 300, where
//     this model says 14), so plans here may take larger tiles or smaller clusters than there;
//   - a cluster's blocks are on one GPC: clusters of c blocks resident at once = Σ over the GPCs of
//     floor(SMs of the GPC / c). The GPC sizes are a model (132 SMs as on H100 SXM / H200), not
//     measured; the planner's logic, not the device's exact numbers, is what is checked.
// Plain C++; include it in one translation unit of a program (it defines the runtime's functions).
#pragma once

#include <cuda_runtime.h>

#include <cstring>

namespace hopper_model {

inline const int kGpcSms[] = {18, 18, 18, 18, 16, 16, 14, 14};  // 132 SMs

inline cudaDeviceProp device() {
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

inline int cluster_size_of(const cudaLaunchConfig_t* config) {
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    if (config->attrs[i].id == cudaLaunchAttributeClusterDimension) {
      return static_cast<int>(config->attrs[i].val.clusterDim.x);
    }
  }
  return 1;
}

inline cudaError_t last_error = cudaSuccess;

inline cudaError_t fail(cudaError_t err) {
  last_error = err;
  return err;
}

}  // namespace hopper_model

extern "C" {

cudaError_t CUDARTAPI cudaFuncSetAttribute(const void*, enum cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize &&
      (value < 0 || value > static_cast<int>(hopper_model::device().sharedMemPerBlockOptin))) {
    return hopper_model::fail(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int threads,
                                                                   size_t smem) {
  *blocks = (threads <= 1024 && smem <= hopper_model::device().sharedMemPerBlockOptin) ? 1 : 0;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaOccupancyMaxActiveClusters(int* clusters, const void*, const cudaLaunchConfig_t* config) {
  const int size = hopper_model::cluster_size_of(config);
  if (size < 1 || size > 16 || config->dynamicSmemBytes > hopper_model::device().sharedMemPerBlockOptin) {
    *clusters = 0;
    return hopper_model::fail(cudaErrorInvalidClusterSize);
  }
  *clusters = 0;
  for (int sms : hopper_model::kGpcSms) *clusters += sms / size;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaGetLastError(void) {
  const cudaError_t err = hopper_model::last_error;
  hopper_model::last_error = cudaSuccess;
  return err;
}

}  // extern "C"
