// Scratch memory reused across calls: a fresh multi-megabyte allocation comes from mmap and
// page-faults on first touch in every call, which on the small maps costs as much as the work.
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace fbnet_fast {
namespace {

// This thread's grow-only buffer number `slot` (one set per source file) of at least n
// elements. It is valid until the next call for the same slot on this thread, so it never
// leaves the op that asked for it.
template <typename T>
T* thread_buffer(int slot, int64_t n) {
  static thread_local std::vector<T> bufs[7];
  auto& b = bufs[slot];
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  return b.data();
}

// A tensor of `sizes` and `strides` over thread_buffer(slot).
template <typename T>
at::Tensor scratch(int slot, at::IntArrayRef sizes, at::IntArrayRef strides,
                   const at::TensorOptions& options) {
  int64_t extent = 1;
  for (size_t i = 0; i < sizes.size(); ++i) extent += (sizes[i] - 1) * strides[i];
  return at::from_blob(thread_buffer<T>(slot, extent), sizes, strides, options);
}

}  // namespace
}  // namespace fbnet_fast
