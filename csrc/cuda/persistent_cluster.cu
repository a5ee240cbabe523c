// Persistent recurrence on thread-block clusters (issue 9; sm_90 and newer), selected with
// RNNKERN_CUDA_KERNEL=cluster; see persistent.h.
//
// Where a layer's W_hh fits in the shared memory of one cluster (up to 16 blocks on Hopper), each
// cluster runs the whole time loop of a tile of batch rows. Its blocks split the hidden units as the
// grid-wide kernels do (block r owns units [r*U, r*U + U) and keeps those units' rows of W_hh,
// all G gates, in shared memory), but what the blocks exchange each step goes straight into the other
// blocks' shared memory (distributed shared memory), and the step barrier is the cluster's hardware
// barrier: no global-memory round trip and no grid-wide barrier on the recurrence's critical path.
// Clusters share nothing (each owns its batch rows), so they need no co-residency.
//
// Forward step s: h_{t-1} of the tile is in stage[s % 2] (all H columns, as stored: type T); each
// block multiplies it by its W_hh rows, applies the gate math for its units, writes h_t to `out`
// (global) and into stage[(s + 1) % 2] of every block of the cluster; one cluster barrier.
//
// Backward step (reverse order), with the same W_hh rows:
//   A. g = grad_out + dh_next for own units; Σ g² over own units per row -> part_g[r] of every
//      block;                                                                      cluster barrier
//   B. ‖g‖ per row (the partials summed in rank order: the same bits in every block), clipping, the
//      gate gradients of own units -> dgates rows (global, for the weight GEMMs) and `dgate` (local);
//      LSTM: Σ dc² over own units -> part_c[r] of block 0;
//   C. this block's share of dh_prev = dgates @ W_hh: the product of its own gate columns with its
//      W_hh rows, a partial sum for ALL H units, each sent to the unit's owner (inbox[r]): a
//      reduce-scatter of B×H values per block instead of gathering all B×G×H gate gradients;
//                                                                                  cluster barrier
//   D. dh_prev of own units = Σ_r inbox[r] in rank order (+ GRU's direct term) -> dh_next, or
//      grad_h0 where a sample starts; block 0 turns part_c into ‖dc_t‖.
// Each exchanged buffer is written only in the phase after the barrier that ends its readers'
// phase, so none needs double-buffering except the forward's stage.
#include <cooperative_groups.h>

#include <algorithm>

#include "persistent_common.cuh"
#include "rnnkern/cell_math.h"

namespace cg = cooperative_groups;

namespace rnnkern {
namespace persistent {
namespace {

using namespace detail;

// Row padding of the shared-memory W_hh and state tables, in elements of T: 4 bytes, so that lane
// groups reading different rows at the same column hit different banks.
template <typename T>
constexpr int kPad = sizeof(T) >= 4 ? 1 : 4 / static_cast<int>(sizeof(T));

constexpr int kMaxClusterBlocks = 16;  // Hopper's limit (above 8 with the non-portable attribute)
constexpr int kTileRows = 16;          // batch rows per cluster where the batch allows

struct ClusterShape {
  int units;      // hidden units per block
  int tile_rows;  // batch rows per cluster
};

// Rows of a cluster's tile [tile0, tile0 + rows) below n.
__device__ __forceinline__ int rows_below(int64_t n, int tile0, int rows) {
  const int64_t v = n - tile0;
  return static_cast<int>(v < 0 ? 0 : (v > rows ? rows : v));
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define RNNKERN_HAS_CLUSTERS 1
#endif

template <Cell C, typename T>
__global__ void __launch_bounds__(kThreads) cluster_forward_kernel(ForwardArgs a, ClusterShape shape) {
#ifndef RNNKERN_HAS_CLUSTERS
  __trap();  // make_cluster_plan declines devices below sm_90: never launched there
#else
  using A = typename AccOf<T>::type;
  constexpr int G = kGates<C>;
  constexpr int S = kSlots<C>;
  cg::cluster_group cluster = cg::this_cluster();
  const int blocks = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int H = static_cast<int>(a.hidden);
  const int GH = G * H;
  const int LD = H + kPad<T>;
  const int U = shape.units, Bt = shape.tile_rows;
  const int u0 = rank * U;
  const int nu = max(0, min(U, H - u0));
  const int tile0 = static_cast<int>(blockIdx.x) / blocks * Bt;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* bias = reinterpret_cast<A*>(smem_raw);   // [G][U]: b_hh of own units
  A* own_c = bias + G * U;                    // [Bt][U]: LSTM c_{t-1} of own units
  T* w = reinterpret_cast<T*>(own_c + Bt * U);  // [G][U][LD]: own units' rows of W_hh
  T* stage = w + G * U * LD;                  // [2][Bt][LD]: h_{t-1} of the tile, by step parity
  const T* w_hh = static_cast<const T*>(a.w_hh);
  const T* xp = static_cast<const T*>(a.xp);
  const T* b_hh = static_cast<const T*>(a.b_hh);
  const T* h0 = static_cast<const T*>(a.h0);
  const T* c0 = static_cast<const T*>(a.c0);
  T* out = static_cast<T*>(a.out);
  A* ws = static_cast<A*>(a.ws);
  T* h_n = static_cast<T*>(a.h_n);
  T* c_n = static_cast<T*>(a.c_n);
  const Geometry geo{a.sizes, a.offsets, a.steps, a.reverse};

  for (int i = threadIdx.x; i < G * nu * H; i += kThreads) {
    const int k = i % H, r = i / H, ul = r % nu, g = r / nu;
    w[(g * U + ul) * LD + k] = w_hh[static_cast<int64_t>(g * H + u0 + ul) * H + k];
  }
  for (int i = threadIdx.x; i < G * nu; i += kThreads) {
    const int g = i / nu, ul = i % nu;
    bias[g * U + ul] = b_hh ? A(load(b_hh + g * H + u0 + ul)) : A(0);
  }
  cluster.sync();  // every block runs (and has its tables) before any block writes into it

  for (int64_t s = 0; s < a.steps; ++s) {
    const int64_t t = geo.t_of(s);
    const int64_t row0 = a.offsets[t] + tile0;  // global row of the tile's first sample
    const int rows = rows_below(a.sizes[t], tile0, Bt);
    const int rows_prev = rows_below(geo.n_prev(t), tile0, Bt);  // rows continuing from the last step
    const int rows_next = rows_below(geo.n_next(t), tile0, Bt);  // rows continuing into the next
    T* cur = stage + (s & 1) * Bt * LD;
    T* nxt = stage + ((s + 1) & 1) * Bt * LD;
    for (int i = threadIdx.x; i < (rows - rows_prev) * H; i += kThreads) {  // samples starting here
      const int b = rows_prev + i / H, k = i % H;
      cur[b * LD + k] = h0[static_cast<int64_t>(tile0 + b) * H + k];
    }
    __syncthreads();
    const int pairs = rows * nu;
    const int lanes = lanes_per_pair(pairs);
    const int groups = kThreads / lanes;
    const int lane = threadIdx.x % lanes;
    const int leader = (threadIdx.x % 32) & ~(lanes - 1);  // the group's lane 0, within the warp
    for (int base = 0; base < pairs; base += groups) {  // uniform trip count: shuffles stay safe
      const int pair = base + threadIdx.x / lanes;
      const bool valid = pair < pairs;
      const int b = valid ? pair / nu : 0;
      const int ul = valid ? pair % nu : 0;
      const int u = u0 + ul;
      const int64_t row = row0 + b;
      const T* x = xp + row * GH + u;
      A acc[G];
      A xv[G];  // x_t's projection, loaded before the dot products (its latency hidden by them)
#pragma unroll
      for (int g = 0; g < G; ++g) {
        acc[g] = A(0);
        xv[g] = (valid && lane == 0) ? A(load(x + g * H)) : A(0);
      }
      if (valid) {
        const T* h_row = cur + b * LD;
        for (int k = lane; k < H; k += lanes) {
          const A hv = A(load(h_row + k));
#pragma unroll
          for (int g = 0; g < G; ++g) acc[g] += hv * A(load(w + (g * U + ul) * LD + k));
        }
      }
#pragma unroll
      for (int g = 0; g < G; ++g) acc[g] = group_sum(acc[g], lanes);
      A h = A(0);
      if (valid && lane == 0) {
        A hp[G];  // h_{t-1} W_hhᵀ + b_hh
#pragma unroll
        for (int g = 0; g < G; ++g) hp[g] = acc[g] + bias[g * U + ul];
        const bool last = b >= rows_next;  // the sample ends here: h_n (and c_n)
        if constexpr (C == Cell::LSTM) {
          const A c_prev = b < rows_prev ? own_c[b * U + ul]
                                         : A(load(c0 + static_cast<int64_t>(tile0 + b) * H + u));
          LstmGates<A> gates;
          A c;
          lstm_forward_unit<A>(xv[0] + hp[0], xv[1] + hp[1], xv[2] + hp[2], xv[3] + hp[3], c_prev,
                               gates, c, h);
          own_c[b * U + ul] = c;
          A* wr = ws + row * S * H;
          wr[u] = gates.i;
          wr[H + u] = gates.f;
          wr[2 * H + u] = gates.g;
          wr[3 * H + u] = gates.o;
          wr[4 * H + u] = c;
          if (last) store(c_n + static_cast<int64_t>(tile0 + b) * H + u, c);
        } else if constexpr (C == Cell::GRU) {
          // Xp and Hp enter the GRU separately (b_hn stays inside r ⊙ (...)).
          GruGates<A> gates;
          gru_forward_unit<A>(xv[0], xv[1], xv[2], hp[0], hp[1], hp[2], A(load(cur + b * LD + u)),
                              gates, h);
          A* wr = ws + row * S * H;
          wr[u] = gates.r;
          wr[H + u] = gates.z;
          wr[2 * H + u] = gates.n;
          wr[3 * H + u] = hp[2];
        } else {
          h = rnn_forward_unit<C == Cell::RNN_RELU, A>(xv[0] + hp[0]);
        }
        store(out + row * H + u, h);
        if (last) store(h_n + static_cast<int64_t>(tile0 + b) * H + u, h);
      }
      // h_t into every block's next stage, as stored (T); the group's lanes share the stores.
      h = __shfl_sync(0xffffffffu, h, leader);
      if (valid && s + 1 < a.steps) {
        T stored;
        store(&stored, h);
        for (int r = lane; r < blocks; r += lanes) *cluster.map_shared_rank(nxt + b * LD + u, r) = stored;
      }
    }
    cluster.sync();
  }
#endif
}

template <Cell C, typename T>
__global__ void __launch_bounds__(kThreads) cluster_backward_kernel(BackwardArgs a, ClusterShape shape) {
#ifndef RNNKERN_HAS_CLUSTERS
  __trap();  // make_cluster_plan declines devices below sm_90: never launched there
#else
  using A = typename AccOf<T>::type;
  constexpr int G = kGates<C>;
  constexpr int S = kSlots<C>;
  cg::cluster_group cluster = cg::this_cluster();
  const int blocks = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int H = static_cast<int>(a.hidden);
  const int GH = G * H;
  const int LD = H + kPad<T>;
  const int U = shape.units, Bt = shape.tile_rows;
  const int u0 = rank * U;
  const int nu = max(0, min(U, H - u0));
  const int tile0 = static_cast<int>(blockIdx.x) / blocks * Bt;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  double* part_g = reinterpret_cast<double*>(smem_raw);  // [blocks][Bt]: Σ g² over each block's units
  double* part_c = part_g + blocks * Bt;                 // [blocks][Bt]: Σ dc² (block 0 reads them)
  A* row_norm = reinterpret_cast<A*>(part_c + blocks * Bt);  // [Bt]
  A* dh_next = row_norm + Bt;          // [Bt][U]: dh_prev of the step processed before, own units
  A* dc_next = dh_next + Bt * U;       // [Bt][U] (LSTM)
  A* gbuf = dc_next + Bt * U;          // [Bt][U]: g before clipping, then dc_t (LSTM)
  A* direct = gbuf + Bt * U;           // [Bt][U]: GRU z ⊙ g
  A* dgate = direct + Bt * U;          // [Bt][G][U]: own gate gradients (the dh product's operand)
  A* inbox = dgate + Bt * G * U;       // [blocks][Bt][U]: each block's share of own units' dh_prev
  T* w = reinterpret_cast<T*>(inbox + blocks * Bt * U);  // [G][U][LD]: own units' rows of W_hh
  const T* w_hh = static_cast<const T*>(a.w_hh);
  const T* grad_out = static_cast<const T*>(a.grad_out);
  const T* grad_h_n = static_cast<const T*>(a.grad_h_n);
  const T* grad_c_n = static_cast<const T*>(a.grad_c_n);
  const T* h0 = static_cast<const T*>(a.h0);
  const T* c0 = static_cast<const T*>(a.c0);
  const T* out = static_cast<const T*>(a.out);
  const A* ws = static_cast<const A*>(a.ws);
  T* dgates_x = static_cast<T*>(a.dgates_x);
  T* dgates_h = static_cast<T*>(C == Cell::GRU ? a.dgates_h : a.dgates_x);
  T* grad_h0 = static_cast<T*>(a.grad_h0);
  T* grad_c0 = static_cast<T*>(a.grad_c0);
  const A clip = static_cast<A>(a.clip);
  const Geometry geo{a.sizes, a.offsets, a.steps, a.reverse};

  for (int i = threadIdx.x; i < G * nu * H; i += kThreads) {
    const int k = i % H, r = i / H, ul = r % nu, g = r / nu;
    w[(g * U + ul) * LD + k] = w_hh[static_cast<int64_t>(g * H + u0 + ul) * H + k];
  }
  for (int i = threadIdx.x; i < 2 * Bt * U; i += kThreads) dh_next[i] = A(0);  // dh_next, dc_next
  cluster.sync();  // every block runs before any block writes into it

  for (int64_t s = 0; s < a.steps; ++s) {
    const int64_t t = geo.t_of(a.steps - 1 - s);  // reverse of the forward order
    const int64_t row0 = a.offsets[t] + tile0;
    const int64_t p = geo.prev(t);
    const int64_t prev_row0 = (p < 0 ? 0 : a.offsets[p]) + tile0;
    const int rows = rows_below(a.sizes[t], tile0, Bt);
    const int rows_prev = rows_below(geo.n_prev(t), tile0, Bt);
    const int rows_next = rows_below(geo.n_next(t), tile0, Bt);
    const int pairs = rows * nu;

    // A: g for own units; its squares summed over own units, to every block.
    for (int pair = threadIdx.x; pair < pairs; pair += kThreads) {
      const int b = pair / nu, ul = pair % nu, u = u0 + ul;
      const A incoming = b < rows_next ? dh_next[b * U + ul]
                                       : A(load(grad_h_n + static_cast<int64_t>(tile0 + b) * H + u));
      gbuf[b * U + ul] = A(load(grad_out + (row0 + b) * H + u)) + incoming;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < rows * blocks; i += kThreads) {
      const int b = i / blocks, r = i % blocks;
      double sum = 0.0;
      for (int ul = 0; ul < nu; ++ul) sum += cuda::square(gbuf[b * U + ul]);
      *cluster.map_shared_rank(part_g + rank * Bt + b, r) = sum;
    }
    cluster.sync();

    // B: the full norms, clipping, gate gradients of own units.
    for (int b = threadIdx.x; b < rows; b += kThreads) {
      double sum = 0.0;
      for (int r = 0; r < blocks; ++r) sum += part_g[r * Bt + b];
      row_norm[b] = static_cast<A>(sqrt(sum));
      if (rank == 0 && a.norm_g != nullptr) a.norm_g[row0 + b] = static_cast<float>(row_norm[b]);
    }
    __syncthreads();
    for (int pair = threadIdx.x; pair < pairs; pair += kThreads) {
      const int b = pair / nu, ul = pair % nu, u = u0 + ul;
      const int64_t row = row0 + b;
      const A dh = gbuf[b * U + ul] * clip_scale(row_norm[b], clip);
      T* dx = dgates_x + row * GH;
      A* dg = dgate + b * G * U + ul;
      const bool starts = b >= rows_prev;  // the sample's first step: gradients go to h0/c0
      if constexpr (C == Cell::LSTM) {
        const A* wr = ws + row * S * H;
        const LstmGates<A> gates{wr[u], wr[H + u], wr[2 * H + u], wr[3 * H + u]};
        const A c_prev = starts ? A(load(c0 + static_cast<int64_t>(tile0 + b) * H + u))
                                : ws[(prev_row0 + b) * S * H + 4 * H + u];
        const A dc_in = b < rows_next
                            ? dc_next[b * U + ul]
                            : (grad_c_n ? A(load(grad_c_n + static_cast<int64_t>(tile0 + b) * H + u)) : A(0));
        LstmGates<A> dpre;
        A dc_total, dc_prev;
        lstm_backward_unit<A>(dh, dc_in, gates, wr[4 * H + u], c_prev, dpre, dc_total, dc_prev);
        const A d[4] = {dpre.i, dpre.f, dpre.g, dpre.o};
#pragma unroll
        for (int g = 0; g < 4; ++g) {
          store(dx + g * H + u, d[g]);
          dg[g * U] = through<T>(d[g]);  // the product reads the gate gradients as stored
        }
        gbuf[b * U + ul] = dc_total;  // g is no longer needed: reuse for the dc partial
        if (starts) {
          if (grad_c0) store(grad_c0 + static_cast<int64_t>(tile0 + b) * H + u, dc_prev);
        } else {
          dc_next[b * U + ul] = dc_prev;
        }
      } else if constexpr (C == Cell::GRU) {
        const A* wr = ws + row * S * H;
        const GruGates<A> gates{wr[u], wr[H + u], wr[2 * H + u]};
        const A h_prev = starts ? A(load(h0 + static_cast<int64_t>(tile0 + b) * H + u))
                                : A(load(out + (prev_row0 + b) * H + u));
        GruGates<A> gx, gh;
        A dh_direct;
        gru_backward_unit<A>(dh, gates, wr[3 * H + u], h_prev, gx, gh, dh_direct);
        store(dx + u, gx.r);
        store(dx + H + u, gx.z);
        store(dx + 2 * H + u, gx.n);
        T* dhh = dgates_h + row * GH;
        const A d[3] = {gh.r, gh.z, gh.n};
#pragma unroll
        for (int g = 0; g < 3; ++g) {
          store(dhh + g * H + u, d[g]);
          dg[g * U] = through<T>(d[g]);
        }
        direct[b * U + ul] = dh_direct;
      } else {
        const A d = rnn_backward_unit<C == Cell::RNN_RELU, A>(dh, A(load(out + row * H + u)));
        store(dx + u, d);
        dg[0] = through<T>(d);
      }
    }
    __syncthreads();
    if constexpr (C == Cell::LSTM) {
      if (a.norm_c != nullptr) {
        for (int b = threadIdx.x; b < rows; b += kThreads) {
          double sum = 0.0;
          for (int ul = 0; ul < nu; ++ul) sum += cuda::square(gbuf[b * U + ul]);
          *cluster.map_shared_rank(part_c + rank * Bt + b, 0) = sum;
        }
      }
    }

    // C: this block's gate columns times its W_hh rows: a partial dh_prev for every unit, sent to
    // the unit's owner. Consecutive threads take consecutive units (conflict-free W_hh reads).
    for (int i = threadIdx.x; i < rows * H; i += kThreads) {
      const int b = i / H, k = i % H;
      const A* dg = dgate + b * G * U;
      A acc = A(0);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        for (int ul = 0; ul < nu; ++ul) acc += dg[g * U + ul] * A(load(w + (g * U + ul) * LD + k));
      }
      *cluster.map_shared_rank(inbox + (rank * Bt + b) * U + k % U, k / U) = acc;
    }
    cluster.sync();

    // D: own units' dh_prev, summed over the blocks in rank order.
    for (int pair = threadIdx.x; pair < pairs; pair += kThreads) {
      const int b = pair / nu, ul = pair % nu;
      A sum = C == Cell::GRU ? direct[b * U + ul] : A(0);
      for (int r = 0; r < blocks; ++r) sum += inbox[(r * Bt + b) * U + ul];
      if (b < rows_prev) {
        dh_next[b * U + ul] = sum;
      } else {
        store(grad_h0 + static_cast<int64_t>(tile0 + b) * H + u0 + ul, sum);
      }
    }
    if constexpr (C == Cell::LSTM) {
      if (a.norm_c != nullptr && rank == 0) {
        for (int b = threadIdx.x; b < rows; b += kThreads) {
          double sum = 0.0;
          for (int r = 0; r < blocks; ++r) sum += part_c[r * Bt + b];
          a.norm_c[row0 + b] = static_cast<float>(sqrt(sum));
        }
      }
    }
    __syncthreads();
  }
#endif
}

template <typename T>
const void* forward_kernel_for(Cell cell) {
  switch (cell) {
    case Cell::LSTM: return reinterpret_cast<const void*>(cluster_forward_kernel<Cell::LSTM, T>);
    case Cell::GRU: return reinterpret_cast<const void*>(cluster_forward_kernel<Cell::GRU, T>);
    case Cell::RNN_TANH: return reinterpret_cast<const void*>(cluster_forward_kernel<Cell::RNN_TANH, T>);
    default: return reinterpret_cast<const void*>(cluster_forward_kernel<Cell::RNN_RELU, T>);
  }
}

template <typename T>
const void* backward_kernel_for(Cell cell) {
  switch (cell) {
    case Cell::LSTM: return reinterpret_cast<const void*>(cluster_backward_kernel<Cell::LSTM, T>);
    case Cell::GRU: return reinterpret_cast<const void*>(cluster_backward_kernel<Cell::GRU, T>);
    case Cell::RNN_TANH: return reinterpret_cast<const void*>(cluster_backward_kernel<Cell::RNN_TANH, T>);
    default: return reinterpret_cast<const void*>(cluster_backward_kernel<Cell::RNN_RELU, T>);
  }
}

const void* kernel_for(bool forward, Cell cell, DType dtype) {
  switch (dtype) {
    case DType::F32: return forward ? forward_kernel_for<float>(cell) : backward_kernel_for<float>(cell);
    case DType::F64: return forward ? forward_kernel_for<double>(cell) : backward_kernel_for<double>(cell);
    case DType::F16: return forward ? forward_kernel_for<__half>(cell) : backward_kernel_for<__half>(cell);
    default:
      return forward ? forward_kernel_for<__nv_bfloat16>(cell) : backward_kernel_for<__nv_bfloat16>(cell);
  }
}

size_t storage_size(DType dtype) {
  return dtype == DType::F64 ? 8 : (dtype == DType::F32 ? 4 : 2);
}

// Shared memory of the two kernels (the layouts at the top of each).
size_t forward_smem(int gates, int units, int tile_rows, int64_t hidden, DType dtype) {
  const size_t acc = acc_size(dtype), elem = storage_size(dtype);
  const size_t ld = static_cast<size_t>(hidden) + (elem >= 4 ? 1 : 4 / elem);
  return (static_cast<size_t>(gates) * units + static_cast<size_t>(tile_rows) * units) * acc +
         (static_cast<size_t>(gates) * units + 2 * static_cast<size_t>(tile_rows)) * ld * elem;
}

size_t backward_smem(int gates, int units, int tile_rows, int blocks, int64_t hidden, DType dtype) {
  const size_t acc = acc_size(dtype), elem = storage_size(dtype);
  const size_t ld = static_cast<size_t>(hidden) + (elem >= 4 ? 1 : 4 / elem);
  const size_t rows = tile_rows, u = units;
  return 2 * blocks * rows * sizeof(double) +
         (rows + 4 * rows * u + rows * gates * u + blocks * rows * u) * acc +
         static_cast<size_t>(gates) * u * ld * elem;
}

cudaLaunchConfig_t launch_config(const Plan& plan, size_t smem, cudaStream_t stream,
                                 cudaLaunchAttribute* attribute) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(plan.blocks));
  config.blockDim = dim3(static_cast<unsigned>(kThreads));
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  attribute->id = cudaLaunchAttributeClusterDimension;
  attribute->val.clusterDim.x = static_cast<unsigned>(plan.cluster);
  attribute->val.clusterDim.y = 1;
  attribute->val.clusterDim.z = 1;
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
  const void* kernel = kernel_for(forward, args.cell, args.dtype);
  const size_t smem = forward ? plan.smem_forward : plan.smem_backward;
  cudaError_t err = prepare(kernel, smem);
  if (err != cudaSuccess) return err;
  cudaLaunchAttribute attribute;
  cudaLaunchConfig_t config = launch_config(plan, smem, stream, &attribute);
  Args copy = args;
  ClusterShape shape{plan.units, plan.tile_rows};
  void* params[] = {&copy, &shape};
  return cudaLaunchKernelExC(&config, kernel, params);
}

}  // namespace

Plan make_cluster_plan(Cell cell, DType dtype, int64_t batch, int64_t hidden, bool has_proj,
                       int device) {
  Plan plan;
  if (has_proj) {
    plan.reason = Decline::Projection;
    return plan;
  }
  if (hidden <= 0 || batch <= 0) {
    plan.reason = Decline::Empty;
    return plan;
  }
  const cudaDeviceProp* prop = device_properties(device);
  if (prop == nullptr || prop->major < 9) {
    plan.reason = Decline::NoClusters;
    return plan;
  }
  const int gates = cell_gates(cell);
  const int64_t tiles = (batch + kTileRows - 1) / kTileRows;
  const int tile_rows = static_cast<int>((batch + tiles - 1) / tiles);
  plan.reason = Decline::SharedMemory;
  // The largest cluster that fits and can be scheduled: the smallest share of W_hh per block.
  for (int blocks = kMaxClusterBlocks; blocks >= 1; blocks /= 2) {
    if (blocks > hidden && blocks > 1) continue;
    const int units = static_cast<int>((hidden + blocks - 1) / blocks);
    const size_t smem_f = forward_smem(gates, units, tile_rows, hidden, dtype);
    const size_t smem_b = backward_smem(gates, units, tile_rows, blocks, hidden, dtype);
    if (std::max(smem_f, smem_b) > prop->sharedMemPerBlockOptin) continue;
    Plan candidate;
    candidate.cluster = blocks;
    candidate.tile_rows = tile_rows;
    candidate.blocks = static_cast<int>(tiles) * blocks;
    candidate.units = units;
    candidate.threads = kThreads;
    candidate.smem_forward = smem_f;
    candidate.smem_backward = smem_b;
    bool schedulable = true;
    for (int pass = 0; pass < 2 && schedulable; ++pass) {
      const void* kernel = kernel_for(pass == 0, cell, dtype);
      const size_t smem = pass == 0 ? smem_f : smem_b;
      cudaLaunchAttribute attribute;
      cudaLaunchConfig_t config = launch_config(candidate, smem, nullptr, &attribute);
      config.gridDim = dim3(static_cast<unsigned>(blocks));  // one cluster: can it run at all?
      int clusters = 0;
      schedulable = prepare(kernel, smem) == cudaSuccess &&
                    cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess &&
                    clusters >= 1;
    }
    if (!schedulable) {
      cudaGetLastError();
      plan.reason = Decline::Occupancy;
      continue;
    }
    candidate.ok = true;
    return candidate;
  }
  return plan;
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
