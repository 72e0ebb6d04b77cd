"""``auto`` trusts a fused backend on a device only after its self-check
(fbnet_fast/backends/selfcheck.py): a failing or raising check makes it warn once with the
reason and run the reference, the verdict is cached on disk and reused, a backend named
explicitly is used as asked, and the real check passes on the CPU family and catches a
wrong one. The CPU family stands in for every fused one here (the GPU families take the
same path in the registry)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from fbnet_fast import MixedBlock
from fbnet_fast.backends import jit, registry, selfcheck

pytestmark = pytest.mark.skipif(not jit.load(),
                                reason=f"C++ kernels unavailable: {jit.why_unavailable()}")

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    """Verdicts in an empty folder, nothing picked yet; the next test starts fresh too."""
    monkeypatch.setenv(selfcheck.ENV_DIR, str(tmp_path))
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    registry.reset()
    yield tmp_path
    registry.reset()


def _fail(reason="forced failure"):
    def check(forward, reference, device):
        calls.append(device)
        raise RuntimeError(reason)
    calls = []
    check.calls = calls
    return check


def test_failing_check_warns_once_and_runs_the_reference(fresh, monkeypatch):
    failing = _fail()
    monkeypatch.setattr(selfcheck, "check", failing)
    with pytest.warns(RuntimeWarning, match="'cpu' failed its self-check on cpu: "
                                            "RuntimeError: forced failure; using the 'reference'"):
        assert registry.pick_name("auto", CPU) == "reference"
    block = MixedBlock(8, 8, 1)   # backend="auto"
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # warned once already
        y = block(torch.randn(2, 8, 4, 4), torch.rand(9))
        assert registry.resolve("auto", CPU) is registry.BACKENDS["reference"].load()
    assert y.shape == (2, 8, 4, 4)
    assert len(failing.calls) == 1
    (saved,) = [json.loads(p.read_text()) for p in fresh.iterdir()]
    assert saved["ok"] is False and saved["reason"] == "RuntimeError: forced failure"
    assert saved["device"]["family"] == "cpu" and saved["device"]["torch"] == torch.__version__


def test_cached_verdict_is_reused_in_a_new_process(fresh, monkeypatch):
    monkeypatch.setattr(selfcheck, "check", _fail())
    with pytest.warns(RuntimeWarning):
        registry.pick_name("auto", CPU)
    registry.reset()                       # as a new process: only the file is left
    again = _fail("must not run")
    monkeypatch.setattr(selfcheck, "check", again)
    with pytest.warns(RuntimeWarning, match="forced failure \\(cached in .*cpu-.*json\\)"):
        assert registry.pick_name("auto", CPU) == "reference"
    assert again.calls == []


def test_named_backend_is_used_as_asked(monkeypatch):
    failing = _fail()
    monkeypatch.setattr(selfcheck, "check", failing)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.pick_name("cpu", CPU) == "cpu"
        registry.set_backend("cpu")
        try:
            assert registry.pick_name("auto", CPU) == "cpu"
        finally:
            registry.set_backend(None)
    assert failing.calls == []


def test_real_check_passes_once_and_is_cached(fresh, monkeypatch):
    """First picked in inference mode under autocast, as an evaluation might."""
    with warnings.catch_warnings(), torch.inference_mode(), torch.autocast("cpu"):
        warnings.simplefilter("error")
        assert registry.pick_name("auto", CPU) == "cpu"
    (path,) = fresh.iterdir()
    assert json.loads(path.read_text())["ok"] is True
    registry.reset()
    monkeypatch.setattr(selfcheck, "check", _fail("must not run"))
    assert registry.pick_name("auto", CPU) == "cpu"


def test_real_check_catches_a_wrong_backend():
    right = registry.BACKENDS["cpu"].load()
    reference = registry.BACKENDS["reference"].load()
    assert selfcheck.check(right, reference, CPU) is None

    def off_by_a_little(block, x, weights):
        return right(block, x, weights) * (1 + 1e-6)

    def wrong_running_stats(block, x, weights):
        y = right(block, x, weights)
        block.bn2_running_var.add_(1e-3)
        return y

    assert "the output differs" in selfcheck.check(off_by_a_little, reference, CPU)
    assert "bn2_running_var differs" in selfcheck.check(wrong_running_stats, reference, CPU)
