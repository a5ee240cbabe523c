// The device-agnostic layer driver (csrc/include/rnnkern/layer_driver.h). It lives in csrc/cpu/
// because the CPU part of the extension is always built; the CUDA glue links against it.
//
// Rows layout (docs/internals.md): step t owns rows [offset[t], offset[t] + batch_sizes[t]), so
// every per-step slice is a view. Forward direction: every row of step t > 0 continues from step
// t-1; a sample ends at its last step. Reverse direction: rows [0, batch_sizes[t+1]) continue from
// step t+1, the others start from h0; every sample ends at t = 0.
#include "rnnkern/layer_driver.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include "rnnkern/cells.h"

namespace rnnkern {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::F32;
    case at::kDouble:
      return DType::F64;
    case at::kHalf:
      return DType::F16;
    case at::kBFloat16:
      return DType::BF16;
    default:
      TORCH_CHECK(false, "rnnkern: unsupported dtype ", t.scalar_type(),
                  " (expected float32, float64, float16 or bfloat16)");
  }
}

namespace {

at::ScalarType scalar_type_of(DType dtype) {
  switch (dtype) {
    case DType::F64: return at::kDouble;
    case DType::F16: return at::kHalf;
    case DType::BF16: return at::kBFloat16;
    default: return at::kFloat;
  }
}

}  // namespace

void aten_gemm(const at::Device& device, DType dtype, bool b_nk, int64_t m, int64_t n, int64_t k,
               const void* a, int64_t lda, const void* b, int64_t ldb, void* c, int64_t ldc) {
  const auto options = at::TensorOptions().dtype(scalar_type_of(dtype)).device(device);
  // row-major [rows, cols] with leading dimension ld over memory the caller owns
  auto view = [&](const void* p, int64_t rows, int64_t cols, int64_t ld) {
    return at::from_blob(const_cast<void*>(p), {rows, cols}, {ld, 1}, options);
  };
  at::Tensor out = view(c, m, n, ldc);
  at::mm_out(out, view(a, m, k, lda), b_nk ? view(b, n, k, ldb).t() : view(b, k, n, ldb));
}

namespace {

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The time geometry of one layer and direction.
struct Steps {
  int64_t T = 0, B = 0, N = 0;
  bool reverse = false;
  std::vector<int64_t> size, offset;

  Steps(const at::Tensor& batch_sizes, bool reverse_) : reverse(reverse_) {
    TORCH_CHECK(batch_sizes.device().is_cpu() && batch_sizes.scalar_type() == at::kLong &&
                    batch_sizes.dim() == 1,
                "rnnkern: batch_sizes must be a 1-D int64 CPU tensor");
    auto bs = batch_sizes.contiguous();
    const int64_t* p = bs.data_ptr<int64_t>();
    T = bs.numel();
    size.assign(p, p + T);
    offset.resize(T);
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(size[t] >= 0 && (t == 0 || size[t] <= size[t - 1]),
                  "rnnkern: batch_sizes must be non-negative and non-increasing");
      offset[t] = N;
      N += size[t];
    }
    B = T > 0 ? size[0] : 0;
  }
  // The t of the k-th processed step of the forward recurrence.
  int64_t step(int64_t k) const { return reverse ? T - 1 - k : k; }
  // The step processed before t in the forward recurrence (-1: none).
  int64_t prev(int64_t t) const { return reverse ? (t + 1 < T ? t + 1 : -1) : t - 1; }
  // Rows of step t that continue from the previously processed step (the rest start from h0).
  int64_t n_prev(int64_t t) const {
    const int64_t p = prev(t);
    return p < 0 ? 0 : std::min(size[t], size[p]);
  }
  // Rows of step t whose h_t feeds the next processed step (the rest end at t: h_n).
  int64_t n_next(int64_t t) const {
    const int64_t n = reverse ? t - 1 : t + 1;
    return (n < 0 || n >= T) ? 0 : std::min(size[t], size[n]);
  }

  // The rows of step t that belong to samples [lo, hi), counted from sample lo.
  struct Slice {
    int64_t rows = 0;      // 0: none of these samples is active at t
    int64_t off = 0;       // first row of the slice in the packed layout
    int64_t prev_off = 0;  // the same samples' rows in the previously processed step
    int64_t n_prev = 0;    // leading rows continuing from that step (the others start from h0)
    int64_t n_next = 0;    // leading rows whose h_t feeds the next processed step
  };
  Slice slice(int64_t t, int64_t lo, int64_t hi) const {
    Slice s;
    const int64_t end = std::min(hi, size[t]);
    if (end <= lo) return s;
    s.rows = end - lo;
    s.off = offset[t] + lo;
    const int64_t np_all = n_prev(t);
    s.n_prev = std::clamp<int64_t>(np_all - lo, 0, s.rows);
    s.n_next = std::clamp<int64_t>(n_next(t) - lo, 0, s.rows);
    s.prev_off = np_all > 0 ? offset[prev(t)] + lo : 0;
    return s;
  }
};

// Address of row r of a contiguous 2-D tensor: per-step operands are raw pointers, not views.
char* row_ptr(const at::Tensor& t, int64_t r) {
  return static_cast<char*>(t.data_ptr()) + r * t.stride(0) * t.element_size();
}

// Runs fn(lo, hi) over ranges of samples (batch rows) that cover [0, batch). The samples of a layer
// never interact in the recurrence, so on the CPU each thread can run the whole time loop for its own
// samples: one fork per layer instead of two or three per step (BLAS's and the pointwise pass's),
// which dominate small steps. Only where the weights of the per-step products fit in a core's cache
// (every thread reads all of them at every step) and each thread gets several rows; otherwise (and
// on CUDA) one range, whose GEMMs and pointwise passes parallelise inside.
// RNNKERN_CPU_SAMPLE_SPLIT=0|1 forces it off/on (for measurements).
template <typename Fn>
void for_sample_ranges(bool cpu, int64_t batch, int64_t weight_elements,
                       int64_t element_size, const Fn& fn) {
  constexpr int64_t kMaxWeightBytes = 512 * 1024;  // within one core's L2 on current x86 servers
  constexpr int64_t kMinRowsPerThread = 4;
  const int64_t threads = cpu ? at::get_num_threads() : 1;
  int64_t min_rows = kMinRowsPerThread;
  bool split = threads > 1 && batch >= kMinRowsPerThread * 2 &&
               weight_elements * element_size <= kMaxWeightBytes;
  const char* forced = cpu ? std::getenv("RNNKERN_CPU_SAMPLE_SPLIT") : nullptr;
  if (forced != nullptr && (*forced == '0' || *forced == '1')) {
    split = *forced == '1' && threads > 1;
    min_rows = 1;  // forced on: split even the tests' small batches
  }
  if (!split || at::in_parallel_region()) {
    fn(0, batch);
    return;
  }
  const int64_t ranges = std::min(threads, std::max<int64_t>(1, batch / min_rows));
  const int64_t per_range = (batch + ranges - 1) / ranges;
  at::parallel_for(0, ranges, 1, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) fn(r * per_range, std::min(batch, (r + 1) * per_range));
  });
}

// A contiguous [c, r] copy of a CPU tensor's transpose (w [r, c]), bit for bit, in tiles that stay in
// L1: ATen's strided copy (w.t().contiguous()) ran at ~4 GB/s on a 2-core x86 machine, 228 µs for an
// LSTM's 1 MiB W_hh (H = 256), more than a short sequence's whole time loop.
template <typename E>
void transpose_tiles(const E* src, E* dst, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 32;
  for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
    const int64_t i1 = std::min(rows, i0 + kTile);
    for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
      const int64_t j1 = std::min(cols, j0 + kTile);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t i = i0; i < i1; ++i) dst[j * rows + i] = src[i * cols + j];
      }
    }
  }
}

at::Tensor transposed_copy(const at::Tensor& w) {
  const at::Tensor src = w.contiguous();
  at::Tensor dst = at::empty({src.size(1), src.size(0)}, src.options());
  const int64_t rows = src.size(0), cols = src.size(1);
  const void* from = src.data_ptr();
  void* to = dst.data_ptr();
  switch (src.element_size()) {  // (bits moved as unsigned integers of the element's size)
    case 2:
      transpose_tiles(static_cast<const uint16_t*>(from), static_cast<uint16_t*>(to), rows, cols);
      break;
    case 4:
      transpose_tiles(static_cast<const uint32_t*>(from), static_cast<uint32_t*>(to), rows, cols);
      break;
    case 8:
      transpose_tiles(static_cast<const uint64_t*>(from), static_cast<uint64_t*>(to), rows, cols);
      break;
    default:
      dst.copy_(src.t());
  }
  return dst;
}

// The weight operand (StepKernels::gemm's B) of a call's per-step products, made once per call.
// For A·Wᵀ (`transposed`, W [n, k]): on the CPU, for a sequence of kCopyTransposedFromSteps steps or
// more, a contiguous Wᵀ (transposed_copy), which BLAS reads faster at every step than the transposed
// W (MKL: LSTM H = 512, B = 16, 100 steps ~25 against 42 ms); for fewer steps the copy (and the
// first products on the new memory) costs more than it saves (one step of an LSTM at B = 8, H = 256:
// 348 against 68 µs), and BLAS reads W transposed. cuBLAS takes W itself at every length. For A·W
// (W [k, n]): W. In float32 where the device asks for it (StepKernels::float_step_weights).
// Where the device packs such a W (StepKernels::pack_weight: the CPU's MKL, float32, large weights),
// the same sequences take it packed in the BLAS's own layout instead.
constexpr int64_t kCopyTransposedFromSteps = 8;

struct StepWeight {
  at::Tensor keep;
  at::Tensor packed;  // defined: the products go through StepKernels::gemm_packed
  const void* ptr = nullptr;
  bool b_nk = false;
  bool is_float = false;
  int64_t ld = 0;
  StepWeight() = default;
  // rows: the most rows a product of the call has (its batch)
  StepWeight(const StepKernels& kernels, const at::Tensor& w, bool transposed, bool cpu, int64_t steps,
             int64_t rows) {
    const DType dtype = dtype_of(w);
    is_float = kernels.float_step_weights(dtype);
    const bool per_call = cpu && steps >= kCopyTransposedFromSteps;  // (a per-call operand pays off)
    if (per_call && !is_float) {
      keep = w.contiguous();
      const int64_t n = keep.size(transposed ? 0 : 1), k = keep.size(transposed ? 1 : 0);
      packed = kernels.pack_weight(dtype, transposed, rows, n, k, keep.data_ptr(), keep.size(1));
      if (packed.defined()) return;
    }
    const bool copy_t = transposed && per_call;
    keep = copy_t ? transposed_copy(w) : w.contiguous();
    if (is_float) keep = keep.to(at::kFloat);
    b_nk = transposed && !copy_t;
    ld = keep.size(1);
    ptr = keep.data_ptr();
  }
};

// C = A · B for rows of A and C in the layer's dtype, B a StepWeight.
void step_product(const StepKernels& kernels, DType dtype, const StepWeight& w, int64_t m, int64_t n,
                  int64_t k, const void* a, int64_t lda, void* c, int64_t ldc) {
  if (w.packed.defined()) {
    kernels.gemm_packed(dtype, m, n, k, a, lda, w.packed, c, ldc);
  } else if (w.is_float) {
    kernels.gemm_float_b(dtype, w.b_nk, m, n, k, a, lda, static_cast<const float*>(w.ptr), w.ld, c,
                         ldc);
  } else {
    kernels.gemm(dtype, w.b_nk, m, n, k, a, lda, w.ptr, w.ld, c, ldc);
  }
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->contiguous() : at::Tensor();
}

void check_same(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "rnnkern: ", name, " has dtype ",
              t.scalar_type(), ", expected ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "rnnkern: ", name, " is on ", t.device(),
              ", expected ", like.device());
}

struct Dims {
  Cell cell;
  int64_t G, H, P, S;
  bool proj;
};

// Checks the inputs shared by both ops; `like` carries the layer's dtype and device.
Dims check_inputs(int64_t cell_id, const at::Tensor& like, const Steps& steps, const at::Tensor& h0,
                  const at::Tensor& c0, const at::Tensor& w_hh, const at::Tensor& b_hh,
                  const at::Tensor& w_hr) {
  TORCH_CHECK(cell_id >= 0 && cell_id <= 3, "rnnkern: unknown cell id ", cell_id);
  Dims d;
  d.cell = static_cast<Cell>(cell_id);
  d.G = cell_gates(d.cell);
  d.S = cell_workspace_slots(d.cell);
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % d.G == 0, "rnnkern: w_hh must be [G*H, P]");
  d.H = w_hh.size(0) / d.G;
  d.P = w_hh.size(1);
  d.proj = w_hr.defined();
  TORCH_CHECK(!d.proj || d.cell == Cell::LSTM, "rnnkern: w_hr (projection) is LSTM only");
  TORCH_CHECK(d.proj || d.P == d.H, "rnnkern: w_hh has ", d.P, " columns, expected hidden size ",
              d.H);
  if (d.proj) {
    check_same(w_hr, like, "w_hr");
    TORCH_CHECK(w_hr.dim() == 2 && w_hr.size(0) == d.P && w_hr.size(1) == d.H,
                "rnnkern: w_hr must be [P, H]");
  }
  check_same(w_hh, like, "w_hh");
  check_same(h0, like, "h0");
  TORCH_CHECK(h0.dim() == 2 && h0.size(1) == d.P && (steps.T == 0 || h0.size(0) == steps.B),
              "rnnkern: h0 must be [B, P] with B = batch_sizes[0]");
  if (c0.defined()) {
    TORCH_CHECK(d.cell == Cell::LSTM, "rnnkern: c0 is LSTM only");
    check_same(c0, like, "c0");
    TORCH_CHECK(c0.dim() == 2 && c0.size(0) == h0.size(0) && c0.size(1) == d.H,
                "rnnkern: c0 must be [B, H]");
  }
  if (b_hh.defined()) {
    check_same(b_hh, like, "b_hh");
    TORCH_CHECK(b_hh.dim() == 1 && b_hh.size(0) == d.G * d.H, "rnnkern: b_hh must be [G*H]");
  }
  return d;
}

// Rows of h_{t-1} for every row, [N, P]: the right-hand operand of grad_w_hh. Built with as few
// copies as possible (a padded batch needs two).
at::Tensor gather_h_prev(const Steps& steps, const at::Tensor& out, const at::Tensor& h0) {
  at::Tensor h_prev = at::empty_like(out);
  // Pending copy: dst rows [dst, dst+len) <- src rows [src, src+len) of out (from_out) or h0.
  int64_t dst = 0, src = 0, len = 0;
  bool from_out = false;
  auto flush = [&]() {
    if (len > 0) {
      h_prev.narrow(0, dst, len).copy_((from_out ? out : h0).narrow(0, src, len));
    }
    len = 0;
  };
  auto add = [&](int64_t d, bool o, int64_t s, int64_t n) {
    if (n == 0) return;
    if (len > 0 && o == from_out && d == dst + len && s == src + len) {
      len += n;
      return;
    }
    flush();
    dst = d, src = s, len = n, from_out = o;
  };
  for (int64_t k = 0; k < steps.T; ++k) {
    const int64_t t = steps.step(k);
    const int64_t np = steps.n_prev(t);
    if (np > 0) add(steps.offset[t], true, steps.offset[steps.prev(t)], np);
    add(steps.offset[t] + np, false, np, steps.size[t] - np);
  }
  flush();
  return h_prev;
}

// grad_w_hh = Σ_rows dgates_hᵀ h_prev and grad_b_hh = Σ_rows dgates_h: GEMMs over all steps at once.
void weight_gradients(const Steps& steps, const at::Tensor& out, const at::Tensor& h0,
                      const at::Tensor& dgates_h, const at::Tensor& b_hh, at::ScalarType acc,
                      at::Tensor& grad_w_hh, at::Tensor& grad_b_hh) {
  at::mm_out(grad_w_hh, dgates_h.t(), gather_h_prev(steps, out, h0));
  if (b_hh.defined()) {
    if (acc == out.scalar_type()) {
      at::sum_out(grad_b_hh, dgates_h, {0});
    } else if (dgates_h.is_cpu()) {
      // 16-bit on the CPU: a row of ones times dgates_h (ATen's 16-bit GEMM accumulates in float and
      // rounds once, as the sum in float below); the column sum in float took ~0.45 ms at N = 1600,
      // 4H = 512 on two cores, longer than the whole recurrence's products.
      at::Tensor row = grad_b_hh.view({1, -1});
      at::mm_out(row, at::ones({1, dgates_h.size(0)}, dgates_h.options()), dgates_h);
    } else {
      grad_b_hh.copy_(at::sum(dgates_h, {0}, false, acc));
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_forward(
    const StepKernels& kernels, int64_t cell_id, const at::Tensor& xp_in,
    const at::Tensor& batch_sizes, const at::Tensor& h0_in, const std::optional<at::Tensor>& c0_opt,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh_opt,
    const std::optional<at::Tensor>& w_hr_opt, bool reverse) {
  // The ops are differentiated as a whole (register_autograd); the ATen ops inside never are.
  at::AutoDispatchBelowAutograd below_autograd;
  const Steps steps(batch_sizes, reverse);
  const at::Tensor xp = xp_in.contiguous(), h0 = h0_in.contiguous();
  const at::Tensor c0 = contiguous_or_undefined(c0_opt);
  const at::Tensor b_hh_given = contiguous_or_undefined(b_hh_opt);
  const at::Tensor w_hr = contiguous_or_undefined(w_hr_opt);
  const Dims d = check_inputs(cell_id, xp, steps, h0, c0, w_hh, b_hh_given, w_hr);
  TORCH_CHECK(xp.dim() == 2 && xp.size(0) == steps.N && xp.size(1) == d.G * d.H,
              "rnnkern: xp must be [N, G*H] = [", steps.N, ", ", d.G * d.H, "], got ", xp.sizes());
  const DType dtype = dtype_of(xp);
  const auto acc = acc_type(xp.scalar_type());
  const int64_t B = h0.size(0), N = steps.N, H = d.H, P = d.P, GH = d.G * d.H;
  const bool lstm = d.cell == Cell::LSTM;

  at::Tensor out = at::empty({N, P}, xp.options());
  at::Tensor workspace = at::empty({N, d.S * H}, xp.options().dtype(acc));
  at::Tensor h_n = at::empty({B, P}, xp.options());
  at::Tensor c_n = lstm ? at::empty({B, H}, xp.options()) : at::empty({0}, xp.options());
  if (N == 0) {
    h_n.copy_(h0);
    if (lstm) c0.defined() ? c_n.copy_(c0) : c_n.zero_();
    return {out, h_n, c_n, workspace};
  }

  if (!d.proj && kernels.sequence_forward(SequenceForward{d.cell, batch_sizes, reverse, xp, w_hh,
                                                         b_hh_given, h0, c0, out, workspace, h_n,
                                                         c_n})) {
    return {out, h_n, c_n, workspace};
  }

  // Kernels read a bias unconditionally: zeros stand in for a layer without one.
  const at::Tensor b_hh = b_hh_given.defined() ? b_hh_given : at::zeros({GH}, xp.options());
  const at::Tensor c0_acc =
      lstm ? (c0.defined() ? c0.to(acc).contiguous() : at::zeros({B, H}, xp.options().dtype(acc)))
           : at::Tensor();
  const bool cpu = xp.is_cpu();
  const StepWeight w_hh_op(kernels, w_hh, true, cpu, steps.T, B);
  const StepWeight w_hr_op = d.proj ? StepWeight(kernels, w_hr, true, cpu, steps.T, B) : StepWeight();
  at::Tensor hp_buf = at::empty({B, GH}, xp.options());
  at::Tensor hpre_buf = d.proj ? at::empty({B, H}, xp.options()) : at::Tensor();
  const int64_t ws_ld = d.S * H;
  const int64_t acc_bytes = workspace.element_size();

  // The time loop over the samples [lo, hi) (rows lo.. of every step: a sample keeps its row index
  // at every step, and samples never interact in the recurrence).
  auto forward_rows = [&](int64_t lo, int64_t hi) {
    for (int64_t k = 0; k < steps.T; ++k) {
      const Steps::Slice sl = steps.slice(steps.step(k), lo, hi);
      if (sl.rows == 0) continue;
      const int64_t rows = sl.rows, off = sl.off, np = sl.n_prev, prev_off = sl.prev_off;
      // hp = h_{t-1} W_hhᵀ: rows continuing from the previous step, then rows starting from h0
      if (np > 0) {
        step_product(kernels, dtype, w_hh_op, np, GH, P, row_ptr(out, prev_off), P, row_ptr(hp_buf, lo),
                     GH);
      }
      if (np < rows) {
        step_product(kernels, dtype, w_hh_op, rows - np, GH, P, row_ptr(h0, lo + np), P,
                     row_ptr(hp_buf, lo + np), GH);
      }

      ForwardStepArgs a;
      a.cell = d.cell;
      a.dtype = dtype;
      a.rows = rows;
      a.hidden = H;
      a.xp = row_ptr(xp, off);
      a.hp = row_ptr(hp_buf, lo);
      a.b_hh = b_hh.data_ptr();
      a.h_prev = PrevState{np > 0 ? row_ptr(out, prev_off) : nullptr, P, row_ptr(h0, lo), P, np};
      if (lstm) {
        const void* c_step =
            np > 0 ? static_cast<const char*>(workspace.data_ptr()) +
                         (prev_off * ws_ld + 4 * H) * acc_bytes
                   : nullptr;
        a.c_prev = PrevState{c_step, ws_ld, row_ptr(c0_acc, lo), H, np};
      }
      a.h_out = d.proj ? row_ptr(hpre_buf, lo) : row_ptr(out, off);
      a.ld_h_out = d.proj ? H : P;
      a.ws = d.S > 0 ? row_ptr(workspace, off) : nullptr;
      kernels.forward_step(a);
      if (d.proj) {  // out rows = h_t W_hrᵀ
        step_product(kernels, dtype, w_hr_op, rows, P, H, row_ptr(hpre_buf, lo), H, row_ptr(out, off),
                     P);
      }
    }
  };
  for_sample_ranges(cpu, B, d.G * H * P + (d.proj ? P * H : 0), w_hh_op.keep.element_size(),
                    forward_rows);

  // h_n / c_n: each sample's state at its final step. On the CPU, rows of the same dtype by memcpy:
  // ATen's narrow and copy_ cost ~20k instructions a call (dispatch, view bookkeeping, TensorIterator),
  // a third of a one-step call's (LSTM B1 H64).
  const bool c_raw = cpu && workspace.scalar_type() == c_n.scalar_type();
  auto take_final = [&](int64_t t, int64_t lo, int64_t hi) {
    if (hi <= lo) return;
    const int64_t row = steps.offset[t] + lo;
    if (cpu) {
      std::memcpy(row_ptr(h_n, lo), row_ptr(out, row), (hi - lo) * P * out.element_size());
    } else {
      h_n.narrow(0, lo, hi - lo).copy_(out.narrow(0, row, hi - lo));
    }
    if (lstm && c_raw) {
      for (int64_t r = lo; r < hi; ++r) {
        std::memcpy(row_ptr(c_n, r), row_ptr(workspace, row + r - lo) + 4 * H * acc_bytes, H * acc_bytes);
      }
    } else if (lstm) {
      c_n.narrow(0, lo, hi - lo).copy_(workspace.narrow(0, row, hi - lo).narrow(1, 4 * H, H));
    }
  };
  if (reverse) {
    take_final(0, 0, steps.size[0]);
  } else {
    for (int64_t t = 0; t < steps.T; ++t) take_final(t, steps.n_next(t), steps.size[t]);
  }
  return {out, h_n, c_n, workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_backward(const StepKernels& kernels, int64_t cell_id, const at::Tensor& grad_out_in,
               const at::Tensor& grad_h_n_in, const std::optional<at::Tensor>& grad_c_n_opt,
               const at::Tensor& batch_sizes, const at::Tensor& h0_in,
               const std::optional<at::Tensor>& c0_opt, const at::Tensor& w_hh,
               const std::optional<at::Tensor>& b_hh_opt, const std::optional<at::Tensor>& w_hr_opt,
               bool reverse, double clip, bool record_norms, const at::Tensor& out_in,
               const at::Tensor& workspace_in) {
  at::AutoDispatchBelowAutograd below_autograd;
  const Steps steps(batch_sizes, reverse);
  const at::Tensor out = out_in.contiguous(), h0 = h0_in.contiguous();
  const at::Tensor workspace = workspace_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous(), grad_h_n = grad_h_n_in.contiguous();
  at::Tensor grad_c_n = contiguous_or_undefined(grad_c_n_opt);
  const at::Tensor c0 = contiguous_or_undefined(c0_opt);
  const at::Tensor b_hh = contiguous_or_undefined(b_hh_opt);
  const at::Tensor w_hr = contiguous_or_undefined(w_hr_opt);
  const Dims d = check_inputs(cell_id, out, steps, h0, c0, w_hh, b_hh, w_hr);
  const DType dtype = dtype_of(out);
  const auto acc = acc_type(out.scalar_type());
  const int64_t B = h0.size(0), N = steps.N, H = d.H, P = d.P, GH = d.G * d.H;
  const bool lstm = d.cell == Cell::LSTM, gru = d.cell == Cell::GRU;
  TORCH_CHECK(out.dim() == 2 && out.size(0) == N && out.size(1) == P, "rnnkern: out must be [N, P]");
  check_same(grad_out, out, "grad_out");
  TORCH_CHECK(grad_out.sizes() == out.sizes(), "rnnkern: grad_out must be [N, P]");
  check_same(grad_h_n, out, "grad_h_n");
  TORCH_CHECK(grad_h_n.sizes() == h0.sizes(), "rnnkern: grad_h_n must be [B, P]");
  if (grad_c_n.defined() && lstm) {
    check_same(grad_c_n, out, "grad_c_n");
    TORCH_CHECK(grad_c_n.dim() == 2 && grad_c_n.size(0) == B && grad_c_n.size(1) == H,
                "rnnkern: grad_c_n must be [B, H]");
  }
  TORCH_CHECK(workspace.scalar_type() == acc && workspace.dim() == 2 && workspace.size(0) == N &&
                  workspace.size(1) == d.S * H,
              "rnnkern: workspace must be [N, S*H] of the accumulation dtype");

  const auto opts = out.options();
  at::Tensor grad_xp = at::empty({N, GH}, opts);
  at::Tensor norms = at::zeros({2, N}, opts.dtype(at::kFloat));
  at::Tensor grad_w_hh = at::empty({GH, P}, opts);
  at::Tensor grad_b_hh = b_hh.defined() ? at::empty({GH}, opts) : at::empty({0}, opts);
  at::Tensor grad_w_hr = d.proj ? at::empty({P, H}, opts) : at::empty({0}, opts);
  at::Tensor grad_c0 = c0.defined() ? at::empty({B, H}, opts) : at::empty({0}, opts);
  if (N == 0) {
    at::Tensor grad_h0 = grad_h_n.clone();
    grad_w_hh.zero_();
    grad_b_hh.zero_();
    grad_w_hr.zero_();
    if (c0.defined()) grad_c_n.defined() && lstm ? grad_c0.copy_(grad_c_n) : grad_c0.zero_();
    return {grad_xp, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr, norms};
  }

  // Kernels read grad_c_n unconditionally: zeros stand in for an absent one.
  if (lstm && !grad_c_n.defined()) grad_c_n = at::zeros({B, H}, opts);
  // dgates_h: gradient w.r.t. h_{t-1} W_hhᵀ + b_hh; equal to grad_xp except GRU's n-gate.
  at::Tensor dgates_h = gru ? at::empty({N, GH}, opts) : grad_xp;
  if (!d.proj) {
    at::Tensor grad_h0 = at::empty({B, P}, opts);
    if (kernels.sequence_backward(SequenceBackward{d.cell, batch_sizes, reverse, clip, grad_out,
                                                   grad_h_n, grad_c_n, w_hh, h0, c0, out,
                                                   workspace, grad_xp, dgates_h, grad_h0, grad_c0,
                                                   norms, record_norms})) {
      weight_gradients(steps, out, h0, dgates_h, b_hh, acc, grad_w_hh, grad_b_hh);
      return {grad_xp, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr, norms};
    }
  }
  // dh_buf: dgates_h @ W_hh of the last processed step, i.e. the gradient arriving at h_{t-1};
  // after the loop, the gradient at h0. Zero-filled so that grad_h0 is total even for odd input.
  at::Tensor dh_buf = at::zeros({B, P}, opts);
  at::Tensor dh_direct = gru ? at::zeros({B, H}, opts.dtype(acc)) : at::Tensor();
  at::Tensor dc = lstm ? at::zeros({B, H}, opts.dtype(acc)) : at::Tensor();
  at::Tensor g_all = d.proj ? at::empty({N, P}, opts) : at::Tensor();
  at::Tensor hpre_all = d.proj ? at::empty({N, H}, opts) : at::Tensor();
  at::Tensor dh_pre_buf = d.proj ? at::empty({B, H}, opts) : at::Tensor();
  const at::Tensor c0_acc =
      lstm ? (c0.defined() ? c0.to(acc).contiguous() : at::zeros({B, H}, opts.dtype(acc)))
           : at::Tensor();
  // The per-step products dh = dgates_h W_hh and dh_pre = g W_hr read the weights as they are.
  const StepWeight w_hh_c(kernels, w_hh, false, out.is_cpu(), steps.T, B);
  const StepWeight w_hr_c =
      d.proj ? StepWeight(kernels, w_hr, false, out.is_cpu(), steps.T, B) : StepWeight();
  const int64_t ws_ld = d.S * H;
  const int64_t acc_bytes = workspace.element_size();
  auto ws_ptr = [&](int64_t row, int64_t col) -> const void* {
    return static_cast<const char*>(workspace.data_ptr()) + (row * ws_ld + col) * acc_bytes;
  };
  float* norm_g_base = norms.data_ptr<float>();
  float* norm_c_base = norm_g_base + N;

  auto backward_rows = [&](int64_t lo, int64_t hi) {
    for (int64_t k = steps.T - 1; k >= 0; --k) {
      const Steps::Slice sl = steps.slice(steps.step(k), lo, hi);
      if (sl.rows == 0) continue;
      const int64_t rows = sl.rows, off = sl.off, np = sl.n_prev, nn = sl.n_next;
      const int64_t prev_off = sl.prev_off;

      IncomingGrad grad;
      grad.size = P;
      grad.grad_out = row_ptr(grad_out, off);
      grad.dh_next = row_ptr(dh_buf, lo);
      grad.grad_h_n = row_ptr(grad_h_n, lo);
      grad.n_next = nn;

      BackwardStepArgs a;
      a.cell = d.cell;
      a.dtype = dtype;
      a.rows = rows;
      a.hidden = H;
      a.clip = clip;
      a.grad = grad;
      a.norm_g = record_norms ? norm_g_base + off : nullptr;
      a.norm_c = (record_norms && lstm) ? norm_c_base + off : nullptr;
      if (d.proj) {
        ProjGradStepArgs pa;
        pa.dtype = dtype;
        pa.rows = rows;
        pa.clip = clip;
        pa.grad = grad;
        pa.g_out = row_ptr(g_all, off);
        pa.norm_g = a.norm_g;
        kernels.proj_grad_step(pa);
        step_product(kernels, dtype, w_hr_c, rows, H, P, row_ptr(g_all, off), P, row_ptr(dh_pre_buf, lo),
                     H);
        a.dh_pre = row_ptr(dh_pre_buf, lo);
        a.hpre_out = row_ptr(hpre_all, off);
        a.norm_g = nullptr;
      }
      if (gru) {
        a.dh_direct = row_ptr(dh_direct, lo);
        a.dh_direct_out = row_ptr(dh_direct, lo);
        a.dgates_h = row_ptr(dgates_h, off);
        a.h_prev = PrevState{np > 0 ? row_ptr(out, prev_off) : nullptr, P, row_ptr(h0, lo), P, np};
      }
      if (lstm) {
        a.grad_c_n = row_ptr(grad_c_n, lo);
        a.dc = row_ptr(dc, lo);
        a.c_prev = PrevState{np > 0 ? ws_ptr(prev_off, 4 * H) : nullptr, ws_ld, row_ptr(c0_acc, lo),
                             H, np};
      }
      a.ws = d.S > 0 ? ws_ptr(off, 0) : nullptr;
      a.h_out = row_ptr(out, off);
      a.dgates_x = row_ptr(grad_xp, off);
      kernels.backward_step(a);
      step_product(kernels, dtype, w_hh_c, rows, P, GH, row_ptr(dgates_h, off), GH, row_ptr(dh_buf, lo),
                   P);
    }
  };
  for_sample_ranges(out.is_cpu(), B, d.G * H * P + (d.proj ? P * H : 0), w_hh_c.keep.element_size(),
                    backward_rows);

  // Rows of dh_buf (and dh_direct, dc) last written at a sample's first step hold its h0 gradient:
  // later-processed steps have fewer rows and never overwrite them.
  at::Tensor grad_h0 = gru ? (dh_buf.to(acc) + dh_direct).to(out.scalar_type()) : dh_buf;
  if (c0.defined()) grad_c0.copy_(dc);
  weight_gradients(steps, out, h0, dgates_h, b_hh, acc, grad_w_hh, grad_b_hh);
  if (d.proj) at::mm_out(grad_w_hr, g_all.t(), hpre_all);
  return {grad_xp, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr, norms};
}

}  // namespace rnnkern
