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
#include <type_traits>

#include "persistent_common.cuh"
#include "rnnkern/cell_math.h"

namespace cg = cooperative_groups;

namespace rnnkern {
namespace persistent {
namespace {

using namespace detail;

// 16-bit layers run the recurrent products on tensor cores (mma.sync m16n8k16, float32
// accumulation); float32 and float64 keep exact FMA dot products.
template <typename T>
constexpr bool kMma = sizeof(T) == 2;

__host__ __device__ constexpr int round_up(int v, int m) { return (v + m - 1) / m * m; }

// Shapes (in elements) of the shared-memory tables, computed the same way on the host (sizes) and
// in the kernels (layout). The MMA operand tables are zero-padded to whole tiles (16 state rows, K in
// steps of 16, N in steps of 8) and their rows keep 32-bit pairs aligned; the 8 extra elements per
// row (16 bytes) put the 8 rows a fragment load touches in different banks. FMA rows get one
// element of padding (the lane groups of a warp read different rows at the same column).
struct Tables {
  int ld;          // forward: row length of the W_hh rows and of the state rows
  int w_rows;      // forward: W_hh rows, n = g * U + ul (G * U, padded to 8 for MMA)
  int state_rows;  // rows of a state stage (Bt; 16 for MMA)
  int hp_ld;       // forward: columns of the product hp[b][n] (w_rows)
  int ldn;         // backward, MMA: row length of dgate[b][n] and of W_hhᵀ rows wt[k][n]
  int wt_rows;     // backward, MMA: rows of wt (H padded to 8)
};

__host__ __device__ inline Tables make_tables(bool mma, int hidden, int gates, int units, int tile_rows) {
  Tables t;
  t.ld = mma ? round_up(hidden, 16) + 8 : hidden + 1;
  t.w_rows = mma ? round_up(gates * units, 8) : gates * units;
  t.state_rows = mma ? 16 : tile_rows;
  t.hp_ld = t.w_rows;
  t.ldn = mma ? round_up(gates * units, 16) + 8 : 0;
  t.wt_rows = mma ? round_up(hidden, 8) : 0;
  return t;
}

constexpr int kMaxClusterBlocks = 16;  // Hopper's limit (above 8 with the non-portable attribute)
constexpr int kTileRows = 16;          // batch rows per cluster where the batch allows

struct ClusterShape {
  int units;      // hidden units per block
  int tile_rows;  // batch rows per cluster
};

// The kernels' bodies are compiled for sm_90 and newer only (and parsed in the host pass).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define RNNKERN_HAS_CLUSTERS 1
#endif

#ifdef RNNKERN_HAS_CLUSTERS
// Where a block works: its cluster's size, its rank there, its hidden units [u0, u0 + nu) (nu may be
// 0 in the last blocks) of `units` per block, and its cluster's batch rows [tile0, tile0 + tile_rows).
struct Place {
  int blocks, rank, units, tile_rows, u0, nu, tile0;
};

__device__ __forceinline__ Place place(const cg::cluster_group& cluster, const ClusterShape& shape, int hidden) {
  const int blocks = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int u0 = rank * shape.units;
  return {blocks, rank, shape.units, shape.tile_rows, u0, max(0, min(shape.units, hidden - u0)),
          static_cast<int>(blockIdx.x) / blocks * shape.tile_rows};
}




// Zeroes `bytes` (a multiple of 4) of shared memory from the 4-byte aligned `p`, block-wide.
__device__ __forceinline__ void zero_words(void* p, int bytes) {
  uint32_t* words = static_cast<uint32_t*>(p);
  for (int i = threadIdx.x; i < bytes / 4; i += kThreads) words[i] = 0u;
}

__device__ __forceinline__ uint32_t pair_at(const void* p) { return *static_cast<const uint32_t*>(p); }

// Fragments of mma.m16n8k16 (PTX ISA, "matrix fragments for mma.m16n8k16"), lane = 4 * gid + tig.
// A: rows [0, 16), columns [k0, k0 + 16) of the row-major `m` (leading dimension ld).
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* m, int ld, int k0, int gid, int tig) {
  const T* r0 = m + gid * ld + k0 + 2 * tig;
  const T* r8 = r0 + 8 * ld;
  a[0] = pair_at(r0);
  a[1] = pair_at(r8);
  a[2] = pair_at(r0 + 8);
  a[3] = pair_at(r8 + 8);
}

// B (16 x 8, "col"): element (k, n) at m[n * ld + k], n in [n0, n0 + 8), k in [k0, k0 + 16).
template <typename T>
__device__ __forceinline__ void load_b(uint32_t (&b)[2], const T* m, int ld, int n0, int k0, int gid, int tig) {
  const T* r = m + (n0 + gid) * ld + k0 + 2 * tig;
  b[0] = pair_at(r);
  b[1] = pair_at(r + 8);
}

// d += A B on the tensor cores, float32 accumulation. d[0], d[1]: row gid, columns 2 tig + {0, 1};
// d[2], d[3]: row gid + 8.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

#endif  // RNNKERN_HAS_CLUSTERS

template <Cell C, typename T>
__global__ void __launch_bounds__(kThreads) cluster_forward_kernel(ForwardArgs a, ClusterShape shape) {
#ifndef RNNKERN_HAS_CLUSTERS
  __trap();  // make_cluster_plan declines devices below sm_90: never launched there
#else
  using A = typename AccOf<T>::type;
  constexpr int G = kGates<C>;
  constexpr int S = kSlots<C>;
  cg::cluster_group cluster = cg::this_cluster();
  const int H = static_cast<int>(a.hidden);
  const int GH = G * H;
  const auto [blocks, rank, U, Bt, u0, nu, tile0] = place(cluster, shape, H);
  const Tables tb = make_tables(kMma<T>, H, G, U, Bt);
  const int LD = tb.ld, HP = tb.hp_ld;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* bias = reinterpret_cast<A*>(smem_raw);   // [G][U]: b_hh of own units
  A* own_c = bias + G * U;                    // [Bt][U]: LSTM c_{t-1} of own units
  A* hp = own_c + Bt * U;                     // [state_rows][HP]: h_{t-1} W_hhᵀ for own rows n
  T* w = reinterpret_cast<T*>(hp + tb.state_rows * HP);  // [w_rows][LD]: W_hh rows g*H + u0 + ul
  T* stage = w + tb.w_rows * LD;              // [2][state_rows][LD]: h_{t-1} of the tile, by parity
  const auto [w_hh, xp, b_hh, h0, c0, out, ws, h_n, c_n] = typed<T, A>(a);
  const Geometry geo{a.sizes, a.offsets, a.steps, a.reverse};

  // Zeros first: the MMA tiles read the padding (rows, columns) of both tables.
  zero_words(w, (tb.w_rows + 2 * tb.state_rows) * LD * static_cast<int>(sizeof(T)));
  __syncthreads();
  for (int i = threadIdx.x; i < G * nu * H; i += kThreads) {
    const int k = i % H, r = i / H, ul = r % nu, g = r / nu;
    w[(g * U + ul) * LD + k] = w_hh[static_cast<int64_t>(g * H + u0 + ul) * H + k];
  }
  for (int i = threadIdx.x; i < G * nu; i += kThreads) {
    const int g = i / nu, ul = i % nu;
    bias[g * U + ul] = b_hh ? A(load(b_hh + g * H + u0 + ul)) : A(0);
  }
  cluster.sync();  // every block runs (and has its tables) before any block writes into it

  // Each step's geometry is read before the barrier that opens it: cluster.sync() invalidates L1
  // (CCTL.IVALL), so reading it after would put an L2 round trip at the head of every step.
  TileStep next_step = tile_step(geo, geo.t_of(0), tile0, Bt);
  for (int64_t s = 0; s < a.steps; ++s) {
    [[maybe_unused]] const auto [row0, prev_row0, rows, rows_prev, rows_next] = next_step;
    const int pairs = rows * nu;
    T* cur = stage + (s & 1) * tb.state_rows * LD;
    T* nxt = stage + ((s + 1) & 1) * tb.state_rows * LD;
    // x_t's projection for this thread's first (row, unit) pair, loaded before the product (its
    // latency hidden by it).
    A xv[G];
    if (static_cast<int>(threadIdx.x) < pairs) {
      const T* x = xp + (row0 + threadIdx.x / nu) * GH + u0 + threadIdx.x % nu;
#pragma unroll
      for (int g = 0; g < G; ++g) xv[g] = A(load(x + g * H));
    }
    for (int i = threadIdx.x; i < (rows - rows_prev) * H; i += kThreads) {  // samples starting here
      const int b = rows_prev + i / H, k = i % H;
      cur[b * LD + k] = h0[static_cast<int64_t>(tile0 + b) * H + k];
    }
    __syncthreads();

    // hp = h_{t-1} W_hhᵀ for the block's rows n = g * U + ul.
    if constexpr (kMma<T>) {
      const int warp = threadIdx.x / 32, gid = (threadIdx.x % 32) / 4, tig = threadIdx.x % 4;
      for (int n0 = warp * 8; rows > 0 && n0 < tb.w_rows; n0 += kThreads / 4) {
        float d[4] = {0.f, 0.f, 0.f, 0.f};
        for (int k0 = 0; k0 < H; k0 += 16) {  // columns past H are zeros in both operands
          uint32_t fa[4], fb[2];
          load_a(fa, cur, LD, k0, gid, tig);
          load_b(fb, w, LD, n0, k0, gid, tig);
          mma_16816<T>(d, fa, fb);
        }
        const int n = n0 + 2 * tig;
        hp[gid * HP + n] = d[0];
        hp[gid * HP + n + 1] = d[1];
        hp[(gid + 8) * HP + n] = d[2];
        hp[(gid + 8) * HP + n + 1] = d[3];
      }
    } else {
      const int lanes = lanes_per_pair(pairs);
      const int groups = kThreads / lanes;
      const int lane = threadIdx.x % lanes;
      for (int base = 0; base < pairs; base += groups) {  // uniform trip count: shuffles stay safe
        const int pair = base + threadIdx.x / lanes;
        const bool valid = pair < pairs;
        const int b = valid ? pair / nu : 0;
        const int ul = valid ? pair % nu : 0;
        A acc[G];
#pragma unroll
        for (int g = 0; g < G; ++g) acc[g] = A(0);
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
        if (valid && lane == 0) {
#pragma unroll
          for (int g = 0; g < G; ++g) hp[b * HP + g * U + ul] = acc[g];
        }
      }
    }
    __syncthreads();

    // The cell for each (row, own unit); h_t to `out` and into every block's next stage.
    for (int pair = threadIdx.x; pair < pairs; pair += kThreads) {
      const int b = pair / nu, ul = pair % nu, u = u0 + ul;
      const int64_t row = row0 + b;
      if (pair != static_cast<int>(threadIdx.x)) {
#pragma unroll
        for (int g = 0; g < G; ++g) xv[g] = A(load(xp + row * GH + g * H + u));
      }
      A hh[G];  // h_{t-1} W_hhᵀ + b_hh
#pragma unroll
      for (int g = 0; g < G; ++g) hh[g] = A(hp[b * HP + g * U + ul]) + bias[g * U + ul];
      const bool last = b >= rows_next;  // the sample ends here: h_n (and c_n)
      A prev = A(0), c = A(0);  // c_{t-1} (LSTM) or h_{t-1} (GRU); c_t
      if constexpr (C == Cell::LSTM) {
        prev = b < rows_prev ? own_c[b * U + ul] : A(load(c0 + static_cast<int64_t>(tile0 + b) * H + u));
      } else if constexpr (C == Cell::GRU) {
        prev = A(load(cur + b * LD + u));
      }
      const A h = forward_unit<C, A>(xv, hh, prev, ws + row * S * H, H, u, c);
      if constexpr (C == Cell::LSTM) {
        own_c[b * U + ul] = c;
        if (last) store(c_n + static_cast<int64_t>(tile0 + b) * H + u, c);
      }
      store(out + row * H + u, h);
      if (last) store(h_n + static_cast<int64_t>(tile0 + b) * H + u, h);
      if (s + 1 < a.steps) {
        T stored;  // as the next step reads it from `out`
        store(&stored, h);
        for (int r = 0; r < blocks; ++r) *cluster.map_shared_rank(nxt + b * LD + u, r) = stored;
      }
    }
    if (s + 1 < a.steps) next_step = tile_step(geo, geo.t_of(s + 1), tile0, Bt);
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
  const int H = static_cast<int>(a.hidden);
  const int GH = G * H;
  const auto [blocks, rank, U, Bt, u0, nu, tile0] = place(cluster, shape, H);
  const Tables tb = make_tables(kMma<T>, H, G, U, Bt);
  const int LD = tb.ld, LDN = tb.ldn;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  double* part_g = reinterpret_cast<double*>(smem_raw);  // [blocks][Bt]: Σ g² over each block's units
  double* part_c = part_g + blocks * Bt;                 // [blocks][Bt]: Σ dc² (block 0 reads them)
  A* row_norm = reinterpret_cast<A*>(part_c + blocks * Bt);  // [Bt]
  A* dh_next = row_norm + Bt;          // [Bt][U]: dh_prev of the step processed before, own units
  A* dc_next = dh_next + Bt * U;       // [Bt][U] (LSTM)
  A* gbuf = dc_next + Bt * U;          // [Bt][U]: g before clipping, then dc_t (LSTM)
  A* direct = gbuf + Bt * U;           // [Bt][U]: GRU z ⊙ g
  A* inbox = direct + Bt * U;          // [blocks][Bt][U]: each block's share of own units' dh_prev
  // The dh product's operands. FMA: dgate[b][n] (acc dtype) and W_hh rows w[n][k], n = g * U + ul.
  // MMA: dgate[b][n] as stored (T, 16 rows x LDN) and W_hhᵀ rows wt[k][n] (wt_rows x LDN).
  A* dgate = inbox + blocks * Bt * U;  // FMA: [Bt][G * U]
  T* w = reinterpret_cast<T*>(dgate + (kMma<T> ? 0 : Bt * G * U));  // FMA: [G * U][LD]
  T* dgate16 = w;                      // MMA: [16][LDN]
  T* wt = dgate16 + 16 * LDN;          // MMA: [wt_rows][LDN]
  const auto [w_hh, grad_out, grad_h_n, grad_c_n, h0, c0, out, ws, dgates_x, dgates_h, grad_h0, grad_c0] =
      typed<C, T, A>(a);
  const A clip = static_cast<A>(a.clip);
  const Geometry geo{a.sizes, a.offsets, a.steps, a.reverse};

  if constexpr (kMma<T>) {
    zero_words(dgate16, (16 + tb.wt_rows) * LDN * static_cast<int>(sizeof(T)));  // the tiles' padding
    __syncthreads();
    for (int i = threadIdx.x; i < G * nu * H; i += kThreads) {
      const int k = i % H, r = i / H, ul = r % nu, g = r / nu;
      wt[k * LDN + g * U + ul] = w_hh[static_cast<int64_t>(g * H + u0 + ul) * H + k];
    }
  } else {
    for (int i = threadIdx.x; i < G * nu * H; i += kThreads) {
      const int k = i % H, r = i / H, ul = r % nu, g = r / nu;
      w[(g * U + ul) * LD + k] = w_hh[static_cast<int64_t>(g * H + u0 + ul) * H + k];
    }
  }
  for (int i = threadIdx.x; i < 2 * Bt * U; i += kThreads) dh_next[i] = A(0);  // dh_next, dc_next
  cluster.sync();  // every block runs before any block writes into it


  // The steps in reverse of the forward order; each one's geometry read before the barrier that
  // opens it (see the forward).
  TileStep next_step = tile_step(geo, geo.t_of(a.steps - 1), tile0, Bt);
  for (int64_t s = 0; s < a.steps; ++s) {
    const auto [row0, prev_row0, rows, rows_prev, rows_next] = next_step;
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
      const bool starts = b >= rows_prev;  // the sample's first step: gradients go to h0/c0
      A prev = A(0), h = A(0), dc_in = A(0);
      if constexpr (C == Cell::LSTM) {
        prev = starts ? A(load(c0 + static_cast<int64_t>(tile0 + b) * H + u))
                      : ws[(prev_row0 + b) * S * H + 4 * H + u];
        dc_in = b < rows_next
                    ? dc_next[b * U + ul]
                    : (grad_c_n ? A(load(grad_c_n + static_cast<int64_t>(tile0 + b) * H + u)) : A(0));
      } else if constexpr (C == Cell::GRU) {
        prev = starts ? A(load(h0 + static_cast<int64_t>(tile0 + b) * H + u))
                      : A(load(out + (prev_row0 + b) * H + u));
      } else {
        h = A(load(out + row * H + u));
      }
      A dg[G], dc_total, dc_prev, dh_direct;
      backward_unit<C, T, A>(dh, dc_in, ws + row * S * H, prev, h, H, u, dgates_x + row * GH,
                             dgates_h + row * GH, dg, dc_total, dc_prev, dh_direct);
      // The product's operand, as stored (the per-step path reads the dgates rows back).
#pragma unroll
      for (int g = 0; g < G; ++g) {
        if constexpr (kMma<T>) {
          store(dgate16 + b * LDN + g * U + ul, dg[g]);
        } else {
          dgate[b * G * U + g * U + ul] = through<T>(dg[g]);
        }
      }
      if constexpr (C == Cell::LSTM) {
        gbuf[b * U + ul] = dc_total;  // g is no longer needed: reuse for the dc partial
        if (starts) {
          if (grad_c0) store(grad_c0 + static_cast<int64_t>(tile0 + b) * H + u, dc_prev);
        } else {
          dc_next[b * U + ul] = dc_prev;
        }
      } else if constexpr (C == Cell::GRU) {
        direct[b * U + ul] = dh_direct;
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

    // C: this block's gate columns times its W_hh rows: a partial dh_prev for every unit k, sent to
    // the unit's owner.
    if constexpr (kMma<T>) {
      const int warp = threadIdx.x / 32, gid = (threadIdx.x % 32) / 4, tig = threadIdx.x % 4;
      for (int k0 = warp * 8; rows > 0 && k0 < H; k0 += kThreads / 4) {  // 8 output units per tile
        float d[4] = {0.f, 0.f, 0.f, 0.f};
        for (int n0 = 0; n0 < G * U; n0 += 16) {  // columns past G * U are zeros in both operands
          uint32_t fa[4], fb[2];
          load_a(fa, dgate16, LDN, n0, gid, tig);
          load_b(fb, wt, LDN, k0, n0, gid, tig);
          mma_16816<T>(d, fa, fb);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int b = gid + (j >= 2 ? 8 : 0), k = k0 + 2 * tig + (j & 1);
          if (b < rows && k < H) *cluster.map_shared_rank(inbox + (rank * Bt + b) * U + k % U, k / U) = d[j];
        }
      }
    } else {  // consecutive threads take consecutive units: conflict-free W_hh reads
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
    }
    if (s + 1 < a.steps) next_step = tile_step(geo, geo.t_of(a.steps - 2 - s), tile0, Bt);
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
  const Tables tb = make_tables(elem == 2, static_cast<int>(hidden), gates, units, tile_rows);
  return (static_cast<size_t>(gates) * units + static_cast<size_t>(tile_rows) * units +
          static_cast<size_t>(tb.state_rows) * tb.hp_ld) * acc +
         static_cast<size_t>(tb.w_rows + 2 * tb.state_rows) * tb.ld * elem;
}

size_t backward_smem(int gates, int units, int tile_rows, int blocks, int64_t hidden, DType dtype) {
  const size_t acc = acc_size(dtype), elem = storage_size(dtype);
  const bool mma = elem == 2;
  const Tables tb = make_tables(mma, static_cast<int>(hidden), gates, units, tile_rows);
  const size_t rows = tile_rows, u = units, g = gates;
  const size_t tables = mma ? static_cast<size_t>(16 + tb.wt_rows) * tb.ldn * elem
                            : rows * g * u * acc + g * u * tb.ld * elem;
  return 2 * blocks * rows * sizeof(double) + (rows + 4 * rows * u + blocks * rows * u) * acc + tables;
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
  if (declines_layer(plan, has_proj, batch, hidden)) return plan;
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
