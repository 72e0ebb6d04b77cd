// The fused block's small per-channel and per-weight steps, each one op: done as torch ops
// from Python they were 20-40 calls per MixedBlock call (about 6 us each), a fifth of the
// fixed cost of a layer at the main job's size. The per-channel ones are computed in double
// and returned in the inputs' dtype; the first 1x1's covariance terms (pw1_bn_stats,
// pw1_cov_backward) are GEMMs in the inputs' dtype.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "channel_sums.h"
#include "pool.h"
#include "scratch.h"

namespace fbnet_fast {
namespace {

void check_like(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == like.numel(), op, ": ", name, " has ", t.numel(),
              " elements, expected ", like.numel(), " (one per channel)");
}

// (rstd, scale, shift) of a BN used as y = x * scale + shift: rstd = 1 / sqrt(var + eps),
// scale = gamma * rstd, shift = beta - mean * scale; shaped like mean.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_coef_cpu(
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& gamma,
    const at::Tensor& beta, double eps) {
  for (auto [t, name] : {std::pair{&var, "var"}, {&gamma, "gamma"}, {&beta, "beta"}})
    check_like(*t, mean, "bn_coef", name);
  auto m = mean.contiguous(), v = var.contiguous(), g = gamma.contiguous(), b = beta.contiguous();
  auto rstd = at::empty_like(m), scale = at::empty_like(m), shift = at::empty_like(m);
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "bn_coef", [&] {
    const scalar_t *mp = m.const_data_ptr<scalar_t>(), *vp = v.const_data_ptr<scalar_t>();
    const scalar_t *gp = g.const_data_ptr<scalar_t>(), *bp = b.const_data_ptr<scalar_t>();
    scalar_t *rp = rstd.mutable_data_ptr<scalar_t>(), *sp = scale.mutable_data_ptr<scalar_t>();
    scalar_t* hp = shift.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < m.numel(); ++c) {
      const double r = 1.0 / std::sqrt(double(vp[c]) + eps);
      const double s = double(gp[c]) * r;
      rp[c] = scalar_t(r);
      sp[c] = scalar_t(s);
      hp[c] = scalar_t(double(bp[c]) - double(mp[c]) * s);
    }
  });
  return {rstd, scale, shift};
}

// A BN's backward as dz = alpha * g + beta * z + delta per channel, with the gradients of
// gamma and beta, from sum(g) and sum(g * z) over `count` rows (sum(g * (z - mean)) with
// `centered`); in eval mode (not `training`) beta and delta are zero. The batch statistics'
// own gradient is folded into beta and delta. Returned in gamma's dtype and shape.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_grad_coef_cpu(
    const at::Tensor& sum_g, const at::Tensor& sum_gz, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& gamma, int64_t count, bool training,
    bool centered) {
  for (auto [t, name] : {std::pair{&sum_g, "sum_g"}, {&sum_gz, "sum_gz"}, {&mean, "mean"},
                         {&rstd, "rstd"}})
    check_like(*t, gamma, "bn_grad_coef", name);
  TORCH_CHECK(count > 0, "bn_grad_coef: count must be positive, got ", count);
  const char* op = "bn_grad_coef";
  const AsDouble sg(sum_g, op, "sum_g"), sgz(sum_gz, op, "sum_gz"), m(mean, op, "mean"),
      r(rstd, op, "rstd"), g(gamma, op, "gamma");
  auto opts = gamma.options().memory_format(at::MemoryFormat::Contiguous);
  std::vector<at::Tensor> out;
  for (int i = 0; i < 5; ++i) out.push_back(at::empty(gamma.sizes(), opts));
  AT_DISPATCH_FLOATING_TYPES(gamma.scalar_type(), "bn_grad_coef", [&] {
    scalar_t* o[5];
    for (int i = 0; i < 5; ++i) o[i] = out[i].mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < gamma.numel(); ++c) {
      const double gzc = centered ? sgz[c] : sgz[c] - m[c] * sg[c];
      const double dgamma = gzc * r[c];
      const double alpha = g[c] * r[c];
      const double beta = training ? -alpha * r[c] * dgamma / double(count) : 0.0;
      const double delta = training ? -beta * m[c] - alpha * sg[c] / double(count) : 0.0;
      o[0][c] = scalar_t(alpha);
      o[1][c] = scalar_t(beta);
      o[2][c] = scalar_t(delta);
      o[3][c] = scalar_t(dgamma);
      o[4][c] = scalar_t(sg[c]);
    }
  });
  return {out[0], out[1], out[2], out[3], out[4]};
}

// The first 1x1's weight between its stored (packed) order and the dense [rows, cols] matrix
// of the fused GEMM. `blocks` is a flat list of (row0, rows, offset, groups) tuples, in the
// packed order: rows [row0, +rows) of the dense matrix come from w[offset:]; with groups G > 1
// the packed [G, rows / G, cols / G] block's element (g, j, c) is dense[row0 + j G + g,
// g cols / G + c] (the channel shuffle as a row order; zero off the block diagonal).
struct Pw1Block {
  int64_t row0, rows, offset, groups;
};

std::vector<Pw1Block> pw1_blocks(at::IntArrayRef blocks, int64_t cols, const char* op) {
  TORCH_CHECK(blocks.size() % 4 == 0, op, ": blocks must be (row0, rows, offset, groups) tuples");
  std::vector<Pw1Block> out;
  for (size_t i = 0; i < blocks.size(); i += 4) {
    Pw1Block b{blocks[i], blocks[i + 1], blocks[i + 2], blocks[i + 3]};
    TORCH_CHECK(b.groups > 0 && b.rows % b.groups == 0 && cols % b.groups == 0, op,
                ": a block's rows and the columns must divide by its groups");
    out.push_back(b);
  }
  return out;
}

// The copies between the two orders: n elements from packed offset s to dense offset d, one
// per dense row (a group's share of the row where the block is grouped).
struct Run {
  int64_t d, s, n;
};

std::vector<Run> element_runs(const std::vector<Pw1Block>& blocks, int64_t cols) {
  std::vector<Run> runs;
  for (const auto& b : blocks) {
    const int64_t G = b.groups, mg = b.rows / G, cg = cols / G;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < mg; ++j)
        runs.push_back({(b.row0 + j * G + g) * cols + g * cg, b.offset + (g * mg + j) * cg, cg});
  }
  return runs;
}

// f(run) for every run, in parallel above 64k elements: at the widest layers the copy is
// 1-3 MB, made on every call (MixedBlock's forward and backward each make the dense matrix
// once: 1.3x faster at 112 channels, 1.6x at 184; below, the threads' start costs more).
template <typename F>
void for_runs(const std::vector<Run>& runs, int64_t cols, F f) {
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, cols));
  at::parallel_for(0, static_cast<int64_t>(runs.size()), grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) f(runs[i]);
  });
}

void pw1_dense_out_cpu(const at::Tensor& w, at::IntArrayRef blocks, const at::Tensor& dense) {
  TORCH_CHECK(dense.dim() == 2 && dense.is_contiguous() && dense.scalar_type() == w.scalar_type(),
              "pw1_dense_out: dense must be a contiguous [rows, cols] matrix of w's dtype, got "
              "shape ", dense.sizes(), " ", dense.scalar_type());
  const int64_t rows = dense.size(0), cols = dense.size(1);
  auto bs = pw1_blocks(blocks, cols, "pw1_dense");
  int64_t need = 0;
  std::vector<std::pair<int64_t, int64_t>> spans;  // the blocks' dense rows
  for (const auto& b : bs) {
    TORCH_CHECK(b.row0 >= 0 && b.row0 + b.rows <= rows,
                "pw1_dense: a block runs past the dense matrix");
    need = std::max(need, b.offset + b.rows * (cols / b.groups));
    spans.push_back({b.row0, b.row0 + b.rows});
  }
  TORCH_CHECK(w.dim() == 1 && w.numel() >= need, "pw1_dense: w must be a flat weight of at least ",
              need, " elements, got shape ", w.sizes());
  auto wc = w.contiguous();
  // where the blocks cover every row once (the plans' case), each run zeroes the rest of its
  // row: every element is written once, not zeroed first and then copied
  std::sort(spans.begin(), spans.end());
  bool rows_once = true;
  for (size_t i = 0; i < spans.size(); ++i)
    rows_once = rows_once && spans[i].first == (i ? spans[i - 1].second : 0);
  rows_once = rows_once && !spans.empty() && spans.back().second == rows;
  if (!rows_once) dense.zero_();
  const int64_t esize = w.element_size();
  const char* src = static_cast<const char*>(wc.const_data_ptr());
  char* dst = static_cast<char*>(dense.mutable_data_ptr());
  for_runs(element_runs(bs, cols), cols, [&](const Run& r) {
    if (rows_once && r.n < cols) {  // a group's share: the rest of the row is zero
      const int64_t row = r.d / cols * cols;
      std::memset(dst + row * esize, 0, (r.d - row) * esize);
      std::memset(dst + (r.d + r.n) * esize, 0, (row + cols - r.d - r.n) * esize);
    }
    std::memcpy(dst + r.d * esize, src + r.s * esize, r.n * esize);
  });
}

at::Tensor pw1_dense_cpu(const at::Tensor& w, at::IntArrayRef blocks, int64_t rows,
                         int64_t cols) {
  auto dense = at::empty({rows, cols}, w.options());
  pw1_dense_out_cpu(w, blocks, dense);
  return dense;
}

at::Tensor pw1_packed_cpu(const at::Tensor& dense, at::IntArrayRef blocks) {
  TORCH_CHECK(dense.dim() == 2, "pw1_packed: dense must be [rows, cols], got ", dense.sizes());
  const int64_t rows = dense.size(0), cols = dense.size(1);
  auto bs = pw1_blocks(blocks, cols, "pw1_packed");
  int64_t need = 0;
  for (const auto& b : bs) {
    TORCH_CHECK(b.row0 + b.rows <= rows, "pw1_packed: a block runs past the dense matrix");
    need = std::max(need, b.offset + b.rows * (cols / b.groups));
  }
  auto dc = dense.contiguous();
  auto w = pooled_empty(dense, {need});  // the gradient returned every step
  const int64_t esize = dense.element_size();
  const char* src = static_cast<const char*>(dc.const_data_ptr());
  char* dst = static_cast<char*>(w.mutable_data_ptr());
  for_runs(element_runs(bs, cols), cols, [&](const Run& r) {
    std::memcpy(dst + r.s * esize, src + r.d * esize, r.n * esize);
  });
  return w;
}

// BN1's batch statistics (mean, biased variance) of A = X W1^T from X's mean and centred
// cross products (channel_cov), without a pass over A: mean = W1 mean(x), var = diag(W1 cov
// W1^T) / rows. One GEMM of T C_in^2, the rest [T]-sized.
std::tuple<at::Tensor, at::Tensor> pw1_bn_stats_cpu(const at::Tensor& w1, const at::Tensor& x_mean,
                                                    const at::Tensor& x_cov, int64_t rows) {
  TORCH_CHECK(w1.dim() == 2, "pw1_bn_stats: w1 must be [T, C_in], got ", w1.sizes());
  const int64_t C = w1.size(1);
  TORCH_CHECK(x_mean.numel() == C && x_cov.dim() == 2 && x_cov.size(0) == C &&
                  x_cov.size(1) == C,
              "pw1_bn_stats: x_mean and x_cov must be [", C, "] and [", C, ", ", C,
              "] (channel_cov of the input), got ", x_mean.sizes(), " and ", x_cov.sizes());
  TORCH_CHECK(rows > 0, "pw1_bn_stats: rows must be positive, got ", rows);
  auto mean = at::mv(w1, x_mean.reshape({C}));
  auto var = at::mm(w1, x_cov).mul_(w1).sum(1).div_(double(rows)).clamp_min_(0);
  return {mean, var};
}

// The part of the first 1x1's backward that the depthwise backward leaves (fused_cpu.py,
// _pw1_backward): given dA = alpha g + beta A + delta per channel, grad_x gains (beta A +
// delta) W1 and grad_w1 (when defined) gains (beta A + delta)^T X, both from the narrow X
// alone: with e = delta + beta W1 mean(x) and B = W1^T (beta W1), grad_w1 += beta W1 cov +
// rows e mean(x)^T and grad_x += X B + (W1^T e - B^T mean(x)). In place.
void pw1_cov_backward_cpu(const at::Tensor& grad_x, const std::optional<at::Tensor>& grad_w1,
                          const at::Tensor& x, const at::Tensor& w1, const at::Tensor& beta,
                          const at::Tensor& delta, const at::Tensor& x_mean,
                          const at::Tensor& x_cov) {
  TORCH_CHECK(x.dim() == 2 && w1.dim() == 2 && x.size(1) == w1.size(1),
              "pw1_cov_backward: x [M, C_in] and w1 [T, C_in] must agree, got ", x.sizes(),
              " and ", w1.sizes());
  const int64_t T = w1.size(0), C = w1.size(1);
  TORCH_CHECK(grad_x.sizes() == x.sizes(), "pw1_cov_backward: grad_x must be shaped like x ",
              x.sizes(), ", got ", grad_x.sizes());
  TORCH_CHECK(beta.numel() == T && delta.numel() == T, "pw1_cov_backward: beta and delta must "
              "have ", T, " elements (one per channel of A)");
  auto mx = x_mean.reshape({C});
  // beta W1 in this thread's scratch: at the 7x7 maps' [2464, 112] a fresh megabyte a call
  // page-faults on first touch (about 0.3 ms a call)
  at::Tensor bw1;
  AT_DISPATCH_FLOATING_TYPES(w1.scalar_type(), "pw1_cov_backward", [&] {
    bw1 = scratch<scalar_t>(0, {T, C}, {C, 1}, w1.options());
  });
  at::mul_out(bw1, w1, beta.reshape({T, 1}));
  auto e = at::mv(bw1, mx).add_(delta.reshape({T}));
  auto B = at::mm(w1.t(), bw1);
  if (grad_w1.has_value() && grad_w1->defined()) {
    TORCH_CHECK(grad_w1->sizes() == w1.sizes(), "pw1_cov_backward: grad_w1 must be shaped like w1");
    grad_w1->addmm_(bw1, x_cov).addr_(e, mx, 1, double(x.size(0)));
  }
  grad_x.addmm_(x, B).add_(at::mv(w1.t(), e).sub_(at::mv(B.t(), mx)));
}

// F.batch_norm's running-statistics update for the BNs of one fused call, from the packed
// statistics the call returns (row 0 the batch means, row 1 the biased variances, BN after
// BN): running = (1 - m) running + m batch, the variance made unbiased over counts[i] rows.
// tracked (empty, or one num_batches_tracked per BN) is counted up; a negative momentum is
// nn.BatchNorm2d's None, a plain average over the tracked batches. One call, where the
// foreach ops took five and a per-BN loop fifteen (it runs on every training call).
void bn_running_update_cpu(at::TensorList means, at::TensorList vars, at::TensorList tracked,
                           const at::Tensor& stats, at::IntArrayRef counts,
                           at::ArrayRef<double> momenta) {
  const size_t n = means.size();
  TORCH_CHECK(vars.size() == n && counts.size() == n && momenta.size() == n &&
                  (tracked.empty() || tracked.size() == n),
              "bn_running_update: one running mean, running var, count and momentum per BN "
              "(and none or one num_batches_tracked each)");
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) total += means[i].numel();
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 2 && stats.size(1) == total,
              "bn_running_update: stats must be [2, ", total, "] (means, variances), got ",
              stats.sizes());
  const AsDouble st(stats, "bn_running_update", "stats");
  int64_t off = 0;  // BN i's channels in the packed statistics
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &rm = means[i], &rv = vars[i];
    const int64_t c = rm.numel();
    TORCH_CHECK(rv.numel() == c && rm.is_contiguous() && rv.is_contiguous() &&
                    rm.scalar_type() == rv.scalar_type(),
                "bn_running_update: BN ", i, "'s running mean and var must be contiguous, "
                "of one dtype and size");
    TORCH_CHECK(counts[i] > 1, "bn_running_update: a count must exceed 1, got ", counts[i]);
    double m = momenta[i];
    if (!tracked.empty()) {
      TORCH_CHECK(tracked[i].numel() == 1 && tracked[i].scalar_type() == at::kLong,
                  "bn_running_update: num_batches_tracked must be one int64");
      const int64_t b = ++*tracked[i].mutable_data_ptr<int64_t>();
      if (m < 0) m = 1.0 / double(b);
    }
    TORCH_CHECK(m >= 0, "bn_running_update: a momentum of None needs num_batches_tracked");
    const double unbias = double(counts[i]) / double(counts[i] - 1);
    AT_DISPATCH_FLOATING_TYPES(rm.scalar_type(), "bn_running_update", [&] {
      scalar_t* a = rm.mutable_data_ptr<scalar_t>();
      scalar_t* v = rv.mutable_data_ptr<scalar_t>();
      for (int64_t j = 0; j < c; ++j) {
        a[j] = scalar_t((1 - m) * double(a[j]) + m * st[off + j]);
        v[j] = scalar_t((1 - m) * double(v[j]) + m * st[total + off + j] * unbias);
      }
    });
    off += c;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fbnet_fast, CPU, m) {
  m.impl("bn_coef", &bn_coef_cpu);
  m.impl("bn_grad_coef", &bn_grad_coef_cpu);
  m.impl("pw1_dense", &pw1_dense_cpu);
  m.impl("pw1_dense_out", &pw1_dense_out_cpu);
  m.impl("pw1_packed", &pw1_packed_cpu);
  m.impl("pw1_bn_stats", &pw1_bn_stats_cpu);
  m.impl("pw1_cov_backward", &pw1_cov_backward_cpu);
  m.impl("bn_running_update", &bn_running_update_cpu);
}

}  // namespace fbnet_fast
