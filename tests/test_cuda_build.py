"""csrc/cuda/*.cu compile with nvcc (no GPU needed): catches CUDA build breaks early.

Skipped without nvcc / CUDA_HOME, or with FBNET_SKIP_CUDA_BUILD=1. Compiling every source
to an object is what is checked: linking needs the CUDA runtime library and loading needs
a GPU driver, which a build-only machine may lack.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CUDA_SOURCES = sorted((REPO / "csrc" / "cuda").glob("*.cu"))


def _cuda_home():
    from torch.utils.cpp_extension import CUDA_HOME
    return CUDA_HOME


@pytest.mark.skipif(os.environ.get("FBNET_SKIP_CUDA_BUILD") == "1",
                    reason="FBNET_SKIP_CUDA_BUILD=1")
@pytest.mark.skipif(torch.version.cuda is None, reason="this torch build has no CUDA support")
def test_cuda_sources_compile(tmp_path, monkeypatch):
    if _cuda_home() is None or shutil.which("nvcc") is None and not (
            Path(_cuda_home()) / "bin" / "nvcc").exists():
        pytest.skip("nvcc / CUDA_HOME not found: cannot compile the CUDA kernels")
    if shutil.which("ninja") is None:
        pytest.skip("ninja is needed by torch.utils.cpp_extension")
    assert CUDA_SOURCES, "no csrc/cuda/*.cu sources"
    from torch.utils.cpp_extension import load
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", os.environ.get("FBNET_CUDA_ARCH", "9.0"))
    monkeypatch.setenv("MAX_JOBS", "2")
    name = "fbnet_fast_cuda_build_check"
    error = ""
    try:
        load(name=name, sources=[str(p) for p in CUDA_SOURCES], build_directory=str(tmp_path),
             extra_cuda_cflags=["-O2"], is_python_module=False, verbose=False)
    except (OSError, RuntimeError) as e:
        # Compiled if every object exists; the link or the load is the machine's business.
        error = str(e)[-4000:]
    for src in CUDA_SOURCES:
        obj = tmp_path / f"{src.stem}.cuda.o"
        assert obj.is_file() and obj.stat().st_size > 0, f"{src.name} did not compile:\n{error}"
