// Every fbnet_fast op schema, declared once. Device files register implementations only.
#include <torch/library.h>

TORCH_LIBRARY(fbnet_fast, m) {
  // Depthwise KxK conv (pad K//2, odd K) over channels-last data. `weights` split the
  // channels into consecutive groups, each Tensor[C_g, K_g, K_g] (or [C_g, 1, K_g, K_g])
  // with its own odd K_g, so one pass covers a concatenation of 3x3 and 5x5 channels.
  m.def("dw_conv(Tensor x, Tensor[] weights, int stride) -> Tensor");
  // Returns (grad_x, grad_weights) for dw_conv.
  m.def("dw_conv_backward(Tensor grad, Tensor x, Tensor[] weights, int stride)"
        " -> (Tensor, Tensor[])");
  // The same into a preallocated channels_last `out` / `grad_x` (a reused workspace, so the
  // big outputs do not page-fault fresh memory on every call); the backward returns grad_weights.
  m.def("dw_conv_out(Tensor x, Tensor[] weights, int stride, Tensor(a!) out) -> ()");
  m.def("dw_conv_backward_out(Tensor grad, Tensor x, Tensor[] weights, int stride,"
        " Tensor(a!) grad_x) -> Tensor[]");
  // Batch-norm passes over a [M, C] matrix (rows = pixels of channels-last data).
  // Per-channel (mean, biased variance).
  m.def("channel_stats(Tensor x) -> (Tensor, Tensor)");
  // x * scale + shift per channel, then ReLU if `relu`; a new contiguous [M, C] matrix.
  m.def("scale_shift(Tensor x, Tensor scale, Tensor shift, bool relu) -> Tensor");
  // Backward of [ReLU](BN(z)) given dL/dy: (dz, dweight, dbias); `training`: the statistics
  // were the batch's own (they depend on z), else fixed.
  m.def("bn_backward(Tensor grad, Tensor z, Tensor mean, Tensor rstd, Tensor weight,"
        " Tensor bias, bool relu, bool training) -> (Tensor, Tensor, Tensor)");
  // Out variants of the two: `out` may be x, `grad_z` may be grad (in place); any row stride.
  m.def("scale_shift_out(Tensor x, Tensor scale, Tensor shift, bool relu, Tensor(a!) out) -> ()");
  m.def("bn_backward_out(Tensor grad, Tensor z, Tensor mean, Tensor rstd, Tensor weight,"
        " Tensor bias, bool relu, bool training, Tensor(a!) grad_z) -> (Tensor, Tensor)");
}
