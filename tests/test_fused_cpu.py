"""What only the fused CPU backend has: it is ``auto``'s choice on CPU, saves less for
backward, and its scratch buffers are reused safely. Its outputs and gradients against the
reference, on every layer shape, are in test_backends.py; ``opcheck`` and ``torch.compile``
of its op (as of every backend's) are in test_compile.py."""
import subprocess
import sys
from collections import Counter

import pytest
import torch

import fbnet_fast
from fbnet_fast import MixedBlock
from fbnet_fast.backends import jit
from fbnet_fast.backends import registry as backends
from fbnet_fast.backends import fused_cpu
from fbnet_fast.backends.plan import bn1_stats_via_covariance, plan_for
from fbnet_fast.testing import LAYER_SHAPES, compare, make_pair, shape_id, single_thread

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


@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=shape_id)
def test_recomputing_backward_matches_reference(shape, monkeypatch):
    """With ``KEEP_BYTES = 0`` every call recomputes its intermediates in the backward, as the
    large maps do; test_backends.py's small maps take the path that keeps them."""
    monkeypatch.setattr(fused_cpu, "KEEP_BYTES", 0)
    c_in, c_out, stride = shape
    fused, ref = make_pair("cpu", c_in, c_out, stride, dtype=DT, seed=c_in + 3 * c_out)
    compare(fused, ref, batch=2, size=7 if c_in <= 64 else 5, per_example=c_in % 3 == 0,
            channels_last=c_out % 2 == 0, atol=1e-9, rtol=1e-9)


def _calls(fn, op: str) -> int:
    """How often ``fn`` calls the op ``fbnet_fast::<op>`` (from Python or C++: the
    profiler sees every call through the dispatcher)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == f"fbnet_fast::{op}")


def _keep_vs_recompute(fused, x, dy, monkeypatch) -> tuple:
    """(bytes saved, depthwise forwards) of a training step under ``KEEP_BYTES`` and with
    ``KEEP_BYTES = 0`` (every call recomputes), after checking their gradients are the same."""
    mask = torch.softmax(torch.randn(fused.num_candidates, dtype=DT), -1)

    def step():
        fused.zero_grad(set_to_none=True)
        xi, mi = x.clone().requires_grad_(), mask.clone().requires_grad_()
        saved = []
        calls = _calls(lambda: saved.append(_saved_bytes(lambda: fused(xi, mi).backward(dy))),
                       "dw_conv_bn_out")
        return saved[0], calls, [xi.grad, mi.grad] + [q.grad.clone() for q in fused.parameters()]

    kept, calls_kept, grads_kept = step()
    monkeypatch.setattr(fused_cpu, "KEEP_BYTES", 0)
    recomputed, calls_recomputed, grads = step()
    for a, b in zip(grads_kept, grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    return kept - recomputed, (calls_kept, calls_recomputed)


def _block_inputs(c_in, c_out, stride, size, batch=2):
    torch.manual_seed(0)
    fused, _ = make_pair("cpu", c_in, c_out, stride, dtype=DT)
    so = (size + stride - 1) // stride
    x = torch.randn(batch, c_in, size, size, dtype=DT)
    return fused, x, torch.randn(batch, c_out, so, so, dtype=DT), batch * size * size, batch * so * so


def _dense_w1(fused, m2: int) -> int:
    """Elements of the first 1x1's dense weight that a keeping call keeps too: where it is at
    most a quarter of D and Z (m2 output rows)."""
    L = fused.layout
    t, c, z = L.total_mid, L.in_channels, plan_for(L).n_conv * L.out_channels
    return t * c if 4 * t * c <= m2 * (t + z) else 0


@pytest.mark.parametrize("shape", [(16, 24, 2, 8), (112, 112, 1, 3), (64, 64, 1, 12)],
                         ids=["skip_conv_s2", "writes_a", "keeps_a_over_covariance"])
def test_small_calls_keep_their_intermediates(shape, monkeypatch):
    """Under ``KEEP_BYTES`` a training call saves D, Z, the skip conv's output, A where its
    backward would make A whole, and the first 1x1's dense weight where it is small next to
    D and Z (exactly their bytes more than recomputing), and its backward
    runs no depthwise forward; the gradients are those of the recomputing backward."""
    c_in, c_out, stride, size = shape
    fused, x, dy, m1, m2 = _block_inputs(c_in, c_out, stride, size)
    more, calls = _keep_vs_recompute(fused, x, dy, monkeypatch)
    L, p = fused.layout, plan_for(fused.layout)
    t = L.total_mid
    # the backward would make A whole: kept instead (at 64 channels, 288 rows, BN1's
    # statistics could come from X's covariance without A)
    writes_a = c_in > 32
    skip = c_out if L.skip_is_conv else 0
    # and where the kept A gave BN1's statistics, not X's covariance, the recomputing call
    # saves X's mean and covariance instead
    cov = writes_a * bn1_stats_via_covariance(m1, c_in) * (c_in * c_in + c_in)
    w1 = _dense_w1(fused, m2)
    assert more == 8 * (m2 * (t + p.n_conv * c_out + skip) + writes_a * m1 * t - cov + w1)
    assert calls == (1, 2)


@pytest.mark.parametrize("shape, keeps", [((112, 184, 2, 32), True), ((32, 32, 1, 30), False)],
                         ids=["112ch-keeps", "32ch-recomputes"])
def test_wide_blocks_keep_more(shape, keeps, monkeypatch):
    """Both calls' D, Z (and skip conv output) are over KEEP_BYTES (14-17 MB, 13-16 MiB):
    the 112-channel block keeps them (its budget grows with its channels, to 21 MiB:
    recomputing costs more per byte there), the 32-channel one recomputes them."""
    c_in, c_out, stride, size = shape
    fused, x, dy, m1, m2 = _block_inputs(c_in, c_out, stride, size)
    L, p = fused.layout, plan_for(fused.layout)
    assert bn1_stats_via_covariance(m1, c_in)     # no A needed for BN1's statistics
    skip = c_out if L.skip_is_conv else 0
    big = 8 * m2 * (L.total_mid + p.n_conv * c_out + skip)
    assert fused_cpu.KEEP_BYTES < big < fused_cpu.KEEP_BYTES * 112 // 64
    more, calls = _keep_vs_recompute(fused, x, dy, monkeypatch)
    big += 8 * _dense_w1(fused, m2)
    assert (more, calls) == ((big, (1, 2)) if keeps else (0, (2, 2)))


def test_keeps_a_for_d_where_all_three_do_not_fit(monkeypatch):
    """64 channels, stride 1, 648 rows: D and Z (10 MB) fit KEEP_BYTES, with A (17 MB) they do
    not. The call keeps A and Z instead of D (as large as A at stride 1), and the dense first-1x1
    weight: its backward remakes D
    with a depthwise forward, not A with a GEMM; the gradients are the recomputing backward's."""
    c = 64
    fused, x, dy, m, _ = _block_inputs(c, c, 1, 18)
    t, z = fused.layout.total_mid, plan_for(fused.layout).n_conv * c
    assert m * (t + z) * 8 <= fused_cpu.KEEP_BYTES < m * (2 * t + z) * 8
    assert bn1_stats_via_covariance(m, c)
    more, calls = _keep_vs_recompute(fused, x, dy, monkeypatch)
    # A and Z kept; the recomputing call keeps X's mean and covariance instead (BN1's
    # statistics came from them; the keeping call's came from A)
    assert more == 8 * (m * (t + z) - (c * c + c) + _dense_w1(fused, m))
    assert calls == (2, 2)


def test_main_job_step_saves_an_eighth_of_the_reference():
    """At the main job's size (quick preset: 32x32, width 0.25, batch 32) most layers keep D
    and Z, and the whole supernet still saves under an eighth of the reference's bytes."""
    space = fbnet_fast.SearchSpace.small(resolution=32, width=0.25, head_channels=256)
    x = torch.randn(32, 3, 32, 32)
    saved = {}
    for backend in ("cpu", "reference"):
        torch.manual_seed(0)
        net = fbnet_fast.SuperNet(space, num_classes=10, backend=backend).train()
        saved[backend] = _saved_bytes(lambda: net(x))
    assert saved["cpu"] * 8 < saved["reference"], saved


def test_workspace_reuse_is_safe():
    """Scratch buffers are reused across calls and grow with the shape: outputs and gradients
    of earlier calls must not change, in training, eval and inference mode alike."""
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


@pytest.mark.parametrize("set_to_none", [True, False], ids=["zero_grad", "accumulate"])
def test_pooled_weight_gradients_across_steps(set_to_none):
    """The weight gradients the ops return come from a block pool that takes a block back
    when its tensor is freed: gradients kept from one step stay as they were through the
    next, and .grad holds the reference's, whether zeroed between steps or accumulated."""
    fused, ref = make_pair("cpu", 64, 64, 1, dtype=DT, seed=11)  # 64 channels: the whole-dA path
    g = torch.Generator().manual_seed(12)
    inputs = [(torch.randn(2, 64, 5, 5, dtype=DT, generator=g),
               torch.softmax(torch.randn(9, dtype=DT, generator=g), -1),
               torch.randn(2, 64, 5, 5, dtype=DT, generator=g)) for _ in range(3)]
    held = []
    for x, mask, dy in inputs:
        for block in (fused, ref):
            if set_to_none:
                block.zero_grad(set_to_none=True)
            block(x, mask).backward(dy)
        held.append([(q.grad, q.grad.clone()) for q in fused.parameters()])
        for a, b in zip(fused.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-9)
    for step in held:
        for grad, value in step:
            if set_to_none:                     # (accumulated ones are one tensor, updated)
                torch.testing.assert_close(grad, value, rtol=0, atol=0)


@pytest.mark.parametrize("per_example", [False, True], ids=["batch_mask", "example_mask"])
def test_eager_function_matches_the_custom_op(monkeypatch, per_example):
    """Eager calls run the op's implementation through an autograd.Function: its output, every
    gradient and the running statistics equal those of the custom op (grouped candidates, a
    conv skip, stride 2)."""
    from fbnet_fast.backends import fused_cpu
    assert fused_cpu.mixed_block_eager is not None

    def run(eager):
        monkeypatch.setattr(fused_cpu, "mixed_block_eager", eager)
        torch.manual_seed(3)
        block = MixedBlock(16, 24, 2, backend="cpu").to(DT).train()
        x = torch.randn(3, 16, 9, 9, dtype=DT, requires_grad=True)
        shape = (3, 9) if per_example else (9,)
        mask = torch.softmax(torch.randn(shape, dtype=DT), -1).requires_grad_()
        y = block(x, mask)
        y.backward(torch.randn_like(y))
        grads = [x.grad, mask.grad] + [p.grad for p in block.parameters()]
        return [y.detach(), *grads, *(b.clone() for b in block.buffers())]

    for a, b in zip(run(fused_cpu.mixed_block_eager), run(None), strict=True):
        torch.testing.assert_close(a, b)


def _profiled_backward(y, dy) -> list:
    """The profiler's events of ``y.backward(dy)``: the ops the C++ backward node called,
    with their scalar arguments (``concrete_inputs``)."""
    with torch.profiler.profile(record_shapes=True) as prof:
        y.backward(dy)
    return prof.events()


def _bool_args(events, op: str) -> list:
    """Each call of ``op`` among ``events``: its bool arguments."""
    return [[v for v in e.concrete_inputs if isinstance(v, bool)]
            for e in events if e.name == op]


@pytest.mark.parametrize("shape", [(16, 24, 2, 9), (24, 24, 1, 8), (112, 112, 1, 3)],
                         ids=["skip_conv_s2", "residual", "whole_gemms"])
def test_frozen_weights_skip_their_gradients(shape):
    """A θ step freezes the weights: the backward node asks its kernels for no weight
    gradients (the second 1x1s' and the depthwise backward get weight_grads=False) and gives
    the same input and mask gradients as the full backward, in float64; a conv skip, a
    residual layer and the 112-channel case whose first 1x1 runs as whole GEMMs."""
    c_in, c_out, stride, size = shape
    torch.manual_seed(4)
    block = MixedBlock(c_in, c_out, stride, backend="cpu").to(DT).train()
    x = torch.randn(3, c_in, size, size, dtype=DT)
    mask = torch.softmax(torch.randn(block.num_candidates, dtype=DT), -1)
    dy = torch.randn(3, c_out, (size + stride - 1) // stride, (size + stride - 1) // stride,
                     dtype=DT)

    def grads(frozen):
        for p in block.parameters():
            p.requires_grad_(not frozen)
            p.grad = None
        xi, mi = x.clone().requires_grad_(), mask.clone().requires_grad_()
        events = _profiled_backward(block(xi, mi), dy)
        for op in ("fbnet_fast::pointwise_bn_backward_out", "fbnet_fast::dw_conv_bn_backward_out"):
            assert _bool_args(events, op) == [[not frozen]], op
        return xi.grad, mi.grad

    full = grads(False)
    frozen = grads(True)
    assert all(p.grad is None for p in block.parameters())
    for a, b in zip(frozen, full, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shape", [(16, 24, 2, 9), (24, 24, 1, 8), (16, 16, 1, 6)],
                         ids=["skip_conv_s2", "residual", "residual_small"])
def test_mask_without_grad_skips_its_gradient(shape):
    """A weight step samples its masks without a graph: the backward node skips the skip
    path's share of the mask's gradient and gives the same input and weight gradients as
    with a mask that needs one, in float64; a conv skip and two residual layers."""
    c_in, c_out, stride, size = shape
    torch.manual_seed(6)
    block = MixedBlock(c_in, c_out, stride, backend="cpu").to(DT).train()
    x = torch.randn(3, c_in, size, size, dtype=DT)
    mask = torch.softmax(torch.randn(3, block.num_candidates, dtype=DT), -1)
    out = (size + stride - 1) // stride
    dy = torch.randn(3, c_out, out, out, dtype=DT)

    def grads(mask_grad):
        block.zero_grad(set_to_none=True)
        xi, mi = x.clone().requires_grad_(), mask.clone().requires_grad_(mask_grad)
        events = _profiled_backward(block(xi, mi), dy)
        ops = Counter(e.name for e in events if e.name.startswith(("aten::", "fbnet_fast::")))
        return [xi.grad] + [p.grad for p in block.parameters()], mi.grad, ops

    (with_mask, dmask, ops), (without, none, fewer) = grads(True), grads(False)
    assert none is None and dmask.abs().sum() > 0
    # without: no product of the output gradient with the skip path and no sum of it, and
    # no kernel call more
    assert all(fewer[op] == ops[op] - 1 for op in ("aten::mul", "aten::sum"))
    assert all(n <= ops[op] for op, n in fewer.items() if op.startswith("fbnet_fast::"))
    for a, b in zip(without, with_mask, strict=True):
        torch.testing.assert_close(a, b)


def test_backward_node_guards_its_saved_tensors():
    """The eager path's C++ backward node: with retain_graph a second backward gives the same
    gradients again; without, it says the saved tensors were freed; an input changed in place
    after the forward is caught, as for any autograd node."""
    torch.manual_seed(8)
    block = MixedBlock(16, 16, 1, backend="cpu").to(DT).train()
    x = torch.randn(2, 16, 6, 6, dtype=DT, requires_grad=True)
    mask = torch.softmax(torch.randn(block.num_candidates, dtype=DT), -1).requires_grad_()
    y = block(x, mask)
    assert y.grad_fn.name() == "MixedBlockCpuBackward"
    dy = torch.randn_like(y)
    y.backward(dy, retain_graph=True)
    first = x.grad.clone()
    y.backward(dy)
    torch.testing.assert_close(x.grad, 2 * first)
    with pytest.raises(RuntimeError, match="saved tensors were freed"):
        y.backward(dy)
    y = block(x, mask)
    with torch.no_grad():
        block.pw1_weight.mul_(1.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(dy)


_TWO_THREADS = r"""
import torch
from fbnet_fast.testing import compare, make_pair
torch.set_num_threads(2)
# 112 channels: the second 1x1s' weights pass 512 KB, so their GEMMs run split over the
# two threads (pointwise.cpp's for_segments_split)
fused, ref = make_pair("cpu", 112, 112, 1)
packed = []
def pack(t):
    packed.append(t.shape)
    return t
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    compare(fused, ref, size=3)
assert packed, "the hooks saw nothing"
fused.eval(), ref.eval()
g = torch.Generator().manual_seed(1)
x = torch.randn(2, 112, 3, 3, generator=g, dtype=torch.float64)
mask = torch.rand(9, generator=g, dtype=torch.float64)
with torch.inference_mode():
    torch.testing.assert_close(fused(x, mask), ref(x, mask))
print("ok")
"""


def test_threads_under_saved_tensor_hooks_and_inference_mode():
    """With two threads, under Python saved-tensor hooks (which a copy of the caller's
    whole thread-local state would take the GIL for, from a worker, while the caller holds
    it: a deadlock) and in inference mode, the wide layers' split GEMMs give the
    reference's outputs and gradients. A subprocess: the tests here run on one thread, and
    a deadlock fails after the timeout instead of hanging the run."""
    proc = subprocess.run([sys.executable, "-c", _TWO_THREADS], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
