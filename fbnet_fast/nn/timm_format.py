"""An architecture as a timm EfficientNet, so timm's own training script can train or
fine-tune it: the block strings of timm's ``arch_def`` (the format of ``_gen_fbnetc`` in
timm/models/efficientnet.py), the EfficientNet settings, the weights under timm's names
and the source of a file that registers the model with timm.

The networks are the same function, not lookalikes: a candidate ``kK_eE`` is timm's
``ir`` block (1x1, BN, ReLU, depthwise KxK, BN, ReLU, 1x1, BN, residual where the shape
allows), a skip that changes shape is a ``cn`` block (1x1 conv, BN, ReLU), an identity
skip is no block at all. BatchNorm (eps 1e-5, momentum 0.1), ReLU, the padding (K//2),
the head and the classifier are timm's defaults. What timm cannot express is a
``ValueError`` rather than a different network.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from .architecture import resolve_arch
from .space import make_divisible, parse_candidate, shape_changes

__all__ = ["TIMM_EXTRA", "MissingTimm", "TimmArch", "to_timm", "timm_state_dict",
           "create_timm_model", "timm_source"]

TIMM_EXTRA = 'pip install "fbnet_fast[timm]"'


class MissingTimm(ImportError, ValueError):
    """timm is not installed. A ValueError too, so the CLI prints it as one line."""


@dataclass(frozen=True)
class TimmArch:
    """One architecture in timm's terms."""

    name: str            # the name the generated file registers with timm
    arch_def: list       # per stage, timm block strings such as 'ir_r2_k5_s1_e6_c64'
    kwargs: dict         # EfficientNet settings besides block_args and num_classes
    places: list         # per searchable layer, (stage, block) in timm's `blocks`; None: identity


def _check_channels(what: str, channels: int) -> None:
    # timm rounds every block's output and expanded channels (and the stem) to multiples
    # of 8 (its make_divisible is ours); a count it would round builds another network
    if make_divisible(channels) != channels:
        raise ValueError(f"{what} has {channels} channels; timm's EfficientNet rounds "
                         "channels to multiples of 8, so it cannot build this architecture")


def to_timm(arch) -> TimmArch:
    """The block strings and settings of ``arch``. Identity skips drop out (the stage's
    repeat count shrinks; a stage left empty disappears), runs of equal blocks in a stage
    become one string with a repeat count, as timm's own definitions are written."""
    arch = resolve_arch(arch)
    space = arch.space
    if space.effective_stem_stride != 2:
        what = "the small (32x32) variant's stem" if space.small_input else "this space's stem"
        raise ValueError(f"{what} has stride {space.effective_stem_stride}, but timm's "
                         "EfficientNet stem has a fixed stride of 2")
    _check_channels("the stem", space.stem_out)
    stage_of = [i for i, st in enumerate(space.stages) for _ in range(st.repeats)]
    stages = [[] for _ in space.stages]          # per stage: [kind, k, stride, rest, repeats]
    layer_stage = []
    for layer, name, s in zip(space.layers(), arch.blocks, stage_of):
        spec = parse_candidate(name)
        where = f"layer {layer.index + 1} ({name})"
        if spec.is_skip and not shape_changes(layer.in_channels, layer.out_channels,
                                              layer.stride):
            layer_stage.append(None)
            continue
        if spec.groups > 1:
            raise ValueError(f"{where}: timm has no channel shuffle, so a grouped candidate "
                             "cannot be exported as a timm EfficientNet")
        _check_channels(where, layer.out_channels)
        if spec.is_skip:
            kind, k, rest = "cn", 1, f"c{layer.out_channels}"
        else:
            _check_channels(where + "'s expansion", layer.in_channels * spec.expansion)
            kind, k, rest = "ir", spec.kernel, f"e{spec.expansion}_c{layer.out_channels}"
        run = stages[s][-1] if stages[s] else None
        # only a stage's first block may stride in timm, and ours do: a repeat of a
        # strided block is stride 1, as in timm's 'ir_r4_k5_s2_e6_c184'
        if run and run[:2] == [kind, k] and run[3] == rest and layer.stride == 1:
            run[4] += 1
        else:
            stages[s].append([kind, k, layer.stride, rest, 1])
        layer_stage.append(s)
    kept = [s for s, runs in enumerate(stages) if runs]
    counters = {s: itertools.count() for s in kept}
    places = [None if s is None else (kept.index(s), next(counters[s])) for s in layer_stage]
    arch_def = [[f"{kind}_r{n}_k{k}_s{st}_{rest}" for kind, k, st, rest, n in stages[s]]
                for s in kept]
    kwargs = {"stem_size": space.stem_out, "num_features": space.head_out}
    total_stride = 2 * math.prod(layer.stride for layer in space.layers())
    if total_stride > 32:     # timm would turn the strides past 32 into dilations
        kwargs["output_stride"] = total_stride
    name = arch.name if arch.name and arch.name.isidentifier() else "fbnet_found"
    return TimmArch(name, arch_def, kwargs, places)


def timm_state_dict(model) -> dict:
    """An ``FBNet``'s state dict under timm's module names: stem -> conv_stem/bn1, block i
    -> blocks.<stage>.<block> (a skip conv's conv/BN -> conv/bn1), head -> conv_head/bn2;
    the candidate blocks and the classifier already use timm's names."""
    t = to_timm(model.arch)
    table = [("stem.0.", "conv_stem."), ("stem.1.", "bn1."), ("head.0.", "conv_head."),
             ("head.1.", "bn2."), ("classifier.", "classifier.")]
    for i, place in enumerate(t.places):
        if place is not None:
            new = "blocks.{}.{}.".format(*place)
            table += [(f"blocks.{i}.conv.0.", new + "conv."),
                      (f"blocks.{i}.conv.1.", new + "bn1."), (f"blocks.{i}.", new)]
    out = {}
    for key, value in model.state_dict().items():
        old, new = next((o, n) for o, n in table if key.startswith(o))
        out[new + key[len(old):]] = value
    return out


def create_timm_model(arch, num_classes: int = 1000, **kwargs):
    """``arch`` built by timm (``timm.models.efficientnet.EfficientNet``); ``kwargs`` go to
    EfficientNet (``drop_rate``, ``drop_path_rate``, ...)."""
    try:
        # deferred: timm is the optional extra fbnet_fast[timm], needed only to build there
        from timm.models.efficientnet import EfficientNet, decode_arch_def
    except ImportError:
        raise MissingTimm(f"building the model in timm needs timm, which is not installed: "
                          f"{TIMM_EXTRA}") from None
    t = to_timm(arch)
    return EfficientNet(decode_arch_def(t.arch_def), num_classes=num_classes,
                        **t.kwargs, **kwargs)


def timm_source(arch, num_classes: int = 1000, weights: str | None = None) -> str:
    """A Python file that registers ``arch`` with timm under ``to_timm(arch).name``: once it
    is imported (by a script, or at the top of timm's train.py), ``timm.create_model(name)``
    and ``--model name`` build it. Run as a script, it builds the model and loads
    ``weights`` (a state dict from ``timm_state_dict``) when given."""
    arch = resolve_arch(arch)
    t = to_timm(arch)
    stages = "".join(f"    {stage!r},\n" for stage in t.arch_def)
    kwargs = ", ".join(f"{k}={v!r}" for k, v in t.kwargs.items())
    load = f"    model.load_state_dict(torch.load({weights!r}))\n" if weights else ""
    return (
        f"# {arch.name or 'architecture'} as a timm EfficientNet (fbnet-fast export --timm)\n"
        "import timm\n"
        "import torch\n"
        "from timm.models import build_model_with_cfg, register_model\n"
        "from timm.models.efficientnet import EfficientNet, decode_arch_def\n\n"
        f"ARCH_DEF = [\n{stages}]\n"
        f"KWARGS = dict({kwargs})\n\n\n"
        "@register_model\n"
        f"def {t.name}(pretrained=False, **kwargs):\n"
        f"    return build_model_with_cfg(EfficientNet, {t.name!r}, pretrained,\n"
        "                                block_args=decode_arch_def(ARCH_DEF), **KWARGS,\n"
        "                                **kwargs)\n\n\n"
        'if __name__ == "__main__":\n'
        f"    model = timm.create_model({t.name!r}, num_classes={num_classes})\n"
        f"{load}"
        '    print(sum(p.numel() for p in model.parameters()), "parameters")\n')
