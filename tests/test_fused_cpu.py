"""The fused CPU MixedBlock backend against the reference backend, in float64."""
import pytest
import torch

import fbnet_fast
from fbnet_fast import MixedBlock
from fbnet_fast.backends import jit
from fbnet_fast.backends import registry as backends
from fbnet_fast.nn.space import SearchSpace

from _helpers import randomize_bn

pytestmark = pytest.mark.skipif(not jit.load(), reason=f"C++ kernels unavailable: {jit.why_unavailable()}")

DT = torch.float64
# Every distinct (C_in, C_out, stride) of the FBNet space, run on small maps.
LAYERS = sorted({(l.in_channels, l.out_channels, l.stride) for l in SearchSpace().layers()})


def sizes(c_in):
    """Two map sizes (even and odd), smaller for the wide layers to keep the test quick."""
    return (8, 7) if c_in <= 32 else (6, 5) if c_in <= 64 else (4, 5)


@pytest.fixture(autouse=True)
def one_thread(request):
    """float64 reference convs run one slow call per depthwise group, and OpenMP on a busy
    2-core machine makes each 100x slower; the kernels' threading is covered by
    test_cpu_kernels.py and by ``test_other_candidate_lists`` (default threads)."""
    if request.function.__name__ == "test_other_candidate_lists":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_pair(c_in, c_out, stride, seed, candidates=None):
    """A reference block with random weights and BN state, and a fused copy of it."""
    torch.manual_seed(seed)
    ref = MixedBlock(c_in, c_out, stride, candidates, backend="reference").to(DT)
    randomize_bn(ref, torch.Generator().manual_seed(seed))
    fused = MixedBlock(c_in, c_out, stride, candidates, backend="cpu").to(DT)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def run_both(ref, fused, x, mask):
    """Outputs and gradients (x, mask, every parameter) of both blocks for one random dy."""
    out = []
    dy = None
    for m in (ref, fused):
        xi, mi = x.clone().requires_grad_(), mask.clone().requires_grad_()
        m.zero_grad()
        y = m(xi, mi)
        dy = torch.randn_like(y) if dy is None else dy
        y.backward(dy)
        grads = {n: p.grad for n, p in m.named_parameters()}
        out.append((y, xi.grad, mi.grad, grads))
    return out


def assert_same(a, b):
    (y1, dx1, dm1, g1), (y2, dx2, dm2, g2) = a, b
    torch.testing.assert_close(y2, y1)
    torch.testing.assert_close(dx2, dx1)
    torch.testing.assert_close(dm2, dm1)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("layer", LAYERS, ids=lambda l: "{}-{}-s{}".format(*l))
def test_matches_reference(layer):
    c_in, c_out, stride = layer
    ref, fused = make_pair(c_in, c_out, stride, seed=c_in * 7 + c_out)
    for step, (per_example, channels_last) in enumerate([(False, True), (True, False)]):
        size = sizes(c_in)[step]
        x = torch.randn(2, c_in, size, size, dtype=DT)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        k = ref.num_candidates
        mask = torch.softmax(torch.randn((2, k) if per_example else (k,), dtype=DT), -1)
        a, b = run_both(ref, fused, x, mask)
        assert_same(a, b)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert b[0].is_contiguous(memory_format=fmt) and b[1].is_contiguous(memory_format=fmt)
        # Running statistics updated once, with momentum 0.1 and the unbiased variance.
        for (n1, t1), (n2, t2) in zip(ref.named_buffers(), fused.named_buffers()):
            assert n1 == n2
            torch.testing.assert_close(t2, t1, msg=lambda m: f"buffer {n1}: {m}")
    ref.eval()
    fused.eval()
    x = torch.randn(3, c_in, 3, 3, dtype=DT)
    mask = torch.softmax(torch.randn(3, ref.num_candidates, dtype=DT), -1)
    assert_same(*run_both(ref, fused, x, mask))


@pytest.mark.parametrize("candidates", [("k3_e1_g2", "skip", "k5_e3", "k3_e6", "k5_e1_g2"),
                                        ("k5_e1", "k3_e3")], ids=["reordered", "no-skip"])
def test_other_candidate_lists(candidates):
    """Kernel sizes interleaved (several depthwise runs), grouped first, no skip."""
    ref, fused = make_pair(8, 16, 2, seed=3, candidates=candidates)
    x = torch.randn(3, 8, 6, 6, dtype=DT)
    mask = torch.rand(3, len(candidates), dtype=DT)
    assert_same(*run_both(ref, fused, x, mask))


def test_backend_choice():
    cpu = torch.device("cpu")
    assert backends.pick_name("auto", cpu) == "cpu"
    assert backends.pick_name("reference", cpu) == "reference"
    assert MixedBlock(8, 8, 1).backend == "auto"
    assert backends.resolve("auto", cpu) is fbnet_fast.backends.fused_cpu.mixed_block_forward


def test_training_needs_more_than_one_value():
    block = MixedBlock(8, 16, 2, backend="cpu")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        block(torch.randn(1, 8, 1, 1), torch.ones(9) / 9)


def _saved_bytes(fn) -> int:
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_saves_an_eighth_of_the_reference():
    torch.manual_seed(0)
    ref, fused = make_pair(24, 24, 1, seed=0)
    x = torch.randn(4, 24, 28, 28, dtype=DT, requires_grad=True)
    mask = torch.softmax(torch.randn(9, dtype=DT), -1).requires_grad_()
    b_ref = _saved_bytes(lambda: ref(x, mask))
    b_fused = _saved_bytes(lambda: fused(x, mask))
    assert b_fused * 8 <= b_ref, (b_fused, b_ref)


def test_opcheck():
    torch.manual_seed(0)
    _, block = make_pair(8, 16, 2, seed=1, candidates=("k3_e1_g2", "k5_e3", "skip"))
    x = torch.randn(2, 8, 5, 5, dtype=DT, requires_grad=True)
    mask = torch.rand(2, 3, dtype=DT, requires_grad=True)
    b = block
    args = (x, mask, b.pw1_weight, b.dw_weight, b.pw2_weight, b.bn1_weight, b.bn1_bias,
            b.bn2_weight, b.bn2_bias, b.bn3_weight, b.bn3_bias, b.skip_weight,
            b.skip_bn_weight, b.skip_bn_bias,
            [getattr(b, f"{r}_running_{k}") for r in ("bn1", "bn2", "bn3", "skip_bn")
             for k in ("mean", "var")],
            b.layout.key(), True)
    torch.library.opcheck(torch.ops.fbnet_fast.mixed_block_cpu.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    net = torch.nn.ModuleList([MixedBlock(8, 8, 1, backend="cpu"),
                               MixedBlock(8, 16, 2, backend="cpu")]).to(DT)
    randomize_bn(net, torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in net.state_dict().items()}

    def run(x, m):
        return net[1](net[0](x, m[0]), m[1])

    x = torch.randn(2, 8, 6, 6, dtype=DT)
    m = torch.softmax(torch.randn(2, 9, dtype=DT), -1)
    outs = []
    for fn in (run, torch.compile(run, fullgraph=True)):
        net.load_state_dict(state)
        net.zero_grad()
        xi = x.clone().requires_grad_()
        y = fn(xi, m)
        y.square().sum().backward()
        outs.append((y, xi.grad, net[0].pw1_weight.grad, net[1].bn1_running_var.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a)


def test_workspace_reuse_is_safe():
    """Scratch buffers are reused across calls and grow with the shape: outputs and gradients
    of earlier calls must not change, in training, eval and inference mode alike."""
    ref, fused = make_pair(8, 16, 2, seed=4)
    from fbnet_fast.backends import fused_cpu
    fused_cpu.clear_workspace()
    mask = torch.softmax(torch.randn(9, dtype=DT), -1)
    small = torch.randn(2, 8, 5, 5, dtype=DT)
    first = run_both(ref, fused, small, mask)
    kept = [[t.clone() for t in (y, dx, dm)] for y, dx, dm, _ in first]
    big = torch.randn(3, 8, 9, 9, dtype=DT).contiguous(memory_format=torch.channels_last)
    assert_same(*run_both(ref, fused, big, mask))          # the buffers grow here
    for (y, dx, dm, _), k in zip(first, kept):
        for a, b in zip((y, dx, dm), k):
            torch.testing.assert_close(a, b)
    ref.eval(), fused.eval()
    with torch.inference_mode():
        y_inf = fused(big, mask)
    torch.testing.assert_close(y_inf, ref(big, mask))
    ref.train(), fused.train()
    assert_same(*run_both(ref, fused, small, mask))        # buffers made in inference mode
