"""Launch settings shared by every kernel file (Liger's ``calculate_settings`` idea).

One place decides block sizes, warps, the accumulator type and the dot precision, so the
kernels stay free of device policy. Under ``TRITON_INTERPRET=1`` (CPU tensors) bigger
blocks mean fewer interpreted programs, which is what makes the CPU tests affordable.
"""
from __future__ import annotations

import os

import torch
import triton

MAX_FUSED_SIZE = 65536


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (read at kernel decoration)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def calculate_settings(n: int) -> tuple:
    """(BLOCK_SIZE, num_warps) for a 1-D tile covering ``n`` elements."""
    block = triton.next_power_of_2(max(int(n), 1))
    if block > MAX_FUSED_SIZE:
        raise RuntimeError(
            f"cannot launch a tile of {n} elements: the maximum is {MAX_FUSED_SIZE}")
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, num_warps


def pow2_clamp(n: int, lo: int, hi: int) -> int:
    """The power of two >= ``n``, kept inside [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def gemm_blocks(m: int, n: int, k: int) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for the pointwise GEMMs; tl.dot needs every side >= 16."""
    if interpreting():  # each interpreted program costs a fixed overhead: few, big ones
        return pow2_clamp(m, 16, 512), pow2_clamp(n, 16, 512), pow2_clamp(k, 16, 512)
    return pow2_clamp(m, 16, 128), pow2_clamp(n, 16, 64), pow2_clamp(k, 16, 32)


def tile_blocks(pixels: int, channels: int) -> tuple:
    """(BLOCK_P, BLOCK_C) for pixel x channel tiles (depthwise, combine); NHWC: C fastest."""
    if interpreting():
        return pow2_clamp(pixels, 1, 64), pow2_clamp(channels, 1, 1024)
    return pow2_clamp(pixels, 1, 64), pow2_clamp(channels, 1, 64)


def num_warps_for(tile_elems: int) -> int:
    return calculate_settings(tile_elems)[1] if tile_elems <= MAX_FUSED_SIZE else 8


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in float32, or float64 for float64 tensors (the tests' exact mode)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: follow torch's TF32 switch for float32 convolutions."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


def check_nhwc(name: str, t: torch.Tensor, channels: int | None = None) -> None:
    """Kernels read rows of contiguous channels: refuse anything else with a clear message."""
    if t.dim() != 2 or t.stride(1) != 1:
        raise ValueError(f"{name} must be a 2-D [rows, channels] tensor with contiguous "
                         f"channels, got shape {tuple(t.shape)} strides {t.stride()}")
    if channels is not None and t.shape[1] < channels:
        raise ValueError(f"{name} has {t.shape[1]} channels, needs at least {channels}")
