// Per-channel work over the rows of channels-last data, shared by the kernels: checks of
// per-channel vectors, and sums split into per-thread parts (each part a contiguous share of
// the rows, accumulated in double) that are added up at the end.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

#include "simd.h"

namespace fbnet_fast {
namespace {

// A per-channel vector must be Tensor[C] of like's dtype.
inline void check_vec(const at::Tensor& v, int64_t C, const at::Tensor& like, const char* op,
                      const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == C, op, ": ", name, " must be Tensor[", C,
              "], got shape ", v.sizes());
  TORCH_CHECK(v.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ",
              v.scalar_type(), ", expected ", like.scalar_type());
}

// Element c of a float or double tensor as a double, without a converted copy (the inputs
// of the per-channel ops are mixed: sums in double, statistics in the model's dtype; a
// conversion per call is an op of its own, some microseconds each).
class AsDouble {
 public:
  AsDouble(const at::Tensor& t, const char* op, const char* name)
      : t_(t.contiguous()), dbl_(t_.scalar_type() == at::kDouble) {
    TORCH_CHECK(dbl_ || t_.scalar_type() == at::kFloat, op, ": ", name,
                " must be float32 or float64, got ", t_.scalar_type());
    p_ = t_.const_data_ptr();
  }
  double operator[](int64_t c) const {
    return dbl_ ? static_cast<const double*>(p_)[c] : double(static_cast<const float*>(p_)[c]);
  }

 private:
  at::Tensor t_;
  bool dbl_;
  const void* p_;
};

// x as a [M, C] matrix with contiguous channels; rows may have any stride (a column slice of
// a wider matrix is read in place), anything else is copied.
inline at::Tensor rows_of(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be a [M, C] matrix, got shape ", x.sizes());
  TORCH_INTERNAL_ASSERT(x.device().is_cpu());
  if (x.stride(1) == 1 && x.stride(0) >= x.size(1)) return x;
  return x.contiguous();
}

// Checks an output matrix: [M, C] of like's dtype, contiguous channels (rows may be strided).
inline void check_rows_out(const at::Tensor& out, int64_t M, int64_t C, const at::Tensor& like,
                           const char* op, const char* name) {
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == C && out.stride(1) == 1 &&
                  out.stride(0) >= C,
              op, ": ", name, " must be a [M, C] matrix of shape [", M, ", ", C,
              "] with contiguous channels, got shape ", out.sizes(), " strides ", out.strides());
  TORCH_CHECK(out.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ",
              out.scalar_type(), ", expected ", like.scalar_type());
}

// Rows [r0, r1) of part t out of `parts` equal shares.
inline std::pair<int64_t, int64_t> share(int64_t M, int64_t parts, int64_t t) {
  return {M * t / parts, M * (t + 1) / parts};
}

// Parts to split M rows into: one per thread, at most one per row.
inline int64_t num_parts(int64_t M) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), M));
}

// Channel c of the per-part partial sums acc[part][2][C], summed over the parts.
inline std::pair<double, double> sum_parts(const std::vector<double>& acc, int64_t parts,
                                           int64_t C, int64_t c) {
  double s1 = 0, s2 = 0;
  for (int64_t t = 0; t < parts; ++t) {
    s1 += acc[t * 2 * C + c];
    s2 += acc[t * 2 * C + C + c];
  }
  return {s1, s2};
}

// p1[c] = sum_i u, p2[c] = sum_i w over rows i in [0, R) with (u, w) = f(i, c, B), the
// vectors of channels c.. of row i in B-byte lanes (f may also store a result there). A block
// of channels at a time, its sums in registers across the rows: the per-row loop over all
// channels read and wrote both sums from memory for every row, which in the epilogues of the
// depthwise and pointwise kernels cost more than the rest of the arithmetic. The rows are
// added in order, so the sums are the same.
template <typename T, int NV, int B, typename F>
inline void col_block(int64_t R, int64_t c, T* p1, T* p2, F& f) {
  using V = vec_t<T, B>;
  constexpr int L = kLanes<T, B>;
  V s[NV] = {}, q[NV] = {};
  for (int64_t i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const auto [u, w] = f(i, c + v * L, std::integral_constant<int, B>{});
      s[v] += u;
      q[v] += w;
    }
  for (int v = 0; v < NV; ++v) {
    vstore(p1 + c + v * L, s[v]);
    vstore(p2 + c + v * L, q[v]);
  }
}

// Calls g(c, NV, B) (integral constants) for blocks of NV B-byte vectors covering channels
// [0, C): four 64-byte vectors at a time, then one, then a 32-byte one, then single lanes.
template <typename T, typename G>
inline void channel_blocks(int64_t C, G&& g) {
  using std::integral_constant;
  constexpr int64_t L = kLanes<T, 64>, H = kLanes<T, 32>;
  int64_t c = 0;
  for (; c + 4 * L <= C; c += 4 * L)
    g(c, integral_constant<int, 4>{}, integral_constant<int, 64>{});
  for (; c + L <= C; c += L) g(c, integral_constant<int, 1>{}, integral_constant<int, 64>{});
  for (; c + H <= C; c += H) g(c, integral_constant<int, 1>{}, integral_constant<int, 32>{});
  for (; c < C; ++c) g(c, integral_constant<int, 1>{}, integral_constant<int, sizeof(T)>{});
}

template <typename T, typename F>
inline void col_sums(int64_t R, int64_t C, T* p1, T* p2, F&& f) {
  channel_blocks<T>(C, [&](int64_t c, auto nv, auto b) {
    col_block<T, decltype(nv)::value, decltype(b)::value>(R, c, p1, p2, f);
  });
}

// col_sums over a block of R rows into `part` (2 C values in the input precision, which the
// sums overwrite), added into the double accumulators s1, s2 (C each): the kernels' BN sums,
// in the input precision over a block of rows, in double across blocks.
template <typename T, typename F>
inline void add_row_sums(int64_t R, int64_t C, T* part, double* s1, double* s2, F&& f) {
  col_sums<T>(R, C, part, part + C, f);
  for (int64_t c = 0; c < C; ++c) {
    s1[c] += part[c];
    s2[c] += part[C + c];
  }
}

// f(i, c, B) for rows i in [0, R) and the B-byte vectors of channels c.., a block of
// channels at a time: an elementwise pass over [R, C] without a loop over the channels per
// row, whose overhead decided the time at the 8 to 24 channels of the small models' layers.
template <typename T, int NV, int B, typename F>
inline void map_block(int64_t R, int64_t c, F& f) {
  constexpr int L = kLanes<T, B>;
  for (int64_t i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) f(i, c + v * L, std::integral_constant<int, B>{});
}

template <typename T, typename F>
inline void col_map(int64_t R, int64_t C, F&& f) {
  channel_blocks<T>(C, [&](int64_t c, auto nv, auto b) {
    map_block<T, decltype(nv)::value, decltype(b)::value>(R, c, f);
  });
}

// The sums as Tensor[2, C] float64.
inline at::Tensor sums_tensor(const std::vector<double>& acc, int64_t parts, int64_t C) {
  auto out = at::empty({2, C}, at::dtype(at::kDouble));
  double* p = out.mutable_data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) std::tie(p[c], p[C + c]) = sum_parts(acc, parts, C, c);
  return out;
}

// (mean, biased variance) per channel as Tensor[2, C] of dtype `type`, from the sums of x
// and x^2 over `count` rows (in double, the variance clamped at 0 against rounding).
inline at::Tensor stats_tensor(const std::vector<double>& acc, int64_t parts, int64_t C,
                               int64_t count, at::ScalarType type) {
  auto out = sums_tensor(acc, parts, C);
  double* p = out.mutable_data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) {
    const double m = p[c] / count;
    p[c] = m;
    p[C + c] = std::max(0.0, p[C + c] / count - m * m);
  }
  return out.to(type);
}

}  // namespace
}  // namespace fbnet_fast
