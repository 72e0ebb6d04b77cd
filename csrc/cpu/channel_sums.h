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
