"""The discrete models' C++ layers and fused candidate blocks (``backends/cpu_layers.py``)
against the torch modules they replace, in float64: outputs, every gradient, the BN buffers,
and whole FBNets."""
import copy

import pytest
import torch
from torch import nn

from fbnet_fast import create_model
from fbnet_fast.backends import jit, registry
from fbnet_fast.nn.architecture import Architecture
from fbnet_fast.nn.blocks import CandidateBlock, ConvBNReLU
from fbnet_fast.nn.space import SearchSpace

pytestmark = pytest.mark.skipif(not jit.load(), reason=f"C++ kernels unavailable: {jit.why_unavailable()}")

if jit.load():
    from fbnet_fast.backends import cpu_layers

DT = torch.float64
CL = torch.channels_last
# (N, C, H, W) of the quick preset's and the 224x224 models' BNs, odd sizes, a 1x1 map
BN_SIZES = [(4, 8, 16, 16), (3, 24, 7, 9), (2, 144, 4, 4), (5, 17, 1, 1)]


def _bn_pair(c, relu, momentum):
    torch.manual_seed(c)
    ref = nn.BatchNorm2d(c, momentum=momentum).to(DT)
    with torch.no_grad():
        ref.weight.uniform_(-1.5, 1.5)    # negative gammas flip the ReLU's mask
        ref.bias.normal_()
        ref.running_mean.normal_()
        ref.running_var.uniform_(0.5, 2.0)
    ours = copy.deepcopy(ref)
    ours.__class__ = cpu_layers.BatchNorm2d
    ours.relu = relu
    return ref, ours


def _check_step(ref, ours, x, ref_fn=None):
    """One forward and backward of both modules from x: the same output, x gradient and
    parameter gradients. Returns our output."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = (ref_fn or ref)(x1), ours(x2)
    torch.testing.assert_close(y, y_ref)
    dy = torch.randn_like(y)
    y_ref.backward(dy)
    y.backward(dy)
    torch.testing.assert_close(x2.grad, x1.grad)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    return y


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "average"])
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("size", BN_SIZES, ids=lambda s: "x".join(map(str, s)))
def test_batch_norm_matches_torch(size, relu, momentum):
    ref, ours = _bn_pair(size[1], relu, momentum)

    def ref_fn(t):
        return torch.relu(ref(t)) if relu else ref(t)

    for step in range(2):          # two steps: the running statistics' update twice
        ref.zero_grad(), ours.zero_grad()
        x = (torch.randn(size, dtype=DT) * 2 + 0.5).contiguous(memory_format=CL)
        y = _check_step(ref, ours, x, ref_fn)
        assert type(y.grad_fn).__name__ == "_TrainBNBackward"        # the C++ path ran
        assert y.is_contiguous(memory_format=CL)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name))
    ref.eval(), ours.eval()
    x = torch.randn(size, dtype=DT).contiguous(memory_format=CL)
    torch.testing.assert_close(ours(x), ref_fn(x))


def test_batch_norm_leaves_what_it_does_not_cover_to_torch():
    ref, ours = _bn_pair(8, True, 0.1)
    x = torch.randn(4, 8, 5, 5, dtype=DT)                    # NCHW: torch's own BN
    y = ours(x)
    assert y.is_contiguous() and "TrainBN" not in type(y.grad_fn).__name__
    torch.testing.assert_close(y, torch.relu(ref(x)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ours(torch.randn(1, 8, 1, 1, dtype=DT).contiguous(memory_format=CL))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5])
def test_depthwise_matches_conv2d(k, stride):
    torch.manual_seed(10 * k + stride)
    ref = nn.Conv2d(48, 48, k, stride, k // 2, groups=48, bias=False).to(DT)
    ours = copy.deepcopy(ref)
    ours.__class__ = cpu_layers.DepthwiseConv2d
    x = torch.randn(3, 48, 9, 8, dtype=DT).contiguous(memory_format=CL)
    y = _check_step(ref, ours, x)
    assert "fbnet_fast_dw_conv" in type(y.grad_fn).__name__           # the C++ path ran


def _candidate_pair(c_in, c_out, stride, k, e, g, momentum):
    torch.manual_seed(c_in + 7 * k + e)
    ref = CandidateBlock(c_in, c_out, stride, k, e, g).to(DT).train()
    with torch.no_grad():
        for bn in (ref.bn1, ref.bn2, ref.bn3):
            bn.momentum = momentum
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return ref, cpu_layers.accelerate(copy.deepcopy(ref))


# (C_in, C_out, stride, kernel, expansion, groups): residual and not, both strides, grouped
CANDIDATE_SHAPES = [(8, 8, 1, 3, 1, 1), (8, 16, 2, 5, 6, 1), (16, 16, 1, 5, 1, 2),
                    (24, 24, 1, 3, 3, 1), (32, 48, 2, 3, 1, 2), (48, 48, 1, 5, 6, 1)]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "average"])
@pytest.mark.parametrize("shape", CANDIDATE_SHAPES, ids=lambda s: "k{3}_e{4}_g{5}_{0}_{1}_s{2}".format(*s))
def test_candidate_block_trains_as_the_fused_op(shape, momentum):
    """A candidate block trains as the one-candidate fused op: two steps give the block's
    output, every gradient and the BN buffers of the plain block; a forward without
    gradient (BN re-estimation) updates the buffers alike; eval runs the layers."""
    ref, ours = _candidate_pair(*shape, momentum)
    assert type(ours) is cpu_layers.FusedCandidateBlock
    for step in range(2):
        ref.zero_grad(), ours.zero_grad()
        x = (torch.randn(3, shape[0], 9, 7, dtype=DT) + 0.3).contiguous(memory_format=CL)
        y = _check_step(ref, ours, x)
        assert y.grad_fn.name() == "MixedBlockCpuBackward"               # the fused op ran
        for a, b in zip(ours.buffers(), ref.buffers(), strict=True):
            torch.testing.assert_close(a, b)
    x = torch.randn(2, shape[0], 5, 6, dtype=DT).contiguous(memory_format=CL)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
    for a, b in zip(ours.buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(a, b)
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours(x), ref(x))


def _train_step(model, x, y):
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss


def _assert_same_grads_and_buffers(fast, plain):
    for (name, a), b in zip(fast.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    for (name, a), b in zip(fast.named_buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_accelerated_fbnet_trains_like_the_plain_one():
    """A whole model at the quick preset's shapes, one training step, then eval: the same
    loss, gradients, BN buffers and eval output; the same state-dict keys and parameters."""
    torch.manual_seed(0)
    space = SearchSpace.small(width=0.25, head_channels=256)      # the quick preset's
    arch = Architecture(["k3_e6", "k5_e1_g2", "skip", "k5_e3", "skip", "k3_e1_g2"]
                        + ["k3_e1", "k5_e6", "k3_e3", "k5_e1"] * 4, space)
    plain = create_model(arch, num_classes=10).to(DT).to(memory_format=CL).train()
    fast = copy.deepcopy(plain)
    params = list(fast.parameters())
    assert cpu_layers.accelerate(fast) is fast
    assert list(fast.parameters()) == params and all(a is b for a, b in zip(fast.parameters(), params))
    assert list(fast.state_dict()) == list(plain.state_dict())
    bns = [m for m in fast.modules() if isinstance(m, cpu_layers.BatchNorm2d)]
    assert len(bns) == sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert sum(b.relu for b in bns) == sum(isinstance(m, nn.ReLU) for m in plain.modules())
    assert not any(isinstance(m, nn.ReLU) for m in fast.modules())
    assert sum(isinstance(m, cpu_layers.DepthwiseConv2d) for m in fast.modules()) == sum(
        isinstance(m, CandidateBlock) for m in plain.modules()) == sum(
        isinstance(m, cpu_layers.FusedCandidateBlock) for m in fast.modules())
    x = torch.randn(4, 3, 32, 32, dtype=DT).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (4,))
    torch.testing.assert_close(_train_step(fast, x, y), _train_step(plain, x, y))
    _assert_same_grads_and_buffers(fast, plain)
    fast.eval(), plain.eval()
    torch.testing.assert_close(fast(x), plain(x))


def test_fast_layers_follows_the_backend_choice():
    model = create_model(["k3_e3"] * 22, num_classes=10)
    assert registry.fast_layers(model, "cpu", "reference") is model
    assert not any(isinstance(m, cpu_layers.BatchNorm2d) for m in model.modules())
    registry.fast_layers(model, "cpu", "cpu")
    assert isinstance(model.stem[1], cpu_layers.BatchNorm2d) and model.stem[1].relu
    assert isinstance(model.stem[2], nn.Identity) and isinstance(model.stem, ConvBNReLU)
    with pytest.raises(ValueError, match="unknown backend 'fused'"):
        registry.fast_layers(model, "cpu", "fused")


def test_supernet_stem_and_head_train_like_the_plain_ones():
    """A SuperNet after ``fast_layers`` (what the search runs): its stem's and head's BN +
    ReLU on the C++ layers, the MixedBlocks untouched; one training step with the same masks
    gives the plain net's loss, every gradient (θ's included) and BN buffers, and the same
    state-dict keys."""
    from fbnet_fast import SuperNet
    torch.manual_seed(0)
    space = SearchSpace.small(width=0.25, head_channels=256)
    plain = SuperNet(space, num_classes=10, backend="cpu").to(DT).to(memory_format=CL).train()
    with torch.no_grad():
        for bn in (plain.stem[1], plain.head[1]):
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.normal_()
    fast = copy.deepcopy(plain)
    assert registry.fast_layers(fast, "cpu", "cpu") is fast
    assert [type(m[1]) for m in (fast.stem, fast.head)] == [cpu_layers.BatchNorm2d] * 2
    assert fast.stem[1].relu and fast.head[1].relu
    assert list(fast.state_dict()) == list(plain.state_dict())
    x = torch.randn(4, 3, 32, 32, dtype=DT).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (4,))
    loss = [nn.functional.cross_entropy(
        m(x, masks=m.sample_masks(4, torch.Generator().manual_seed(1))), y) for m in (fast, plain)]
    torch.testing.assert_close(loss[0], loss[1])
    probe = copy.deepcopy(fast.head[1])(torch.randn(2, 256, 3, 3, dtype=DT).contiguous(
        memory_format=CL))
    assert "TrainBN" in type(probe.grad_fn).__name__                     # the C++ path runs
    for l in loss:
        l.backward()
    _assert_same_grads_and_buffers(fast, plain)
