// Where the cluster kernels' steps spend their time, on a GPU (bench/NOTES.md: the fixed ~3.5 us of a
// 16-bit forward step that the products and the probe's exchanges do not explain). Standalone: the
// kernels of csrc/cuda/persistent_cluster_kernels.cuh built with RNNKERN_STEP_TRACE (csrc/cuda/step_trace.cuh),
// whose thread 0 of every block sums the SM cycles of each phase of the step; no torch.
//   nvcc -std=c++20 -O3 -DNDEBUG -DRNNKERN_STEP_TRACE -D__CUDA_NO_HALF_OPERATORS__ \
//     -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
//     --expt-relaxed-constexpr -gencode=arch=compute_90,code=sm_90 -Icsrc/include -Icsrc/cuda \
//     scripts/step_trace.cu csrc/cuda/persistent.cu csrc/cuda/persistent_cluster*.cu -o step_trace
//   ./step_trace                      # the default cases
//   ./step_trace lstm:f16:async:16:256:512[:clip]   # CELL:DTYPE:KERNEL[/N]:B:H:T, clip > 0 optional
//   ./step_trace tanh:f16:async/1:16:256:512        # clusters of at most N blocks (RNNKERN_CLUSTER_BLOCKS)
//   ./step_trace lstm:f32:async@16:16:256:512       # tiles of at most R batch rows (RNNKERN_TILE_ROWS)
//   ./step_trace --skip=cluster-async,wide          # the default cases but those kernels' (hung ones)
// CELL lstm|gru|tanh|relu, DTYPE f16|bf16|f32|tf32|f64, KERNEL cluster|async|wide (RNNKERN_CUDA_KERNEL's
// cluster, cluster-async (also async), wide) or auto (what the backend "auto" takes on them). Random inputs (the values do not change the work). Each case: one
// warm-up launch, then the median of 5 timed launches (CUDA events around the launch alone: no host
// time, no input GEMM) of the forward and then the backward, and per phase the cycles per step
// (mean over the blocks that ran the loop; max in brackets) converted with each block's measured clock.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_check.h"
#include "layer_case.h"
#include "persistent.h"
#include "persistent_common.cuh"
#include "step_trace.cuh"

using namespace rnnkern;
using namespace rnnkern::persistent;
using namespace rnnkern::persistent::detail;

namespace {

// The phases' names: thread 0's view (the kernels' marks, persistent_cluster_kernels.cuh): forward h_{t-1} in; its product
// (loads and FMAs, or fragments and MMAs); its K sum and results to hp; the wait for the other warps'
// products; its cells; the other threads' cells; its sends; the barrier. Backward A; the Σ g²
// partials; B; C: its product, its sum over the lanes and sends, the recorded norms' row sums; the
// exchange; D.
const char* const kForwardPhases[kTracePhases] = {"h_in",  "product", "prod:sum", "prod:wait",
                                                  "cell0", "cells",   "sends",    "barrier"};
const char* const kBackwardPhases[kTracePhases] = {"A:g",    "g2",      "B:cells",  "C:prod",
                                                   "C:send", "C:norms", "exchange", "D:sum"};

// Uniform values in [-scale, scale) of `dtype`, from a hash of the index (no curand).
__global__ void fill_kernel(void* p, int64_t n, DType dtype, float scale, uint32_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 16;
    h *= 2246822519u;
    h ^= h >> 13;
    const float v = scale * (2.0f * (h & 0xffffff) / 16777216.0f - 1.0f);
    switch (dtype) {
      case DType::F16: static_cast<__half*>(p)[i] = __float2half(v); break;
      case DType::BF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16(v); break;
      case DType::F32: static_cast<float*>(p)[i] = v; break;
      default: static_cast<double*>(p)[i] = v; break;
    }
  }
}

struct Buffers {
  std::vector<void*> all;
  void* alloc(size_t bytes) {
    void* p = nullptr;
    CHECK(cudaMalloc(&p, std::max<size_t>(bytes, 16)));
    CHECK(cudaMemset(p, 0, std::max<size_t>(bytes, 16)));
    all.push_back(p);
    return p;
  }
  void* random(int64_t n, DType dtype, float scale) {
    void* p = alloc(n * storage_size(dtype));
    fill_kernel<<<256, 256>>>(p, n, dtype, scale, static_cast<uint32_t>(all.size() * 7919u));
    CHECK(cudaGetLastError());
    return p;
  }
  ~Buffers() {
    for (void* p : all) cudaFree(p);
  }
};

// The median of 5 timed launches (ms) after one warm-up; the last launch's trace in `trace`.
template <typename Launch>
float time_launches(Launch launch, unsigned long long* trace, size_t trace_bytes) {
  CHECK(launch());
  CHECK(cudaDeviceSynchronize());
  std::vector<float> ms;
  cudaEvent_t start, end;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&end));
  for (int rep = 0; rep < 5; ++rep) {
    CHECK(cudaMemset(trace, 0, trace_bytes));
    CHECK(cudaEventRecord(start));
    CHECK(launch());
    CHECK(cudaEventRecord(end));
    CHECK(cudaEventSynchronize(end));
    float t = 0.f;
    CHECK(cudaEventElapsedTime(&t, start, end));
    ms.push_back(t);
  }
  CHECK(cudaEventDestroy(start));
  CHECK(cudaEventDestroy(end));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// One line: the launch's us per step, the SMs its blocks ran on (fewer than the blocks: some shared
// one), then each phase's us per step over the blocks (mean [max]).
void report(const char* pass, const LayerCase& c, const Plan& plan, float ms, const unsigned long long* slots,
            const char* const* names) {
  double mean[kTracePhases] = {}, worst[kTracePhases] = {}, prologue = 0.0, loop = 0.0, ghz_sum = 0.0;
  int counted = 0;
  std::vector<unsigned long long> sms;
  for (int b = 0; b < plan.blocks; ++b) {
    const unsigned long long* s = slots + static_cast<size_t>(b) * kTraceSlots;
    if (s[kTraceNs] != 0) sms.push_back(s[kTraceSm]);  // (every block that reached the end)
  }
  std::sort(sms.begin(), sms.end());
  const int distinct_sms = static_cast<int>(std::unique(sms.begin(), sms.end()) - sms.begin());
  for (int b = 0; b < plan.blocks; ++b) {
    const unsigned long long* s = slots + static_cast<size_t>(b) * kTraceSlots;
    if (s[kTraceSteps] == 0 || s[kTraceNs] == 0) continue;  // (blocks without units, async: no loop)
    const double ghz = static_cast<double>(s[kTraceCycles]) / static_cast<double>(s[kTraceNs]);
    const double us_per_step = 1e-3 / ghz / static_cast<double>(s[kTraceSteps]);  // per cycle summed over steps
    for (int k = 0; k < kTracePhases; ++k) {
      const double us = static_cast<double>(s[k]) * us_per_step;
      mean[k] += us;
      worst[k] = std::max(worst[k], us);
    }
    prologue += static_cast<double>(s[kTracePrologue]) * 1e-3 / ghz;
    loop += static_cast<double>(s[kTraceLoopCycles]) * us_per_step;
    ghz_sum += ghz;
    ++counted;
  }
  std::printf("%-28s %-8s %4d blk %4d sm %2d/cl tile %2d copies %d  %7.3f us/step (loop %6.3f, prologue %5.1f us, %.2f GHz) |",
              c.label.c_str(), pass, plan.blocks, distinct_sms, plan.cluster, plan.tile_rows, plan.copies,
              1e3 * ms / static_cast<double>(c.steps), counted ? loop / counted : 0.0,
              counted ? prologue / counted : 0.0, counted ? ghz_sum / counted : 0.0);
  for (int k = 0; k < kTracePhases; ++k) {
    std::printf(" %s %.3f [%.3f]", names[k], counted ? mean[k] / counted : 0.0, worst[k]);
  }
  std::printf("\n");
  std::fflush(stdout);
}

void run_case(const LayerCase& c) {
  const Plan plan = plan_of(c);
  if (!plan.ok) {
    std::printf("%-28s declined (reason %d)\n", c.label.c_str(), static_cast<int>(plan.reason));
    return;
  }
  const int64_t T = c.steps, B = c.batch, H = c.hidden, N = T * B;
  const int G = cell_gates(c.cell), S = cell_workspace_slots(c.cell);
  const DType d = c.dtype;
  const size_t acc = acc_size(d);
  Buffers buf;
  // Every step has all B rows: sizes[t] = B, offsets[t] = t * B.
  std::vector<int64_t> geometry(2 * T);
  for (int64_t t = 0; t < T; ++t) {
    geometry[t] = B;
    geometry[T + t] = t * B;
  }
  int64_t* geo = static_cast<int64_t*>(buf.alloc(geometry.size() * sizeof(int64_t)));
  CHECK(cudaMemcpy(geo, geometry.data(), geometry.size() * sizeof(int64_t), cudaMemcpyHostToDevice));
  const float w_scale = 1.0f / std::sqrt(static_cast<float>(H));
  ForwardArgs f;
  set_layer(f, c, c.steps, geo, geo + c.steps, true);  // geo: [2][T] sizes, then offsets (every step full)
  f.xp = buf.random(N * G * H, d, 1.0f);
  f.w_hh = buf.random(static_cast<int64_t>(G) * H * H, d, w_scale);
  f.b_hh = buf.random(static_cast<int64_t>(G) * H, d, w_scale);
  f.h0 = buf.random(B * H, d, 0.5f);
  f.c0 = c.cell == Cell::LSTM ? buf.random(B * H, d, 0.5f) : nullptr;
  f.out = buf.alloc(N * H * storage_size(d));
  f.ws = S > 0 ? buf.alloc(N * S * H * acc) : nullptr;
  f.h_n = buf.alloc(B * H * storage_size(d));
  f.c_n = c.cell == Cell::LSTM ? buf.alloc(B * H * storage_size(d)) : nullptr;
  // The wide forward's tagged words, as the extension has them (RNNKERN_WIDE_EXCHANGE=barrier: none,
  // the grid barrier every step instead).
  const char* wide_exchange = std::getenv("RNNKERN_WIDE_EXCHANGE");
  const bool barrier = wide_exchange != nullptr && std::strcmp(wide_exchange, "barrier") == 0;
  const size_t words = barrier ? 0 : exchange_words(plan, d, B, H);
  f.exchange = words > 0 ? buf.alloc(words * sizeof(uint32_t)) : nullptr;

  const size_t trace_bytes = static_cast<size_t>(plan.blocks) * kTraceSlots * sizeof(unsigned long long);
  auto* trace = static_cast<unsigned long long*>(buf.alloc(trace_bytes));
  CHECK(detail::set_step_trace(trace));
  std::vector<unsigned long long> slots(static_cast<size_t>(plan.blocks) * kTraceSlots);

  const float fwd_ms = time_launches([&] { return forward(plan, f, nullptr); }, trace, trace_bytes);
  CHECK(cudaMemcpy(slots.data(), trace, trace_bytes, cudaMemcpyDeviceToHost));
  report("forward", c, plan, fwd_ms, slots.data(), kForwardPhases);

  BackwardArgs b;
  set_layer(b, c, c.steps, geo, geo + c.steps, true);
  b.clip = c.clip;
  b.grad_out = buf.random(N * H, d, 1.0f);
  b.grad_h_n = buf.random(B * H, d, 1.0f);
  b.grad_c_n = c.cell == Cell::LSTM ? buf.random(B * H, d, 1.0f) : nullptr;
  b.w_hh = f.w_hh;
  b.h0 = f.h0;
  b.c0 = f.c0;
  b.out = f.out;
  b.ws = f.ws;
  b.dgates_x = buf.alloc(N * G * H * storage_size(d));
  b.dgates_h = c.cell == Cell::GRU ? buf.alloc(N * G * H * storage_size(d)) : b.dgates_x;
  b.grad_h0 = buf.alloc(B * H * storage_size(d));
  b.grad_c0 = c.cell == Cell::LSTM ? buf.alloc(B * H * storage_size(d)) : nullptr;
  float* norms = static_cast<float*>(buf.alloc(2 * N * sizeof(float)));  // norms on, as the bench
  b.norm_g = norms;
  b.norm_c = c.cell == Cell::LSTM ? norms + N : nullptr;
  b.scratch = buf.alloc(std::max<size_t>(scratch_elements(plan, B, N, true), 1) * sizeof(double));
  const float bwd_ms = time_launches([&] { return backward(plan, b, nullptr); }, trace, trace_bytes);
  CHECK(cudaMemcpy(slots.data(), trace, trace_bytes, cudaMemcpyDeviceToHost));
  report("backward", c, plan, bwd_ms, slots.data(), kBackwardPhases);
  CHECK(detail::set_step_trace(nullptr));
}

// The issue's B = 16 shapes on every exchange, float32 exact and TF32, the other cells, a larger
// batch, clipping (the norms' exchange first), the wide kernels at the size they are for (the GRU's
// and RNN's 16-bit forwards had waited for the next step's x loads in their cells until the sixteenth
// session), then smaller clusters (the exchange's cost against the product's: an RNN's W_hh at H = 256
// fits in one block, which then exchanges nothing), then other batch tiles (exact float32's default
// is 4 rows: against 16 and 8; 16-bit's 8 against 16: the exchange's bytes halve, through L2 for wide).
const char* const kDefaultCases[] = {
    "lstm:f16:cluster:16:256:512", "lstm:f16:async:16:256:512", "lstm:f16:wide:16:256:512",
    "lstm:f16:async:16:256:512:1.0", "lstm:f32:cluster:16:256:512", "lstm:f32:async:16:256:512",
    "lstm:tf32:async:16:256:512", "gru:f16:async:16:256:512", "tanh:f16:cluster:16:256:512",
    "tanh:f16:async:16:256:512", "lstm:f16:async:64:256:512", "lstm:f16:async:16:512:512",
    "lstm:f16:wide:16:768:512", "lstm:f32:wide:16:768:512", "lstm:f16:wide:64:1024:256",
    "gru:f16:wide:16:768:512", "tanh:f16:wide:16:1024:512",
    "tanh:f16:async/1:16:256:512", "tanh:f16:cluster/1:16:256:512", "lstm:f16:async/8:16:256:512",
    "lstm:f32:async/8:16:256:512", "gru:f16:async/8:16:256:512",
    "lstm:f32:async@16:16:256:512", "lstm:f32:async@4:16:256:512", "gru:f32:async:16:256:512",
    "tanh:f32:async:16:256:512", "tanh:f32:async@16:16:256:512",
    "lstm:f32:wide@16:16:768:512", "lstm:f16:async@16:16:256:512", "tanh:f16:async@16:16:256:512",
    "lstm:f16:wide@8:16:768:512",
};

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> cases;
  std::string skip;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--skip=", 0) == 0) {
      skip = "," + arg.substr(7) + ",";
    } else {
      cases.push_back(arg);
    }
  }
  if (cases.empty()) cases.assign(std::begin(kDefaultCases), std::end(kDefaultCases));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("step_trace on %s (%d SMs); us per step; phases: forward %s", prop.name, prop.multiProcessorCount,
              kForwardPhases[0]);
  for (int k = 1; k < kTracePhases; ++k) std::printf(",%s", kForwardPhases[k]);
  std::printf(", backward %s", kBackwardPhases[0]);
  for (int k = 1; k < kTracePhases; ++k) std::printf(",%s", kBackwardPhases[k]);
  std::printf("\n");
  for (const std::string& text : cases) {
    LayerCase c;
    if (!parse_layer_case(text, c)) {
      std::printf("bad case '%s' (CELL:DTYPE:KERNEL[/N]:B:H[:T[:clip]])\n", text.c_str());
      return 2;
    }
    const char* kernel = c.exchange == Exchange::ClusterBarrier ? ",cluster,"
                         : c.exchange == Exchange::ClusterAsync ? ",cluster-async," : ",wide,";
    if (skip.find(kernel) != std::string::npos) {
      std::printf("%-28s skipped (--skip)\n", c.label.c_str());
      continue;
    }
    run_case(c);
  }
  return 0;
}
