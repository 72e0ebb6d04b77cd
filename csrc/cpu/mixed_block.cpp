// The fused MixedBlock on the CPU, forward and backward, each as one C++ call that sequences
// the kernels of the other files (fbnet_fast/backends/fused_cpu.py describes the plan and
// the custom ops around these two functions). As Python the sequence cost about 0.3 ms of
// interpreter and small-op overhead per block and step: a sixth of a discrete model's
// training step at the main job's size. Exposed to Python as functions of this extension
// module (not as ops: the custom ops mixed_block_cpu and mixed_block_cpu_backward, with
// their fake kernels, are what torch.compile traces; these run inside them).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/extension.h>

#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "channel_sums.h"  // num_parts, share
#include "gemm_tile.h"  // weight_bound
#include "parallel_runs.h"
#include "pool.h"

namespace fbnet_fast {
namespace {

using Opt = std::optional<at::Tensor>;
// X's mean and covariance, D, Z, A, S, the first 1x1's dense weight (None where absent)
using Kept = std::vector<Opt>;

// Up to this many input channels the backward makes A = X W1^T one tile at a time (inside
// the depthwise backward) instead of one whole GEMM whose result it writes and reads twice:
// the tiles cost an extra GEMM, 2 C_in flops per element of A, against 12 bytes of traffic
// per element saved; at the measured GEMM rate and bandwidth they break even near 30
// (bench/RESULTS.md: C_in 8-24 gain 1-23 % per layer, 32 mixed, 64 and more lose 2-7 %).
constexpr int64_t kTiledAMaxCin = 32;

// The other files' kernels, through the dispatcher (their functions are file-local); typed
// handles found once, called below the autograd keys (see Guard).
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using T2 = std::tuple<at::Tensor, at::Tensor>;
using T3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using T5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using CT = const at::Tensor&;

struct Kernels {
  c10::TypedOperatorHandle<T2(CT)> channel_stats = find_op<T2(CT)>("fbnet_fast::channel_stats");
  c10::TypedOperatorHandle<T2(CT)> channel_cov = find_op<T2(CT)>("fbnet_fast::channel_cov");
  c10::TypedOperatorHandle<at::Tensor(CT, CT, CT, bool)> scale_shift =
      find_op<at::Tensor(CT, CT, CT, bool)>("fbnet_fast::scale_shift");
  c10::TypedOperatorHandle<T3(CT, CT, CT, CT, CT, CT, bool, bool)> bn_backward =
      find_op<T3(CT, CT, CT, CT, CT, CT, bool, bool)>("fbnet_fast::bn_backward");
  using DwFwd = at::Tensor(CT, at::TensorList, int64_t, CT, CT, CT, const Opt&, bool);
  c10::TypedOperatorHandle<DwFwd> dw_conv_bn_out = find_op<DwFwd>("fbnet_fast::dw_conv_bn_out");
  using DwBwd = std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor>(
      CT, CT, at::TensorList, int64_t, CT, CT, CT, const Opt&, const Opt&, const Opt&,
      const Opt&, const Opt&, const Opt&, bool, const Opt&);
  c10::TypedOperatorHandle<DwBwd> dw_conv_bn_backward_out =
      find_op<DwBwd>("fbnet_fast::dw_conv_bn_backward_out");
  c10::TypedOperatorHandle<void(CT, CT, CT, CT, CT, CT, double, CT)> combine_bn_out =
      find_op<void(CT, CT, CT, CT, CT, CT, double, CT)>("fbnet_fast::combine_bn_out");
  c10::TypedOperatorHandle<T3(CT, CT, CT, CT, CT, CT, CT, double, bool, CT)>
      combine_bn_backward_out = find_op<T3(CT, CT, CT, CT, CT, CT, CT, double, bool, CT)>(
          "fbnet_fast::combine_bn_backward_out");
  c10::TypedOperatorHandle<at::Tensor(CT, CT, CT, CT, at::IntArrayRef, CT, bool)>
      pointwise_bn_out = find_op<at::Tensor(CT, CT, CT, CT, at::IntArrayRef, CT, bool)>(
          "fbnet_fast::pointwise_bn_out");
  c10::TypedOperatorHandle<T2(CT, CT, CT, CT, CT, CT, at::IntArrayRef, CT, bool)>
      pointwise_bn_backward_out = find_op<T2(CT, CT, CT, CT, CT, CT, at::IntArrayRef, CT, bool)>(
          "fbnet_fast::pointwise_bn_backward_out");
  c10::TypedOperatorHandle<T3(CT, CT, CT, CT, double)> bn_coef =
      find_op<T3(CT, CT, CT, CT, double)>("fbnet_fast::bn_coef");
  c10::TypedOperatorHandle<T5(CT, CT, CT, CT, CT, int64_t, bool, bool)> bn_grad_coef =
      find_op<T5(CT, CT, CT, CT, CT, int64_t, bool, bool)>("fbnet_fast::bn_grad_coef");
  c10::TypedOperatorHandle<void(CT, at::IntArrayRef, CT)> pw1_dense_out =
      find_op<void(CT, at::IntArrayRef, CT)>("fbnet_fast::pw1_dense_out");
  c10::TypedOperatorHandle<at::Tensor(CT, at::IntArrayRef)> pw1_packed =
      find_op<at::Tensor(CT, at::IntArrayRef)>("fbnet_fast::pw1_packed");
  c10::TypedOperatorHandle<T2(CT, CT, CT, int64_t)> pw1_bn_stats =
      find_op<T2(CT, CT, CT, int64_t)>("fbnet_fast::pw1_bn_stats");
  c10::TypedOperatorHandle<void(CT, const Opt&, CT, CT, CT, CT, CT, CT)> pw1_cov_backward =
      find_op<void(CT, const Opt&, CT, CT, CT, CT, CT, CT)>("fbnet_fast::pw1_cov_backward");
  c10::TypedOperatorHandle<void(CT, CT, CT, CT)> bn_grad_apply_out =
      find_op<void(CT, CT, CT, CT)>("fbnet_fast::bn_grad_apply_out");
  using RunUpd = void(at::TensorList, at::TensorList, at::TensorList, CT, at::IntArrayRef,
                      at::ArrayRef<double>);
  c10::TypedOperatorHandle<RunUpd> bn_running_update =
      find_op<RunUpd>("fbnet_fast::bn_running_update");
};

const Kernels& K() {
  static const Kernels k;
  return k;
}

// The calls below skip the autograd and view-tracking keys: nothing here records a graph
// (the Python custom ops and autograd.Function around these functions do).
struct Guard {
  at::AutoDispatchBelowADInplaceOrView below;
};

// What fbnet_fast/backends/plan.py's FusedPlan derives from a layout, built once per layout.
struct Plan {
  int64_t C, O, T, stride, k, skip_index;
  bool skip_conv, residual;
  std::vector<int64_t> conv_cols, runs, segments, blocks;
  bool cols_prefix;
  at::Tensor cols_index, perm;  // perm undefined when no candidate is grouped
  double eps;

  Plan(int64_t C, int64_t O, int64_t T, int64_t stride, int64_t skip_index, bool skip_conv,
       bool residual, std::vector<int64_t> conv_cols, std::vector<int64_t> runs,
       std::vector<int64_t> segments, std::vector<int64_t> blocks, Opt perm, double eps)
      : C(C), O(O), T(T), stride(stride), k(int64_t(conv_cols.size())), skip_index(skip_index),
        skip_conv(skip_conv && skip_index >= 0), residual(residual),
        conv_cols(std::move(conv_cols)), runs(std::move(runs)), segments(std::move(segments)),
        blocks(std::move(blocks)), eps(eps) {
    TORCH_CHECK(this->runs.size() % 4 == 0, "Plan: runs must be (start, channels, kernel, "
                "w_offset) tuples");
    cols_prefix = true;
    for (int64_t i = 0; i < k; ++i) cols_prefix = cols_prefix && this->conv_cols[i] == i;
    cols_index = at::tensor(this->conv_cols, at::kLong);
    if (perm.has_value() && perm->defined()) this->perm = perm->to(at::kLong).contiguous();
  }

  // stored order <-> expanded-column order of BN1's vectors
  at::Tensor shuffle(const at::Tensor& t) const {
    return perm.defined() ? t.index_select(0, perm) : t;
  }
  at::Tensor unshuffle(const at::Tensor& t) const {
    return perm.defined() ? at::empty_like(t).index_copy_(0, perm, t) : t;
  }
  at::Tensor conv_mask(const at::Tensor& mr) const {  // [Nm, K] -> the conv candidates' [Nm, k]
    return cols_prefix ? mr.narrow(1, 0, k) : mr.index_select(1, cols_index);
  }
  // into `out` (a [T, C] workspace) where the candidates' weights need rearranging
  at::Tensor dense_pw1(const at::Tensor& pw1, const at::Tensor& out) const {
    if (!perm.defined()) return pw1.view({T, C});
    K().pw1_dense_out.call(pw1, blocks, out);
    return out;
  }
  at::Tensor packed_pw1(const at::Tensor& dense) const {
    return perm.defined() ? K().pw1_packed.call(dense, blocks) : dense.reshape({-1});
  }
  std::vector<at::Tensor> dw_weights(const at::Tensor& dw) const {
    std::vector<at::Tensor> w;
    for (size_t i = 0; i < runs.size(); i += 4) {
      const int64_t ch = runs[i + 1], kk = runs[i + 2];
      w.push_back(dw.narrow(0, runs[i + 3], ch * kk * kk).view({ch, kk, kk}));
    }
    return w;
  }
  int64_t stat_size() const { return 2 * T + k * O + (skip_conv ? O : 0); }
};

// Scratch matrices reused across calls, one flat buffer per role and thread: allocated fresh,
// the [N*H*W, 22*C] intermediates come from mmap and every page faults on first touch, which
// cost as much as the arithmetic. A buffer only grows (to the largest layer seen); nothing
// returned or saved for backward is a view of one.
thread_local std::unordered_map<std::string, at::Tensor> workspace;

at::Tensor scratch(const char* role, at::IntArrayRef shape, const at::Tensor& like) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  const std::string key = std::string(role) + c10::toString(like.scalar_type());
  at::Tensor& buf = workspace[key];
  if (!buf.defined() || buf.numel() < n) {
    buf = at::Tensor();  // free the old one before allocating the larger one
    c10::InferenceMode normal(false);  // usable in and out of inference mode
    buf = at::empty({n}, like.options());
  }
  return buf.narrow(0, 0, n).view(shape);
}

void clear_workspace() { workspace.clear(); }

// [N, C, H, W] -> the [N*H*W, C] matrix of its channels-last data (a view when it is).
at::Tensor nhwc(const at::Tensor& t) {
  const int64_t n = t.size(0), c = t.size(1), h = t.size(2), w = t.size(3);
  return t.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).reshape({n * h * w, c});
}

// out = a b with the rows of a and out split into a share per thread, each share one GEMM on
// one core: at the 7x7 and 3x3 maps' few hundred rows the library's own split of one GEMM
// over both cores ran slower (the first 1x1's three GEMMs split this way: MixedBlock
// 1.05-1.08x faster at the 64-channel 7x7 layers, 1.01-1.05x at the 112- and 184-channel
// ones, the quick preset's step 1.02x).
void mm_split_rows(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const int64_t M = a.size(0), parts = num_parts(M);
  parallel_runs(parts, [&](int64_t t) {
    const auto [r0, r1] = share(M, parts, t);
    at::Tensor rows = out.narrow(0, r0, r1 - r0);
    at::mm_out(rows, a.narrow(0, r0, r1 - r0), b);
  });
}

struct BN {  // a BN as used: statistics, and y = x * scale + shift
  at::Tensor mean, var, rstd, scale, shift;
};

BN bn_of(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& gamma,
         const at::Tensor& beta, double eps) {
  auto [rstd, scale, shift] = K().bn_coef.call(mean, var, gamma, beta, eps);
  return {mean, var, rstd, scale, shift};
}

struct BNGrad {  // dz = alpha g + beta z + delta, and the parameters' gradients
  at::Tensor alpha, beta, delta, dgamma, dbeta;
};

BNGrad bn_grad(const BN& bn, const at::Tensor& gamma, const at::Tensor& sums, int64_t count,
               bool training) {
  auto [a, b, d, dg, db] =
      K().bn_grad_coef.call(sums[0], sums[1], bn.mean, bn.rstd, gamma, count, training, true);
  return {a, b, d, dg, db};
}

struct Params {  // the op's weights, in fused_op_args order
  at::Tensor pw1, dw, pw2, g1, b1, g2, b2, g3, b3;
  Opt sw, sg, sb;
};

struct Geo {
  int64_t n, h, w, ho, wo, M1, M2;
  Geo(const at::Tensor& x, int64_t s)
      : n(x.size(0)), h(x.size(2)), w(x.size(3)), ho((h + s - 1) / s), wo((w + s - 1) / s),
        M1(n * h * w), M2(n * ho * wo) {}
  // NHWC rows as the channels_last [N, C, H, W] views the kernels take
  at::Tensor image_in(const at::Tensor& rows) const {
    return rows.view({n, h, w, rows.size(-1)}).permute({0, 3, 1, 2});
  }
  at::Tensor image_out(const at::Tensor& rows) const {
    return rows.view({n, ho, wo, rows.size(-1)}).permute({0, 3, 1, 2});
  }
};

// The forward's intermediates (fused_cpu.py's plan); `stats_in`: the backward's recompute,
// with the statistics the forward used; `reuse`: what the forward kept (D, Z, A, S, the dense
// W1 where present; the rest is made again).
struct Fwd {
  at::Tensor X, W1, g1, A, D, Z, S, Xs;
  std::vector<at::Tensor> dw;  // the depthwise weights, one view per run
  BN bn1, bn2, skip_bn;
  at::Tensor m3, v3;
  Kept cov;  // X's channel_cov where BN1's statistics came from it
};

Fwd forward_pass(const Plan& p, const Geo& g, const at::Tensor& x, const Params& w,
                 const std::vector<at::Tensor>& running, bool training, bool via_cov,
                 const at::Tensor* stats_in, bool keep, bool keep_big, const Kept* reuse,
                 bool keep_d = true, bool keep_w1 = false) {
  const auto& k = K();
  Fwd r;
  const int64_t C = p.C, T = p.T, O = p.O;
  auto get = [&](size_t i) { return (reuse && (*reuse)[i]) ? *(*reuse)[i] : at::Tensor(); };
  auto buf = [&](const char* role, at::IntArrayRef shape, bool kept = true) {
    return keep_big && kept ? pooled_empty(x, shape) : scratch(role, shape, x);
  };
  r.X = nhwc(x);
  r.W1 = get(6);
  if (!r.W1.defined()) r.W1 = p.dense_pw1(w.pw1, buf("W1", {T, C}, keep_w1));
  r.g1 = p.shuffle(w.g1);
  r.dw = p.dw_weights(w.dw);
  const at::Tensor b1 = p.shuffle(w.b1);
  // (mean, var) of the `len` channels from `off` in the packed statistics stats_in
  auto packed = [&](int64_t off, int64_t len) {
    return std::pair{stats_in->select(0, 0).narrow(0, off, len),
                     stats_in->select(0, 1).narrow(0, off, len)};
  };
  r.D = get(2), r.Z = get(3), r.A = get(4), r.S = get(5);
  // A = X W1^T is written only where it is read whole: by BN1's backward where the map is
  // too small for the covariance route, and for BN1's statistics where it is too small for
  // theirs; else the depthwise (forward and backward) makes it per tile from X
  const bool need_a = (keep && (C > kTiledAMaxCin || (training && !(g.M1 > C)))) ||
                      (!stats_in && training && !via_cov);
  if (!r.A.defined() && need_a) {
    r.A = buf("A", {g.M1, T});
    mm_split_rows(r.A, r.X, r.W1.t());
  }
  at::Tensor m1, v1;
  if (stats_in) {
    std::tie(m1, v1) = packed(0, T);
    m1 = p.shuffle(m1), v1 = p.shuffle(v1);
  } else if (training && via_cov) {
    auto [mx, cx] = k.channel_cov.call(r.X);
    std::tie(m1, v1) = k.pw1_bn_stats.call(r.W1, mx, cx, g.M1);
    r.cov = {mx, cx};
  } else if (training) {
    std::tie(m1, v1) = k.channel_stats.call(r.A);
  } else {
    m1 = p.shuffle(running[0]);
    v1 = p.shuffle(running[1]);
  }
  r.bn1 = bn_of(m1, v1, r.g1, b1, p.eps);
  // BN2's and BN3's batch statistics are taken only where they are not known: not in eval
  // or in the backward's recomputation (there the epilogues cost about 5 % of the second
  // 1x1s' call at the quick preset's 32x32 layers, and of the depthwise's at 56x56)
  const bool batch_stats = training && !stats_in;
  at::Tensor m2, v2;
  if (!r.D.defined()) {  // BN1 + ReLU inside the depthwise, BN2's statistics from its epilogue
    r.D = buf("D", {g.M2, T}, keep_d);
    const bool tiled = !r.A.defined();
    auto st = k.dw_conv_bn_out.call(g.image_in(tiled ? r.X : r.A), r.dw, p.stride, r.bn1.scale,
                                    r.bn1.shift, g.image_out(r.D),
                                    tiled ? Opt(r.W1) : Opt(), batch_stats);
    if (batch_stats) m2 = st[0], v2 = st[1];
  }
  if (stats_in) {
    std::tie(m2, v2) = packed(T, T);
  } else if (!training) {
    m2 = running[2], v2 = running[3];
  }
  r.bn2 = bn_of(m2, v2, w.g2, w.b2, p.eps);
  if (!r.Z.defined()) {  // BN2 + ReLU the second 1x1s' prologue, BN3's statistics their epilogue
    r.Z = buf("Z", {g.M2, p.k * O});
    auto st = k.pointwise_bn_out.call(r.D, r.bn2.scale, r.bn2.shift, w.pw2, p.segments, r.Z,
                                      batch_stats);
    if (batch_stats) r.m3 = st[0], r.v3 = st[1];
  }
  if (stats_in) {
    std::tie(r.m3, r.v3) = packed(2 * T, p.k * O);
  } else if (!training) {
    r.m3 = running[4], r.v3 = running[5];
  }
  if (p.skip_conv) {
    r.Xs = p.stride == 1 ? r.X : nhwc(x.slice(2, 0, at::indexing::None, p.stride)
                                          .slice(3, 0, at::indexing::None, p.stride));
    if (!r.S.defined()) r.S = at::mm(r.Xs, w.sw->view({O, C}).t());
    at::Tensor ms, vs;
    if (stats_in) {
      std::tie(ms, vs) = packed(2 * T + p.k * O, O);
    } else if (training) {
      std::tie(ms, vs) = k.channel_stats.call(r.S);
    } else {
      ms = running[6], vs = running[7];
    }
    r.skip_bn = bn_of(ms, vs, *w.sg, *w.sb, p.eps);
  }
  return r;
}

// A block's budget for what it keeps: keep_bytes (fused_cpu.KEEP_BYTES), and above
// kKeepChannels input channels that much more in proportion. Per byte kept, recomputing
// costs FLOPs in proportion to the channel count (the 1x1s' GEMMs have K = C_in, and the
// expansion is a multiple of it): at 224x224 batch 8 the 112- and 184-channel layers (14x14
// and 7x7 maps, 14-21 MiB each) then keep, the step ran 1.11x faster and saved 228 MB for
// its backward instead of 93 (the reference: 2,803 MB), peak RSS 1,390 MiB.
constexpr int64_t kKeepChannels = 64;

int64_t keep_budget(const Plan& p, int64_t keep_bytes) {
  return std::max(keep_bytes, keep_bytes * p.C / kKeepChannels);
}

// Whether a training call keeps D, Z, a conv skip's output and maybe A (keep_budget).
bool keeps(const Plan& p, const Geo& g, bool via_cov, const at::Tensor& x, int64_t keep_bytes) {
  const int64_t cols = p.T + p.k * p.O + (p.skip_conv ? p.O : 0);
  const int64_t size = g.M2 * cols + (via_cov ? 0 : g.M1 * p.T);
  return size * int64_t(x.element_size()) <= keep_budget(p, keep_bytes);
}

// Whether a training call's forward writes A whole and keeps it, even where BN1's statistics
// could come from X's covariance without A: where the backward would otherwise make A whole
// again (more than kTiledAMaxCin input channels) and A fits the keep budget with D and Z.
// The step then runs one GEMM for A instead of two (the forward's per tile and the
// backward's whole one): MixedBlock 1.10x faster at 64->112 and 1.12x at 64->64 (7x7,
// batch 8).
bool keeps_a(const Plan& p, const Geo& g, const at::Tensor& x, int64_t keep_bytes) {
  return p.C > kTiledAMaxCin && keeps(p, g, false, x, keep_bytes);
}

// Whether a training call keeps A (and Z) instead of D where A, D and Z do not fit together
// but D and Z do: at stride 1, A is as large as D, and the backward that would make A whole
// again (more than kTiledAMaxCin input channels) then remakes D with a depthwise forward
// instead, and the forward makes A with one library GEMM instead of per depthwise tile
// (the 112-channel layers at 224x224's 14x14 maps: 20 MiB for D and Z, 35 with A; MixedBlock
// 1.07x faster there, batch 8, the 224x224 step 1.03x; unchanged at 64 channels).
bool keeps_a_for_d(const Plan& p, const Geo& g, const at::Tensor& x, int64_t keep_bytes) {
  return p.stride == 1 && p.C > kTiledAMaxCin && !keeps(p, g, false, x, keep_bytes) &&
         keeps(p, g, true, x, keep_bytes);
}

// Whether a call that keeps its intermediates (keep_big) also keeps the first 1x1's weight as
// the dense matrix its GEMMs take, which the backward would otherwise make again: where the
// candidates' weights need rearranging (a grouped candidate) and the dense weight is at most a
// quarter of D and Z, so that it stays a small share of what a step keeps at any batch (kept
// whatever the size, at the quick preset's 32x32 batch 2 the fused step saved more than the
// reference). MixedBlock 1.015x faster at 112->112, 1.009x at 64->112, 1.012x at 64->64 (7x7,
// batch 8; the 3x3 layers' weights are too large to keep there).
bool keeps_w1(const Plan& p, const Geo& g) {
  return p.perm.defined() && 4 * p.T * p.C <= g.M2 * (p.T + p.k * p.O);
}

// (y, statistics [2, S], kept): kept (with keep_bytes >= 0 in training) holds X's mean and
// covariance (or None) and D, Z, A, S and the dense W1 where the call keeps them (else
// None). With momenta (one per BN, as bn_running_update takes them, with its `tracked`) a
// training call also updates the running statistics from the batch's: in this call, not a
// Python call and an op after it, each of which ran several times slower than alone because
// the kernels before it had pushed its code and data out of the caches (MixedBlock
// 1.01-1.02x faster per step).
std::tuple<at::Tensor, at::Tensor, Kept> forward(
    const Plan& p, const at::Tensor& x, const at::Tensor& mask, const at::Tensor& pw1,
    const at::Tensor& dw, const at::Tensor& pw2, const at::Tensor& g1, const at::Tensor& b1,
    const at::Tensor& g2, const at::Tensor& b2, const at::Tensor& g3, const at::Tensor& b3,
    const Opt& sw, const Opt& sg, const Opt& sb, const std::vector<at::Tensor>& running,
    bool training, bool via_cov, int64_t keep_bytes, const std::vector<double>& momenta,
    const std::vector<at::Tensor>& tracked) {
  Guard guard;
  TORCH_CHECK(x.dim() == 4 && x.size(1) == p.C, "mixed_block_cpu: x must be [N, ", p.C,
              ", H, W], got ", x.sizes());
  const Geo g(x, p.stride);
  const bool keeping = keep_bytes >= 0 && training;
  const bool a_for_d = keeping && via_cov && keeps_a_for_d(p, g, x, keep_bytes);
  if (keeping && via_cov && (a_for_d || keeps_a(p, g, x, keep_bytes))) via_cov = false;
  const bool keep_big = keeping && (a_for_d || keeps(p, g, via_cov, x, keep_bytes));
  const Params w{pw1, dw, pw2, g1, b1, g2, b2, g3, b3, sw, sg, sb};
  const bool keep_w1 = keep_big && keeps_w1(p, g);
  Fwd r = forward_pass(p, g, x, w, running, training, via_cov, nullptr, false, keep_big, nullptr,
                       !a_for_d, keep_w1);
  const int64_t O = p.O, C = p.C, hw = g.h * g.w, howo = g.ho * g.wo;
  const at::Tensor mr = mask.dim() == 1 ? mask.view({1, -1}) : mask;  // [Nm, K]
  const int64_t nm = mr.size(0);
  const at::Tensor mc = p.conv_mask(mr);
  auto out = at::empty({g.n, howo, O}, x.options());
  K().combine_bn_out.call(r.Z.view({g.n, howo, p.k, O}), mc, r.m3, r.v3, g3, b3, p.eps, out);
  at::Tensor res = p.residual ? mc.sum(1) : at::Tensor();
  if (p.skip_index >= 0) {
    const at::Tensor ms = mr.select(1, p.skip_index);
    if (!p.skip_conv) {
      res = res.defined() ? res + ms : ms;
    } else {
      out.addcmul_(K().scale_shift.call(r.S, r.skip_bn.scale, r.skip_bn.shift, true)
                       .view({g.n, howo, O}),
                   ms.view({nm, 1, 1}));
    }
  }
  if (res.defined()) out.addcmul_(r.X.view({g.n, hw, C}), res.view({nm, 1, 1}));
  at::Tensor y = g.image_out(out.view({g.M2, O}));
  if (!x.is_contiguous(at::MemoryFormat::ChannelsLast)) y = y.contiguous();
  // statistics in stored order: bn1 (unshuffled), bn2, bn3, skip_bn
  auto stats = at::empty({2, p.stat_size()}, x.options());
  const std::vector<std::pair<at::Tensor, at::Tensor>> parts = {
      {p.unshuffle(r.bn1.mean), p.unshuffle(r.bn1.var)}, {r.bn2.mean, r.bn2.var},
      {r.m3, r.v3}};
  int64_t off = 0;
  for (const auto& [m, v] : parts) {
    stats[0].narrow(0, off, m.numel()).copy_(m);
    stats[1].narrow(0, off, v.numel()).copy_(v);
    off += m.numel();
  }
  if (p.skip_conv) {
    stats[0].narrow(0, off, O).copy_(r.skip_bn.mean);
    stats[1].narrow(0, off, O).copy_(r.skip_bn.var);
  }
  if (training && !momenta.empty()) {
    std::vector<at::Tensor> means, vars;
    for (size_t i = 0; i + 1 < running.size(); i += 2) {
      means.push_back(running[i]);
      vars.push_back(running[i + 1]);
    }
    std::vector<int64_t> counts(means.size(), g.M2);
    counts[0] = g.M1;
    K().bn_running_update.call(means, vars, tracked, stats, counts, momenta);
  }
  Kept kept;
  if (keeping) {
    kept = r.cov.empty() ? Kept{std::nullopt, std::nullopt} : r.cov;
    auto opt = [&](const at::Tensor& t) { return (keep_big && t.defined()) ? Opt(t) : Opt(); };
    kept.push_back(a_for_d ? Opt() : opt(r.D));
    for (const at::Tensor* t : {&r.Z, &r.A, &r.S}) kept.push_back(opt(*t));
    kept.push_back(keep_w1 ? Opt(r.W1) : Opt());
  }
  return {y, stats, kept};
}

// The first 1x1's backward terms that the depthwise backward leaves (dA = alpha g + beta A +
// delta: the depthwise backward took the alpha g part into dX and dW1): through X's
// covariance where there are more rows than channels (pw1_cov_backward), else through A.
void pw1_backward(const Opt& dW1, at::Tensor& dX, const Fwd& r, const BNGrad& c, const Geo& g,
                  bool training, const Kept* kept) {
  if (!training) return;
  if (g.M1 > r.X.size(1)) {
    at::Tensor mx, cx;
    if (kept && (*kept)[0]) {
      mx = *(*kept)[0], cx = *(*kept)[1];
    } else {
      std::tie(mx, cx) = K().channel_cov.call(r.X);
    }
    K().pw1_cov_backward.call(dX, dW1, r.X, r.W1, c.beta, c.delta, mx, cx);
    return;
  }
  if (dW1) dW1->addcmul_(c.beta.unsqueeze(1), at::mm(r.A.t(), r.X)).addr_(c.delta, r.X.sum(0));
  auto bA = scratch("bA", r.A.sizes(), r.A);
  dX.addmm_(at::mul_out(bA, r.A, c.beta), r.W1).add_(at::mv(r.W1.t(), c.delta));
}

// Gradients w.r.t. x, mask, pw1, dw, pw2, bn1-3 weight/bias, the skip conv's weight and BN
// (empty where the skip is the identity, and the convs' where not weight_grads, the mask's
// where not mask_grad); recomputes the forward from x except what `kept` holds.
std::vector<at::Tensor> backward(
    const Plan& p, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mask,
    const at::Tensor& pw1, const at::Tensor& dw, const at::Tensor& pw2, const at::Tensor& g1,
    const at::Tensor& b1, const at::Tensor& g2, const at::Tensor& b2, const at::Tensor& g3,
    const at::Tensor& b3, const Opt& sw, const Opt& sg, const Opt& sb, const at::Tensor& stats,
    bool training, bool via_cov, bool weight_grads, bool mask_grad, const Kept& kept_in) {
  Guard guard;
  const auto& k = K();
  const Geo g(x, p.stride);
  const Params w{pw1, dw, pw2, g1, b1, g2, b2, g3, b3, sw, sg, sb};
  const Kept* kept = kept_in.size() == 7 ? &kept_in : nullptr;
  Fwd r = forward_pass(p, g, x, w, {}, training, via_cov, &stats, true, false, kept);
  const int64_t O = p.O, T = p.T, C = p.C, KK = mask.size(-1), hw = g.h * g.w,
                howo = g.ho * g.wo;
  const at::Tensor dY = nhwc(grad).view({g.n, howo, O});
  const at::Tensor mr = mask.dim() == 1 ? mask.view({1, -1}) : mask;
  const int64_t nm = mr.size(0);
  const at::Tensor mc = p.conv_mask(mr);
  auto dm = at::zeros({g.n, KK}, x.options());  // per example
  auto dmc = p.cols_prefix ? dm.narrow(1, 0, p.k) : at::Tensor();
  // every candidate's BN3 backward and the mask's gradient at once
  const at::Tensor Zv = r.Z.view({g.n, howo, p.k, O});
  auto dZ = scratch("ZT", Zv.sizes(), x);
  auto [dmk, dg3, db3] =
      k.combine_bn_backward_out.call(Zv, dY, mc, r.m3, r.v3, g3, b3, p.eps, training, dZ);
  if (p.cols_prefix) dmc.copy_(dmk);
  else dm.index_copy_(1, p.cols_index, dmk);
  // the second 1x1s' backward, BN2's ReLU mask and sums its epilogue: g2 = dL/d(BN2 output
  // before the ReLU)
  auto gd = scratch("dH2", {g.M2, T}, x);
  auto [dpw2, sums2] = k.pointwise_bn_backward_out.call(
      dZ.view({g.M2, p.k * O}), r.D, r.bn2.scale, r.bn2.shift, r.bn2.mean, pw2, p.segments, gd,
      weight_grads);
  const BNGrad c2 = bn_grad(r.bn2, w.g2, sums2, g.M2, training);
  at::Tensor dXskip;
  at::Tensor res = p.residual ? mc.sum(1) : at::Tensor();
  auto none = [&] { return x.new_empty({0}); };
  at::Tensor dsw = none(), dsg = none(), dsb = none();
  if (p.residual) {
    if (mask_grad) {
      auto prod = scratch("dYX", dY.sizes(), x);
      auto Sx = at::mul_out(prod, dY, r.X.view({g.n, hw, C})).sum({1, 2});
      if (p.cols_prefix) dmc.add_(Sx.unsqueeze(1));
      else dm.index_add_(1, p.cols_index, Sx.unsqueeze(1).expand({g.n, p.k}));
      if (p.skip_index >= 0) dm.select(1, p.skip_index).copy_(Sx);
    }
    if (p.skip_index >= 0) res = res + mr.select(1, p.skip_index);
  } else if (p.skip_conv) {
    const BN& bn = r.skip_bn;
    const at::Tensor ms = mr.select(1, p.skip_index);
    if (mask_grad) {
      auto Ys = k.scale_shift.call(r.S, bn.scale, bn.shift, true);  // the skip's conv-BN-ReLU
      dm.select(1, p.skip_index).copy_((dY * Ys.view({g.n, howo, O})).sum({1, 2}));
    }
    auto G = (dY * ms.view({nm, 1, 1})).view({g.M2, O});
    auto [dS, dsg_, dsb_] = k.bn_backward.call(G, r.S, bn.mean, bn.rstd, *sg, *sb, true, training);
    dsg = dsg_, dsb = dsb_;
    const at::Tensor Ws = sw->view({O, C});
    if (weight_grads) dsw = at::mm(dS.t(), r.Xs).reshape({-1});
    auto dXs = at::mm(dS, Ws);
    if (p.stride == 1) {
      dXskip = dXs;
    } else {
      auto full = at::zeros({g.n, g.h, g.w, C}, x.options());
      full.slice(1, 0, at::indexing::None, p.stride)
          .slice(2, 0, at::indexing::None, p.stride)
          .copy_(dXs.view({g.n, g.ho, g.wo, C}));
      dXskip = full.view({g.M1, C});
    }
  }
  // the depthwise backward applies BN2's backward to each tile of g2 it reads and makes g =
  // dL/d(BN1 output before the ReLU) a row at a time, with BN1's sums. Below 512 KB of
  // first-1x1 weight it takes the first 1x1's two products of g from that row while it is
  // in cache (pw1_backward takes the rest of dA = alpha g + beta A + delta apart); above,
  // where the products are two whole GEMMs after the pass anyway, it writes g whole, and dA
  // is made from g and A in one pass before them: the beta A + delta terms then cost no
  // GEMMs of their own (two of C_in^2 T through X's covariance, or two as large as the
  // products themselves through A). It does the same below 512 KB where the forward kept A
  // (small maps: MixedBlock 1.03x faster at 64->64 and 1.04x at 64->112, 7x7, batch 8; where
  // the backward makes A again, as at the 64-channel layers' 14x14 maps, it ran 2-3 % slower).
  const bool tiled = !r.A.defined();
  const bool a_kept = kept && (*kept)[4].has_value();
  const bool whole = !tiled && (weight_bound(r.W1) || a_kept);
  auto gW = x.new_empty({g.M1, C});
  at::Tensor dA, alpha1;
  Opt grad_a, x_in, x_weight, grad_x;  // g written whole, or the products taken per row
  if (whole) {
    dA = scratch("dA", {g.M1, T}, x);
    grad_a = g.image_in(dA);
  } else {
    alpha1 = r.g1 * r.bn1.rstd;
    x_in = r.X, x_weight = alpha1.unsqueeze(1) * r.W1, grad_x = gW;
  }
  auto [dws, sums1, gX] = k.dw_conv_bn_backward_out.call(
      g.image_out(gd), g.image_in(tiled ? r.X : r.A), r.dw, p.stride, r.bn1.scale,
      r.bn1.shift, r.bn1.mean, grad_a, x_in, x_weight, grad_x, Opt(g.image_out(r.D)),
      Opt(at::stack({c2.alpha, c2.beta, c2.delta})), weight_grads, tiled ? Opt(r.W1) : Opt());
  const BNGrad c1 = bn_grad(r.bn1, r.g1, sums1, g.M1, training);
  Opt dW1;
  if (whole) {
    k.bn_grad_apply_out.call(dA, r.A, at::stack({c1.alpha, c1.beta, c1.delta}), dA);
    mm_split_rows(gW, dA, r.W1);
    if (weight_grads) {  // from the pool, like every weight gradient the op returns
      auto out = pooled_empty(x, {T, C});
      mm_split_rows(out, dA.t(), r.X);
      dW1 = out;
    }
  } else if (weight_grads) {
    dW1 = gX.mul_(alpha1.unsqueeze(1));
  }
  if (dXskip.defined()) gW.add_(dXskip);
  if (!whole) pw1_backward(dW1, gW, r, c1, g, training, kept);
  if (res.defined())
    gW.view({g.n, hw, C}).addcmul_(dY, res.view({nm, 1, 1}));
  at::Tensor dx = g.image_in(gW);
  if (!x.is_contiguous(at::MemoryFormat::ChannelsLast)) dx = dx.contiguous();
  at::Tensor dmask = mask_grad ? (mask.dim() == 2 ? dm : dm.sum(0)) : none();
  at::Tensor ddw = none(), dpw1 = none();
  if (weight_grads) {
    std::vector<at::Tensor> flat;
    for (const auto& t : dws) flat.push_back(t.reshape({-1}));
    ddw = pooled_empty(x, {dw.numel()});
    at::cat_out(ddw, flat);
    dpw1 = p.packed_pw1(*dW1);
  }
  return {dx,        dmask,     dpw1,      ddw,       dpw2,     p.unshuffle(c1.dgamma),
          p.unshuffle(c1.dbeta), c2.dgamma, c2.dbeta, dg3,      db3,      dsw,
          dsg,       dsb};
}

namespace ag = torch::autograd;

// The eager path's backward as a C++ autograd node (fused_cpu.py's mixed_block_eager): the
// engine runs it without Python. Through an autograd.Function the forward's apply and
// saving, and the backward's Python call, cost 0.1-0.14 ms each per call, on top of the
// kernels (most of it cache misses: the kernels before had evicted that code and data).
// It saves x, the mask, the twelve weights, the statistics and what the forward kept, as
// SavedVariables (so saved-tensor hooks see them and in-place changes are caught), and
// returns each input's gradient where the engine needs it: the weights' only where one of
// them needs one (weight_grads), the mask's only where it needs one (mask_grad).
struct MixedBlockBackward : ag::Node {
  std::shared_ptr<const Plan> plan;
  std::vector<ag::SavedVariable> saved;  // x, mask, 12 weights, statistics, kept
  bool training = true, via_cov = false;

  std::string name() const override { return "MixedBlockCpuBackward"; }
  void release_variables() override { saved.clear(); }

  ag::variable_list apply(ag::variable_list&& grads) override {
    TORCH_CHECK(!saved.empty(), "MixedBlockCpuBackward: its saved tensors were freed by an "
                "earlier backward; pass retain_graph=True to the first backward to run it again");
    std::vector<at::Tensor> t;
    for (const auto& v : saved) t.push_back(v.unpack(getptr()));
    ag::variable_list out(14);
    if (!grads[0].defined()) return out;
    bool weight_grads = false;
    for (size_t i = 2; i < 14; ++i) weight_grads = weight_grads || should_compute_output(i);
    auto opt = [](const at::Tensor& v) { return v.defined() ? Opt(v) : Opt(); };
    Kept kept;
    for (size_t i = 15; i < t.size(); ++i) kept.push_back(opt(t[i]));
    auto g = backward(*plan, grads[0], t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8],
                      t[9], t[10], opt(t[11]), opt(t[12]), opt(t[13]), t[14], training,
                      via_cov, weight_grads, should_compute_output(1), kept);
    for (size_t i = 0; i < 14; ++i)
      if (should_compute_output(i)) out[i] = g[i];
    return out;
  }
};

// A node held the way this PyTorch holds them: std::shared_ptr up to 2.13, c10::intrusive_ptr
// from 2.14 (the project supports both).
template <typename N>
auto make_node() {
  if constexpr (std::is_same_v<decltype(std::declval<N&>().getptr()),
                               std::shared_ptr<ag::Node>>) {
    return std::shared_ptr<N>(new N());
  } else {
    return c10::make_intrusive<N>();
  }
}

// forward(), recording MixedBlockCpuBackward where grad mode is on and an input needs a
// gradient; only then does it keep intermediates (keep_bytes) for the backward.
std::tuple<at::Tensor, at::Tensor> forward_with_grad(
    const std::shared_ptr<Plan>& p, const at::Tensor& x, const at::Tensor& mask,
    const at::Tensor& pw1, const at::Tensor& dw, const at::Tensor& pw2, const at::Tensor& g1,
    const at::Tensor& b1, const at::Tensor& g2, const at::Tensor& b2, const at::Tensor& g3,
    const at::Tensor& b3, const Opt& sw, const Opt& sg, const Opt& sb,
    const std::vector<at::Tensor>& running, bool training, bool via_cov, int64_t keep_bytes,
    const std::vector<double>& momenta, const std::vector<at::Tensor>& tracked) {
  const bool graph =
      ag::compute_requires_grad(x, mask, pw1, dw, pw2, g1, b1, g2, b2, g3, b3, sw, sg, sb);
  auto [y, stats, kept] = forward(*p, x, mask, pw1, dw, pw2, g1, b1, g2, b2, g3, b3, sw, sg,
                                  sb, running, training, via_cov, graph ? keep_bytes : -1,
                                  momenta, tracked);
  if (!graph) return {y, stats};
  auto node = make_node<MixedBlockBackward>();
  node->plan = p;
  node->training = training;
  node->via_cov = via_cov;
  node->set_next_edges(
      ag::collect_next_edges(x, mask, pw1, dw, pw2, g1, b1, g2, b2, g3, b3, sw, sg, sb));
  for (const at::Tensor* v : {&x, &mask, &pw1, &dw, &pw2, &g1, &b1, &g2, &b2, &g3, &b3})
    node->saved.emplace_back(*v, false);
  for (const Opt* v : {&sw, &sg, &sb}) node->saved.emplace_back(v->value_or(at::Tensor()), false);
  node->saved.emplace_back(stats, false);
  for (const Opt& v : kept) node->saved.emplace_back(v.value_or(at::Tensor()), false);
  ag::set_history(y, node);
  return {y, stats};
}

}  // namespace
}  // namespace fbnet_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace fbnet_fast;
  namespace py = pybind11;
  m.doc() = "The fused MixedBlock's CPU forward and backward as one call each "
            "(fbnet_fast/backends/fused_cpu.py)";
  py::class_<Plan, std::shared_ptr<Plan>>(m, "Plan")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, bool, bool,
                    std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>,
                    std::vector<int64_t>, Opt, double>(),
           py::arg("in_channels"), py::arg("out_channels"), py::arg("total_mid"),
           py::arg("stride"), py::arg("skip_index"), py::arg("skip_is_conv"),
           py::arg("residual"), py::arg("conv_cols"), py::arg("dw_runs"),
           py::arg("pw2_segments"), py::arg("pw1_blocks"), py::arg("perm"), py::arg("eps"));
  m.def("forward", &forward);
  m.def("forward_with_grad", &forward_with_grad);
  m.def("backward", &backward);
  m.def("clear_workspace", &clear_workspace);
}
