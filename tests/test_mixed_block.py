"""MixedBlock (reference backend) against independently built reference blocks."""
import pytest
import torch

import fbnet_fast
from fbnet_fast import MixedBlock, build_block
from fbnet_fast.nn.space import CANDIDATES
from fbnet_fast.testing import LAYER_SHAPES, randomize, shape_id

DT = torch.float64


def independent_blocks(c_in, c_out, stride, seed=0):
    """Independent reference blocks with random weights, and a MixedBlock loaded from them
    (``fbnet_fast.testing.make_pair`` pairs two MixedBlocks instead)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    blocks = [build_block(n, c_in, c_out, stride).to(DT) for n in CANDIDATES]
    for b in blocks:
        randomize(b, g)
    mixed = MixedBlock(c_in, c_out, stride, backend="reference").to(DT)
    for i, b in enumerate(blocks):
        mixed.load_block(i, b)
    return blocks, mixed


def grads_as_mixed(blocks, c_in, c_out, stride):
    """Concatenate the independent blocks' gradients into a MixedBlock's parameter layout."""
    holder = MixedBlock(c_in, c_out, stride, backend="reference").to(DT)
    for i, b in enumerate(blocks):
        with torch.no_grad():
            for p in b.parameters():
                p.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
        holder.load_block(i, b)
    return dict(holder.named_parameters())


@pytest.mark.parametrize("per_example", [False, True], ids=["per-batch", "per-example"])
@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=shape_id)
def test_matches_weighted_sum_of_blocks(shape, per_example):
    c_in, c_out, stride = shape
    blocks, mixed = independent_blocks(c_in, c_out, stride, seed=c_in + c_out)
    n, k = 3, len(CANDIDATES)
    x = torch.randn(n, c_in, 7, 7, dtype=DT)
    w = torch.softmax(torch.randn((n, k) if per_example else (k,), dtype=DT), -1)
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()

    y1 = mixed(x1, w1)
    y2 = sum((w2[..., i].view(-1, 1, 1, 1) if per_example else w2[i]) * b(x2)
             for i, b in enumerate(blocks))
    torch.testing.assert_close(y1, y2)
    assert y1.shape == (n, c_out, 4 if stride == 2 else 7, 4 if stride == 2 else 7)

    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)
    expected = grads_as_mixed(blocks, c_in, c_out, stride)
    for name, p in mixed.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], msg=f"gradient of {name}")


@pytest.mark.parametrize("shape", LAYER_SHAPES[:4], ids=shape_id)
def test_running_stats_after_a_training_step(shape):
    c_in, c_out, stride = shape
    blocks, mixed = independent_blocks(c_in, c_out, stride, seed=1)
    x = torch.randn(4, c_in, 6, 6, dtype=DT)
    w = torch.softmax(torch.randn(len(CANDIDATES), dtype=DT), -1)
    mixed(x, w)
    for b in blocks:
        b(x)
    for i, b in enumerate(blocks):
        got = mixed.block(i).state_dict()
        for key, ref in b.state_dict().items():
            if key.endswith("num_batches_tracked"):
                assert int(got[key]) == int(ref) == 1
            else:
                torch.testing.assert_close(got[key], ref, msg=f"{CANDIDATES[i]}: {key}")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(24, 24, 1), (32, 64, 2)], ids=shape_id)
def test_one_hot_and_block_export(shape, train):
    c_in, c_out, stride = shape
    _, mixed = independent_blocks(c_in, c_out, stride, seed=2)
    mixed.train(train)
    x = torch.randn(2, c_in, 5, 5, dtype=DT)
    for i in range(len(CANDIDATES)):
        exported = mixed.block(i)
        onehot = torch.nn.functional.one_hot(torch.tensor(i), len(CANDIDATES)).to(DT)
        torch.testing.assert_close(mixed(x, onehot), exported(x))
        torch.testing.assert_close(mixed(x, i), exported(x))


def test_parameters_are_role_concatenated_views():
    mixed = MixedBlock(16, 24, 2)
    names = {n for n, _ in mixed.named_parameters()}
    assert {"pw1_weight", "dw_weight", "pw2_weight", "bn1_weight", "bn3_bias",
            "skip_weight"} <= names
    total = sum(p.numel() for p in mixed.parameters())
    assert total == sum(sum(p.numel() for p in mixed.block(i).parameters())
                        for i in range(mixed.num_candidates))


def test_custom_candidates_and_errors():
    mixed = MixedBlock(16, 16, 1, candidates=["k3_e1", "k7_e2", "skip"], backend="reference")
    x = torch.randn(2, 16, 5, 5)
    assert mixed(x, torch.tensor([0.2, 0.3, 0.5])).shape == (2, 16, 5, 5)
    with pytest.raises(ValueError, match="unknown candidate 'k3_x1'"):
        MixedBlock(16, 16, 1, candidates=["k3_x1"])
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        mixed(x, torch.ones(4))
    with pytest.raises(ValueError, match=r"Tensor\[N, 16, H, W\]"):
        mixed(torch.randn(2, 8, 5, 5), torch.ones(3))
    with pytest.raises(ValueError, match="divisible by 2"):
        MixedBlock(15, 16, 1, candidates=["k3_e1_g2"])
    with pytest.raises(ValueError, match="unknown backend"):
        MixedBlock(16, 16, 1, backend="fastest")


def test_backend_choice():
    from fbnet_fast.backends import registry as backends
    cpu = torch.device("cpu")
    assert backends.pick_name("reference", cpu) == "reference"
    with pytest.raises(RuntimeError, match="cuda"):
        backends.pick_name("cuda", cpu)
    fbnet_fast.set_backend("reference")
    try:
        assert backends.pick_name("auto", cpu) == "reference"
    finally:
        fbnet_fast.set_backend(None)
