"""MixedBlock training step (forward + backward): fused CPU backend vs the reference in NCHW,
in channels_last and under torch.utils.checkpoint. ``python bench/report.py --only mixed``
prints ratios, saved bytes and the compute floor."""
import pytest

from report import layer_shapes, mixed_case, step


def cases(quick):
    batch, scale = (2, 1) if quick else (8, 2)
    return [(f"{ci}-{co}-s{s}-H{h // scale}-n{batch}", (batch, ci, co, s, h // scale))
            for ci, co, s, h in layer_shapes(quick)]


@pytest.mark.parametrize("impl", ["fused", "ref_nchw", "ref_cl", "ref_ckpt"])
def test_mixed_block(benchmark, case, impl, rounds):
    benchmark.group = "mixed block " + "-".join(map(str, case))
    run = step(mixed_case(*case)[impl])
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)
