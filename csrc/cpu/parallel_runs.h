// Runs of library calls (GEMMs) spread over the intra-op threads, one run per thread.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>

#include <optional>

namespace fbnet_fast {
namespace {

// f(i) for i in [0, n), spread over the threads. A library call inside runs on its caller's
// core alone (the way to keep a GEMM off the other core). A worker thread has its own
// thread-local state: it gets the caller's inference mode, and no autograd (the caller, inside
// an op, records none). Not the caller's whole state (at::ThreadLocalState): that holds Python
// objects (saved-tensor hooks), whose copy takes the GIL, which the caller holds while it
// waits here: a deadlock.
template <typename F>
void parallel_runs(int64_t n, F&& f) {
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    std::optional<c10::InferenceMode> mode;
    if (inference) mode.emplace();
    c10::AutoGradMode no_grad(false);
    for (int64_t i = b; i < e; ++i) f(i);
  });
}

}  // namespace
}  // namespace fbnet_fast
