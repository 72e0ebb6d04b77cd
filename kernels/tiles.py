"""Device-side pieces every pixel x channel kernel shares (inlined by ``triton.jit``).

The grid of those kernels is (N * pixel blocks, channel blocks): axis 0 walks the images
and, inside each, blocks of BLOCK_P pixels; axis 1 walks blocks of BLOCK_C channels.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pixel_channel_tile(P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """(n, p, mask_p, c, mask_c): this program's image, pixel indices and channel indices
    within an image of P pixels and C channels, with their bounds masks."""
    pblocks = tl.cdiv(P, BLOCK_P)
    n = tl.program_id(0) // pblocks
    p = (tl.program_id(0) % pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return n, p, p < P, c, c < C


@triton.jit
def add_channel_stats(sum_ptr, sumsq_ptr, acc, valid, cols, mask_cols):
    """sum_ptr[cols] += column sums of acc, sumsq_ptr[cols] += of acc**2 (valid entries):
    the next BN's batch statistics, taken while the tile is still in registers."""
    a = tl.where(valid, acc, 0.0)
    tl.atomic_add(sum_ptr + cols, tl.sum(a, axis=0), mask=mask_cols)
    tl.atomic_add(sumsq_ptr + cols, tl.sum(a * a, axis=0), mask=mask_cols)


@triton.jit
def aligned_columns(t, ALIGN: tl.constexpr):
    """The first four entries of a tile-table row at ``t`` (column offsets and bounds), each
    declared a multiple of ALIGN, which the launcher checked (``pointwise._align``)."""
    return (tl.multiple_of(tl.load(t), ALIGN), tl.multiple_of(tl.load(t + 1), ALIGN),
            tl.multiple_of(tl.load(t + 2), ALIGN), tl.multiple_of(tl.load(t + 3), ALIGN))
