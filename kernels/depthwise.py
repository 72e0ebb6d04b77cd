"""Depthwise KxK convolution over NHWC rows: forward, grad-input and grad-weight.

x is Tensor[N*H*W, C_x] (channels contiguous); pad = K // 2, stride 1 or 2. The channels
are processed as *runs* of consecutive channels sharing one kernel size (all 3x3
candidates, then all 5x5 ones), so one launch per run covers every candidate.

Forward prologue: ``relu(x * scale + shift)`` per channel, applied on load (zero padding
is applied after it, as in the unfused block); epilogue: per-channel sum / sum of squares.
Grad-input epilogue: mask by the ReLU of the prologue and reduce the BN backward sums.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..nn.space import conv_out   # the one output-size rule (kernels/ is fbnet_fast.kernels)
from .tiles import add_channel_stats, pixel_channel_tile
from .utils import (acc_dtype, cdiv, channel_sums, check_nhwc, interpreting, launch,
                    next_pow2, num_warps_for, tile_blocks)

__all__ = ["DwRun", "depthwise_forward", "depthwise_grad_input",
           "depthwise_grad_weight"]

# Programs along the pixels of the grad-weight: each loops over its share of pixel blocks
# and adds its [taps, channels] partial sum once (fewer programs, fewer atomics).
WEIGHT_GRAD_PROGRAMS = 512


@dataclass(frozen=True)
class DwRun:
    """Channels [channel_start, +channels) use kernel ``kernel``; their weights are the
    row-major [channels, kernel*kernel] block at ``w_offset`` of the flat weight. The
    kernels read only these fields: the fused plan's ``DwRun`` is passed as it is."""

    channel_start: int
    channels: int
    kernel: int
    w_offset: int


@triton.jit
def _dw_fwd_kernel(
    x_ptr, w_ptr, y_ptr, scale_ptr, shift_ptr, sum_ptr, sumsq_ptr,
    H, W, Ho, Wo, ldc, c0, C, w_off,
    STRIDE: tl.constexpr, K: tl.constexpr, PROLOGUE: tl.constexpr, STATS: tl.constexpr,
    IS_FP64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    ACC = tl.float64 if IS_FP64 else tl.float32
    PAD: tl.constexpr = K // 2
    n, p, mask_p, cc, mask_c = pixel_channel_tile(Ho * Wo, C, BLOCK_P, BLOCK_C)
    oh = p // Wo
    ow = p % Wo
    ch = c0 + cc
    if PROLOGUE:
        sc = tl.load(scale_ptr + ch, mask=mask_c, other=0.0)
        sh = tl.load(shift_ptr + ch, mask=mask_c, other=0.0)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for kh in tl.static_range(K):
        ih = oh * STRIDE - PAD + kh
        for kw in tl.static_range(K):
            iw = ow * STRIDE - PAD + kw
            ok = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            m2 = ok[:, None] & mask_c[None, :]
            rows = ((n * H + ih) * W + iw).to(tl.int64)
            xv = tl.load(x_ptr + rows[:, None] * ldc + ch[None, :], mask=m2, other=0.0).to(ACC)
            if PROLOGUE:
                xv = tl.where(m2, tl.maximum(xv * sc[None, :] + sh[None, :], 0.0), 0.0)
            wv = tl.load(w_ptr + w_off + cc * (K * K) + (kh * K + kw), mask=mask_c, other=0.0)
            acc += xv * wv.to(ACC)[None, :]
    ymask = mask_p[:, None] & mask_c[None, :]
    orows = (n * Ho * Wo + p).to(tl.int64)
    tl.store(y_ptr + orows[:, None] * ldc + ch[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=ymask)
    if STATS:
        add_channel_stats(sum_ptr, sumsq_ptr, acc, ymask, ch, mask_c)


@triton.jit
def _dw_grad_input_kernel(
    dy_ptr, w_ptr, dx_ptr, a_ptr, scale_ptr, shift_ptr, sum_ptr, sumxa_ptr,
    H, W, Ho, Wo, ldc, c0, C, w_off,
    STRIDE: tl.constexpr, K: tl.constexpr, RELU_BN_EPILOGUE: tl.constexpr,
    IS_FP64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # dx[ih, iw] = sum over taps of dy[oh, ow] * w[tap] with ih = oh*S - PAD + kh
    ACC = tl.float64 if IS_FP64 else tl.float32
    PAD: tl.constexpr = K // 2
    n, p, mask_p, cc, mask_c = pixel_channel_tile(H * W, C, BLOCK_P, BLOCK_C)
    ih = p // W
    iw = p % W
    ch = c0 + cc
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for kh in tl.static_range(K):
        th = ih + PAD - kh
        oh = th // STRIDE
        ok_h = (th >= 0) & (th % STRIDE == 0) & (oh < Ho)
        for kw in tl.static_range(K):
            tw = iw + PAD - kw
            ow = tw // STRIDE
            ok = mask_p & ok_h & (tw >= 0) & (tw % STRIDE == 0) & (ow < Wo)
            m2 = ok[:, None] & mask_c[None, :]
            rows = ((n * Ho + oh) * Wo + ow).to(tl.int64)
            g = tl.load(dy_ptr + rows[:, None] * ldc + ch[None, :], mask=m2, other=0.0).to(ACC)
            wv = tl.load(w_ptr + w_off + cc * (K * K) + (kh * K + kw), mask=mask_c, other=0.0)
            acc += g * wv.to(ACC)[None, :]
    xmask = mask_p[:, None] & mask_c[None, :]
    irows = (n * H * W + p).to(tl.int64)
    if RELU_BN_EPILOGUE:
        av = tl.load(a_ptr + irows[:, None] * ldc + ch[None, :], mask=xmask, other=0.0).to(ACC)
        sc = tl.load(scale_ptr + ch, mask=mask_c, other=0.0)
        sh = tl.load(shift_ptr + ch, mask=mask_c, other=0.0)
        live = xmask & (av * sc[None, :] + sh[None, :] > 0)
        acc = tl.where(live, acc, 0.0)
        tl.atomic_add(sum_ptr + ch, tl.sum(acc, axis=0), mask=mask_c)
        tl.atomic_add(sumxa_ptr + ch, tl.sum(acc * av, axis=0), mask=mask_c)
    tl.store(dx_ptr + irows[:, None] * ldc + ch[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=xmask)


@triton.jit
def _dw_grad_weight_kernel(
    dy_ptr, x_ptr, dw_ptr, scale_ptr, shift_ptr,
    N, H, W, Ho, Wo, ldc, c0, C, w_off, pblocks_per_prog,
    STRIDE: tl.constexpr, K: tl.constexpr, TAPS: tl.constexpr, PROLOGUE: tl.constexpr,
    IS_FP64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # All K*K taps in one program, as a [TAPS, BLOCK_P, BLOCK_C] tile: dy's tile is loaded
    # once and x's shifted tiles overlap, so neighbouring taps read the same lines from L1.
    # With one tap per program, the K*K programs of a tile each read dy and x through L2:
    # 9 + 25 sweeps of the tensor pair, about 38 GB at the first layer, 8.4 ms of a 30 ms
    # step on an H200 where the pair's own bytes take 0.5 ms (bench/RESULTS.md).
    ACC = tl.float64 if IS_FP64 else tl.float32
    PAD: tl.constexpr = K // 2
    t = tl.arange(0, TAPS)
    kh = t // K
    kw = t % K
    mask_t = t < K * K
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cc < C
    ch = c0 + cc
    if PROLOGUE:
        sc = tl.load(scale_ptr + ch, mask=mask_c, other=0.0)
        sh = tl.load(shift_ptr + ch, mask=mask_c, other=0.0)
    pblocks = tl.cdiv(Ho * Wo, BLOCK_P)
    acc = tl.zeros((TAPS, BLOCK_C), dtype=ACC)
    first = tl.program_id(0) * pblocks_per_prog
    for b in range(first, first + pblocks_per_prog):
        n = b // pblocks
        p = (b % pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = (p < Ho * Wo) & (n < N)
        orows = (n * Ho * Wo + p).to(tl.int64)
        g = tl.load(dy_ptr + orows[:, None] * ldc + ch[None, :],
                    mask=mask_p[:, None] & mask_c[None, :], other=0.0).to(ACC)
        ih = (p // Wo)[None, :] * STRIDE - PAD + kh[:, None]            # [TAPS, BLOCK_P]
        iw = (p % Wo)[None, :] * STRIDE - PAD + kw[:, None]
        ok = mask_t[:, None] & mask_p[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        m3 = ok[:, :, None] & mask_c[None, None, :]
        irows = ((n * H + ih) * W + iw).to(tl.int64)
        xv = tl.load(x_ptr + irows[:, :, None] * ldc + ch[None, None, :], mask=m3,
                     other=0.0).to(ACC)
        if PROLOGUE:
            xv = tl.where(m3, tl.maximum(xv * sc[None, None, :] + sh[None, None, :], 0.0), 0.0)
        acc += tl.sum(g[None, :, :] * xv, axis=1)
    tl.atomic_add(dw_ptr + w_off + cc[None, :] * (K * K) + t[:, None], acc,
                  mask=mask_t[:, None] & mask_c[None, :])


def weight_grad_tile(pixels: int, channels: int, kernel: int) -> tuple:
    """(TAPS, BLOCK_P, BLOCK_C, num_warps) of the grad-weight, whose tile holds every tap: at
    most 4096 elements on a GPU (32 registers a thread at 4 warps for the loaded x)."""
    taps = next_pow2(kernel * kernel)
    bp, bc = tile_blocks(pixels, channels)
    if interpreting():              # numpy arrays: any size, fewer Python-level iterations
        limit, warps = 1 << 18, 4
    else:
        limit, warps, bc = 4096, 4, min(bc, 32)
    return taps, max(1, min(bp, limit // (taps * bc))), bc, warps


def tap_tile(pixels: int, channels: int, kernel: int, dtype: torch.dtype,
             warps: int = 4) -> tuple:
    """(BLOCK_P, BLOCK_C, num_warps) of the forward (8 warps) and grad-input (4), whose K*K
    taps are unrolled, for tensors of ``dtype``. One 128-byte line a pixel (32 fp32 channels)
    beat two on an H200 (bench/gpu_dw_tiles.py at the first layer). On sm_90 ptxas spills
    once a thread holds more than 16 accumulators at K = 3 or 8 at K = 5 (half in float64)."""
    bp, bc = tile_blocks(pixels, channels)
    if interpreting():
        return bp, bc, num_warps_for(bp * bc)
    bc = min(bc, 128 // dtype.itemsize)
    per_thread = (16 if kernel <= 3 else 8) // (2 if dtype == torch.float64 else 1)
    return max(1, min(next_pow2(pixels), per_thread * 32 * warps // bc)), bc, warps


def _check(name, x, rows, runs):
    check_nhwc(name, x)
    if x.shape[0] != rows:
        raise ValueError(f"depthwise: {name} has {x.shape[0]} rows, expected N*H*W = {rows}")
    for r in runs:
        if r.kernel % 2 != 1 or r.channel_start + r.channels > x.shape[1]:
            raise ValueError(f"depthwise: bad run {r} for {x.shape[1]} channels "
                             "(odd kernel sizes only)")


def _acc_vec(t, x):
    return t if t is not None else torch.empty(1, dtype=acc_dtype(x.dtype), device=x.device)


def depthwise_forward(x, w, n, h, wd, stride, runs, scale=None, shift=None, stats=False):
    """y (Tensor[N*Ho*Wo, C]) = depthwise(prologue(x)); with ``stats`` also per-channel
    sum and sum of squares. Returns (y, sum, sumsq)."""
    if stride not in (1, 2):
        raise ValueError(f"depthwise: stride must be 1 or 2, got {stride}")
    _check("x", x, n * h * wd, runs)
    ho, wo = conv_out(h, stride), conv_out(wd, stride)
    acc = acc_dtype(x.dtype)
    y = torch.empty(n * ho * wo, x.shape[1], dtype=x.dtype, device=x.device)
    s1, s2 = channel_sums(x.shape[1], acc, x.device, stats)
    for r in runs:
        bp, bc, warps = tap_tile(ho * wo, r.channels, r.kernel, x.dtype, warps=8)
        grid = (n * cdiv(ho * wo, bp), cdiv(r.channels, bc))
        launch(_dw_fwd_kernel, grid,
               (x, w, y, _acc_vec(scale, x), _acc_vec(shift, x), s1, s2,
                h, wd, ho, wo, x.stride(0), r.channel_start, r.channels, r.w_offset),
               warps, STRIDE=stride, K=r.kernel, PROLOGUE=scale is not None,
               STATS=stats, IS_FP64=acc == torch.float64, BLOCK_P=bp, BLOCK_C=bc)
    return (y, s1, s2) if stats else (y, None, None)


def depthwise_grad_input(dy, w, n, h, wd, stride, runs, a=None, scale=None, shift=None):
    """dx (Tensor[N*H*W, C]). With ``a`` (the pre-BN input) and its scale/shift, dx is
    masked by the forward ReLU and (dx, sum(dx), sum(dx * a)) is returned, else (dx,)."""
    ho, wo = conv_out(h, stride), conv_out(wd, stride)
    _check("dy", dy, n * ho * wo, runs)
    acc = acc_dtype(dy.dtype)
    epi = a is not None
    if epi:
        _check("a", a, n * h * wd, runs)
    dx = torch.empty(n * h * wd, dy.shape[1], dtype=dy.dtype, device=dy.device)
    s1, s2 = channel_sums(dy.shape[1], acc, dy.device, epi)
    for r in runs:
        bp, bc, warps = tap_tile(h * wd, r.channels, r.kernel, dy.dtype)
        grid = (n * cdiv(h * wd, bp), cdiv(r.channels, bc))
        launch(_dw_grad_input_kernel, grid,
               (dy, w, dx, a if epi else dy, _acc_vec(scale, dy), _acc_vec(shift, dy), s1, s2,
                h, wd, ho, wo, dy.stride(0), r.channel_start, r.channels, r.w_offset),
               warps, STRIDE=stride, K=r.kernel, RELU_BN_EPILOGUE=epi,
               IS_FP64=acc == torch.float64, BLOCK_P=bp, BLOCK_C=bc)
    return (dx, s1, s2) if epi else (dx,)


def depthwise_grad_weight(dy, x, n, h, wd, stride, runs, w_numel, scale=None, shift=None):
    """Flat dW (accumulator dtype) = sum over pixels of dy * shifted prologue(x)."""
    ho, wo = conv_out(h, stride), conv_out(wd, stride)
    _check("dy", dy, n * ho * wo, runs)
    _check("x", x, n * h * wd, runs)
    acc = acc_dtype(x.dtype)
    dw = torch.zeros(w_numel, dtype=acc, device=x.device)
    for r in runs:
        taps, bp, bc, warps = weight_grad_tile(ho * wo, r.channels, r.kernel)
        total = n * cdiv(ho * wo, bp)
        per = total if interpreting() else max(1, cdiv(total, WEIGHT_GRAD_PROGRAMS))
        grid = (cdiv(total, per), cdiv(r.channels, bc))
        launch(_dw_grad_weight_kernel, grid,
               (dy, x, dw, _acc_vec(scale, x), _acc_vec(shift, x),
                n, h, wd, ho, wo, x.stride(0), r.channel_start, r.channels, r.w_offset, per),
               warps, STRIDE=stride, K=r.kernel, TAPS=taps, PROLOGUE=scale is not None,
               IS_FP64=acc == torch.float64, BLOCK_P=bp, BLOCK_C=bc)
    return dw
