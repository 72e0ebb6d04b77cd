"""Check a ``MixedBlock`` backend against the reference: the tests, bench/ and anyone
writing a backend of their own use these, so every backend is held to the same checks.

    block, ref = make_pair("cpu", 24, 32, 2)             # same random state, two backends
    compare(block, ref, size=5, per_example=True, channels_last=True)

``LAYER_SHAPES`` is the one list of FBNet layer shapes, ``randomize`` the one way to give
a module non-trivial state (a wrong slice of a default ``ones``/``zeros`` tensor would go
unnoticed), ``run_pair`` runs both blocks on one random input, mask and output gradient,
and ``compare`` asserts that everything the two produce (output, its memory format, the
gradient of the input, of the mask and of every parameter, the BN running statistics
after the step) is the same. This module sits at the top layer: nothing in the package
imports it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from .nn.mixed_block import MixedBlock
from .nn.space import SearchSpace, layer_shapes, shape_changes

__all__ = ["LAYER_SHAPES", "shape_id", "randomize", "make_pair", "PairRun", "run_pair",
           "compare", "single_thread"]

# Every distinct (C_in, C_out, stride) of the 224x224 FBNet space: 12 shapes covering all
# 22 layers, narrowest first.
LAYER_SHAPES = sorted({(c_in, c_out, s) for c_in, c_out, s, _ in layer_shapes(SearchSpace())})


def shape_id(shape: Sequence[int]) -> str:
    """A test id for a (C_in, C_out, stride) shape, saying where skip is a 1x1 conv."""
    c_in, c_out, s = shape[:3]
    return f"{c_in}-{c_out}-s{s}" + ("-skipconv" if shape_changes(c_in, c_out, s) else "")


@torch.no_grad()
def randomize(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every floating parameter and buffer of ``module`` non-default random values.

    BN scales and running variances in [0.5, 1.5] (positive), BN shifts, biases and
    running means N(0, 0.3^2) (non-zero), conv weights their initial value times a factor
    in [0.5, 1.5] each (same fan-in scale, other values). Works on ``MixedBlock``'s flat
    ``bn1_weight`` ... and on standalone blocks' ``nn.BatchNorm2d``. Integer buffers
    (``num_batches_tracked``) are left alone. Returns ``module``."""
    bns = {id(m) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    for mod in module.modules():
        tensors = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        for name, t in tensors:
            if not t.is_floating_point():
                continue

            def draw(fn):
                return fn(t.shape, generator=generator, dtype=t.dtype).to(t.device)

            is_bn = id(mod) in bns or "bn" in name
            if name.endswith("running_var") or (is_bn and name.endswith("weight")):
                t.copy_(draw(torch.rand) + 0.5)
            elif name.endswith(("running_mean", "bias")):
                t.copy_(draw(torch.randn) * 0.3)
            else:
                t.mul_(draw(torch.rand) + 0.5)
    return module


def make_pair(backend: str, c_in: int, c_out: int, stride: int,
              candidates: Sequence[str] | None = None, *, dtype: torch.dtype = torch.float64,
              device: torch.device | str = "cpu", seed: int = 0) -> tuple:
    """(block on ``backend``, reference block) with the same random parameters and BN
    state, both on ``device`` in ``dtype``; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ref = MixedBlock(c_in, c_out, stride, candidates, backend="reference").to(device, dtype)
        block = MixedBlock(c_in, c_out, stride, candidates, backend=backend).to(device, dtype)
    randomize(ref, torch.Generator().manual_seed(seed))
    block.load_state_dict(ref.state_dict())
    return block, ref


@dataclass
class PairRun:
    """What one step of ``run_pair`` produced, each entry a (block's, reference's) pair."""
    output: tuple
    grad_x: tuple
    grad_mask: tuple
    grad_params: dict = field(default_factory=dict)    # parameter name -> pair
    buffers: dict = field(default_factory=dict)        # buffer name -> pair, after the step

    def items(self) -> Iterator[tuple]:
        """(label, block's, reference's) for everything, output first."""
        yield "output", *self.output
        yield "grad of x", *self.grad_x
        yield "grad of the mask", *self.grad_mask
        for name, pair in self.grad_params.items():
            yield f"grad of {name}", *pair
        for name, pair in self.buffers.items():
            yield f"buffer {name}", *pair


@contextlib.contextmanager
def _exact_reference():
    """cuDNN convs use TF32 on recent GPUs by default: not a float32 reference."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


def run_pair(block: MixedBlock, ref: MixedBlock, *, batch: int = 2, size: int = 5,
             per_example: bool = False, channels_last: bool = False, train: bool = True,
             seed: int = 0) -> PairRun:
    """One step of both blocks (``train`` or eval mode) on the same fresh random input
    (``batch`` x C_in x ``size`` x ``size``, NCHW or channels_last) and mask (per batch,
    or per example), then backward of one random output gradient (in the input's format)."""
    if block.state_dict().keys() != ref.state_dict().keys():
        raise ValueError("the two blocks have different parameters or buffers")
    p = next(ref.parameters())
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def rand(fn, *shape):
        return fn(*shape, generator=g, dtype=p.dtype).to(p.device)

    x = rand(torch.randn, batch, ref.in_channels, size, size).contiguous(memory_format=fmt)
    k = ref.num_candidates
    mask = rand(torch.rand, *((batch, k) if per_example else (k,)))
    dy = None
    runs = []
    with _exact_reference():
        for m in (block, ref):
            m.train(train)
            m.zero_grad(set_to_none=True)
            xi, mi = x.clone().requires_grad_(), mask.clone().requires_grad_()
            y = m(xi, mi)
            if dy is None:
                dy = rand(torch.randn, *y.shape).contiguous(memory_format=fmt)
            y.backward(dy)
            runs.append((y.detach(), xi.grad, mi.grad,
                         {n: q.grad for n, q in m.named_parameters()},
                         {n: b.detach().clone() for n, b in m.named_buffers()}))
    (y1, dx1, dm1, g1, b1), (y2, dx2, dm2, g2, b2) = runs
    return PairRun((y1, y2), (dx1, dx2), (dm1, dm2), {n: (g1[n], g2[n]) for n in g2},
                   {n: (b1[n], b2[n]) for n in b2})


def compare(block: MixedBlock, ref: MixedBlock, *, atol: float | None = None,
            rtol: float | None = None, **step) -> PairRun:
    """``run_pair(block, ref, **step)`` and assert that the block matches the reference:
    output, gradient of x, of the mask and of every parameter, every buffer after the
    step (``torch.testing.assert_close`` with ``atol``/``rtol``, None: the dtype's
    defaults), and the output and grad of x in the input's memory format. Returns the run."""
    run = run_pair(block, ref, **step)
    for label, ours, theirs in run.items():
        assert (ours is None) == (theirs is None), f"{label}: {ours!r} vs {theirs!r}"
        if ours is not None:
            torch.testing.assert_close(ours, theirs, atol=atol, rtol=rtol,
                                       msg=lambda m, label=label: f"{label}: {m}")
    fmt = torch.channels_last if step.get("channels_last") else torch.contiguous_format
    for label, t in (("output", run.output[0]), ("grad of x", run.grad_x[0])):
        assert t.is_contiguous(memory_format=fmt), f"{label} is not in the input's {fmt}"
    return run


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread: the float64 reference convs make one slow call per
    depthwise group, and OpenMP on a busy small machine makes each many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
