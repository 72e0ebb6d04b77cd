"""Shared test fixtures: random, non-trivial blocks and the FBNet layer shapes."""
from __future__ import annotations

import torch
from torch import nn

from fbnet_fast.nn.space import SearchSpace, layer_shapes, shape_changes

# Distinct (C_in, C_out, stride) of the 224x224 FBNet space: 12 shapes covering all 22 layers.
FBNET_SHAPES = sorted({(c_in, c_out, s) for c_in, c_out, s, _ in layer_shapes(SearchSpace())},
                      key=lambda t: (t[0], t[1]))


def randomize_bn(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """Give every BN-like tensor non-default values so a wrong slice cannot pass."""
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=generator, dtype=t.dtype) + 0.5)
            elif name.endswith("running_mean") or name.endswith("bias"):
                t.copy_(torch.randn(t.shape, generator=generator, dtype=t.dtype) * 0.1)
            elif "bn" in name and name.endswith("weight"):
                t.copy_(torch.rand(t.shape, generator=generator, dtype=t.dtype) + 0.5)


def shape_id(shape) -> str:
    c_in, c_out, s = shape
    return f"{c_in}-{c_out}-s{s}" + ("-skipconv" if shape_changes(c_in, c_out, s) else "")
