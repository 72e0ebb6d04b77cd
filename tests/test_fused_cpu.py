"""What only the fused CPU backend has: it is ``auto``'s choice on CPU, saves less for
backward, its custom op passes ``opcheck`` and ``torch.compile``, and its scratch buffers
are reused safely. Its outputs and gradients against the reference, on every layer shape,
are in test_backends.py."""
import pytest
import torch

import fbnet_fast
from fbnet_fast import MixedBlock
from fbnet_fast.backends import jit
from fbnet_fast.backends import registry as backends
from fbnet_fast.testing import compare, make_pair, randomize, single_thread

pytestmark = pytest.mark.skipif(not jit.load(), reason=f"C++ kernels unavailable: {jit.why_unavailable()}")

DT = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """See ``fbnet_fast.testing.single_thread``; the kernels' threading is covered by
    test_cpu_kernels.py and test_backends.py::test_other_candidate_lists."""
    with single_thread():
        yield


def test_backend_choice():
    cpu = torch.device("cpu")
    assert backends.pick_name("auto", cpu) == "cpu"
    assert backends.pick_name("reference", cpu) == "reference"
    assert MixedBlock(8, 8, 1).backend == "auto"
    assert backends.resolve("auto", cpu) is fbnet_fast.backends.fused_cpu.mixed_block_forward


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
    fused, ref = make_pair("cpu", 24, 24, 1)
    x = torch.randn(4, 24, 28, 28, dtype=DT, requires_grad=True)
    mask = torch.softmax(torch.randn(9, dtype=DT), -1).requires_grad_()
    b_ref = _saved_bytes(lambda: ref(x, mask))
    b_fused = _saved_bytes(lambda: fused(x, mask))
    assert b_fused * 8 <= b_ref, (b_fused, b_ref)


def test_opcheck():
    from fbnet_fast.backends import fused_cpu  # noqa: F401  (defines the op on import)
    torch.manual_seed(0)
    block, _ = make_pair("cpu", 8, 16, 2, ("k3_e1_g2", "k5_e3", "skip"), seed=1)
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
    randomize(net, torch.Generator().manual_seed(0))
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
    from fbnet_fast.backends import fused_cpu
    fused, ref = make_pair("cpu", 8, 16, 2, seed=4)
    fused_cpu.clear_workspace()
    first = compare(fused, ref, size=5)
    ours = (first.output[0], first.grad_x[0], first.grad_mask[0])
    kept = [t.clone() for t in ours]
    compare(fused, ref, batch=3, size=9, channels_last=True, seed=1)   # the buffers grow here
    for a, b in zip(ours, kept):
        torch.testing.assert_close(a, b)
    ref.eval(), fused.eval()
    big = torch.randn(3, 8, 9, 9, dtype=DT).contiguous(memory_format=torch.channels_last)
    mask = torch.rand(9, dtype=DT)
    with torch.inference_mode():
        y_inf = fused(big, mask)
    torch.testing.assert_close(y_inf, ref(big, mask))
    compare(fused, ref, size=5, seed=2)                 # buffers made in inference mode
