// Depthwise KxK conv ops on the CPU over channels-last (NHWC) data; the kernels are in
// depthwise_kernels.h.
#include "channel_sums.h"
#include "depthwise_kernels.h"

namespace fbnet_fast {
namespace {

void dw_conv_out_cpu(const at::Tensor& x_in, at::TensorList weights, int64_t stride,
                     const at::Tensor& out) {
  auto r = check_inputs(x_in, weights, stride);
  auto x = channel_contiguous(x_in);
  auto wt = taps_major(weights, r);
  auto& S = r.S;
  S.xn = x.stride(0); S.xh = x.stride(2); S.xw = x.stride(3);
  check_out(out, x, {S.N, S.C, S.Ho, S.Wo}, "dw_conv_out", "out");
  if (out.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dw_conv", [&] {
    const auto gs = make_groups<scalar_t>(r, wt.const_data_ptr<scalar_t>(), nullptr);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, S.N * S.Ho, 1, [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row)
        for (const auto& g : gs) fwd_row<scalar_t>(S, g, xp, op, row / S.Ho, row % S.Ho);
    });
  });
}

at::Tensor dw_conv_cpu(const at::Tensor& x, at::TensorList weights, int64_t stride) {
  auto r = check_inputs(x, weights, stride);
  const auto& S = r.S;
  auto out = at::empty({S.N, S.C, S.Ho, S.Wo},
                       x.options().memory_format(at::MemoryFormat::ChannelsLast));
  dw_conv_out_cpu(x, weights, stride, out);
  return out;
}

std::vector<at::Tensor> dw_conv_backward_out_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                 at::TensorList weights, int64_t stride,
                                                 const at::Tensor& gx) {
  const auto in = backward_inputs(grad_in, x_in, weights, stride, gx, "dw_conv_backward",
                                  "grad_x");
  const auto& r = in.r;
  const auto& S = r.S;
  const auto &x = in.x, &gy = in.gy, &wt = in.wt, &wi = in.wi;
  const int64_t rows = S.N * S.Ho;
  const int64_t parts = num_parts(rows);
  auto gw_parts = pooled_empty(wt, {parts, wt.numel()}).zero_();
  if (gy.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dw_conv_backward", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* gp = gy.const_data_ptr<scalar_t>();
      const scalar_t* wp = wt.const_data_ptr<scalar_t>();
      scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
      const auto gi = make_groups<scalar_t>(r, wi.const_data_ptr<scalar_t>(), nullptr);
      at::parallel_for(0, S.N * S.H, 1, [&](int64_t b, int64_t e) {
        for (int64_t row = b; row < e; ++row)
          for (const auto& g : gi) grad_input_row<scalar_t>(S, g, gp, gxp, row / S.H, row % S.H);
      });
      scalar_t* gwp = gw_parts.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) {
          const auto gs_t = make_groups<scalar_t>(r, wp, gwp + t * wt.numel());
          const auto [r0, r1] = share(rows, parts, t);
          for (int64_t row = r0; row < r1; ++row)
            for (const auto& g : gs_t) bwd_weight_row<scalar_t>(S, g, gp, xp, row / S.Ho, row % S.Ho);
        }
      });
    });
  } else {
    gx.zero_();
  }
  return split_grad_weights(gw_parts, weights, r);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> dw_conv_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, at::TensorList weights, int64_t stride) {
  TORCH_CHECK(x.dim() == 4, "dw_conv: x must be Tensor[N, C, H, W], got ", x.dim(), " dims");
  auto gx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto gws = dw_conv_backward_out_cpu(grad, x, weights, stride, gx);
  return {gx, gws};
}

}  // namespace

TORCH_LIBRARY_IMPL(fbnet_fast, CPU, m) {
  m.impl("dw_conv", &dw_conv_cpu);
  m.impl("dw_conv_backward", &dw_conv_backward_cpu);
  m.impl("dw_conv_out", &dw_conv_out_cpu);
  m.impl("dw_conv_backward_out", &dw_conv_backward_out_cpu);
}

}  // namespace fbnet_fast
