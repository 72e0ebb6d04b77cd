"""Triton kernels of the fused MixedBlock (installed as ``fbnet_fast.kernels``).

One file per op family: ``pointwise`` (segmented 1x1 GEMM), ``depthwise`` (KxK depthwise
forward and backward), ``combine`` (the mask-weighted sum and its backward), ``bn`` (a BN +
ReLU's backward, in place); ``tiles``
holds the device-side pieces they share. Whether the kernels run compiled or in Triton's
CPU interpreter is fixed when this package is imported (``TRITON_INTERPRET`` is read as
the kernels are decorated).
"""
from . import bn, combine, depthwise, pointwise, utils
from .utils import interpreting

INTERPRETED = interpreting()

__all__ = ["pointwise", "depthwise", "combine", "bn", "utils", "INTERPRETED"]
