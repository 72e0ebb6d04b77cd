"""Every fused MixedBlock backend against the reference, with the one tester of
``fbnet_fast.testing``: output, its memory format, the gradient of x, of the mask and of
every parameter, the BN running statistics after the step.

Families: ``cpu`` (the C++ kernels, float64), ``triton`` (on CUDA in float32, else in
Triton's CPU interpreter in float64: TRITON_INTERPRET is set by conftest.py), ``cuda``
(only with CUDA). Each runs every distinct FBNet layer shape with per-batch and
per-example masks, NCHW and channels_last, in training and eval mode. The combinations
rotate over the layers rather than multiply (every one appears for every family), and
the interpreter, the expensive one, gets one training step per layer on 4x4/5x5 maps,
eval on the four narrowest layers, and a subset of candidates on the widest.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch

from fbnet_fast import MixedBlock
from fbnet_fast.backends import registry
from fbnet_fast.testing import LAYER_SHAPES, compare, make_pair, shape_id, single_thread

CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class Family:
    name: str
    device: str

    @property
    def interpreted(self) -> bool:
        """Triton kernels run one Python call per program instance here: slow."""
        return self.name == "triton" and self.device == "cpu"

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64 if self.device == "cpu" else torch.float32

    @property
    def tol(self) -> dict:
        return dict(atol=1e-9, rtol=1e-9) if self.device == "cpu" else dict(atol=2e-4, rtol=2e-4)

    def require(self) -> None:
        """Skip, with the reason, when the family cannot run here."""
        why = _why_unavailable(self)
        if why is not None:
            pytest.skip(why)

    def pair(self, c_in, c_out, stride, candidates=None, seed=0):
        self.require()
        return make_pair(self.name, c_in, c_out, stride, candidates, dtype=self.dtype,
                         device=self.device, seed=seed)


@functools.cache
def _why_unavailable(fam: Family) -> str | None:
    return registry.BACKENDS[fam.name].why_unavailable(torch.device(fam.device))


# A new backend family: add it here (docs/architecture.md, "Adding a backend or a kernel").
FAMILIES = [Family("cpu", "cpu"), Family("triton", "cuda" if CUDA else "cpu")]
if CUDA:
    FAMILIES.append(Family("cuda", "cuda"))

# The interpreter is slow on the widest layers: there, a subset with both kernel sizes, a
# grouped candidate, the largest expansion and the skip (every stride / channel-change /
# skip-conv combination also appears with all nine candidates at C_in <= 64).
WIDE_SUBSET = ("k3_e1", "k5_e1_g2", "k5_e6", "skip")
# (per_example, channels_last), rotated over the layers.
COMBOS = [(False, True), (True, False), (False, False), (True, True)]


def sizes(c_in):
    """Two map sizes (even and odd), smaller for the wide layers to keep the test quick."""
    return (8, 7) if c_in <= 32 else (6, 5) if c_in <= 64 else (4, 5)


def steps(fam: Family, i: int, c_in: int) -> list:
    """(train, per_example, channels_last, size, batch) of the checks on layer ``i``."""
    pe, cl = COMBOS[(i // 2) % 4]
    if fam.interpreted:
        return [(True, pe, cl, (4, 5)[i % 2], 2)] + ([(False, *COMBOS[i], 5, 2)] if i < 4 else [])
    even, odd = sizes(c_in)
    return [(True, pe, cl, even, 2), (True, not pe, not cl, odd, 2), (False, *COMBOS[i % 4], 3, 3)]


def layer_cases() -> list:
    return [pytest.param(fam, shape, train, pe, cl, size, batch, id="-".join([
                fam.name, shape_id(shape), "train" if train else "eval",
                "per-example" if pe else "per-batch", "channels_last" if cl else "nchw",
                f"{size}x{size}"]))
            for fam in FAMILIES for i, shape in enumerate(LAYER_SHAPES)
            for train, pe, cl, size, batch in steps(fam, i, shape[0])]


@pytest.mark.parametrize("fam,shape,train,per_example,channels_last,size,batch", layer_cases())
def test_layer_matches_reference(fam, shape, train, per_example, channels_last, size, batch):
    c_in, c_out, stride = shape
    wide = fam.interpreted and c_in >= 112
    block, ref = fam.pair(c_in, c_out, stride, WIDE_SUBSET if wide else None,
                          seed=c_in * 7 + c_out)
    with single_thread():
        compare(block, ref, batch=batch, size=size, per_example=per_example,
                channels_last=channels_last, train=train, **fam.tol)


FAMILY_IDS = [f.name for f in FAMILIES]


@pytest.mark.parametrize("candidates", [("k3_e1_g2", "skip", "k5_e3", "k3_e6", "k5_e1_g2"),
                                        ("k5_e1", "k3_e3")], ids=["reordered", "no-skip"])
@pytest.mark.parametrize("fam", FAMILIES, ids=FAMILY_IDS)
def test_other_candidate_lists(fam, candidates):
    """Kernel sizes interleaved (several depthwise runs), grouped first, a skip conv in the
    middle, no skip. With torch's default threads: the kernels' threading is checked here."""
    block, ref = fam.pair(8, 16, 2, candidates, seed=3)
    compare(block, ref, batch=3, size=5, per_example=True, **fam.tol)


@pytest.mark.parametrize("fam", FAMILIES, ids=FAMILY_IDS)
def test_two_steps_update_running_stats_twice(fam):
    block, ref = fam.pair(16, 16, 1, seed=5)
    with single_thread():
        for step in range(2):
            compare(block, ref, size=4, seed=step, **fam.tol)
    assert int(block.num_batches_tracked) == 2


@pytest.mark.parametrize("fam", FAMILIES, ids=FAMILY_IDS)
def test_training_needs_more_than_one_value(fam):
    block, _ = fam.pair(16, 24, 2)
    x = torch.randn(1, 16, 1, 1, device=fam.device, dtype=fam.dtype)
    with pytest.raises(ValueError, match="more than (1|one) value per"):
        block(x, torch.rand(9, device=fam.device, dtype=fam.dtype))


@pytest.mark.parametrize("fam", FAMILIES, ids=FAMILY_IDS)
def test_skip_only_layer_is_a_clear_error(fam):
    fam.require()
    block = MixedBlock(16, 16, 1, ["skip"], backend=fam.name).to(fam.device, fam.dtype)
    x = torch.randn(2, 16, 4, 4, device=fam.device, dtype=fam.dtype)
    with pytest.raises(ValueError, match="skip-only layer"):
        block(x, torch.ones(1, device=fam.device, dtype=fam.dtype))
