"""What only the fused CPU backend has: it is ``auto``'s choice on CPU, saves less for
backward, and its scratch buffers are reused safely. Its outputs and gradients against the
reference, on every layer shape, are in test_backends.py; ``opcheck`` and ``torch.compile``
of its op (as of every backend's) are in test_compile.py."""
import pytest
import torch

import fbnet_fast
from fbnet_fast import MixedBlock
from fbnet_fast.backends import jit
from fbnet_fast.backends import registry as backends
from fbnet_fast.testing import compare, make_pair, single_thread

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


@pytest.mark.parametrize("per_example", [False, True], ids=["batch_mask", "example_mask"])
def test_eager_function_matches_the_custom_op(monkeypatch, per_example):
    """Eager calls run the op's implementation through an autograd.Function: its output, every
    gradient and the running statistics equal those of the custom op (grouped candidates, a
    conv skip, stride 2)."""
    from fbnet_fast.backends import fused_cpu
    assert fused_cpu._eager is not None

    def run(eager):
        monkeypatch.setattr(fused_cpu, "_eager", eager)
        torch.manual_seed(3)
        block = MixedBlock(16, 24, 2, backend="cpu").to(DT).train()
        x = torch.randn(3, 16, 9, 9, dtype=DT, requires_grad=True)
        shape = (3, 9) if per_example else (9,)
        mask = torch.softmax(torch.randn(shape, dtype=DT), -1).requires_grad_()
        y = block(x, mask)
        y.backward(torch.randn_like(y))
        grads = [x.grad, mask.grad] + [p.grad for p in block.parameters()]
        return [y.detach(), *grads, *(b.clone() for b in block.buffers())]

    for a, b in zip(run(fused_cpu._eager), run(None), strict=True):
        torch.testing.assert_close(a, b)
