"""Shared by the search tests: a tiny configuration and a hand-made latency table."""
from __future__ import annotations

from fbnet_fast.cli import main as cli_main
from fbnet_fast.latency.keys import parse_block_key, required_keys
from fbnet_fast.latency.table import LatencyTable
from fbnet_fast.nn.models import block_cost
from fbnet_fast.search.config import build_space, make_config

TINY = dict(preset="quick", resolution=16, width=1.0, head_channels=32,
            stages="8:1:1,16:2:2,16:1:2", batch_size=16, builtin_train=320, builtin_val=64,
            epochs=3, warmup_epochs=1, samples=2, finetune_steps=3, backend="reference", threads=1,
            theta_lr=0.1)


def tiny_config(out, **kw):
    return make_config(**{**TINY, "out": str(out), **kw})


def macs_table(cfg, num_classes=10, per_mmac=1.0) -> LatencyTable:
    """A deterministic table: latency proportional to a block's MACs (ms per M MACs)."""
    space = build_space(cfg)
    entries = {}
    for k in required_keys(space, num_classes):
        p = parse_block_key(k)
        if p is None:
            entries[k] = 0.05
        else:
            macs, _ = block_cost(*p)
            entries[k] = 0.001 + per_mmac * macs / 1e6
    return LatencyTable(entries, {"method": "macs"}, space.to_dict(), num_classes)


def one_line_error(capsys, argv, match, prefix=""):
    """The CLI fails on ``argv`` with exit code 2 and one line on stderr holding ``match``."""
    try:
        code = cli_main(argv)
    except SystemExit as e:          # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith(prefix) and match in err, err
