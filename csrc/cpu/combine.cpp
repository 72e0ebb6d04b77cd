// The mask-weighted combine of the candidates' second 1x1 outputs and its backward, each one
// pass over Z (Tensor[N, P, k, O]: P pixels, k candidates of O channels, contiguous) instead
// of the three to five of separate torch ops. A per-example coefficient has N rows, a
// per-batch one a single row shared by every example.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "channel_sums.h"

namespace fbnet_fast {
namespace {

struct ZShape {
  int64_t N, P, K, O;
};

// z must be a contiguous Tensor[N, P, k, O]; the other tensors are checked against it.
ZShape check_z(const at::Tensor& z, const char* op) {
  TORCH_CHECK(z.dim() == 4 && z.is_contiguous(), op,
              ": z must be a contiguous Tensor[N, P, k, O], got shape ", z.sizes());
  TORCH_INTERNAL_ASSERT(z.device().is_cpu());
  return {z.size(0), z.size(1), z.size(2), z.size(3)};
}

void check_like(const at::Tensor& t, at::IntArrayRef sizes, const at::Tensor& z, const char* op,
                const char* name) {
  TORCH_CHECK(t.sizes() == sizes && t.is_contiguous(), op, ": ", name,
              " must be a contiguous Tensor", sizes, ", got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == z.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), ", expected ", z.scalar_type());
}

// Rows of a per-example (N rows) or per-batch (1 row) coefficient.
int64_t coef_rows(const at::Tensor& c, const ZShape& Z, const char* op, const char* name) {
  TORCH_CHECK(c.dim() >= 1 && (c.size(0) == 1 || c.size(0) == Z.N), op, ": ", name,
              " must have 1 or N = ", Z.N, " rows, got shape ", c.sizes());
  return c.size(0);
}

// Calls f(r, e) for every pixel row r = n * P + p, in parallel; e is the row of a
// coefficient with `rows` rows (1 per batch, N per example) that belongs to r's example.
template <typename F>
void for_pixels(const ZShape& Z, int64_t rows, F&& f) {
  at::parallel_for(0, Z.N * Z.P, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) f(r, rows == 1 ? 0 : r / Z.P);
  });
}

// out[n, p, o] = sum_i z[n, p, i, o] * coef[e, i, o] + shift[e, o] (e = n, or 0 per batch).
void combine_out_cpu(const at::Tensor& z, const at::Tensor& coef, const at::Tensor& shift,
                     const at::Tensor& out) {
  const auto Z = check_z(z, "combine_out");
  const int64_t rows = coef_rows(coef, Z, "combine_out", "coef");
  check_like(coef, {rows, Z.K, Z.O}, z, "combine_out", "coef");
  check_like(shift, {rows, Z.O}, z, "combine_out", "shift");
  check_like(out, {Z.N, Z.P, Z.O}, z, "combine_out", "out");
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "combine_out", [&] {
    using T = scalar_t;
    const T* zp = z.const_data_ptr<T>();
    const T* cp = coef.const_data_ptr<T>();
    const T* sp = shift.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    for_pixels(Z, rows, [&](int64_t r, int64_t e) {
      T* o = op + r * Z.O;
      const T* s = sp + e * Z.O;
      _Pragma("omp simd")
      for (int64_t c = 0; c < Z.O; ++c) o[c] = s[c];
      for (int64_t i = 0; i < Z.K; ++i) {
        const T* zr = zp + (r * Z.K + i) * Z.O;
        const T* cr = cp + (e * Z.K + i) * Z.O;
        _Pragma("omp simd")
        for (int64_t c = 0; c < Z.O; ++c) o[c] += zr[c] * cr[c];
      }
    });
  });
}

// Tensor[N, k, O]: sum over the pixels of z[n, p, i, o] * dy[n, p, o], in double per thread.
at::Tensor zdot_cpu(const at::Tensor& z, const at::Tensor& dy) {
  const auto Z = check_z(z, "zdot");
  check_like(dy, {Z.N, Z.P, Z.O}, z, "zdot", "dy");
  const int64_t KO = Z.K * Z.O, M = Z.N * Z.P, parts = num_parts(M);
  std::vector<double> acc(parts * Z.N * KO, 0.0);
  auto out = at::empty({Z.N, Z.K, Z.O}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "zdot", [&] {
    using T = scalar_t;
    const T* zp = z.const_data_ptr<T>();
    const T* gp = dy.const_data_ptr<T>();
    at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const auto [r0, r1] = share(M, parts, t);
        for (int64_t r = r0; r < r1; ++r) {
          double* a = acc.data() + (t * Z.N + r / Z.P) * KO;
          const T* g = gp + r * Z.O;
          for (int64_t i = 0; i < Z.K; ++i) {
            const T* zr = zp + (r * Z.K + i) * Z.O;
            double* ai = a + i * Z.O;
            _Pragma("omp simd")
            for (int64_t c = 0; c < Z.O; ++c) ai[c] += double(zr[c]) * double(g[c]);
          }
        }
      }
    });
    T* o = out.mutable_data_ptr<T>();
    for (int64_t j = 0; j < Z.N * KO; ++j) {
      double s = 0;
      for (int64_t t = 0; t < parts; ++t) s += acc[t * Z.N * KO + j];
      o[j] = T(s);
    }
  });
  return out;
}

// dz[n, p, i, o] = z[n, p, i, o] * beta[i, o] + delta[i, o] + dy[n, p, o] * alpha[e, i, o]
// (e = n, or 0 per batch): the BN3 backward of every candidate at once.
void bn3_backward_out_cpu(const at::Tensor& z, const at::Tensor& dy, const at::Tensor& beta,
                          const at::Tensor& delta, const at::Tensor& alpha, const at::Tensor& dz) {
  const auto Z = check_z(z, "bn3_backward_out");
  const int64_t rows = coef_rows(alpha, Z, "bn3_backward_out", "alpha");
  check_like(dy, {Z.N, Z.P, Z.O}, z, "bn3_backward_out", "dy");
  check_like(beta, {Z.K, Z.O}, z, "bn3_backward_out", "beta");
  check_like(delta, {Z.K, Z.O}, z, "bn3_backward_out", "delta");
  check_like(alpha, {rows, Z.K, Z.O}, z, "bn3_backward_out", "alpha");
  check_like(dz, z.sizes(), z, "bn3_backward_out", "dz");
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "bn3_backward_out", [&] {
    using T = scalar_t;
    const T* zp = z.const_data_ptr<T>();
    const T* gp = dy.const_data_ptr<T>();
    const T* bp = beta.const_data_ptr<T>();
    const T* dp = delta.const_data_ptr<T>();
    const T* ap = alpha.const_data_ptr<T>();
    T* op = dz.mutable_data_ptr<T>();
    for_pixels(Z, rows, [&](int64_t r, int64_t e) {
      const T* g = gp + r * Z.O;
      for (int64_t i = 0; i < Z.K; ++i) {
        const int64_t off = (r * Z.K + i) * Z.O, w = i * Z.O;
        const T* zr = zp + off;
        const T* ar = ap + e * Z.K * Z.O + w;
        T* o = op + off;
        _Pragma("omp simd")
        for (int64_t c = 0; c < Z.O; ++c) o[c] = zr[c] * bp[w + c] + dp[w + c] + g[c] * ar[c];
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fbnet_fast, CPU, m) {
  m.impl("combine_out", &combine_out_cpu);
  m.impl("zdot", &zdot_cpu);
  m.impl("bn3_backward_out", &bn3_backward_out_cpu);
}

}  // namespace fbnet_fast
