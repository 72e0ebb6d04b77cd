// Recycled memory for tensors that recur every step (csrc/cpu/pool.cpp).
#pragma once
#include <ATen/ATen.h>

namespace fbnet_fast {

// An uninitialised tensor of `size` with like's dtype and device, from the pool of freed
// blocks of its page-rounded size where one waits (else fresh); its block goes back to the
// pool when the tensor is freed.
at::Tensor pooled_empty(const at::Tensor& like, at::IntArrayRef size);

}  // namespace fbnet_fast
