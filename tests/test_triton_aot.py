"""The Triton kernels compiled ahead of time for sm_90 and sm_80, without a GPU.

The interpreter forgives what a real compile does not (types, ``tl.dot`` shapes, shared
memory and registers), so bench/triton_resources.py compiles every configuration the
launchers choose for the FBNet layer shapes and reads ``ptxas -v``. Compiling needs the
real ``@triton.jit`` functions, and this process has TRITON_INTERPRET=1 (tests/conftest.py,
read once when triton is imported), so the compile runs in a subprocess without it.

Which launches a MixedBlock makes is written once, in ``block_launches``; the first test
checks it against a real run of the Triton backend under the interpreter, so the compile
test checks what the backend really launches.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from fbnet_fast import MixedBlock  # noqa: E402
from fbnet_fast.nn.layout import MixedLayout  # noqa: E402
from fbnet_fast.nn.space import CANDIDATES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import triton_resources as R  # noqa: E402


def _aot_unsupported() -> str | None:
    """Why this Triton cannot compile ahead of time the way the script does (its internals
    are those of Triton 3.8), or None."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as e:
        return f"Triton {triton.__version__} lacks an API the ahead-of-time compile uses: {e}"
    nvidia = getattr(getattr(triton, "knobs", None), "nvidia", None)
    if not hasattr(JITFunction, "_pack_args") or not hasattr(nvidia, "dump_ptxas_log"):
        return (f"Triton {triton.__version__} has no JITFunction._pack_args or "
                "triton.knobs.nvidia.dump_ptxas_log")
    return None


def _describe(launch) -> tuple:
    """A launch as plain values: kernel, grid, warps, constexprs, and each argument (a
    tensor by dtype and shape, an int by value)."""
    args = tuple((str(a.dtype), tuple(a.shape)) if isinstance(a, torch.Tensor) else a
                 for a in launch.args)
    return (launch.kernel.__name__, launch.grid, launch.num_warps,
            tuple(sorted(launch.constexprs.items())), args)


@pytest.mark.skipif(CUDA, reason="compared under the interpreter, on CPU tensors")
@pytest.mark.parametrize("c_in,c_out,stride,per_example", [
    (16, 16, 1, False),   # residual, identity skip
    (16, 24, 2, True),    # 1x1 conv skip, one mask row per example
])
def test_block_launches_are_what_the_backend_launches(c_in, c_out, stride, per_example):
    from fbnet_fast.backends.fused_triton import load_kernels, why_unavailable
    if why_unavailable("cpu"):
        pytest.skip(why_unavailable("cpu"))
    K = load_kernels()
    torch.manual_seed(0)
    n, h = 2, 6
    block = MixedBlock(c_in, c_out, stride, backend="triton").to(torch.float64)
    x = torch.randn(n, c_in, h, h, dtype=torch.float64, requires_grad=True)
    w = torch.rand(n, len(CANDIDATES), dtype=torch.float64) if per_example \
        else torch.rand(len(CANDIDATES), dtype=torch.float64)
    with K.utils.recording(run=True) as real:
        block(x, w).sum().backward()
    mirror = R.block_launches(MixedLayout.build(c_in, c_out, stride, CANDIDATES), n, h,
                              torch.float64, device="cpu", per_example=per_example)
    assert len(real) >= 10, f"the backend recorded only {len(real)} launches"
    got = collections.Counter(map(_describe, real))
    want = collections.Counter(map(_describe, mirror))
    assert got == want, ("bench/triton_resources.py block_launches differs from what the "
                         f"Triton backend launches: only the backend {got - want}, "
                         f"only block_launches {want - got}")


@pytest.mark.skipif(_aot_unsupported() is not None, reason=str(_aot_unsupported()))
def test_every_chosen_configuration_compiles_for_sm90_and_sm80(tmp_path):
    """One compile per configuration class (bench/triton_resources.py --ci; the whole
    matrix without --ci): no compile error, within shared memory, no register spill."""
    out = tmp_path / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "triton_resources.py"), "--ci",
                           "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=1500)
    if not out.exists():
        pytest.fail(f"bench/triton_resources.py failed:\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    report = json.loads(out.read_text())
    rows = report["rows"]
    kernels = {(r["kernel"], r["arch"]) for r in rows}
    names = {"_pointwise_fwd_kernel", "_pointwise_grad_weight_kernel", "_dw_fwd_kernel",
             "_dw_grad_input_kernel", "_dw_grad_weight_kernel", "_combine_fwd_kernel",
             "_combine_bwd_kernel", "_combine_grad_inputs_kernel", "_relu_grad_sums_kernel",
             "_bn_grad_apply_kernel"}
    assert kernels == {(k, a) for k in names for a in R.SHARED_LIMIT}, kernels
    bad = [p for r in rows for p in R.problems(r)]
    assert not bad, f"{len(bad)} of {len(rows)} compiled configurations fail:\n" + "\n".join(bad)
    assert proc.returncode == 0, proc.stdout[-3000:]
