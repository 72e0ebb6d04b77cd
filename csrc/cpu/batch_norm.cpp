// Batch-norm passes over a [M, C] matrix of channels-last data (rows = pixels), fused so each
// reads the data once or twice instead of the five or six passes of separate torch ops.
// Channels are contiguous; rows may have any stride (a column slice of a wider matrix).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "channel_sums.h"
#include "gemm_tile.h"

#include <algorithm>
#include <numeric>
#include <type_traits>
#include <vector>

namespace fbnet_fast {
namespace {

// Rows summed in the input precision before adding into the double accumulators.
constexpr int64_t kRowBlock = 64;

// Per-channel mean and biased variance over the rows (shifted by row 0 against cancellation;
// summed in the input precision over blocks of kRowBlock rows, then in double).
std::tuple<at::Tensor, at::Tensor> channel_stats_cpu(const at::Tensor& x_in) {
  auto x = rows_of(x_in, "channel_stats", "x");
  const int64_t M = x.size(0), C = x.size(1), ld = x.stride(0);
  TORCH_CHECK(M > 0, "channel_stats: needs at least one row, got shape ", x.sizes());
  auto mean = at::empty({C}, x.options());
  auto var = at::empty({C}, x.options());
  const int64_t parts = num_parts(M);
  std::vector<double> acc(parts * 2 * C, 0.0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_stats", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    using T = scalar_t;
    at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
      std::vector<T> part(2 * C);  // sums over a block of rows in T, then into double
      for (int64_t t = b; t < e; ++t) {
        auto [r0, r1] = share(M, parts, t);
        double* s1 = acc.data() + t * 2 * C;
        double* s2 = s1 + C;
        for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
          const T* x0 = xp + rb * ld;
          add_row_sums<T>(std::min(r1, rb + kRowBlock) - rb, C, part.data(), s1, s2,
                          [&](int64_t i, int64_t c, auto Bc) {
            constexpr int B = decltype(Bc)::value;
            const auto d = vload<B>(x0 + i * ld + c) - vload<B>(xp + c);
            return std::pair{d, d * d};
          });
        }
      }
    });
    scalar_t* mp = mean.mutable_data_ptr<scalar_t>();
    scalar_t* vp = var.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      const auto [s1, s2] = sum_parts(acc, parts, C, c);
      const double m = s1 / M;
      mp[c] = scalar_t(double(xp[c]) + m);
      vp[c] = scalar_t(std::max(0.0, s2 / M - m * m));
    }
  });
  return {mean, var};
}

// Per-channel mean and the centred cross-product matrix sum_r (x_r - mean)(x_r - mean)^T
// (Tensor[C, C], not divided by M) in one pass over the rows, in double (shifted by row 0
// against cancellation): a 1x1 conv's batch statistics and BN backward terms come from it
// without a pass over the conv's wide output (fbnet_fast/backends/fused_cpu.py).
std::tuple<at::Tensor, at::Tensor> channel_cov_cpu(const at::Tensor& x_in) {
  auto x = rows_of(x_in, "channel_cov", "x");
  const int64_t M = x.size(0), C = x.size(1), ld_x = x.stride(0);
  TORCH_CHECK(M > 0, "channel_cov: needs at least one row, got shape ", x.sizes());
  auto mean = at::empty({C}, x.options());
  auto cov = at::empty({C, C}, x.options());
  // per part: the shifted sums [C], then the cross products [C, ld] (ld: C padded to whole
  // 32-byte vectors of doubles, what gemm_tile writes)
  const int64_t ld = round_up(C, kLanes<double, 32>), parts = num_parts(M), per = C + C * ld;
  std::vector<double> acc(parts * per, 0.0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_cov", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
      // blocks of rows, shifted and in double, multiplied by the register-tiled kernel
      constexpr int64_t kRows = 64;
      std::vector<double> d(kRows * ld, 0.0);
      for (int64_t t = b; t < e; ++t) {
        const auto [r0, r1] = share(M, parts, t);
        double* s = acc.data() + t * per;
        double* q = s + C;
        for (int64_t r = r0; r < r1; r += kRows) {
          const int64_t nr = std::min(kRows, r1 - r);
          for (int64_t k = 0; k < nr; ++k) {
            const scalar_t* row = xp + (r + k) * ld_x;
            double* dk = d.data() + k * ld;
            for (int64_t c = 0; c < C; ++c) {
              dk[c] = double(row[c]) - double(xp[c]);
              s[c] += dk[c];
            }
          }
          // q[i][j] += sum_k d[k][i] d[k][j]
          gemm_tile<double>(C, ld, nr, d.data(), 1, ld, d.data(), ld, q, ld, true);
        }
      }
    });
    for (int64_t t = 1; t < parts; ++t)
      for (int64_t j = 0; j < per; ++j) acc[j] += acc[t * per + j];
    const double* s = acc.data();
    const double* q = s + C;
    scalar_t* mp = mean.mutable_data_ptr<scalar_t>();
    scalar_t* cp = cov.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < C; ++i) {
      mp[i] = scalar_t(double(xp[i]) + s[i] / M);
      for (int64_t j = 0; j < C; ++j) cp[i * C + j] = scalar_t(q[i * ld + j] - s[i] * s[j] / M);
    }
  });
  return {mean, cov};
}

// Checks an output [M, C] matrix shaped like x.
void check_out(const at::Tensor& out, const at::Tensor& x, const char* op, const char* name) {
  check_rows_out(out, x.size(0), x.size(1), x, op, name);
}

// Rows of a narrow contiguous matrix to take as one (1: none): a row of R * C values holds
// whole 64-byte vectors, at least 64 of them, where a row of C (8-24 channels in the small
// models) is one short, partly masked vector and the loop's overhead per row dominates.
inline int64_t fold_rows(int64_t C, int64_t element_size) {
  const int64_t V = 64 / element_size;
  if (C % V == 0 || C >= 64) return 1;
  int64_t R = V / std::gcd(C, V);
  while (R * C < 64) R *= 2;
  return R;
}

// out = relu(x * scale + shift) (relu optional); out may be x itself (elementwise, in place).
void scale_shift_out_cpu(const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift,
                         bool relu, const at::Tensor& out) {
  auto x = rows_of(x_in, "scale_shift", "x");
  const int64_t M = x.size(0), C = x.size(1), ld = x.stride(0);
  check_vec(scale, C, x, "scale_shift", "scale");
  check_vec(shift, C, x, "scale_shift", "shift");
  check_out(out, x, "scale_shift_out", "out");
  const int64_t R = fold_rows(C, x.element_size());
  if (R > 1 && M >= R && ld == C && out.stride(0) == C) {  // contiguous: R rows as one
    const int64_t Mf = M / R * R;
    scale_shift_out_cpu(x.narrow(0, 0, Mf).view({Mf / R, R * C}), scale.repeat({R}),
                        shift.repeat({R}), relu, out.narrow(0, 0, Mf).view({Mf / R, R * C}));
    if (Mf < M)
      scale_shift_out_cpu(x.narrow(0, Mf, M - Mf), scale, shift, relu, out.narrow(0, Mf, M - Mf));
    return;
  }
  auto sc = scale.contiguous(), sh = shift.contiguous();
  const int64_t lo = out.stride(0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scale_shift", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* a = sc.const_data_ptr<scalar_t>();
    const scalar_t* b = sh.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = xp + r * ld;
        scalar_t* o = op + r * lo;
        if (relu) {
_Pragma("omp simd")
          for (int64_t c = 0; c < C; ++c) o[c] = std::max(row[c] * a[c] + b[c], scalar_t(0));
        } else {
_Pragma("omp simd")
          for (int64_t c = 0; c < C; ++c) o[c] = row[c] * a[c] + b[c];
        }
      }
    });
  });
}

// relu(x * scale + shift) (relu optional), a new contiguous [M, C] matrix.
at::Tensor scale_shift_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                           bool relu) {
  TORCH_CHECK(x.dim() == 2, "scale_shift: x must be a [M, C] matrix, got shape ", x.sizes());
  auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  scale_shift_out_cpu(x, scale, shift, relu, out);
  return out;
}

// Rows [r0, r1) of out = alpha * g' + beta * z + delta per channel, g' = g, or with Relu g
// where z * scale + shift > 0 (else 0): a BN's backward once its sums are known.
template <typename T, bool Relu>
void bn_grad_apply_rows(int64_t r0, int64_t r1, int64_t C, const T* gp, int64_t lg,
                        const T* zp, int64_t lz, const T* alpha, const T* beta,
                        const T* delta, const T* scale, const T* shift, T* out, int64_t ldo) {
  col_map<T>(r1 - r0, C, [&](int64_t i, int64_t c, auto Bc) {
    constexpr int B = decltype(Bc)::value;
    using V = vec_t<T, B>;
    const int64_t r = r0 + i;
    const V z = vload<B>(zp + r * lz + c), g = vload<B>(gp + r * lg + c);
    V gv = g;
    if constexpr (Relu) gv = z * vload<B>(scale + c) + vload<B>(shift + c) > V{} ? g : V{};
    vstore(out + r * ldo + c,
           vload<B>(alpha + c) * gv + vload<B>(beta + c) * z + vload<B>(delta + c));
  });
}

// Backward of y = [relu](BN(z)) given dL/dy: (dL/dz, dL/dweight, dL/dbias).
// Training: batch statistics (mean, rstd) were used; eval: fixed statistics.
// dL/dz goes to dz, which may be grad itself (each element is read before it is written).
std::tuple<at::Tensor, at::Tensor> bn_backward_out_cpu(
    const at::Tensor& grad_in, const at::Tensor& z_in, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& bias, bool relu,
    bool training, const at::Tensor& dz) {
  auto g = rows_of(grad_in, "bn_backward", "grad");
  auto z = rows_of(z_in, "bn_backward", "z");
  const int64_t M = z.size(0), C = z.size(1);
  TORCH_CHECK(g.sizes() == z.sizes(), "bn_backward: grad shape ", g.sizes(),
              " differs from z shape ", z.sizes());
  TORCH_CHECK(g.scalar_type() == z.scalar_type(), "bn_backward: grad dtype ", g.scalar_type(),
              " differs from z dtype ", z.scalar_type());
  for (auto [v, n] : {std::pair{mean, "mean"}, {rstd, "rstd"}, {weight, "weight"}, {bias, "bias"}})
    check_vec(v, C, z, "bn_backward", n);
  TORCH_CHECK(M > 0, "bn_backward: needs at least one row, got shape ", z.sizes());
  const int64_t lg = g.stride(0), lz = z.stride(0);
  auto mu = mean.contiguous(), rs = rstd.contiguous(), w = weight.contiguous(), bb = bias.contiguous();
  check_out(dz, z, "bn_backward_out", "grad_z");
  const int64_t ldz = dz.stride(0);
  auto dw = at::empty({C}, z.options());
  auto db = at::empty({C}, z.options());
  const int64_t parts = num_parts(M);
  std::vector<double> acc(parts * 2 * C, 0.0);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "bn_backward", [&] {
    using T = scalar_t;
    const T* gp = g.const_data_ptr<T>();
    const T* zp = z.const_data_ptr<T>();
    std::vector<T> scale(C), shift(C);
    for (int64_t c = 0; c < C; ++c) {  // the forward's formula, so the ReLU mask matches
      scale[c] = w.const_data_ptr<T>()[c] * rs.const_data_ptr<T>()[c];
      shift[c] = bb.const_data_ptr<T>()[c] - mu.const_data_ptr<T>()[c] * scale[c];
    }
    const T* a = scale.data();
    const T* b = shift.data();
    // Pass 1: sum of g and of g * (z - mean), per thread, in T over blocks of rows, then double.
    const T* m = mu.const_data_ptr<T>();
    auto pass1 = [&](auto relu_c) {
      constexpr bool R = decltype(relu_c)::value;
      at::parallel_for(0, parts, 1, [&](int64_t t0, int64_t t1) {
        std::vector<T> part(2 * C);
        for (int64_t t = t0; t < t1; ++t) {
          auto [r0, r1] = share(M, parts, t);
          double* s1 = acc.data() + t * 2 * C;
          double* s2 = s1 + C;
          for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
            const T* g0 = gp + rb * lg;
            const T* z0 = zp + rb * lz;
            add_row_sums<T>(std::min(r1, rb + kRowBlock) - rb, C, part.data(), s1, s2,
                            [&](int64_t i, int64_t c, auto Bc) {
              constexpr int B = decltype(Bc)::value;
              using V = vec_t<T, B>;
              const V z = vload<B>(z0 + i * lz + c), g = vload<B>(g0 + i * lg + c);
              V gv = g;
              if constexpr (R) gv = z * vload<B>(a + c) + vload<B>(b + c) > V{} ? g : V{};
              return std::pair{gv, gv * (z - vload<B>(m + c))};
            });
          }
        }
      });
    };
    if (relu) pass1(std::true_type{}); else pass1(std::false_type{});
    std::vector<T> cz(C), c0(C);
    T* dwp = dw.mutable_data_ptr<T>();
    T* dbp = db.mutable_data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      const auto [s1, s2] = sum_parts(acc, parts, C, c);
      const double r = rs.const_data_ptr<T>()[c];
      dbp[c] = T(s1);
      dwp[c] = T(s2 * r);
      // dz = scale * (g - (db + zhat * dw) / M), zhat = (z - mean) * rstd
      cz[c] = training ? T(-double(a[c]) * r * (s2 * r) / M) : T(0);
      c0[c] = training ? T(-double(a[c]) * (s1 - double(m[c]) * r * (s2 * r)) / M) : T(0);
    }
    const T* pz = cz.data();
    const T* p0 = c0.data();
    T* out = dz.mutable_data_ptr<T>();
    auto pass2 = [&](auto relu_c) {
      at::parallel_for(0, M, kRowBlock, [&](int64_t r0, int64_t r1) {
        bn_grad_apply_rows<T, decltype(relu_c)::value>(r0, r1, C, gp, lg, zp, lz, a, pz, p0,
                                                       a, b, out, ldz);
      });
    };
    if (relu) pass2(std::true_type{}); else pass2(std::false_type{});
  });
  return {dw, db};
}

// out = coef[0] * grad + coef[1] * z + coef[2] per channel; out may be grad (in place).
void bn_grad_apply_out_cpu(const at::Tensor& grad_in, const at::Tensor& z_in,
                           const at::Tensor& coef, const at::Tensor& out) {
  const char* op = "bn_grad_apply_out";
  auto g = rows_of(grad_in, op, "grad");
  auto z = rows_of(z_in, op, "z");
  const int64_t M = z.size(0), C = z.size(1);
  TORCH_CHECK(g.sizes() == z.sizes() && g.scalar_type() == z.scalar_type(), op,
              ": grad and z must be [M, C] matrices of one shape and dtype, got ", g.sizes(),
              " ", g.scalar_type(), " and ", z.sizes(), " ", z.scalar_type());
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == 3 && coef.size(1) == C &&
                  coef.scalar_type() == z.scalar_type(),
              op, ": coef must be Tensor[3, ", C, "] of dtype ", z.scalar_type(),
              " (alpha, beta, delta), got shape ", coef.sizes(), " ", coef.scalar_type());
  check_out(out, z, op, "out");
  const auto cf = coef.contiguous();
  const int64_t lg = g.stride(0), lz = z.stride(0), ldo = out.stride(0);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "bn_grad_apply", [&] {
    using T = scalar_t;
    const T* gp = g.const_data_ptr<T>();
    const T* zp = z.const_data_ptr<T>();
    const T* cp = cf.const_data_ptr<T>();
    T* o = out.mutable_data_ptr<T>();
    at::parallel_for(0, M, kRowBlock, [&](int64_t r0, int64_t r1) {
      bn_grad_apply_rows<T, false>(r0, r1, C, gp, lg, zp, lz, cp, cp + C, cp + 2 * C,
                                   nullptr, nullptr, o, ldo);
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_backward_cpu(
    const at::Tensor& grad, const at::Tensor& z, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& weight, const at::Tensor& bias, bool relu, bool training) {
  TORCH_CHECK(z.dim() == 2, "bn_backward: z must be a [M, C] matrix, got shape ", z.sizes());
  auto dz = at::empty(z.sizes(), z.options().memory_format(at::MemoryFormat::Contiguous));
  auto [dw, db] = bn_backward_out_cpu(grad, z, mean, rstd, weight, bias, relu, training, dz);
  return {dz, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fbnet_fast, CPU, m) {
  m.impl("channel_stats", &channel_stats_cpu);
  m.impl("channel_cov", &channel_cov_cpu);
  m.impl("scale_shift", &scale_shift_cpu);
  m.impl("bn_backward", &bn_backward_cpu);
  m.impl("scale_shift_out", &scale_shift_out_cpu);
  m.impl("bn_backward_out", &bn_backward_out_cpu);
  m.impl("bn_grad_apply_out", &bn_grad_apply_out_cpu);
}

}  // namespace fbnet_fast
