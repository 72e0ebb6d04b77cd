// Depthwise KxK conv on the CPU over channels-last (NHWC) data.
//
// Channels are contiguous, so every inner loop runs over a 64-byte vector of channels with
// the accumulators in registers. K = 3 and 5 have register-tiled row kernels over blocks of
// 8 interior outputs (each input vector loaded once per kernel row and used for every output
// or tap it meets: a pixel's vectors are C elements apart, so each load is a new cache line
// and loads, not FMAs, set the pace), over 64-byte vectors of channels and one 32-byte vector
// where that much is left; edges, narrower channel tails and other K go pixel by pixel.
// Grad-input is the forward with flipped kernels at stride 1 and, at stride 2, a gather of
// only the taps of matching parity (no atomics);
// grad-weight sums per thread over its share of the N*H_out rows into a private [K*K, C]
// partial, then the partials are reduced.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "pool.h"
#include "simd.h"

namespace fbnet_fast {
namespace {

using at::IntArrayRef;

// Channel block held in registers: 64 floats or 32 doubles (four 512-bit registers).
template <typename T>
constexpr int kBlock = 256 / sizeof(T);

struct Shape {
  int64_t N, H, W, C, Ho, Wo, s;
  int64_t xn, xh, xw;  // input strides (channel stride is 1)
  int64_t h0 = 0;      // the first input row x holds (a tile of rows in a scratch buffer)
  int64_t o0 = 0;      // the first output row (n * rows + row) out holds (0: all of them)
  int64_t g0 = 0;      // the first grad row (n * Ho + oh) gy holds (a tile in a buffer)
  int64_t padw = 0;    // zero columns x's rows carry on each side (a tile in a buffer)
  int64_t gpad = 0;    // zero columns the grad's rows carry on each side (a tile in a buffer)
};

// Column ow of grad row n * Ho + oh in gy (rows from S.g0 on, S.gpad zero columns on each
// side; gy points at column 0).
template <typename T>
inline T* grad_pixel(const Shape& S, T* gy, int64_t n, int64_t oh, int64_t ow) {
  return gy + ((n * S.Ho + oh - S.g0) * (S.Wo + 2 * S.gpad) + ow) * S.C;
}

template <typename T>
struct Group {
  int64_t c0, C, k;
  const T* w;  // [k*k][C]: tap-major so channels are contiguous
  T* gw;       // grad partial, same layout (grad-weight only)
};

// Calls body(B, c0, c1) for the channels [0, C) in vectors: [0, c1) of 64-byte vectors, then
// one 32-byte vector if that much is left; returns where the rest (for the per-pixel loop)
// starts.
template <typename T, typename F>
inline int64_t for_vectors(int64_t C, F&& body) {
  const int64_t full = C / kLanes<T> * kLanes<T>;
  body(std::integral_constant<int, 64>{}, int64_t{0}, full);
  if (C - full < kLanes<T, 32>) return full;
  body(std::integral_constant<int, 32>{}, full, full + kLanes<T, 32>);
  return full + kLanes<T, 32>;
}

// Taps [lo, hi) of a k-tap window that starts at input index i0 and stay inside [0, size).
struct Taps {
  int64_t lo, hi;
};
inline Taps taps_inside(int64_t i0, int64_t k, int64_t size) {
  return {std::max<int64_t>(0, -i0), std::min<int64_t>(k, size - i0)};
}

// out[n, oh, ow, block] for one channel block of one group.
template <typename T, int L>
inline void fwd_px(const Shape& S, const Group<T>& g, const T* x, T* out, int64_t n, int64_t oh,
                   int64_t ow, int64_t cb, int len_rt) {
  const int len = L > 0 ? L : len_rt;
  const int64_t p = g.k / 2;
  const int64_t ih0 = oh * S.s - p, iw0 = ow * S.s - p;
  const Taps th = taps_inside(ih0, g.k, S.H), tw = taps_inside(iw0, g.k, S.W);
  const T* xb = x + n * S.xn + g.c0 + cb;
  T acc[kBlock<T>] = {};
  for (int64_t kh = th.lo; kh < th.hi; ++kh) {
    for (int64_t kw = tw.lo; kw < tw.hi; ++kw) {
      const T* xp = xb + (ih0 + kh - S.h0) * S.xh + (iw0 + kw) * S.xw;
      const T* wp = g.w + (kh * g.k + kw) * g.C + cb;
#pragma omp simd
      for (int c = 0; c < len; ++c) acc[c] += xp[c] * wp[c];
    }
  }
  T* op = out + ((n * S.Ho + oh - S.o0) * S.Wo + ow) * S.C + g.c0 + cb;
#pragma omp simd
  for (int c = 0; c < len; ++c) op[c] = acc[c];
}

// gx[n, ih, iw, block]: the transposed conv as a gather.
template <typename T, int L>
inline void bwd_input_px(const Shape& S, const Group<T>& g, const T* gy, T* gx, int64_t n,
                         int64_t ih, int64_t iw, int64_t cb, int len_rt) {
  const int len = L > 0 ? L : len_rt;
  const int64_t p = g.k / 2;
  T acc[kBlock<T>] = {};
  for (int64_t kh = 0; kh < g.k; ++kh) {
    const int64_t a = ih + p - kh;  // = oh * s
    if (a < 0 || a % S.s) continue;
    const int64_t oh = a / S.s;
    if (oh >= S.Ho) continue;
    for (int64_t kw = 0; kw < g.k; ++kw) {
      const int64_t b = iw + p - kw;
      if (b < 0 || b % S.s) continue;
      const int64_t ow = b / S.s;
      if (ow >= S.Wo) continue;
      const T* gp = grad_pixel(S, gy, n, oh, ow) + g.c0 + cb;
      const T* wp = g.w + (kh * g.k + kw) * g.C + cb;
#pragma omp simd
      for (int c = 0; c < len; ++c) acc[c] += gp[c] * wp[c];
    }
  }
  T* xp = gx + ((n * S.H + ih - S.o0) * S.W + iw) * S.C + g.c0 + cb;
#pragma omp simd
  for (int c = 0; c < len; ++c) xp[c] = acc[c];
}

// gw[tap, block] += gy[n, oh, ow, block] * x[tap's input pixel, block], for every tap.
template <typename T, int L>
inline void bwd_weight_px(const Shape& S, const Group<T>& g, const T* gy, const T* x, int64_t n,
                          int64_t oh, int64_t ow, int64_t cb, int len_rt) {
  const int len = L > 0 ? L : len_rt;
  const int64_t p = g.k / 2;
  const int64_t ih0 = oh * S.s - p, iw0 = ow * S.s - p;
  const Taps th = taps_inside(ih0, g.k, S.H), tw = taps_inside(iw0, g.k, S.W);
  const T* gp = grad_pixel(S, gy, n, oh, ow) + g.c0 + cb;
  T gv[kBlock<T>];
#pragma omp simd
  for (int c = 0; c < len; ++c) gv[c] = gp[c];
  const T* xb = x + n * S.xn + g.c0 + cb;
  for (int64_t kh = th.lo; kh < th.hi; ++kh) {
    for (int64_t kw = tw.lo; kw < tw.hi; ++kw) {
      const T* xp = xb + (ih0 + kh - S.h0) * S.xh + (iw0 + kw) * S.xw;
      T* wp = g.gw + (kh * g.k + kw) * g.C + cb;
#pragma omp simd
      for (int c = 0; c < len; ++c) wp[c] += gv[c] * xp[c];
    }
  }
}

// Calls f<L>(cb, len) for every channel block of a group: full blocks at compile-time length.
template <typename T, typename F>
inline void for_blocks(int64_t C, F&& f) {
  constexpr int B = kBlock<T>;
  int64_t cb = 0;
  for (; cb + B <= C; cb += B) f(std::integral_constant<int, B>{}, cb, B);
  if (cb < C) f(std::integral_constant<int, 0>{}, cb, static_cast<int>(C - cb));
}

// Output columns [lo, hi) whose K taps all fall inside the input row (with its zero
// columns, if it has them: then every column).
inline std::pair<int64_t, int64_t> interior(const Shape& S, int64_t K) {
  const int64_t P = K / 2, W = S.W, Wo = S.Wo, s = S.s;
  if (S.padw >= P) return {0, Wo};
  const int64_t lo = std::min<int64_t>(Wo, (P + s - 1) / s);
  const int64_t hi = W - 1 - P >= 0 ? std::min<int64_t>(Wo, (W - 1 - P) / s + 1) : 0;
  return {lo, std::max(lo, hi)};
}

// p + stride, opaque to the compiler: the unrolled register kernels below then walk their
// pixels with one add per load. Left to itself, GCC precomputes every i * stride of the
// unrolled loop, runs out of integer registers and reloads the offsets from the stack
// inside the loop (the forward ran 1.09-1.13x slower at the quick preset's 8->8 32x32
// layer, 1.10x at 16->16 56x56).
template <typename T>
inline const T* next_pixel(const T* p, int64_t stride) {
  p += stride;
  asm("" : "+r"(p));
  return p;
}

// NB consecutive interior outputs from column ow of one output row (window rows th, first
// input row ih0): each input vector is loaded once per kernel row and serves every output
// whose window holds it (NB + K - 1 loads per kernel row at stride 1, not NB * K).
template <typename T, int B, int K, int Sd, int NB>
inline void window_row(const T* xb, const Shape& S, Taps th, int64_t ih0, int64_t ow,
                       const T* w, int64_t wC, vec_t<T, B> (&acc)[NB]) {
  using vt = vec_t<T, B>;
  constexpr int P = K / 2;
#pragma GCC unroll 16
  for (int j = 0; j < NB; ++j) acc[j] = vt{};
  for (int64_t kh = th.lo; kh < th.hi; ++kh) {
    const T* xr = xb + (ih0 + kh - S.h0) * S.xh + (ow * Sd - P) * S.xw;
    vt wk[K];
#pragma GCC unroll 8
    for (int kw = 0; kw < K; ++kw) wk[kw] = vload<B>(w + (kh * K + kw) * wC);
#pragma GCC unroll 32
    for (int i = 0; i < Sd * (NB - 1) + K; ++i) {
      vt xv = vload<B>(xr);
      xr = next_pixel(xr, S.xw);
#ifdef __AVX512F__
      asm("" : "+v"(xv));  // one load per vector: left alone, GCC re-loads it for every FMA
#endif
#pragma GCC unroll 8
      for (int kw = 0; kw < K; ++kw) {
        const int d = i - kw;
        if (d >= 0 && d % Sd == 0 && d / Sd < NB) acc[d / Sd] += xv * wk[kw];
      }
    }
  }
}

// One output row of one group with K known at compile time: blocks of 8, then 7 or 3, then 4,
// 2 and 1 interior outputs through window_row; edges and the channel tail go per pixel.
template <typename T, int K>
void fwd_row_fast(const Shape& S, const Group<T>& g, const T* x, T* out, int64_t n, int64_t oh) {
  constexpr int P = K / 2;
  const int64_t s = S.s, ih0 = oh * s - P;
  const Taps th = taps_inside(ih0, K, S.H);
  const auto [lo, hi] = interior(S, K);
  const int64_t cv = for_vectors<T>(g.C, [&](auto Bc, int64_t c0, int64_t c1) {
    constexpr int B = decltype(Bc)::value, VL = kLanes<T, B>;
    using vt = vec_t<T, B>;
    for (int64_t cb = c0; cb < c1; cb += VL) {
      const T* xb = x + n * S.xn + g.c0 + cb;
      T* ob = out + (n * S.Ho + oh - S.o0) * S.Wo * S.C + g.c0 + cb;
      // One output pixel, taps outside the row skipped: the edges and the interior's rest.
      auto one = [&](int64_t ow) {
        vt a = {};
        for (int64_t kh = th.lo; kh < th.hi; ++kh) {
          const T* xr = xb + (ih0 + kh - S.h0) * S.xh;
          const T* wr = g.w + kh * K * g.C + cb;
#pragma GCC unroll 8
          for (int kw = 0; kw < K; ++kw) {
            const int64_t iw = ow * s - P + kw;
            if (iw >= 0 && iw < S.W) a += vload<B>(xr + iw * S.xw) * vload<B>(wr + kw * g.C);
          }
        }
        vstore(ob + ow * S.C, a);
      };
      int64_t ow = 0;
      for (; ow < lo; ++ow) one(ow);
      auto block = [&](auto nb) {  // nb interior outputs from ow on
        constexpr int NB = decltype(nb)::value;
        vt acc[NB];
        if (s == 1) window_row<T, B, K, 1, NB>(xb, S, th, ih0, ow, g.w + cb, g.C, acc);
        else window_row<T, B, K, 2, NB>(xb, S, th, ih0, ow, g.w + cb, g.C, acc);
        for (int j = 0; j < NB; ++j) vstore(ob + (ow + j) * S.C, acc[j]);
        ow += NB;
      };
      while (ow + 8 <= hi) block(std::integral_constant<int, 8>{});
      // FBNet's 7- and 3-pixel rows as one block: its weights and the input columns the
      // outputs share loaded once, not once per block of 4, 2 and 1 (the forward op ran 1.27x
      // faster at 7x7 with 2464 channels, 1.11x at 3x3)
      if (hi - ow == 7) block(std::integral_constant<int, 7>{});
      if (hi - ow == 3) block(std::integral_constant<int, 3>{});
      if (ow + 4 <= hi) block(std::integral_constant<int, 4>{});
      if (ow + 2 <= hi) block(std::integral_constant<int, 2>{});
      while (ow < hi) block(std::integral_constant<int, 1>{});
      for (; ow < S.Wo; ++ow) one(ow);
    }
  });
  if (cv < g.C)
    for (int64_t ow = 0; ow < S.Wo; ++ow)
      fwd_px<T, 0>(S, g, x, out, n, oh, ow, cv, static_cast<int>(g.C - cv));
}

// Grad-weight of one kernel row over NB consecutive interior outputs: acc[kw] += g[j] *
// x[Sd * j + kw], with g at `g` (outputs `gs` apart) and x at the first window's left (columns
// `xs` apart); each x vector is loaded once and serves every tap it meets.
template <typename T, int B, int K, int Sd, int NB>
inline void weight_row(const T* g, int64_t gs, const T* x, int64_t xs, vec_t<T, B> (&acc)[K]) {
  using vt = vec_t<T, B>;
  vt gv[NB];
#pragma GCC unroll 16
  for (int j = 0; j < NB; ++j) {
    gv[j] = vload<B>(g);
    g = next_pixel(g, gs);
  }
#pragma GCC unroll 32
  for (int i = 0; i < Sd * (NB - 1) + K; ++i) {
    vt xv = vload<B>(x);
    x = next_pixel(x, xs);
#ifdef __AVX512F__
    asm("" : "+v"(xv));
#endif
#pragma GCC unroll 8
    for (int kw = 0; kw < K; ++kw) {
      const int d = i - kw;
      if (d >= 0 && d % Sd == 0 && d / Sd < NB) acc[kw] += gv[d / Sd] * xv;
    }
  }
}

// Grad-weight of one output row with K known: per kernel row, K accumulators stay in
// registers over the whole output row, filled 8 interior outputs at a time by weight_row
// (then 7 or 3, then 4, 2, 1).
template <typename T, int K>
void bwd_weight_row_fast(const Shape& S, const Group<T>& g, const T* gy, const T* x, int64_t n,
                         int64_t oh) {
  constexpr int P = K / 2;
  const int64_t s = S.s, ih0 = oh * s - P;
  const Taps th = taps_inside(ih0, K, S.H);
  const auto [lo, hi] = interior(S, K);
  const int64_t cv = for_vectors<T>(g.C, [&](auto Bc, int64_t c0, int64_t c1) {
    constexpr int B = decltype(Bc)::value, VL = kLanes<T, B>;
    using vt = vec_t<T, B>;
    for (int64_t cb = c0; cb < c1; cb += VL) {
      const T* gb = grad_pixel(S, gy, n, oh, 0) + g.c0 + cb;
      for (int64_t kh = th.lo; kh < th.hi; ++kh) {
        const T* xr = x + n * S.xn + (ih0 + kh - S.h0) * S.xh + g.c0 + cb;
        vt acc[K] = {};
        auto edge = [&](int64_t ow) {  // taps outside the row skipped
          const vt gv = vload<B>(gb + ow * S.C);
          const T* xp = xr + (ow * s - P) * S.xw;
#pragma GCC unroll 8
          for (int kw = 0; kw < K; ++kw) {
            const int64_t iw = ow * s - P + kw;
            if (iw >= 0 && iw < S.W) acc[kw] += gv * vload<B>(xp + kw * S.xw);
          }
        };
        auto block = [&](int64_t ow, auto nb) {
          constexpr int NB = decltype(nb)::value;
          const T* xp = xr + (ow * s - P) * S.xw;
          if (s == 1) weight_row<T, B, K, 1, NB>(gb + ow * S.C, S.C, xp, S.xw, acc);
          else weight_row<T, B, K, 2, NB>(gb + ow * S.C, S.C, xp, S.xw, acc);
        };
        int64_t ow = 0;
        for (; ow < lo; ++ow) edge(ow);
        for (; ow + 8 <= hi; ow += 8) block(ow, std::integral_constant<int, 8>{});
        if (hi - ow == 7) block(ow, std::integral_constant<int, 7>{}), ow += 7;  // as the forward's
        if (hi - ow == 3) block(ow, std::integral_constant<int, 3>{}), ow += 3;
        if (ow + 4 <= hi) block(ow, std::integral_constant<int, 4>{}), ow += 4;
        if (ow + 2 <= hi) block(ow, std::integral_constant<int, 2>{}), ow += 2;
        for (; ow < hi; ++ow) block(ow, std::integral_constant<int, 1>{});
        for (; ow < S.Wo; ++ow) edge(ow);
        T* wp = g.gw + kh * K * g.C + cb;
#pragma GCC unroll 8
        for (int kw = 0; kw < K; ++kw) vstore(wp + kw * g.C, vload<B>(wp + kw * g.C) + acc[kw]);
      }
    }
  });
  if (cv < g.C)
    for (int64_t ow = 0; ow < S.Wo; ++ow)
      bwd_weight_px<T, 0>(S, g, gy, x, n, oh, ow, cv, static_cast<int>(g.C - cv));
}

// Grad-input of one input row at stride 2 with K known: input column iw gathers only the
// taps kw of parity (iw + P) % 2 (output column ow = (iw + P - kw) / 2), and row ih only the
// taps kh of parity (ih + P) % 2, so a pixel needs about K*K/4 FMAs; the accumulator stays in
// a register and the tap loops unroll. The channel tail narrower than a vector goes per pixel.
template <typename T, int K>
void bwd_input_row_s2(const Shape& S, const Group<T>& g, const T* gy, T* gx, int64_t n,
                      int64_t ih) {
  constexpr int P = K / 2;
  int64_t khs[K], ohs[K];
  int nk = 0;
  for (int kh = (ih + P) % 2; kh < K; kh += 2) {
    const int64_t oh = (ih + P - kh) / 2;
    if (ih + P - kh >= 0 && oh < S.Ho) khs[nk] = kh, ohs[nk++] = oh;
  }
  const int64_t cv = for_vectors<T>(g.C, [&](auto Bc, int64_t c0, int64_t c1) {
    constexpr int B = decltype(Bc)::value, VL = kLanes<T, B>;
    using vt = vec_t<T, B>;
    for (int64_t cb = c0; cb < c1; cb += VL) {
      T* xb = gx + (n * S.H + ih - S.o0) * S.W * S.C + g.c0 + cb;
      for (int64_t iw = 0; iw < S.W; ++iw) {
        vt acc = {};
        const int kw0 = (iw + P) % 2;
        for (int t = 0; t < nk; ++t) {
          const T* gr = grad_pixel(S, gy, n, ohs[t], 0) + g.c0 + cb;
          const T* wr = g.w + khs[t] * K * g.C + cb;
#pragma GCC unroll 8
          for (int kw = kw0; kw < K; kw += 2) {
            const int64_t b = iw + P - kw, ow = b / 2;
            if (b >= 0 && ow < S.Wo) acc += vload<B>(gr + ow * S.C) * vload<B>(wr + kw * g.C);
          }
        }
        vstore(xb + iw * S.C, acc);
      }
    }
  });
  if (cv < g.C)
    for (int64_t iw = 0; iw < S.W; ++iw)
      bwd_input_px<T, 0>(S, g, gy, gx, n, ih, iw, cv, static_cast<int>(g.C - cv));
}

template <typename T>
void bwd_input_row_s2_any(const Shape& S, const Group<T>& g, const T* gy, T* gx, int64_t n,
                          int64_t ih) {
  if (g.k == 3) return bwd_input_row_s2<T, 3>(S, g, gy, gx, n, ih);
  if (g.k == 5) return bwd_input_row_s2<T, 5>(S, g, gy, gx, n, ih);
  for (int64_t iw = 0; iw < S.W; ++iw)
    for_blocks<T>(g.C, [&](auto L, int64_t cb, int len) {
      bwd_input_px<T, decltype(L)::value>(S, g, gy, gx, n, ih, iw, cb, len);
    });
}

// Row drivers: the fast paths for K = 3 and 5, the per-pixel loops for any other odd K.
template <typename T>
void fwd_row(const Shape& S, const Group<T>& g, const T* x, T* out, int64_t n, int64_t oh) {
  if (g.k == 3) return fwd_row_fast<T, 3>(S, g, x, out, n, oh);
  if (g.k == 5) return fwd_row_fast<T, 5>(S, g, x, out, n, oh);
  for (int64_t ow = 0; ow < S.Wo; ++ow)
    for_blocks<T>(g.C, [&](auto L, int64_t cb, int len) {
      fwd_px<T, decltype(L)::value>(S, g, x, out, n, oh, ow, cb, len);
    });
}

template <typename T>
void bwd_weight_row(const Shape& S, const Group<T>& g, const T* gy, const T* x, int64_t n,
                    int64_t oh) {
  if (g.k == 3) return bwd_weight_row_fast<T, 3>(S, g, gy, x, n, oh);
  if (g.k == 5) return bwd_weight_row_fast<T, 5>(S, g, gy, x, n, oh);
  for (int64_t ow = 0; ow < S.Wo; ++ow)
    for_blocks<T>(g.C, [&](auto L, int64_t cb, int len) {
      bwd_weight_px<T, decltype(L)::value>(S, g, gy, x, n, oh, ow, cb, len);
    });
}

struct Checked {
  Shape S;
  std::vector<int64_t> ks, cs;
};

// `channels`: the channels the weights must cover (x's own by default; another count when x
// is the input the conv's input is made from).
inline Checked check_inputs(const at::Tensor& x, at::TensorList weights, int64_t stride,
                            int64_t channels = -1) {
  TORCH_CHECK(x.dim() == 4, "dw_conv: x must be Tensor[N, C, H, W], got ", x.dim(), " dims");
  TORCH_CHECK(stride == 1 || stride == 2, "dw_conv: stride must be 1 or 2, got ", stride);
  TORCH_CHECK(!weights.empty(), "dw_conv: weights must hold at least one tensor");
  TORCH_INTERNAL_ASSERT(x.device().is_cpu());
  Checked r;
  int64_t total = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    TORCH_CHECK(w.scalar_type() == x.scalar_type(), "dw_conv: weights[", i, "] has dtype ",
                w.scalar_type(), " but x has ", x.scalar_type());
    TORCH_CHECK((w.dim() == 3 || (w.dim() == 4 && w.size(1) == 1)) &&
                    w.size(-1) == w.size(-2) && w.size(-1) % 2 == 1,
                "dw_conv: weights[", i, "] must be Tensor[C_g, K, K] or [C_g, 1, K, K] with odd "
                "K, got shape ", w.sizes());
    r.cs.push_back(w.size(0));
    r.ks.push_back(w.size(-1));
    total += w.size(0);
  }
  const bool own = channels < 0;
  if (own) channels = x.size(1);
  TORCH_CHECK(total == channels, "dw_conv: the weights cover ", total, " channels but ",
              own ? "x has " : "the conv's input (x through a_weight) has ", channels,
              " (x shape ", x.sizes(), ")");
  TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0, "dw_conv: empty spatial size ", x.sizes());
  auto& S = r.S;
  S.N = x.size(0); S.C = channels; S.H = x.size(2); S.W = x.size(3); S.s = stride;
  S.Ho = (S.H - 1) / stride + 1;  // = floor((H + 2*(K/2) - K) / s) + 1 for odd K
  S.Wo = (S.W - 1) / stride + 1;
  return r;
}

// Input in a layout with contiguous channels (channels_last or a channel slice of one).
inline at::Tensor channel_contiguous(const at::Tensor& x) {
  if (x.stride(1) == 1 && x.stride(2) >= x.size(1) && x.stride(3) >= x.size(1) && x.size(1) > 0)
    return x;
  return x.contiguous(at::MemoryFormat::ChannelsLast);
}

// Each weight as [k*k, C_g] contiguous (tap-major, so a tap's channels are contiguous),
// concatenated; taps reversed (the kernel flipped) with `flip`. One pass, no temporaries:
// it runs on every call, and the widest layers' weights are 100k elements.
inline at::Tensor taps_major(at::TensorList weights, const Checked& r, bool flip = false) {
  int64_t total = 0;
  for (size_t i = 0; i < weights.size(); ++i) total += r.cs[i] * r.ks[i] * r.ks[i];
  auto out = at::empty({total}, weights[0].options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "taps_major", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for (size_t i = 0; i < weights.size(); ++i) {
      const auto w = weights[i].contiguous();
      const scalar_t* src = w.const_data_ptr<scalar_t>();
      const int64_t C = r.cs[i], kk = r.ks[i] * r.ks[i];
      for (int64_t c = 0; c < C; ++c)
        for (int64_t t = 0; t < kk; ++t) o[t * C + c] = src[c * kk + (flip ? kk - 1 - t : t)];
      o += C * kk;
    }
  });
  return out;
}

template <typename T>
std::vector<Group<T>> make_groups(const Checked& r, const T* wt, T* gw) {
  std::vector<Group<T>> gs;
  int64_t c0 = 0, off = 0;
  for (size_t i = 0; i < r.ks.size(); ++i) {
    gs.push_back({c0, r.cs[i], r.ks[i], wt + off, gw ? gw + off : nullptr});
    c0 += r.cs[i];
    off += r.cs[i] * r.ks[i] * r.ks[i];
  }
  return gs;
}

// A preallocated output must be channels_last-contiguous with the expected shape and dtype.
inline void check_out(const at::Tensor& out, const at::Tensor& x, IntArrayRef sizes, const char* op,
               const char* name) {
  TORCH_CHECK(out.sizes() == sizes && out.is_contiguous(at::MemoryFormat::ChannelsLast), op,
              ": ", name, " must be a channels_last-contiguous Tensor", sizes, ", got shape ",
              out.sizes(), " strides ", out.strides());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ",
              out.scalar_type(), ", expected ", x.scalar_type());
}

// grad must match the conv's output shape and x's dtype.
inline void check_grad(const at::Tensor& grad, const at::Tensor& x, const Shape& S,
                       const char* op) {
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == S.N && grad.size(1) == S.C &&
                  grad.size(2) == S.Ho && grad.size(3) == S.Wo,
              op, ": grad must have shape [", S.N, ", ", S.C, ", ", S.Ho, ", ", S.Wo, "], got ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), op, ": grad dtype ", grad.scalar_type(),
              " differs from x dtype ", x.scalar_type());
}

// The weights grad-input reads (as taps_major): flipped at stride 1, where grad-input is the
// forward conv of grad; as they are at stride 2.
inline at::Tensor grad_input_taps(at::TensorList weights, const Checked& r) {
  return taps_major(weights, r, r.S.s == 1);
}

// A backward's checked inputs: the shapes (with x's strides; `channels` as check_inputs takes
// it), x with contiguous channels,
// grad channels_last, the weights taps-major and as grad-input reads them; grad_x (named
// `name` in errors) must be a channels_last Tensor of x's shape.
struct BackwardInputs {
  Checked r;
  at::Tensor x, gy, wt, wi;
};

inline BackwardInputs backward_inputs(const at::Tensor& grad, const at::Tensor& x_in,
                                      at::TensorList weights, int64_t stride,
                                      const at::Tensor& grad_x, const char* op,
                                      const char* name, int64_t channels = -1) {
  BackwardInputs b{check_inputs(x_in, weights, stride, channels)};
  auto& S = b.r.S;
  check_grad(grad, x_in, S, op);
  b.x = channel_contiguous(x_in);
  b.gy = grad.contiguous(at::MemoryFormat::ChannelsLast);
  S.xn = b.x.stride(0); S.xh = b.x.stride(2); S.xw = b.x.stride(3);
  if (grad_x.defined()) check_out(grad_x, b.x, {S.N, S.C, S.H, S.W}, op, name);
  b.wt = taps_major(weights, b.r);
  b.wi = grad_input_taps(weights, b.r);
  return b;
}

// Grad-input of input row ih of image n for one group (g holds grad_input_taps).
template <typename T>
void grad_input_row(const Shape& S, const Group<T>& g, const T* gy, T* gx, int64_t n,
                    int64_t ih) {
  if (S.s == 1) {
    Shape Sg = S;  // grad as the conv's input
    Sg.xh = (S.Wo + 2 * S.gpad) * S.C; Sg.xn = S.Ho * Sg.xh; Sg.xw = S.C; Sg.h0 = S.g0;
    Sg.padw = S.gpad;
    return fwd_row<T>(Sg, g, gy, gx, n, ih);
  }
  bwd_input_row_s2_any<T>(S, g, gy, gx, n, ih);
}

// The per-thread grad-weight partials [parts, K*K*C taps-major] summed, as one
// Tensor[C_g, K, K] (the weight's own shape) per group, each written in one pass.
inline std::vector<at::Tensor> split_grad_weights(const at::Tensor& gw_parts,
                                                  at::TensorList weights, const Checked& r) {
  const int64_t parts = gw_parts.size(0), total = gw_parts.size(1);
  std::vector<at::Tensor> gws;
  int64_t off = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    auto gw = pooled_empty(gw_parts, weights[i].sizes());
    const int64_t C = r.cs[i], kk = r.ks[i] * r.ks[i];
    AT_DISPATCH_FLOATING_TYPES(gw.scalar_type(), "split_grad_weights", [&] {
      const scalar_t* src = gw_parts.const_data_ptr<scalar_t>() + off;
      scalar_t* o = gw.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c)
        for (int64_t t = 0; t < kk; ++t) {
          scalar_t v = 0;
          for (int64_t p = 0; p < parts; ++p) v += src[p * total + t * C + c];
          o[c * kk + t] = v;
        }
    });
    gws.push_back(gw);
    off += C * kk;
  }
  return gws;
}

}  // namespace
}  // namespace fbnet_fast
