"""What only the Triton backend has: bf16 autocast, its reason for not running, the CUDA
backend's depthwise step through its pipeline, and bench/gpu_report.py's smoke run. Its
outputs and gradients against the reference, on every layer shape, are in
test_backends.py. Without CUDA this runs in Triton's CPU interpreter in float64
(TRITON_INTERPRET is set before triton is imported; see test_triton_kernels.py).
"""
from __future__ import annotations

import os
import weakref

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from fbnet_fast.testing import compare, make_pair, shape_id  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.float32 if CUDA else torch.float64
TOL = dict(atol=2e-4, rtol=2e-4) if CUDA else dict(atol=1e-9, rtol=1e-9)


@pytest.fixture(scope="module", autouse=True)
def _triton_usable():
    from fbnet_fast.backends.fused_triton import why_unavailable
    why = why_unavailable(DEVICE)
    if why is not None:
        pytest.skip(why)


@pytest.mark.skipif(not CUDA, reason="autocast with bf16 kernels needs a GPU")
def test_bf16_autocast_close_to_fp32_reference():
    fused, ref = make_pair("triton", 32, 64, 2, dtype=torch.float32, device=DEVICE)
    x = torch.randn(4, 32, 14, 14, device=DEVICE)
    w = torch.rand(fused.num_candidates, device=DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = fused(x, w)
    assert y.dtype == torch.bfloat16
    y_ref = ref(x, w)
    torch.testing.assert_close(y.float(), y_ref, atol=0.1, rtol=0.05)
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in fused.parameters())


def test_unavailable_without_interpreter_says_why(monkeypatch):
    from fbnet_fast.backends.fused_triton import why_unavailable
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in why_unavailable("cpu")


@pytest.mark.skipif(CUDA, reason="the interpreter check runs for CPU tensors")
def test_interpreter_that_cannot_loop_to_loaded_bounds_is_a_clear_reason(monkeypatch):
    """Triton's interpreter before its numpy-2.4 fix fails on loaded loop bounds (seen with
    triton 3.6): why_unavailable says so and what to do, instead of a kernel stack trace."""
    from fbnet_fast.backends.fused_triton import load_kernels, why_unavailable
    utils = load_kernels().utils
    assert utils.interpreter_problem() is None            # this interpreter can

    class Broken:
        def __getitem__(self, grid):
            def run(*args):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return run
    monkeypatch.setattr(utils, "_loaded_bound_kernel", Broken())
    utils.interpreter_problem.cache_clear()
    try:
        why = why_unavailable("cpu")
    finally:
        monkeypatch.undo()
        utils.interpreter_problem.cache_clear()
    assert "cannot run loops whose bound is read from memory" in why
    assert "only 0-dimensional arrays" in why and "numpy<2.4" in why
    assert utils.interpreter_problem() is None


class _LiveBytes(TorchDispatchMode):
    """The most bytes of tensor storage that ops under this mode held at once (each storage
    counted from the op that made it until it is freed)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def _free(self, key, n):
        self.seen.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in self.seen:
                s = t.untyped_storage()
                self.seen.add(id(s))
                self.live += s.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(s, self._free, id(s), s.nbytes())
        return out


@pytest.mark.parametrize("shape", [(16, 16, 1), (24, 32, 2)], ids=shape_id)
def test_backward_holds_few_expanded_tensors(shape):
    """The backward's own allocations peak at about 4 expanded-size tensors ([N*H*W,
    total_mid]: the recomputed A and D, the gradient written over in place, and the small
    ones): 8.8 of them when the BN + ReLU backward ran as PyTorch ops. On a GPU this peak
    is the SuperNet's (bench/RESULTS.md, "GPU: the first run")."""
    from fbnet_fast.backends import fused_triton as ft
    from fbnet_fast.backends.plan import fused_op_args, plan_for
    fused, _ = make_pair("triton", *shape, dtype=DTYPE, device=DEVICE)
    n, size = 2, 8
    x = torch.randn(n, shape[0], size, size, dtype=DTYPE, device=DEVICE)
    w = torch.softmax(torch.randn(fused.num_candidates, dtype=DTYPE, device=DEVICE), 0)
    args = fused_op_args(fused, x.contiguous(memory_format=torch.channels_last), w)
    params, layout = args[2:14], args[15]
    with torch.no_grad():
        y, stats = ft._forward(ft.TritonDepthwise(), args[0], w, params, args[14], layout,
                               True, DTYPE)
        live = _LiveBytes()
        with live:
            grads = ft._backward(ft.TritonDepthwise(), torch.randn_like(y), args[0], w, params,
                                 stats, layout, True, DTYPE)
    expanded = n * size * size * plan_for(layout).layout.total_mid * DTYPE.itemsize
    assert len(grads) == 14 and live.peak > 3 * expanded   # A, D and one gradient at least
    assert live.peak <= 4.5 * expanded, live.peak / expanded


@pytest.mark.parametrize("shape", [(16, 24, 2), (24, 24, 1)], ids=shape_id)
def test_frozen_weights_skip_their_gradient_kernels(shape):
    """A θ step freezes the weights: the eager backward skips their gradient kernels (the
    pointwise and depthwise grad-weight launches) and gives the same input and mask
    gradients as the full backward; a conv skip and a residual layer."""
    from fbnet_fast.backends.fused_triton import load_kernels
    from fbnet_fast import MixedBlock
    utils = load_kernels().utils
    c_in, c_out, stride = shape
    torch.manual_seed(4)
    block = MixedBlock(c_in, c_out, stride, backend="triton").to(DEVICE, DTYPE).train()
    size, out = 5, (5 + stride - 1) // stride
    x = torch.randn(2, c_in, size, size, dtype=DTYPE, device=DEVICE)
    mask = torch.softmax(torch.randn(block.num_candidates, dtype=DTYPE, device=DEVICE), -1)
    dy = torch.randn(2, c_out, out, out, dtype=DTYPE, device=DEVICE)

    def grads(frozen):
        for p in block.parameters():
            p.requires_grad_(not frozen)
            p.grad = None
        xi, mi = x.clone().requires_grad_(), mask.clone().requires_grad_()
        y = block(xi, mi)
        with utils.recording(run=True) as launches:
            y.backward(dy)
        return (xi.grad, mi.grad), [launch.kernel.__name__ for launch in launches]

    full, kernels_full = grads(False)
    frozen, kernels_frozen = grads(True)
    weight_kernels = {"_pointwise_grad_weight_kernel", "_dw_grad_weight_kernel"}
    assert weight_kernels <= set(kernels_full)
    assert not weight_kernels & set(kernels_frozen)
    assert [k for k in kernels_full if k not in weight_kernels] == kernels_frozen
    assert all(p.grad is None for p in block.parameters())
    for a, b in zip(frozen, full, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_cuda_backend_depthwise_glue_with_the_cpu_ops():
    """fused_cuda's depthwise adapter, run through the same-schema C++ CPU ops."""
    from fbnet_fast.backends import jit
    if CUDA:
        from fbnet_fast.backends.fused_cuda import why_unavailable
        if why_unavailable(DEVICE) is not None:
            pytest.skip(why_unavailable(DEVICE))
    elif not jit.load():
        pytest.skip(jit.why_unavailable())
    fused, ref = make_pair("triton", 16, 24, 2, ("k3_e1", "k5_e1_g2", "k5_e3", "skip"),
                           dtype=DTYPE, device=DEVICE)
    from fbnet_fast.backends.fused_cuda import mixed_block_forward
    fused.num_batches_tracked.add_(1)   # MixedBlock.forward's job, bypassed here
    fused.forward = lambda x, w: mixed_block_forward(fused, x, w)
    compare(fused, ref, size=5, per_example=True, **TOL)


def test_gpu_report_smoke_on_cpu(tmp_path):
    """bench/gpu_report.py's correctness part, on CPU in the interpreter (as a subprocess,
    so it sets TRITON_INTERPRET itself before importing triton)."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "report.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(repo / "bench" / "gpu_report.py"), "--device",
                           "cpu", "--quick", "--out", str(out)], env=env, cwd=repo,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 2 and "interpreter cannot run" in proc.stderr:
        pytest.skip(proc.stderr.strip())   # e.g. triton 3.6 with numpy >= 2.4
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["correctness"] and all(c["ok"] for c in report["correctness"])
    assert report["timings"] == []
