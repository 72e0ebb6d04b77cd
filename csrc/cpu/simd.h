// Vectors of a fixed byte width through GCC vector extensions, shared by the CPU kernels.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fbnet_fast {
namespace {

// One B-byte vector via GCC vector extensions: B = 64 (16 floats / 8 doubles) stays in a
// register (AVX-512 with -march=native, pairs or quads of narrower registers otherwise);
// B = 32 serves a channel tail of half that width, which the per-pixel loop would run at a
// fraction of the speed (a group of 88 channels, as the quick space's first layers have, has
// one).
template <typename T, int B> struct Vec { typedef T t __attribute__((vector_size(B))); };
template <typename T, int B = 64> using vec_t = typename Vec<T, B>::t;
template <typename T, int B = 64> constexpr int kLanes = B / sizeof(T);
template <int B = 64, typename T> inline vec_t<T, B> vload(const T* p) {
  vec_t<T, B> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
// Stores go through a vector type of T's alignment, not memcpy: a memcpy store may alias
// anything, so the compiler reloaded every value a kernel's lambda captured by reference
// after each one (the pointwise backward's epilogue spent most of its time on such reloads);
// a store of T vectors may only alias T.
template <typename T, int B> struct VecU {
  typedef T t __attribute__((vector_size(B), aligned(alignof(T))));
};
template <typename T, typename V> inline void vstore(T* p, V v) {
  *reinterpret_cast<typename VecU<T, sizeof(V)>::t*>(p) = v;
}

// A store that bypasses the caches where p is aligned to the vector (else vstore): for wide
// outputs written once and read by a later pass, it saves reading every line in before it is
// written (out of cache, the pointwise backward at the quick preset's 32x32 layers took about
// twice its in-cache time, most of it writing its [N*H*W, 22*C] gradient). Call
// stream_fence() after the last one, before other threads read.
template <typename T, typename V> inline void vstream(T* p, V v) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64) {
    if (a % 64 == 0) {
      if constexpr (std::is_same_v<T, float>) return _mm512_stream_ps(p, (__m512)v);
      else return _mm512_stream_pd(p, (__m512d)v);
    }
  }
#endif
#if defined(__AVX__)
  if constexpr (sizeof(V) == 32) {
    if (a % 32 == 0) {
      if constexpr (std::is_same_v<T, float>) return _mm256_stream_ps(p, (__m256)v);
      else return _mm256_stream_pd(p, (__m256d)v);
    }
  }
#endif
  (void)a;
  vstore(p, v);
}

inline void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

}  // namespace
}  // namespace fbnet_fast
