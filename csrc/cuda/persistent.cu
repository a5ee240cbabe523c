// Persistent recurrence kernels: see persistent.h. No ATen here (compile time).
//
// Work split: block j owns hidden units [j*U, j*U + U) and all batch rows. Forward step: every block
// reads h_{t-1} (all units, from L2), multiplies it by its resident W_hh rows (all G gates of its
// units), applies the gate math and writes its units of h_t; then one grid barrier. Backward step:
//   A. g = grad_out + dh_next (or grad_h_n at a sample's last step) for own units; per-row partial
//      Σ g² per block -> scratch;                                             grid barrier
//   B. every block sums the partials in block order (deterministic, identical in all blocks) ->
//      ‖g‖, clips, gate gradients for own units -> dgates rows (global);      grid barrier
//   C. dh_prev = dgates_h @ W_hh for own units (W_hh columns resident) -> kept in shared memory as
//      the next step's dh_next, or written to grad_h0 where a sample starts.
// ‖dc_t‖ (LSTM) is reduced one step later from double-buffered partials (it is recorded, never used
// for clipping, so it needs no barrier of its own).
#include "persistent.h"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>

#include "persistent_common.cuh"
#include "rnnkern/cell_math.h"

namespace cg = cooperative_groups;

namespace rnnkern {
namespace persistent {
namespace {

using namespace detail;

// The operand rows of a step (h_{t-1} forward, dgates backward) are staged in shared memory in tiles
// of `chunk` columns: the whole block loads a [rows x chunk] tile at once (many loads in flight),
// then the dot products run out of shared memory. Each tile costs one L2 round trip and two block
// barriers, so the plan makes `chunk` as wide as shared memory allows: the whole row where it fits
// (v2 used 64-column tiles: 16 to 48 round trips per step at H = 256..768, bench/NOTES.md).
constexpr int kChunkAlign = 32;

template <Cell C, typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(ForwardArgs a, int units, int chunk) {
  using A = typename AccOf<T>::type;
  constexpr int G = kGates<C>;
  constexpr int S = kSlots<C>;
  RNNKERN_DYNAMIC_SHARED(smem_raw);
  const int H = static_cast<int>(a.hidden);
  A* w = reinterpret_cast<A*>(smem_raw);  // [G][units][H + 1] (padded: no bank conflicts)
  A* stage = w + G * units * (H + 1);     // [B][chunk + 1]: a tile of h_{t-1} rows
  const int GH = G * H;
  const int u0 = blockIdx.x * units;
  const int nu = min(units, H - u0);
  const auto [w_hh, xp, b_hh, h0, c0, out, ws, h_n, c_n] = typed<T, A>(a);
  const Geometry geo{a.sizes, a.offsets, a.steps, a.reverse};

  for (int i = threadIdx.x; i < G * nu * H; i += kThreads) {
    const int k = i % H, r = i / H, ul = r % nu, g = r / nu;
    w[(g * units + ul) * (H + 1) + k] = load(w_hh + static_cast<int64_t>(g * H + u0 + ul) * H + k);
  }
  __syncthreads();
  cg::grid_group grid = cg::this_grid();

  for (int64_t s = 0; s < a.steps; ++s) {
    const auto [row0, prev_row0, bs, n_prev, n_next] = tile_step(geo, geo.t_of(s), 0, static_cast<int>(a.batch));
    const int pairs = bs * nu;
    const int lanes = lanes_per_pair(pairs);
    const int groups = kThreads / lanes;
    const int lane = threadIdx.x % lanes;
    for (int base = 0; base < pairs; base += groups) {  // uniform trip count: shuffles stay safe
      const int pair = base + threadIdx.x / lanes;
      const bool valid = pair < pairs;
      const int b = valid ? pair / nu : 0;
      const int ul = valid ? pair % nu : 0;
      const bool from_out = b < n_prev;
      const T* h_row = from_out ? out + (prev_row0 + b) * H : h0 + static_cast<int64_t>(b) * H;
      A acc[G], xv[G];  // h_{t-1} W_hhᵀ; x_t's projection (loaded by lane 0 after the dot products)
#pragma unroll
      for (int g = 0; g < G; ++g) acc[g] = xv[g] = A(0);
      for (int k0 = 0; k0 < H; k0 += chunk) {
        // One tile covering the whole row is staged once per step, not once per pass over the pairs.
        if (base == 0 || chunk < H) {
          __syncthreads();  // the previous tile is consumed
#pragma unroll 4
          for (int i = threadIdx.x; i < bs * chunk; i += kThreads) {
            const int sb = i / chunk, kk = i % chunk, k = k0 + kk;
            A v = A(0);
            if (k < H) {
              v = sb < n_prev ? load_cg(out + (prev_row0 + sb) * H + k)
                              : A(load(h0 + static_cast<int64_t>(sb) * H + k));
            }
            stage[sb * (chunk + 1) + kk] = v;
          }
          __syncthreads();
        }
        if (valid) {
          const int k_end = min(chunk, H - k0);
          for (int kk = lane; kk < k_end; kk += lanes) {
            const A hv = stage[b * (chunk + 1) + kk];
#pragma unroll
            for (int g = 0; g < G; ++g) acc[g] += hv * w[(g * units + ul) * (H + 1) + k0 + kk];
          }
        }
      }
      group_sum_each(acc, lanes);
      if (!valid || lane != 0) continue;
      const int u = u0 + ul;
      const int64_t row = row0 + b;
      const T* x = xp + row * GH;
      A pre[G];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        pre[g] = acc[g] + (b_hh ? A(load(b_hh + g * H + u)) : A(0));
        xv[g] = A(load(x + g * H + u));
      }
      const bool last = b >= n_next;  // the sample ends here: h_n
      A prev = A(0), c = A(0);  // c_{t-1} (LSTM) or h_{t-1} (GRU); c_t
      if constexpr (C == Cell::LSTM) {
        prev = !from_out ? A(load(c0 + static_cast<int64_t>(b) * H + u))
                         : load_cg(ws + (prev_row0 + b) * S * H + 4 * H + u);
      } else if constexpr (C == Cell::GRU) {
        prev = !from_out ? A(load(h_row + u)) : load_cg(h_row + u);
      }
      const A h = forward_unit<C, A>(xv, pre, prev, ws + row * S * H, H, u, c);
      if constexpr (C == Cell::LSTM) {
        if (last) store(c_n + static_cast<int64_t>(b) * H + u, c);
      }
      store(out + row * H + u, h);
      if (last) store(h_n + static_cast<int64_t>(b) * H + u, h);
    }
    grid.sync();
  }
}

template <Cell C, typename T>
__global__ void __launch_bounds__(kThreads) backward_kernel(BackwardArgs a, int units, int chunk) {
  using A = typename AccOf<T>::type;
  constexpr int G = kGates<C>;
  constexpr int S = kSlots<C>;
  const int H = static_cast<int>(a.hidden);
  const int GH = G * H;
  const int B = static_cast<int>(a.batch);
  const int u0 = blockIdx.x * units;
  const int nu = min(units, H - u0);
  const int blocks = gridDim.x;
  RNNKERN_DYNAMIC_SHARED(smem_raw);
  A* wt = reinterpret_cast<A*>(smem_raw);  // [units][G*H + 1]: W_hh columns of own units
  A* dh_next = wt + units * (GH + 1);           // [B][units]
  A* dc_next = dh_next + B * units;        // [B][units] (LSTM)
  A* gbuf = dc_next + B * units;           // [B][units]: g before clipping, then dc_t
  A* direct = gbuf + B * units;            // [B][units]: GRU z ⊙ g
  A* row_scale = direct + B * units;       // [B] each row's clipping scale
  A* stage = row_scale + B;                // [B][chunk + 1]: a tile of dgates rows
  double* partial = static_cast<double*>(a.scratch);  // [2 parity][2 (g, c)][blocks][B]: Σ squares
  const BackwardPointers<T, A> ptrs = typed<C, T, A>(a);
  const auto& [w_hh, grad_out, grad_h_n, grad_c_n, h0, c0, out, ws, dgates_x, dgates_h, grad_h0, grad_c0] = ptrs;
  const Geometry geo{a.sizes, a.offsets, a.steps, a.reverse};

  for (int i = threadIdx.x; i < nu * GH; i += kThreads) {
    const int gh = i % GH, ul = i / GH;
    wt[ul * (GH + 1) + gh] = load(w_hh + static_cast<int64_t>(gh) * H + u0 + ul);
  }
  for (int i = threadIdx.x; i < 4 * B * units; i += kThreads) dh_next[i] = A(0);
  __syncthreads();
  cg::grid_group grid = cg::this_grid();

  // Block 0 turns the dc partials of a processed step into ‖dc_t‖ rows.
  auto reduce_dc = [&](int64_t t, int parity) {
    if (C != Cell::LSTM || a.norm_c == nullptr || blockIdx.x != 0) return;
    const int bs = static_cast<int>(a.sizes[t]);
    for (int b = threadIdx.x; b < bs; b += kThreads) {
      double sum = 0.0;
      for (int blk = 0; blk < blocks; ++blk) sum += load_cg(partial + ((parity * 2 + 1) * blocks + blk) * B + b);
      a.norm_c[a.offsets[t] + b] = static_cast<float>(sqrt(sum));
    }
  };

  int64_t t_before = -1;  // the previously processed backward step
  for (int64_t s = 0; s < a.steps; ++s) {
    const int64_t t = geo.t_of(a.steps - 1 - s);  // reverse of the forward order
    const int parity = static_cast<int>(s & 1);
    const auto [row0, prev_row0, bs, n_prev, n_next] = tile_step(geo, t, 0, B);
    const int pairs = bs * nu;

    // A: assemble g for own units; partial Σ g² per row.
    for (int pair = threadIdx.x; pair < pairs; pair += kThreads) {
      const int b = pair / nu, ul = pair % nu, u = u0 + ul;
      const A incoming = b < n_next ? dh_next[b * units + ul]
                                    : A(load(grad_h_n + static_cast<int64_t>(b) * H + u));
      gbuf[b * units + ul] = A(load(grad_out + (row0 + b) * H + u)) + incoming;
    }
    __syncthreads();
    for (int b = threadIdx.x; b < bs; b += kThreads) {
      double sum = 0.0;
      for (int ul = 0; ul < nu; ++ul) sum += cuda::square(gbuf[b * units + ul]);
      partial[((parity * 2) * blocks + blockIdx.x) * B + b] = sum;
    }
    grid.sync();

    // B: the full norms (same order in every block), clip, gate gradients.
    for (int b = threadIdx.x; b < bs; b += kThreads) {
      double sum = 0.0;
      for (int blk = 0; blk < blocks; ++blk) sum += load_cg(partial + ((parity * 2) * blocks + blk) * B + b);
      const double norm = sqrt(sum);
      row_scale[b] = clip_scale_of<A>(norm, a.clip);
      if (blockIdx.x == 0 && a.norm_g != nullptr) a.norm_g[row0 + b] = static_cast<float>(norm);
    }
    if (t_before >= 0) reduce_dc(t_before, parity ^ 1);
    __syncthreads();
    for (int pair = threadIdx.x; pair < pairs; pair += kThreads) {
      const int b = pair / nu, ul = pair % nu, u = u0 + ul;
      const int64_t row = row0 + b;
      const A dh = gbuf[b * units + ul] * row_scale[b];
      const bool starts = b >= n_prev;  // the sample's first step: gradients go to h0/c0
      A prev, h;
      backward_unit_state<C, T, A>(ptrs, b, row, prev_row0 + b, starts, H, u, prev, h);
      const A dc_in = incoming_dc<C>(ptrs, b, b < n_next, dc_next + b * units + ul, H, u);
      A dg[G], dc_total, dc_prev, dh_direct;
      backward_unit<C, T, A>(dh, dc_in, ws + row * S * H + u, H, prev, h, H, u, dgates_x + row * GH,
                             dgates_h + row * GH, dg, dc_total, dc_prev, dh_direct);
      if constexpr (C == Cell::LSTM) {
        gbuf[b * units + ul] = dc_total;  // g is no longer needed: reuse for the dc partial
        if (starts) {
          if (grad_c0) store(grad_c0 + static_cast<int64_t>(b) * H + u, dc_prev);
        } else {
          dc_next[b * units + ul] = dc_prev;
        }
      } else if constexpr (C == Cell::GRU) {
        direct[b * units + ul] = dh_direct;
      }
    }
    if constexpr (C == Cell::LSTM) {
      __syncthreads();
      for (int b = threadIdx.x; b < bs; b += kThreads) {
        double sum = 0.0;
        for (int ul = 0; ul < nu; ++ul) sum += cuda::square(gbuf[b * units + ul]);
        partial[((parity * 2 + 1) * blocks + blockIdx.x) * B + b] = sum;
      }
    }
    grid.sync();

    // C: dh_prev = dgates_h @ W_hh for own units.
    const int lanes = lanes_per_pair(pairs);
    const int groups = kThreads / lanes;
    const int lane = threadIdx.x % lanes;
    for (int base = 0; base < pairs; base += groups) {
      const int pair = base + threadIdx.x / lanes;
      const bool valid = pair < pairs;
      const int b = valid ? pair / nu : 0;
      const int ul = valid ? pair % nu : 0;
      A acc = A(0);
      const A* wc = wt + ul * (GH + 1);
      for (int k0 = 0; k0 < GH; k0 += chunk) {
        if (base == 0 || chunk < GH) {  // a whole-row tile: staged once per step
          __syncthreads();  // the previous tile is consumed
#pragma unroll 4
          for (int i = threadIdx.x; i < bs * chunk; i += kThreads) {
            const int sb = i / chunk, kk = i % chunk, k = k0 + kk;
            stage[sb * (chunk + 1) + kk] = k < GH ? load_cg(dgates_h + (row0 + sb) * GH + k) : A(0);
          }
          __syncthreads();
        }
        if (valid) {
          const int k_end = min(chunk, GH - k0);
          for (int kk = lane; kk < k_end; kk += lanes) acc += stage[b * (chunk + 1) + kk] * wc[k0 + kk];
        }
      }
      acc = group_sum(acc, lanes);
      if (!valid || lane != 0) continue;
      if constexpr (C == Cell::GRU) acc += direct[b * units + ul];
      if (b < n_prev) {
        dh_next[b * units + ul] = acc;
      } else {
        store(grad_h0 + static_cast<int64_t>(b) * H + u0 + ul, acc);
      }
    }
    __syncthreads();
    t_before = t;
  }
  if (C == Cell::LSTM && a.norm_c != nullptr && a.steps > 0) {
    grid.sync();
    reduce_dc(t_before, static_cast<int>((a.steps - 1) & 1));
  }
}

template <typename T>
using ForwardKernel = void (*)(ForwardArgs, int, int);
template <typename T>
using BackwardKernel = void (*)(BackwardArgs, int, int);

template <typename T>
ForwardKernel<T> forward_for(Cell cell) {
  switch (cell) {
    case Cell::LSTM: return forward_kernel<Cell::LSTM, T>;
    case Cell::GRU: return forward_kernel<Cell::GRU, T>;
    case Cell::RNN_TANH: return forward_kernel<Cell::RNN_TANH, T>;
    default: return forward_kernel<Cell::RNN_RELU, T>;
  }
}

template <typename T>
BackwardKernel<T> backward_for(Cell cell) {
  switch (cell) {
    case Cell::LSTM: return backward_kernel<Cell::LSTM, T>;
    case Cell::GRU: return backward_kernel<Cell::GRU, T>;
    case Cell::RNN_TANH: return backward_kernel<Cell::RNN_TANH, T>;
    default: return backward_kernel<Cell::RNN_RELU, T>;
  }
}

template <typename Args>
cudaError_t launch(const void* kernel, const Plan& plan, size_t smem, int chunk, Args args,
                   cudaStream_t stream) {
  const std::lock_guard<std::mutex> lock(kernel_attribute_mutex());
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  int units = plan.units;
  void* params[] = {&args, &units, &chunk};
  return cudaLaunchCooperativeKernel(kernel, dim3(plan.blocks), dim3(plan.threads), params, smem,
                                     stream);
}

template <typename T>
const void* forward_kernel_ptr(Cell cell) { return reinterpret_cast<const void*>(forward_for<T>(cell)); }
template <typename T>
const void* backward_kernel_ptr(Cell cell) { return reinterpret_cast<const void*>(backward_for<T>(cell)); }

const void* forward_ptr(Cell cell, DType dtype) {
  switch (dtype) {
    case DType::F32: return forward_kernel_ptr<float>(cell);
    case DType::F64: return forward_kernel_ptr<double>(cell);
    case DType::F16: return forward_kernel_ptr<__half>(cell);
    default: return forward_kernel_ptr<__nv_bfloat16>(cell);
  }
}

const void* backward_ptr(Cell cell, DType dtype) {
  switch (dtype) {
    case DType::F32: return backward_kernel_ptr<float>(cell);
    case DType::F64: return backward_kernel_ptr<double>(cell);
    case DType::F16: return backward_kernel_ptr<__half>(cell);
    default: return backward_kernel_ptr<__nv_bfloat16>(cell);
  }
}

}  // namespace

namespace detail {

// cudaGetDeviceProperties is slow (milliseconds): read each device once.
const cudaDeviceProp* device_properties(int device) {
  static std::mutex mutex;
  static std::map<int, std::unique_ptr<cudaDeviceProp>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it == cache.end()) {
    auto prop = std::make_unique<cudaDeviceProp>();
    if (cudaGetDeviceProperties(prop.get(), device) != cudaSuccess) {
      cudaGetLastError();
      prop.reset();
    }
    it = cache.emplace(device, std::move(prop)).first;
  }
  return it->second.get();
}

}  // namespace detail

Plan make_plan(Cell cell, DType dtype, int64_t batch, int64_t hidden, bool has_proj, int device) {
  Plan plan;
  if (declines_layer(plan, has_proj, batch, hidden)) return plan;
  const cudaDeviceProp* found = device_properties(device);
  if (found == nullptr || !found->cooperativeLaunch) {
    plan.reason = Decline::NoCooperativeLaunch;
    return plan;
  }
  const cudaDeviceProp& prop = *found;
  const int sms = prop.multiProcessorCount;
  const int units = static_cast<int>((hidden + sms - 1) / sms);
  const int blocks = static_cast<int>((hidden + units - 1) / units);
  const size_t acc = acc_size(dtype);
  const size_t gates = static_cast<size_t>(cell_gates(cell));
  const size_t limit = prop.sharedMemPerBlockOptin;
  // Resident weights and per-row state first; the rest of shared memory stages operand tiles.
  // Forward: W_hh rows [G][units][H + 1]. Backward: W_hh columns [units][G*H + 1], four [B][units]
  // state arrays and the row norms [B].
  const size_t fixed_forward = gates * units * (hidden + 1) * acc;
  const size_t fixed_backward =
      (static_cast<size_t>(units) * (gates * hidden + 1) + 4 * batch * units + batch) * acc;
  auto widest_chunk = [&](size_t fixed, int64_t columns) -> int {
    if (fixed >= limit) return 0;
    const int64_t fit = static_cast<int64_t>((limit - fixed) / (batch * acc)) - 1;
    const int64_t whole = (columns + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
    return static_cast<int>(std::min(whole, fit / kChunkAlign * kChunkAlign));
  };
  plan.chunk_forward = widest_chunk(fixed_forward, hidden);
  plan.chunk_backward = widest_chunk(fixed_backward, gates * hidden);
  if (plan.chunk_forward < kChunkAlign || plan.chunk_backward < kChunkAlign) {
    plan.reason = Decline::SharedMemory;
    return plan;
  }
  plan.smem_forward = fixed_forward + static_cast<size_t>(batch) * (plan.chunk_forward + 1) * acc;
  plan.smem_backward = fixed_backward + static_cast<size_t>(batch) * (plan.chunk_backward + 1) * acc;
  const std::lock_guard<std::mutex> lock(kernel_attribute_mutex());
  for (int pass = 0; pass < 2; ++pass) {
    const void* kernel = pass == 0 ? forward_ptr(cell, dtype) : backward_ptr(cell, dtype);
    const size_t smem = pass == 0 ? plan.smem_forward : plan.smem_backward;
    int per_sm = 0;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem) != cudaSuccess ||
        per_sm * sms < blocks) {
      cudaGetLastError();
      plan.reason = Decline::Occupancy;
      return plan;
    }
  }
  plan.ok = true;
  plan.blocks = blocks;
  plan.units = units;
  plan.threads = kThreads;
  return plan;
}

size_t scratch_elements(const Plan& plan, int64_t batch, int64_t rows, bool record_norms) {
  if (plan.cluster > 0) return cluster_scratch_elements(plan, rows, record_norms);
  return static_cast<size_t>(4) * plan.blocks * batch;
}

cudaError_t forward(const Plan& plan, const ForwardArgs& args, cudaStream_t stream) {
  if (args.steps == 0 || args.batch == 0) return cudaSuccess;
  if (plan.cluster > 0) return cluster_forward(plan, args, stream);
  return launch(forward_ptr(args.cell, args.dtype), plan, plan.smem_forward,
                plan.chunk_forward, args, stream);
}

cudaError_t backward(const Plan& plan, const BackwardArgs& args, cudaStream_t stream) {
  if (args.steps == 0 || args.batch == 0) return cudaSuccess;
  if (plan.cluster > 0) return cluster_backward(plan, args, stream);
  return launch(backward_ptr(args.cell, args.dtype), plan, plan.smem_backward,
                plan.chunk_backward, args, stream);
}

}  // namespace persistent
}  // namespace rnnkern
