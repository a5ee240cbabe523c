// The emulator's runtime (fibers.cpp), as the programs that launch emulated kernels see it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

#include "cuda_emulation.h"

namespace rnnkern_emu {

struct LaunchSpec {
  unsigned blocks = 1, threads = 32;
  int cluster = 0;           // blocks per cluster (0: no clusters)
  bool cooperative = false;  // grid.sync() allowed
  size_t smem = 0;           // dynamic shared memory per block
  uint64_t seed = 0;         // the scheduling order's and the st.async deliveries' draws
};

// Runs `body` (the kernel's call) once per thread of `spec`, every thread a fiber; returns once all
// have finished. Exits the process (status 3-6, a message on stderr) on an invalid access, a hang, a
// stack overflow or a misuse of a primitive.
void run_launch(const LaunchSpec& spec, const std::function<void()>& body);

// A buffer between guard pages (its end against the upper one), filled with 0xff bytes (NaN in every
// float type) until written.
struct Guarded {
  unsigned char* ptr = nullptr;
  unsigned char* base = nullptr;
  size_t mapped = 0;
};
Guarded guarded_alloc(size_t bytes);
void guarded_free(Guarded& g);

[[noreturn]] void fail(const std::string& why);

}  // namespace rnnkern_emu
