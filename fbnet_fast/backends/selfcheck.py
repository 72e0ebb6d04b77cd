"""Before ``auto`` trusts a fused backend on a device: one small training step against the
reference, its verdict cached on disk per device and versions.

A GPU model, driver, torch or Triton version the kernels were never run on can break them;
``auto`` should then run the reference, not crash a search. The first time ``auto`` would
pick a fused family for a device (``device_key``: the GPU model and capability, driver,
CUDA, torch, Triton and fbnet_fast versions, or the CPU model for CPU tensors), ``verdict``
runs ``check``: forward and backward of a small ``MixedBlock`` layer (stride 2, skip conv,
grouped and both kernel sizes, per-example masks; milliseconds on a CPU, seconds on a GPU
where the kernels compile) on the family and on the reference, comparing the output, every
gradient and the BN running statistics. The verdict (None, or why not) is written to
``cache_dir()`` (``$FBNET_FAST_SELFCHECK_DIR``, else next to the JIT builds) and kept in
memory, so each device is checked once; delete the file to check again.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from ..nn.layout import MixedLayout
from ..nn.space import CANDIDATES
from . import jit

__all__ = ["verdict", "check", "device_key", "cache_dir", "forget", "ENV_DIR"]

ENV_DIR = "FBNET_FAST_SELFCHECK_DIR"

_memo: dict = {}   # (family, device key) -> None or the reason


def cache_dir() -> Path:
    """Where verdicts are kept: ``$FBNET_FAST_SELFCHECK_DIR``, else the JIT builds' cache."""
    env = os.environ.get(ENV_DIR)
    if env:
        d = Path(env)
        d.mkdir(parents=True, exist_ok=True)
        return d
    return jit.build_dir("selfcheck")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _first_line(path: str, prefix: str = "") -> str:
    """The first line of a text file starting with ``prefix``, without the prefix and its
    ':' ('' when there is none)."""
    try:
        with open(path) as f:
            line = next((line for line in f if line.startswith(prefix)), "")
    except OSError:
        return ""
    return line[len(prefix):].strip().lstrip(":").strip()


def device_key(family: str, device: torch.device) -> dict:
    """What a verdict depends on: the family, the versions and the device's model."""
    key = {"family": family, "fbnet_fast": _version("fbnet_fast"), "torch": torch.__version__,
           "machine": platform.machine()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        key.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   cuda=str(torch.version.cuda), triton=_version("triton"),
                   driver=_first_line("/proc/driver/nvidia/version"))
    else:
        key.update(cpu=_first_line("/proc/cpuinfo", "model name") or platform.processor())
    return key


def _probe(layout: MixedLayout, dtype, device, seed: int) -> SimpleNamespace:
    """A stand-in for a ``MixedBlock`` in training mode (the attributes the backends read),
    with random parameters (leaves requiring grad) and BN state; same ``seed``, same values."""
    g = torch.Generator().manual_seed(seed)
    L = layout

    def rand(n, scale=1.0, shift=0.0, fn=torch.randn, grad=True):
        t = (fn(n, generator=g, dtype=dtype) * scale + shift).to(device)
        return t.requires_grad_(grad)

    p = SimpleNamespace(layout=L, training=True, stride=L.stride, in_channels=L.in_channels,
                        out_channels=L.out_channels, num_candidates=len(L.candidates))
    p.pw1_weight, p.dw_weight, p.pw2_weight = (rand(n, 0.3) for n in (L.pw1_numel, L.dw_numel,
                                                                       L.pw2_numel))
    sizes = {"bn1": L.total_mid, "bn2": L.total_mid, "bn3": len(L.slots) * L.out_channels}
    p.skip_weight = None
    if L.skip_is_conv:
        p.skip_weight = rand(L.out_channels * L.in_channels, 0.3)
        sizes["skip_bn"] = L.out_channels
    for role, c in sizes.items():
        setattr(p, f"{role}_weight", rand(c, 1.0, 0.5, torch.rand))
        setattr(p, f"{role}_bias", rand(c, 0.3))
        setattr(p, f"{role}_running_mean", rand(c, 0.3, grad=False))
        setattr(p, f"{role}_running_var", rand(c, 1.0, 0.5, torch.rand, grad=False))
    return p


def check(forward: Callable, reference: Callable, device: torch.device) -> str | None:
    """One training step of ``forward`` (a family's ``mixed_block_forward``) against
    ``reference`` on ``device``; None when they agree, else what differs."""
    cpu = device.type == "cpu"
    dtype, tol = (torch.float64, 1e-9) if cpu else (torch.float32, 1e-2)
    layout = MixedLayout.build(8, 16, 2, CANDIDATES)
    results = []
    threads = torch.get_num_threads()
    if cpu:   # tensors this small gain nothing from threads, and a busy machine's pool is slow
        torch.set_num_threads(1)
    try:   # the first pick may come inside no_grad, inference mode or autocast
        with torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(device.type, enabled=False):
            g = torch.Generator().manual_seed(1)
            x = torch.randn(2, 8, 5, 5, generator=g, dtype=dtype).to(device)
            mask = torch.rand(2, len(CANDIDATES), generator=g, dtype=dtype).to(device)
            dy = torch.randn(2, 16, 3, 3, generator=g, dtype=dtype).to(device)
            for fn in (forward, reference):
                block = _probe(layout, dtype, device, seed=0)
                inputs = {"x": x.clone().requires_grad_(),
                          "the mask": mask.clone().requires_grad_()}
                inputs.update((k, v) for k, v in vars(block).items()
                              if isinstance(v, torch.Tensor) and v.requires_grad)
                y = fn(block, inputs["x"], inputs["the mask"])
                grads = torch.autograd.grad(y, list(inputs.values()), dy)
                out = {"the output": y.detach()}
                out.update((f"the gradient of {k}", g) for k, g in zip(inputs, grads))
                out.update((k, v) for k, v in vars(block).items() if "running" in k)
                results.append(out)
    finally:
        torch.set_num_threads(threads)
    ours, ref = results
    for what, b in ref.items():
        a = ours[what]
        if a.shape != b.shape or a.dtype != b.dtype:
            return (f"{what} has shape {tuple(a.shape)} {a.dtype}, expected "
                    f"{tuple(b.shape)} {b.dtype}")
        err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
        if not err <= tol:   # also catches NaN
            return f"{what} differs from the reference by {err:.2e} (relative, tolerance {tol:g})"
    return None


def verdict(family: str, device: torch.device, forward: Callable,
            reference: Callable) -> str | None:
    """None when ``family`` passed its self-check on ``device`` (now or before, on this
    device and these versions), else the reason; runs ``check`` at most once per device."""
    key = device_key(family, device)
    text = json.dumps(key, sort_keys=True)
    if (family, text) in _memo:
        return _memo[(family, text)]
    path = cache_dir() / f"{family}-{hashlib.sha1(text.encode()).hexdigest()[:16]}.json"
    try:
        saved = json.loads(path.read_text())
        why = None if saved["ok"] else f"{saved['reason']} (cached in {path})"
    except (OSError, ValueError, KeyError, TypeError):   # not checked yet, or a bad file
        try:
            why = check(forward, reference, device)
        except Exception as e:   # a kernel that fails to compile or launch
            why = f"{type(e).__name__}: {str(e).strip()[:500]}"
        try:   # whole or not at all: several processes (ranks) may check at once
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"ok": why is None, "reason": why, "device": key},
                                      indent=1))
            os.replace(tmp, path)
        except OSError:
            pass   # a read-only cache: check again in the next process
    _memo[(family, text)] = why
    return why


def forget() -> None:
    """Drop the verdicts kept in memory (the files stay)."""
    _memo.clear()
