"""Where one MixedBlock training step spends its GPU time, per kernel, for each provider.

Wall time per step against the summed kernel time says whether a step waits on the host
(launches, Python) or on the kernels; the kernel table says which kernels to work on.

    python bench/gpu_profile.py --shape 16,16,1,112 --batch 64 --providers eager_channels_last,triton
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", action="append", default=None,
                   help="c_in,c_out,stride,size (repeatable; default: the largest and a small map)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--providers", default="eager_channels_last,triton,cuda")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch
    from torch.profiler import ProfilerActivity, profile
    from fbnet_fast import MixedBlock
    providers = {"eager_nchw": ("reference", torch.contiguous_format),
                 "eager_channels_last": ("reference", torch.channels_last),
                 "triton": ("triton", torch.channels_last), "cuda": ("cuda", torch.channels_last)}
    shapes = [tuple(int(v) for v in s.split(",")) for s in (args.shape or
                                                              ["16,16,1,112", "64,64,1,14"])]
    result = []
    for c_in, c_out, stride, size in shapes:
        for name in args.providers.split(","):
            backend, fmt = providers[name]
            torch.manual_seed(0)
            block = MixedBlock(c_in, c_out, stride, backend=backend).cuda()
            x = torch.randn(args.batch, c_in, size, size, device="cuda").to(memory_format=fmt)
            x.requires_grad_()
            w = torch.softmax(torch.randn(block.num_candidates, device="cuda"), 0)

            def step():
                block(x, w).sum().backward()
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t = time.perf_counter()
                for _ in range(args.steps):
                    step()
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t) / args.steps
            kernels = [e for e in prof.key_averages() if e.device_time_total > 0
                       and e.device_type == torch.autograd.DeviceType.CUDA]
            kernels.sort(key=lambda e: -e.device_time_total)
            gpu = sum(e.device_time_total for e in kernels) / args.steps / 1e3
            launches = sum(e.count for e in kernels) / args.steps
            print(f"\n[{c_in},{c_out},{stride},{size}] b{args.batch} {name}: wall {wall * 1e3:.2f} ms,"
                  f" kernels {gpu:.2f} ms in {launches:.0f} launches per step")
            rows = []
            for e in kernels[:args.top]:
                ms = e.device_time_total / args.steps / 1e3
                rows.append({"kernel": e.key[:90], "count": e.count // args.steps, "ms": ms})
                print(f"  {ms:8.3f} ms  x{e.count // args.steps:<4} {e.key[:90]}")
            result.append({"shape": [c_in, c_out, stride, size], "batch": args.batch,
                           "provider": name, "wall_ms": wall * 1e3, "kernel_ms": gpu,
                           "launches": launches, "top": rows})
            del block, x
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
