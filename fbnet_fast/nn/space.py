"""The FBNet search space: candidate names and the macro architecture.

Everything here is plain data. One discrete network of a space is an ``Architecture``
(``architecture.py``); modules are built from both in ``blocks.py``, ``mixed_block.py``,
``supernet.py`` and ``models.py``.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Sequence

__all__ = [
    "CANDIDATES", "CandidateSpec", "parse_candidate", "Stage", "Layer", "SearchSpace",
    "FBNET_MACRO", "make_divisible", "conv_out", "shape_changes", "layer_shapes",
    "check_candidates",
]

# The paper's nine candidates (Table 2), in the order theta's columns use.
CANDIDATES = (
    "k3_e1", "k3_e1_g2", "k3_e3", "k3_e6",
    "k5_e1", "k5_e1_g2", "k5_e3", "k5_e6", "skip",
)

_CANDIDATE_RE = re.compile(r"^k(\d+)_e(\d+)(?:_g(\d+))?$")


@dataclass(frozen=True)
class CandidateSpec:
    """One candidate block: kK_eE[_gG], or the skip connection (kernel 0)."""

    name: str
    kernel: int = 0
    expansion: int = 0
    groups: int = 1

    @property
    def is_skip(self) -> bool:
        return self.name == "skip"


def parse_candidate(name: str) -> CandidateSpec:
    """Decode a candidate name such as ``k5_e6`` or ``k3_e1_g2``; ``skip`` is the identity."""
    if not isinstance(name, str):
        raise ValueError(f"candidate name must be a string, got {name!r}")
    if name == "skip":
        return CandidateSpec("skip")
    m = _CANDIDATE_RE.match(name)
    if not m:
        raise ValueError(
            f"unknown candidate {name!r}: expected 'skip' or 'k<K>_e<E>[_g<G>]' "
            f"such as {', '.join(CANDIDATES[:-1])}")
    k, e, g = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
    if k % 2 == 0 or k < 1:
        raise ValueError(f"candidate {name!r}: kernel size must be odd, got {k}")
    if e < 1 or g < 1:
        raise ValueError(f"candidate {name!r}: expansion and groups must be >= 1")
    return CandidateSpec(name, k, e, g)


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` (MobileNet's rule: never drop below 90 %)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


@dataclass(frozen=True)
class Stage:
    """One row of the macro table: ``repeats`` searchable layers with ``channels`` outputs."""

    channels: int
    repeats: int
    stride: int


# Paper Table 1: stem 16 (stride 2), seven TBS stages, head 1984.
FBNET_MACRO = (
    Stage(16, 1, 1), Stage(24, 4, 2), Stage(32, 4, 2), Stage(64, 4, 2),
    Stage(112, 4, 1), Stage(184, 4, 2), Stage(352, 1, 1),
)


@dataclass(frozen=True)
class Layer:
    """One searchable layer: its shape, fixed by the space."""

    index: int
    in_channels: int
    out_channels: int
    stride: int
    in_size: int  # input height == width

    @property
    def out_size(self) -> int:
        return conv_out(self.in_size, self.stride)


def conv_out(size: int, stride: int) -> int:
    # Every conv here pads K//2 with odd K (or is 1x1), so H_out = ceil(H / s).
    return (size + stride - 1) // stride


@dataclass(frozen=True)
class SearchSpace:
    """Macro architecture plus the candidates searched at every layer.

    ``channels`` (stem followed by one entry per stage) overrides the width-scaled
    channels for published models whose channels are not a plain rounding.
    ``small_input`` is the 32x32 variant: stem stride 1 and stage 2 stride 1.
    """

    resolution: int = 224
    width: float = 1.0
    head_channels: int = 1984
    stem_channels: int = 16
    stem_stride: int = 2
    stages: tuple = FBNET_MACRO
    candidates: tuple = CANDIDATES
    channels: tuple | None = None
    small_input: bool = False

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(
            s if isinstance(s, Stage) else Stage(*s) for s in self.stages))
        object.__setattr__(self, "candidates", tuple(self.candidates))
        if self.channels is not None:
            object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        self.validate()

    # -- construction helpers -------------------------------------------------
    @classmethod
    def small(cls, **kw) -> "SearchSpace":
        """The 32x32 variant (CIFAR-sized inputs keep 4x4 maps at the last stage)."""
        kw.setdefault("resolution", 32)
        return cls(small_input=True, **kw)

    def replace(self, **kw) -> "SearchSpace":
        return dataclasses.replace(self, **kw)

    # -- checks -----------------------------------------------------------------
    def validate(self) -> None:
        if not self.candidates:
            raise ValueError("the search space needs at least one candidate")
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"duplicate candidates in {list(self.candidates)}")
        for c in self.candidates:
            parse_candidate(c)
        if self.resolution < 1 or self.width <= 0:
            raise ValueError(
                f"resolution must be >= 1 and width > 0, got {self.resolution}, {self.width}")
        if not self.stages:
            raise ValueError("the macro table needs at least one stage")
        for i, s in enumerate(self.stages):
            if s.channels < 1 or s.repeats < 1 or s.stride not in (1, 2):
                raise ValueError(
                    f"stage {i + 1} of the macro table is invalid ({s}): channels and repeats "
                    "must be >= 1 and stride 1 or 2")
        if self.channels is not None and len(self.channels) != len(self.stages) + 1:
            raise ValueError(
                f"channels override needs {len(self.stages) + 1} entries (stem + one per "
                f"stage), got {len(self.channels)}")

    # -- derived shapes -----------------------------------------------------------
    @property
    def num_candidates(self) -> int:
        return len(self.candidates)

    @property
    def stem_out(self) -> int:
        if self.channels is not None:
            return self.channels[0]
        return make_divisible(self.stem_channels * self.width)

    @property
    def head_out(self) -> int:
        # The head keeps its size below width 1, as MobileNet does.
        return make_divisible(self.head_channels * max(1.0, self.width))

    def stage_channels(self) -> list:
        if self.channels is not None:
            return list(self.channels[1:])
        return [make_divisible(s.channels * self.width) for s in self.stages]

    def stage_strides(self) -> list:
        strides = [s.stride for s in self.stages]
        if self.small_input and len(strides) > 1:
            strides[1] = 1
        return strides

    @property
    def effective_stem_stride(self) -> int:
        return 1 if self.small_input else self.stem_stride

    def layers(self) -> list:
        """The searchable layers with their shapes, in order."""
        size = conv_out(self.resolution, self.effective_stem_stride)
        c_in = self.stem_out
        out = []
        for ch, st, stage in zip(self.stage_channels(), self.stage_strides(), self.stages):
            for r in range(stage.repeats):
                s = st if r == 0 else 1
                out.append(Layer(len(out), c_in, ch, s, size))
                size = conv_out(size, s)
                c_in = ch
        return out

    @property
    def num_layers(self) -> int:
        return sum(s.repeats for s in self.stages)

    @property
    def final_size(self) -> int:
        return self.layers()[-1].out_size

    # -- serialisation --------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {
            "resolution": self.resolution, "width": self.width,
            "head_channels": self.head_channels, "stem_channels": self.stem_channels,
            "stem_stride": self.stem_stride, "small_input": self.small_input,
        }
        if self.stages != FBNET_MACRO:
            d["stages"] = [[s.channels, s.repeats, s.stride] for s in self.stages]
        if self.candidates != CANDIDATES:
            d["candidates"] = list(self.candidates)
        if self.channels is not None:
            d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SearchSpace":
        if not isinstance(d, dict):
            raise ValueError(f"space settings must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown space setting(s) {sorted(unknown)}; known: {sorted(known)}")
        kw = dict(d)
        if "stages" in kw:
            try:
                kw["stages"] = tuple(Stage(*map(int, s)) for s in kw["stages"])
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"space 'stages' must be a list of [channels, repeats, stride]: {e}") from None
        return cls(**kw)


def shape_changes(in_channels: int, out_channels: int, stride: int) -> bool:
    """Where a layer changes shape, skip is a 1x1 conv and the candidates add no residual."""
    return stride != 1 or in_channels != out_channels


def skip_is_conv(layer: Layer) -> bool:
    return shape_changes(layer.in_channels, layer.out_channels, layer.stride)


def layer_shapes(space: SearchSpace) -> list:
    """Distinct (C_in, C_out, stride, H) of a space, in first-seen order."""
    seen = []
    for l in space.layers():
        key = (l.in_channels, l.out_channels, l.stride, l.in_size)
        if key not in seen:
            seen.append(key)
    return seen


def check_candidates(names: Sequence[str], in_channels: int, out_channels: int) -> list:
    """Parse and check a candidate list for one layer shape; returns the specs."""
    specs = []
    for n in names:
        spec = parse_candidate(n)
        if spec.groups > 1 and (in_channels % spec.groups or out_channels % spec.groups):
            raise ValueError(
                f"candidate {n!r} cannot be built for {in_channels}->{out_channels} channels: "
                f"both must be divisible by {spec.groups}")
        specs.append(spec)
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate candidates in {list(names)}")
    return specs
