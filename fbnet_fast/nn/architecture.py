"""One discrete network of a search space (a block name per searchable layer), the
published ones (``ZOO``), and the ways to get one: ``resolve_arch`` reads every accepted
form, ``sample_architectures`` draws random ones.

Zoo block lists (TBS layers 1..22) come from the paper (Wu et al., CVPR 2019, Figure 4).
FBNet-C equals timm's ``fbnetc_100``. FBNet-S8 and FBNet-iPhoneX are transcriptions of
the paper's figure from a public reimplementation, not released by the authors.
FBNet-96-0.35-1 uses the channels published with the released model (stem 8, stages
8, 16, 16, 24, 40, 72, 128, head 1416), not a plain 0.35 rounding.
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .space import CANDIDATES, FBNET_MACRO, SearchSpace, check_candidates

__all__ = ["Architecture", "ZOO", "resolve_arch", "sample_architectures"]

_FORMAT = "fbnet_fast.arch/1"


@dataclass(frozen=True)
class Architecture:
    """One discrete network of a space: a block name per searchable layer."""

    blocks: tuple
    space: SearchSpace = field(default_factory=SearchSpace)
    name: str | None = None

    def __post_init__(self):
        if isinstance(self.blocks, str) or not isinstance(self.blocks, Iterable):
            raise ValueError(f"blocks must be a list of block names, got {self.blocks!r}")
        object.__setattr__(self, "blocks", tuple(self.blocks))
        self.validate()

    def validate(self) -> None:
        n = self.space.num_layers
        if len(self.blocks) != n:
            raise ValueError(
                f"architecture has {len(self.blocks)} block names but the space has {n} "
                f"searchable layers; give exactly one name per layer")
        for layer, b in zip(self.space.layers(), self.blocks):
            try:
                check_candidates([b], layer.in_channels, layer.out_channels)
            except ValueError as e:
                raise ValueError(f"layer {layer.index + 1}: {e}") from None

    # -- forms --------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"format": _FORMAT, "blocks": list(self.blocks), "space": self.space.to_dict()}
        if self.name:
            d["name"] = self.name
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Architecture":
        if not isinstance(d, dict) or "blocks" not in d:
            raise ValueError(
                "an architecture file must be a JSON object with a 'blocks' list "
                f"(and optionally 'space' and 'name'); format {_FORMAT}")
        fmt = d.get("format", _FORMAT)
        if fmt != _FORMAT:
            raise ValueError(f"unsupported architecture format {fmt!r}; expected {_FORMAT!r}")
        extra = set(d) - {"format", "blocks", "space", "name"}
        if extra:
            raise ValueError(f"unknown architecture field(s) {sorted(extra)}")
        space = SearchSpace.from_dict(d.get("space", {}))
        return cls(d["blocks"], space, d.get("name"))

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Architecture":
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"architecture file {os.fspath(path)!r} does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"architecture file {os.fspath(path)!r} is not valid JSON: {e}") \
                from None
        return cls.from_dict(d)

    def to_string(self) -> str:
        """Short form: ``r224_w1.0_h1984:k3_e1,k3_e6,...`` (plus ``_small`` for 32x32)."""
        s = self.space
        if (s.stages != FBNET_MACRO or s.channels is not None or s.candidates != CANDIDATES
                or s.stem_channels != 16 or s.stem_stride != 2):
            raise ValueError(
                "the short string form covers width/resolution/head variants of the default "
                "macro table only; save this architecture as a JSON file instead")
        head = f"r{s.resolution}_w{s.width!r}_h{s.head_channels}" + ("_small" if s.small_input else "")
        return head + ":" + ",".join(self.blocks)

    @classmethod
    def from_string(cls, text: str) -> "Architecture":
        if ":" not in text:
            raise ValueError(
                f"architecture string {text!r} must look like 'r224_w1.0_h1984:k3_e1,...'")
        head, _, body = text.partition(":")
        m = re.fullmatch(r"r(\d+)_w([0-9.]+)_h(\d+)(_small)?", head.strip())
        if not m:
            raise ValueError(
                f"architecture string settings {head!r} must look like 'r224_w1.0_h1984'")
        space = SearchSpace(resolution=int(m.group(1)), width=float(m.group(2)),
                            head_channels=int(m.group(3)), small_input=bool(m.group(4)))
        return cls([b.strip() for b in body.split(",")], space)

    def __str__(self) -> str:
        try:
            return self.to_string()
        except ValueError:
            return json.dumps(self.to_dict())


# --- the published architectures ------------------------------------------------

ZOO_BLOCKS = {
    "fbnet_a": ("skip k3_e3 k3_e1 skip skip k5_e6 k3_e3 k5_e1 k3_e3 k5_e6 k5_e3 k5_e1_g2 "
                "k5_e6 k3_e6 k5_e1_g2 k5_e3 k3_e1_g2 k5_e6 k5_e6 k5_e3 k5_e6 k5_e6"),
    "fbnet_b": ("k3_e1 k3_e6 k5_e1 k3_e1 k3_e1 k5_e6 k5_e3 k3_e6 k5_e6 k5_e6 k5_e1 skip "
                "k5_e3 k5_e6 k3_e1 k5_e1 k5_e3 k5_e6 k5_e1 k5_e6 k5_e6 k3_e6"),
    "fbnet_c": ("k3_e1 k3_e6 skip k3_e1 k3_e1 k5_e6 k5_e3 k5_e6 k3_e6 k5_e6 k5_e3 k5_e6 "
                "k5_e6 k5_e6 k5_e6 k5_e6 k5_e3 k5_e6 k5_e6 k5_e6 k5_e6 k3_e6"),
    "fbnet_s8": ("k3_e1 k3_e3 k3_e1 skip skip k5_e6 k3_e3 k3_e3 k3_e6 k5_e6 k5_e3 k5_e3 "
                 "k5_e3 k3_e6 k5_e3 k5_e3 k5_e3 k5_e6 k5_e6 k5_e3 k5_e6 k5_e6"),
    "fbnet_iphonex": ("skip k3_e6 k3_e1 k3_e1 k3_e1 k3_e6 k3_e6 k3_e6 k3_e6 k3_e6 k3_e6 "
                      "k3_e3 k3_e6 k3_e6 k3_e3 k3_e3 k3_e3 k5_e6 k5_e6 k5_e6 k5_e3 k5_e6"),
    "fbnet_96_035_1": ("k3_e1 k3_e6 k3_e6 skip skip k5_e6 k5_e6 skip skip k5_e6 skip skip "
                       "skip k3_e6 skip skip skip k5_e6 k5_e6 skip skip k5_e6"),
}
ZOO_SPACES = {
    "fbnet_a": SearchSpace(head_channels=1504),
    "fbnet_b": SearchSpace(),
    "fbnet_c": SearchSpace(),
    "fbnet_s8": SearchSpace(head_channels=1504),
    "fbnet_iphonex": SearchSpace(head_channels=1504),
    "fbnet_96_035_1": SearchSpace(resolution=96, width=0.35, head_channels=1416,
                                  channels=(8, 8, 16, 16, 24, 40, 72, 128)),
}
ZOO = {name: Architecture(ZOO_BLOCKS[name].split(), ZOO_SPACES[name], name)
       for name in ZOO_BLOCKS}


def resolve_arch(arch) -> Architecture:
    """Any accepted form -> ``Architecture``: zoo name, file path, short string, object, list."""
    if isinstance(arch, Architecture):
        return arch
    if isinstance(arch, (str, os.PathLike)):
        s = os.fspath(arch)
        if s in ZOO:
            return ZOO[s]
        if os.path.exists(s) or s.endswith(".json"):
            return Architecture.load(s)
        if ":" in s:
            return Architecture.from_string(s)
        raise ValueError(
            f"unknown architecture {s!r}: give a zoo name ({', '.join(ZOO)}), an architecture "
            "JSON file, a short string 'r224_w1.0_h1984:k3_e1,...', or a list of block names")
    if isinstance(arch, dict):
        return Architecture.from_dict(arch)
    if isinstance(arch, Sequence):
        return Architecture(list(arch))
    raise ValueError(f"cannot read an architecture from {type(arch).__name__}")


def sample_architectures(space: SearchSpace, n: int, seed: int = 0,
                         exclude=()) -> list:
    """``n`` distinct architectures, each layer's block drawn uniformly (seeded)."""
    rng = random.Random(seed)
    seen = {tuple(b) for b in exclude}
    out = []
    for _ in range(100 * n + 100):
        if len(out) == n:
            break
        blocks = tuple(rng.choice(space.candidates) for _ in range(space.num_layers))
        if blocks not in seen:
            seen.add(blocks)
            out.append(Architecture(blocks, space))
    return out
