// Small GEMMs on tiles that sit in cache: register-tiled outer products for the thin shapes
// of the fused MixedBlock (K and N of 8 to a few hundred), which a general GEMM library runs
// at a fraction of its rate and calls on whole matrices only.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#include "simd.h"

namespace fbnet_fast {
namespace {

inline int64_t round_up(int64_t n, int64_t q) { return (n + q - 1) / q * q; }

// Above this many bytes of weights a product is weight-bound (the 7x7 and 3x3 maps at
// 224x224): every tile of rows would stream all the weights again, so the callers hand such
// products whole to ATen's GEMM, which blocks for that shape; below it (the wide maps, where
// the passes over memory decide) the tiles run the micro-kernels here.
constexpr int64_t kTiledWeightBytes = 512 << 10;

inline bool weight_bound(const at::Tensor& w) {
  return w.numel() * static_cast<int64_t>(w.element_size()) > kTiledWeightBytes;
}

// C[i][j] = (add ? C[i][j] : 0) + sum_k A[i * sai + k * sak] * Bm[k * ldb + j] for RB rows and
// NV B-byte vectors of columns, the accumulators in registers. With BN, each result is stored
// as relu(c * sc[j] + sh[j]): a BN + ReLU epilogue instead of a second pass over C.
template <typename T, int RB, int NV, int B, bool BN = false>
inline void micro(int64_t K, const T* A, int64_t sai, int64_t sak, const T* Bm, int64_t ldb,
                  T* C, int64_t ldc, bool add, const T* sc = nullptr, const T* sh = nullptr) {
  using V = vec_t<T, B>;
  constexpr int L = kLanes<T, B>;
  V acc[RB][NV];
#pragma GCC unroll 8
  for (int i = 0; i < RB; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      if (add) acc[i][v] = vload<B>(C + i * ldc + v * L);
      else acc[i][v] = V{};
    }
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) b[v] = vload<B>(Bm + k * ldb + v * L);
#pragma GCC unroll 8
    for (int i = 0; i < RB; ++i) {
      const T a = A[i * sai + k * sak];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[i][v] += a * b[v];
    }
  }
  if constexpr (BN) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      const V s = vload<B>(sc + v * L), h = vload<B>(sh + v * L);
#pragma GCC unroll 8
      for (int i = 0; i < RB; ++i) {
        const V z = acc[i][v] * s + h;
        acc[i][v] = z > V{} ? z : V{};
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < RB; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) vstore(C + i * ldc + v * L, acc[i][v]);
}

// Rows in blocks of RB, the rest in blocks of RB/2, RB/4, ...
template <typename T, int RB, int NV, int B, bool BN>
inline void micro_rows(int64_t R, int64_t K, const T* A, int64_t sai, int64_t sak, const T* Bm,
                       int64_t ldb, T* C, int64_t ldc, bool add, const T* sc, const T* sh) {
  int64_t i = 0;
  for (; i + RB <= R; i += RB)
    micro<T, RB, NV, B, BN>(K, A + i * sai, sai, sak, Bm, ldb, C + i * ldc, ldc, add, sc, sh);
  if constexpr (RB > 1)
    if (i < R)
      micro_rows<T, RB / 2, NV, B, BN>(R - i, K, A + i * sai, sai, sak, Bm, ldb, C + i * ldc, ldc,
                                       add, sc, sh);
}

template <typename T, bool BN>
void gemm_tile_cols(int64_t R, int64_t N, int64_t K, const T* A, int64_t sai, int64_t sak,
                    const T* Bm, int64_t ldb, T* C, int64_t ldc, bool add, const T* sc,
                    const T* sh) {
  constexpr int64_t L = kLanes<T, 64>, H = kLanes<T, 32>;
  auto at = [](const T* v, int64_t j) { return v ? v + j : nullptr; };
  int64_t j = 0;
  for (; j + 2 * L <= N; j += 2 * L)
    micro_rows<T, 8, 2, 64, BN>(R, K, A, sai, sak, Bm + j, ldb, C + j, ldc, add, at(sc, j),
                                at(sh, j));
  for (; j + L <= N; j += L)
    micro_rows<T, 8, 1, 64, BN>(R, K, A, sai, sak, Bm + j, ldb, C + j, ldc, add, at(sc, j),
                                at(sh, j));
  for (; j + H <= N; j += H)
    micro_rows<T, 8, 1, 32, BN>(R, K, A, sai, sak, Bm + j, ldb, C + j, ldc, add, at(sc, j),
                                at(sh, j));
}

// C[R, N] (=, or += with add) A(R, K) B[K, N] with A(i, k) = A[i * sai + k * sak]; N must be
// a multiple of kLanes<T, 32> (the callers pad their column counts to it). With sc and sh
// (N values each, zero-padded like B's columns), C = relu(C * sc + sh) column-wise.
template <typename T>
void gemm_tile(int64_t R, int64_t N, int64_t K, const T* A, int64_t sai, int64_t sak,
               const T* Bm, int64_t ldb, T* C, int64_t ldc, bool add, const T* sc = nullptr,
               const T* sh = nullptr) {
  if (sc)
    gemm_tile_cols<T, true>(R, N, K, A, sai, sak, Bm, ldb, C, ldc, add, sc, sh);
  else
    gemm_tile_cols<T, false>(R, N, K, A, sai, sak, Bm, ldb, C, ldc, add, nullptr, nullptr);
}

}  // namespace
}  // namespace fbnet_fast
