// Floors of a persistent recurrence step on this GPU (bench/NOTES.md, issue 9): what one step's
// synchronisation and state exchange cost with nothing else in the loop. Standalone (no torch):
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 scripts/persistent_probe.cu -o probe && ./probe
// Each probe runs STEPS steps in one launch; the table gives microseconds per step (median of 7
// launches after a warm-up) for a B=16, H=256 float32 state:
//   grid-sync           cooperative_groups grid.sync() alone, 128 blocks (the grid-wide kernels' barrier)
//   grid-flag           a hand-rolled grid barrier: one atomic arrive per block, spin on a generation flag
//   grid-exchange       write own B x H/128 slice of h to global, grid.sync(), every block loads all of
//                       h (B x H) through L2 into shared memory: the grid kernels' forward floor
//   grid-sync/N         grid.sync() alone with N blocks (how the barrier grows with the grid)
//   grid-reduce-scatter/N  the wide kernels' backward exchange at H = 768 (Exchange::Grid): every block
//                       writes B x H float32 partial sums into the owners' inboxes in global memory,
//                       grid.sync(), sums its own inbox (N x B x H/N values) through L2, grid.sync()
//   cluster-sync/N      barrier.cluster alone, clusters of N blocks
//   cluster-sync-relaxed/N  the same with a relaxed arrive (no MEMBAR.ALL.GPU, no L1 invalidation)
//   cluster-exchange/N  every block stores its B x H/N slice of h into all N blocks' shared memory
//                       (distributed shared memory), then cluster.sync(): the cluster kernels' floor
//   cluster-exchange+store/N  the same plus one global store per value, as the kernels store rows
//   cluster-chunks/N    the cluster kernels' v2 exchange: h written to the own stage, __syncthreads,
//                       then the block's columns copied to the other blocks in 16-byte chunks
//   cluster-chunks+6stores/N  the same plus 6 global stores per value (LSTM: out + 5 workspace slots)
//   cluster-stasync/N   the chunks sent with st.async, each completing on the receiver's mbarrier
//                       (expect_tx), no cluster barrier in the loop: the candidate next exchange.
//                       Last in the table: a protocol error would hang it (gpu_check's timeout).
//   cluster-partials-stasync/N  the cluster-async backward's reduce-scatter at 8-row tiles: every block
//                       sends each other block its 8 x H/N float32 partial sums in 16-byte st.async
//                       pieces (1,024 a block at N = 16 less its own share), waits for its own, sums them
//   cluster-partials-bulk/N  the same partials written to a local outbox, then one cp.async.bulk
//                       shared::cluster copy per owner (N - 1 a block), completing on the owner's
//                       mbarrier as the st.async do: whether fewer, larger remote copies make phase C's
//                       sends cheaper (bench/NOTES.md, sixteenth session). Their waits give up after
//                       ~50 ms and print "hung" rather than stall the run.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda_check.h"

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kSteps = 2048;
constexpr int kBatch = 16;
constexpr int kHidden = 256;

__global__ void grid_sync_kernel(int steps) {
  cg::grid_group grid = cg::this_grid();
  for (int s = 0; s < steps; ++s) grid.sync();
}

// arrive: one atomicAdd per block on `count`; the last block resets it and bumps `generation`;
// the others spin on `generation` with acquire loads.
__global__ void grid_flag_kernel(int steps, unsigned* count, volatile unsigned* generation) {
  for (int s = 0; s < steps; ++s) {
    __syncthreads();
    if (threadIdx.x == 0) {
      const unsigned gen = *generation;
      __threadfence();
      if (atomicAdd(count, 1u) == gridDim.x - 1) {
        *count = 0;
        __threadfence();
        *generation = gen + 1;
      } else {
        while (*generation == gen) {
        }
      }
      __threadfence();
    }
    __syncthreads();
  }
}

__global__ void grid_exchange_kernel(int steps, float* h) {
  __shared__ float stage[kBatch * kHidden];
  cg::grid_group grid = cg::this_grid();
  const int units = kHidden / gridDim.x;
  for (int s = 0; s < steps; ++s) {
    float* cur = h + (s & 1) * kBatch * kHidden;
    float* nxt = h + ((s + 1) & 1) * kBatch * kHidden;
    float v[kBatch * kHidden / kThreads];
#pragma unroll
    for (int r = 0; r < kBatch * kHidden / kThreads; ++r) v[r] = __ldcg(cur + r * kThreads + threadIdx.x);
#pragma unroll
    for (int r = 0; r < kBatch * kHidden / kThreads; ++r) stage[r * kThreads + threadIdx.x] = v[r];
    __syncthreads();
    if (threadIdx.x < kBatch * units) {
      const int b = threadIdx.x / units, u = blockIdx.x * units + threadIdx.x % units;
      nxt[b * kHidden + u] = stage[b * kHidden + u] * 0.5f + 1.0f;
    }
    grid.sync();
  }
}

constexpr int kWideHidden = 768;

// grid-reduce-scatter (see the header): inbox [owner][sender][B][units] float32, units = H / N.
__global__ void grid_reduce_scatter_kernel(int steps, float* inbox, float* sink) {
  cg::grid_group grid = cg::this_grid();
  const int blocks = gridDim.x, units = kWideHidden / blocks, rank = blockIdx.x;
  float total = 0.f;
  for (int s = 0; s < steps; ++s) {
    for (int i = threadIdx.x; i < kBatch * kWideHidden / 4; i += kThreads) {
      const int b = i / (kWideHidden / 4), k = i % (kWideHidden / 4) * 4, owner = k / units;
      *reinterpret_cast<float4*>(inbox + ((static_cast<size_t>(owner) * blocks + rank) * kBatch + b) * units + k % units) =
          make_float4(static_cast<float>(s), static_cast<float>(b), static_cast<float>(k), static_cast<float>(rank));
    }
    grid.sync();
    const float4* own = reinterpret_cast<const float4*>(inbox + static_cast<size_t>(rank) * blocks * kBatch * units);
    constexpr int kBatchLoads = 8;  // loads in flight per thread, as the kernels issue them
    for (int i0 = 0; i0 < blocks * kBatch * units / 4; i0 += kBatchLoads * kThreads) {
      float4 v[kBatchLoads];
#pragma unroll
      for (int j = 0; j < kBatchLoads; ++j) {
        const int i = i0 + j * kThreads + threadIdx.x;
        v[j] = i < blocks * kBatch * units / 4 ? __ldcg(own + i) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int j = 0; j < kBatchLoads; ++j) total += v[j].x + v[j].y + v[j].z + v[j].w;
    }
    grid.sync();
  }
  if (total == -1.0f) sink[0] = total;  // keeps the loads
}

__global__ void cluster_sync_kernel(int steps) {
  cg::cluster_group cluster = cg::this_cluster();
  for (int s = 0; s < steps; ++s) cluster.sync();
}

// barrier.cluster with a relaxed arrive: cg's cluster.sync() is arrive.release + wait.acquire, which
// compiles to MEMBAR.ALL.GPU before the arrive (waiting for every store of the thread, global ones
// too) and CCTL.IVALL after the wait (L1 invalidated). This measures the barrier without them.
__global__ void cluster_sync_relaxed_kernel(int steps) {
  for (int s = 0; s < steps; ++s) {
    asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
    asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
  }
}

// Each block computes its columns of h from the current stage and sends them to every block: with
// `chunks` false one 4-byte remote store per value and block (the cluster kernels' v1), with `chunks`
// true as the v2 kernels do (each value to the own stage, __syncthreads, then 16-byte chunks of the
// block's columns to the other blocks). `stores` global stores per value beside it (the rnnkern
// kernels store out and workspace rows), which the barrier's release fence waits for.
__global__ void cluster_exchange_kernel(int steps, float* sink, float* global_rows, int stores, bool chunks) {
  __shared__ __align__(16) float stage[2][kBatch * kHidden];
  cg::cluster_group cluster = cg::this_cluster();
  const int blocks = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int units = kHidden / blocks;
  for (int i = threadIdx.x; i < 2 * kBatch * kHidden; i += kThreads) (&stage[0][0])[i] = 1.0f;
  cluster.sync();
  for (int s = 0; s < steps; ++s) {
    const float* cur = stage[s & 1];
    float* nxt = stage[(s + 1) & 1];
    for (int i = threadIdx.x; i < kBatch * units; i += kThreads) {
      const int b = i / units, u = rank * units + i % units;
      const float v = cur[b * kHidden + u] * 0.5f + 1.0f;
      if (chunks) {
        nxt[b * kHidden + u] = v;
      } else {
        for (int r = 0; r < blocks; ++r) *cluster.map_shared_rank(nxt + b * kHidden + u, r) = v;
      }
      for (int k = 0; k < stores; ++k) {
        global_rows[((static_cast<int64_t>(s) * stores + k) * gridDim.x + blockIdx.x) * kBatch * units + i] = v;
      }
    }
    if (chunks) {
      __syncthreads();
      const int per_row = units / 4, others = blocks - 1;
      for (int i = threadIdx.x; i < kBatch * per_row * others; i += kThreads) {
        const int chunk = i / others, dest = (rank + 1 + i % others) % blocks;
        float* p = nxt + (chunk / per_row) * kHidden + rank * units + (chunk % per_row) * 4;
        *reinterpret_cast<float4*>(cluster.map_shared_rank(p, dest)) = *reinterpret_cast<const float4*>(p);
      }
    }
    cluster.sync();
  }
  if (threadIdx.x == 0) sink[blockIdx.x] = stage[kSteps & 1][rank];
}

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// The shared::cluster address in block `rank` of the object at shared::cta address `local`.
__device__ __forceinline__ uint32_t in_block(uint32_t local, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(local), "r"(rank));
  return remote;
}

// Whether the phase of the mbarrier `bar` with this parity has completed (one try_wait).
__device__ __forceinline__ bool phase_done(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      " selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(shared_address(bar)), "r"(parity)
      : "memory");
  return done != 0;
}

// 16 bytes to `local`'s twin in block `rank`, completing on the twin of the mbarrier at `bar`.
__device__ __forceinline__ void send_async(uint32_t local, float4 v, uint32_t rank, uint32_t bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];\n" ::"r"(
                   in_block(local, rank)),
               "r"(__float_as_uint(v.x)), "r"(__float_as_uint(v.y)), "r"(__float_as_uint(v.z)),
               "r"(__float_as_uint(v.w)), "r"(in_block(bar, rank))
               : "memory");
}

// The same exchange with st.async: each 16-byte chunk goes to the receiver's stage and decrements the
// transaction count of the receiver's mbarrier for that stage; the receiver's thread 0 announces the
// bytes it expects (arrive.expect_tx), every thread waits on the stage's phase. No cluster barrier
// per step: a block waits only for the data it reads. Double-buffered stages make the writes safe: a
// sender writes stage (s+1)%2 of a receiver only after it has the receiver's step s-1 result, which the
// receiver sent after a __syncthreads that follows its last read of that stage (step s-1).
__global__ void cluster_stasync_kernel(int steps, float* sink) {
  __shared__ __align__(16) float stage[2][kBatch * kHidden];
  __shared__ __align__(8) uint64_t full[2];
  cg::cluster_group cluster = cg::this_cluster();
  const int blocks = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int units = kHidden / blocks;
  for (int i = threadIdx.x; i < 2 * kBatch * kHidden; i += kThreads) (&stage[0][0])[i] = 1.0f;
  if (threadIdx.x == 0) {
    for (int k = 0; k < 2; ++k) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(shared_address(&full[k])) : "memory");
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  cluster.sync();
  const uint32_t bytes = static_cast<uint32_t>((blocks - 1) * kBatch * units * sizeof(float));
  uint32_t parity[2] = {0u, 0u};
  for (int s = 0; s < steps; ++s) {
    const int c = s & 1, n = (s + 1) & 1;
    if (s > 0 && blocks > 1) {  // stage c complete: every other block's chunks of step s - 1
      while (!phase_done(&full[c], parity[c])) {
      }
      parity[c] ^= 1u;
    }
    __syncthreads();  // the own columns (plain stores) too
    const float* cur = stage[c];
    float* nxt = stage[n];
    const int per_row = units / 4;
    float4 mine[kBatch * kHidden / 4 / kThreads + 1];
    int count = 0;
    for (int i = threadIdx.x; i < kBatch * per_row; i += kThreads, ++count) {
      const float* p = cur + (i / per_row) * kHidden + rank * units + (i % per_row) * 4;
      const float4 v = *reinterpret_cast<const float4*>(p);
      mine[count] = make_float4(v.x * 0.5f + 1.0f, v.y * 0.5f + 1.0f, v.z * 0.5f + 1.0f, v.w * 0.5f + 1.0f);
    }
    __syncthreads();  // every read of stage c (and of n, last step) before any send
    if (s + 1 < steps) {
      if (threadIdx.x == 0 && blocks > 1) {
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(shared_address(&full[n])),
                     "r"(bytes)
                     : "memory");
      }
      count = 0;
      for (int i = threadIdx.x; i < kBatch * per_row; i += kThreads, ++count) {
        float* p = nxt + (i / per_row) * kHidden + rank * units + (i % per_row) * 4;
        *reinterpret_cast<float4*>(p) = mine[count];
        const uint32_t local = shared_address(p), bar = shared_address(&full[n]);
        for (int k = 1; k < blocks; ++k) {
          send_async(local, mine[count], static_cast<uint32_t>((rank + k) % blocks), bar);
        }
      }
    }
  }
  cluster.sync();  // no block leaves while another may still send to it
  if (threadIdx.x == 0) sink[blockIdx.x] = stage[kSteps & 1][rank];
}

// The backward's reduce-scatter (cluster-partials-*): kPartialRows rows of partial sums a step.
constexpr int kPartialRows = 8;

// Waits for the phase of `bar` with this parity; false if it did not complete within ~10^8 clocks
// (~50 ms).
__device__ __forceinline__ bool bounded_wait(uint64_t* bar, uint32_t parity) {
  for (const long long start = clock64(); clock64() - start < 100000000LL;) {
    if (phase_done(bar, parity)) return true;
  }
  return false;
}

// Step s: every block sends owner r its partial sums for r's units (rows x units floats) into r's
// inbox[s % 2][sender], completing on r's full[s % 2]; then waits for its own and sums them (the
// next step's partials depend on the sum). Two copies by parity make the reuse safe: a block writes
// parity c again at step s + 2, after its wait at step s + 1, which needs every block's step s + 1
// sends, each issued after that block's step s sum (so after its reads of inbox c, and after the
// step s copies out of this block's outbox c had landed). `hung` counts blocks whose wait gave up.
__global__ void cluster_partials_kernel(int steps, float* sink, unsigned* hung, bool bulk) {
  __shared__ __align__(128) float outbox[2][kPartialRows * kHidden];  // [parity][owner][row][unit]
  __shared__ __align__(128) float inbox[2][kPartialRows * kHidden];   // [parity][sender][row][unit]
  __shared__ __align__(8) uint64_t full[2];
  __shared__ float block_sum;
  cg::cluster_group cluster = cg::this_cluster();
  const int blocks = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int units = kHidden / blocks, share = kPartialRows * units;  // floats a block sends each owner
  for (int i = threadIdx.x; i < 2 * kPartialRows * kHidden; i += kThreads) {
    (&outbox[0][0])[i] = 1.0f;
    (&inbox[0][0])[i] = 1.0f;
  }
  if (threadIdx.x == 0) {
    block_sum = 0.0f;
    for (int k = 0; k < 2; ++k) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(shared_address(&full[k])) : "memory");
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  cluster.sync();
  const uint32_t bytes = static_cast<uint32_t>((blocks - 1) * share * sizeof(float));
  uint32_t parity[2] = {0u, 0u};
  bool gave_up = false;
  for (int s = 0; s < steps && blocks > 1; ++s) {
    const int c = s & 1;
    const float scale = 1.0f + 1e-7f * block_sum;  // (the partials depend on the step before)
    if (threadIdx.x == 0) {
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(shared_address(&full[c])),
                   "r"(bytes)
                   : "memory");
    }
    const uint32_t bar = shared_address(&full[c]);
    if (!bulk) {
      // 16-byte pieces straight to their owners (the kernels' phase C)
      for (int i = threadIdx.x; i < (blocks - 1) * share / 4; i += kThreads) {
        const int k = i / (share / 4), piece = i - k * (share / 4);
        const uint32_t owner = static_cast<uint32_t>((rank + 1 + k) % blocks);
        const float v = scale * static_cast<float>(piece);
        send_async(shared_address(&inbox[c][rank * share + piece * 4]), make_float4(v, v + 1.0f, v + 2.0f, v + 3.0f),
                   owner, bar);
      }
    } else {
      // the partials into the local outbox, visible to the async proxy, then one copy per owner
      for (int i = threadIdx.x; i < kPartialRows * kHidden / 4; i += kThreads) {
        const float v = scale * static_cast<float>(i);
        reinterpret_cast<float4*>(outbox[c])[i] = make_float4(v, v + 1.0f, v + 2.0f, v + 3.0f);
      }
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      __syncthreads();
      if (static_cast<int>(threadIdx.x) < blocks - 1) {
        const uint32_t owner = static_cast<uint32_t>((rank + 1 + static_cast<int>(threadIdx.x)) % blocks);
        asm volatile(
            "cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                in_block(shared_address(&inbox[c][rank * share]), owner)),
            "r"(shared_address(&outbox[c][owner * share])), "r"(static_cast<uint32_t>(share * sizeof(float))),
            "r"(in_block(bar, owner))
            : "memory");
      }
    }
    const bool arrived = bounded_wait(&full[c], parity[c]);
    if (__syncthreads_or(!arrived)) gave_up = true;  // (block-uniform: the barriers below)
    parity[c] ^= 1u;
    // own units' dh: the senders' partials summed (thread t: rows x units entries, t, t + 256, ...)
    float sum = 0.0f;
    for (int i = threadIdx.x; i < share; i += kThreads) {
      for (int k = 0; k < blocks; ++k) sum += k == rank ? 0.0f : inbox[c][k * share + i];
    }
    __syncthreads();  // every read of block_sum and of inbox c before it changes
    if (threadIdx.x == 0) block_sum = 0.0f;
    __syncthreads();
    atomicAdd(&block_sum, sum);
    __syncthreads();
    if (gave_up) break;
  }
  cluster.sync();  // no block leaves while another may still send to it
  if (threadIdx.x == 0) {
    sink[blockIdx.x] = block_sum;
    if (gave_up) atomicAdd(hung, 1u);
  }
}

template <typename Launch>
float per_step_us(Launch launch) {
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  launch();  // warm-up
  CHECK(cudaDeviceSynchronize());
  std::vector<float> times;
  for (int rep = 0; rep < 7; ++rep) {
    CHECK(cudaEventRecord(start));
    launch();
    CHECK(cudaEventRecord(stop));
    CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms * 1000.0f / kSteps);
  }
  std::sort(times.begin(), times.end());
  CHECK(cudaEventDestroy(start));
  CHECK(cudaEventDestroy(stop));
  return times[times.size() / 2];
}

void cooperative(const void* kernel, int blocks, void** args) {
  CHECK(cudaLaunchCooperativeKernel(kernel, dim3(blocks), dim3(kThreads), args, 0, nullptr));
  CHECK(cudaGetLastError());
}

void clustered(const void* kernel, int cluster, void** args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(cluster);
  config.blockDim = dim3(kThreads);
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = cluster;
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  config.attrs = &attribute;
  config.numAttrs = 1;
  CHECK(cudaLaunchKernelExC(&config, kernel, args));
  CHECK(cudaGetLastError());
}

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB, steps per launch %d, B=%d H=%d float32\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20, kSteps, kBatch, kHidden);
  std::printf("%-28s %7s %12s\n", "probe", "blocks", "us/step");
  int steps = kSteps;
  const int grid_blocks = 128;
  {
    void* args[] = {&steps};
    std::printf("%-28s %7d %12.3f\n", "grid-sync", grid_blocks,
                per_step_us([&] { cooperative(reinterpret_cast<const void*>(grid_sync_kernel), grid_blocks, args); }));
  }
  {
    unsigned* count;
    unsigned* generation;
    CHECK(cudaMalloc(&count, sizeof(unsigned)));
    CHECK(cudaMalloc(&generation, sizeof(unsigned)));
    CHECK(cudaMemset(count, 0, sizeof(unsigned)));
    CHECK(cudaMemset(generation, 0, sizeof(unsigned)));
    void* args[] = {&steps, &count, &generation};
    std::printf("%-28s %7d %12.3f\n", "grid-flag", grid_blocks,
                per_step_us([&] { cooperative(reinterpret_cast<const void*>(grid_flag_kernel), grid_blocks, args); }));
    CHECK(cudaFree(count));
    CHECK(cudaFree(generation));
  }
  {
    float* h;
    CHECK(cudaMalloc(&h, 2 * kBatch * kHidden * sizeof(float)));
    CHECK(cudaMemset(h, 0, 2 * kBatch * kHidden * sizeof(float)));
    void* args[] = {&steps, &h};
    std::printf("%-28s %7d %12.3f\n", "grid-exchange", grid_blocks,
                per_step_us([&] { cooperative(reinterpret_cast<const void*>(grid_exchange_kernel), grid_blocks, args); }));
    CHECK(cudaFree(h));
  }
  float* sink;
  float* rows;
  CHECK(cudaMalloc(&sink, 16 * sizeof(float)));
  for (int blocks : {48, 96, prop.multiProcessorCount}) {
    void* args[] = {&steps};
    char name[40];
    std::snprintf(name, sizeof(name), "grid-sync/%d", blocks);
    std::printf("%-28s %7d %12.3f\n", name, blocks,
                per_step_us([&] { cooperative(reinterpret_cast<const void*>(grid_sync_kernel), blocks, args); }));
  }
  {
    float* inbox;
    CHECK(cudaMalloc(&inbox, static_cast<size_t>(kBatch) * kWideHidden * 96 * sizeof(float)));  // N x B x H
    for (int blocks : {48, 96}) {
      void* args[] = {&steps, &inbox, &sink};
      char name[40];
      std::snprintf(name, sizeof(name), "grid-reduce-scatter/%d", blocks);
      std::printf("%-28s %7d %12.3f\n", name, blocks,
                  per_step_us([&] { cooperative(reinterpret_cast<const void*>(grid_reduce_scatter_kernel), blocks, args); }));
    }
    CHECK(cudaFree(inbox));
  }
  CHECK(cudaMalloc(&rows, static_cast<size_t>(kSteps) * 6 * kBatch * kHidden * sizeof(float)));  // 6 per value
  for (int cluster : {2, 4, 8, 16}) {
    struct Probe {
      const char* name;
      const void* kernel;
      int stores;   // -1: a barrier-only kernel (steps is its one argument)
      bool chunks;
    };
    const Probe probes[] = {
        {"cluster-sync", reinterpret_cast<const void*>(cluster_sync_kernel), -1, false},
        {"cluster-sync-relaxed", reinterpret_cast<const void*>(cluster_sync_relaxed_kernel), -1, false},
        {"cluster-exchange", reinterpret_cast<const void*>(cluster_exchange_kernel), 0, false},
        {"cluster-exchange+store", reinterpret_cast<const void*>(cluster_exchange_kernel), 1, false},
        {"cluster-chunks", reinterpret_cast<const void*>(cluster_exchange_kernel), 0, true},
        {"cluster-chunks+6stores", reinterpret_cast<const void*>(cluster_exchange_kernel), 6, true}};
    for (const Probe& probe : probes) {
      if (cluster > 8) CHECK(cudaFuncSetAttribute(probe.kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
      int stores = probe.stores;
      bool chunks = probe.chunks;
      void* args_sync[] = {&steps};
      void* args_exchange[] = {&steps, &sink, &rows, &stores, &chunks};
      char name[40];
      std::snprintf(name, sizeof(name), "%s/%d", probe.name, cluster);
      std::printf("%-28s %7d %12.3f\n", name, cluster,
                  per_step_us([&] { clustered(probe.kernel, cluster, stores < 0 ? args_sync : args_exchange); }));
    }
  }
  // The st.async exchange last (see the header).
  std::fflush(stdout);
  for (int cluster : {4, 8, 16}) {
    const void* kernel = reinterpret_cast<const void*>(cluster_stasync_kernel);
    if (cluster > 8) CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    void* args[] = {&steps, &sink};
    char name[40];
    std::snprintf(name, sizeof(name), "cluster-stasync/%d", cluster);
    std::printf("%-28s %7d %12.3f\n", name, cluster, per_step_us([&] { clustered(kernel, cluster, args); }));
    std::fflush(stdout);
  }
  // The backward's reduce-scatter: st.async pieces against one bulk copy per owner (see the header).
  unsigned* hung = nullptr;
  CHECK(cudaMalloc(&hung, sizeof(unsigned)));
  for (int cluster : {4, 8, 16}) {
    for (bool bulk : {false, true}) {
      const void* kernel = reinterpret_cast<const void*>(cluster_partials_kernel);
      if (cluster > 8) CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
      CHECK(cudaMemset(hung, 0, sizeof(unsigned)));
      void* args[] = {&steps, &sink, &hung, &bulk};
      char name[40];
      std::snprintf(name, sizeof(name), "cluster-partials-%s/%d", bulk ? "bulk" : "stasync", cluster);
      const float us = per_step_us([&] { clustered(kernel, cluster, args); });
      unsigned gave_up = 0;
      CHECK(cudaMemcpy(&gave_up, hung, sizeof(unsigned), cudaMemcpyDeviceToHost));
      if (gave_up) {
        std::printf("%-28s %7d %12s\n", name, cluster, "hung");
      } else {
        std::printf("%-28s %7d %12.3f\n", name, cluster, us);
      }
      std::fflush(stdout);
    }
  }
  CHECK(cudaFree(hung));
  CHECK(cudaFree(sink));
  CHECK(cudaFree(rows));
  return 0;
}
