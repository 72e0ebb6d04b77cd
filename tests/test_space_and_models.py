"""Search space, architecture format and the model zoo."""
import json

import pytest
import torch

from fbnet_fast import ZOO, Architecture, SearchSpace, count_costs, create_model
from fbnet_fast.nn.space import CANDIDATES, make_divisible, skip_is_conv

# (MACs in millions, rounded as the paper does; parameters incl. BN) counted as the paper
# counts (convs and fc, 1000 classes). FBNet-C's parameters equal timm's fbnetc_100.
ZOO_COSTS = {
    "fbnet_a": (249.9, None), "fbnet_b": (296.6, None), "fbnet_c": (385.0, 5_572_200),
    "fbnet_s8": (292.9, None), "fbnet_iphonex": (321.8, None), "fbnet_96_035_1": (12.9, None),
}


@pytest.mark.parametrize("name", sorted(ZOO_COSTS))
def test_zoo_macs_and_params(name):
    rows = count_costs(name)
    macs = sum(r.macs for r in rows) / 1e6
    assert round(macs, 1) == ZOO_COSTS[name][0]
    model = create_model(name)
    params = sum(p.numel() for p in model.parameters())
    assert params == sum(r.params for r in rows)
    if ZOO_COSTS[name][1] is not None:
        assert params == ZOO_COSTS[name][1]


def test_zoo_forward_shapes():
    model = create_model("fbnet_96_035_1", num_classes=7).eval()
    assert model(torch.randn(2, 3, 96, 96)).shape == (2, 7)


def test_fbnet_c_matches_timm_definition():
    # timm's _gen_fbnetc arch_def, expanded: (kernel, expansion, out channels, stride).
    timm = ([(3, 1, 16, 1)] + [(3, 6, 24, 2)] + [(3, 1, 24, 1)] * 2
            + [(5, 6, 32, 2), (5, 3, 32, 1), (5, 6, 32, 1), (3, 6, 32, 1)]
            + [(5, 6, 64, 2), (5, 3, 64, 1)] + [(5, 6, 64, 1)] * 2
            + [(5, 6, 112, 1)] * 3 + [(5, 3, 112, 1)] + [(5, 6, 184, 2)] + [(5, 6, 184, 1)] * 3
            + [(3, 6, 352, 1)])
    arch = ZOO["fbnet_c"]
    ours = [(b, l.out_channels, l.stride) for b, l in zip(arch.blocks, arch.space.layers())]
    # timm has 21 blocks: FBNet-C's TBS 3 is a skip, which timm drops.
    ours_conv = [(int(b[1]), int(b.split("_e")[1]), c, s) for b, c, s in ours if b != "skip"]
    assert ours_conv == timm


def test_space_layers_and_small_variant():
    layers = SearchSpace().layers()
    assert len(layers) == 22
    assert [l.index + 1 for l in layers if skip_is_conv(l)] == [2, 6, 10, 14, 18, 22]
    assert (layers[0].in_size, layers[-1].out_size) == (112, 7)
    small = SearchSpace.small().layers()
    assert (small[0].in_size, small[-1].out_size) == (32, 4)
    half = SearchSpace(width=0.5)
    assert half.stage_channels() == [make_divisible(c * 0.5) for c in (16, 24, 32, 64, 112, 184, 352)]
    assert all(c % 8 == 0 for c in half.stage_channels())
    custom = SearchSpace(stages=[(16, 1, 1), (32, 2, 2)], candidates=["k3_e1", "skip"],
                         resolution=64)
    assert custom.num_layers == 3 and custom.num_candidates == 2
    # The paper's nine candidates, in the order of θ's columns and the latency tables.
    assert CANDIDATES == ("k3_e1", "k3_e1_g2", "k3_e3", "k3_e6", "k5_e1", "k5_e1_g2", "k5_e3",
                          "k5_e6", "skip")
    assert SearchSpace().candidates == CANDIDATES


@pytest.mark.parametrize("name", sorted(ZOO))
def test_architecture_round_trip(name, tmp_path):
    arch = ZOO[name]
    path = tmp_path / "a.json"
    arch.save(path)
    back = Architecture.load(path)
    assert back == arch
    assert create_model(str(path)).arch == arch
    if arch.space.channels is None:
        assert Architecture.from_string(arch.to_string()) == Architecture(arch.blocks, arch.space)


def test_architecture_string_and_list_forms():
    blocks = ["k3_e1"] * 22
    assert create_model(blocks, num_classes=10).arch.blocks == tuple(blocks)
    arch = Architecture.from_string("r32_w0.5_h1984_small:" + ",".join(["skip"] * 22))
    assert arch.space.small_input and arch.space.width == 0.5


@pytest.mark.parametrize("bad, message", [
    (["k3_e1"] * 21, "21 block names .* 22 searchable layers"),
    (["k3_e1"] * 21 + ["k4_e1"], "layer 22: .*kernel size must be odd"),
    (["k3_e1"] * 5 + ["conv"] + ["k3_e1"] * 16, "layer 6: unknown candidate 'conv'"),
])
def test_bad_architectures(bad, message):
    with pytest.raises(ValueError, match=message):
        create_model(bad)


def test_bad_architecture_files(tmp_path):
    p = tmp_path / "a.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        create_model(str(p))
    p.write_text(json.dumps({"blocks": ["k3_e1"] * 22, "space": {"widht": 1.0}}))
    with pytest.raises(ValueError, match="unknown space setting.*widht"):
        create_model(str(p))
    p.write_text(json.dumps({"blocks": ["k3_e1"] * 22, "format": "other/2"}))
    with pytest.raises(ValueError, match="unsupported architecture format"):
        create_model(str(p))
    with pytest.raises(ValueError, match="does not exist"):
        create_model(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="unknown architecture 'fbnet_z'"):
        create_model("fbnet_z")
    # A grouped candidate where the channels do not divide; ungrouped, the same space builds.
    space = SearchSpace(channels=(15, 15, 24, 32, 64, 112, 184, 352))
    with pytest.raises(ValueError, match="layer 1: .*divisible by 2"):
        Architecture(["k3_e1_g2"] + ["k3_e1"] * 21, space)
    assert Architecture(["k3_e1"] * 22, space).space == space
