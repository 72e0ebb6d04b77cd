// The candidates' second 1x1 convs of the fused MixedBlock, with the batch norms around them
// folded in, run over tiles of rows that stay in cache:
//   forward: z = h W^T per segment (a candidate, or one group of a grouped candidate), with
//     h = relu(d * scale + shift) (BN2 + ReLU) made for a tile of rows in a per-thread
//     buffer and never written; returns BN3's batch statistics of z (the epilogue);
//   backward: from dz, the weights' gradient and g = dL/d(d * scale + shift) (zero where the
//     ReLU was off), with the two sums BN2's backward needs; h is remade per tile.
// One call covers every candidate: the per-candidate GEMMs were thin (K and N of 8-352), which
// a general GEMM library runs at a fraction of its rate, and each cost a Python round trip.
// Here they are register-tiled outer products over the tile, the tile's h and the weights in
// cache. A segment's weights are read in pw2_weight's own order (no dense copy). Where the
// weights are too large to stream once per tile, each segment is one library GEMM instead,
// with its columns of h made per segment by the thread that runs it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "channel_sums.h"
#include "gemm_tile.h"
#include "parallel_runs.h"
#include "pool.h"
#include "scratch.h"

namespace fbnet_fast {
namespace {

// Bytes of h per tile: the tile's rows of h, and the weights the GEMMs stream, stay in L2.
constexpr int64_t kTileBytes = 256 << 10;

// Above this many bytes the backward's g goes to memory past the caches (vstream): the
// next pass finds little of it in cache anyway, and each line is not read in first. At the
// quick preset's 32x32 layers (23 MB) the step ran 1.02-1.03x faster.
constexpr int64_t kStreamBytes = 8 << 20;

// Rows whose sums the ATen GEMM path adds up in the input precision before double.
constexpr int64_t kSumRows = 256;

// Rows per tile for rows of `width` elements: a multiple of 8 (the micro-kernels' row block).
template <typename T>
int64_t tile_rows(int64_t width) {
  const int64_t rows = kTileBytes / static_cast<int64_t>(sizeof(T)) / std::max<int64_t>(1, width);
  return std::clamp<int64_t>(rows / 8 * 8, 8, 256);
}

// Output columns [out0, +out_len) of z = input columns [in0, +in_len) of h times the
// row-major [out_len, in_len] block of the weight at w0; pad_* round the lengths up for
// gemm_tile.
struct Seg {
  int64_t out0, out_len, in0, in_len, w0, pad_out, pad_in;
};

std::vector<Seg> parse_segments(at::IntArrayRef s, int64_t T, int64_t Zc, int64_t wn,
                                int64_t q, const char* op) {
  TORCH_CHECK(!s.empty() && s.size() % 5 == 0, op, ": segments must be a flat list of "
              "(out_start, out_len, in_start, in_len, w_offset) tuples, got ", s.size(), " values");
  std::vector<Seg> out;
  for (size_t i = 0; i < s.size(); i += 5) {
    Seg g{s[i], s[i + 1], s[i + 2], s[i + 3], s[i + 4], 0, 0};
    TORCH_CHECK(g.out_len > 0 && g.in_len > 0 && g.out0 >= 0 && g.in0 >= 0 && g.w0 >= 0 &&
                    g.out0 + g.out_len <= Zc && g.in0 + g.in_len <= T &&
                    g.w0 + g.out_len * g.in_len <= wn,
                op, ": segment ", i / 5, " (", g.out0, ", ", g.out_len, ", ", g.in0, ", ",
                g.in_len, ", ", g.w0, ") is outside z's ", Zc, " columns, d's ", T,
                " columns or the weight's ", wn, " elements");
    g.pad_out = round_up(g.out_len, q);
    g.pad_in = round_up(g.in_len, q);
    out.push_back(g);
  }
  // The tiles are written whole, padding included, in order: each segment's padding is
  // overwritten by the next one, so the segments must tile z's and d's columns exactly.
  auto tiles = [&](int64_t Seg::*start, int64_t Seg::*len, int64_t total) {
    std::vector<Seg> v = out;
    std::sort(v.begin(), v.end(), [&](const Seg& x, const Seg& y) { return x.*start < y.*start; });
    int64_t at = 0;
    for (const auto& g : v) {
      if (g.*start != at) return false;
      at += g.*len;
    }
    return at == total;
  };
  TORCH_CHECK(tiles(&Seg::out0, &Seg::out_len, Zc) && tiles(&Seg::in0, &Seg::in_len, T),
              op, ": the segments must cover z's ", Zc, " columns and d's ", T,
              " columns, each column once");
  return out;
}

// parse_segments' segments in increasing order of one field.
std::vector<Seg> sorted_segments(at::IntArrayRef s, int64_t T, int64_t Zc, int64_t wn, int64_t q,
                                 const char* op, int64_t Seg::*key) {
  auto segs = parse_segments(s, T, Zc, wn, q, op);
  std::sort(segs.begin(), segs.end(), [&](const Seg& a, const Seg& b) { return a.*key < b.*key; });
  return segs;
}

void check_weight(const at::Tensor& w, const at::Tensor& like, const char* op) {
  TORCH_CHECK(w.dim() == 1 && w.scalar_type() == like.scalar_type(), op,
              ": weight must be a flat Tensor of dtype ", like.scalar_type(), ", got shape ",
              w.sizes(), " dtype ", w.scalar_type());
}

// h rows [t0, t0 + R) of relu(d * scale + shift) into buf (row stride ldh >= T, columns
// [T, ldh) zeroed: gemm_tile may read them as padding).
template <typename T>
void bn_relu_tile(const T* d, int64_t ldd, int64_t T_, const T* sc, const T* sh, int64_t t0,
                  int64_t R, T* buf, int64_t ldh) {
  for (int64_t i = 0; i < R; ++i) {
    const T* row = d + (t0 + i) * ldd;
    T* h = buf + i * ldh;
_Pragma("omp simd")
    for (int64_t c = 0; c < T_; ++c) h[c] = std::max(row[c] * sc[c] + sh[c], T(0));
    std::fill(h + T_, h + ldh, T(0));
  }
}

// Every segment's [out_len, in_len] weight block in a zero-padded buffer of its own block:
// transposed to [in_len, pad_out] (the forward's right-hand side) or kept as [out_len,
// pad_in] (the backward's, and the layout of the weight gradient's per-thread parts).
template <typename T>
struct Blocks {
  std::vector<T> data;
  std::vector<int64_t> off;  // where segment s's block starts
  int64_t total = 0;
};

template <typename T>
Blocks<T> weight_blocks(const T* w, const std::vector<Seg>& segs, bool transposed) {
  Blocks<T> b;
  for (const auto& g : segs) {
    b.off.push_back(b.total);
    b.total += transposed ? g.in_len * g.pad_out : g.out_len * g.pad_in;
  }
  b.data.assign(b.total, T(0));
  // in parallel: at the widest tiled layers this is a few hundred thousand elements
  at::parallel_for(0, static_cast<int64_t>(segs.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t s = lo; s < hi; ++s) {
      const Seg& g = segs[s];
      T* dst = b.data.data() + b.off[s];
      for (int64_t o = 0; o < g.out_len; ++o)
        for (int64_t j = 0; j < g.in_len; ++j)
          dst[transposed ? j * g.pad_out + o : o * g.pad_in + j] = w[g.w0 + o * g.in_len + j];
    }
  });
  return b;
}

// Segment g's columns of h = relu(d * scale + shift), all M rows, as a [M, in_len] matrix in
// this thread's scratch: made by the thread that runs the segment's GEMMs, just before them.
template <typename T>
at::Tensor segment_h(const T* d, int64_t ldd, int64_t M, const Seg& g, const T* sc,
                     const T* sh, const at::TensorOptions& opt) {
  at::Tensor h = scratch<T>(0, {M, g.in_len}, {g.in_len, 1}, opt);
  bn_relu_tile<T>(d + g.in0, ldd, g.in_len, sc + g.in0, sh + g.in0, 0, M,
                  h.mutable_data_ptr<T>(), g.in_len);
  return h;
}

// Rows [0, R) of z from a tile zt (row stride ldt; zt may be z itself), and their sums and
// sums of squares added to s1, s2 (in T over the tile, then into double); without s1 the
// copy alone.
template <typename T>
void z_epilogue(const T* zt, int64_t ldt, int64_t R, int64_t Zc, T* z, int64_t ldz, T* part,
                double* s1, double* s2) {
  const bool copy = z != zt;
  if (!s1) {
    if (copy)
      col_map<T>(R, Zc, [&](int64_t i, int64_t c, auto Bc) {
        vstore(z + i * ldz + c, vload<decltype(Bc)::value>(zt + i * ldt + c));
      });
    return;
  }
  add_row_sums<T>(R, Zc, part, s1, s2, [&](int64_t i, int64_t c, auto Bc) {
    const auto v = vload<decltype(Bc)::value>(zt + i * ldt + c);
    if (copy) vstore(z + i * ldz + c, v);
    return std::pair{v, v * v};
  });
}

// Rows [0, R) of g = dh where h > 0, else 0, into out (which may be dh; with Stream, past
// the caches), and the sums of g and g * (d - mean) added to s1, s2.
template <typename T, bool Stream = false>
void g_epilogue(const T* h, int64_t ldh, const T* dh, int64_t lddh, const T* d, int64_t ldd,
                const T* mean, int64_t R, int64_t C, T* out, int64_t ldo, T* part, double* s1,
                double* s2) {
  add_row_sums<T>(R, C, part, s1, s2, [&](int64_t i, int64_t c, auto Bc) {
    constexpr int B = decltype(Bc)::value;
    using V = vec_t<T, B>;
    const V gv = vload<B>(h + i * ldh + c) > V{} ? vload<B>(dh + i * lddh + c) : V{};
    if constexpr (Stream) vstream(out + i * ldo + c, gv);
    else vstore(out + i * ldo + c, gv);
    return std::pair{gv, gv * (vload<B>(d + i * ldd + c) - vload<B>(mean + c))};
  });
}

// The [out_len, in_len] weight block of a segment.
at::Tensor block(const at::Tensor& w, const Seg& g) {
  return w.narrow(0, g.w0, g.out_len * g.in_len).view({g.out_len, g.in_len});
}

// Calls f(s) for every segment s, above kTiledWeightBytes of weight (where each segment is
// one library GEMM): the segments in two runs of about equal multiply-adds, one per thread,
// so that each GEMM runs on one core. At the widest layers' few rows a GEMM split over both
// cores runs at 65-90 % of twice the one-core rate (MixedBlock 1.01-1.05x faster at the
// 64- to 184-channel layers' 7x7 and 3x3 maps, batch 8).
template <typename F>
void for_segments_split(const std::vector<Seg>& segs, F&& f) {
  int64_t total = 0;
  for (const auto& g : segs) total += g.out_len * g.in_len;
  // runs [bounds[0], bounds[1]) and [bounds[1], bounds[2]): the first ends before the
  // segment whose middle passes half the total
  size_t bounds[3] = {0, 0, segs.size()};
  for (int64_t sum = 0; bounds[1] < segs.size(); ++bounds[1]) {
    const int64_t m = segs[bounds[1]].out_len * segs[bounds[1]].in_len;
    if (2 * sum + m > total) break;
    sum += m;
  }
  parallel_runs(2, [&](int64_t run) {
    for (size_t s = bounds[run]; s < bounds[run + 1]; ++s) f(s);
  });
}

// z = relu(d * scale + shift) W^T per segment; returns Tensor[2, z columns] in d's dtype:
// each column's mean and biased variance (BN3's batch statistics); without `stats` (eval and
// the backward's recomputation) an empty tensor, the sums skipped.
at::Tensor pointwise_bn_out_cpu(const at::Tensor& d_in, const at::Tensor& scale,
                                const at::Tensor& shift, const at::Tensor& weight_in,
                                at::IntArrayRef segments, const at::Tensor& z, bool stats) {
  const char* op = "pointwise_bn_out";
  auto d = rows_of(d_in, op, "d");
  const int64_t M = d.size(0), C = d.size(1), ldd = d.stride(0);
  TORCH_CHECK(M > 0, op, ": d needs at least one row");
  check_vec(scale, C, d, op, "scale");
  check_vec(shift, C, d, op, "shift");
  check_weight(weight_in, d, op);
  TORCH_CHECK(z.dim() == 2, op, ": z must be a [M, C_z] matrix, got shape ", z.sizes());
  const int64_t Zc = z.size(1), ldz = z.stride(0);
  check_rows_out(z, M, Zc, d, op, "z");
  auto w = weight_in.contiguous(), sc = scale.contiguous(), sh = shift.contiguous();
  const int64_t parts = num_parts(M);
  std::vector<double> acc(stats ? parts * 2 * Zc : 0, 0.0);
  // part t's sums and sums of squares (null without stats: z_epilogue then only copies)
  auto s1 = [&](int64_t t) { return stats ? acc.data() + t * 2 * Zc : nullptr; };
  auto s2 = [&](int64_t t) { return stats ? acc.data() + t * 2 * Zc + Zc : nullptr; };
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "pointwise_bn", [&] {
    using T = scalar_t;
    constexpr int64_t q = kLanes<T, 32>;
    // in order of their z columns: each tile's padding is overwritten by the next segment
    const auto segs = sorted_segments(segments, C, Zc, w.numel(), q, op, &Seg::out0);
    const T* dp = d.const_data_ptr<T>();
    const T* scp = sc.const_data_ptr<T>();
    const T* shp = sh.const_data_ptr<T>();
    T* zp = z.mutable_data_ptr<T>();
    // Above kTiledWeightBytes, one library GEMM per segment; the thread that runs a segment
    // makes its columns of h just before (and in the backward takes the mask and BN2's sums
    // right after), so h is never written whole: MixedBlock 1.02-1.04x faster at 112->112,
    // 1.01-1.08x at 64->112 (7x7, batch 8; two runs) than with one pass for all of h first.
    if (weight_bound(w)) {
      for_segments_split(segs, [&](size_t s) {
        const Seg& g = segs[s];
        auto zs = z.narrow(1, g.out0, g.out_len);
        at::mm_out(zs, segment_h<T>(dp, ldd, M, g, scp, shp, d.options()), block(w, g).t());
      });
      if (!stats) return;
      at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
        std::vector<T> part(2 * Zc);
        for (int64_t t = b; t < e; ++t) {
          const auto [r0, r1] = share(M, parts, t);
          z_epilogue<T>(zp + r0 * ldz, ldz, r1 - r0, Zc, zp + r0 * ldz, ldz, part.data(),
                        s1(t), s2(t));
        }
      });
      return;
    }
    const auto wt = weight_blocks<T>(w.const_data_ptr<T>(), segs, true);
    const int64_t tile = tile_rows<T>(C), ldt = Zc + q;
    at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
      T* h = thread_buffer<T>(1, tile * C);  // kept across calls: no allocation per call
      T* zt = thread_buffer<T>(2, tile * ldt);
      std::vector<T> part(2 * Zc);
      for (int64_t t = b; t < e; ++t) {
        const auto [r0, r1] = share(M, parts, t);
        for (int64_t t0 = r0; t0 < r1; t0 += tile) {
          const int64_t R = std::min(tile, r1 - t0);
          bn_relu_tile<T>(dp, ldd, C, scp, shp, t0, R, h, C);
          // every segment into its columns of the tile, its padding overwritten by the next
          for (size_t s = 0; s < segs.size(); ++s) {
            const Seg& g = segs[s];
            gemm_tile<T>(R, g.pad_out, g.in_len, h + g.in0, C, 1, wt.data.data() + wt.off[s],
                         g.pad_out, zt + g.out0, ldt, false);
          }
          z_epilogue<T>(zt, ldt, R, Zc, zp + t0 * ldz, ldz, part.data(), s1(t),
                        s2(t));
        }
      }
    });
  });
  if (!stats) return at::empty({0}, d.options());
  return stats_tensor(acc, parts, Zc, M, d.scalar_type());
}

// Backward of pointwise_bn_out given dz: writes g = dL/d(d * scale + shift) into grad_d and
// returns the weight's gradient and Tensor[2, C] float64, the per-channel sums of g and of
// g * (d - mean) (BN2's backward sums).
std::tuple<at::Tensor, at::Tensor> pointwise_bn_backward_out_cpu(
    const at::Tensor& dz_in, const at::Tensor& d_in, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& weight_in,
    at::IntArrayRef segments, const at::Tensor& gd, bool weight_grad) {
  const char* op = "pointwise_bn_backward_out";
  auto d = rows_of(d_in, op, "d");
  auto dz = rows_of(dz_in, op, "dz");
  const int64_t M = d.size(0), C = d.size(1), ldd = d.stride(0);
  const int64_t Zc = dz.size(1), ldz = dz.stride(0);
  TORCH_CHECK(M > 0 && dz.size(0) == M, op, ": dz has ", dz.size(0), " rows and d ", M,
              "; they must match and be at least one");
  TORCH_CHECK(dz.scalar_type() == d.scalar_type(), op, ": dz has dtype ", dz.scalar_type(),
              ", expected ", d.scalar_type());
  check_vec(scale, C, d, op, "scale");
  check_vec(shift, C, d, op, "shift");
  check_vec(mean, C, d, op, "mean");
  check_weight(weight_in, d, op);
  check_rows_out(gd, M, C, d, op, "grad_d");
  const int64_t ldg = gd.stride(0);
  auto w = weight_in.contiguous(), sc = scale.contiguous(), sh = shift.contiguous();
  auto mu = mean.contiguous();
  auto gw = weight_grad ? pooled_empty(w, w.sizes()) : at::empty({0}, w.options());
  const int64_t parts = num_parts(M);
  std::vector<double> acc(parts * 2 * C, 0.0);
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "pointwise_bn", [&] {
    using T = scalar_t;
    constexpr int64_t q = kLanes<T, 32>;
    // in order of their d columns: each tile's padding is overwritten by the next segment
    const auto segs = sorted_segments(segments, C, Zc, w.numel(), q, op, &Seg::in0);
    const T* dp = d.const_data_ptr<T>();
    const T* dzp = dz.const_data_ptr<T>();
    const T* scp = sc.const_data_ptr<T>();
    const T* shp = sh.const_data_ptr<T>();
    const T* mp = mu.const_data_ptr<T>();
    T* gp = gd.mutable_data_ptr<T>();
    if (weight_bound(w)) {
      for_segments_split(segs, [&](size_t s) {
        const Seg& g = segs[s];
        const auto h = segment_h<T>(dp, ldd, M, g, scp, shp, d.options());
        const auto dzs = dz.narrow(1, g.out0, g.out_len);
        auto dh = gd.narrow(1, g.in0, g.in_len);
        at::mm_out(dh, dzs, block(w, g));
        if (weight_grad) {
          auto gws = block(gw, g);
          at::mm_out(gws, dzs.t(), h);
        }
        // the mask and BN2's sums over the segment's columns (its own: part 0's accumulators
        // for them are this thread's alone), kSumRows rows at a time
        std::vector<T> part(2 * g.in_len);
        const T* hp = h.const_data_ptr<T>();
        for (int64_t r0 = 0; r0 < M; r0 += kSumRows) {
          T* gr = gp + r0 * ldg + g.in0;
          g_epilogue<T>(hp + r0 * g.in_len, g.in_len, gr, ldg, dp + r0 * ldd + g.in0, ldd,
                        mp + g.in0, std::min(kSumRows, M - r0), g.in_len, gr, ldg, part.data(),
                        acc.data() + g.in0, acc.data() + C + g.in0);
        }
      });
      return;
    }
    // the weights as padded [out_len, pad_in] blocks; the gradient's parts the same way
    const auto wb = weight_blocks<T>(w.const_data_ptr<T>(), segs, false);
    const auto& off = wb.off;
    const int64_t total = wb.total;
    // each part zeroes its own
    std::unique_ptr<T[]> gw_parts(new T[weight_grad ? parts * total : 0]);
    const int64_t ldh = C + q;  // the padding columns: gemm_tile reads up to pad_in of them
    // g past the caches where it is too large to stay there for the depthwise backward
    const bool stream = M * C * static_cast<int64_t>(sizeof(T)) > kStreamBytes;
    const int64_t tile = tile_rows<T>(ldh);
    at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
      T* h = thread_buffer<T>(1, tile * ldh);  // kept across calls: no allocation per call
      T* dh = thread_buffer<T>(2, tile * ldh);
      std::vector<T> part(2 * C);
      for (int64_t t = b; t < e; ++t) {
        const auto [r0, r1] = share(M, parts, t);
        T* gwt = weight_grad ? gw_parts.get() + t * total : nullptr;
        if (weight_grad) std::fill(gwt, gwt + total, T(0));
        for (int64_t t0 = r0; t0 < r1; t0 += tile) {
          const int64_t R = std::min(tile, r1 - t0);
          bn_relu_tile<T>(dp, ldd, C, scp, shp, t0, R, h, ldh);
          for (size_t s = 0; s < segs.size(); ++s) {
            const Seg& g = segs[s];
            const T* dzs = dzp + t0 * ldz + g.out0;
            // dh = dz W into the segment's columns (its padding overwritten by the next);
            // dW += dz^T h
            gemm_tile<T>(R, g.pad_in, g.out_len, dzs, ldz, 1, wb.data.data() + off[s], g.pad_in,
                         dh + g.in0, ldh, false);
            if (weight_grad)
              gemm_tile<T>(g.out_len, g.pad_in, R, dzs, 1, ldz, h + g.in0, ldh,
                           gwt + off[s], g.pad_in, true);
          }
          auto epilogue = [&](auto past_caches) {
            g_epilogue<T, decltype(past_caches)::value>(
                h, ldh, dh, ldh, dp + t0 * ldd, ldd, mp, R, C, gp + t0 * ldg, ldg, part.data(),
                acc.data() + t * 2 * C, acc.data() + t * 2 * C + C);
          };
          if (stream) epilogue(std::true_type{});
          else epilogue(std::false_type{});
        }
      }
      stream_fence();
    });
    if (!weight_grad) return;
    // the parts' gradients added up, in parallel over the segments
    T* gwp = gw.mutable_data_ptr<T>();
    at::parallel_for(0, static_cast<int64_t>(segs.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t s = b; s < e; ++s) {
        const Seg& g = segs[s];
        for (int64_t o = 0; o < g.out_len; ++o)
          for (int64_t j = 0; j < g.in_len; ++j) {
            T v = 0;
            for (int64_t t = 0; t < parts; ++t)
              v += gw_parts[t * total + off[s] + o * g.pad_in + j];
            gwp[g.w0 + o * g.in_len + j] = v;
          }
      }
    });
  });
  return {gw, sums_tensor(acc, parts, C)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fbnet_fast, CPU, m) {
  m.impl("pointwise_bn_out", &pointwise_bn_out_cpu);
  m.impl("pointwise_bn_backward_out", &pointwise_bn_backward_out_cpu);
}

}  // namespace fbnet_fast
