// The mask-weighted combine of the candidates' second 1x1 outputs and its backward, each one
// pass over Z (Tensor[N, P, k, O]: P pixels, k candidates of O channels, contiguous) instead
// of the three to five of separate torch ops. A per-example coefficient has N rows, a
// per-batch one a single row shared by every example.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "channel_sums.h"

#include <cmath>
#include <utility>
#include <vector>

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

// BN3 of every candidate as a per-channel map z * scale + shift, in double, from its
// statistics and affine parameters (each k*O values, candidate-major).
struct Bn3 {
  std::vector<double> mean, rstd, scale, shift, gamma;
};

Bn3 bn3_coefs(const ZShape& Z, const at::Tensor& mean, const at::Tensor& var,
              const at::Tensor& gamma, const at::Tensor& beta, double eps, const char* op) {
  const int64_t KO = Z.K * Z.O;
  for (auto [t, name] : {std::pair{&mean, "mean"}, {&var, "var"}, {&gamma, "gamma"},
                         {&beta, "beta"}})
    TORCH_CHECK(t->numel() == KO, op, ": ", name, " must have k * O = ", KO,
                " elements (one per candidate and channel), got shape ", t->sizes());
  auto d = [](const at::Tensor& t) { return t.to(at::kDouble).contiguous(); };
  auto m = d(mean), v = d(var), g = d(gamma), b = d(beta);
  Bn3 c{std::vector<double>(m.const_data_ptr<double>(), m.const_data_ptr<double>() + KO),
        std::vector<double>(KO), std::vector<double>(KO), std::vector<double>(KO),
        std::vector<double>(g.const_data_ptr<double>(), g.const_data_ptr<double>() + KO)};
  const double *vp = v.const_data_ptr<double>(), *bp = b.const_data_ptr<double>();
  for (int64_t j = 0; j < KO; ++j) {
    c.rstd[j] = 1.0 / std::sqrt(vp[j] + eps);
    c.scale[j] = c.gamma[j] * c.rstd[j];
    c.shift[j] = bp[j] - c.mean[j] * c.scale[j];
  }
  return c;
}

// The mask's candidate columns as double, Tensor[rows, k] with 1 (per batch) or N rows.
std::vector<double> mask_values(const at::Tensor& mask, const ZShape& Z, int64_t* rows,
                                const char* op) {
  TORCH_CHECK(mask.dim() == 2 && mask.size(1) == Z.K, op, ": mask must be Tensor[1 or N, k = ",
              Z.K, "] (the conv candidates' columns), got shape ", mask.sizes());
  *rows = coef_rows(mask, Z, op, "mask");
  auto m = mask.to(at::kDouble).contiguous();
  return std::vector<double>(m.const_data_ptr<double>(), m.const_data_ptr<double>() + m.numel());
}

// What both ops check and derive from z, the mask and BN3's parameters.
struct CombineArgs {
  ZShape Z;
  int64_t rows;           // the mask's: 1 (per batch) or N
  std::vector<double> m;  // the mask, [rows, k]
  Bn3 bn;
};

CombineArgs combine_args(const at::Tensor& z, const at::Tensor& mask, const at::Tensor& mean,
                         const at::Tensor& var, const at::Tensor& gamma, const at::Tensor& beta,
                         double eps, const char* op) {
  const auto Z = check_z(z, op);
  int64_t rows;
  auto m = mask_values(mask, Z, &rows, op);
  return {Z, rows, std::move(m), bn3_coefs(Z, mean, var, gamma, beta, eps, op)};
}

// out[n, p, o] = sum_i m[e, i] * (z[n, p, i, o] * scale[i, o] + shift[i, o]) (e = n, or 0 per
// batch): every candidate's BN3 and the mask-weighted sum, one pass over z.
void combine_bn_out_cpu(const at::Tensor& z, const at::Tensor& mask, const at::Tensor& mean,
                        const at::Tensor& var, const at::Tensor& gamma, const at::Tensor& beta,
                        double eps, const at::Tensor& out) {
  const char* op = "combine_bn_out";
  const auto a = combine_args(z, mask, mean, var, gamma, beta, eps, op);
  const auto& Z = a.Z;
  check_like(out, {Z.N, Z.P, Z.O}, z, op, "out");
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "combine_bn_out", [&] {
    using T = scalar_t;
    std::vector<T> coef(a.rows * Z.K * Z.O), shift(a.rows * Z.O, T(0));
    for (int64_t e = 0; e < a.rows; ++e)
      for (int64_t i = 0; i < Z.K; ++i)
        for (int64_t c = 0; c < Z.O; ++c) {
          const double w = a.m[e * Z.K + i];
          coef[(e * Z.K + i) * Z.O + c] = T(w * a.bn.scale[i * Z.O + c]);
          shift[e * Z.O + c] += T(w * a.bn.shift[i * Z.O + c]);
        }
    const T* zp = z.const_data_ptr<T>();
    T* op_ = out.mutable_data_ptr<T>();
    for_pixels(Z, a.rows, [&](int64_t r, int64_t e) {
      T* o = op_ + r * Z.O;
      const T* s = shift.data() + e * Z.O;
      _Pragma("omp simd")
      for (int64_t c = 0; c < Z.O; ++c) o[c] = s[c];
      for (int64_t i = 0; i < Z.K; ++i) {
        const T* zr = zp + (r * Z.K + i) * Z.O;
        const T* cr = coef.data() + (e * Z.K + i) * Z.O;
        _Pragma("omp simd")
        for (int64_t c = 0; c < Z.O; ++c) o[c] += zr[c] * cr[c];
      }
    });
  });
}

// The backward of combine_bn_out given dy: writes dz (every candidate's BN3 backward, the
// batch statistics' gradient included when `training`) and returns (the mask's gradient
// Tensor[N, k], dgamma, dbeta shaped like gamma). Two passes over z: the sums of z * dy and
// of dy per example and channel (in double per thread), then dz.
std::tuple<at::Tensor, at::Tensor, at::Tensor> combine_bn_backward_out_cpu(
    const at::Tensor& z, const at::Tensor& dy, const at::Tensor& mask, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& gamma, const at::Tensor& beta, double eps,
    bool training, const at::Tensor& dz) {
  const char* op = "combine_bn_backward_out";
  const auto args = combine_args(z, mask, mean, var, gamma, beta, eps, op);
  const auto& Z = args.Z;  // no structured binding: lambdas capture these (C++17)
  const auto& m = args.m;
  const auto& bn = args.bn;
  const int64_t rows = args.rows;
  check_like(dy, {Z.N, Z.P, Z.O}, z, op, "dy");
  check_like(dz, z.sizes(), z, op, "dz");
  const int64_t K = Z.K, O = Z.O, KO = K * O, M = Z.N * Z.P, parts = num_parts(M);
  const int64_t per = Z.N * (KO + O);      // one part's sums: z * dy [N, k, O], dy [N, O]
  std::vector<double> acc(parts * per, 0.0);
  auto dmask = at::empty({Z.N, K}, z.options());
  auto dgamma = at::empty(gamma.sizes(), gamma.options());
  auto dbeta = at::empty(gamma.sizes(), gamma.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "combine_bn_backward_out", [&] {
    using T = scalar_t;
    const T* zp = z.const_data_ptr<T>();
    const T* gp = dy.const_data_ptr<T>();
    at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const auto [r0, r1] = share(M, parts, t);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t n = r / Z.P;
          double* a = acc.data() + t * per + n * KO;
          double* sd = acc.data() + t * per + Z.N * KO + n * O;
          const T* g = gp + r * O;
          _Pragma("omp simd")
          for (int64_t c = 0; c < O; ++c) sd[c] += double(g[c]);
          for (int64_t i = 0; i < K; ++i) {
            const T* zr = zp + (r * K + i) * O;
            double* ai = a + i * O;
            _Pragma("omp simd")
            for (int64_t c = 0; c < O; ++c) ai[c] += double(zr[c]) * double(g[c]);
          }
        }
      }
    });
    for (int64_t t = 1; t < parts; ++t)
      for (int64_t j = 0; j < per; ++j) acc[j] += acc[t * per + j];
    const double* pz = acc.data();               // [N, k, O]
    const double* sdy = acc.data() + Z.N * KO;   // [N, O]
    // the mask's gradient, and sum(g), sum(g * z) of BN3's input gradient g = m dy
    std::vector<double> sg(KO, 0.0), sgz(KO, 0.0);
    T* dm = dmask.mutable_data_ptr<T>();
    for (int64_t n = 0; n < Z.N; ++n) {
      const int64_t e = rows == 1 ? 0 : n;
      for (int64_t i = 0; i < K; ++i) {
        const double w = m[e * K + i];
        double s = 0;
        for (int64_t c = 0; c < O; ++c) {
          const int64_t j = i * O + c;
          s += pz[n * KO + j] * bn.scale[j] + sdy[n * O + c] * bn.shift[j];
          sg[j] += w * sdy[n * O + c];
          sgz[j] += w * pz[n * KO + j];
        }
        dm[n * K + i] = T(s);
      }
    }
    // dz = z * beta + delta + dy * alpha * m (plan.bn_grad's coefficients)
    std::vector<T> beta_(KO), delta(KO), alpha(rows * KO);
    T* dgp = dgamma.mutable_data_ptr<T>();
    T* dbp = dbeta.mutable_data_ptr<T>();
    for (int64_t j = 0; j < KO; ++j) {
      const double r = bn.rstd[j], dg = (sgz[j] - bn.mean[j] * sg[j]) * r;
      const double al = bn.gamma[j] * r;
      const double be = training ? -al * r * dg / double(M) : 0.0;
      beta_[j] = T(be);
      delta[j] = T(training ? -be * bn.mean[j] - al * sg[j] / double(M) : 0.0);
      for (int64_t e = 0; e < rows; ++e) alpha[e * KO + j] = T(al * m[e * K + j / O]);
      dgp[j] = T(dg);
      dbp[j] = T(sg[j]);
    }
    T* op_ = dz.mutable_data_ptr<T>();
    for_pixels(Z, rows, [&](int64_t r, int64_t e) {
      const T* g = gp + r * O;
      for (int64_t i = 0; i < K; ++i) {
        const int64_t off = (r * K + i) * O, w = i * O;
        const T* zr = zp + off;
        const T* ar = alpha.data() + e * KO + w;
        T* o = op_ + off;
        _Pragma("omp simd")
        for (int64_t c = 0; c < O; ++c) o[c] = zr[c] * beta_[w + c] + delta[w + c] + g[c] * ar[c];
      }
    });
  });
  return {dmask, dgamma, dbeta};
}

}  // namespace

TORCH_LIBRARY_IMPL(fbnet_fast, CPU, m) {
  m.impl("combine_bn_out", &combine_bn_out_cpu);
  m.impl("combine_bn_backward_out", &combine_bn_backward_out_cpu);
}

}  // namespace fbnet_fast
