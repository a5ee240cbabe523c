// The CPU per-step fused pointwise kernels: one at::parallel_for over the rows of a step, each row
// one vectorised (at::vec::Vectorized) pass over its hidden units, with the gate formulas of
// rnnkern/cell_math.h instantiated on vectors.
//
// Included once per instruction set by pointwise_{default,avx2,avx512}.cpp, each of which defines
// CPU_CAPABILITY (ATen's vector namespace) and RNNKERN_CPU_ISA (the name of the kernel table)
// before including it. float32 and float64 rows are computed in their own type; float16 and bfloat16
// rows in float (Acc), with the workspace, c and dc in float, as the GPU kernels do (step_args.h).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "pointwise.h"
#include "rnnkern/layer_driver.h"
#include "rnnkern/step_args.h"

namespace rnnkern {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Vector overloads of the activation helpers, declared before cell_math.h so that its templates
// find them (see the note at the top of cell_math.h). Sleef-backed exp/tanh propagate NaN.
template <typename T>
inline Vec<T> rk_tanh(Vec<T> x) {
  return x.tanh();
}
// float: Sleef's tanh costs several exps, and LSTM steps are dominated by it. tanh through one exp
// of -2|x| (no overflow, no cancellation worse than ~5 ulp for |x| >= 1/8) and, below 1/8, its
// Taylor series to x^9 (truncation < 1e-11 relative). NaN propagates through exp; ±inf gives ±1.
template <>
inline Vec<float> rk_tanh(Vec<float> x) {
  const Vec<float> one(1.0f), sign_mask(-0.0f);
  const Vec<float> ax = x.abs();
  const Vec<float> e = (ax * Vec<float>(-2.0f)).exp();
  const Vec<float> large = ((one - e) / (one + e)) | (x & sign_mask);
  const Vec<float> x2 = x * x;
  Vec<float> poly = at::vec::fmadd(x2, Vec<float>(62.0f / 2835.0f), Vec<float>(-17.0f / 315.0f));
  poly = at::vec::fmadd(x2, poly, Vec<float>(2.0f / 15.0f));
  poly = at::vec::fmadd(x2, poly, Vec<float>(-1.0f / 3.0f));
  const Vec<float> small = at::vec::fmadd(x * x2, poly, x);
  return Vec<float>::blendv(large, small, ax < Vec<float>(0.125f));
}
template <typename T>
inline Vec<T> rk_sigmoid(Vec<T> x) {
  const Vec<T> one(T(1));
  return one / (one + x.neg().exp());
}
template <typename T>
inline Vec<T> rk_relu(Vec<T> x) {
  const Vec<T> zero(T(0));
  return Vec<T>::blendv(x, zero, x < zero);  // x < 0 is false for NaN: NaN stays
}
template <typename T>
inline Vec<T> rk_relu_grad(Vec<T> h, Vec<T> dh) {
  const Vec<T> zero(T(0));
  return Vec<T>::blendv(dh, zero, h <= zero);  // h <= 0 is false for NaN: dh passes
}

}  // namespace rnnkern

#include "rnnkern/cell_math.h"

namespace rnnkern {
namespace RNNKERN_CPU_ISA {
namespace {

// The types of a kernel: S the layer's (storage) dtype, A the accumulation dtype: double for
// double, float otherwise (float16 and bfloat16 rows are computed in float, as on the GPU).
template <typename S>
using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;

template <typename U>
struct ScalarOf {
  using type = U;
};
template <typename T>
struct ScalarOf<Vec<T>> {
  using type = T;
};

// Loads / stores for the unit loop: U is Vec<A> for the vector body and A for the tail; a pointer
// of the storage dtype is converted (16-bit rows: ATen's vector conversions of the instruction set,
// rounding to nearest even on the way back).
template <typename U, typename P>
inline U ld(const P* p) {
  using A = typename ScalarOf<U>::type;
  if constexpr (std::is_same_v<U, A>) {
    return static_cast<A>(*p);
  } else if constexpr (std::is_same_v<P, A>) {
    return U::loadu(p);
  } else {
    static_assert(std::is_same_v<A, float>, "16-bit rows are computed in float");
    U out;
    at::vec::load_to_float<P>(p, out);
    return out;
  }
}
template <typename P, typename A>
inline void st(P* p, A v) {
  *p = static_cast<P>(v);
}
template <typename P, typename A>
inline void st(P* p, Vec<A> v) {
  if constexpr (std::is_same_v<P, A>) {
    v.store(p);
  } else {
    static_assert(std::is_same_v<A, float>, "16-bit rows are computed in float");
    at::vec::convert_from_float<P>(v, v).store(p, Vec<float>::size());  // (the first half: v's)
  }
}

// Runs f(j, U{}) over the units [0, n): full vectors, then a scalar tail.
template <typename T, typename F>
inline void unit_loop(int64_t n, const F& f) {
  constexpr int64_t W = Vec<T>::size();
  int64_t j = 0;
  for (; j + W <= n; j += W) f(j, Vec<T>());
  for (; j < n; ++j) f(j, T());
}

// A sum of squares accumulated across the vector body and the tail, in double: vanishing gradients
// are what the norms are for, and float squares underflow below ~1e-19 (the norm would read 0).
// One accumulator per vector lane: a single running sum made every square wait for the previous
// add (a 16-long dependency chain per float vector, ~5 % of an RNN's backward step); lane-wise sums
// vectorise (convert + FMA) and are still reduced in a fixed order.
// The lanes are double vectors (a float vector's lanes in two of them), which stay in registers: as an
// array of doubles they went through memory at every add (~1.4 µs a step of an LSTM's backward at
// B32 H128, 2.5 % of it).
template <typename T>
struct SumSq {
  static constexpr int64_t kLanes = Vec<T>::size();
  static constexpr int64_t kParts = kLanes / Vec<double>::size();
  Vec<double> lane[kParts];
  double tail = 0.0;
  SumSq() {
    for (int64_t p = 0; p < kParts; ++p) lane[p] = Vec<double>(0.0);
  }
  void add(Vec<T> x) {
    if constexpr (std::is_same_v<T, double>) {
      lane[0] = at::vec::fmadd(x, x, lane[0]);
    } else {
      alignas(64) T v[kLanes];
      alignas(64) double d[kLanes];
      x.store(v);
      for (int64_t k = 0; k < kLanes; ++k) d[k] = static_cast<double>(v[k]);  // (vcvtps2pd)
      for (int64_t p = 0; p < kParts; ++p) {
        const Vec<double> part = Vec<double>::loadu(d + p * Vec<double>::size());
        lane[p] = at::vec::fmadd(part, part, lane[p]);
      }
    }
  }
  void add(T x) { tail += static_cast<double>(x) * x; }
  double total() const {
    alignas(64) double d[kLanes];
    for (int64_t p = 0; p < kParts; ++p) lane[p].store(d + p * Vec<double>::size());
    double s = tail;
    for (int64_t k = 0; k < kLanes; ++k) s += d[k];
    return s;
  }
};

// Row b of a previous state, of element type P (step_args.h: the input dtype for h, acc for c).
template <typename P>
inline const P* prev_row(const PrevState& p, int64_t b) {
  return b < p.n_from_step ? static_cast<const P*>(p.from_step) + b * p.ld_step
                           : static_cast<const P*>(p.from_init) + b * p.ld_init;
}

// Rows per parallel chunk: enough work per thread (~2K units) that forking and the barrier after it
// pay off; tiny steps run on the calling thread. (16K units left a 32x128 LSTM step — 4K units — on
// one thread: the T=50 B=32 H=128 case went from 1.30x to 1.17x torch.nn's time with 2K.)
inline int64_t grain(int64_t units_per_row) {
  return std::max<int64_t>(1, 2048 / std::max<int64_t>(1, units_per_row));
}

// ---------------------------------------------------------------------------------------------
// The incoming gradient g of one row (docs/internals.md), and its clipping. S: the rows' dtype; GRU's
// dh_direct is of the accumulation dtype (step_args.h).
template <typename S>
struct RowGrad {
  const S* grad_out;
  const S* from;           // dh_next row (b < n_next) or grad_h_n row (the sample's final step)
  const Acc<S>* direct;    // GRU: dh_direct row, or null
  template <typename U>
  U at(int64_t j) const {
    U g = ld<U>(grad_out + j) + ld<U>(from + j);
    if (direct != nullptr) g = g + ld<U>(direct + j);
    return g;
  }
};

template <typename S>
inline RowGrad<S> row_grad(const IncomingGrad& in, int64_t b, const Acc<S>* dh_direct) {
  const bool continues = b < in.n_next;
  return RowGrad<S>{static_cast<const S*>(in.grad_out) + b * in.size,
                    continues ? static_cast<const S*>(in.dh_next) + b * in.size
                              : static_cast<const S*>(in.grad_h_n) + b * in.size,
                    (continues && dh_direct != nullptr) ? dh_direct + b * in.size : nullptr};
}

// ‖g‖ of a row, in double (and its record in norm_out, when given): a pass of its own.
template <typename S>
inline double row_norm(const RowGrad<S>& g, int64_t n, float* norm_out) {
  using A = Acc<S>;
  SumSq<A> sq;
  unit_loop<A>(n, [&](int64_t j, auto tag) { sq.add(g.template at<decltype(tag)>(j)); });
  const double norm = std::sqrt(sq.total());
  if (norm_out != nullptr) *norm_out = static_cast<float>(norm);
  return norm;
}

// With clipping, ‖g‖ is needed before g is used: a first pass computes it (and records it).
// Without, the caller accumulates the norm in its single pass. Returns the scale for g.
template <typename S>
inline Acc<S> pre_clip_scale(const RowGrad<S>& g, int64_t n, double clip, float* norm_out) {
  using A = Acc<S>;
  if (!(clip > 0.0)) return A(1);
  return clip_scale_of<A>(row_norm(g, n, norm_out), clip);
}

// ---------------------------------------------------------------------------------------------
// Forward steps. S: the layer's dtype (xp, hp, bias, h rows); A = Acc<S>: the workspace and c.
// Row b of a forward step of `gates` gates and `slots` workspace slots: its xp, hp, workspace and
// output rows.
template <typename S>
struct ForwardRow {
  const S* x;
  const S* h;
  Acc<S>* ws;  // null without a workspace (RNN)
  S* h_out;
};
template <typename S>
inline ForwardRow<S> forward_row(const ForwardStepArgs& a, int64_t b, int64_t gates, int64_t slots) {
  const int64_t H = a.hidden;
  return {static_cast<const S*>(a.xp) + b * gates * H, static_cast<const S*>(a.hp) + b * gates * H,
          slots > 0 ? static_cast<Acc<S>*>(a.ws) + b * slots * H : nullptr,
          static_cast<S*>(a.h_out) + b * a.ld_h_out};
}

template <typename S>
void lstm_forward(const ForwardStepArgs& a) {
  using A = Acc<S>;
  const int64_t H = a.hidden;
  const S* bias = static_cast<const S*>(a.b_hh);
  at::parallel_for(0, a.rows, grain(4 * H), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const ForwardRow<S> r = forward_row<S>(a, b, 4, 5);
      const A* c_prev = prev_row<A>(a.c_prev, b);
      unit_loop<A>(H, [&](int64_t j, auto tag) {
        using U = decltype(tag);
        auto pre = [&](int64_t k) {
          return ld<U>(r.x + k * H + j) + ld<U>(r.h + k * H + j) + ld<U>(bias + k * H + j);
        };
        LstmGates<U> act;
        U c, h_t;
        lstm_forward_unit(pre(0), pre(1), pre(2), pre(3), ld<U>(c_prev + j), act, c, h_t);
        st(r.ws + j, act.i);
        st(r.ws + H + j, act.f);
        st(r.ws + 2 * H + j, act.g);
        st(r.ws + 3 * H + j, act.o);
        st(r.ws + 4 * H + j, c);
        st(r.h_out + j, h_t);
      });
    }
  });
}

template <typename S>
void gru_forward(const ForwardStepArgs& a) {
  using A = Acc<S>;
  const int64_t H = a.hidden;
  const S* bias = static_cast<const S*>(a.b_hh);
  at::parallel_for(0, a.rows, grain(3 * H), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const ForwardRow<S> r = forward_row<S>(a, b, 3, 4);
      const S* h_prev = prev_row<S>(a.h_prev, b);
      unit_loop<A>(H, [&](int64_t j, auto tag) {
        using U = decltype(tag);
        auto hside = [&](int64_t k) { return ld<U>(r.h + k * H + j) + ld<U>(bias + k * H + j); };
        const U hn = hside(2);
        GruGates<U> act;
        U h_t;
        gru_forward_unit(ld<U>(r.x + j), ld<U>(r.x + H + j), ld<U>(r.x + 2 * H + j), hside(0), hside(1),
                         hn, ld<U>(h_prev + j), act, h_t);
        st(r.ws + j, act.r);
        st(r.ws + H + j, act.z);
        st(r.ws + 2 * H + j, act.n);
        st(r.ws + 3 * H + j, hn);
        st(r.h_out + j, h_t);
      });
    }
  });
}

template <bool Relu, typename S>
void rnn_forward(const ForwardStepArgs& a) {
  using A = Acc<S>;
  const int64_t H = a.hidden;
  const S* bias = static_cast<const S*>(a.b_hh);
  at::parallel_for(0, a.rows, grain(H), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const ForwardRow<S> r = forward_row<S>(a, b, 1, 0);
      unit_loop<A>(H, [&](int64_t j, auto tag) {
        using U = decltype(tag);
        st(r.h_out + j, rnn_forward_unit<Relu>(ld<U>(r.x + j) + ld<U>(r.h + j) + ld<U>(bias + j)));
      });
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward steps. S: the layer's dtype (incoming gradients, h rows, gate gradients); A = Acc<S>:
// the workspace, c, dc and GRU's dh_direct.
template <typename S>
void lstm_backward(const BackwardStepArgs& a) {
  using A = Acc<S>;
  const int64_t H = a.hidden;
  const bool projected = a.dh_pre != nullptr;
  at::parallel_for(0, a.rows, grain(4 * H), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const RowGrad<S> g = row_grad<S>(a.grad, b, nullptr);
      const S* dh_pre = projected ? static_cast<const S*>(a.dh_pre) + b * H : nullptr;
      float* norm_g = a.norm_g != nullptr ? a.norm_g + b : nullptr;
      const A scale = projected ? A(1) : pre_clip_scale(g, H, a.clip, norm_g);
      const bool norm_in_pass = !projected && norm_g != nullptr && !(a.clip > 0.0);
      // dc arriving at c_t: from the next step (acc dtype), or grad_c_n at the sample's final step
      const bool continues = b < a.grad.n_next;
      const A* dc_next = static_cast<const A*>(a.dc) + b * H;
      const S* dc_final = static_cast<const S*>(a.grad_c_n) + b * H;
      A* dc_out = static_cast<A*>(a.dc) + b * H;
      const A* ws = static_cast<const A*>(a.ws) + b * 5 * H;
      const A* c_prev = prev_row<A>(a.c_prev, b);
      S* dgates = static_cast<S*>(a.dgates_x) + b * 4 * H;
      S* hpre = projected ? static_cast<S*>(a.hpre_out) + b * H : nullptr;
      SumSq<A> g_sq, dc_sq;
      unit_loop<A>(H, [&](int64_t j, auto tag) {
        using U = decltype(tag);
        U dh;
        if (projected) {
          dh = ld<U>(dh_pre + j);
        } else {
          const U g_j = g.template at<U>(j);
          if (norm_in_pass) g_sq.add(g_j);
          dh = g_j * U(scale);
        }
        LstmGates<U> act{ld<U>(ws + j), ld<U>(ws + H + j), ld<U>(ws + 2 * H + j),
                         ld<U>(ws + 3 * H + j)};
        const U tc = rk_tanh(ld<U>(ws + 4 * H + j));
        LstmGates<U> dpre;
        U dc_total, dc_prev;
        const U dc_in = continues ? ld<U>(dc_next + j) : ld<U>(dc_final + j);
        lstm_backward_unit_tanh(dh, dc_in, act, tc, ld<U>(c_prev + j), dpre, dc_total, dc_prev);
        dc_sq.add(dc_total);
        st(dgates + j, dpre.i);
        st(dgates + H + j, dpre.f);
        st(dgates + 2 * H + j, dpre.g);
        st(dgates + 3 * H + j, dpre.o);
        st(dc_out + j, dc_prev);
        if (projected) st(hpre + j, act.o * tc);
      });
      if (norm_in_pass) *norm_g = static_cast<float>(std::sqrt(g_sq.total()));
      if (a.norm_c != nullptr) a.norm_c[b] = static_cast<float>(std::sqrt(dc_sq.total()));
    }
  });
}

template <typename S>
void gru_backward(const BackwardStepArgs& a) {
  using A = Acc<S>;
  const int64_t H = a.hidden;
  const A* dh_direct = static_cast<const A*>(a.dh_direct);
  at::parallel_for(0, a.rows, grain(3 * H), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const RowGrad<S> g = row_grad<S>(a.grad, b, dh_direct);
      float* norm_g = a.norm_g != nullptr ? a.norm_g + b : nullptr;
      const A scale = pre_clip_scale(g, H, a.clip, norm_g);
      const bool norm_in_pass = norm_g != nullptr && !(a.clip > 0.0);
      const A* ws = static_cast<const A*>(a.ws) + b * 4 * H;
      const S* h_prev = prev_row<S>(a.h_prev, b);
      S* dx = static_cast<S*>(a.dgates_x) + b * 3 * H;
      S* dhh = static_cast<S*>(a.dgates_h) + b * 3 * H;
      A* direct_out = static_cast<A*>(a.dh_direct_out) + b * H;
      SumSq<A> g_sq;
      unit_loop<A>(H, [&](int64_t j, auto tag) {
        using U = decltype(tag);
        const U g_j = g.template at<U>(j);  // reads dh_direct before direct_out overwrites it
        if (norm_in_pass) g_sq.add(g_j);
        GruGates<U> act{ld<U>(ws + j), ld<U>(ws + H + j), ld<U>(ws + 2 * H + j)};
        GruGates<U> d_x, d_h;
        U direct;
        gru_backward_unit(g_j * U(scale), act, ld<U>(ws + 3 * H + j), ld<U>(h_prev + j), d_x, d_h,
                          direct);
        st(dx + j, d_x.r);
        st(dx + H + j, d_x.z);
        st(dx + 2 * H + j, d_x.n);
        st(dhh + j, d_h.r);
        st(dhh + H + j, d_h.z);
        st(dhh + 2 * H + j, d_h.n);
        st(direct_out + j, direct);
      });
      if (norm_in_pass) *norm_g = static_cast<float>(std::sqrt(g_sq.total()));
    }
  });
}

template <bool Relu, typename S>
void rnn_backward(const BackwardStepArgs& a) {
  using A = Acc<S>;
  const int64_t H = a.hidden;
  at::parallel_for(0, a.rows, grain(H), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const RowGrad<S> g = row_grad<S>(a.grad, b, nullptr);
      float* norm_g = a.norm_g != nullptr ? a.norm_g + b : nullptr;
      const A scale = pre_clip_scale(g, H, a.clip, norm_g);
      const bool norm_in_pass = norm_g != nullptr && !(a.clip > 0.0);
      const S* h = static_cast<const S*>(a.h_out) + b * H;
      S* dx = static_cast<S*>(a.dgates_x) + b * H;
      SumSq<A> g_sq;
      unit_loop<A>(H, [&](int64_t j, auto tag) {
        using U = decltype(tag);
        const U g_j = g.template at<U>(j);
        if (norm_in_pass) g_sq.add(g_j);
        st(dx + j, rnn_backward_unit<Relu>(g_j * U(scale), ld<U>(h + j)));
      });
      if (norm_in_pass) *norm_g = static_cast<float>(std::sqrt(g_sq.total()));
    }
  });
}

// LSTM with projection: g (recorded, clipped) for the product g @ W_hr. Two passes, the norm's and the
// clipped g's, so that g is rounded to the layer's dtype once.
template <typename S>
void proj_grad(const ProjGradStepArgs& a) {
  using A = Acc<S>;
  const int64_t P = a.grad.size;
  at::parallel_for(0, a.rows, grain(P), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const RowGrad<S> g = row_grad<S>(a.grad, b, nullptr);
      S* g_out = static_cast<S*>(a.g_out) + b * P;
      const A scale = clip_scale_of<A>(row_norm(g, P, a.norm_g != nullptr ? a.norm_g + b : nullptr), a.clip);
      unit_loop<A>(P, [&](int64_t j, auto tag) {
        using U = decltype(tag);
        st(g_out + j, g.template at<U>(j) * U(scale));
      });
    }
  });
}

template <typename S>
void forward_step_t(const ForwardStepArgs& a) {
  switch (a.cell) {
    case Cell::LSTM:
      return lstm_forward<S>(a);
    case Cell::GRU:
      return gru_forward<S>(a);
    case Cell::RNN_TANH:
      return rnn_forward<false, S>(a);
    case Cell::RNN_RELU:
      return rnn_forward<true, S>(a);
  }
}

template <typename S>
void backward_step_t(const BackwardStepArgs& a) {
  switch (a.cell) {
    case Cell::LSTM:
      return lstm_backward<S>(a);
    case Cell::GRU:
      return gru_backward<S>(a);
    case Cell::RNN_TANH:
      return rnn_backward<false, S>(a);
    case Cell::RNN_RELU:
      return rnn_backward<true, S>(a);
  }
}

// fn(S{}) with S the C++ type of `dtype`.
template <typename F>
void with_dtype(DType dtype, const F& fn) {
  switch (dtype) {
    case DType::F64:
      return fn(double());
    case DType::F32:
      return fn(float());
    case DType::F16:
      return fn(c10::Half());
    case DType::BF16:
      return fn(c10::BFloat16());
  }
  TORCH_CHECK(false, "rnnkern cpu backend: unknown dtype");
}

// C (S, row length ldc) = an m x n float32 product that `product(c32)` writes into a buffer, rounded to
// S once; false (C untouched) where `product` computes nothing. (thread_local: the driver's sample
// ranges call the products from several threads.)
template <typename S, typename Product>
bool rounded_product(int64_t m, int64_t n, S* c, int64_t ldc, const Product& product) {
  thread_local std::vector<float> c32;
  c32.resize(static_cast<size_t>(m * n));
  if (!product(c32.data())) return false;
  for (int64_t i = 0; i < m; ++i) at::vec::convert(c32.data() + i * n, c + i * ldc, n);
  return true;
}

// C (S) = A (S) · B (float32) for the 16-bit layers' per-step products: A's rows converted to float32,
// the product by the float32 BLAS, C rounded to S once (StepKernels::gemm_float_b).
template <typename S>
void gemm_float_b_t(bool b_nk, int64_t m, int64_t n, int64_t k, const S* a, int64_t lda, const float* b,
                    int64_t ldb, S* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  thread_local std::vector<float> a32;
  a32.resize(static_cast<size_t>(m * k));
  for (int64_t i = 0; i < m; ++i) at::vec::convert(a + i * lda, a32.data() + i * k, k);
  rounded_product(m, n, c, ldc, [&](float* c32) {
    rnnkern::cpu_gemm(DType::F32, b_nk, m, n, k, a32.data(), k, b, ldb, c32, n);
    return true;
  });
}

class CpuStepKernels final : public StepKernels {
 public:
  void forward_step(const ForwardStepArgs& a) const override {
    with_dtype(a.dtype, [&](auto s) { forward_step_t<decltype(s)>(a); });
  }
  void backward_step(const BackwardStepArgs& a) const override {
    with_dtype(a.dtype, [&](auto s) { backward_step_t<decltype(s)>(a); });
  }
  void proj_grad_step(const ProjGradStepArgs& a) const override {
    with_dtype(a.dtype, [&](auto s) { proj_grad<decltype(s)>(a); });
  }
  void gemm(DType dtype, bool b_nk, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
            const void* b, int64_t ldb, void* c, int64_t ldc) const override {
    if (m == 0 || n == 0) return;
    // bfloat16 where the CPU multiplies it itself (cpu_native_16bit_gemm): into float32, rounded once
    if (dtype == DType::BF16 &&
        rounded_product(m, n, static_cast<c10::BFloat16*>(c), ldc, [&](float* c32) {
          return rnnkern::cpu_gemm_16bit_into_float(dtype, b_nk, m, n, k, a, lda, b, ldb, c32, n);
        })) {
      return;
    }
    rnnkern::cpu_gemm(dtype, b_nk, m, n, k, a, lda, b, ldb, c, ldc);
  }
  at::Tensor pack_weight(DType dtype, bool b_nk, int64_t m, int64_t n, int64_t k, const void* b,
                         int64_t ldb) const override {
    return rnnkern::cpu_pack_weight(dtype, b_nk, m, n, k, b, ldb);
  }
  void gemm_packed(DType dtype, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
                   const at::Tensor& packed, void* c, int64_t ldc) const override {
    TORCH_CHECK(dtype == DType::F32, "rnnkern cpu backend: packed weights are float32 only");
    rnnkern::cpu_gemm_packed(m, n, k, static_cast<const float*>(a), lda, packed, static_cast<float*>(c), ldc);
  }
  bool float_step_weights(DType dtype) const override {
    return (dtype == DType::F16 || dtype == DType::BF16) && !rnnkern::cpu_native_16bit_gemm(dtype);
  }
  void gemm_float_b(DType dtype, bool b_nk, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
                    const float* b, int64_t ldb, void* c, int64_t ldc) const override {
    with_dtype(dtype, [&](auto s) {
      using S = decltype(s);
      if constexpr (std::is_same_v<S, c10::Half> || std::is_same_v<S, c10::BFloat16>) {
        gemm_float_b_t<S>(b_nk, m, n, k, static_cast<const S*>(a), lda, b, ldb, static_cast<S*>(c), ldc);
      } else {
        TORCH_CHECK(false, "rnnkern cpu backend: float32 weights are for 16-bit layers only");
      }
    });
  }
};

}  // namespace

const StepKernels* cpu_step_kernels() {
  static const CpuStepKernels kernels;
  return &kernels;
}

}  // namespace RNNKERN_CPU_ISA
}  // namespace rnnkern
