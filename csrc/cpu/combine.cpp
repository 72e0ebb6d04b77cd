// The mask-weighted combine of the candidates' second 1x1 outputs and its backward, each one
// pass over Z (Tensor[N, P, k, O]: P pixels, k candidates of O channels, contiguous) instead
// of the three to five of separate torch ops. A per-example coefficient has N rows, a
// per-batch one a single row shared by every example.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "channel_sums.h"

#include <algorithm>
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

// Pixel rows a block takes at most: the forward runs each vector of channels across a
// block's rows (col_map) instead of a loop over a few channels (8 at the quick preset's first
// layers) per row; the backward sums a block's rows in T before adding them into double.
constexpr int64_t kPixelBlock = 64;

// The end of the block of pixel rows r = n * P + p from r0 on: at most kPixelBlock rows,
// at most r1, inside r0's example.
inline int64_t block_end(const ZShape& Z, int64_t r0, int64_t r1) {
  return std::min({r1, (r0 / Z.P + 1) * Z.P, r0 + kPixelBlock});
}

// pz[i * O + c] = sum over the R rows r of z[r, i, c] * dy[r, c] (z: [R, k, O], dy: [R, O]),
// summed in registers and in z's order, so the reads stream: where O is a multiple of
// 32-byte vectors, up to 8 of them at a time across the rows (a candidate never splits a
// vector); else row by row. Per row the loop over 8 channels of each candidate was mostly
// overhead, and a candidate at a time across the rows ran 1.5x slower on data not in cache.
template <typename T, int NV>
inline void zdy_block(const T* z, const T* dy, int64_t R, int64_t KO, int64_t O, int64_t c0,
                      T* pz) {
  constexpr int L = kLanes<T, 32>;
  vec_t<T, 32> acc[NV] = {};
  for (int64_t r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      acc[v] += vload<32>(z + r * KO + c0 + v * L) * vload<32>(dy + r * O + (c0 + v * L) % O);
  for (int v = 0; v < NV; ++v) vstore(pz + c0 + v * L, acc[v]);
}

template <typename T>
void zdy_sums(const T* z, const T* dy, int64_t R, int64_t K, int64_t O, T* pz) {
  constexpr int64_t L = kLanes<T, 32>;
  const int64_t KO = K * O;
  if (O % L == 0) {
    int64_t c = 0;
    for (; c + 8 * L <= KO; c += 8 * L) zdy_block<T, 8>(z, dy, R, KO, O, c, pz);
    for (; c < KO; c += L) zdy_block<T, 1>(z, dy, R, KO, O, c, pz);
    return;
  }
  std::fill(pz, pz + KO, T(0));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < K; ++i) {
      const T* zr = z + (r * K + i) * O;
      const T* g = dy + r * O;
      T* pi = pz + i * O;
      _Pragma("omp simd")
      for (int64_t c = 0; c < O; ++c) pi[c] += zr[c] * g[c];
    }
}

// Calls f(r0, r1, e) for blocks of pixel rows [r0, r1) of one example each, in parallel; e is
// the row of a coefficient with `rows` rows (1 per batch, N per example) that belongs to it.
template <typename F>
void for_pixel_blocks(const ZShape& Z, int64_t rows, F&& f) {
  const int64_t per = (Z.P + kPixelBlock - 1) / kPixelBlock;  // blocks per example
  at::parallel_for(0, Z.N * per, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / per, r0 = n * Z.P + (b % per) * kPixelBlock;
      f(r0, block_end(Z, r0, r0 + kPixelBlock), rows == 1 ? 0 : n);
    }
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
  const AsDouble m(mean, op, "mean"), v(var, op, "var"), g(gamma, op, "gamma"),
      b(beta, op, "beta");
  Bn3 c{std::vector<double>(KO), std::vector<double>(KO), std::vector<double>(KO),
        std::vector<double>(KO), std::vector<double>(KO)};
  for (int64_t j = 0; j < KO; ++j) {
    c.mean[j] = m[j];
    c.gamma[j] = g[j];
    c.rstd[j] = 1.0 / std::sqrt(v[j] + eps);
    c.scale[j] = c.gamma[j] * c.rstd[j];
    c.shift[j] = b[j] - c.mean[j] * c.scale[j];
  }
  return c;
}

// The mask's candidate columns as double, Tensor[rows, k] with 1 (per batch) or N rows.
std::vector<double> mask_values(const at::Tensor& mask, const ZShape& Z, int64_t* rows,
                                const char* op) {
  TORCH_CHECK(mask.dim() == 2 && mask.size(1) == Z.K, op, ": mask must be Tensor[1 or N, k = ",
              Z.K, "] (the conv candidates' columns), got shape ", mask.sizes());
  *rows = coef_rows(mask, Z, op, "mask");
  const AsDouble m(mask, op, "mask");
  std::vector<double> out(mask.numel());
  for (int64_t j = 0; j < mask.numel(); ++j) out[j] = m[j];
  return out;
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
    const int64_t K = Z.K, O = Z.O;
    for_pixel_blocks(Z, a.rows, [&](int64_t r0, int64_t r1, int64_t e) {
      const T* s = shift.data() + e * O;
      const T* cf = coef.data() + e * K * O;
      col_map<T>(r1 - r0, O, [&](int64_t j, int64_t c, auto Bc) {
        constexpr int B = decltype(Bc)::value;
        const T* zr = zp + (r0 + j) * K * O + c;
        auto acc = vload<B>(s + c);
        for (int64_t i = 0; i < K; ++i) acc += vload<B>(zr + i * O) * vload<B>(cf + i * O + c);
        vstore(op_ + (r0 + j) * O + c, acc);
      });
    });
  });
}

// The backward of combine_bn_out given dy: writes dz (every candidate's BN3 backward, the
// batch statistics' gradient included when `training`) and returns (the mask's gradient
// Tensor[N, k], dgamma, dbeta shaped like gamma). Two passes over z: the sums of z * dy and
// of dy per example and channel (in T over blocks of rows, then in double per thread), then dz.
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
      // a block's sums in T, then into double: z * dy per candidate (zdy_sums), dy
      std::vector<T> pz(KO), pg(O), unused(O);
      for (int64_t t = b; t < e; ++t) {
        const auto [r0, r1] = share(M, parts, t);
        for (int64_t rb = r0, re; rb < r1; rb = re) {
          re = block_end(Z, rb, r1);
          const int64_t n = rb / Z.P;
          zdy_sums<T>(zp + rb * KO, gp + rb * O, re - rb, K, O, pz.data());
          col_sums<T>(re - rb, O, pg.data(), unused.data(), [&](int64_t j, int64_t c, auto Bc) {
            const auto g = vload<decltype(Bc)::value>(gp + (rb + j) * O + c);
            return std::pair{g, decltype(g){}};
          });
          double* a = acc.data() + t * per + n * KO;
          double* sd = acc.data() + t * per + Z.N * KO + n * O;
          for (int64_t j = 0; j < KO; ++j) a[j] += pz[j];
          for (int64_t c = 0; c < O; ++c) sd[c] += pg[c];
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
    // a vector of dy's channels serves every candidate (as in the forward): a loop over the
    // O channels per candidate ran 8 iterations at the quick preset's O = 8
    T* op_ = dz.mutable_data_ptr<T>();
    const T* bp = beta_.data();
    const T* dp = delta.data();
    for_pixel_blocks(Z, rows, [&](int64_t r0, int64_t r1, int64_t e) {
      const T* ar = alpha.data() + e * KO;
      col_map<T>(r1 - r0, O, [&](int64_t j, int64_t c, auto Bc) {
        constexpr int B = decltype(Bc)::value;
        const int64_t r = r0 + j;
        const auto g = vload<B>(gp + r * O + c);
        const T* zr = zp + r * KO;
        T* o = op_ + r * KO;
        for (int64_t w = c; w < KO; w += O)  // candidate w / O, channels c..
          vstore(o + w,
                 vload<B>(zr + w) * vload<B>(bp + w) + vload<B>(dp + w) + g * vload<B>(ar + w));
      });
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
