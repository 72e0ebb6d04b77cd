"""Tile sizes of the three Triton depthwise kernels, timed one by one on a GPU.

The depthwise kernels are most of the Triton step's kernel time at the large maps
(bench/RESULTS.md); this sweeps each kernel's tile (pixels x channels, warps; for the
weight gradient also the number of programs) at the first FBNet layer's runs and prints
each kernel's time next to its byte floor (bytes once over the measured copy rate), and
whether the result matches the launcher's default tile.

    python bench/gpu_dw_tiles.py --out dw_tiles.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

FWD_TILES = [(64, 64, 8), (32, 64, 8), (128, 32, 8), (64, 32, 4), (32, 32, 4), (128, 64, 8),
             (256, 32, 8), (64, 128, 8), (16, 128, 4), (32, 32, 2)]
GW_TILES = [(8, 32, 4, 512), (4, 32, 4, 512), (16, 16, 4, 512), (8, 32, 4, 2048),
            (16, 32, 8, 1024), (4, 64, 4, 1024), (8, 16, 2, 2048)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="16,1,112", help="c_in,stride,size of the layer")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch
    if torch.cuda.is_available():
        from triton.testing import do_bench
        dev = "cuda"
    else:            # a dry run of the script itself (TRITON_INTERPRET=1, tiny --shape)
        import time
        dev = "cpu"

        def do_bench(fn, warmup=0, rep=0):
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
    from fbnet_fast.backends.fused_triton import load_kernels
    from fbnet_fast.backends.plan import plan_for
    from fbnet_fast.nn.layout import MixedLayout
    from fbnet_fast.nn.space import CANDIDATES, conv_out
    K = load_kernels().depthwise
    c_in, stride, size = (int(v) for v in args.shape.split(","))
    plan = plan_for(MixedLayout.build(c_in, c_in, stride, CANDIDATES))
    mid = sum(r.channels for r in plan.dw_runs)
    n = args.batch
    ho = conv_out(size, stride)
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n * size * size, mid, device=dev, generator=g)
    dy = torch.randn(n * ho * ho, mid, device=dev, generator=g)
    wnum = sum(r.channels * r.kernel ** 2 for r in plan.dw_runs)
    w = torch.randn(wnum, device=dev, generator=g) * 0.2
    scale = torch.rand(mid, device=dev, generator=g) + 0.5
    shift = torch.randn(mid, device=dev, generator=g) * 0.1
    big = torch.empty(a.numel() * 2, device=dev)
    copy_ms = do_bench(lambda: big[: a.numel()].copy_(big[a.numel():]))
    rate = 2 * a.numel() * 4 / copy_ms / 1e9          # TB/s
    print(f"copy {2 * a.numel() * 4 / 1e9:.2f} GB in {copy_ms:.3f} ms: {rate:.2f} TB/s")
    shape = (n, size, size, stride)
    rows = []
    for run in plan.dw_runs:
        runs = (run,)
        nbytes = (a.shape[0] + dy.shape[0]) * run.channels * 4        # in + out, once
        floor = nbytes / rate / 1e9
        calls = {
            "forward": lambda: K.depthwise_forward(a, w, *shape, runs, scale, shift, True),
            "grad_input": lambda: K.depthwise_grad_input(dy, w, *shape, runs, a, scale, shift),
            "grad_weight": lambda: K.depthwise_grad_weight(dy, a, *shape, runs, wnum,
                                                           scale, shift),
        }
        cols = slice(run.channel_start, run.channel_start + run.channels)
        w_cols = slice(run.w_offset, run.w_offset + run.channels * run.kernel ** 2)

        def result(kname, out):          # only this run's columns are written
            return out[w_cols] if kname == "grad_weight" else out[0][:, cols]
        for kname, call in calls.items():
            want = result(kname, call())
            tiles = GW_TILES if kname == "grad_weight" else FWD_TILES
            saved = (K.tap_tile, K.weight_grad_tile, K.WEIGHT_GRAD_PROGRAMS)
            for tile in [None] + tiles:
                try:
                    if tile is not None and kname == "grad_weight":
                        bp, bc, warps, progs = tile
                        taps = K.next_pow2(run.kernel ** 2)
                        if taps * bp * bc > 16384:
                            continue
                        K.weight_grad_tile = lambda *_a, t=(taps, bp, bc, warps): t
                        K.WEIGHT_GRAD_PROGRAMS = progs
                    elif tile is not None:
                        K.tap_tile = lambda *_a, t=tile, **_k: t
                    got = result(kname, call())
                    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
                    ms = do_bench(call, warmup=5, rep=40)
                    row = dict(kernel=kname, k=run.kernel, channels=run.channels,
                               tile="default" if tile is None else list(tile), ms=round(ms, 4),
                               floor_ms=round(floor, 4), rel_err=err)
                except Exception as e:                       # a tile that does not compile
                    row = dict(kernel=kname, k=run.kernel, tile=list(tile or ()),
                               error=f"{type(e).__name__}: {str(e)[:200]}")
                finally:
                    K.tap_tile, K.weight_grad_tile, K.WEIGHT_GRAD_PROGRAMS = saved
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(shape=args.shape, batch=n, copy_tbps=rate, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
