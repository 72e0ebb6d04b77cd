// Memory for tensors that outlive an op but recur every step: the intermediates a small
// MixedBlock saves for its backward. Fresh, a multi-megabyte allocation page-faults on first
// touch in every step, which cost as much as keeping the intermediates saved (recomputing
// them in the backward). A freed block waits in a pool keyed by its size for the next request
// of that size; the pool holds at most kPoolBytes, beyond which blocks go back to the system.
// The tensor's own deleter returns its block, so a block is reused only once nothing refers
// to it (autograd has let the saved tensor go). The weight gradients the fused ops return
// come from it too: fresh, the 1-3 MB gradients of the 112- and 184-channel layers faulted
// in every step (page faults were 6-15 % of those layers' steps on the project's VMs).
#include "pool.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace fbnet_fast {
namespace {

constexpr size_t kPoolBytes = size_t(1) << 30;
constexpr size_t kPage = 4096;

struct Pool {
  std::mutex mu;
  std::unordered_map<size_t, std::vector<void*>> free;
  size_t held = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: deleters may still run at exit
  return *p;
}

void give_back(void* ptr, size_t bytes) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mu);
    if (p.held + bytes <= kPoolBytes) {
      p.free[bytes].push_back(ptr);
      p.held += bytes;
      return;
    }
  }
  std::free(ptr);
}

int64_t release_pool(const at::Tensor&) {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  const int64_t freed = static_cast<int64_t>(p.held);
  for (auto& kv : p.free)
    for (void* ptr : kv.second) std::free(ptr);
  p.free.clear();
  p.held = 0;
  return freed;
}

}  // namespace

at::Tensor pooled_empty(const at::Tensor& like, at::IntArrayRef size) {
  int64_t n = 1;
  for (int64_t s : size) {
    TORCH_CHECK(s >= 0, "pooled_empty: negative size ", size);
    n *= s;
  }
  const size_t bytes = (std::max<size_t>(n * like.element_size(), 1) + kPage - 1) / kPage * kPage;
  void* ptr = nullptr;
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mu);
    auto it = p.free.find(bytes);
    if (it != p.free.end() && !it->second.empty()) {
      ptr = it->second.back();
      it->second.pop_back();
      p.held -= bytes;
    }
  }
  if (ptr == nullptr) ptr = std::aligned_alloc(kPage, bytes);
  TORCH_CHECK(ptr != nullptr, "pooled_empty: out of memory allocating ", bytes, " bytes");
  return at::from_blob(
      ptr, size, [bytes](void* q) { give_back(q, bytes); },
      like.options());
}

TORCH_LIBRARY_IMPL(fbnet_fast, CPU, m) {
  m.impl("pooled_empty", &pooled_empty);
  m.impl("release_pool", &release_pool);
}

}  // namespace fbnet_fast
