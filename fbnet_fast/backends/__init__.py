"""The implementations of ``MixedBlock``'s forward and the one place that picks among them.

``registry.py`` picks a family (reference, cpu, triton, cuda) per module and device;
``reference.py`` is the plain PyTorch supernet layer; ``plan.py`` holds what every fused
family derives from a layer's parameter layout; ``fused_*.py`` are the adapters that run
their kernels (C++ in csrc/, Triton in kernels/) on that plan; ``jit.py`` builds the C++
and CUDA libraries on first use and ``ops.py`` wraps the C++ ops. See docs/architecture.md.
"""
from .registry import available, get_backend, set_backend

__all__ = ["available", "get_backend", "set_backend"]
