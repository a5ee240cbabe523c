// A layer case of the standalone programs (step_trace.cu, plan_model.cu), from the command line:
// CELL:DTYPE:KERNEL[/N][@R]:B:H[:T[:clip]] — CELL lstm|gru|tanh|relu, DTYPE f16|bf16|f32|tf32|f64 (tf32:
// float32 with TF32 allowed), KERNEL cluster|async (or cluster-async)|wide, or auto (the plan backend
// "auto" takes on the kernels on clusters: auto_cluster_plan), /N clusters of at most N blocks (RNNKERN_CLUSTER_BLOCKS), @R
// tiles of at most R batch rows (RNNKERN_TILE_ROWS), T the steps, clip > 0 hidden_grad_clip. Plain C++
// (the host compiler builds plan_model.cu).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "persistent.h"

namespace rnnkern {
namespace persistent {

struct LayerCase {
  Cell cell = Cell::LSTM;
  DType dtype = DType::F16;
  bool tf32 = false;
  Exchange exchange = Exchange::ClusterBarrier;
  bool automatic = false;  // KERNEL auto: auto_cluster_plan picks the exchange (`exchange` unused)
  int max_cluster = 0;  // blocks a cluster may have at most (0: the plan's default, RNNKERN_CLUSTER_BLOCKS unset)
  int max_tile_rows = 0;  // batch rows a tile has at most (0: the plan's default, RNNKERN_TILE_ROWS unset)
  int64_t batch = 16, hidden = 256, steps = 512;
  double clip = 0.0;
  std::string label;
};

// A power of two from 1 to `most` at `text` (the rest of the string), into `out`; false for anything else.
inline bool parse_power_of_two(const char* text, int most, int& out) {
  out = std::atoi(text);
  return out >= 1 && out <= most && (out & (out - 1)) == 0;
}

inline bool parse_layer_case(const std::string& text, LayerCase& c) {
  std::vector<std::string> f;
  size_t start = 0;
  while (true) {
    const size_t colon = text.find(':', start);
    f.push_back(text.substr(start, colon - start));
    if (colon == std::string::npos) break;
    start = colon + 1;
  }
  if (f.size() < 5 || f.size() > 7) return false;
  c.label = text;
  if (f[0] == "lstm") c.cell = Cell::LSTM;
  else if (f[0] == "gru") c.cell = Cell::GRU;
  else if (f[0] == "tanh") c.cell = Cell::RNN_TANH;
  else if (f[0] == "relu") c.cell = Cell::RNN_RELU;
  else return false;
  if (f[1] == "f16") c.dtype = DType::F16;
  else if (f[1] == "bf16") c.dtype = DType::BF16;
  else if (f[1] == "f32") c.dtype = DType::F32;
  else if (f[1] == "tf32") { c.dtype = DType::F32; c.tf32 = true; }
  else if (f[1] == "f64") c.dtype = DType::F64;
  else return false;
  const size_t at = f[2].find('@');
  if (at != std::string::npos) {
    if (!parse_power_of_two(f[2].c_str() + at + 1, 64, c.max_tile_rows)) return false;
    f[2].resize(at);
  }
  const size_t slash = f[2].find('/');
  const std::string kernel = f[2].substr(0, slash);
  if (slash != std::string::npos) {
    if (!parse_power_of_two(f[2].c_str() + slash + 1, 16, c.max_cluster)) return false;
  }
  if (kernel == "cluster") c.exchange = Exchange::ClusterBarrier;
  else if (kernel == "async" || kernel == "cluster-async") c.exchange = Exchange::ClusterAsync;
  else if (kernel == "wide") c.exchange = Exchange::Grid;
  else if (kernel == "auto") c.automatic = true;
  else return false;
  c.batch = std::atoll(f[3].c_str());
  c.hidden = std::atoll(f[4].c_str());
  if (f.size() > 5) c.steps = std::atoll(f[5].c_str());
  if (f.size() > 6) c.clip = std::atof(f[6].c_str());
  return c.batch > 0 && c.hidden > 0 && c.steps > 0;
}

// The case's plan on the kernels on clusters: make_cluster_plan's for the kernel it names, or (auto)
// auto_cluster_plan's, not ok where that pays off nowhere.
inline Plan plan_of(const LayerCase& c) {
  if (c.automatic) {
    return auto_cluster_plan(c.cell, c.dtype, c.batch, c.hidden, false, 0, c.tf32, c.max_cluster, c.max_tile_rows);
  }
  return make_cluster_plan(c.cell, c.dtype, c.batch, c.hidden, false, 0, c.exchange, c.tf32, c.max_cluster,
                           c.max_tile_rows);
}

// The fields a layer's ForwardArgs and BackwardArgs share: the case's, with `steps` steps of the
// packed geometry `sizes` (batch_sizes) and `offsets` (each step's first row), `full` where every step
// has all the batch's rows (Args::full_batch).
template <typename Args>
void set_layer(Args& a, const LayerCase& c, int64_t steps, const int64_t* sizes, const int64_t* offsets,
               bool full, bool reverse = false) {
  a.cell = c.cell;
  a.dtype = c.dtype;
  a.steps = steps;
  a.batch = c.batch;
  a.hidden = c.hidden;
  a.sizes = sizes;
  a.offsets = offsets;
  a.reverse = reverse;
  a.full_batch = full ? c.batch : 0;
}

}  // namespace persistent
}  // namespace rnnkern
