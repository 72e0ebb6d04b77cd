"""The backward of a training-mode BN + ReLU over NHWC rows, in two passes and in place.

With ``pre = z * scale + shift`` the BN's output and ``grad`` the gradient after its ReLU,
the first pass turns grad into ``g = grad * (pre > 0)`` and sums g and g * z per channel
(what ``bn_grad`` needs); the second writes ``dL/dz = g * alpha + z * beta + delta``. In
PyTorch these were nine elementwise ops and reductions, most with an expanded-size
temporary: they set the backward's peak memory (bench/RESULTS.md). Both passes can write
over their input, so the gradient needs one expanded-size buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import pixel_channel_tile
from .utils import acc_dtype, channel_sums, check_nhwc, launch, pixel_channel_grid

__all__ = ["relu_grad_sums_", "bn_grad_apply"]


@triton.jit
def _relu_grad_sums_kernel(
    g_ptr, z_ptr, scale_ptr, shift_ptr, s1_ptr, s2_ptr, R, C, ldg, ldz,
    IS_FP64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    ACC = tl.float64 if IS_FP64 else tl.float32
    _, r, mask_r, c, mask_c = pixel_channel_tile(R, C, BLOCK_P, BLOCK_C)   # one "image"
    rows, m2 = r.to(tl.int64), mask_r[:, None] & mask_c[None, :]
    gp = g_ptr + rows[:, None] * ldg + c[None, :]
    gv = tl.load(gp, mask=m2, other=0.0).to(ACC)
    zv = tl.load(z_ptr + rows[:, None] * ldz + c[None, :], mask=m2, other=0.0).to(ACC)
    sc = tl.load(scale_ptr + c, mask=mask_c, other=0.0)
    sh = tl.load(shift_ptr + c, mask=mask_c, other=0.0)
    g = tl.where(m2 & (zv * sc[None, :] + sh[None, :] > 0), gv, 0.0)
    tl.store(gp, g.to(g_ptr.dtype.element_ty), mask=m2)
    tl.atomic_add(s1_ptr + c, tl.sum(g, axis=0), mask=mask_c)
    tl.atomic_add(s2_ptr + c, tl.sum(g * zv, axis=0), mask=mask_c)


@triton.jit
def _bn_grad_apply_kernel(
    g_ptr, z_ptr, alpha_ptr, beta_ptr, delta_ptr, out_ptr, R, C, ldg, ldz, ldo,
    IS_FP64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    ACC = tl.float64 if IS_FP64 else tl.float32
    _, r, mask_r, c, mask_c = pixel_channel_tile(R, C, BLOCK_P, BLOCK_C)
    rows, m2 = r.to(tl.int64), mask_r[:, None] & mask_c[None, :]
    gv = tl.load(g_ptr + rows[:, None] * ldg + c[None, :], mask=m2, other=0.0).to(ACC)
    zv = tl.load(z_ptr + rows[:, None] * ldz + c[None, :], mask=m2, other=0.0).to(ACC)
    al = tl.load(alpha_ptr + c, mask=mask_c, other=0.0)
    be = tl.load(beta_ptr + c, mask=mask_c, other=0.0)
    de = tl.load(delta_ptr + c, mask=mask_c, other=0.0)
    out = gv * al[None, :] + zv * be[None, :] + de[None, :]
    tl.store(out_ptr + rows[:, None] * ldo + c[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m2)


def _check(g, z, vectors):
    check_nhwc("bn backward g", g)
    check_nhwc("bn backward z", z)
    if g.shape != z.shape:
        raise ValueError(f"bn backward: g {tuple(g.shape)} and z {tuple(z.shape)} differ")
    acc = acc_dtype(z.dtype)
    for v in vectors:
        if v.shape != (g.shape[1],) or v.dtype != acc or not v.is_contiguous():
            raise ValueError(f"bn backward: per-channel vectors must be contiguous "
                             f"Tensor[{g.shape[1]}] in {acc}, got {tuple(v.shape)} {v.dtype}")
    return acc


def relu_grad_sums_(g, z, scale, shift) -> tuple:
    """In place: g (Tensor[R, C], the gradient after the ReLU) becomes g * (z * scale +
    shift > 0). Returns (sum(g), sum(g * z)) per channel, in the accumulator dtype."""
    acc = _check(g, z, (scale, shift))
    s1, s2 = channel_sums(g.shape[1], acc, g.device)
    if g.numel():
        grid, bp, bc, warps = pixel_channel_grid(1, *g.shape)
        launch(_relu_grad_sums_kernel, grid,
               (g, z, scale, shift, s1, s2, g.shape[0], g.shape[1], g.stride(0), z.stride(0)),
               warps, IS_FP64=acc == torch.float64, BLOCK_P=bp, BLOCK_C=bc)
    return s1, s2


def bn_grad_apply(g, z, alpha, beta, delta, out=None, out_dtype=None):
    """dL/dz = g * alpha + z * beta + delta (Tensor[R, C]) into ``out`` (which may be g
    itself) or a new tensor of ``out_dtype`` (default z's)."""
    _check(g, z, (alpha, beta, delta))
    if out is None:
        out = torch.empty(g.shape, dtype=out_dtype or z.dtype, device=g.device)
    elif out.shape != g.shape or out.stride(1) != 1:
        raise ValueError(f"bn_grad_apply: out must be Tensor{tuple(g.shape)} with contiguous "
                         f"channels, got {tuple(out.shape)} strides {out.stride()}")
    if g.numel():
        grid, bp, bc, warps = pixel_channel_grid(1, *g.shape)
        launch(_bn_grad_apply_kernel, grid,
               (g, z, alpha, beta, delta, out, g.shape[0], g.shape[1], g.stride(0), z.stride(0),
                out.stride(0)),
               warps, IS_FP64=acc_dtype(z.dtype) == torch.float64, BLOCK_P=bp, BLOCK_C=bc)
    return out
