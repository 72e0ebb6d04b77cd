"""Just-in-time build and load of the C++ CPU kernels (``torch.ops.fbnet_fast.*``).

Built once per machine with ``torch.utils.cpp_extension.load`` into a cache keyed by the
torch version and the CPU (the kernels use ``-march=native``), loaded once per process.
Set ``FBNET_FAST_NATIVE=0`` for a portable build, ``TORCH_EXTENSIONS_DIR`` to move the cache.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path

import torch

__all__ = ["load", "why_unavailable", "source_dir"]

NAME = "fbnet_fast_C"
_lock = threading.Lock()
_state: dict = {}   # "ok": bool, "why": str | None


def source_dir() -> Path | None:
    """``csrc/`` shipped inside the package, else the source checkout's ``<repo>/csrc``."""
    here = Path(__file__).resolve().parent
    for d in (here / "csrc", here.parent / "csrc"):
        if (d / "ops.cpp").is_file():
            return d
    return None


def _native() -> bool:
    return os.environ.get("FBNET_FAST_NATIVE", "1") != "0"


def _cpu_key() -> str:
    """A short id of this CPU's instruction set, so a -march=native build is never reused elsewhere."""
    text = platform.machine()
    if _native():
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith(("flags", "model name", "Features", "CPU part")):
                        text += line
                        if line.startswith(("flags", "Features")):
                            break
        except OSError:
            text += platform.processor()
    else:
        text += "portable"
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _build_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "fbnet_fast" / "extensions"
    tv = torch.__version__.replace("+", "_")
    d = base / f"{NAME}-torch{tv}-py{sys.version_info[0]}{sys.version_info[1]}-{_cpu_key()}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _needs_compile(build: Path, sources: list) -> bool:
    libs = list(build.glob(f"{NAME}*.so")) + list(build.glob(f"{NAME}*.pyd"))
    if not libs:
        return True
    newest = max(p.stat().st_mtime for p in libs)
    return any(Path(s).stat().st_mtime > newest for s in sources)


def _build() -> None:
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # its import warns about CUDA, irrelevant to a CPU build
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)

    src = source_dir()
    if src is None:
        raise RuntimeError("the C++ sources (csrc/) are not shipped with this installation")
    sources = [str(src / "ops.cpp")] + sorted(str(p) for p in (src / "cpu").glob("*.cpp"))
    build = _build_dir()
    cflags = ["-O3", "-fopenmp"] + (["-march=native"] if _native() else [])
    if _needs_compile(build, sources):
        print("fbnet_fast: compiling the C++ CPU kernels (first use, about a minute)...",
              file=sys.stderr, flush=True)
    cpp_extension.load(name=NAME, sources=sources, extra_cflags=cflags,
                       extra_ldflags=["-fopenmp"], build_directory=str(build),
                       is_python_module=False, verbose=False)


def load() -> bool:
    """Build (first use) and load the kernels; True when ``torch.ops.fbnet_fast`` has them."""
    with _lock:
        if "ok" not in _state:
            try:
                _build()
                _state["ok"], _state["why"] = True, None
            except Exception as e:  # no compiler, no headers, a failed build
                msg = str(e).strip()
                if len(msg) > 2000:  # a compiler log: keep its end, where the error is
                    msg = "..." + msg[-2000:]
                _state["ok"] = False
                _state["why"] = ("the fbnet_fast C++ CPU kernels could not be built or loaded "
                                 f"({type(e).__name__}): {msg}")
        return _state["ok"]


def why_unavailable() -> str | None:
    """None when the kernels are loaded, else why not (builds them on first call)."""
    load()
    return _state["why"]
