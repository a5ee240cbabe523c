// CUDA implementations of rnnkern::rnn_layer_forward / rnn_layer_backward: the shared layer driver
// (cuBLAS GEMMs through ATen, on the current stream) with the fused CUDA step kernels.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "kernels.h"
#include "persistent.h"
#include "rnnkern/layer_driver.h"

namespace rnnkern {
namespace {

// RNNKERN_CUDA_KERNEL: "auto" (default: the cluster or grid-wide persistent kernels where their plan
// allows and the rules below say they are faster), "persistent" (the grid-wide kernels wherever their
// plan allows), "step" (never persistent), "cluster" (the thread-block-cluster kernels wherever their
// plan allows, sm_90+), "cluster-async" (the same with the st.async/mbarrier exchange,
// Exchange::ClusterAsync), "wide" (the same kernels spread over up to every SM, exchanging through
// L2 with grid barriers: Exchange::Grid, for layers too large for one cluster). auto chooses among
// cluster-async, wide and the grid-wide persistent kernels by the rules below, else the per-step
// kernels. Any other value is an error.
enum class KernelChoice { Auto, Step, Persistent, Cluster, ClusterAsync, Wide };

KernelChoice kernel_choice() {
  const char* value = std::getenv("RNNKERN_CUDA_KERNEL");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "auto") == 0) return KernelChoice::Auto;
  if (std::strcmp(value, "step") == 0) return KernelChoice::Step;
  if (std::strcmp(value, "persistent") == 0) return KernelChoice::Persistent;
  if (std::strcmp(value, "cluster") == 0) return KernelChoice::Cluster;
  if (std::strcmp(value, "cluster-async") == 0) return KernelChoice::ClusterAsync;
  if (std::strcmp(value, "wide") == 0) return KernelChoice::Wide;
  TORCH_CHECK(false, "RNNKERN_CUDA_KERNEL must be auto, persistent, cluster, cluster-async, wide or step, not '",
              value, "'");
}

// The power of two from 1 to `most` in the environment variable `name`; 0 where it is unset or empty.
// Anything else is an error naming the variable and what it takes (`allowed`), not a silent default.
int power_of_two_setting(const char* name, long most, const char* allowed) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return 0;
  char* end = nullptr;
  const long v = std::strtol(value, &end, 10);
  TORCH_CHECK(*end == '\0' && v >= 1 && v <= most && (v & (v - 1)) == 0, name, " must be ", allowed, ", not '",
              value, "'");
  return static_cast<int>(v);
}

// RNNKERN_CLUSTER_BLOCKS: the most blocks a thread-block cluster of the cluster kernels may have (a
// power of two, 1 to 16). Unset (0): the plan takes the largest cluster that fits, or smaller ones
// where a large batch's 16-row tiles need more clusters than run at once. Fewer blocks hold more of
// W_hh each (a longer product per step) and exchange with fewer others; set to measure that
// trade-off (scripts/step_trace.cu sweeps it too).
int max_cluster_blocks() {
  return power_of_two_setting("RNNKERN_CLUSTER_BLOCKS", 16, "1, 2, 4, 8 or 16");
}

// RNNKERN_TILE_ROWS: the most batch rows a tile of the cluster and wide kernels has where its
// clusters (wide: its blocks) all run at once (a power of two, 1 to 64; larger tiles where they do
// not). Unset (0): each dtype's own first size (first_tile_rows, persistent_cluster.cu: 4 for the
// exact FMA products, whose work per block and step scales with the rows; 8 for 16-bit; 16, one
// tensor-core row tile, for TF32). Smaller tiles spread a batch over more SMs, each with less of
// the product and of the exchange; set to measure that trade-off (scripts/step_trace.cu takes it too).
int max_tile_rows() {
  return power_of_two_setting("RNNKERN_TILE_ROWS", 64, "1, 2, 4, 8, 16, 32 or 64");
}

// Shapes where "auto" runs the persistent kernels: where they measured faster than the per-step
// kernels (H200, bench/results/h200.json, bench/NOTES.md). The persistent step time grows with each
// block's share of the recurrent product (SIMT dot products out of shared memory), the per-step
// path's stays near its launch-bound floor (~40 us per step forward+backward) for small layers: the
// persistent kernel won at up to 33K multiply-adds per block and step (B=16, H=256, every cell) and
// lost from 98K (GRU B=16 H=512; LSTM B=64 H=256: 131K; LSTM B=16 H=768: 295K).
constexpr int64_t kPersistentMaxBlockWork = 40 * 1024;

bool persistent_pays_off(Cell cell, int64_t batch, int64_t hidden, const persistent::Plan& plan) {
  return batch * cell_gates(cell) * plan.units * hidden <= kPersistentMaxBlockWork;
}

persistent::Plan decide_kernel(KernelChoice choice, Cell cell, DType dtype, int64_t batch, int64_t hidden,
                               bool proj, int device, bool tf32, int max_cluster, int max_rows) {
  if (choice == KernelChoice::Step) {
    persistent::Plan plan;
    plan.reason = persistent::Decline::Forced;
    return plan;
  }
  if (choice == KernelChoice::Cluster || choice == KernelChoice::ClusterAsync || choice == KernelChoice::Wide) {
    const persistent::Exchange exchange = choice == KernelChoice::Cluster ? persistent::Exchange::ClusterBarrier
                                          : choice == KernelChoice::ClusterAsync ? persistent::Exchange::ClusterAsync
                                                                                 : persistent::Exchange::Grid;
    return persistent::make_cluster_plan(cell, dtype, batch, hidden, proj, device, exchange, tf32, max_cluster,
                                         max_rows);
  }
  if (choice == KernelChoice::Auto) {
    const persistent::Plan plan =
        persistent::auto_cluster_plan(cell, dtype, batch, hidden, proj, device, tf32, max_cluster, max_rows);
    if (plan.ok) return plan;
  }
  persistent::Plan plan = persistent::make_plan(cell, dtype, batch, hidden, proj, device);
  if (plan.ok && choice == KernelChoice::Auto && !persistent_pays_off(cell, batch, hidden, plan)) {
    plan.ok = false;
    plan.reason = persistent::Decline::Heuristic;
  }
  return plan;
}

// decide_kernel, once per layer shape and device: a plan depends on nothing else, and making one
// queries the occupancy of every candidate launch, which each layer call would otherwise repeat.
// (The launches set their kernels' shared-memory attribute themselves.)
persistent::Plan choose_kernel(Cell cell, DType dtype, int64_t batch, int64_t hidden, bool proj,
                               int device) {
  using Key = std::tuple<KernelChoice, Cell, DType, int64_t, int64_t, bool, int, bool, int, int>;
  static std::mutex mutex;
  static std::map<Key, persistent::Plan> plans;
  const KernelChoice choice = kernel_choice();
  const int max_cluster = max_cluster_blocks(), max_rows = max_tile_rows();
  const bool tf32 = dtype == DType::F32 && at::globalContext().allowTF32CuBLAS();
  const Key key{choice, cell, dtype, batch, hidden, proj, device, tf32, max_cluster, max_rows};
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto it = plans.find(key);
    if (it != plans.end()) return it->second;
  }
  const persistent::Plan plan =
      decide_kernel(choice, cell, dtype, batch, hidden, proj, device, tf32, max_cluster, max_rows);
  std::lock_guard<std::mutex> lock(mutex);
  return plans.emplace(key, plan).first->second;
}

// The rows every step has where all have the same (padded input), else 0 (packed, or no steps).
int64_t every_step_rows(const at::Tensor& batch_sizes) {
  const at::Tensor sizes = batch_sizes.contiguous();
  const int64_t steps = sizes.numel();
  const int64_t* size = sizes.data_ptr<int64_t>();
  const int64_t batch = steps > 0 ? size[0] : 0;
  return std::all_of(size, size + steps, [batch](int64_t s) { return s == batch; }) ? batch : 0;
}

// batch_sizes and the row offset of each step, on the device: [2, T] int64, queued on the current stream
// without waiting for it. (Tensor::to from pageable memory synchronises the stream, ATen's
// memcpy_and_sync: at every layer call the host would wait for all queued work, the GPU then idle
// while the host prepares the next launch, and streams meant to overlap, e.g. the layer wavefront's,
// would run one after another.) Every step full (padded input): filled on the device, nothing copied;
// packed: copied from pinned memory (the caching host allocator keeps the buffer until the copy ran).
// `full`: every_step_rows(batch_sizes).
at::Tensor device_geometry(const at::Tensor& batch_sizes, int64_t full, const at::Device& device) {
  const at::Tensor sizes = batch_sizes.contiguous();
  const int64_t steps = sizes.numel();
  const int64_t* size = sizes.data_ptr<int64_t>();
  const at::TensorOptions on_device = at::TensorOptions().dtype(at::kLong).device(device);
  if (full > 0) {
    at::Tensor geometry = at::empty({2, steps}, on_device);
    geometry[0].fill_(full);
    at::Tensor offsets = geometry[1];
    at::arange_out(offsets, 0, steps * full, full);
    return geometry;
  }
  at::Tensor geometry = at::empty({2, steps}, sizes.options().pinned_memory(true));
  int64_t* out = geometry.data_ptr<int64_t>();
  int64_t offset = 0;
  for (int64_t t = 0; t < steps; ++t) {
    out[t] = size[t];
    out[steps + t] = offset;
    offset += size[t];
  }
  return geometry.to(on_device, /*non_blocking=*/true);
}

// RNNKERN_L2_PREFETCH: "1" (default) or "0". With 1 the kernels on clusters prefetch later steps' rows
// into L2 where every step has the whole batch (Args::full_batch); 0 turns that off, to measure it.
bool l2_prefetch() {
  const char* value = std::getenv("RNNKERN_L2_PREFETCH");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "1") == 0) return true;
  TORCH_CHECK(std::strcmp(value, "0") == 0, "RNNKERN_L2_PREFETCH must be 0 or 1, not '", value, "'");
  return false;
}

// RNNKERN_WIDE_EXCHANGE: "tagged" (default) or "barrier": how the wide forwards (Exchange::Grid on
// clusters) hand h_t from step to step: tagged words without a grid barrier (ForwardArgs::exchange), or
// through `out` with the grid's barrier every step, to measure one against the other.
bool tagged_wide_exchange() {
  const char* value = std::getenv("RNNKERN_WIDE_EXCHANGE");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "tagged") == 0) return true;
  TORCH_CHECK(std::strcmp(value, "barrier") == 0, "RNNKERN_WIDE_EXCHANGE must be tagged or barrier, not '", value,
              "'");
  return false;
}

// The fields the persistent forward and backward arguments share: the layer and its time geometry
// (`full`: every_step_rows).
template <typename Args>
void set_layer(Args& a, Cell cell, const at::Tensor& like, const at::Tensor& batch_sizes,
               const at::Tensor& geometry, int64_t full, bool reverse, int64_t batch, int64_t hidden) {
  a.cell = cell;
  a.dtype = dtype_of(like);
  a.steps = batch_sizes.numel();
  a.batch = batch;
  a.hidden = hidden;
  a.sizes = geometry.data_ptr<int64_t>();
  a.offsets = a.sizes + a.steps;
  a.reverse = reverse;
  a.full_batch = l2_prefetch() ? full : 0;
}

// Data pointer of an optional / possibly empty tensor (null for none).
void* ptr_or_null(const at::Tensor& t) {
  return (t.defined() && t.numel() > 0) ? t.data_ptr() : nullptr;
}

// Launches on the current stream of the current device (set by the guard in the op) and checks it.
class CudaStepKernels final : public StepKernels {
 public:
  void forward_step(const ForwardStepArgs& a) const override {
    C10_CUDA_CHECK(cuda::launch_forward_step(a, c10::cuda::getCurrentCUDAStream()));
  }
  void backward_step(const BackwardStepArgs& a) const override {
    C10_CUDA_CHECK(cuda::launch_backward_step(a, c10::cuda::getCurrentCUDAStream()));
  }
  void proj_grad_step(const ProjGradStepArgs& a) const override {
    C10_CUDA_CHECK(cuda::launch_proj_grad_step(a, c10::cuda::getCurrentCUDAStream()));
  }
  void gemm(DType dtype, bool b_nk, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
            const void* b, int64_t ldb, void* c, int64_t ldc) const override {
    cuda::step_gemm(dtype, b_nk, m, n, k, a, lda, b, ldb, c, ldc);
  }


  bool sequence_forward(const SequenceForward& s) const override {
    const int64_t batch = s.h0.size(0), hidden = s.h0.size(1);
    const persistent::Plan plan = choose_kernel(s.cell, dtype_of(s.xp), batch, hidden, false,
                                                s.xp.get_device());
    if (!plan.ok) return false;
    const int64_t full = every_step_rows(s.batch_sizes);
    const at::Tensor geometry = device_geometry(s.batch_sizes, full, s.xp.device());
    const at::Tensor c0 = (s.cell == Cell::LSTM && !s.c0.defined()) ? at::zeros_like(s.h0) : s.c0;
    persistent::ForwardArgs a;
    set_layer(a, s.cell, s.xp, s.batch_sizes, geometry, full, s.reverse, batch, hidden);
    a.xp = s.xp.data_ptr();
    a.w_hh = s.w_hh.data_ptr();
    a.b_hh = ptr_or_null(s.b_hh);
    a.h0 = s.h0.data_ptr();
    a.c0 = ptr_or_null(c0);
    a.out = s.out.data_ptr();
    a.ws = ptr_or_null(s.workspace);
    a.h_n = s.h_n.data_ptr();
    a.c_n = s.cell == Cell::LSTM ? s.c_n.data_ptr() : nullptr;
    const size_t words = tagged_wide_exchange() ? persistent::exchange_words(plan, a.dtype, batch, hidden) : 0;
    const at::Tensor exchange = at::empty({static_cast<int64_t>(words)}, s.xp.options().dtype(at::kInt));
    a.exchange = words > 0 ? exchange.data_ptr() : nullptr;
    C10_CUDA_CHECK(persistent::forward(plan, a, c10::cuda::getCurrentCUDAStream()));
    return true;
  }

  bool sequence_backward(const SequenceBackward& s) const override {
    const int64_t batch = s.h0.size(0), hidden = s.h0.size(1);
    const persistent::Plan plan = choose_kernel(s.cell, dtype_of(s.out), batch, hidden, false,
                                                s.out.get_device());
    if (!plan.ok) return false;
    const int64_t full = every_step_rows(s.batch_sizes);
    const at::Tensor geometry = device_geometry(s.batch_sizes, full, s.out.device());
    const bool lstm = s.cell == Cell::LSTM;
    const at::Tensor c0 = (lstm && !s.c0.defined()) ? at::zeros_like(s.h0) : s.c0;
    const at::Tensor scratch = at::empty(
        {static_cast<int64_t>(persistent::scratch_elements(plan, batch, s.out.size(0), s.record_norms))},
        s.workspace.options().dtype(at::kDouble));
    persistent::BackwardArgs a;
    set_layer(a, s.cell, s.out, s.batch_sizes, geometry, full, s.reverse, batch, hidden);
    a.clip = s.clip;
    a.grad_out = s.grad_out.data_ptr();
    a.grad_h_n = s.grad_h_n.data_ptr();
    a.grad_c_n = lstm ? ptr_or_null(s.grad_c_n) : nullptr;
    a.w_hh = s.w_hh.data_ptr();
    a.h0 = s.h0.data_ptr();
    a.c0 = ptr_or_null(c0);
    a.out = s.out.data_ptr();
    a.ws = ptr_or_null(s.workspace);
    a.dgates_x = s.grad_xp.data_ptr();
    a.dgates_h = s.dgates_h.data_ptr();
    a.grad_h0 = s.grad_h0.data_ptr();
    a.grad_c0 = ptr_or_null(s.grad_c0);
    float* norms = s.norms.data_ptr<float>();
    a.norm_g = s.record_norms ? norms : nullptr;
    a.norm_c = (s.record_norms && lstm) ? norms + s.out.size(0) : nullptr;
    a.scratch = scratch.data_ptr();
    C10_CUDA_CHECK(persistent::backward(plan, a, c10::cuda::getCurrentCUDAStream()));
    return true;
  }
};

// rnnkern::cuda_kernel_plan: what choose_kernel decides for a layer (rnnkern.explain).
std::vector<int64_t> cuda_kernel_plan(int64_t cell, at::ScalarType dtype, int64_t batch,
                                      int64_t hidden, bool has_proj, int64_t device) {
  TORCH_CHECK(cell >= 0 && cell <= 3, "rnnkern: unknown cell id ", cell);
  DType dt = dtype == at::kDouble ? DType::F64
             : dtype == at::kHalf ? DType::F16
             : dtype == at::kBFloat16 ? DType::BF16 : DType::F32;
  const persistent::Plan plan = choose_kernel(static_cast<Cell>(cell), dt, batch, hidden, has_proj,
                                              static_cast<int>(device));
  return {plan.ok ? 1 : 0, static_cast<int64_t>(plan.reason), plan.blocks, plan.units,
          static_cast<int64_t>(plan.smem_forward), static_cast<int64_t>(plan.smem_backward),
          kPersistentMaxBlockWork, plan.cluster, static_cast<int64_t>(plan.exchange), plan.tf32 ? 1 : 0,
          plan.copies};
}

const StepKernels& step_kernels_cuda() {
  static const CudaStepKernels kernels;
  return kernels;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "rnnkern cuda backend: ", name, " must be a CUDA tensor, got ",
              t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    int64_t cell, const at::Tensor& xp, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr, bool reverse,
    double /*clip*/, const std::optional<at::Tensor>& /*norm_probe*/) {
  check_cuda(xp, "xp");
  const c10::cuda::CUDAGuard guard(xp.device());
  return layer_forward(step_kernels_cuda(), cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr,
                       reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
backward_cuda(int64_t cell, const at::Tensor& grad_out, const at::Tensor& grad_h_n,
              const std::optional<at::Tensor>& grad_c_n, const at::Tensor& batch_sizes,
              const at::Tensor& h0, const std::optional<at::Tensor>& c0, const at::Tensor& w_hh,
              const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
              bool reverse, double clip, bool record_norms, const at::Tensor& out,
              const at::Tensor& workspace) {
  check_cuda(out, "out");
  const c10::cuda::CUDAGuard guard(out.device());
  return layer_backward(step_kernels_cuda(), cell, grad_out, grad_h_n, grad_c_n, batch_sizes, h0,
                        c0, w_hh, b_hh, w_hr, reverse, clip, record_norms, out, workspace);
}

}  // namespace
}  // namespace rnnkern

TORCH_LIBRARY_IMPL(rnnkern, CUDA, m) {
  m.impl("rnn_layer_forward", &rnnkern::forward_cuda);
  m.impl("rnn_layer_backward", &rnnkern::backward_cuda);
}

// No tensor arguments: a catch-all kernel.
TORCH_LIBRARY_IMPL(rnnkern, CompositeExplicitAutograd, m) {
  m.impl("cuda_kernel_plan", &rnnkern::cuda_kernel_plan);
}
