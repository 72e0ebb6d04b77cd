"""Segmented 1x1 convolution (a GEMM over NHWC rows) for all candidates at once.

x is Tensor[M, C_x] (M = N*H*W rows, channels contiguous). The output columns are cut
into *segments*; segment s computes ``y[:, out] = prologue(x)[:, in] @ W_s^T`` with W_s a
row-major [out_len, in_len] block of a flat weight. One segment with a dense weight is the
first pointwise of every candidate together (grouped ones block-diagonal, the channel
shuffle folded into the row order); one segment per (candidate, group) is the second.

Prologue: ``relu(x * scale + shift)`` per input channel (the previous BN + ReLU, applied
on load). Epilogue: per output channel sum and sum of squares (the next BN's statistics).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from .tiles import add_channel_stats, aligned_columns
from .utils import (acc_dtype, cdiv, channel_sums, check_nhwc, dot_precision, gemm_blocks,
                    gemm_warps, ieee_fp32_dots, interpreting, launch)

__all__ = ["Segment", "pointwise_forward", "pointwise_grad_input", "pointwise_grad_weight"]


@dataclass(frozen=True)
class Segment:
    """Output columns [out_start, +out_len) read input columns [in_start, +in_len) through
    the row-major weight block at ``w_offset`` (out_len x in_len elements). The kernels
    read only these fields: the fused plan's ``Segment`` is passed as it is."""

    out_start: int
    out_len: int
    in_start: int
    in_len: int
    w_offset: int


@triton.jit
def _pointwise_fwd_kernel(
    x_ptr, w_ptr, y_ptr, scale_ptr, shift_ptr, sum_ptr, sumsq_ptr, tiles_ptr,
    M, ldx, ldy,
    PROLOGUE: tl.constexpr, STATS: tl.constexpr, IS_FP64: tl.constexpr,
    PRECISION: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    ACC = tl.float64 if IS_FP64 else tl.float32
    pid_m = tl.program_id(0)
    t = tiles_ptr + tl.program_id(1) * 7
    o0, o1, i0, ilen = aligned_columns(t, ALIGN)
    ldx = tl.multiple_of(ldx, ALIGN)
    ldy = tl.multiple_of(ldy, ALIGN)
    woff = tl.load(t + 4)
    w_so = tl.load(t + 5)
    w_sr = tl.load(t + 6)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = o0 + rn < o1
    rows = rm.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k in range(0, ilen, BLOCK_K):
        rk = k + tl.arange(0, BLOCK_K)
        mask_k = rk < ilen
        xmask = mask_m[:, None] & mask_k[None, :]
        xv = tl.load(x_ptr + rows[:, None] * ldx + (i0 + rk)[None, :], mask=xmask, other=0.0)
        wv = tl.load(w_ptr + woff + rn[None, :] * w_so + rk[:, None] * w_sr,
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if PROLOGUE:
            sc = tl.load(scale_ptr + i0 + rk, mask=mask_k, other=0.0)
            sh = tl.load(shift_ptr + i0 + rk, mask=mask_k, other=0.0)
            xa = tl.maximum(xv.to(ACC) * sc[None, :] + sh[None, :], 0.0)
            xv = tl.where(xmask, xa, 0.0).to(wv.dtype)
        acc += tl.dot(xv.to(wv.dtype), wv, input_precision=PRECISION, out_dtype=ACC)
    cols = o0 + rn
    ymask = mask_m[:, None] & mask_n[None, :]
    tl.store(y_ptr + rows[:, None] * ldy + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=ymask)
    if STATS:
        add_channel_stats(sum_ptr, sumsq_ptr, acc, ymask, cols, mask_n)


@triton.jit
def _pointwise_grad_weight_kernel(
    g_ptr, x_ptr, dw_ptr, scale_ptr, shift_ptr, tiles_ptr,
    M, ldg, ldx, rows_per_split,
    PROLOGUE: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # dW[o, r] += sum over this program's rows of g[m, o] * prologue(x)[m, r]
    ACC = tl.float64 if IS_FP64 else tl.float32
    t = tiles_ptr + tl.program_id(0) * 6
    g0, g1, x0, x1 = aligned_columns(t, ALIGN)
    ldg = tl.multiple_of(ldg, ALIGN)
    ldx = tl.multiple_of(ldx, ALIGN)
    woff = tl.load(t + 4)
    w_so = tl.load(t + 5)
    ro = tl.arange(0, BLOCK_O)
    rr = tl.arange(0, BLOCK_R)
    mask_o = g0 + ro < g1
    mask_r = x0 + rr < x1
    if PROLOGUE:
        sc = tl.load(scale_ptr + x0 + rr, mask=mask_r, other=0.0)
        sh = tl.load(shift_ptr + x0 + rr, mask=mask_r, other=0.0)
    m_begin = tl.program_id(1) * rows_per_split
    acc = tl.zeros((BLOCK_O, BLOCK_R), dtype=ACC)
    for m in range(m_begin, m_begin + rows_per_split, BLOCK_M):
        rm = m + tl.arange(0, BLOCK_M)
        mask_m = rm < M
        rows = rm.to(tl.int64)
        gv = tl.load(g_ptr + rows[:, None] * ldg + (g0 + ro)[None, :],
                     mask=mask_m[:, None] & mask_o[None, :], other=0.0)
        xmask = mask_m[:, None] & mask_r[None, :]
        xv = tl.load(x_ptr + rows[:, None] * ldx + (x0 + rr)[None, :], mask=xmask, other=0.0)
        if PROLOGUE:
            xa = tl.maximum(xv.to(ACC) * sc[None, :] + sh[None, :], 0.0)
            xv = tl.where(xmask, xa, 0.0).to(gv.dtype)
        acc += tl.dot(tl.trans(gv), xv.to(gv.dtype), input_precision=PRECISION, out_dtype=ACC)
    tl.atomic_add(dw_ptr + woff + ro[:, None] * w_so + rr[None, :], acc,
                  mask=mask_o[:, None] & mask_r[None, :])


def _align(*values: int) -> int:
    """The largest power of two, at most 16, dividing every value: the ALIGN of a launch.

    Column offsets and bounds loaded from the tile table, and row strides that are not
    multiples of 16, are unknown to the compiler, which then moves one element at a time
    (4-byte cp.async and scalar stores on sm_90); ``tl.multiple_of`` passes it what the
    host knows."""
    g = math.gcd(*values)
    align = 16
    while align > 1 and g % align:
        align //= 2
    return align


def _tile_table(rows: list, device: str) -> tuple:
    """(the tile rows as an int32 tensor, the gcd of their column offsets and bounds)."""
    return (torch.tensor(rows, dtype=torch.int32, device=device),
            math.gcd(*(v for r in rows for v in r[:4])))


@lru_cache(maxsize=512)
def _fwd_tiles(segments: tuple, block_n: int, transpose: bool, device: str) -> tuple:
    """(tile table, gcd of its column offsets and bounds)."""
    rows = []
    for s in segments:
        if not transpose:   # y[:, out] = x[:, in] @ W^T
            for o in range(0, s.out_len, block_n):
                rows.append((s.out_start + o, s.out_start + s.out_len, s.in_start, s.in_len,
                             s.w_offset + o * s.in_len, s.in_len, 1))
        else:               # dx[:, in] = dy[:, out] @ W
            for o in range(0, s.in_len, block_n):
                rows.append((s.in_start + o, s.in_start + s.in_len, s.out_start, s.out_len,
                             s.w_offset + o, 1, s.in_len))
    return _tile_table(rows, device)


@lru_cache(maxsize=512)
def _grad_weight_tiles(segments: tuple, block_o: int, block_r: int, device: str) -> tuple:
    """(tile table, gcd of its column offsets and bounds)."""
    rows = []
    for s in segments:
        for o in range(0, s.out_len, block_o):
            for r in range(0, s.in_len, block_r):
                rows.append((s.out_start + o, s.out_start + s.out_len, s.in_start + r,
                             s.in_start + s.in_len, s.w_offset + o * s.in_len + r, s.in_len))
    return _tile_table(rows, device)


def _check_segments(segments, x_cols: int, out_cols: int, w_numel: int) -> tuple:
    segments = tuple(segments)
    if not segments:
        raise ValueError("pointwise: at least one segment is needed")
    for s in segments:
        if s.in_start + s.in_len > x_cols or s.out_start + s.out_len > out_cols:
            raise ValueError(f"pointwise: segment {s} exceeds the {x_cols} input / "
                             f"{out_cols} output channels")
        if s.w_offset + s.out_len * s.in_len > w_numel:
            raise ValueError(f"pointwise: segment {s} exceeds the weight's {w_numel} elements")
    return segments


def _vec(t, n, dtype, device):
    return t if t is not None else torch.empty(n or 1, dtype=dtype, device=device)


def pointwise_forward(x, w, segments, out_channels, scale=None, shift=None, stats=False,
                      out_dtype=None):
    """y (Tensor[M, out_channels]) from x (Tensor[M, C]) and flat w; with ``stats`` also
    the per-column sum and sum of squares (accumulator dtype). Columns no segment
    covers are left uninitialised. Returns (y, sum, sumsq) (None, None without stats)."""
    check_nhwc("pointwise x", x)
    segments = _check_segments(segments, x.shape[1], out_channels, w.numel())
    prologue = scale is not None
    M = x.shape[0]
    acc = acc_dtype(x.dtype)
    y = torch.empty(M, out_channels, dtype=out_dtype or x.dtype, device=x.device)
    s1, s2 = channel_sums(out_channels, acc, x.device, stats)
    max_out = max(s.out_len for s in segments)
    max_in = max(s.in_len for s in segments)
    bm, bn, bk = fwd_blocks(M, max_out, max_in, w.dtype)
    tiles, cols = _fwd_tiles(segments, bn, False, str(x.device))
    if M > 0:
        launch(_pointwise_fwd_kernel, (cdiv(M, bm), tiles.shape[0]),
               (x, w, y, _vec(scale, 1, acc, x.device), _vec(shift, 1, acc, x.device), s1, s2,
                tiles, M, x.stride(0), y.stride(0)), gemm_warps(bm, bn),
               PROLOGUE=prologue, STATS=stats, IS_FP64=acc == torch.float64,
               PRECISION=dot_precision(w.dtype), ALIGN=_align(cols, x.stride(0), y.stride(0)),
               BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return (y, s1, s2) if stats else (y, None, None)


def pointwise_grad_input(dy, w, segments, in_channels, out_dtype=None):
    """dx (Tensor[M, in_channels]) = dy @ W for every segment (inputs no segment reads
    are zero). Each input column may be read by one segment only."""
    check_nhwc("pointwise dy", dy)
    segments = _check_segments(segments, in_channels, dy.shape[1], w.numel())
    spans = sorted((s.in_start, s.in_start + s.in_len) for s in segments)
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        raise ValueError("pointwise_grad_input: segments read overlapping input columns; "
                         "sum one call per segment instead")
    M = dy.shape[0]
    acc = acc_dtype(dy.dtype)
    covered = sum(s.in_len for s in segments)
    alloc = torch.empty if covered >= in_channels else torch.zeros
    dx = alloc(M, in_channels, dtype=out_dtype or dy.dtype, device=dy.device)
    bm, bn, bk = fwd_blocks(M, max(s.in_len for s in segments), max(s.out_len for s in segments),
                            w.dtype)
    tiles, cols = _fwd_tiles(segments, bn, True, str(dy.device))
    if M > 0:
        dummy = torch.empty(1, dtype=acc, device=dy.device)
        launch(_pointwise_fwd_kernel, (cdiv(M, bm), tiles.shape[0]),
               (dy, w, dx, dummy, dummy, dummy, dummy, tiles, M, dy.stride(0), dx.stride(0)),
               gemm_warps(bm, bn), PROLOGUE=False, STATS=False,
               IS_FP64=acc == torch.float64, PRECISION=dot_precision(w.dtype),
               ALIGN=_align(cols, dy.stride(0), dx.stride(0)), BLOCK_M=bm, BLOCK_N=bn,
               BLOCK_K=bk)
    return dx


def _row_splits(M: int, block_m: int, tiles: int) -> tuple:
    """Split the row reduction so that the grid has enough programs to fill a GPU."""
    blocks = cdiv(max(M, 1), block_m)
    want = 1 if tiles >= 256 else max(1, 512 // max(tiles, 1))
    if interpreting():
        want = 1
    splits = min(blocks, want)
    per = cdiv(blocks, splits) * block_m
    return cdiv(max(M, 1), per), per


def fwd_blocks(rows: int, out_len: int, in_len: int, dtype: torch.dtype) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of y = x @ W^T (and of dx = dy @ W). IEEE float32 dots
    spill 16-40 B a thread at 128 x 64 x 32: 64 rows then."""
    bm, bn, bk = gemm_blocks(rows, out_len, in_len)
    return (min(bm, 64) if ieee_fp32_dots(dtype) else bm), bn, bk


def grad_weight_blocks(rows: int, out_len: int, in_len: int, dtype: torch.dtype) -> tuple:
    """(BLOCK_M, BLOCK_O, BLOCK_R) of dW = dy^T @ x, reducing over BLOCK_M rows a step.
    128 rows spill 2-4 KB a thread with IEEE float32 dots, and need up to 229 KB of shared
    memory in float64 (over sm_80's 163 KB): 32 rows then."""
    bm, bo, br = gemm_blocks(rows, out_len, in_len)
    if ieee_fp32_dots(dtype) or (dtype == torch.float64 and not interpreting()):
        bm = min(bm, 32)
    return bm, bo, br


def pointwise_grad_weight(dy, x, segments, w_numel, scale=None, shift=None):
    """Flat dW (accumulator dtype, w_numel elements) = dy^T @ prologue(x) per segment."""
    check_nhwc("pointwise dy", dy)
    check_nhwc("pointwise x", x)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"pointwise: dy has {dy.shape[0]} rows but x has {x.shape[0]}")
    segments = _check_segments(segments, x.shape[1], dy.shape[1], w_numel)
    M = x.shape[0]
    acc = acc_dtype(x.dtype)
    dw = torch.zeros(w_numel, dtype=acc, device=x.device)
    bm, bo, br = grad_weight_blocks(M, max(s.out_len for s in segments),
                                    max(s.in_len for s in segments), x.dtype)
    tiles, cols = _grad_weight_tiles(segments, bo, br, str(x.device))
    splits, per = _row_splits(M, bm, tiles.shape[0])
    if M > 0:
        launch(_pointwise_grad_weight_kernel, (tiles.shape[0], splits),
               (dy, x, dw, _vec(scale, 1, acc, x.device), _vec(shift, 1, acc, x.device), tiles,
                M, dy.stride(0), x.stride(0), per), gemm_warps(bo, br),
               PROLOGUE=scale is not None, IS_FP64=acc == torch.float64,
               PRECISION=dot_precision(x.dtype), ALIGN=_align(cols, dy.stride(0), x.stride(0)),
               BLOCK_M=bm, BLOCK_O=bo, BLOCK_R=br)
    return dw
