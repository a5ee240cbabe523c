// Shared-memory layouts and shapes of the cluster kernels (persistent_cluster_kernels.cuh), computed the
// same way on the host (the plan's sizes: persistent_cluster.cu) and in the kernels (the offsets).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "persistent_common.cuh"

namespace rnnkern {
namespace persistent {
namespace {

using namespace detail;

// Where the recurrent products run on tensor cores (the kernels' `Mma` parameter, float32
// accumulation): 16-bit layers always (mma.sync m16n8k16); float32 layers with Plan::tf32 (m16n8k8
// on TF32 operands, rounded to nearest); otherwise exact FMA dot products (float32 by default,
// float64 always).
__host__ __device__ constexpr bool uses_mma(int elem, bool tf32) { return elem == 2 || (elem == 4 && tf32); }

__host__ __device__ constexpr int round_up(int v, int m) { return (v + m - 1) / m * m; }

// Shapes (in elements) of the shared-memory tables, computed the same way on the host (sizes) and
// in the kernels (layout). The MMA operand tables are zero-padded to whole tiles (16 state rows, K in
// steps of 16 (16-bit) or 8 (TF32), N in steps of 8) and their rows keep 32-bit words aligned; the
// 16 extra bytes per row put the 8 rows a fragment load touches in different banks (a row stride of
// 4 mod 8 words). FMA rows get one chunk of padding; padding columns are zeros in every table.
constexpr int kChunk = 16;  // bytes: the vector width of the exchanges and of the FMA operand loads

struct Tables {
  int ld;          // row length of the W_hh rows and of the state rows (a whole number of chunks)
  int w_rows;      // forward: W_hh rows, n = g * U + ul (G * U, padded to 8 for MMA)
  int state_rows;  // rows of a state stage (Bt; for MMA rounded up to 16)
  int hp_ld;       // forward: columns of the product hp[b][n] (w_rows; MMA: + 4, see make_tables)
  int hp_splits;   // forward, MMA: parts K is split into (forward_mma_splits), a copy of hp each
  int ldn;         // backward, MMA: row length of dgate[b][n] and of W_hhᵀ rows wt[k][n]
  int wt_rows;     // backward, MMA: rows of wt (H padded to 8)
};

// Forward, tensor cores: hpᵀ = W_hh h_{t-1}ᵀ, W_hh's rows as the A operand (16 x kMmaK tiles) and the
// state rows as B (8 x kMmaK: an 8-row batch tile fills it; as A it was padded to 16 rows and read by
// every warp, two thirds of the product's shared-memory traffic at LSTM B16 H256). A warp's item: one
// 16-row tile of W_hh with up to kMmaGroup 8-row tiles of the batch (sharing each K step's A
// fragment). Where the items would leave some of the SM's four sub-partitions without a warp, spare
// warps each take a share of K instead of idling (RNN H256 on 16 blocks: one tile of W_hh, K in 4
// parts), this many parts, each into its own copy of hp, summed in part order before the cells.
// (More parts would not read fewer bytes, the product's bound, and their sum costs the cells; LSTM
// H256's 4 tiles of W_hh keep K whole.) n_groups: the batch's groups of kMmaGroup 8-row tiles at the
// tile's rows at their most; k_steps: K's MMA steps.
constexpr int kWarps = kThreads / 32;
// 8-row B tiles a warp's tensor-core product takes at a time, sharing each K step's A fragment.
constexpr int kMmaGroup = 4;
__host__ __device__ constexpr int forward_mma_groups(int tile_rows) {
  return ((tile_rows + 7) / 8 + kMmaGroup - 1) / kMmaGroup;
}
constexpr int kSubPartitions = 4;  // of an SM, each issuing for its own warps
__host__ __device__ inline int forward_mma_splits(int m_tiles, int n_groups, int k_steps) {
  const int items = m_tiles * n_groups;
  if (items >= kSubPartitions || items < 1) return 1;
  return k_steps < kSubPartitions / items ? k_steps : kSubPartitions / items;
}

__host__ __device__ inline Tables make_tables(int elem, bool mma, int hidden, int gates, int units, int tile_rows) {
  const int chunk = kChunk / elem;
  const int k_step = elem == 2 ? 16 : 8;  // MMA: kMmaK
  Tables t;
  // FMA: a chunk of padding makes rows 4 apart (a register tile's rows) start 16 banks apart.
  t.ld = mma ? round_up(hidden, k_step) + chunk : round_up(hidden, chunk) + chunk;
  t.w_rows = mma ? round_up(gates * units, 8) : gates * units;
  t.state_rows = mma ? round_up(tile_rows, 16) : tile_rows;  // MMA: whole 16-row tiles
  // MMA: 4 words more than a multiple of 8 put the rows b = 2 tig of hp[b][n] that a fragment's lanes
  // store (n = m0 + gid) in different banks.
  t.hp_ld = mma ? t.w_rows + 4 : t.w_rows;
  t.hp_splits = mma ? forward_mma_splits((t.w_rows + 15) / 16, forward_mma_groups(tile_rows),
                                         round_up(hidden, k_step) / k_step)
                    : 1;
  t.ldn = mma ? round_up(gates * units, k_step) + chunk : 0;
  t.wt_rows = mma ? round_up(hidden, 8) : 0;
  return t;
}

constexpr int kMaxClusterBlocks = 16;  // Hopper's limit (above 8 with the non-portable attribute)
constexpr int kTileRows = 16;          // batch rows per cluster where the batch allows
// Exact (FMA) products: batch rows per tile tried first. Their work per block and step scales with
// the tile's rows (the tensor cores pad a tile to 16 rows whatever it holds), so a batch of 16 on four
// clusters of 4 rows quarters each block's product and its share of the exchange, on four times the
// SMs. Measured (H200, 2026-11-27, B16 H256, us per step forward+backward with norms, 4 / 8 / 16
// rows): LSTM float32 9.1 / 10.7 / 15.0 (2 rows: 9.1), GRU 8.0 / 9.2 / -, float64 12.6 / 15.6 / 23.7.
constexpr int kFmaTileRows = 4;
// 16-bit tensor-core products: a tile of 8 rows still fills one 16-row MMA tile, but each block's
// cell math and share of the exchange halve on twice the SMs. Measured as above, 8 / 16 rows: LSTM
// float16 7.5 / 8.1, RNN-tanh 6.1 / 6.6, GRU 6.7 / 7.2 (4 rows: within noise of 8, either side). TF32
// (not measured below 16 rows) keeps kTileRows.
constexpr int kHalfTileRows = 8;
constexpr int kMaxTileRows = 64;       // where a batch needs more clusters than run at once

struct ClusterShape {
  int units;      // hidden units per block (a multiple of unit_grain)
  int tile_rows;  // batch rows per cluster
  int group;      // blocks per tile (Plan::cluster; read by Exchange::Grid, where there is no cluster)
  int copies;     // the backward's exchanged buffers: Plan::copies (Grid: always 2, in global memory)
  int norm_slots;  // the backward's recorded norms' partial sums a row and block: norm_slots(units)
                   // where hidden is a multiple of units (every block with units has as many), else 1
};

// Units per block are a multiple of this: a block's columns of a state row are whole 16-byte chunks
// (the exchanges), and 4 consecutive units have one owner (the FMA backward's register tiles).
__host__ __device__ constexpr int unit_grain(int elem) { return elem == 2 ? 8 : 4; }

// Shared-memory regions, each starting on a 16-byte boundary, laid out the same way on the host (the
// size) and in the kernels (the offsets).
struct Carve {
  size_t bytes = 0;
  __host__ __device__ size_t take(size_t count, size_t elem) {
    const size_t at = (bytes + kChunk - 1) / kChunk * kChunk;
    bytes = at + count * elem;
    return at;
  }
};

struct ForwardLayout {
  size_t bars, bias, own_c, hp, w, stage, bytes;
};

// ClusterAsync: the mbarriers. Grid: one stage (filled from `out` after each step's grid barrier).
__host__ __device__ inline ForwardLayout forward_layout(const Tables& tb, int gates, int units, int tile_rows,
                                                        size_t acc, size_t elem, Exchange x) {
  Carve c;
  ForwardLayout l;
  l.bars = c.take(x == Exchange::ClusterAsync ? 2 : 0, sizeof(uint64_t));  // [2]: stage s % 2 complete
  l.bias = c.take(static_cast<size_t>(gates) * units, acc);      // [G][U]: b_hh of own units
  l.own_c = c.take(static_cast<size_t>(tile_rows) * units, acc);  // [Bt][U]: LSTM c_{t-1}
  l.hp = c.take(static_cast<size_t>(tb.hp_splits) * tb.state_rows * tb.hp_ld, acc);  // [splits][state_rows][HP]
  l.w = c.take(static_cast<size_t>(tb.w_rows) * tb.ld, elem);         // [w_rows][LD]
  // [2][state_rows][LD] (Grid: [1][state_rows][LD])
  l.stage = c.take((x == Exchange::Grid ? 1 : 2) * static_cast<size_t>(tb.state_rows) * tb.ld, elem);
  l.bytes = c.bytes;
  return l;
}

struct BackwardLayout {
  size_t bars, part_g, row_scale, dh_next, dc_next, gbuf, direct, inbox, dgate, w, dgate16, wt, bytes;
};

// `copies` of each exchanged buffer, by step parity (Plan::copies; see the backward kernel); the Σ g²
// partials have two wherever a block may run a step ahead (st.async) or receive them late (2 copies).
// Grid: part_g and the inbox are in global memory (BackwardArgs::scratch, grid_scratch, two copies);
// part_g here holds a copy of the step's partials of g². (The partials of the recorded norms that
// are not needed in the loop go to global memory in every exchange: norm_parts_elements.)
__host__ __device__ inline int part_g_copies(Exchange x, int copies) {
  if (x == Exchange::Grid) return 1;
  return (x == Exchange::ClusterAsync || copies == 2) ? 2 : 1;
}

__host__ __device__ inline BackwardLayout backward_layout(const Tables& tb, int gates, int units, int tile_rows,
                                                          int blocks, size_t acc, size_t elem, bool mma,
                                                          Exchange x, int copies) {
  const size_t rows = tile_rows, ru = static_cast<size_t>(tile_rows) * units, gu = static_cast<size_t>(gates) * units;
  const bool async_exchange = x == Exchange::ClusterAsync, in_smem = x != Exchange::Grid;
  Carve c;
  BackwardLayout l;
  l.bars = c.take(async_exchange ? 4 : 0, sizeof(uint64_t));  // full_g[2], full_in[2]
  l.part_g = c.take(part_g_copies(x, copies) * blocks * rows, sizeof(double));  // [copies][blocks][Bt]: Σ g²
  l.row_scale = c.take(rows, acc);                   // [Bt] clipping scales
  l.dh_next = c.take(ru, acc);  // [Bt][U]: dh_prev of the step processed before, own units
  l.dc_next = c.take(ru, acc);  // [Bt][U] (LSTM)
  l.gbuf = c.take(ru, acc);     // [Bt][U]: g before clipping, then dc_t (LSTM)
  l.direct = c.take(ru, acc);   // [Bt][U]: GRU z ⊙ g
  l.inbox = c.take(in_smem ? copies * blocks * ru : 0, acc);  // [copies][blocks][Bt][U]: shares of own dh_prev
  if (mma) {
    l.dgate = l.w = 0;
    l.dgate16 = c.take(static_cast<size_t>(tb.state_rows) * tb.ldn, elem);  // [state_rows][LDN]
    l.wt = c.take(static_cast<size_t>(tb.wt_rows) * tb.ldn, elem);  // [wt_rows][LDN]
  } else {
    l.dgate16 = l.wt = 0;
    l.dgate = c.take(gu * round_up(tile_rows, 4), acc);  // [G * U][Bt rounded to 4]: transposed
    l.w = c.take(gu * tb.ld, elem);                       // [G * U][LD]
  }
  l.bytes = c.bytes;
  return l;
}

// Exchange::Grid: what the backward's blocks exchange, in global memory (BackwardArgs::scratch; the
// offsets and the size in float64 elements) for `tiles` tiles of `blocks` blocks, two copies of each
// by step parity: the partial sums of g² ([2][tiles][blocks][Bt]) and the inboxes
// ([2][tiles][owner][sender][Bt][U] in the acc dtype, counted as float64: room for float32 too).
struct GridScratch {
  size_t part_g, inbox, elements;
  size_t partials, inboxes;  // the elements of one copy
};

__host__ __device__ inline GridScratch grid_scratch(int tiles, int blocks, int tile_rows, int units) {
  const size_t partials = static_cast<size_t>(tiles) * blocks * tile_rows, inboxes = partials * blocks * units;
  return {0, 2 * partials, 2 * partials + 2 * inboxes, partials, inboxes};
}

// The recorded norms' partial sums of squares (the backward's norm_parts, summed after the loop): a
// row's units are summed by shuffle trees over norm_lanes(units) aligned lanes of a warp (the largest
// power of two dividing `units`, at most 32), norm_slots(units) partials a row and block; where that
// would be more than kMaxNormSlots, one, summed by one thread a row (the buffer grows with the slots:
// N x 2 x blocks of them).
constexpr int kMaxNormSlots = 4;
__host__ __device__ constexpr int norm_lanes(int units) { return (units & -units) < 32 ? (units & -units) : 32; }
__host__ __device__ constexpr int norm_slots(int units) {
  return units > 0 && units / norm_lanes(units) <= kMaxNormSlots ? units / norm_lanes(units) : 1;
}

}  // namespace

namespace detail {

// Each cell's kernels are compiled in a translation unit of their own (persistent_cluster_<cell>.cu,
// from persistent_cluster_kernels.cuh), so that a build compiles them side by side: the kernel of
// cell C for the rest of the plan's choices (persistent_cluster.cu: kernel_for).
template <Cell C>
const void* cluster_kernel(bool forward, DType dtype, Exchange exchange, bool tf32);

#ifdef RNNKERN_STEP_TRACE
// Where cell C's kernels write their trace sums (each translation unit has its own g_step_trace).
template <Cell C>
cudaError_t set_cluster_step_trace(unsigned long long* buffer);
#endif

}  // namespace detail
}  // namespace persistent
}  // namespace rnnkern
