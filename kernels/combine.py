"""The mask-weighted combine of a MixedBlock and its backward, over NHWC rows.

Forward, per output pixel row and channel c (i runs over the conv candidates)::

    y = sum_i m_i * (z_i * scale_i + shift_i + res) + m_skip * skip

z is Tensor[N*Ho*Wo, n_conv*C] (candidate i owns columns [i*C, (i+1)*C)), ``res`` is x
where the candidates are residual, and ``skip`` is x (identity skip) or relu(s * ss + sb)
(1x1 conv skip, s its pre-BN output). The mask is Tensor[1 or N, n_conv (+1 for skip)],
conv candidates first: one row for a per-batch mask, one per example otherwise.

Backward reduces dL/dm per example and the BN3 / skip-BN backward sums in one pass; a
second, elementwise pass turns them into dL/dz and dL/ds.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import pixel_channel_tile
from .utils import acc_dtype, channel_sums, check_nhwc, launch, pixel_channel_grid

__all__ = ["SKIP_NONE", "SKIP_IDENTITY", "SKIP_CONV", "combine_forward", "combine_backward",
           "combine_grad_inputs"]

SKIP_NONE, SKIP_IDENTITY, SKIP_CONV = 0, 1, 2


@triton.jit
def _combine_fwd_kernel(
    z_ptr, scale_ptr, shift_ptr, mask_ptr, msum_ptr, x_ptr, s_ptr, ss_ptr, sb_ptr, y_ptr,
    HW, C, n_conv, ldz, ldx, lds, mask_sn, msum_sn,
    HAS_RES: tl.constexpr, SKIP_MODE: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    ACC = tl.float64 if IS_FP64 else tl.float32
    n, p, mask_p, c, mask_c = pixel_channel_tile(HW, C, BLOCK_P, BLOCK_C)
    m2 = mask_p[:, None] & mask_c[None, :]
    rows = (n * HW + p).to(tl.int64)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for i in range(n_conv):
        mi = tl.load(mask_ptr + n * mask_sn + i).to(ACC)
        sc = tl.load(scale_ptr + i * C + c, mask=mask_c, other=0.0)
        sh = tl.load(shift_ptr + i * C + c, mask=mask_c, other=0.0)
        zv = tl.load(z_ptr + rows[:, None] * ldz + (i * C + c)[None, :], mask=m2, other=0.0)
        acc += mi * (zv.to(ACC) * sc[None, :] + sh[None, :])
    if HAS_RES or SKIP_MODE == 1:
        xv = tl.load(x_ptr + rows[:, None] * ldx + c[None, :], mask=m2, other=0.0).to(ACC)
        if HAS_RES:  # sum_i m_i * x, the residual every conv candidate adds
            acc += tl.load(msum_ptr + n * msum_sn).to(ACC) * xv
        if SKIP_MODE == 1:
            acc += tl.load(mask_ptr + n * mask_sn + n_conv).to(ACC) * xv
    if SKIP_MODE == 2:
        sv = tl.load(s_ptr + rows[:, None] * lds + c[None, :], mask=m2, other=0.0).to(ACC)
        ss = tl.load(ss_ptr + c, mask=mask_c, other=0.0)
        sb = tl.load(sb_ptr + c, mask=mask_c, other=0.0)
        acc += tl.load(mask_ptr + n * mask_sn + n_conv).to(ACC) * tl.maximum(
            sv * ss[None, :] + sb[None, :], 0.0)
    tl.store(y_ptr + rows[:, None] * C + c[None, :], acc.to(y_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _combine_bwd_kernel(
    dy_ptr, z_ptr, scale_ptr, shift_ptr, mask_ptr, x_ptr, s_ptr, ss_ptr, sb_ptr,
    dm_ptr, sum_g_ptr, sum_gz_ptr, sum_gs_ptr, sum_gss_ptr,
    HW, C, n_conv, ldz, ldx, lds, mask_sn, ldm,
    HAS_RES: tl.constexpr, SKIP_MODE: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # dm[n, i] += sum(dy * term_i); BN sums of g_i = m_i * dy: sum(g_i), sum(g_i * z_i).
    ACC = tl.float64 if IS_FP64 else tl.float32
    n, p, mask_p, c, mask_c = pixel_channel_tile(HW, C, BLOCK_P, BLOCK_C)
    m2 = mask_p[:, None] & mask_c[None, :]
    rows = (n * HW + p).to(tl.int64)
    dy = tl.load(dy_ptr + rows[:, None] * C + c[None, :], mask=m2, other=0.0).to(ACC)
    if HAS_RES or SKIP_MODE == 1:
        xv = tl.load(x_ptr + rows[:, None] * ldx + c[None, :], mask=m2, other=0.0).to(ACC)
        dyx = tl.sum(tl.sum(dy * xv, axis=1), axis=0)
    for i in range(n_conv):
        mi = tl.load(mask_ptr + n * mask_sn + i).to(ACC)
        sc = tl.load(scale_ptr + i * C + c, mask=mask_c, other=0.0)
        sh = tl.load(shift_ptr + i * C + c, mask=mask_c, other=0.0)
        zv = tl.load(z_ptr + rows[:, None] * ldz + (i * C + c)[None, :], mask=m2, other=0.0)
        zv = zv.to(ACC)
        dm = tl.sum(tl.sum(dy * (zv * sc[None, :] + sh[None, :]), axis=1), axis=0)
        if HAS_RES:
            dm += dyx
        tl.atomic_add(dm_ptr + n * ldm + i, dm)
        g = mi * dy
        tl.atomic_add(sum_g_ptr + i * C + c, tl.sum(g, axis=0), mask=mask_c)
        tl.atomic_add(sum_gz_ptr + i * C + c, tl.sum(g * zv, axis=0), mask=mask_c)
    if SKIP_MODE == 1:
        tl.atomic_add(dm_ptr + n * ldm + n_conv, dyx)
    if SKIP_MODE == 2:
        sv = tl.load(s_ptr + rows[:, None] * lds + c[None, :], mask=m2, other=0.0).to(ACC)
        ss = tl.load(ss_ptr + c, mask=mask_c, other=0.0)
        sb = tl.load(sb_ptr + c, mask=mask_c, other=0.0)
        pre = sv * ss[None, :] + sb[None, :]
        tl.atomic_add(dm_ptr + n * ldm + n_conv,
                      tl.sum(tl.sum(dy * tl.maximum(pre, 0.0), axis=1), axis=0))
        g = tl.where(pre > 0, tl.load(mask_ptr + n * mask_sn + n_conv).to(ACC) * dy, 0.0)
        tl.atomic_add(sum_gs_ptr + c, tl.sum(g, axis=0), mask=mask_c)
        tl.atomic_add(sum_gss_ptr + c, tl.sum(g * sv, axis=0), mask=mask_c)


@triton.jit
def _combine_grad_inputs_kernel(
    dy_ptr, z_ptr, mask_ptr, alpha_ptr, beta_ptr, delta_ptr, dz_ptr,
    s_ptr, ss_ptr, sb_ptr, sa_ptr, sbeta_ptr, sdelta_ptr, ds_ptr,
    HW, C, n_conv, ldz, lds, mask_sn,
    SKIP_CONV: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # BN backward as one affine map per channel: dz = alpha*(m_i*dy) + beta*z + delta.
    ACC = tl.float64 if IS_FP64 else tl.float32
    n, p, mask_p, c, mask_c = pixel_channel_tile(HW, C, BLOCK_P, BLOCK_C)
    m2 = mask_p[:, None] & mask_c[None, :]
    rows = (n * HW + p).to(tl.int64)
    dy = tl.load(dy_ptr + rows[:, None] * C + c[None, :], mask=m2, other=0.0).to(ACC)
    for i in range(n_conv):
        mi = tl.load(mask_ptr + n * mask_sn + i).to(ACC)
        a = tl.load(alpha_ptr + i * C + c, mask=mask_c, other=0.0)
        b = tl.load(beta_ptr + i * C + c, mask=mask_c, other=0.0)
        d = tl.load(delta_ptr + i * C + c, mask=mask_c, other=0.0)
        zp = z_ptr + rows[:, None] * ldz + (i * C + c)[None, :]
        zv = tl.load(zp, mask=m2, other=0.0).to(ACC)
        dz = a[None, :] * (mi * dy) + b[None, :] * zv + d[None, :]
        tl.store(dz_ptr + rows[:, None] * ldz + (i * C + c)[None, :],
                 dz.to(dz_ptr.dtype.element_ty), mask=m2)
    if SKIP_CONV:
        sv = tl.load(s_ptr + rows[:, None] * lds + c[None, :], mask=m2, other=0.0).to(ACC)
        ss = tl.load(ss_ptr + c, mask=mask_c, other=0.0)
        sb = tl.load(sb_ptr + c, mask=mask_c, other=0.0)
        ms = tl.load(mask_ptr + n * mask_sn + n_conv).to(ACC)
        g = tl.where(sv * ss[None, :] + sb[None, :] > 0, ms * dy, 0.0)
        a = tl.load(sa_ptr + c, mask=mask_c, other=0.0)
        b = tl.load(sbeta_ptr + c, mask=mask_c, other=0.0)
        d = tl.load(sdelta_ptr + c, mask=mask_c, other=0.0)
        ds = a[None, :] * g + b[None, :] * sv + d[None, :]
        tl.store(ds_ptr + rows[:, None] * lds + c[None, :], ds.to(ds_ptr.dtype.element_ty),
                 mask=m2)


def _check_inputs(z, mask, n, hw, c, n_conv, res, skip, skip_mode):
    check_nhwc("combine z", z, n_conv * c)
    if z.shape[0] != n * hw:
        raise ValueError(f"combine: z has {z.shape[0]} rows, expected N*Ho*Wo = {n * hw}")
    ncol = n_conv + (skip_mode != SKIP_NONE)
    if mask.dim() != 2 or mask.shape[0] not in (1, n) or mask.shape[1] != ncol \
            or not mask.is_contiguous():
        raise ValueError(f"combine: mask must be a contiguous Tensor[1 or {n}, {ncol}], "
                         f"got {tuple(mask.shape)}")
    if skip_mode not in (SKIP_NONE, SKIP_IDENTITY, SKIP_CONV):
        raise ValueError(f"combine: unknown skip mode {skip_mode}")
    for name, t in (("res", res), ("skip", skip)):
        if t is not None:
            check_nhwc(f"combine {name}", t, c)
            if t.shape[0] != z.shape[0]:
                raise ValueError(f"combine: {name} has {t.shape[0]} rows, z {z.shape[0]}")


def _skip_args(skip_mode, res, skip, skip_scale, skip_shift, dummy):
    x = res if res is not None else (skip if skip_mode == SKIP_IDENTITY else dummy)
    s = skip if skip_mode == SKIP_CONV else dummy
    ss = skip_scale if skip_mode == SKIP_CONV else dummy
    sb = skip_shift if skip_mode == SKIP_CONV else dummy
    return x, s, ss, sb


def combine_forward(z, scale, shift, mask, n, hw, c, res=None, skip=None,
                    skip_mode=SKIP_NONE, skip_scale=None, skip_shift=None, out_dtype=None):
    """y (Tensor[N*Ho*Wo, C]); see the module docstring. ``res`` and an identity ``skip``
    are the same tensor (x) when both are used."""
    n_conv = scale.numel() // c
    _check_inputs(z, mask, n, hw, c, n_conv, res, skip, skip_mode)
    y = torch.empty(n * hw, c, dtype=out_dtype or z.dtype, device=z.device)
    if y.numel() == 0:
        return y
    dummy = scale
    x, s, ss, sb = _skip_args(skip_mode, res, skip, skip_scale, skip_shift, dummy)
    grid, bp, bc, warps = pixel_channel_grid(n, hw, c)
    msum = mask[:, :n_conv].sum(1).contiguous()
    launch(_combine_fwd_kernel, grid,
           (z, scale, shift, mask, msum, x, s, ss, sb, y,
            hw, c, n_conv, z.stride(0), x.stride(0) if x.dim() == 2 else 0,
            s.stride(0) if s.dim() == 2 else 0, mask.stride(0) if mask.shape[0] > 1 else 0,
            1 if mask.shape[0] > 1 else 0), warps,
           HAS_RES=res is not None, SKIP_MODE=skip_mode,
           IS_FP64=acc_dtype(z.dtype) == torch.float64, BLOCK_P=bp, BLOCK_C=bc)
    return y


def combine_backward(dy, z, scale, shift, mask, n, hw, c, res=None, skip=None,
                     skip_mode=SKIP_NONE, skip_scale=None, skip_shift=None):
    """Returns (dm Tensor[N, ncol] per example, sum_g, sum_gz Tensor[n_conv*C],
    sum_gs, sum_gss Tensor[C] (skip conv BN sums; zeros otherwise)), accumulator dtype."""
    n_conv = scale.numel() // c
    _check_inputs(z, mask, n, hw, c, n_conv, res, skip, skip_mode)
    check_nhwc("combine dy", dy, c)
    acc = acc_dtype(z.dtype)
    dev = z.device
    dm = torch.zeros(n, mask.shape[1], dtype=acc, device=dev)
    sg, sgz = channel_sums(n_conv * c, acc, dev)
    sgs, sgss = channel_sums(c, acc, dev)   # apart from sg: both can be returned gradients
    if dy.numel() == 0:
        return dm, sg, sgz, sgs, sgss
    x, s, ss, sb = _skip_args(skip_mode, res, skip, skip_scale, skip_shift, scale)
    grid, bp, bc, warps = pixel_channel_grid(n, hw, c)
    launch(_combine_bwd_kernel, grid,
           (dy, z, scale, shift, mask, x, s, ss, sb, dm, sg, sgz, sgs, sgss,
            hw, c, n_conv, z.stride(0), x.stride(0) if x.dim() == 2 else 0,
            s.stride(0) if s.dim() == 2 else 0, mask.stride(0) if mask.shape[0] > 1 else 0,
            dm.stride(0)), warps, HAS_RES=res is not None, SKIP_MODE=skip_mode,
           IS_FP64=acc == torch.float64, BLOCK_P=bp, BLOCK_C=bc)
    return dm, sg, sgz, sgs, sgss


def combine_grad_inputs(dy, z, mask, alpha, beta, delta, n, hw, c, skip=None,
                        skip_scale=None, skip_shift=None, skip_coeffs=None, out_dtype=None):
    """dz (Tensor[N*Ho*Wo, n_conv*C]) = alpha*(m_i*dy) + beta*z + delta per channel, and
    for a conv skip ds = a*(m_skip*dy*relu'(s*ss+sb)) + b*s + d (else None)."""
    n_conv = alpha.numel() // c
    skip_mode = SKIP_CONV if skip is not None else SKIP_NONE
    if skip_mode == SKIP_NONE and mask.shape[1] == n_conv + 1:
        mask = mask[:, :n_conv].contiguous()
    _check_inputs(z, mask, n, hw, c, n_conv, None, skip, skip_mode)
    dz = torch.empty_like(z, dtype=out_dtype or z.dtype)
    ds = torch.empty_like(skip, dtype=out_dtype or skip.dtype) if skip is not None else None
    if dy.numel() == 0:
        return dz, ds
    dummy = alpha
    sa, sbeta, sdelta = skip_coeffs if skip is not None else (dummy, dummy, dummy)
    grid, bp, bc, warps = pixel_channel_grid(n, hw, c)
    launch(_combine_grad_inputs_kernel, grid,
           (dy, z, mask, alpha, beta, delta, dz,
            skip if skip is not None else dummy, skip_scale if skip is not None else dummy,
            skip_shift if skip is not None else dummy, sa, sbeta, sdelta,
            ds if ds is not None else dummy,
            hw, c, n_conv, z.stride(0), skip.stride(0) if skip is not None else 0,
            mask.stride(0) if mask.shape[0] > 1 else 0), warps,
           SKIP_CONV=skip is not None, IS_FP64=acc_dtype(z.dtype) == torch.float64,
           BLOCK_P=bp, BLOCK_C=bc)
    return dz, ds
