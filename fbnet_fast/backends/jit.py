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
from typing import Callable

import torch

__all__ = ["load", "why_unavailable", "source_dir"]

NAME = "fbnet_fast_C"


def source_dir() -> Path | None:
    """``csrc/`` shipped inside the package, else the source checkout's ``<repo>/csrc``."""
    package = Path(__file__).resolve().parents[1]
    for d in (package / "csrc", package.parent / "csrc"):
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


def build_dir(name: str, key: str = "") -> Path:
    """The cache folder of one library, keyed by torch and Python versions (and ``key``)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "fbnet_fast" / "extensions"
    tv = torch.__version__.replace("+", "_")
    d = base / f"{name}-torch{tv}-py{sys.version_info[0]}{sys.version_info[1]}{key}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _needs_compile(build: Path, name: str, sources: list) -> bool:
    """Whether a build is due (only to say so: ninja tracks the headers itself)."""
    libs = list(build.glob(f"{name}*.so")) + list(build.glob(f"{name}*.pyd"))
    if not libs:
        return True
    newest = max(p.stat().st_mtime for p in libs)
    headers = {h for s in sources for h in Path(s).parent.glob("*.h")}
    return any(Path(s).stat().st_mtime > newest for s in [*sources, *headers])


def compile_library(name: str, what: str, sources: list, key: str = "",
                    python_module: bool = False, **load_kw):
    """Build (printing one line when it actually compiles) and load a library of ops; with
    ``python_module`` it is also a Python extension module, which is returned."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # its import warns about CUDA, irrelevant to a CPU build
    try:  # deferred: slow to import, and only a build needs it
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    build = build_dir(name, key)
    if _needs_compile(build, name, sources):
        print(f"fbnet_fast: compiling the {what} (first use, about a minute)...",
              file=sys.stderr, flush=True)
    return cpp_extension.load(name=name, sources=sources, build_directory=str(build),
                              is_python_module=python_module, verbose=False, **load_kw)


class JitLibrary:
    """A library of ops built on first use and loaded once per process (thread-safe)."""

    def __init__(self, what: str, build: Callable[[], object]):
        self.what, self._build = what, build
        self.module = None  # what the build returned: the extension module, if it is one
        self._lock = threading.Lock()
        self._ok: bool | None = None
        self._why: str | None = None

    def load(self) -> bool:
        with self._lock:
            if self._ok is None:
                try:
                    self.module = self._build()
                    self._ok = True
                except Exception as e:  # no compiler, no headers, a failed build
                    msg = str(e).strip()
                    if len(msg) > 2000:  # a compiler log: keep its end, where the error is
                        msg = "..." + msg[-2000:]
                    self._ok = False
                    self._why = (f"the fbnet_fast {self.what} could not be built or loaded "
                                 f"({type(e).__name__}): {msg}")
            return self._ok

    def why_unavailable(self) -> str | None:
        self.load()
        return self._why


def _build_cpu():
    src = source_dir()
    if src is None:
        raise RuntimeError("the C++ sources (csrc/) are not shipped with this installation")
    sources = [str(src / "ops.cpp")] + sorted(str(p) for p in (src / "cpu").glob("*.cpp"))
    cflags = ["-O3", "-fopenmp"] + (["-march=native"] if _native() else [])
    return compile_library(NAME, "C++ CPU kernels", sources, key=f"-{_cpu_key()}",
                           python_module=True, extra_cflags=cflags, extra_ldflags=["-fopenmp"])


CPU_LIBRARY = JitLibrary("C++ CPU kernels", _build_cpu)


def load() -> bool:
    """Build (first use) and load the kernels; True when ``torch.ops.fbnet_fast`` has them."""
    return CPU_LIBRARY.load()


def why_unavailable() -> str | None:
    """None when the kernels are loaded, else why not (builds them on first call)."""
    return CPU_LIBRARY.why_unavailable()


def cpu_module():
    """The CPU library as a Python module (its functions beyond the ops); None where it
    did not load."""
    return CPU_LIBRARY.module if load() else None
