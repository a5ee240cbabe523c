// The CUDA backward step: ONE fused kernel per timestep (one block per row). It assembles
// g = grad_out + dh_next (+ GRU's z ⊙ g_next, or grad_h_n at the sample's final step), reduces ‖g‖²
// over the row in the same kernel (deterministic block reduction), records ‖g‖ before clipping,
// applies the clip, and writes the gate gradients (and ‖dc‖ for LSTM). The driver then runs the
// cuBLAS GEMM dgates @ W_hh. LSTM with projection: proj_grad_step_kernel does the g part (norm,
// clip, write g for the GEMM g @ W_hr) and this kernel the cell part.
#include "device_utils.cuh"
#include "kernels.h"

namespace rnnkern {
namespace cuda {
namespace {

// The incoming gradient of row b (docs/internals.md).
template <typename S, typename A>
struct RowGrad {
  const S* grad_out;
  const S* from;    // dh_next row (continuing sample) or grad_h_n row (final step)
  const A* direct;  // GRU: z ⊙ g of the next step, or null
  __device__ __forceinline__ A at(int64_t j) const {
    A g = ld<A>(grad_out, j) + ld<A>(from, j);
    if (direct != nullptr) g += direct[j];
    return g;
  }
};

template <typename S, typename A>
__device__ __forceinline__ RowGrad<S, A> row_grad(const IncomingGrad& in, int64_t b,
                                                  const A* dh_direct) {
  const bool continues = b < in.n_next;
  return RowGrad<S, A>{static_cast<const S*>(in.grad_out) + b * in.size,
                       continues ? static_cast<const S*>(in.dh_next) + b * in.size
                                 : static_cast<const S*>(in.grad_h_n) + b * in.size,
                       (continues && dh_direct != nullptr) ? dh_direct + b * in.size : nullptr};
}

// With clipping, a first pass over the row computes ‖g‖ (and records it); returns g's scale.
template <typename S, typename A>
__device__ __forceinline__ A pre_clip_scale(const RowGrad<S, A>& g, int64_t n, double clip,
                                            float* norm_out, double* scratch) {
  double sq = 0.0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) sq += square(g.at(j));
  const double norm = sqrt(block_sum(sq, scratch));
  if (norm_out != nullptr && threadIdx.x == 0) *norm_out = static_cast<float>(norm);
  return clip_scale_of<A>(norm, clip);
}

template <Cell C, typename S>
__global__ void backward_step_kernel(const BackwardStepArgs a) {
  using A = typename AccOf<S>::type;
  __shared__ double scratch[32];
  const int64_t b = blockIdx.x;
  const int64_t H = a.hidden;
  const bool projected = C == Cell::LSTM && a.dh_pre != nullptr;
  const bool clipping = a.clip > 0.0;
  // Uniform across the block, so the reductions below are reached by every thread or none.
  const bool norm_in_pass = !projected && a.norm_g != nullptr && !clipping;
  const RowGrad<S, A> g = row_grad<S, A>(
      a.grad, b, C == Cell::GRU ? static_cast<const A*>(a.dh_direct) : nullptr);
  float* norm_g = a.norm_g != nullptr ? a.norm_g + b : nullptr;
  const A scale = (!projected && clipping) ? pre_clip_scale(g, H, a.clip, norm_g, scratch) : A(1);

  double g_sq = 0.0, dc_sq = 0.0;
  if constexpr (C == Cell::LSTM) {
    const A* ws = static_cast<const A*>(a.ws) + b * 5 * H;
    const A* c_prev = prev_row<A>(a.c_prev, b);
    const bool continues = b < a.grad.n_next;
    const A* dc_in = static_cast<const A*>(a.dc) + b * H;
    const S* grad_c_n = static_cast<const S*>(a.grad_c_n) + b * H;
    A* dc_out = static_cast<A*>(a.dc) + b * H;
    S* dgates = static_cast<S*>(a.dgates_x) + b * 4 * H;
    const S* dh_pre = projected ? static_cast<const S*>(a.dh_pre) + b * H : nullptr;
    S* hpre = projected ? static_cast<S*>(a.hpre_out) + b * H : nullptr;
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      A dh;
      if (projected) {
        dh = ld<A>(dh_pre, j);
      } else {
        const A g_j = g.at(j);
        g_sq += square(g_j);
        dh = g_j * scale;
      }
      const LstmGates<A> act{ws[j], ws[H + j], ws[2 * H + j], ws[3 * H + j]};
      const A tc = rk_tanh(ws[4 * H + j]);
      const A dc_next = continues ? dc_in[j] : ld<A>(grad_c_n, j);
      LstmGates<A> dpre;
      A dc_total, dc_prev;
      lstm_backward_unit_tanh(dh, dc_next, act, tc, c_prev[j], dpre, dc_total, dc_prev);
      dc_sq += square(dc_total);
      dgates[j] = from_acc<S>(dpre.i);
      dgates[H + j] = from_acc<S>(dpre.f);
      dgates[2 * H + j] = from_acc<S>(dpre.g);
      dgates[3 * H + j] = from_acc<S>(dpre.o);
      dc_out[j] = dc_prev;
      if (projected) hpre[j] = from_acc<S>(act.o * tc);
    }
  } else if constexpr (C == Cell::GRU) {
    const A* ws = static_cast<const A*>(a.ws) + b * 4 * H;
    const S* h_prev = prev_row<S>(a.h_prev, b);
    S* dx = static_cast<S*>(a.dgates_x) + b * 3 * H;
    S* dhh = static_cast<S*>(a.dgates_h) + b * 3 * H;
    A* direct_out = static_cast<A*>(a.dh_direct_out) + b * H;
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      const A g_j = g.at(j);  // reads dh_direct[j] before this thread overwrites it below
      g_sq += square(g_j);
      const GruGates<A> act{ws[j], ws[H + j], ws[2 * H + j]};
      GruGates<A> d_x, d_h;
      A direct;
      gru_backward_unit(g_j * scale, act, ws[3 * H + j], ld<A>(h_prev, j), d_x, d_h, direct);
      dx[j] = from_acc<S>(d_x.r);
      dx[H + j] = from_acc<S>(d_x.z);
      dx[2 * H + j] = from_acc<S>(d_x.n);
      dhh[j] = from_acc<S>(d_h.r);
      dhh[H + j] = from_acc<S>(d_h.z);
      dhh[2 * H + j] = from_acc<S>(d_h.n);
      direct_out[j] = direct;
    }
  } else {
    const S* h = static_cast<const S*>(a.h_out) + b * H;
    S* dx = static_cast<S*>(a.dgates_x) + b * H;
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      const A g_j = g.at(j);
      g_sq += square(g_j);
      dx[j] = from_acc<S>(rnn_backward_unit<C == Cell::RNN_RELU>(g_j * scale, ld<A>(h, j)));
    }
  }
  if (norm_in_pass) {
    const double total = block_sum(g_sq, scratch);
    if (threadIdx.x == 0) *norm_g = static_cast<float>(sqrt(total));
  }
  if (C == Cell::LSTM && a.norm_c != nullptr) {
    const double total = block_sum(dc_sq, scratch);
    if (threadIdx.x == 0) a.norm_c[b] = static_cast<float>(sqrt(total));
  }
}

// LSTM with projection: g (size P) assembled, normed, clipped and written for g @ W_hr.
template <typename S>
__global__ void proj_grad_step_kernel(const ProjGradStepArgs a) {
  using A = typename AccOf<S>::type;
  __shared__ double scratch[32];
  const int64_t b = blockIdx.x;
  const int64_t P = a.grad.size;
  const RowGrad<S, A> g = row_grad<S, A>(a.grad, b, static_cast<const A*>(nullptr));
  const A scale = pre_clip_scale(g, P, a.clip, a.norm_g != nullptr ? a.norm_g + b : nullptr, scratch);
  S* g_out = static_cast<S*>(a.g_out) + b * P;
  for (int64_t j = threadIdx.x; j < P; j += blockDim.x) g_out[j] = from_acc<S>(g.at(j) * scale);
}

template <typename S>
cudaError_t launch_backward(const BackwardStepArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.rows));
  const int threads = row_block_threads(a.hidden);
  switch (a.cell) {
    case Cell::LSTM:
      backward_step_kernel<Cell::LSTM, S><<<grid, threads, 0, stream>>>(a);
      break;
    case Cell::GRU:
      backward_step_kernel<Cell::GRU, S><<<grid, threads, 0, stream>>>(a);
      break;
    case Cell::RNN_TANH:
      backward_step_kernel<Cell::RNN_TANH, S><<<grid, threads, 0, stream>>>(a);
      break;
    case Cell::RNN_RELU:
      backward_step_kernel<Cell::RNN_RELU, S><<<grid, threads, 0, stream>>>(a);
      break;
  }
  return cudaGetLastError();
}

template <typename S>
cudaError_t launch_proj_grad(const ProjGradStepArgs& a, cudaStream_t stream) {
  proj_grad_step_kernel<S>
      <<<static_cast<unsigned>(a.rows), row_block_threads(a.grad.size), 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_backward_step(const BackwardStepArgs& a, cudaStream_t stream) {
  if (a.rows <= 0 || a.hidden <= 0) return cudaSuccess;
  switch (a.dtype) {
    case DType::F32:
      return launch_backward<float>(a, stream);
    case DType::F64:
      return launch_backward<double>(a, stream);
    case DType::F16:
      return launch_backward<__half>(a, stream);
    case DType::BF16:
      return launch_backward<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_proj_grad_step(const ProjGradStepArgs& a, cudaStream_t stream) {
  if (a.rows <= 0 || a.grad.size <= 0) return cudaSuccess;
  switch (a.dtype) {
    case DType::F32:
      return launch_proj_grad<float>(a, stream);
    case DType::F64:
      return launch_proj_grad<double>(a, stream);
    case DType::F16:
      return launch_proj_grad<__half>(a, stream);
    case DType::BF16:
      return launch_proj_grad<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace rnnkern
