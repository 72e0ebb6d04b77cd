// The depthwise conv of the fused MixedBlock with the batch norms around it folded in, so
// the wide [N*H*W, 22*C] tensors between them are read and written fewer times:
//   forward: its input is relu(a * scale + shift) (BN1 + ReLU), applied to a tile of input
//     rows in a per-thread scratch buffer as the conv reads them (the prologue), so BN1's
//     output is never written; given the first 1x1's input and weight instead of a, the
//     prologue makes a's rows too (a tile GEMM), so a is never written either; it returns
//     the per-channel mean and variance of its output (the epilogue: BN2's batch
//     statistics, summed while the output rows are in cache);
//   backward: grad-weight reads its input through the same prologue; its output gradient
//     may come through the next BN's backward, also applied per tile; grad-input leaves the
//     gradient at BN1's output before the ReLU (zero where a * scale + shift <= 0) and
//     returns the two sums BN1's backward needs.
// Both work on tiles of output rows, all channels at a time (whole pixels are contiguous, so
// the reads stream), in per-thread buffers kept across calls.
#include "channel_sums.h"
#include "depthwise_kernels.h"
#include "gemm_tile.h"
#include "scratch.h"

namespace fbnet_fast {
namespace {

// Cache bytes per thread for the tiles of rows the kernels transform into buffers (L2 is
// 2 MiB per core on the project's machines); at least kMinTileRows output rows per tile, so
// the halo rows that two tiles both transform stay a fraction of the work.
constexpr int64_t kTileBytes = 3 << 19;
constexpr int64_t kMinTileRows = 8;
// Pixels of g the depthwise backward's first-1x1 products take at a time, about.
constexpr int64_t kProductPixels = 128;

// Output rows per tile when each takes `per_row` buffer elements of type T and a tile `halo`
// more.
template <typename T>
int64_t tile_rows(int64_t per_row, int64_t halo) {
  const int64_t fit = (kTileBytes / static_cast<int64_t>(sizeof(T)) - halo) / per_row;
  return std::max(kMinTileRows, fit);
}

// The widest kernel's halo: rows (and columns) on each side of a window's centre.
inline int64_t max_halo(const Checked& r) {
  int64_t P = 0;
  for (int64_t k : r.ks) P = std::max(P, k / 2);
  return P;
}

// S re-pointed at a buffer of input rows from `lo` on, laid out [rows][pad + W + pad][ld]
// (the pointer that goes with it is column 0's).
inline Shape tile_view(const Shape& S, int64_t lo, int64_t ld, int64_t pad = 0) {
  Shape t = S;
  t.xn = 0; t.xh = (S.W + 2 * pad) * ld; t.xw = ld; t.h0 = lo; t.padw = pad;
  return t;
}

// Zeroes the `pad` columns on each side of `rows` buffer rows of W pixels (stride ld) from
// column 0 at buf: the kernels then take the edge columns through their interior paths.
template <typename T>
void zero_pad_columns(T* buf, int64_t rows, int64_t W, int64_t ld, int64_t pad) {
  if (pad == 0) return;
  for (int64_t r = 0; r < rows; ++r) {
    T* row = buf + r * (W + 2 * pad) * ld;
    std::fill(row - pad * ld, row, T(0));
    std::fill(row + W * ld, row + (W + pad) * ld, T(0));
  }
}

// relu(a * scale + shift) of input rows [lo, hi) of image n into buf (tile_view's layout
// with C channels and `pad` zero columns; buf points at column 0); returns S re-pointed at
// buf. a holds rows from S.h0 on. All channels at once: whole pixels are contiguous, so the
// reads stream.
template <typename T>
Shape bn_relu_rows(const Shape& S, const T* a, const T* sc, const T* sh, int64_t n, int64_t lo,
                   int64_t hi, T* buf, int64_t pad = 0) {
  const Shape t = tile_view(S, lo, S.C, pad);
  for (int64_t ih = lo; ih < hi; ++ih)
    for (int64_t iw = 0; iw < S.W; ++iw) {
      const T* src = a + n * S.xn + (ih - S.h0) * S.xh + iw * S.xw;
      T* d = buf + (ih - lo) * t.xh + iw * S.C;
#pragma omp simd
      for (int64_t c = 0; c < S.C; ++c) d[c] = std::max(src[c] * sc[c] + sh[c], T(0));
    }
  zero_pad_columns(buf, hi - lo, S.W, S.C, pad);
  return t;
}

// The first 1x1's output a = x w^T for input rows [lo, hi) of image n into buf (tile_view's
// layout with pixel stride ld >= C and `pad` zero columns; buf points at column 0); returns
// S re-pointed at buf. x is the block input (channels contiguous, strides xs), wt its weight
// transposed to [C_in, ld] and zero-padded (`transposed_padded`): a is made per tile and
// never written whole.
// With sc and sh (ld values each, zero-padded), relu(a * sc + sh) instead: BN1 + ReLU as the
// tile GEMM's epilogue, not a second pass over the tile (the forward runs 1.1x faster at the
// quick preset's 8->8 32x32 layers).
template <typename T>
Shape pw_rows(const Shape& S, const T* x, const int64_t* xs, int64_t Ci, const T* wt,
              int64_t ld, int64_t n, int64_t lo, int64_t hi, T* buf, int64_t pad = 0,
              const T* sc = nullptr, const T* sh = nullptr) {
  const Shape t = tile_view(S, lo, ld, pad);
  for (int64_t ih = lo; ih < hi; ++ih)
    gemm_tile<T>(S.W, ld, Ci, x + n * xs[0] + ih * xs[2], xs[3], 1, wt, ld,
                 buf + (ih - lo) * t.xh, ld, false, sc, sh);
  zero_pad_columns(buf, hi - lo, S.W, ld, pad);
  return t;
}

// v's C values zero-padded to ld (what pw_rows' epilogue reads).
template <typename T>
std::vector<T> padded(const T* v, int64_t C, int64_t ld) {
  std::vector<T> out(ld, T(0));
  std::copy_n(v, C, out.data());
  return out;
}

// a_weight (Tensor[C, C_in]) of the first 1x1 whose input is a (Tensor[N, C_in, H, W]).
void check_a_weight(const at::Tensor& aw, const at::Tensor& a, const char* op) {
  TORCH_CHECK(aw.dim() == 2 && aw.size(1) == a.size(1) && aw.scalar_type() == a.scalar_type(),
              op, ": a_weight must be Tensor[C, C_in = ", a.size(1), "] of dtype ",
              a.scalar_type(), " (a is then the first 1x1's input), got shape ", aw.sizes(),
              " and dtype ", aw.scalar_type());
}

// a = x aw^T made whole into `whole` (Tensor[N*H*W, C]), as Tensor[N, C, H, W] (channels
// last): where aw is too large to stream once per tile (weight_bound).
at::Tensor whole_a(const at::Tensor& x, const at::Tensor& aw, at::Tensor whole) {
  at::mm_out(whole, x.permute({0, 2, 3, 1}).reshape({-1, x.size(1)}), aw.t());
  return whole.view({x.size(0), x.size(2), x.size(3), aw.size(0)}).permute({0, 3, 1, 2});
}

// What the depthwise ops read for a, given their optional a_weight: (a, aw), with aw defined
// where a's rows are made per tile from x = a_in (pw_rows); above kTiledWeightBytes of
// a_weight, where every tile would stream the weight again, a made whole into scratch
// `slot` and aw undefined; without a_weight, (a_in, undefined).
std::pair<at::Tensor, at::Tensor> a_source(const at::Tensor& a_in,
                                           const std::optional<at::Tensor>& a_weight, int slot,
                                           const char* op) {
  if (!a_weight.has_value()) return {a_in, at::Tensor()};
  check_a_weight(*a_weight, a_in, op);
  if (!weight_bound(*a_weight)) return {a_in, a_weight->contiguous()};
  at::Tensor a;
  AT_DISPATCH_FLOATING_TYPES(a_in.scalar_type(), "dw_conv_bn_whole_a", [&] {
    const int64_t C = a_weight->size(0), rows = a_in.size(0) * a_in.size(2) * a_in.size(3);
    a = whole_a(a_in, *a_weight, scratch<scalar_t>(slot, {rows, C}, {C, 1}, a_in.options()));
  });
  return {a, at::Tensor()};
}

// aw (Tensor[C, C_in]) transposed to [C_in, ld], zero-padded: what pw_rows reads.
template <typename T>
std::vector<T> transposed_padded(const at::Tensor& aw, int64_t ld) {
  const int64_t C = aw.size(0), Ci = aw.size(1);
  std::vector<T> out(Ci * ld, T(0));
  const T* src = aw.const_data_ptr<T>();
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < Ci; ++i) out[i * ld + c] = src[c * Ci + i];
  return out;
}

// The input rows [lo, hi) that output rows [oh0, oh1) read through a window of halo P.
inline std::pair<int64_t, int64_t> input_rows(const Shape& S, int64_t P, int64_t oh0,
                                              int64_t oh1) {
  return {std::max<int64_t>(0, oh0 * S.s - P), std::min(S.H, (oh1 - 1) * S.s + P + 1)};
}

// Calls f(n, oh0, oh1) for tiles of at most `tile` output rows of [r0, r1) (row = n * Ho +
// oh), each inside one image.
template <typename F>
void for_tiles(const Shape& S, int64_t r0, int64_t r1, int64_t tile, F&& f) {
  for (int64_t r = r0; r < r1;) {
    const int64_t n = r / S.Ho, oh0 = r % S.Ho;
    const int64_t oh1 = std::min({S.Ho, oh0 + tile, oh0 + r1 - r});
    f(n, oh0, oh1);
    r += oh1 - oh0;
  }
}

void check_bn(const at::Tensor& a, const Shape& S, const char* op,
              std::initializer_list<std::pair<const at::Tensor*, const char*>> vs) {
  for (auto [v, name] : vs) check_vec(*v, S.C, a, op, name);
}

// out = dw_conv(relu(a * scale + shift)); returns Tensor[2, C] in a's dtype: per channel, the
// mean and biased variance of out (BN2's batch statistics). With a_weight (Tensor[C, C_in]),
// `a` is the first 1x1's input x (Tensor[N, C_in, H, W]) and a = x a_weight^T is made per
// tile in the prologue, never written (above kTiledWeightBytes of a_weight, where every tile
// would stream the weight again, one whole GEMM makes a first). Without `stats` (eval and
// the backward's recomputation, which have them) the epilogue is skipped and an empty tensor
// comes back.
at::Tensor dw_conv_bn_out_cpu(const at::Tensor& a_in, at::TensorList weights, int64_t stride,
                              const at::Tensor& scale, const at::Tensor& shift,
                              const at::Tensor& out, const std::optional<at::Tensor>& a_weight,
                              bool stats) {
  const char* name = "dw_conv_bn_out";
  const auto source = a_source(a_in, a_weight, 0, name);
  const auto a = channel_contiguous(source.first);
  const auto& aw = source.second;
  const bool fused = aw.defined();
  const int64_t Ci = fused ? a.size(1) : 0;
  auto r = check_inputs(a, weights, stride, fused ? aw.size(0) : -1);
  auto& S = r.S;
  S.xn = a.stride(0); S.xh = a.stride(2); S.xw = a.stride(3);
  check_bn(a, S, name, {{&scale, "scale"}, {&shift, "shift"}});
  check_out(out, a, {S.N, S.C, S.Ho, S.Wo}, name, "out");
  auto wt = taps_major(weights, r);
  auto sc = scale.contiguous(), sh = shift.contiguous();
  const int64_t rows = S.N * S.Ho, parts = num_parts(rows), C = S.C;
  std::vector<double> acc(parts * 2 * C, 0.0);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "dw_conv_bn", [&] {
    using T = scalar_t;
    const auto gs = make_groups<T>(r, wt.const_data_ptr<T>(), nullptr);
    T* op = out.mutable_data_ptr<T>();
    const T* ap = a.const_data_ptr<T>();
    const T* scp = sc.const_data_ptr<T>();
    const T* shp = sh.const_data_ptr<T>();
    // the buffer's pixel stride: C, or with a_weight C padded to whole 32-byte vectors (the
    // tile GEMM writes whole vectors), and a_weight transposed to [C_in, ld] for it
    const int64_t ld = fused ? round_up(C, kLanes<T, 32>) : C;
    const auto awt = fused ? transposed_padded<T>(aw, ld) : std::vector<T>();
    const auto sc_ld = fused ? padded<T>(scp, C, ld) : std::vector<T>();
    const auto sh_ld = fused ? padded<T>(shp, C, ld) : std::vector<T>();
    const int64_t xs[4] = {a.stride(0), a.stride(1), a.stride(2), a.stride(3)};
    // the tile's rows carry P zero columns on each side: every output column goes through
    // the conv's interior path (at 32x32 the forward runs 1.06x faster, at 8x8 1.18x)
    const int64_t P = max_halo(r), row_a = (S.W + 2 * P) * ld;
    const int64_t tile = tile_rows<T>(S.s * row_a, 2 * P * row_a);
    const int64_t a_rows = std::min(S.H, (tile - 1) * S.s + 2 * P + 1);
    at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
      // kept across calls: no allocation per call; ba points at column 0
      T* ba = thread_buffer<T>(1, a_rows * row_a) + P * ld;
      std::vector<T> part(2 * C);
      for (int64_t t = b; t < e; ++t) {
        const auto [r0, r1] = share(rows, parts, t);
        double* s1 = acc.data() + t * 2 * C;
        double* s2 = s1 + C;
        for_tiles(S, r0, r1, tile, [&](int64_t n, int64_t oh0, int64_t oh1) {
          const auto [lo, hi] = input_rows(S, P, oh0, oh1);
          const Shape St =
              fused ? pw_rows<T>(S, ap, xs, Ci, awt.data(), ld, n, lo, hi, ba, P, sc_ld.data(),
                                 sh_ld.data())
                    : bn_relu_rows<T>(S, ap, scp, shp, n, lo, hi, ba, P);
          // a row at a time, all groups, then the epilogue over that row while it is in L1:
          // BN2's sums (in T per output row, vectorized, then into double). With the groups
          // as the outer loop the epilogue read the tile back from L2 or beyond, and the op
          // ran 1.22x slower at the quick preset's 8->8 32x32 layers (1.05x at 16->16 56x56).
          for (int64_t oh = oh0; oh < oh1; ++oh) {
            for (const auto& g : gs) fwd_row<T>(St, g, ba, op, n, oh);
            if (!stats) continue;
            const T* orow = op + (n * S.Ho + oh) * S.Wo * C;
            add_row_sums<T>(S.Wo, C, part.data(), s1, s2, [&](int64_t ow, int64_t c, auto Bc) {
              const auto v = vload<decltype(Bc)::value>(orow + ow * C + c);
              return std::pair{v, v * v};
            });
          }
        });
      }
    });
  });
  if (!stats) return at::empty({0}, a.options());
  return stats_tensor(acc, parts, C, rows * S.Wo, a.scalar_type());
}

// Output-gradient rows [lo, hi) of image n as the next BN's backward makes them:
// grad * alpha + z * beta + delta (coef = [alpha; beta; delta]), into buf (laid out
// [rows][pad + Wo + pad][C], pad zero columns on each side; buf points at column 0).
template <typename T>
void bn_grad_rows(const Shape& S, const T* grad, const T* z, const T* coef, int64_t n,
                  int64_t lo, int64_t hi, T* buf, int64_t pad) {
  const T *al = coef, *be = coef + S.C, *de = coef + 2 * S.C;
  const int64_t base = (n * S.Ho + lo) * S.Wo * S.C, ld = (S.Wo + 2 * pad) * S.C;
  for (int64_t r = 0; r < hi - lo; ++r)
    for (int64_t ow = 0; ow < S.Wo; ++ow) {
      const T* gp = grad + base + (r * S.Wo + ow) * S.C;
      const T* zp = z + base + (r * S.Wo + ow) * S.C;
      T* d = buf + r * ld + ow * S.C;
      _Pragma("omp simd")
      for (int64_t c = 0; c < S.C; ++c) d[c] = gp[c] * al[c] + zp[c] * be[c] + de[c];
    }
  zero_pad_columns(buf, hi - lo, S.Wo, S.C, pad);
}

// Backward of dw_conv_bn_out's conv given grad (dL/dout), or with out (the conv's output)
// and out_coef (Tensor[3, C]) given grad * out_coef[0] + out * out_coef[1] + out_coef[2]
// (the next BN's backward, applied to each tile of rows as it is read, so that gradient is
// never written). Writes into grad_a g = dL/d(a * scale + shift): the conv's grad-input where
// a * scale + shift > 0, else 0 (without grad_a, g lives one row at a time in a buffer and is
// never written). Returns the grad of each weight, Tensor[2, C] float64: per channel, the sum
// of g and of g * (a - mean) (BN1's backward sums), and with x (Tensor[N*H*W, C_in], the rows
// the first 1x1 read to make a) and x_weight (Tensor[C, C_in]) the first 1x1's two products
// while each row of g is in cache: grad_x = g x_weight, and g^T x returned as Tensor[C, C_in]
// (empty without x). When x_weight is larger than kTiledWeightBytes they are two whole GEMMs
// after the pass instead: streaming the weight once per row would cost more. Without
// weight_grads (a step where no weight needs a gradient) the weights' grads and g^T x are
// skipped: an empty list and an empty tensor come back. With a_weight (Tensor[C, C_in]), a
// is the first 1x1's input (Tensor[N, C_in, H, W]) and a's rows are made per tile, as in
// dw_conv_bn_out (above kTiledWeightBytes, one whole GEMM first).
// One pass over tiles of output rows does it all: each tile transforms the gradient rows and
// BN1 + ReLU of a's rows it reads into per-thread buffers, takes grad-weight from them, and
// the grad-input of the input rows the tile owns (stride s: s per output row) with its
// epilogue row by row.
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> dw_conv_bn_backward_out_cpu(
    const at::Tensor& grad_in, const at::Tensor& a_in, at::TensorList weights, int64_t stride,
    const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& mean,
    const std::optional<at::Tensor>& grad_a, const std::optional<at::Tensor>& x_in,
    const std::optional<at::Tensor>& x_weight, const std::optional<at::Tensor>& grad_x,
    const std::optional<at::Tensor>& out_in, const std::optional<at::Tensor>& out_coef,
    bool weight_grads, const std::optional<at::Tensor>& a_weight) {
  const char* op = "dw_conv_bn_backward_out";
  TORCH_CHECK(grad_a.has_value() || x_in.has_value(), op,
              ": without grad_a it needs x, x_weight and grad_x (g is then not kept)");
  at::Tensor ga = grad_a.has_value() ? *grad_a : at::Tensor();
  // with a_weight, a_in is the first 1x1's input and a's rows are made per tile (pw_rows),
  // as in the forward, so the backward's recomputation need not write a; made whole, a goes
  // into scratch slot 4: slot 0 may hold g below, and slot 4 (the tiles' raw rows of a) is
  // then unused
  const auto source = a_source(a_in, a_weight, 4, op);
  const auto& aw = source.second;
  const bool a_tiled = aw.defined();
  const auto in = backward_inputs(grad_in, source.first, weights, stride, ga, op, "grad_a",
                                  a_tiled ? aw.size(0) : -1);
  const auto& r = in.r;
  const auto& S = r.S;
  const auto &a = in.x, &gy = in.gy, &wt = in.wt, &wi = in.wi;
  check_bn(a, S, op, {{&scale, "scale"}, {&shift, "shift"}, {&mean, "mean"}});
  auto sc = scale.contiguous(), sh = shift.contiguous(), mu = mean.contiguous();
  const int64_t C = S.C, rows = S.N * S.Ho, parts = num_parts(rows);
  TORCH_CHECK(out_in.has_value() == out_coef.has_value(), op, ": out and out_coef go together");
  at::Tensor z, coef;
  if (out_in.has_value()) {
    check_grad(*out_in, a, S, op);
    z = out_in->contiguous(at::MemoryFormat::ChannelsLast);
    TORCH_CHECK(out_coef->dim() == 2 && out_coef->size(0) == 3 && out_coef->size(1) == C &&
                    out_coef->scalar_type() == a.scalar_type(),
                op, ": out_coef must be Tensor[3, ", C, "] of dtype ", a.scalar_type(),
                " (alpha, beta, delta), got shape ", out_coef->sizes());
    coef = out_coef->contiguous();
  }
  TORCH_CHECK(x_in.has_value() == x_weight.has_value() && x_in.has_value() == grad_x.has_value(),
              op, ": x, x_weight and grad_x go together");
  int64_t Ci = 0, ldx = 0, Cp = 0;  // Cp: x_weight's rows padded to whole 32-byte vectors
  bool xw_whole = false;
  at::Tensor x, xw, gxw = at::empty({0}, a.options());
  if (x_in.has_value()) {
    x = *x_in;
    Ci = x.size(-1);
    TORCH_CHECK(x.dim() == 2 && x.size(0) == S.N * S.H * S.W && x.stride(1) == 1 &&
                    x.scalar_type() == a.scalar_type(),
                op, ": x must be the [N*H*W = ", S.N * S.H * S.W, ", C_in] rows of dtype ",
                a.scalar_type(), " with contiguous channels, got shape ", x.sizes());
    TORCH_CHECK(x_weight->dim() == 2 && x_weight->size(0) == C && x_weight->size(1) == Ci &&
                    x_weight->scalar_type() == a.scalar_type(),
                op, ": x_weight must be Tensor[", C, ", ", Ci, "], got shape ", x_weight->sizes());
    TORCH_CHECK(grad_x->dim() == 2 && grad_x->sizes() == x.sizes() && grad_x->stride(1) == 1 &&
                    grad_x->stride(0) == Ci && grad_x->scalar_type() == a.scalar_type(),
                op, ": grad_x must be a contiguous matrix shaped like x, got shape ",
                grad_x->sizes());
    ldx = x.stride(0);
    if (weight_bound(*x_weight)) {
      xw_whole = true;
    } else {
      xw = x_weight->contiguous();
      Cp = round_up(Ci, 32 / a.element_size());
      if (weight_grads) gxw = at::empty({parts, C, Cp}, a.options());
    }
  }
  const bool pw1 = xw.defined();
  const bool gxt_on = pw1 && weight_grads;  // g^T x per tile
  const int64_t P = max_halo(r);
  std::vector<double> acc(parts * 2 * C, 0.0);
  auto gw_parts = pooled_empty(wt, {weight_grads ? parts : 0, wt.numel()}).zero_();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "dw_conv_bn_backward", [&] {
    using T = scalar_t;
    const T* ap = a.const_data_ptr<T>();
    const T* gp = gy.const_data_ptr<T>();
    const T* zp = z.defined() ? z.const_data_ptr<T>() : nullptr;
    const T* cp = z.defined() ? coef.const_data_ptr<T>() : nullptr;
    const T* scp = sc.const_data_ptr<T>();
    const T* shp = sh.const_data_ptr<T>();
    const T* mp = mu.const_data_ptr<T>();
    if (xw_whole && !ga.defined())  // the whole GEMMs after the pass read g
      ga = scratch<T>(0, {S.N, C, S.H, S.W}, {S.H * S.W * C, 1, S.W * C, C}, a.options());
    T* gap = ga.defined() ? ga.mutable_data_ptr<T>() : nullptr;  // else g stays in a row
    const auto gi = make_groups<T>(r, wi.const_data_ptr<T>(), nullptr);
    // the first 1x1's weight as [C, Cp], zero-padded
    std::vector<T> wpad;
    if (pw1) {
      wpad.assign(C * Cp, T(0));
      const T* src = xw.const_data_ptr<T>();
      for (int64_t c = 0; c < C; ++c) std::copy_n(src + c * Ci, Ci, wpad.data() + c * Cp);
    }
    const T* xp = pw1 ? x.const_data_ptr<T>() : nullptr;
    T* gxp = pw1 ? grad_x->mutable_data_ptr<T>() : nullptr;
    // a's rows made per tile: a_weight transposed for pw_rows, the rows' pixel stride ld
    const int64_t ld = a_tiled ? round_up(C, kLanes<T, 32>) : 0, Ca = a_tiled ? a.size(1) : 0;
    const auto awt = a_tiled ? transposed_padded<T>(aw, ld) : std::vector<T>();
    const int64_t xs[4] = {a.stride(0), a.stride(1), a.stride(2), a.stride(3)};
    // output rows per tile: a's rows (s per output row, plus the halo; twice where they are
    // made from x: raw, then through BN1 + ReLU), the gradient's rows when they are
    // transformed (one per output row, plus the halo)
    // BN1 + ReLU's rows carry P zero columns on each side, and so do the gradient's rows
    // where grad-input is a forward conv of them (stride 1): the kernels then take every
    // column through their interior paths (with blocks of 4 and 2 outputs, the op ran
    // 1.10-1.20x faster at 4x4 and 8x8 maps, 1.04x at 7x7, 1.07x at 32x32, 0.98-1.00x at 3x3)
    const int64_t Pg = S.s == 1 ? P : 0;
    const int64_t row_a = (S.W + 2 * P) * C + S.W * ld, row_d = zp ? (S.Wo + 2 * Pg) * C : 0;
    const int64_t tile = tile_rows<T>(S.s * row_a + row_d, 2 * P * (row_a + row_d));
    // The first 1x1's products run over chunks of g's rows of about kProductPixels pixels:
    // row by row, the 4- and 8-pixel rows of the small maps made them thin GEMMs (discrete
    // k3_e6 blocks at 8x8 and 4x4, batch 64, ran 1.05x and 1.08x slower; 32x32 unchanged).
    // x and grad_x are their operands in place where x's rows need no padding.
    const int64_t own = std::min(S.H, tile * S.s);  // input rows a tile owns, at most
    const int64_t chunk = std::min(own, (kProductPixels + S.W - 1) / S.W);
    const bool x_direct = Ci == Cp && ldx == Ci;
    const int64_t a_rows = std::min(S.H, (tile - 1) * S.s + 2 * P + 1);
    const int64_t d_rows = std::min(S.Ho, tile + 2 * P);
    const T* wp = wt.const_data_ptr<T>();
    T* gwp = gw_parts.mutable_data_ptr<T>();
    at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
      // kept across calls: no allocation; ba and bd point at column 0
      T* ba = thread_buffer<T>(1, a_rows * (S.W + 2 * P) * C) + P * C;
      T* bd = zp ? thread_buffer<T>(2, d_rows * row_d) + Pg * C : nullptr;
      T* braw = a_tiled ? thread_buffer<T>(4, a_rows * S.W * ld) : nullptr;
      T* gchunk = gap ? nullptr : thread_buffer<T>(3, (pw1 ? chunk : 1) * S.W * C);
      T* xchunk = gxt_on && !x_direct ? thread_buffer<T>(5, chunk * S.W * Cp) : nullptr;
      T* dxchunk = pw1 && !x_direct ? thread_buffer<T>(6, chunk * S.W * Cp) : nullptr;
      if (xchunk) std::fill(xchunk, xchunk + chunk * S.W * Cp, T(0));
      std::vector<T> part(2 * C);  // one row's sums in T (vectorized), then into double
      for (int64_t t = b; t < e; ++t) {
        const auto [r0, r1] = share(rows, parts, t);
        double* s1 = acc.data() + t * 2 * C;
        double* s2 = s1 + C;
        T* gxt = gxt_on ? gxw.mutable_data_ptr<T>() + t * C * Cp : nullptr;
        if (gxt_on) std::fill(gxt, gxt + C * Cp, T(0));
        const auto gs = make_groups<T>(r, wp, weight_grads ? gwp + t * wt.numel() : nullptr);
        // the first 1x1's products over g's input rows [lo, hi) of image n: grad_x = g W,
        // (g^T x) += ...
        auto products = [&](int64_t n, int64_t lo, int64_t hi) {
          const int64_t m = (hi - lo) * S.W, p0 = (n * S.H + lo) * S.W;  // pixels, the first
          const T* g0 = gap ? gap + p0 * C : gchunk;
          if (x_direct) {
            gemm_tile<T>(m, Cp, C, g0, C, 1, wpad.data(), Cp, gxp + p0 * Ci, Ci, false);
          } else {
            gemm_tile<T>(m, Cp, C, g0, C, 1, wpad.data(), Cp, dxchunk, Cp, false);
            for (int64_t i = 0; i < m; ++i) std::copy_n(dxchunk + i * Cp, Ci, gxp + (p0 + i) * Ci);
          }
          if (!gxt_on) return;
          const T* xt = xp + p0 * ldx;
          if (!x_direct) {
            for (int64_t i = 0; i < m; ++i) std::copy_n(xp + (p0 + i) * ldx, Ci, xchunk + i * Cp);
            xt = xchunk;
          }
          gemm_tile<T>(C, Cp, m, g0, 1, C, xt, x_direct ? ldx : Cp, gxt, Cp, true);
        };
        for_tiles(S, r0, r1, tile, [&](int64_t n, int64_t oh0, int64_t oh1) {
          const int64_t i0 = oh0 * S.s, i1 = std::min(S.H, oh1 * S.s);  // the rows it owns
          const auto [a_lo, a_hi] = input_rows(S, P, oh0, oh1);
          // the gradient rows grad-weight (oh0..oh1) and grad-input (of rows i0..i1) read
          const int64_t d_lo = std::min(oh0, i0 <= P ? 0 : (i0 - P + S.s - 1) / S.s);
          const int64_t d_hi = std::max(oh1, std::min(S.Ho, (i1 - 1 + P) / S.s + 1));
          Shape Sg = S;  // the gradient as the tile reads it
          Sg.g0 = zp ? n * S.Ho + d_lo : 0;
          Sg.gpad = zp ? Pg : 0;
          const T* gt = zp ? bd : gp;
          if (zp) bn_grad_rows<T>(S, gp, zp, cp, n, d_lo, d_hi, bd, Pg);
          // a's rows before BN1 (the epilogue reads them): a itself, or made from x
          const Shape Sa = a_tiled ? pw_rows<T>(S, ap, xs, Ca, awt.data(), ld, n, a_lo, a_hi, braw)
                                   : S;
          const T* araw = a_tiled ? braw : ap;
          Shape St = bn_relu_rows<T>(Sa, araw, scp, shp, n, a_lo, a_hi, ba, P);
          St.g0 = Sg.g0;
          St.gpad = Sg.gpad;
          if (weight_grads)
            for (const auto& g : gs)
              for (int64_t oh = oh0; oh < oh1; ++oh) bwd_weight_row<T>(St, g, gt, ba, n, oh);
          for (int64_t ih = i0, c0 = i0; ih < i1; ++ih) {  // c0: the chunk's first row
            const int64_t row = n * S.H + ih;
            // g's row: written whole, or in the chunk's rows (one row when nothing reads it
            // after the epilogue)
            const int64_t local = pw1 ? ih - c0 : 0;
            T* grow = gap ? gap + row * S.W * C : gchunk + local * S.W * C;
            Sg.o0 = gap ? 0 : row - local;
            for (const auto& g : gi) grad_input_row<T>(Sg, g, gt, gap ? gap : gchunk, n, ih);
            const T* zrow = araw + n * Sa.xn + (ih - Sa.h0) * Sa.xh;
            // the epilogue, over the cached row
            add_row_sums<T>(S.W, C, part.data(), s1, s2, [&](int64_t iw, int64_t c, auto Bc) {
              constexpr int B = decltype(Bc)::value;
              using V = vec_t<T, B>;
              T* o = grow + iw * C + c;
              const V z = vload<B>(zrow + iw * Sa.xw + c);
              const V pre = z * vload<B>(scp + c) + vload<B>(shp + c);
              const V gv = pre > V{} ? vload<B>(o) : V{};
              vstore(o, gv);
              return std::pair{gv, gv * (z - vload<B>(mp + c))};
            });
            if (pw1 && (ih + 1 == i1 || ih + 1 - c0 == chunk)) {
              products(n, c0, ih + 1);
              c0 = ih + 1;
            }
          }
        });
      }
    });
  });
  if (gxt_on) {  // the parts added up, without their padding columns
    auto sum = at::empty({C, Ci}, a.options());
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "gxw_sum", [&] {
      const scalar_t* src = gxw.const_data_ptr<scalar_t>();
      scalar_t* o = sum.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c)
        for (int64_t i = 0; i < Ci; ++i) {
          scalar_t v = 0;
          for (int64_t t = 0; t < parts; ++t) v += src[(t * C + c) * Cp + i];
          o[c * Ci + i] = v;
        }
    });
    gxw = sum;
  }
  if (xw_whole) {  // g as the [N*H*W, C] matrix of its channels-last data
    const auto g = ga.permute({0, 2, 3, 1}).reshape({-1, C});
    auto gx = *grad_x;
    at::mm_out(gx, g, *x_weight);
    if (weight_grads) gxw = at::mm(g.t(), x);
  }
  auto grads = weight_grads ? split_grad_weights(gw_parts, weights, r) : std::vector<at::Tensor>{};
  return {grads, sums_tensor(acc, parts, C), gxw};
}

}  // namespace

TORCH_LIBRARY_IMPL(fbnet_fast, CPU, m) {
  m.impl("dw_conv_bn_out", &dw_conv_bn_out_cpu);
  m.impl("dw_conv_bn_backward_out", &dw_conv_bn_backward_out_cpu);
}

}  // namespace fbnet_fast
