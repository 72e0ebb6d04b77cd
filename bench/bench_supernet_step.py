"""SuperNet training step (100 classes, channels_last, per-batch masks): fused CPU backend vs
the reference. ``python bench/report.py --only supernet`` prints the ratio."""
import pytest

from report import step, supernet_case


def cases(quick):
    return [("r32-n2", (2, 32))] if quick else [("r224-n8", (8, 224))]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_supernet_step(benchmark, case, backend, rounds):
    benchmark.group = "supernet step " + "-".join(map(str, case))
    run = step(supernet_case(*case, backend))
    benchmark.pedantic(run, rounds=max(1, rounds // 2), warmup_rounds=1)
