"""The one place that picks a MixedBlock implementation.

Families: ``reference`` (plain PyTorch ops, every device), ``cpu`` (fused C++ ops),
``triton`` (Triton kernels; on CPU tensors only under ``TRITON_INTERPRET=1``), ``cuda``
(CUDA C++ ops). Each module's ``backend`` argument wins, then ``set_backend``, then
the ``FBNET_FAST_BACKEND`` environment variable, then ``auto``.

A family asked for by name that cannot run here is an error, and is used as asked when
it can. ``auto`` trusts a fused family on a device only after its self-check
(``selfcheck.py``: one small step against the reference, the verdict cached on disk per
device and versions); one that cannot run or fails the check is passed over with one
warning saying why, down to the reference.
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import selfcheck

__all__ = ["BACKENDS", "set_backend", "get_backend", "resolve", "available", "check_name",
           "reset", "fast_layers"]

ENV_VAR = "FBNET_FAST_BACKEND"


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple          # device types it can run on
    module: str             # module holding ``mixed_block_forward`` and ``is_available``
    attr: str = "mixed_block_forward"

    def load(self) -> Callable:
        return getattr(importlib.import_module(self.module, __package__), self.attr)

    def why_unavailable(self, device: torch.device) -> str | None:
        """None when usable on ``device``, else the reason."""
        if device.type not in self.devices:
            return f"backend {self.name!r} runs on {'/'.join(self.devices)}, not {device.type}"
        try:
            mod = importlib.import_module(self.module, __package__)
        except Exception as e:  # a missing optional dependency or a failed build
            return f"backend {self.name!r} could not be loaded: {e}"
        check = getattr(mod, "why_unavailable", None)
        return check(device) if check else None


# Order matters for "auto": the first usable family on a device wins.
BACKENDS = {
    "reference": Backend("reference", ("cpu", "cuda", "meta"), ".reference"),
}
AUTO_ORDER = {"cpu": (), "cuda": ()}

_global = None
_resolved: dict = {}
_loaded: dict = {}   # family -> its mixed_block_forward, once loaded
_warned: set = set()


def register(backend: Backend, auto_on: tuple = ()) -> None:
    """Add a family; ``auto_on`` lists the device types where ``auto`` prefers it."""
    BACKENDS[backend.name] = backend
    for dev in auto_on:
        AUTO_ORDER[dev] = AUTO_ORDER.get(dev, ()) + (backend.name,)
    _resolved.clear()
    _loaded.pop(backend.name, None)


def check_name(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(
            f"unknown backend {name!r}; choose 'auto' or one of {sorted(BACKENDS)}")
    return name


def set_backend(name: str | None) -> None:
    """Set the family used by modules created with ``backend="auto"`` (None: back to auto)."""
    global _global
    _global = None if name is None else check_name(name)
    _resolved.clear()


def get_backend() -> str:
    if _global is not None:
        return _global
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            return check_name(env)
        except ValueError as e:
            raise ValueError(f"{ENV_VAR}: {e}") from None
    return "auto"


def available(device: torch.device | str = "cpu") -> list:
    """The families usable on ``device`` right now."""
    device = torch.device(device)
    return [n for n, b in BACKENDS.items() if b.why_unavailable(device) is None]


def pick_name(name: str, device: torch.device) -> str:
    """The family a module with backend ``name`` uses for tensors on ``device``."""
    if name == "auto":
        name = get_backend()
    if name != "auto":
        why = BACKENDS[name].why_unavailable(device)
        if why is not None:
            raise RuntimeError(
                f"{why}. Use backend='auto' or 'reference', or see fbnet_fast.backends.available()")
        return name
    picked, passed_over = "reference", []
    for cand in AUTO_ORDER.get(device.type, ()):
        why = BACKENDS[cand].why_unavailable(device)
        if why is None:
            why = selfcheck.verdict(cand, device, BACKENDS[cand].load(),
                                    BACKENDS["reference"].load())
            if why is None:
                picked = cand
                break
            why = f"backend {cand!r} failed its self-check on {device}: {why}"
        if (cand, device.type) not in _warned:
            _warned.add((cand, device.type))
            passed_over.append(why)
    if passed_over:
        warnings.warn(f"fbnet_fast: {'; '.join(passed_over)}; using the {picked!r} backend",
                      RuntimeWarning, stacklevel=4)
    return picked


def fast_layers(model, device: torch.device | str, name: str = "auto"):
    """``model`` (a discrete FBNet, or a SuperNet: its stem and head) with its BN and
    depthwise layers on the fused CPU family's kernels (``cpu_layers.accelerate``, in place)
    where a MixedBlock with backend ``name`` would use that family on ``device``; else
    unchanged. Returns ``model``."""
    device = torch.device(device)
    if device.type == "cpu" and pick_name(check_name(name), device) == "cpu":
        # loaded like a family's module, on first use: importing it builds the C++ kernels
        importlib.import_module(".cpu_layers", __package__).accelerate(model)
    return model


def reset() -> None:
    """Forget this process's picks, warnings and self-check verdicts (the files stay)."""
    _resolved.clear()
    _warned.clear()
    selfcheck.forget()


def resolve(name: str, device: torch.device) -> Callable:
    """The forward function for a module's backend setting on ``device`` (cached)."""
    key = (name, get_backend(), device.type)
    fn = _resolved.get(key)
    if fn is None:
        fn = _resolved[key] = _loaded[_pick_and_load(name, device)]
    return fn


def _pick_and_load(name: str, device: torch.device) -> str:
    """``pick_name``, and the family loaded into ``_loaded``: eagerly even under
    ``torch.compile`` (imports, builds, the self-check), which sees only the name."""
    family = pick_name(name, device)
    if family not in _loaded:
        _loaded[family] = BACKENDS[family].load()
    return family


# What ``torch.compiler.assume_constant_result`` does, without its import of torch._dynamo
# (with triton and sympy: about a second and 170 MB of RSS in every process, compiling or
# not); tests/test_compile.py checks that compiled calls still see only the name.
_pick_and_load._dynamo_marked_constant = True


# The fused families. Each module defines ``mixed_block_forward(block, x, weights)`` and
# ``why_unavailable(device) -> str | None``.
register(Backend("cpu", ("cpu",), ".fused_cpu"), auto_on=("cpu",))
register(Backend("triton", ("cuda", "cpu"), ".fused_triton"), auto_on=("cuda",))
register(Backend("cuda", ("cuda",), ".fused_cuda"), auto_on=("cuda",))
