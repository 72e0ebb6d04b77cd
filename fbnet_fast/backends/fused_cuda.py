"""The CUDA MixedBlock backend: the Triton backend's pipeline with the depthwise pass on
the CUDA C++ ops (``fbnet_fast::dw_conv`` / ``dw_conv_backward``, csrc/cuda/depthwise.cu).

The MixedBlock runs as the custom op ``fbnet_fast::mixed_block_cuda``, made by
``fused_triton.define_ops``. The depthwise schemas come from the C++ extension
(``backends/jit.py``, csrc/ops.cpp); the CUDA implementations are compiled here as a
second library holding only ``TORCH_LIBRARY_IMPL(fbnet_fast, CUDA, ...)``. The BN + ReLU
before the depthwise and the statistics after it run as PyTorch ops, and the ReLU's
backward with its sums as kernels/bn.py's pass, since the CUDA ops do not fuse them.
"""
from __future__ import annotations

import torch

from . import fused_triton, jit
from .plan import BNCoef, Geometry, dw_weights

__all__ = ["mixed_block_forward", "why_unavailable", "CudaDepthwise", "load_cuda_ops"]

NAME = "fbnet_fast_cuda"


def _build() -> None:
    if not jit.load():                     # registers the schemas (TORCH_LIBRARY)
        raise RuntimeError(jit.why_unavailable())
    src = jit.source_dir()
    sources = sorted(str(p) for p in (src / "cuda").glob("*.cu")) if src else []
    if not sources:
        raise RuntimeError("the CUDA sources (csrc/cuda/*.cu) are not shipped with this "
                           "installation")
    jit.compile_library(NAME, "CUDA kernels", sources, extra_cuda_cflags=["-O3"])


CUDA_LIBRARY = jit.JitLibrary("CUDA kernels", _build)


def load_cuda_ops() -> bool:
    """Build (first use) and load the CUDA depthwise ops; True when registered."""
    return CUDA_LIBRARY.load()


def why_unavailable(device) -> str | None:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "the cuda backend needs a CUDA device"
    why = fused_triton.why_unavailable(device)   # pointwise GEMMs and combine are Triton
    if why is not None:
        return why
    return CUDA_LIBRARY.why_unavailable()


class CudaDepthwise(fused_triton.DepthwiseStep):
    """The depthwise step on the CUDA ops; BN1 + ReLU and the sums in PyTorch."""

    def forward(self, a, w, geo: Geometry, bn1: BNCoef, stats: bool):
        hin = torch.relu(a.to(bn1.scale.dtype) * bn1.scale + bn1.shift).to(a.dtype)
        out = torch.ops.fbnet_fast.dw_conv.default(geo.image_in(hin),
                                                    dw_weights(w, geo.runs), geo.stride)
        rows = out.permute(0, 2, 3, 1).reshape(-1, a.shape[1])
        if not stats:
            return rows, None, None
        r = rows.to(bn1.scale.dtype)
        return rows, r.sum(0), (r * r).sum(0)

    def backward(self, dd, a, w, geo: Geometry, bn1: BNCoef, weight_grad: bool = True):
        # dw_conv_backward computes the weight gradient with the input's in one kernel
        acc = bn1.scale.dtype
        hin = torch.relu(a.to(acc) * bn1.scale + bn1.shift).to(a.dtype)
        gx, gws = torch.ops.fbnet_fast.dw_conv_backward.default(
            geo.image_out(dd), geo.image_in(hin), dw_weights(w, geo.runs), geo.stride)
        g = gx.permute(0, 2, 3, 1).reshape(-1, a.shape[1]).to(a.dtype).contiguous()
        sum_g, sum_ga = fused_triton.load_kernels().bn.relu_grad_sums_(g, a, bn1.scale,
                                                                        bn1.shift)
        dw = torch.cat([t.reshape(-1) for t in gws]).to(acc)
        return g, sum_g, sum_ga, dw


# ``fbnet_fast::mixed_block_cuda`` (and its ``_backward``): the Triton pipeline's ops with
# this depthwise step. Also registered for CPU tensors, where the same-schema C++ ops run
# it under Triton's interpreter (the tests check the glue that way).
mixed_block_forward = fused_triton.define_ops("mixed_block_cuda", CudaDepthwise())
