"""Launch settings shared by every kernel file (Liger's ``calculate_settings`` idea).

One place decides block sizes, warps, the accumulator type and the dot precision, so the
kernels stay free of device policy. Under ``TRITON_INTERPRET=1`` (CPU tensors) bigger
blocks mean fewer interpreted programs, which is what makes the CPU tests affordable.
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy
import torch
import triton
import triton.language as tl

MAX_FUSED_SIZE = 65536


class Launch(NamedTuple):
    """One kernel launch exactly as a launcher decided it (tile sizes, warps, flags)."""

    kernel: Any          # the @triton.jit function
    grid: tuple
    args: tuple          # the runtime arguments, in the kernel's order
    constexprs: dict     # the constexpr arguments by name
    num_warps: int


_recorded: list | None = None
_run_recorded = False


@contextmanager
def recording(run: bool = False):
    """Inside, launchers append their ``Launch`` to the yielded list, and run it only if
    ``run``. Called with meta tensors, the launchers say what they would run on a GPU
    without one: the ahead-of-time compile check (bench/triton_resources.py) compiles that.
    """
    global _recorded, _run_recorded
    previous, _recorded, _run_recorded = (_recorded, _run_recorded), [], run
    try:
        yield _recorded
    finally:
        _recorded, _run_recorded = previous


def launch(kernel, grid, args, num_warps: int, **constexprs) -> None:
    """Run one kernel (and record it, see ``recording``): every launcher launches here."""
    if _recorded is not None:
        _recorded.append(Launch(kernel, tuple(grid), tuple(args), constexprs, num_warps))
        if not _run_recorded:
            return
    kernel[grid](*args, **constexprs, num_warps=num_warps)


@triton.jit
def _loaded_bound_kernel(n_ptr, out_ptr):
    count = 0
    for _ in range(0, tl.load(n_ptr), 1):
        count += 1
    tl.store(out_ptr, count)


@functools.cache
def interpreter_problem() -> str | None:
    """Why Triton's interpreter here cannot run our kernels, else None (checked once).

    The kernels loop to bounds they read from tile tables. Older interpreters turn such a
    bound into a Python int with ``int(array)``, which numpy 2.4 refuses for a 1-element
    array (triton-lang/triton#9171, seen with triton 3.6): fail here with the remedy
    rather than deep inside the first kernel.
    """
    n = torch.tensor([3], dtype=torch.int32)
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loaded_bound_kernel[(1,)](n, out)
        if int(out[0]) == 3:
            return None
        why = f"a 3-step loop ran {int(out[0])} steps"
    except Exception as e:   # the interpreter's own error, summarised
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return (f"Triton {triton.__version__}'s CPU interpreter cannot run loops whose bound is "
            f"read from memory with numpy {numpy.__version__} ({why}); use numpy<2.4 or a "
            "Triton release with the fix for triton-lang/triton#9171")


# Read once, as the kernels are decorated (this package is imported again when the mode
# changes, fused_triton.load_kernels): the launch policy follows the mode they were built
# in, without an environment lookup on each of the ~80 calls a MixedBlock step makes.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when these kernels run in Triton's CPU interpreter."""
    return _INTERPRETED


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' grids. Plain Python: ``triton.cdiv`` and
    ``triton.next_power_of_2`` are ConstexprFunctions (Triton 3.8), whose calls from the
    host cost several microseconds each, and a MixedBlock step made about 170 of them."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The power of two >= n (1 for n <= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def channel_sums(channels: int, dtype: torch.dtype, device, wanted: bool = True) -> tuple:
    """Two zeroed per-channel accumulators (a sum and a sum of products) for an atomic
    epilogue, from one fill; without ``wanted``, two unfilled one-element placeholders (the
    kernel does not touch them). Each fill is a launch on a GPU, where small maps wait on
    the host."""
    t = (torch.zeros(2, channels, dtype=dtype, device=device) if wanted
         else torch.empty(2, 1, dtype=dtype, device=device))
    return t[0], t[1]


def calculate_settings(n: int) -> tuple:
    """(BLOCK_SIZE, num_warps) for a 1-D tile covering ``n`` elements."""
    block = next_pow2(n)
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
    return max(lo, min(hi, next_pow2(n)))


def gemm_blocks(m: int, n: int, k: int) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for the pointwise GEMMs; tl.dot needs every side >= 16."""
    if interpreting():  # each interpreted program costs a fixed overhead: few, big ones
        return pow2_clamp(m, 16, 512), pow2_clamp(n, 16, 512), pow2_clamp(k, 16, 512)
    return pow2_clamp(m, 16, 128), pow2_clamp(n, 16, 64), pow2_clamp(k, 16, 32)


def gemm_warps(block_m: int, block_n: int) -> int:
    """Warps for a GEMM tile: at most 8, since 16 warps leave 128 registers a thread and
    the IEEE fp32 dots spill at 128x64 (bench/RESULTS.md, "Triton kernels compiled")."""
    return min(8, num_warps_for(block_m * block_n))


def ieee_fp32_dots(dtype: torch.dtype) -> bool:
    """True when tl.dot runs float32 without TF32 on a GPU: on the FMA units, with the
    operand tiles in registers."""
    return dtype == torch.float32 and dot_precision(dtype) == "ieee" and not interpreting()


def tile_blocks(pixels: int, channels: int) -> tuple:
    """(BLOCK_P, BLOCK_C) for pixel x channel tiles (depthwise, combine); NHWC: C fastest."""
    if interpreting():
        return pow2_clamp(pixels, 1, 64), pow2_clamp(channels, 1, 1024)
    return pow2_clamp(pixels, 1, 64), pow2_clamp(channels, 1, 64)


def pixel_channel_grid(n: int, pixels: int, channels: int) -> tuple:
    """(grid, BLOCK_P, BLOCK_C, num_warps) of a kernel tiled by ``tiles.pixel_channel_tile``
    over ``n`` images of ``pixels`` rows (one image: plain rows)."""
    bp, bc = tile_blocks(pixels, channels)
    return (n * cdiv(pixels, bp), cdiv(channels, bc)), bp, bc, num_warps_for(bp * bc)


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
