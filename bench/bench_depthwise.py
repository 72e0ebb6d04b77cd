"""Depthwise KxK conv, forward + backward: ours (C++, channels_last) vs F.conv2d in NCHW and
channels_last. Run ``python bench/report.py --only dw`` for side-by-side ratios."""
import pytest

from report import dw_case, dw_shapes, step


def cases(quick):
    batch = 2 if quick else 16
    return [(f"C{c}-H{h}-k{k}-s{s}-n{batch}", (batch, c, h, k, s)) for c, h, k, s in dw_shapes(quick)]


@pytest.mark.parametrize("impl", ["ours", "torch_nchw", "torch_cl"])
def test_depthwise(benchmark, case, impl, rounds):
    benchmark.group = "depthwise " + "x".join(map(str, case))
    run = step(dw_case(*case)[impl])
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)
