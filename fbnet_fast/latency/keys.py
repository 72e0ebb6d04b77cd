"""Op keys: the names a latency table gives its entries, one per op and shape.

A key names the op and its shape, so identical shapes in different layers share one
entry (see docs/latency.md)::

    k5_e6:i32:o64:s2:h28         candidate block: C_in 32 -> C_out 64, stride 2, input 28x28
    skip:i64:o64:s1:h14          skip (identity here: same shape)
    stem:i3:o16:s2:h224          the fixed 3x3 stem conv + BN + ReLU
    head:i352:o1984:h7:fc1000    the fixed 1x1 head conv + BN + ReLU, avg-pool and linear
"""
from __future__ import annotations

import re
from typing import NamedTuple

from ..nn.space import SearchSpace

__all__ = ["OpKey", "parse_key", "block_key", "stem_key", "head_key", "check_key",
           "parse_block_key", "layer_keys", "block_keys", "required_keys", "arch_keys"]

_BLOCK_RE = re.compile(r"^(skip|k\d+_e\d+(?:_g\d+)?):i(\d+):o(\d+):s(\d+):h(\d+)$")
_STEM_RE = re.compile(r"^stem:i(\d+):o(\d+):s(\d+):h(\d+)$")
_HEAD_RE = re.compile(r"^head:i(\d+):o(\d+):h(\d+):fc(\d+)$")


def block_key(name: str, c_in: int, c_out: int, stride: int, size: int) -> str:
    return f"{name}:i{c_in}:o{c_out}:s{stride}:h{size}"


def stem_key(space: SearchSpace) -> str:
    return f"stem:i3:o{space.stem_out}:s{space.effective_stem_stride}:h{space.resolution}"


def head_key(space: SearchSpace, num_classes: int) -> str:
    last = space.layers()[-1]
    return f"head:i{last.out_channels}:o{space.head_out}:h{last.out_size}:fc{num_classes}"


class OpKey(NamedTuple):
    """A parsed op key. ``kind`` is "block", "stem" or "head"; ``name`` the candidate (blocks),
    ``num_classes`` the classifier size (head, else None)."""

    kind: str
    name: str
    in_channels: int
    out_channels: int
    stride: int
    size: int
    num_classes: int | None = None


def parse_key(key: str) -> OpKey:
    """The parts of an op key; a ValueError for a malformed one."""
    m = _BLOCK_RE.match(key) if isinstance(key, str) else None
    if m:
        return OpKey("block", m.group(1), *(int(v) for v in m.groups()[1:]))
    m = _STEM_RE.match(key) if isinstance(key, str) else None
    if m:
        return OpKey("stem", "stem", *(int(v) for v in m.groups()))
    m = _HEAD_RE.match(key) if isinstance(key, str) else None
    if m:
        ci, co, h, nc = (int(v) for v in m.groups())
        return OpKey("head", "head", ci, co, 1, h, nc)
    raise ValueError(
        f"malformed op key {key!r}: expected e.g. 'k3_e6:i16:o24:s2:h112', "
        "'stem:i3:o16:s2:h224' or 'head:i352:o1984:h7:fc1000' (see docs/latency.md)")


def check_key(key: str) -> None:
    """Raise a ValueError unless ``key`` is a well-formed op key."""
    parse_key(key)


def parse_block_key(key: str):
    """``(candidate, C_in, C_out, stride, H)`` of a block key, or None for stem/head keys."""
    k = parse_key(key)
    return k[1:6] if k.kind == "block" else None


def layer_keys(space: SearchSpace) -> list:
    """Per layer, the keys of its candidates (in the space's candidate order)."""
    return [[block_key(c, l.in_channels, l.out_channels, l.stride, l.in_size)
             for c in space.candidates] for l in space.layers()]


def block_keys(space: SearchSpace) -> list:
    """Every distinct candidate-block key of the searchable layers, in first-seen order."""
    return list(dict.fromkeys(k for row in layer_keys(space) for k in row))


def required_keys(space: SearchSpace, num_classes: int = 1000) -> list:
    """Every distinct key a space needs: stem, blocks in first-seen order, head."""
    return [stem_key(space), *block_keys(space), head_key(space, num_classes)]


def arch_keys(arch, num_classes: int = 1000) -> list:
    """The keys of one discrete architecture (an ``Architecture``) in the order its ops
    run: stem, one block per layer, head."""
    space = arch.space
    blocks = [block_key(n, l.in_channels, l.out_channels, l.stride, l.in_size)
              for n, l in zip(arch.blocks, space.layers())]
    return [stem_key(space)] + blocks + [head_key(space, num_classes)]
