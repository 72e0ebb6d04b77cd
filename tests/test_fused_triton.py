"""MixedBlock(backend="triton") against the reference supernet layer.

Every distinct FBNet layer shape (all 22 layers' (C_in, C_out, stride), at a 4x4 or 5x5
map, batch 2): output, the gradient of x, of every parameter and of the mask (per batch
and per example), the running statistics, NCHW and channels_last, train and eval. Without
CUDA this runs in Triton's CPU interpreter in float64 (TRITON_INTERPRET is set before
triton is imported; see test_triton_kernels.py).
"""
from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from fbnet_fast import MixedBlock  # noqa: E402
from fbnet_fast.nn.space import SearchSpace  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.float32 if CUDA else torch.float64
TOL = dict(atol=2e-4, rtol=2e-4) if CUDA else dict(atol=1e-9, rtol=1e-9)

SHAPES = sorted({(l.in_channels, l.out_channels, l.stride) for l in SearchSpace().layers()})
# The interpreter is slow on the widest layers: there, a subset with both kernel sizes, a
# grouped candidate, the largest expansion and the skip (every stride / channel-change /
# skip-conv combination also appears with all nine candidates at C_in <= 64).
WIDE_SUBSET = ("k3_e1", "k5_e1_g2", "k5_e6", "skip")


@pytest.fixture(scope="module", autouse=True)
def _triton_usable():
    from fbnet_fast.backends.fused_triton import why_unavailable
    why = why_unavailable(DEVICE)
    if why is not None:
        pytest.skip(why)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.backends.cudnn, "allow_tf32", False)
        yield


def make_pair(c_in, c_out, stride, candidates=None):
    """A triton block and a reference block with the same non-trivial weights and BN state."""
    torch.manual_seed(c_in * 1000 + c_out * 10 + stride)
    fused = MixedBlock(c_in, c_out, stride, candidates, backend="triton")
    with torch.no_grad():
        for name, p in fused.named_parameters():
            if "bn" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.5)
        for name, b in fused.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.3)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    fused = fused.to(DEVICE, DTYPE)
    ref = MixedBlock(c_in, c_out, stride, candidates, backend="reference").to(DEVICE, DTYPE)
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def run_and_compare(fused, ref, x, weights):
    xa, wa = x.clone().requires_grad_(), weights.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), weights.clone().requires_grad_()
    ya, yb = fused(xa, wa), ref(xb, wb)
    torch.testing.assert_close(ya, yb, **TOL)
    assert ya.is_contiguous(memory_format=torch.channels_last) == (
        x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
    dy = torch.randn_like(yb)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL, msg="grad x")
    torch.testing.assert_close(wa.grad, wb.grad, **TOL, msg="grad mask")
    for (name, pa), (_, pb) in zip(fused.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, **TOL, msg=f"grad {name}")
    for (name, ba), (_, bb) in zip(fused.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(ba, bb, **TOL, msg=f"buffer {name}")


@pytest.mark.parametrize("c_in,c_out,stride", SHAPES)
def test_every_layer_shape_train(c_in, c_out, stride):
    fused, ref = make_pair(c_in, c_out, stride, WIDE_SUBSET if c_in >= 112 and not CUDA else None)
    i = SHAPES.index((c_in, c_out, stride))
    size = 5 if i % 2 else 4                      # odd and even maps
    per_example = i % 2 == 0
    x = torch.randn(2, c_in, size, size, device=DEVICE, dtype=DTYPE)
    if i % 3 == 1:
        x = x.to(memory_format=torch.channels_last)
    k = fused.num_candidates
    w = torch.rand(2, k, device=DEVICE, dtype=DTYPE) if per_example else \
        torch.rand(k, device=DEVICE, dtype=DTYPE)
    run_and_compare(fused, ref, x, w)
    assert fused.num_batches_tracked.item() == 1


@pytest.mark.parametrize("c_in,c_out,stride,per_example", [
    (16, 24, 2, True), (32, 32, 1, False)])
def test_eval_mode_uses_running_stats(c_in, c_out, stride, per_example):
    fused, ref = make_pair(c_in, c_out, stride)
    fused.eval()
    ref.eval()
    x = torch.randn(2, c_in, 5, 5, device=DEVICE, dtype=DTYPE).to(
        memory_format=torch.channels_last)
    w = torch.rand(*((2,) if per_example else ()), fused.num_candidates, device=DEVICE,
                   dtype=DTYPE)
    before = {n: b.clone() for n, b in fused.named_buffers()}
    run_and_compare(fused, ref, x, w)
    for n, b in fused.named_buffers():
        torch.testing.assert_close(b, before[n], msg=f"eval changed {n}")


@pytest.mark.parametrize("candidates", [("k5_e1_g2", "k3_e3", "skip"), ("k3_e6", "k5_e1")])
def test_candidate_subsets(candidates):
    """Other candidate lists: kernel runs in another order, no skip, a skip conv."""
    fused, ref = make_pair(24, 32, 2, candidates)
    x = torch.randn(2, 24, 5, 5, device=DEVICE, dtype=DTYPE)
    run_and_compare(fused, ref, x, torch.rand(2, len(candidates), device=DEVICE, dtype=DTYPE))


def test_two_steps_update_running_stats_twice():
    fused, ref = make_pair(16, 16, 1)
    for _ in range(2):
        x = torch.randn(2, 16, 4, 4, device=DEVICE, dtype=DTYPE)
        w = torch.rand(fused.num_candidates, device=DEVICE, dtype=DTYPE)
        fused(x, w)
        ref(x, w)
    for (name, ba), (_, bb) in zip(fused.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(ba, bb, **TOL, msg=name)


def test_training_needs_more_than_one_value():
    fused, _ = make_pair(16, 24, 2)
    x = torch.randn(1, 16, 1, 1, device=DEVICE, dtype=DTYPE)
    with pytest.raises(ValueError, match="more than one value"):
        fused(x, torch.rand(9, device=DEVICE, dtype=DTYPE))


@pytest.mark.skipif(not CUDA, reason="autocast with bf16 kernels needs a GPU")
def test_bf16_autocast_close_to_fp32_reference():
    fused, ref = make_pair(32, 64, 2)
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


def test_cuda_backend_depthwise_glue_with_the_cpu_ops():
    """fused_cuda's depthwise adapter, run through the same-schema C++ CPU ops."""
    from fbnet_fast.backends import jit
    from fbnet_fast.backends.fused_cuda import CudaDepthwise
    from fbnet_fast.backends.fused_triton import mixed_block_forward
    if CUDA:
        from fbnet_fast.backends.fused_cuda import why_unavailable
        if why_unavailable(DEVICE) is not None:
            pytest.skip(why_unavailable(DEVICE))
    elif not jit.load():
        pytest.skip(jit.why_unavailable())
    fused, ref = make_pair(16, 24, 2, ("k3_e1", "k5_e1_g2", "k5_e3", "skip"))
    fused.num_batches_tracked.add_(1)   # MixedBlock.forward's job, bypassed here
    fused.forward = lambda x, w: mixed_block_forward(fused, x, w, depthwise=CudaDepthwise())
    x = torch.randn(2, 16, 5, 5, device=DEVICE, dtype=DTYPE)
    run_and_compare(fused, ref, x, torch.rand(2, 4, device=DEVICE, dtype=DTYPE))


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
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["correctness"] and all(c["ok"] for c in report["correctness"])
    assert report["timings"] == []
