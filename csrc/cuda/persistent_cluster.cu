// Plans and launches of the persistent recurrence on thread-block clusters (issue 9; sm_90 and newer):
// the kernels are in persistent_cluster_kernels.cuh (how they work), compiled one cell per
// translation unit (persistent_cluster_<cell>.cu); this unit chooses a layer's tiles, cluster size
// and shared memory (make_cluster_plan) and launches them.
#include <algorithm>
#include <type_traits>

#include "persistent_cluster_layout.cuh"
#include "step_trace.cuh"

namespace rnnkern {
namespace persistent {
namespace {

using namespace detail;

// The kernel of a plan's choices (each cell's from its own translation unit).
const void* kernel_for(bool forward, Cell cell, DType dtype, Exchange exchange, bool tf32) {
  switch (cell) {
    case Cell::LSTM: return cluster_kernel<Cell::LSTM>(forward, dtype, exchange, tf32);
    case Cell::GRU: return cluster_kernel<Cell::GRU>(forward, dtype, exchange, tf32);
    case Cell::RNN_TANH: return cluster_kernel<Cell::RNN_TANH>(forward, dtype, exchange, tf32);
    default: return cluster_kernel<Cell::RNN_RELU>(forward, dtype, exchange, tf32);
  }
}

// Shared memory of the two kernels (their layouts).
size_t forward_smem(int gates, int units, int tile_rows, int64_t hidden, DType dtype, Exchange exchange,
                    bool tf32) {
  const size_t elem = storage_size(dtype);
  const bool mma = uses_mma(static_cast<int>(elem), tf32);
  const Tables tb = make_tables(static_cast<int>(elem), mma, static_cast<int>(hidden), gates, units, tile_rows);
  return forward_layout(tb, gates, units, tile_rows, acc_size(dtype), elem, exchange).bytes;
}

size_t backward_smem(int gates, int units, int tile_rows, int blocks, int64_t hidden, DType dtype,
                     Exchange exchange, bool tf32, int copies) {
  const size_t elem = storage_size(dtype);
  const bool mma = uses_mma(static_cast<int>(elem), tf32);
  const Tables tb = make_tables(static_cast<int>(elem), mma, static_cast<int>(hidden), gates, units, tile_rows);
  return backward_layout(tb, gates, units, tile_rows, blocks, acc_size(dtype), elem, mma, exchange, copies).bytes;
}

// Clusters of plan.cluster blocks, or (Exchange::Grid) a cooperative launch without clusters.
cudaLaunchConfig_t launch_config(const Plan& plan, size_t smem, cudaStream_t stream,
                                 cudaLaunchAttribute* attribute) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(plan.blocks));
  config.blockDim = dim3(static_cast<unsigned>(kThreads));
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  if (plan.exchange == Exchange::Grid) {
    attribute->id = cudaLaunchAttributeCooperative;
    attribute->val.cooperative = 1;
  } else {
    attribute->id = cudaLaunchAttributeClusterDimension;
    attribute->val.clusterDim.x = static_cast<unsigned>(plan.cluster);
    attribute->val.clusterDim.y = 1;
    attribute->val.clusterDim.z = 1;
  }
  config.attrs = attribute;
  config.numAttrs = 1;
  return config;
}

// Lets `kernel` take `smem` bytes of dynamic shared memory and clusters above the portable 8 blocks.
cudaError_t prepare(const void* kernel, size_t smem) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err == cudaSuccess) err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  return err;
}

template <typename Args>
cudaError_t launch(bool forward, const Plan& plan, const Args& args, cudaStream_t stream) {
  const void* kernel = kernel_for(forward, args.cell, args.dtype, plan.exchange, plan.tf32);
  const size_t smem = forward ? plan.smem_forward : plan.smem_backward;
  const std::lock_guard<std::mutex> lock(kernel_attribute_mutex());
  cudaError_t err = prepare(kernel, smem);
  if (err != cudaSuccess) return err;
  cudaLaunchAttribute attribute;
  cudaLaunchConfig_t config = launch_config(plan, smem, stream, &attribute);
  if constexpr (std::is_same_v<Args, ForwardArgs>) {
    // The tagged words' planes (ForwardArgs::exchange) start with no step's tag, in stream order.
    if (args.exchange != nullptr) {
      err = cudaMemsetAsync(args.exchange, 0xff,
                            exchange_words(plan, args.dtype, args.batch, args.hidden) * sizeof(uint32_t), stream);
      if (err != cudaSuccess) return err;
    }
  }
  Args copy = args;
  ClusterShape shape{plan.units, plan.tile_rows, plan.cluster, plan.copies,
                     args.hidden % plan.units == 0 ? norm_slots(plan.units) : 1};
  void* params[] = {&copy, &shape};
  return cudaLaunchKernelExC(&config, kernel, params);
}

// Whether both kernels of `candidate` can run with all its blocks resident as it needs them: at least one
// cluster (then candidate.resident_clusters: how many the device runs at once), or (Exchange::Grid)
// the whole cooperative grid. Clears the CUDA error state when not.
bool schedulable(Plan& candidate, Cell cell, DType dtype, const cudaDeviceProp& prop) {
  const std::lock_guard<std::mutex> lock(kernel_attribute_mutex());
  const bool grid = candidate.exchange == Exchange::Grid;
  const int tiles = candidate.blocks / candidate.cluster;
  candidate.resident_clusters = grid ? tiles : prop.multiProcessorCount;
  for (int pass = 0; pass < 2; ++pass) {
    const void* kernel = kernel_for(pass == 0, cell, dtype, candidate.exchange, candidate.tf32);
    const size_t smem = pass == 0 ? candidate.smem_forward : candidate.smem_backward;
    bool ok = prepare(kernel, smem) == cudaSuccess;
    if (grid) {
      int per_sm = 0;
      ok = ok && cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem) == cudaSuccess &&
           static_cast<int64_t>(per_sm) * prop.multiProcessorCount >= candidate.blocks;
    } else {
      cudaLaunchAttribute attribute;
      cudaLaunchConfig_t config = launch_config(candidate, smem, nullptr, &attribute);
      config.gridDim = dim3(static_cast<unsigned>(candidate.cluster));  // one cluster: can it run at all?
      int clusters = 0;
      ok = ok && cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess && clusters >= 1;
      candidate.resident_clusters = std::min(candidate.resident_clusters, clusters);
    }
    if (!ok) {
      cudaGetLastError();
      return false;
    }
  }
  return true;
}

// The plan of `tiles` tiles of `tile_rows` batch rows, each on `blocks` blocks of `units` hidden units:
// ok where both kernels' shared memory fits and they are schedulable, else the reason (SharedMemory,
// Occupancy). Two copies of the backward's exchanged buffers where they fit, else one (Plan::copies:
// the same reach in H as before the copies; Grid: always two, in global memory). `own_sm`: each
// block asks for more than half an SM's shared memory, so that no two blocks share an SM (tiles
// below 16 rows are there for more SMs: the float32 kernels at 8 rows take ~88 KiB and, at 128
// registers, would fit two an SM, which could put two of a batch's clusters on the same SMs).
Plan try_plan(Cell cell, DType dtype, int64_t hidden, int64_t tiles, int tile_rows, int blocks, int units,
              Exchange exchange, bool tf32, const cudaDeviceProp& prop, bool own_sm = false) {
  const int gates = cell_gates(cell);
  Plan c;
  c.cluster = blocks;
  c.tile_rows = tile_rows;
  c.blocks = static_cast<int>(tiles) * blocks;
  c.units = units;
  c.threads = kThreads;
  c.smem_forward = forward_smem(gates, units, tile_rows, hidden, dtype, exchange, tf32);
  c.copies = 2;
  c.smem_backward = backward_smem(gates, units, tile_rows, blocks, hidden, dtype, exchange, tf32, c.copies);
  if (exchange != Exchange::Grid && c.smem_backward > prop.sharedMemPerBlockOptin) {
    c.copies = 1;
    c.smem_backward = backward_smem(gates, units, tile_rows, blocks, hidden, dtype, exchange, tf32, c.copies);
  }
  if (own_sm) {
    c.smem_forward = std::max(c.smem_forward, prop.sharedMemPerMultiprocessor / 2);
    c.smem_backward = std::max(c.smem_backward, prop.sharedMemPerMultiprocessor / 2);
  }
  c.exchange = exchange;
  c.tf32 = tf32;
  if (std::max(c.smem_forward, c.smem_backward) > prop.sharedMemPerBlockOptin) {
    c.reason = Decline::SharedMemory;
  } else if (!schedulable(c, cell, dtype, prop)) {
    c.reason = Decline::Occupancy;
  } else {
    c.ok = true;
  }
  return c;
}

// The cluster plan for tiles of `tile_rows` batch rows (`tiles` of them): the largest cluster of at
// most `max_cluster` blocks that fits and can be scheduled, i.e. the smallest share of W_hh per block.
Plan plan_for_tiles(Cell cell, DType dtype, int64_t hidden, int64_t tiles, int tile_rows, Exchange exchange,
                    bool tf32, int max_cluster, const cudaDeviceProp& prop, bool own_sm = false) {
  Plan plan;
  plan.reason = Decline::SharedMemory;
  const int grain = unit_grain(static_cast<int>(storage_size(dtype)));
  for (int size = std::min(max_cluster, kMaxClusterBlocks); size >= 1; size /= 2) {
    if (size > hidden && size > 1) continue;
    // Units rounded up to the grain; then the smallest power of two of blocks that covers them.
    const int units = round_up(static_cast<int>((hidden + size - 1) / size), grain);
    const int needed = static_cast<int>((hidden + units - 1) / units);
    int blocks = 1;
    while (blocks < needed) blocks *= 2;
    const Plan candidate = try_plan(cell, dtype, hidden, tiles, tile_rows, blocks, units, exchange, tf32, prop, own_sm);
    if (candidate.ok) return candidate;
    if (candidate.reason == Decline::Occupancy) plan.reason = Decline::Occupancy;
  }
  return plan;
}

// Whether tiles from a cap of `cap` rows take one SM a block (try_plan's own_sm): several tiles below
// 16 rows, which are there for more SMs.
bool spread_tiles(int64_t tiles, int cap) { return tiles > 1 && cap < kTileRows; }

// The batch rows per tile a plan tries first: `max_tile_rows` where set (RNNKERN_TILE_ROWS), else
// kFmaTileRows for the exact FMA products, kHalfTileRows for the 16-bit ones and 16 (one tensor-core
// row tile) for TF32.
int first_tile_rows(DType dtype, bool tf32, int max_tile_rows) {
  if (max_tile_rows > 0) return max_tile_rows;
  const int elem = static_cast<int>(storage_size(dtype));
  return !uses_mma(elem, tf32) ? kFmaTileRows : elem == 2 ? kHalfTileRows : kTileRows;
}

// Exchange::Grid ("wide"): each tile's blocks in one cooperative grid (one block per SM, all resident),
// for layers whose W_hh does not fit in one cluster. Tiles of `first` rows (first_tile_rows) where
// their blocks fit in the device, else fewer, larger tiles (each with more blocks, so a smaller share
// of W_hh per block).
Plan plan_wide(Cell cell, DType dtype, int64_t batch, int64_t hidden, bool tf32, int first,
               const cudaDeviceProp& prop) {
  const int gates = cell_gates(cell), sms = prop.multiProcessorCount;
  const int grain = unit_grain(static_cast<int>(storage_size(dtype)));
  Plan plan;
  plan.reason = prop.cooperativeLaunch ? Decline::SharedMemory : Decline::NoCooperativeLaunch;
  if (!prop.cooperativeLaunch) return plan;
  for (int cap = first; cap <= kMaxTileRows; cap *= 2) {
    const int64_t tiles = (batch + cap - 1) / cap;
    if (tiles > sms) {  // not even one block per tile
      plan.reason = Decline::Occupancy;
      continue;
    }
    const int tile_rows = static_cast<int>((batch + tiles - 1) / tiles);
    const int per_tile = static_cast<int>(sms / tiles);
    // From 64 rows of W_hh per block (the forward product's 16 x 8 tiles then keep all 8 warps busy)
    // down to the fewest units that leave every tile its blocks: the most units that fit in shared
    // memory.
    const int fewest = round_up(static_cast<int>((hidden + per_tile - 1) / per_tile), grain);
    const int busy = std::max(fewest, round_up((64 + gates - 1) / gates, grain));
    for (int units = busy; units >= fewest; units -= grain) {
      const int blocks = static_cast<int>((hidden + units - 1) / units);
      const Plan candidate = try_plan(cell, dtype, hidden, tiles, tile_rows, blocks, units, Exchange::Grid, tf32, prop,
                                      spread_tiles(tiles, cap));
      if (candidate.ok) return candidate;
      if (candidate.reason == Decline::Occupancy) plan.reason = Decline::Occupancy;
    }
  }
  return plan;
}

// The plan `found` (every tile's cluster resident), its blocks each on an SM of its own (try_plan's
// own_sm) where the device still runs all its tiles at once. Where two blocks fit on an SM the
// scheduler may put two of a layer's blocks on one (of one cluster, or of two), and that SM then does
// its share of every step twice over while the rest of its cluster waits: a whole sequence at up to
// half speed. (Not seen in the step tracer's SM ids; but one H200 bench forward of B64 on four
// clusters of 16 rows took 2.0x the time of the same forward beside it: bench/NOTES.md.) A plan
// whose tiles do not all run at once keeps its layouts' shared memory.
Plan on_own_sms(const Plan& found, Cell cell, DType dtype, int64_t hidden, const cudaDeviceProp& prop) {
  const int64_t tiles = found.ok ? found.blocks / found.cluster : 0;
  if (!found.ok || tiles > found.resident_clusters) return found;
  const Plan own = try_plan(cell, dtype, hidden, tiles, found.tile_rows, found.cluster, found.units,
                            found.exchange, found.tf32, prop, true);
  return own.ok && tiles <= own.resident_clusters ? own : found;
}

// make_cluster_plan's search (tiles, cluster sizes, units), before on_own_sms.
Plan choose_cluster_plan(Cell cell, DType dtype, int64_t batch, int64_t hidden, const cudaDeviceProp* prop,
                         Exchange exchange, bool tf32, int max_cluster, int max_tile_rows) {
  Plan plan;
  const int first = first_tile_rows(dtype, tf32, max_tile_rows);
  if (exchange == Exchange::Grid) return plan_wide(cell, dtype, batch, hidden, tf32, first, *prop);
  // Tiles of at most `first` rows (first_tile_rows: 4 for the FMA products, 8 for 16-bit) where all their
  // clusters run at once (a second wave of clusters would double the whole sequence): on the largest
  // cluster that fits. Tiles below 16 rows only so: their point is less work per block on more SMs,
  // which a smaller cluster (more of W_hh per block) would take back. From 16 rows, where not all
  // are resident, (max_cluster 0) on smaller clusters, down to the largest with which every tile's
  // cluster is resident (each block then holds more of W_hh: as much work per block and step as a
  // larger tile's, and an exchange with fewer blocks); then tiles of up to 32 or 64 rows, the
  // smallest that makes every cluster resident (each cluster does more work per step), each on
  // clusters chosen the same way.
  const int largest = max_cluster > 0 ? max_cluster : kMaxClusterBlocks;
  for (int cap = first; cap <= kMaxTileRows; cap *= 2) {
    const int64_t tiles = (batch + cap - 1) / cap;
    const int rows = static_cast<int>((batch + tiles - 1) / tiles);
    Plan candidate = plan_for_tiles(cell, dtype, hidden, tiles, rows, exchange, tf32, largest, *prop,
                                    spread_tiles(tiles, cap));
    // (The answer where no tiles are all resident: 16-row tiles where they fit, as without `first`.)
    if (cap == first || (cap == kTileRows && candidate.ok)) plan = candidate;
    if (cap < kTileRows) {
      if (candidate.ok && tiles <= candidate.resident_clusters) return candidate;
      continue;  // (declined with one SM a block, or not all resident: as from 16 rows)
    }
    if (!candidate.ok) break;  // larger tiles need more shared memory still
    while (max_cluster == 0 && tiles > candidate.resident_clusters && candidate.cluster > 1) {
      const Plan smaller = plan_for_tiles(cell, dtype, hidden, tiles, rows, exchange, tf32, candidate.cluster / 2, *prop);
      if (!smaller.ok) break;
      candidate = smaller;
    }
    if (tiles <= candidate.resident_clusters) return candidate;
    if (tiles == 1) break;
  }
  return plan;
}

}  // namespace

Plan make_cluster_plan(Cell cell, DType dtype, int64_t batch, int64_t hidden, bool has_proj,
                       int device, Exchange exchange, bool tf32, int max_cluster, int max_tile_rows) {
  Plan plan;
  if (declines_layer(plan, has_proj, batch, hidden)) return plan;
  const cudaDeviceProp* prop = device_properties(device);
  if (prop == nullptr || prop->major < 9) {  // the kernels' bodies exist for sm_90 and newer only
    plan.reason = Decline::NoClusters;
    return plan;
  }
  tf32 = tf32 && dtype == DType::F32;
  return on_own_sms(choose_cluster_plan(cell, dtype, batch, hidden, prop, exchange, tf32, max_cluster, max_tile_rows),
                    cell, dtype, hidden, *prop);
}

namespace {

// Where "auto" runs the cluster kernels (bench/NOTES.md, H200 runs of 2026-11-26): wherever their plan
// accepts a float32 or 16-bit layer, they beat both the per-step and the grid-wide kernels (forward+
// backward, us per step: LSTM B=16 H=256 float16 10.3 against 36.6, float32 16.0 against 36.3; LSTM
// B=64 float32 18.4 against 42.7; GRU H=512 float16 17.8 against 41.9; RNN-tanh float32 11.2 against
// 23.7), provided every cluster runs at once: each cluster runs the whole sequence, so a second wave
// doubles it. float64 (a checking dtype) was not timed and keeps the grid-wide kernels' rule. Tiles
// of more than 16 rows are not taken: the wide kernels' 32-row tiles lost to the per-step kernels
// with norms recorded (H100, 2026-11-26: LSTM B=64 H=1024 float16 41.4 against 37.3 us per step;
// without norms they won, 34.6 against 36.1; to be revisited with the norm sums after the loop,
// bench/NOTES.md). Large batches on smaller clusters (16-row tiles, the same work per block and step
// as measured) are taken: LSTM B=256 H=256 float16 21.6 against torch.nn's 43.8. Exact float32 takes
// tiles of 4 rows, 16-bit ones of 8, where they all run at once (make_cluster_plan; measured against
// 8 and 16 rows, H200 2026-11-27: kFmaTileRows, kHalfTileRows).
// The exchange: st.async (Exchange::ClusterAsync) measured faster than the cluster barrier, or level
// (H100, 2026-11-26, us per step: LSTM B=16 H=256 float16 7.6 against 8.7, float32 12.9 against 14.0;
// RNN-tanh float32 8.7 against 9.9; GRU H=512 float16 13.0 against 14.8; B=256 21.6 against 22.1;
// GRU H=256 float16 8.4 against 8.2 and LSTM B=64 float16 9.2 against 9.1 are within noise).
// Layers too large for one cluster: the same kernels spread over up to every SM (Exchange::Grid,
// "wide"), with the same rule: LSTM B=16 H=768 float16 18.7 against the per-step 41.6, float32 35.8
// against 47.6; GRU B=16 H=512 float32 30.3 against 52.3.
// TF32 (Plan::tf32) where torch allows TF32 for float32 matmuls (torch.backends.cuda.matmul.
// allow_tf32, off by default: exact float32 otherwise), as the per-step path's cuBLAS GEMMs do:
// LSTM B=16 H=256 15.2 against 17.0 us per step (both on 16-row tiles, H100) -- except where exact
// float32 runs on tiles below 16 rows (exact_beats_tf32).
bool cluster_pays_off(DType dtype, const Plan& plan) {
  return plan.ok && dtype != DType::F64 && plan.blocks / plan.cluster <= plan.resident_clusters &&
         plan.tile_rows <= 16;
}

// Exact float32 on tiles below 16 rows (small batches spread over more clusters) beat TF32's 16-row
// tiles (H200, 2026-11-27, B=16 H=256, us per step forward+backward with norms: LSTM 9.1 against
// 12.1, GRU 8.0 against 10.8, RNN-tanh 6.3 against 7.7): TF32 is allowed, not asked for, so auto
// then takes the exact products, faster and more exact.
bool exact_beats_tf32(const Plan& exact) {
  return cluster_pays_off(DType::F32, exact) && exact.tile_rows < 16;
}

}  // namespace

// The plan "auto" takes on the kernels on clusters (cluster_pays_off): cluster-async where W_hh fits
// in one cluster, else wide; with TF32 allowed, exact float32 first where its tiles are below 16 rows
// (exact_beats_tf32). Not ok where neither pays off (auto then goes on to the grid-wide kernel or the
// per-step path, layer_cuda.cpp).
Plan auto_cluster_plan(Cell cell, DType dtype, int64_t batch, int64_t hidden, bool has_proj, int device,
                       bool tf32, int max_cluster, int max_tile_rows) {
  Plan declined;
  for (const Exchange exchange : {Exchange::ClusterAsync, Exchange::Grid}) {
    if (tf32 && dtype == DType::F32) {
      const Plan exact = make_cluster_plan(cell, dtype, batch, hidden, has_proj, device, exchange, false,
                                           max_cluster, max_tile_rows);
      if (exact_beats_tf32(exact)) return exact;
    }
    const Plan plan = make_cluster_plan(cell, dtype, batch, hidden, has_proj, device, exchange, tf32,
                                        max_cluster, max_tile_rows);
    if (cluster_pays_off(dtype, plan)) return plan;
    declined = plan;
  }
  declined.ok = false;  // (a plan that fits but does not pay off)
  return declined;
}

namespace detail {

#ifdef RNNKERN_STEP_TRACE
cudaError_t set_step_trace(unsigned long long* buffer) {
  cudaError_t err = set_cluster_step_trace<Cell::LSTM>(buffer);
  if (err == cudaSuccess) err = set_cluster_step_trace<Cell::GRU>(buffer);
  if (err == cudaSuccess) err = set_cluster_step_trace<Cell::RNN_TANH>(buffer);
  if (err == cudaSuccess) err = set_cluster_step_trace<Cell::RNN_RELU>(buffer);
  return err;
}
#endif

size_t cluster_scratch_elements(const Plan& plan, int64_t rows, bool record_norms) {
  const int tiles = plan.blocks / plan.cluster;
  const size_t grid = plan.exchange == Exchange::Grid
                          ? grid_scratch(tiles, plan.cluster, plan.tile_rows, plan.units).elements : 0;
  // (the most slots a launch uses: it takes one where hidden is not a multiple of units)
  const size_t slots = static_cast<size_t>(plan.cluster) * norm_slots(plan.units);
  return grid + (record_norms ? static_cast<size_t>(rows) * 2 * slots : 0);
}

}  // namespace detail

size_t exchange_words(const Plan& plan, DType dtype, int64_t batch, int64_t hidden) {
  if (plan.cluster == 0 || plan.exchange != Exchange::Grid) return 0;
  return static_cast<size_t>(2) * batch * hidden * (storage_size(dtype) / 2);  // (kTaggedWords)
}

namespace detail {

cudaError_t cluster_forward(const Plan& plan, const ForwardArgs& args, cudaStream_t stream) {
  return launch(true, plan, args, stream);
}

cudaError_t cluster_backward(const Plan& plan, const BackwardArgs& args, cudaStream_t stream) {
  return launch(false, plan, args, stream);
}

}  // namespace detail
}  // namespace persistent
}  // namespace rnnkern
