// One layer through the persistent kernels on the emulator (cuda_emulation.h), without a GPU: the
// planner and the launches are the extension's own code (persistent.cu, persistent_cluster.cu), on
// the modelled Hopper of hopper_model.h; the kernels run as fibers. Writes the inputs it drew and
// everything the kernels produced to a file that tests/test_emulated_kernels.py compares with a
// float64 oracle.
//   emulate_layer CASE [--seed N] [--schedule-seed N] [--lengths L0,L1,...] [--reverse] [--no-norms]
//                 [--out FILE]
//   emulate_layer --check-division      (cuda::FastDiv against / and %; exit 0 when all agree)
// CASE: scripts/layer_case.h (CELL:DTYPE:KERNEL[/N][@R]:B:H[:T[:clip]]); KERNEL also "grid" (the grid-wide
// kernels of persistent.cu). --lengths: each sample's length (packed, sorted longest first; default
// all T). Prints the plan on stdout. Exit status: 0 done, 2 bad arguments or a declined plan, 3-6 the
// emulator's findings (an invalid access, a hang, ...; its message on stderr).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "fibers.h"
#include "hopper_model.h"
#include "layer_case.h"
#include "persistent_cluster_layout.cuh"

using namespace rnnkern;
using namespace rnnkern::persistent;

namespace {

// Which pass the next launch runs (the runtime's launch gets the kernel's address and its
// parameters only).
bool g_forward = true;
uint64_t g_schedule_seed = 0;
const void* g_expected_kernel = nullptr;

template <typename Args, typename... Rest>
void run_kernel(const void* kernel, const rnnkern_emu::LaunchSpec& spec, void** params) {
  using Kernel = void (*)(Args, Rest...);
  const Kernel k = reinterpret_cast<Kernel>(const_cast<void*>(kernel));
  const Args args = *static_cast<const Args*>(params[0]);
  std::tuple<Rest...> rest;
  int i = 1;
  std::apply([&](auto&... r) { ((r = *static_cast<std::remove_reference_t<decltype(r)>*>(params[i++])), ...); }, rest);
  rnnkern_emu::run_launch(spec, [&] { std::apply([&](auto... r) { k(args, r...); }, rest); });
}

}  // namespace

extern "C" {

cudaError_t CUDARTAPI cudaGetDeviceProperties(cudaDeviceProp* prop, int) {
  *prop = hopper_model::device();
  return cudaSuccess;
}

// The cluster kernels' launch (persistent_cluster.cu: launch).
cudaError_t CUDARTAPI cudaLaunchKernelExC(const cudaLaunchConfig_t* config, const void* kernel, void** params) {
  if (g_expected_kernel != nullptr && kernel != g_expected_kernel) rnnkern_emu::fail("launched another kernel than the case's");
  rnnkern_emu::LaunchSpec spec;
  spec.blocks = config->gridDim.x;
  spec.threads = config->blockDim.x;
  spec.smem = config->dynamicSmemBytes;
  spec.seed = g_schedule_seed;
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    if (config->attrs[i].id == cudaLaunchAttributeClusterDimension) spec.cluster = static_cast<int>(config->attrs[i].val.clusterDim.x);
    if (config->attrs[i].id == cudaLaunchAttributeCooperative) spec.cooperative = config->attrs[i].val.cooperative != 0;
  }
  if (spec.smem > hopper_model::device().sharedMemPerBlockOptin) return hopper_model::fail(cudaErrorInvalidValue);
  if (g_forward) {
    run_kernel<ForwardArgs, ClusterShape>(kernel, spec, params);
  } else {
    run_kernel<BackwardArgs, ClusterShape>(kernel, spec, params);
  }
  return cudaSuccess;
}

// The wide forward's fill of its tagged words (persistent_cluster.cu: launch), in order as on a stream.
cudaError_t CUDARTAPI cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}

// The grid-wide kernels' launch (persistent.cu: launch).
cudaError_t CUDARTAPI cudaLaunchCooperativeKernel(const void* kernel, dim3 grid, dim3 block, void** params,
                                                  size_t smem, cudaStream_t) {
  rnnkern_emu::LaunchSpec spec;
  spec.blocks = grid.x;
  spec.threads = block.x;
  spec.smem = smem;
  spec.cooperative = true;
  spec.seed = g_schedule_seed;
  if (g_forward) {
    run_kernel<ForwardArgs, int, int>(kernel, spec, params);
  } else {
    run_kernel<BackwardArgs, int, int>(kernel, spec, params);
  }
  return cudaSuccess;
}

}  // extern "C"

namespace {

// Values drawn in double and stored in the layer's dtype.
void fill(void* p, DType d, size_t n, std::mt19937_64& rng, double scale) {
  std::uniform_real_distribution<double> u(-scale, scale);
  for (size_t i = 0; i < n; ++i) {
    const double v = u(rng);
    switch (d) {
      case DType::F64: static_cast<double*>(p)[i] = v; break;
      case DType::F32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
      case DType::F16: static_cast<__half*>(p)[i] = __float2half_rn(static_cast<float>(v)); break;
      default: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(v)); break;
    }
  }
}

struct Array {
  std::string name;
  char type;  // d f h b (bfloat16) q (int64)
  std::vector<int64_t> shape;
  rnnkern_emu::Guarded buf;
  size_t elems() const {
    size_t n = 1;
    for (int64_t s : shape) n *= static_cast<size_t>(s);
    return n;
  }
};

char type_of(DType d) { return d == DType::F64 ? 'd' : d == DType::F32 ? 'f' : d == DType::F16 ? 'h' : 'b'; }
size_t type_size(char t) { return t == 'd' || t == 'q' ? 8 : t == 'f' ? 4 : 2; }

struct Arrays {
  std::vector<Array> all;
  void* add(const std::string& name, char type, std::vector<int64_t> shape) {
    Array a{name, type, std::move(shape), {}};
    a.buf = rnnkern_emu::guarded_alloc(std::max<size_t>(a.elems() * type_size(type), 1));
    all.push_back(std::move(a));
    return all.back().buf.ptr;
  }
  // Name, type, rank, shape, then the bytes, for each array.
  void write(const char* path) const {
    FILE* f = std::fopen(path, "wb");
    if (f == nullptr) rnnkern_emu::fail(std::string("cannot write ") + path);
    for (const Array& a : all) {
      const uint32_t len = static_cast<uint32_t>(a.name.size()), rank = static_cast<uint32_t>(a.shape.size());
      std::fwrite(&len, 4, 1, f);
      std::fwrite(a.name.data(), 1, len, f);
      std::fwrite(&a.type, 1, 1, f);
      std::fwrite(&rank, 4, 1, f);
      std::fwrite(a.shape.data(), 8, rank, f);
      std::fwrite(a.buf.ptr, 1, a.elems() * type_size(a.type), f);
    }
    std::fclose(f);
  }
};

// The cluster kernel the plan's launch must run (persistent_cluster.cu chooses it the same way).
const void* case_kernel(Cell cell, bool forward, const Plan& plan, DType d) {
  switch (cell) {
    case Cell::LSTM: return detail::cluster_kernel<Cell::LSTM>(forward, d, plan.exchange, plan.tf32);
    case Cell::GRU: return detail::cluster_kernel<Cell::GRU>(forward, d, plan.exchange, plan.tf32);
    case Cell::RNN_TANH: return detail::cluster_kernel<Cell::RNN_TANH>(forward, d, plan.exchange, plan.tf32);
    default: return detail::cluster_kernel<Cell::RNN_RELU>(forward, d, plan.exchange, plan.tf32);
  }
}

int usage() {
  std::fprintf(stderr,
               "usage: emulate_layer CELL:DTYPE:KERNEL[/N][@R]:B:H[:T[:clip]] [--seed N] [--schedule-seed N] "
               "[--lengths L0,L1,...] [--reverse] [--no-norms] [--wide-barrier] [--out FILE]\n"
               "       emulate_layer --check-division\n");
  return 2;
}

}  // namespace

// cuda::FastDiv (the kernels' divisions by launch constants) against `/` and `%`: every divisor up to
// 4096 and a spread of larger ones, each with every dividend up to 4096, those around multiples of
// the divisor and of powers of two, the largest ones, and random ones; the same code as the kernels
// run (on the GPU its multiply-high is __umulhi, the same 32 x 32 -> upper 32 bits).
int check_division() {
  std::mt19937_64 rng(12345);
  std::vector<int> divisors;
  for (int d = 1; d <= 4096; ++d) divisors.push_back(d);
  for (int k = 12; k < 31; ++k) {
    for (int e : {-1, 0, 1}) divisors.push_back((1 << k) + e);
  }
  divisors.push_back(2147483647);
  for (int i = 0; i < 2000; ++i) divisors.push_back(static_cast<int>(rng() % 2147483647u) + 1);
  int64_t checks = 0;
  for (const int d : divisors) {
    const cuda::FastDiv f(d);
    std::vector<int> ns;
    for (int n = 0; n <= 4096; ++n) ns.push_back(n);
    for (int64_t m = 1; m <= 64; ++m) {
      for (int64_t e = -1; e <= 1; ++e) {
        const int64_t n = m * d + e, p = (int64_t(1) << (m % 31 + 1)) + e;
        if (n >= 0 && n < 2147483648LL) ns.push_back(static_cast<int>(n));
        if (p >= 0 && p < 2147483648LL) ns.push_back(static_cast<int>(p));
      }
    }
    for (int i = 0; i < 64; ++i) ns.push_back(2147483647 - i);
    for (int i = 0; i < 256; ++i) ns.push_back(static_cast<int>(rng() % 2147483648u));
    for (const int n : ns) {
      ++checks;
      if (f.div(n) != n / d || f.mod(n) != n % d) {
        std::printf("division wrong: %d / %d gave %d rem %d, not %d rem %d\n", n, d, f.div(n), f.mod(n), n / d, n % d);
        return 1;
      }
    }
  }
  std::printf("division ok: %lld checks over %zu divisors\n", static_cast<long long>(checks), divisors.size());
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  if (std::strcmp(argv[1], "--check-division") == 0) return check_division();
  std::string spec = argv[1];
  bool grid_kernels = false;
  {  // "grid": the grid-wide kernels (make_plan), not in layer_case.h's syntax
    const size_t a = spec.find(':'), b = spec.find(':', a + 1), c = spec.find(':', b + 1);
    if (a != std::string::npos && b != std::string::npos && spec.substr(b + 1, c - b - 1) == "grid") {
      grid_kernels = true;
      spec = spec.substr(0, b + 1) + "cluster" + spec.substr(c);
    }
  }
  LayerCase c;
  c.steps = 5;
  if (!parse_layer_case(spec, c)) return usage();
  uint64_t seed = 1;
  bool reverse = false, norms = true, wide_barrier = false;
  std::vector<int64_t> lengths;
  std::string out_path = "emulated.bin";
  g_schedule_seed = 0;
  bool schedule_set = false;
  for (int i = 2; i < argc; ++i) {
    const std::string arg = argv[i];
    const bool has_value = i + 1 < argc;
    if (arg == "--seed" && has_value) {
      seed = std::strtoull(argv[++i], nullptr, 10);
    } else if (arg == "--schedule-seed" && has_value) {
      g_schedule_seed = std::strtoull(argv[++i], nullptr, 10);
      schedule_set = true;
    } else if (arg == "--lengths" && has_value) {
      for (char* p = argv[++i]; *p;) {
        lengths.push_back(std::strtoll(p, &p, 10));
        if (*p == ',') ++p;
      }
    } else if (arg == "--reverse") {
      reverse = true;
    } else if (arg == "--no-norms") {
      norms = false;
    } else if (arg == "--wide-barrier") {  // the wide forward through `out` and the grid's barrier
      wide_barrier = true;
    } else if (arg == "--out" && has_value) {
      out_path = argv[++i];
    } else {
      return usage();
    }
  }
  if (!schedule_set) g_schedule_seed = seed;
  const int64_t B = c.batch, H = c.hidden;
  if (lengths.empty()) lengths.assign(static_cast<size_t>(B), c.steps);
  if (static_cast<int64_t>(lengths.size()) != B) return usage();
  for (size_t i = 0; i < lengths.size(); ++i) {
    if (lengths[i] < 1 || lengths[i] > c.steps || (i > 0 && lengths[i] > lengths[i - 1])) return usage();
  }
  const int64_t T = lengths[0];
  const int G = cell_gates(c.cell), S = cell_workspace_slots(c.cell);
  const DType d = c.dtype;
  const char ty = type_of(d), acc = d == DType::F64 ? 'd' : 'f';

  const Plan plan = grid_kernels ? make_plan(c.cell, d, B, H, false, 0)
                                 : plan_of(c);
  std::printf("plan ok=%d reason=%d cluster=%d blocks=%d units=%d tile_rows=%d copies=%d tf32=%d exchange=%d "
              "smem_forward=%zu smem_backward=%zu\n",
              plan.ok ? 1 : 0, static_cast<int>(plan.reason), plan.cluster, plan.blocks, plan.units, plan.tile_rows,
              plan.copies, plan.tf32 ? 1 : 0, static_cast<int>(plan.exchange), plan.smem_forward, plan.smem_backward);
  std::fflush(stdout);
  if (!plan.ok) return 2;

  // The packed geometry: batch_sizes[t] samples at step t, rows offsets[t]...
  std::vector<int64_t> sizes(static_cast<size_t>(T)), offsets(static_cast<size_t>(T));
  int64_t N = 0;
  for (int64_t t = 0; t < T; ++t) {
    int64_t n = 0;
    for (int64_t len : lengths) n += len > t ? 1 : 0;
    sizes[static_cast<size_t>(t)] = n;
    offsets[static_cast<size_t>(t)] = N;
    N += n;
  }
  Arrays arrays;
  auto* sizes_d = static_cast<int64_t*>(arrays.add("batch_sizes", 'q', {T}));
  auto* offsets_d = static_cast<int64_t*>(arrays.add("offsets", 'q', {T}));
  std::memcpy(sizes_d, sizes.data(), sizes.size() * 8);
  std::memcpy(offsets_d, offsets.data(), offsets.size() * 8);
  const bool full = std::all_of(sizes.begin(), sizes.end(), [B](int64_t n) { return n == B; });
  std::mt19937_64 rng(seed);
  const double w_scale = 1.5 / std::sqrt(static_cast<double>(H));
  // An input array of this shape drawn from rng (uniform in [-scale, scale], as `fill`), in this
  // order: the draws, and so a seed's data, are the program's contract with its readers.
  const auto random = [&](const char* name, std::vector<int64_t> shape, double scale) {
    size_t n = 1;
    for (int64_t extent : shape) n *= static_cast<size_t>(extent);
    void* p = arrays.add(name, ty, std::move(shape));
    fill(p, d, n, rng, scale);
    return p;
  };
  const bool lstm = c.cell == Cell::LSTM;
  void* xp = random("xp", {N, G * H}, 1.0);
  void* w_hh = random("w_hh", {G * H, H}, w_scale);
  void* b_hh = random("b_hh", {G * H}, 0.5);
  void* h0 = random("h0", {B, H}, 1.0);
  void* c0 = lstm ? random("c0", {B, H}, 1.0) : nullptr;
  void* grad_out = random("grad_out", {N, H}, 1.0);
  void* grad_h_n = random("grad_h_n", {B, H}, 1.0);
  void* grad_c_n = lstm ? random("grad_c_n", {B, H}, 1.0) : nullptr;

  ForwardArgs f;
  set_layer(f, c, T, sizes_d, offsets_d, full, reverse);
  f.xp = xp;
  f.w_hh = w_hh;
  f.b_hh = b_hh;
  f.h0 = h0;
  f.c0 = c0;
  f.out = arrays.add("out", ty, {N, H});
  f.ws = S > 0 ? arrays.add("ws", acc, {N, S * H}) : nullptr;
  f.h_n = arrays.add("h_n", ty, {B, H});
  f.c_n = c.cell == Cell::LSTM ? arrays.add("c_n", ty, {B, H}) : nullptr;
  const size_t words = wide_barrier ? 0 : exchange_words(plan, d, B, H);
  f.exchange = words > 0 ? rnnkern_emu::guarded_alloc(words * sizeof(uint32_t)).ptr : nullptr;
  g_forward = true;
  if (!grid_kernels) g_expected_kernel = case_kernel(c.cell, true, plan, d);
  if (forward(plan, f, nullptr) != cudaSuccess) rnnkern_emu::fail("the forward's launch failed");

  BackwardArgs bw;
  set_layer(bw, c, T, sizes_d, offsets_d, full, reverse);
  bw.clip = c.clip;
  bw.grad_out = grad_out;
  bw.grad_h_n = grad_h_n;
  bw.grad_c_n = grad_c_n;
  bw.w_hh = w_hh;
  bw.h0 = h0;
  bw.c0 = c0;
  bw.out = f.out;
  bw.ws = f.ws;
  bw.dgates_x = arrays.add("dgates_x", ty, {N, G * H});
  bw.dgates_h = c.cell == Cell::GRU ? arrays.add("dgates_h", ty, {N, G * H}) : nullptr;
  bw.grad_h0 = arrays.add("grad_h0", ty, {B, H});
  bw.grad_c0 = c.cell == Cell::LSTM ? arrays.add("grad_c0", ty, {B, H}) : nullptr;
  bw.norm_g = norms ? static_cast<float*>(arrays.add("norm_g", 'f', {N})) : nullptr;
  bw.norm_c = norms && c.cell == Cell::LSTM ? static_cast<float*>(arrays.add("norm_c", 'f', {N})) : nullptr;
  const size_t scratch = scratch_elements(plan, B, N, norms);
  bw.scratch = scratch > 0 ? arrays.add("scratch", 'd', {static_cast<int64_t>(scratch)}) : nullptr;
  g_forward = false;
  if (!grid_kernels) g_expected_kernel = case_kernel(c.cell, false, plan, d);
  if (backward(plan, bw, nullptr) != cudaSuccess) rnnkern_emu::fail("the backward's launch failed");
  arrays.write(out_path.c_str());
  std::printf("wrote %s\n", out_path.c_str());
  return 0;
}
