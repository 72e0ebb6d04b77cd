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
  // Per-channel mean and the centred cross products sum_r (x_r - mean)(x_r - mean)^T,
  // Tensor[C, C]: the input side of a 1x1 conv's statistics.
  m.def("channel_cov(Tensor x) -> (Tensor, Tensor)");
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
  // A BN's backward once its sums are known: out = coef[0] * grad + coef[1] * z + coef[2]
  // per channel (coef: Tensor[3, C], bn_grad_coef's alpha, beta, delta); out may be grad.
  m.def("bn_grad_apply_out(Tensor grad, Tensor z, Tensor coef, Tensor(a!) out) -> ()");
  // The depthwise conv with the batch norms around it folded in (csrc/cpu/depthwise_bn.cpp):
  // out = dw_conv(relu(a * scale + shift)), returning Tensor[2, C] in a's dtype, the
  // per-channel mean and biased variance of out; the backward writes g = dL/d(a * scale +
  // shift) (the conv's grad-input, zero where the ReLU was off) into grad_a and returns the
  // weights' grads and Tensor[2, C] float64, the per-channel sums of g and of g * (a - mean).
  // With a_weight (Tensor[C, C_in]), a is the first 1x1's input (Tensor[N, C_in, H, W]) and
  // the depthwise input is relu((a a_weight^T) * scale + shift), made one tile at a time.
  // stats=False (where the statistics are known: eval, the backward's recomputation) skips
  // them: an empty tensor comes back.
  m.def("dw_conv_bn_out(Tensor a, Tensor[] weights, int stride, Tensor scale, Tensor shift,"
        " Tensor(a!) out, Tensor? a_weight=None, bool stats=True) -> Tensor");
  // With x (Tensor[N*H*W, C_in], the rows the first 1x1 read to make a) and x_weight
  // (Tensor[C, C_in]) the backward also writes grad_x = g x_weight and returns g^T x
  // (Tensor[C, C_in]; empty without x), while each row of g is in cache (above 512 KB of
  // x_weight, as two whole GEMMs after the pass); then grad_a may be None: g is not kept.
  // With out (the conv's output) and out_coef (Tensor[3, C]), the gradient at out is
  // grad * out_coef[0] + out * out_coef[1] + out_coef[2] (the next BN's backward), made one
  // tile at a time as it is read.
  // weight_grads=False (no weight needs a gradient, as in a θ step) skips the weights' grads
  // and g^T x: they come back as an empty list and an empty tensor. a_weight as in
  // dw_conv_bn_out: a is then the first 1x1's input, and a's rows are made per tile.
  m.def("dw_conv_bn_backward_out(Tensor grad, Tensor a, Tensor[] weights, int stride,"
        " Tensor scale, Tensor shift, Tensor mean, Tensor(a!)? grad_a, Tensor? x=None,"
        " Tensor? x_weight=None, Tensor(b!)? grad_x=None, Tensor? out=None,"
        " Tensor? out_coef=None, bool weight_grads=True, Tensor? a_weight=None)"
        " -> (Tensor[], Tensor, Tensor)");
  // The candidates' BN3s and the mask-weighted combine over z = Tensor[N, P, k, O] (k
  // candidates' second 1x1 outputs), and their backward (csrc/cpu/combine.cpp): mean, var,
  // gamma and beta hold BN3's k * O statistics and parameters; mask is Tensor[1 or N, k] (per
  // batch or per example). combine_bn_out: out[n, p, o] = sum_i mask[n, i] * BN3_i(z[n, p,
  // i, o]), one pass over z. combine_bn_backward_out writes dz = dL/dz given dy = dL/dout
  // (with the batch statistics' gradient when training) and returns (dL/dmask Tensor[N, k],
  // dgamma, dbeta), two passes over z.
  m.def("combine_bn_out(Tensor z, Tensor mask, Tensor mean, Tensor var, Tensor gamma,"
        " Tensor beta, float eps, Tensor(a!) out) -> ()");
  m.def("combine_bn_backward_out(Tensor z, Tensor dy, Tensor mask, Tensor mean, Tensor var,"
        " Tensor gamma, Tensor beta, float eps, bool training, Tensor(a!) dz)"
        " -> (Tensor, Tensor, Tensor)");
  // The candidates' second 1x1 convs with BN2 + ReLU as prologue (csrc/cpu/pointwise.cpp):
  // `segments` is a flat list of (out_start, out_len, in_start, in_len, w_offset) tuples, each
  // z[:, out_start:+out_len] = relu(d * scale + shift)[:, in_start:+in_len] W^T with W the
  // row-major [out_len, in_len] block of `weight` at w_offset. pointwise_bn_out returns
  // Tensor[2, C_z] in d's dtype, z's per-column mean and biased variance; the backward writes
  // g = dL/d(d * scale + shift) (zero where the ReLU was off) into grad_d and returns the
  // weight's gradient (empty with weight_grad=False) and Tensor[2, C] float64, the per-channel
  // sums of g and g * (d - mean). stats=False skips the forward's statistics, as in
  // dw_conv_bn_out.
  m.def("pointwise_bn_out(Tensor d, Tensor scale, Tensor shift, Tensor weight, int[] segments,"
        " Tensor(a!) z, bool stats=True) -> Tensor");
  m.def("pointwise_bn_backward_out(Tensor dz, Tensor d, Tensor scale, Tensor shift, Tensor mean,"
        " Tensor weight, int[] segments, Tensor(a!) grad_d, bool weight_grad=True)"
        " -> (Tensor, Tensor)");
  // Per-channel steps of the fused block (csrc/cpu/per_channel.cpp), one op each.
  // bn_coef: (rstd, scale, shift) of y = x * scale + shift for a BN with these statistics.
  // bn_grad_coef: the BN backward dz = alpha * g + beta * z + delta and the gradients of gamma
  // and beta, as (alpha, beta, delta, dgamma, dbeta), from sum(g) and sum(g * z) over count
  // rows (sum(g * (z - mean)) when centered); in gamma's dtype.
  m.def("bn_coef(Tensor mean, Tensor var, Tensor gamma, Tensor beta, float eps)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("bn_grad_coef(Tensor sum_g, Tensor sum_gz, Tensor mean, Tensor rstd, Tensor gamma,"
        " int count, bool training, bool centered) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The first 1x1's flat stored weight as the dense Tensor[rows, cols] of the fused GEMM and
  // back; blocks: flat (row0, rows, offset, groups) tuples (fbnet_fast/backends/plan.py).
  m.def("pw1_dense(Tensor w, int[] blocks, int rows, int cols) -> Tensor");
  // The same into a preallocated [rows, cols] matrix (a reused workspace: at the 184-channel
  // layers a fresh one is 3 MB of page faults a call).
  m.def("pw1_dense_out(Tensor w, int[] blocks, Tensor(a!) dense) -> ()");
  m.def("pw1_packed(Tensor dense, int[] blocks) -> Tensor");
  // The first 1x1 (A = X W1^T) through X's channel_cov (mean, centred cross products) instead
  // of a pass over the wide A: BN1's batch (mean, biased variance) over `rows` rows, and the
  // backward's (beta A + delta) terms added in place to grad_x and, when given, grad_w1.
  m.def("pw1_bn_stats(Tensor w1, Tensor x_mean, Tensor x_cov, int rows) -> (Tensor, Tensor)");
  m.def("pw1_cov_backward(Tensor(a!) grad_x, Tensor(b!)? grad_w1, Tensor x, Tensor w1,"
        " Tensor beta, Tensor delta, Tensor x_mean, Tensor x_cov) -> ()");
  // The running statistics of several BNs updated in place from a call's packed [2, S]
  // statistics (means, biased variances) over counts[i] rows each, F.batch_norm's rule;
  // tracked: none, or each BN's num_batches_tracked, counted up (momentum < 0: their average).
  m.def("bn_running_update(Tensor(a!)[] means, Tensor(b!)[] vars, Tensor(c!)[] tracked,"
        " Tensor stats, int[] counts, float[] momenta) -> ()");
  // A new uninitialised contiguous Tensor[size] of like's dtype and device whose memory comes
  // from a pool of blocks that earlier such tensors left (csrc/cpu/pool.cpp): for tensors
  // saved from one step to its backward, which recur every step. release_pool frees the
  // pool's idle blocks and returns their bytes (like only picks the device).
  m.def("pooled_empty(Tensor like, int[] size) -> Tensor");
  m.def("release_pool(Tensor like) -> int");
}
