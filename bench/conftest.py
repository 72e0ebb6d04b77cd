"""Bench settings: ``quick`` shapes when the timings are off (``--benchmark-disable``, as CI
runs them to check they work) or when FBNET_BENCH_QUICK=1."""
import os

import pytest


def _quick(config) -> bool:
    if os.environ.get("FBNET_BENCH_QUICK", "") not in ("", "0"):
        return True
    try:
        return bool(config.getoption("benchmark_disable"))
    except ValueError:  # pytest-benchmark not installed
        return True


def pytest_generate_tests(metafunc):
    """Parametrise ``case`` over the module's ``cases(quick)``: a list of (id, value)."""
    if "case" in metafunc.fixturenames:
        cases = metafunc.module.cases(_quick(metafunc.config))
        metafunc.parametrize("case", [v for _, v in cases], ids=[i for i, _ in cases])


@pytest.fixture
def rounds(request) -> int:
    """Timed rounds per case: few, the shapes are large."""
    return 1 if _quick(request.config) else 5
