// The CUDA forward step: ONE fused kernel per timestep after the cuBLAS GEMM h_{t-1} W_hhᵀ (issued
// by the layer driver): bias, gate math (rnnkern/cell_math.h), state update, saving the workspace.
// One thread per (row, hidden unit); storage type S, accumulation type A (float for 16-bit).
#include "device_utils.cuh"
#include "kernels.h"

namespace rnnkern {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <Cell C, typename S>
__global__ void __launch_bounds__(kThreads) forward_step_kernel(const ForwardStepArgs a) {
  using A = typename AccOf<S>::type;
  const int64_t H = a.hidden;
  const int64_t total = a.rows * H;
  const S* xp = static_cast<const S*>(a.xp);
  const S* hp = static_cast<const S*>(a.hp);
  const S* bias = static_cast<const S*>(a.b_hh);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx - b * H;
    S* h_out = static_cast<S*>(a.h_out) + b * a.ld_h_out;
    if constexpr (C == Cell::LSTM) {
      const S* x = xp + b * 4 * H;
      const S* h = hp + b * 4 * H;
      auto pre = [&](int64_t k) {
        return ld<A>(x, k * H + j) + ld<A>(h, k * H + j) + ld<A>(bias, k * H + j);
      };
      const A* c_prev = prev_row<A>(a.c_prev, b);
      LstmGates<A> act;
      A c, h_t;
      lstm_forward_unit(pre(0), pre(1), pre(2), pre(3), c_prev[j], act, c, h_t);
      A* ws = static_cast<A*>(a.ws) + b * 5 * H;
      ws[j] = act.i;
      ws[H + j] = act.f;
      ws[2 * H + j] = act.g;
      ws[3 * H + j] = act.o;
      ws[4 * H + j] = c;
      h_out[j] = from_acc<S>(h_t);
    } else if constexpr (C == Cell::GRU) {
      const S* x = xp + b * 3 * H;
      const S* h = hp + b * 3 * H;
      auto hside = [&](int64_t k) { return ld<A>(h, k * H + j) + ld<A>(bias, k * H + j); };
      const A hn = hside(2);
      const S* h_prev = prev_row<S>(a.h_prev, b);
      GruGates<A> act;
      A h_t;
      gru_forward_unit(ld<A>(x, j), ld<A>(x, H + j), ld<A>(x, 2 * H + j), hside(0), hside(1), hn,
                       ld<A>(h_prev, j), act, h_t);
      A* ws = static_cast<A*>(a.ws) + b * 4 * H;
      ws[j] = act.r;
      ws[H + j] = act.z;
      ws[2 * H + j] = act.n;
      ws[3 * H + j] = hn;
      h_out[j] = from_acc<S>(h_t);
    } else {
      const A pre = ld<A>(xp, b * H + j) + ld<A>(hp, b * H + j) + ld<A>(bias, j);
      h_out[j] = from_acc<S>(rnn_forward_unit<C == Cell::RNN_RELU>(pre));
    }
  }
}

template <typename S>
cudaError_t launch_forward(const ForwardStepArgs& a, cudaStream_t stream) {
  const int64_t total = a.rows * a.hidden;
  const int64_t blocks64 = ceil_div(total, kThreads);
  const unsigned blocks = static_cast<unsigned>(blocks64 < 65535 * 16 ? blocks64 : 65535 * 16);
  switch (a.cell) {
    case Cell::LSTM:
      forward_step_kernel<Cell::LSTM, S><<<blocks, kThreads, 0, stream>>>(a);
      break;
    case Cell::GRU:
      forward_step_kernel<Cell::GRU, S><<<blocks, kThreads, 0, stream>>>(a);
      break;
    case Cell::RNN_TANH:
      forward_step_kernel<Cell::RNN_TANH, S><<<blocks, kThreads, 0, stream>>>(a);
      break;
    case Cell::RNN_RELU:
      forward_step_kernel<Cell::RNN_RELU, S><<<blocks, kThreads, 0, stream>>>(a);
      break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_forward_step(const ForwardStepArgs& a, cudaStream_t stream) {
  if (a.rows <= 0 || a.hidden <= 0) return cudaSuccess;
  switch (a.dtype) {
    case DType::F32:
      return launch_forward<float>(a, stream);
    case DType::F64:
      return launch_forward<double>(a, stream);
    case DType::F16:
      return launch_forward<__half>(a, stream);
    case DType::BF16:
      return launch_forward<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace rnnkern
