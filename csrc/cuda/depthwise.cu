// Depthwise KxK conv (pad K//2) on CUDA over channels-last data: the schemas of
// csrc/ops.cpp (dw_conv, dw_conv_backward), CUDA implementations only.
//
// One launch per weight group (a run of channels sharing K). Threads walk NHWC elements
// with the channel fastest, so a warp reads contiguous channels. Forward and grad-input
// gather (no atomics); grad-weight reduces each (channel, tap) over the N*Ho*Wo pixels in
// a block, then one atomicAdd per block into a float accumulator. Only c10 CUDA headers
// are included (not ATen/cuda/CUDAContext.h), so no cuBLAS/cuSPARSE headers are needed.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace fbnet_fast {
namespace {

struct Geo {
  int64_t N, H, W, C, Ho, Wo, s;
  int64_t xn, xh, xw;  // input strides; channel stride is 1
};

struct Run {
  int64_t c0, C, k, w_off;
};

template <typename T, typename A>
__global__ void dw_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w,
                              T* __restrict__ out, Geo g, Run r) {
  const int64_t total = g.N * g.Ho * g.Wo * r.C;
  const int64_t p = r.k / 2;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t c = i % r.C;
    int64_t t = i / r.C;
    const int64_t ow = t % g.Wo;
    t /= g.Wo;
    const int64_t oh = t % g.Ho;
    const int64_t n = t / g.Ho;
    const T* wc = w + r.w_off + c * r.k * r.k;
    const T* xb = x + n * g.xn + r.c0 + c;
    A acc = 0;
    for (int64_t kh = 0; kh < r.k; ++kh) {
      const int64_t ih = oh * g.s - p + kh;
      if (ih < 0 || ih >= g.H) continue;
      for (int64_t kw = 0; kw < r.k; ++kw) {
        const int64_t iw = ow * g.s - p + kw;
        if (iw < 0 || iw >= g.W) continue;
        acc += static_cast<A>(xb[ih * g.xh + iw * g.xw]) * static_cast<A>(wc[kh * r.k + kw]);
      }
    }
    out[((n * g.Ho + oh) * g.Wo + ow) * g.C + r.c0 + c] = static_cast<T>(acc);
  }
}

template <typename T, typename A>
__global__ void dw_grad_input_kernel(const T* __restrict__ gy, const T* __restrict__ w,
                                     T* __restrict__ gx, Geo g, Run r) {
  const int64_t total = g.N * g.H * g.W * r.C;
  const int64_t p = r.k / 2;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t c = i % r.C;
    int64_t t = i / r.C;
    const int64_t iw = t % g.W;
    t /= g.W;
    const int64_t ih = t % g.H;
    const int64_t n = t / g.H;
    const T* wc = w + r.w_off + c * r.k * r.k;
    A acc = 0;
    for (int64_t kh = 0; kh < r.k; ++kh) {
      const int64_t th = ih + p - kh;  // = oh * s
      if (th < 0 || th % g.s != 0 || th / g.s >= g.Ho) continue;
      const int64_t oh = th / g.s;
      for (int64_t kw = 0; kw < r.k; ++kw) {
        const int64_t tw = iw + p - kw;
        if (tw < 0 || tw % g.s != 0 || tw / g.s >= g.Wo) continue;
        const int64_t ow = tw / g.s;
        acc += static_cast<A>(gy[((n * g.Ho + oh) * g.Wo + ow) * g.C + r.c0 + c]) *
               static_cast<A>(wc[kh * r.k + kw]);
      }
    }
    gx[((n * g.H + ih) * g.W + iw) * g.C + r.c0 + c] = static_cast<T>(acc);
  }
}

constexpr int kChans = 32;  // channels per block (threadIdx.x)
constexpr int kRows = 8;    // pixel lanes per block (threadIdx.y)

// grid: (channel blocks, taps, pixel splits); block: (kChans, kRows).
template <typename T, typename A>
__global__ void dw_grad_weight_kernel(const T* __restrict__ gy, const T* __restrict__ x,
                                      A* __restrict__ gw, Geo g, Run r) {
  __shared__ A part[kRows][kChans];
  const int64_t c = blockIdx.x * kChans + threadIdx.x;
  const int64_t tap = blockIdx.y;
  const int64_t kh = tap / r.k, kw = tap % r.k, p = r.k / 2;
  const int64_t pixels = g.N * g.Ho * g.Wo;
  A acc = 0;
  if (c < r.C) {
    for (int64_t q = blockIdx.z * kRows + threadIdx.y; q < pixels; q += (int64_t)gridDim.z * kRows) {
      const int64_t ow = q % g.Wo;
      const int64_t oh = (q / g.Wo) % g.Ho;
      const int64_t n = q / (g.Wo * g.Ho);
      const int64_t ih = oh * g.s - p + kh, iw = ow * g.s - p + kw;
      if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;
      acc += static_cast<A>(gy[q * g.C + r.c0 + c]) *
             static_cast<A>(x[n * g.xn + ih * g.xh + iw * g.xw + r.c0 + c]);
    }
  }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < r.C) {
    for (int j = 1; j < kRows; ++j) acc += part[j][threadIdx.x];
    atomicAdd(gw + r.w_off + c * r.k * r.k + tap, acc);
  }
}

struct Checked {
  Geo g;
  std::vector<Run> runs;
};

Checked check_inputs(const at::Tensor& x, at::TensorList weights, int64_t stride) {
  TORCH_CHECK(x.dim() == 4, "dw_conv: x must be Tensor[N, C, H, W], got ", x.dim(), " dims");
  TORCH_CHECK(stride == 1 || stride == 2, "dw_conv: stride must be 1 or 2, got ", stride);
  TORCH_CHECK(!weights.empty(), "dw_conv: weights must hold at least one tensor");
  TORCH_INTERNAL_ASSERT(x.device().is_cuda());
  Checked r;
  int64_t c0 = 0, off = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    TORCH_CHECK(w.device() == x.device(), "dw_conv: weights[", i, "] is on ", w.device(),
                ", x on ", x.device());
    TORCH_CHECK(w.scalar_type() == x.scalar_type(), "dw_conv: weights[", i, "] has dtype ",
                w.scalar_type(), ", x has ", x.scalar_type());
    TORCH_CHECK((w.dim() == 3 || (w.dim() == 4 && w.size(1) == 1)) &&
                    w.size(-1) == w.size(-2) && w.size(-1) % 2 == 1,
                "dw_conv: weights[", i, "] must be Tensor[C_g, K, K] or [C_g, 1, K, K] with odd "
                "K, got ", w.sizes());
    const int64_t k = w.size(-1);
    r.runs.push_back({c0, w.size(0), k, off});
    c0 += w.size(0);
    off += w.size(0) * k * k;
  }
  TORCH_CHECK(c0 == x.size(1), "dw_conv: the weights cover ", c0, " channels, x has ",
              x.size(1));
  const int64_t H = x.size(2), W = x.size(3);
  r.g = {x.size(0), H, W, x.size(1), (H + stride - 1) / stride, (W + stride - 1) / stride,
         stride, 0, 0, 0};
  return r;
}

at::Tensor channel_contiguous(const at::Tensor& x) {
  if (x.stride(1) == 1 && x.stride(2) >= x.size(1) && x.stride(3) >= x.size(1) && x.size(1) > 0)
    return x;
  return x.contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor flat_weights(at::TensorList weights) {
  std::vector<at::Tensor> parts;
  for (const auto& w : weights) parts.push_back(w.reshape({-1}));
  return at::cat(parts).contiguous();
}

int blocks_for(int64_t total, int threads) {
  const int64_t b = (total + threads - 1) / threads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(b, 1), 65535 * 8));
}

at::Tensor dw_conv_cuda(const at::Tensor& x_in, at::TensorList weights, int64_t stride) {
  auto r = check_inputs(x_in, weights, stride);
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto x = channel_contiguous(x_in);
  auto w = flat_weights(weights);
  auto& g = r.g;
  g.xn = x.stride(0); g.xh = x.stride(2); g.xw = x.stride(3);
  auto out = at::empty({g.N, g.C, g.Ho, g.Wo},
                       x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dw_conv_cuda", [&] {
    using A = at::acc_type<scalar_t, true>;
    for (const auto& run : r.runs) {
      const int threads = 256;
      dw_fwd_kernel<scalar_t, A><<<blocks_for(g.N * g.Ho * g.Wo * run.C, threads), threads, 0,
                                   stream>>>(x.const_data_ptr<scalar_t>(),
                                             w.const_data_ptr<scalar_t>(),
                                             out.mutable_data_ptr<scalar_t>(), g, run);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> dw_conv_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, at::TensorList weights, int64_t stride) {
  auto r = check_inputs(x_in, weights, stride);
  auto& g = r.g;
  TORCH_CHECK(grad_in.dim() == 4 && grad_in.size(0) == g.N && grad_in.size(1) == g.C &&
                  grad_in.size(2) == g.Ho && grad_in.size(3) == g.Wo,
              "dw_conv_backward: grad must have shape [", g.N, ", ", g.C, ", ", g.Ho, ", ", g.Wo,
              "], got ", grad_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == x_in.scalar_type(), "dw_conv_backward: grad dtype ",
              grad_in.scalar_type(), " differs from x dtype ", x_in.scalar_type());
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto x = channel_contiguous(x_in);
  auto gy = grad_in.contiguous(at::MemoryFormat::ChannelsLast);
  auto w = flat_weights(weights);
  g.xn = x.stride(0); g.xh = x.stride(2); g.xw = x.stride(3);
  auto gx = at::empty({g.N, g.C, g.H, g.W},
                      x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const auto acc_type = at::toAccumulateType(x.scalar_type(), /*is_cuda=*/true);
  auto gw = at::zeros({w.numel()}, w.options().dtype(acc_type));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (gx.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                    "dw_conv_backward_cuda", [&] {
      using A = at::acc_type<scalar_t, true>;
      for (const auto& run : r.runs) {
        const int threads = 256;
        dw_grad_input_kernel<scalar_t, A><<<blocks_for(g.N * g.H * g.W * run.C, threads),
                                            threads, 0, stream>>>(
            gy.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
            gx.mutable_data_ptr<scalar_t>(), g, run);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const int64_t pixels = g.N * g.Ho * g.Wo;
        const int64_t splits = std::min<int64_t>(std::max<int64_t>(pixels / (kRows * 64), 1), 256);
        dim3 grid((run.C + kChans - 1) / kChans, run.k * run.k, splits);
        dw_grad_weight_kernel<scalar_t, A><<<grid, dim3(kChans, kRows), 0, stream>>>(
            gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
            gw.mutable_data_ptr<A>(), g, run);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  std::vector<at::Tensor> gws;
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& run = r.runs[i];
    gws.push_back(gw.narrow(0, run.w_off, run.C * run.k * run.k)
                      .to(x.scalar_type())
                      .view(weights[i].sizes()));
  }
  return {gx, gws};
}

}  // namespace

TORCH_LIBRARY_IMPL(fbnet_fast, CUDA, m) {
  m.impl("dw_conv", &dw_conv_cuda);
  m.impl("dw_conv_backward", &dw_conv_backward_cuda);
}

}  // namespace fbnet_fast
