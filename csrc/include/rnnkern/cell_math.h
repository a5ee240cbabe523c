// The gate math of every cell, written once for the CPU (C++) and CUDA kernels.
//
// Each function works on one hidden unit of one row. T is the accumulation type (float or double).
// The functions use only arithmetic and the activation helpers below, so a caller may provide
// overloads of rk_sigmoid / rk_tanh / rk_relu / rk_relu_grad / rk_select_gt for a SIMD type
// (declare them before including this header) and instantiate the same templates on vectors.
#pragma once

#include <math.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RNNKERN_HD __host__ __device__ __forceinline__
#else
#define RNNKERN_HD inline
#endif

namespace rnnkern {

RNNKERN_HD float rk_exp(float x) { return expf(x); }
RNNKERN_HD double rk_exp(double x) { return exp(x); }
RNNKERN_HD float rk_tanh(float x) { return tanhf(x); }
RNNKERN_HD double rk_tanh(double x) { return tanh(x); }
// 1 / (1 + e^-x): saturates cleanly to 0 and 1, and propagates NaN.
// On the GPU the reciprocal is the hardware's (rcp.approx, within 1 ulp) refined by one Newton step,
// not the IEEE division: that one branches to a slow path for huge or tiny divisors, and the branch
// kept the compiler from overlapping a cell's three sigmoids, a serial chain on every step of the
// persistent kernels (their SASS). 1 + e^-x >= 1, so only +inf needs care (where the Newton step
// would turn rcp(inf) = 0 into NaN).
RNNKERN_HD float rk_sigmoid(float x) {
#ifdef __CUDA_ARCH__
  const float d = 1.0f + expf(-x);
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
  r = fmaf(r, fmaf(-d, r, 1.0f), r);
  return d == INFINITY ? 0.0f : r;
#else
  return 1.0f / (1.0f + expf(-x));
#endif
}
RNNKERN_HD double rk_sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
// ReLU that propagates NaN as torch.relu does (NaN > 0 is false, so test x < 0 instead).
RNNKERN_HD float rk_relu(float x) { return x < 0.0f ? 0.0f : x; }
RNNKERN_HD double rk_relu(double x) { return x < 0.0 ? 0.0 : x; }
// d relu / d pre, expressed through the output h = relu(pre), as torch's threshold_backward:
// h <= 0 ? 0 : dh (so a NaN output passes its gradient through, as in torch.nn).
RNNKERN_HD float rk_relu_grad(float h, float dh) { return h <= 0.0f ? 0.0f : dh; }
RNNKERN_HD double rk_relu_grad(double h, double dh) { return h <= 0.0 ? 0.0 : dh; }

// ---------------------------------------------------------------------------------------------
// LSTM. Pre-activations include x W_ihᵀ + b_ih + h W_hhᵀ + b_hh. Gate order i, f, g, o.
template <typename T>
struct LstmGates {
  T i, f, g, o;
};

template <typename T>
RNNKERN_HD void lstm_forward_unit(T pre_i, T pre_f, T pre_g, T pre_o, T c_prev, LstmGates<T>& a,
                                  T& c, T& h) {
  a.i = rk_sigmoid(pre_i);
  a.f = rk_sigmoid(pre_f);
  a.g = rk_tanh(pre_g);
  a.o = rk_sigmoid(pre_o);
  c = a.f * c_prev + a.i * a.g;
  h = a.o * rk_tanh(c);  // before the projection, when there is one
}

// dh: gradient at o*tanh(c_t) (after clipping and, with a projection, after g @ W_hr).
// dc_next: gradient arriving at c_t from step t+1 (or grad_c_n). Produces the total dc at c_t
// (whose norm is recorded), the pre-activation gradients, and the gradient flowing to c_{t-1}.
// This overload takes tc = tanh(c_t), for callers that also need o*tanh(c_t) (the projection).
template <typename T>
RNNKERN_HD void lstm_backward_unit_tanh(T dh, T dc_next, const LstmGates<T>& a, T tc, T c_prev,
                                        LstmGates<T>& dpre, T& dc_total, T& dc_prev) {
  dc_total = dc_next + dh * a.o * (T(1) - tc * tc);
  dpre.o = dh * tc * a.o * (T(1) - a.o);
  dpre.i = dc_total * a.g * a.i * (T(1) - a.i);
  dpre.f = dc_total * c_prev * a.f * (T(1) - a.f);
  dpre.g = dc_total * a.i * (T(1) - a.g * a.g);
  dc_prev = dc_total * a.f;
}

template <typename T>
RNNKERN_HD void lstm_backward_unit(T dh, T dc_next, const LstmGates<T>& a, T c, T c_prev,
                                   LstmGates<T>& dpre, T& dc_total, T& dc_prev) {
  lstm_backward_unit_tanh(dh, dc_next, a, rk_tanh(c), c_prev, dpre, dc_total, dc_prev);
}

// ---------------------------------------------------------------------------------------------
// GRU. xr, xz, xn = x W_ihᵀ + b_ih slices; hr, hz, hn = h W_hhᵀ + b_hh slices (b_hn stays inside
// r ⊙ (…), as torch.nn.GRU defines it).
template <typename T>
struct GruGates {
  T r, z, n;
};

template <typename T>
RNNKERN_HD void gru_forward_unit(T xr, T xz, T xn, T hr, T hz, T hn, T h_prev, GruGates<T>& a,
                                 T& h) {
  a.r = rk_sigmoid(xr + hr);
  a.z = rk_sigmoid(xz + hz);
  a.n = rk_tanh(xn + a.r * hn);
  h = (T(1) - a.z) * a.n + a.z * h_prev;
}

// dh: the (clipped) total gradient at h_t. dx_*: gradients w.r.t. the x-side pre-activations
// (= grad_xp); dh_*: w.r.t. the h-side (h W_hhᵀ + b_hh) — equal except for n, which is scaled by r.
// dh_prev_direct: the part of dL/dh_{t-1} through z ⊙ h_{t-1} (the GEMM part is added by the caller).
template <typename T>
RNNKERN_HD void gru_backward_unit(T dh, const GruGates<T>& a, T hn, T h_prev, GruGates<T>& dx,
                                  GruGates<T>& dhh, T& dh_prev_direct) {
  // dh - dh z, not dh (1 - z): torch.nn computes h = (h_prev - n) z + n, whose autograd gives this,
  // and so an infinite dh gives NaN here as there (equal otherwise, within rounding).
  const T dn = dh - dh * a.z;
  const T dz = dh * (h_prev - a.n);
  dx.n = dn * (T(1) - a.n * a.n);
  dx.z = dz * a.z * (T(1) - a.z);
  dx.r = dx.n * hn * a.r * (T(1) - a.r);
  dhh.r = dx.r;
  dhh.z = dx.z;
  dhh.n = dx.n * a.r;
  dh_prev_direct = dh * a.z;
}

// ---------------------------------------------------------------------------------------------
// Elman RNN: h = act(pre), act tanh or relu.
template <bool Relu, typename T>
RNNKERN_HD T rnn_forward_unit(T pre) {
  if constexpr (Relu) {
    return rk_relu(pre);
  } else {
    return rk_tanh(pre);
  }
}

template <bool Relu, typename T>
RNNKERN_HD T rnn_backward_unit(T dh, T h) {
  if constexpr (Relu) {
    return rk_relu_grad(h, dh);
  } else {
    return dh * (T(1) - h * h);
  }
}

// ---------------------------------------------------------------------------------------------
// Per-timestep clipping of the backpropagated hidden gradient (design §2): the factor that rescales
// g to norm min(‖g‖, clip). clip <= 0 disables it; a NaN norm leaves g unscaled (NaN propagates).
template <typename T>
RNNKERN_HD T clip_scale(T norm, T clip) {
  return (clip > T(0) && norm > clip) ? clip / norm : T(1);
}

// clip_scale from the norm in double, in the accumulation type A: a float row of finite values can have
// a norm past float's range, whose rounded value (inf) would give the scale 0 (the whole gradient lost).
template <typename A>
RNNKERN_HD A clip_scale_of(double norm, double clip) {
  return static_cast<A>(clip_scale(norm, clip));
}

}  // namespace rnnkern
