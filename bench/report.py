"""Side-by-side CPU timings of the fused paths against PyTorch, as time ratios.

Each ratio is the median over repetitions of (baseline time / ours time), the two timed
back to back in every repetition (docs/architecture.md, "Measuring"), so a busy machine
slows both alike. Also reports bytes saved for backward (saved_tensors_hooks, deduplicated
by storage, parameters and buffers left out) and the compute floor (FLOPs over a GEMM rate
measured on the spot).

    python bench/report.py                       # all sections, a few minutes
    python bench/report.py --only dw --reps 5 --json out.json
The bench_*.py files import the case builders below.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:
    import fbnet_fast
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import fbnet_fast
from fbnet_fast import MixedBlock
from fbnet_fast.nn.space import SearchSpace, conv_out
from fbnet_fast.nn.space import layer_shapes as space_layer_shapes
from fbnet_fast.testing import make_pair

CL = torch.channels_last


# --- shapes -------------------------------------------------------------------------

def dw_shapes(quick: bool = False) -> list:
    """Distinct depthwise convs of the 224x224 FBNet space: (C, H, K, stride), widest expansion."""
    if quick:
        return [(24, 14, 3, 1), (48, 14, 5, 2)]
    seen = []
    for l in SearchSpace().layers():
        for k in (3, 5):
            key = (6 * l.in_channels, l.in_size, k, l.stride)
            if key not in seen:
                seen.append(key)
    return seen


def layer_shapes(quick: bool = False) -> list:
    """Distinct FBNet layers: (C_in, C_out, stride, H)."""
    if quick:
        return [(16, 16, 1, 8), (16, 24, 2, 8)]
    return space_layer_shapes(SearchSpace())


# --- cases: name -> forward callable returning (output, grad for it) -----------------

def step(fwd):
    """The training step of a forward: forward, then backward with its grad."""
    def run():
        y, dy = fwd()
        y.backward(dy)
    return run


def steps(fwds: dict) -> dict:
    return {k: step(f) for k, f in fwds.items()}

def dw_case(n: int, c: int, h: int, k: int, s: int) -> dict:
    from fbnet_fast.backends import ops
    torch.manual_seed(0)
    w = torch.randn(c, 1, k, k, requires_grad=True)
    x_nchw = torch.randn(n, c, h, h, requires_grad=True)
    x_cl = x_nchw.detach().contiguous(memory_format=CL).requires_grad_()
    ho = conv_out(h, s)
    dy_nchw = torch.randn(n, c, ho, ho)
    dy_cl = dy_nchw.contiguous(memory_format=CL)

    def torch_fwd(x, dy):
        return lambda: (F.conv2d(x, w, stride=s, padding=k // 2, groups=c), dy)

    return {"ours": lambda: (ops.depthwise_conv2d(x_cl, w, s), dy_cl),
            "torch_nchw": torch_fwd(x_nchw, dy_nchw),
            "torch_cl": torch_fwd(x_cl, dy_cl)}


def dw_macs(n, c, h, k, s) -> int:
    ho = conv_out(h, s)
    return n * c * ho * ho * k * k


def mixed_case(n: int, c_in: int, c_out: int, s: int, h: int) -> dict:
    """Forwards of one MixedBlock in training mode (per-batch mask), fused and reference."""
    fused, ref = make_pair("cpu", c_in, c_out, s, dtype=torch.float32)
    torch.manual_seed(0)
    mask = torch.softmax(torch.randn(fused.num_candidates), 0).requires_grad_()
    x = torch.randn(n, c_in, h, h)
    x_cl = x.contiguous(memory_format=CL)
    ho = conv_out(h, s)
    dy = torch.randn(n, c_out, ho, ho)
    dy_cl = dy.contiguous(memory_format=CL)

    def fwd(block, x, dy, ckpt=False):
        xi = x.detach().requires_grad_()
        if ckpt:
            return lambda: (checkpoint(block, xi, mask, use_reentrant=False), dy)
        return lambda: (block(xi, mask), dy)

    fwds = {"fused": fwd(fused, x_cl, dy_cl), "ref_nchw": fwd(ref, x, dy),
            "ref_cl": fwd(ref, x_cl, dy_cl), "ref_ckpt": fwd(ref, x_cl, dy_cl, ckpt=True)}
    fwds["fused"].module, fwds["ref_cl"].module, fwds["ref_ckpt"].module = fused, ref, ref
    return fwds


def mixed_flops(n, c_in, c_out, s, h) -> float:
    """FLOPs of one training step of the reference block: 3x the forward MACs, x2."""
    block = MixedBlock(c_in, c_out, s, backend="reference")
    ho = conv_out(h, s)
    macs = 0
    for sl in block.layout.slots:
        g, k = sl.spec.groups, sl.spec.kernel
        macs += n * h * h * sl.mid * c_in // g + n * ho * ho * sl.mid * (k * k + c_out // g)
    if block.skip_weight is not None:
        macs += n * ho * ho * c_in * c_out
    return 2.0 * 3 * macs


def supernet_case(n: int, res: int, backend: str, channels_last: bool = True):
    torch.manual_seed(0)
    net = fbnet_fast.SuperNet(SearchSpace(resolution=res), num_classes=100, backend=backend)
    x = torch.randn(n, 3, res, res)
    if channels_last:
        net = net.to(memory_format=CL)
        x = x.contiguous(memory_format=CL)
    target = torch.randint(0, 100, (n,))
    net.train()
    one = torch.ones(())

    def fwd():
        net.zero_grad(set_to_none=True)
        return F.cross_entropy(net(x), target), one

    fwd.module = net
    return fwd


# --- measurement -------------------------------------------------------------------

def ratios(fns: dict, ours: str, reps: int) -> dict:
    """{name: (median time s, median ratio name/ours)}, all timed interleaved."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    out = {}
    for k, ts in times.items():
        r = statistics.median(a / b for a, b in zip(ts, times[ours]))
        out[k] = (statistics.median(ts), r)
    return out


def saved_bytes(fn, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs,
    leaving out the storages of ``exclude`` (parameters and buffers: they exist anyway)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _state(module) -> list:
    return list(module.parameters()) + list(module.buffers())


def gemm_rate(reps: int = 5) -> float:
    """FLOP/s of a float32 GEMM shaped like a FBNet 1x1 conv ([N*H*W, C] x [C, 6C])."""
    a, b = torch.randn(6272, 144), torch.randn(144, 864)
    best = float("inf")
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 6272 * 144 * 864 / best


# --- sections ----------------------------------------------------------------------

def section_dw(args) -> list:
    rows = []
    shapes = dw_shapes(args.quick)[: args.max_shapes]
    for c, h, k, s in shapes:
        res = ratios(steps(dw_case(args.batch, c, h, k, s)), "ours", args.reps)
        best = min(res["torch_nchw"][1], res["torch_cl"][1])
        rows.append({"C": c, "H": h, "K": k, "stride": s, "batch": args.batch,
                     "ours_ms": res["ours"][0] * 1e3, "torch_nchw_ms": res["torch_nchw"][0] * 1e3,
                     "torch_cl_ms": res["torch_cl"][0] * 1e3,
                     "speedup_vs_nchw": res["torch_nchw"][1], "speedup_vs_cl": res["torch_cl"][1],
                     "speedup_vs_best": best})
        r = rows[-1]
        print(f"dw C={c:4d} H={h:3d} K={k} s={s}  ours {r['ours_ms']:8.2f} ms  "
              f"torch NCHW x{r['speedup_vs_nchw']:.2f}  CL x{r['speedup_vs_cl']:.2f}  "
              f"(vs faster: x{best:.2f})", flush=True)
    return rows


def section_mixed(args, rate) -> list:
    rows = []
    for c_in, c_out, s, h in layer_shapes(args.quick)[: args.max_shapes]:
        h = max(1, h // args.downscale)
        fwds = mixed_case(args.mixed_batch, c_in, c_out, s, h)
        res = ratios(steps(fwds), "fused", args.reps)
        mem = {k: saved_bytes(fwds[k], _state(fwds[k].module)) for k in ("fused", "ref_cl", "ref_ckpt")}
        floor = mixed_flops(args.mixed_batch, c_in, c_out, s, h) / rate
        rows.append({"C_in": c_in, "C_out": c_out, "stride": s, "H": h, "batch": args.mixed_batch,
                     **{f"{k}_ms": v[0] * 1e3 for k, v in res.items()},
                     **{f"speedup_vs_{k}": v[1] for k, v in res.items() if k != "fused"},
                     "floor_ms": floor * 1e3,
                     **{f"saved_MB_{k}": v / 2**20 for k, v in mem.items()}})
        r = rows[-1]
        print(f"mixed {c_in:3d}->{c_out:3d} s{s} H={h:3d}  fused {r['fused_ms']:8.2f} ms "
              f"(floor {r['floor_ms']:.2f})  ref NCHW x{r['speedup_vs_ref_nchw']:.2f}  "
              f"CL x{r['speedup_vs_ref_cl']:.2f}  ckpt x{r['speedup_vs_ref_ckpt']:.2f}  saved MB "
              f"fused {r['saved_MB_fused']:.2f} / ref {r['saved_MB_ref_cl']:.2f} "
              f"(ckpt {r['saved_MB_ref_ckpt']:.2f})", flush=True)
    return rows


def section_supernet(args) -> dict:
    n, res = (2, 32) if args.quick else (args.supernet_batch, args.resolution)
    fwds = {"fused": supernet_case(n, res, "cpu"), "ref_cl": supernet_case(n, res, "reference")}
    times = ratios(steps(fwds), "fused", max(2, args.reps // 2))
    mem = {k: saved_bytes(f, _state(f.module)) for k, f in fwds.items()}
    del fwds
    rss = {k: peak_rss_mb(b, n, res) for k, b in (("fused", "cpu"), ("ref_cl", "reference"))}
    out = {"resolution": res, "batch": n,
           "fused_s": times["fused"][0], "ref_cl_s": times["ref_cl"][0],
           "speedup_vs_ref_cl": times["ref_cl"][1],
           "saved_MB_fused": mem["fused"] / 2**20, "saved_MB_ref_cl": mem["ref_cl"] / 2**20,
           "max_rss_MB_fused": rss["fused"], "max_rss_MB_ref_cl": rss["ref_cl"]}
    print(f"supernet {res}px batch {n}: fused {out['fused_s']:.3f} s, "
          f"reference CL {out['ref_cl_s']:.3f} s (x{out['speedup_vs_ref_cl']:.2f}); saved MB "
          f"{out['saved_MB_fused']:.1f} vs {out['saved_MB_ref_cl']:.1f}; max RSS MB "
          f"{rss['fused']:.0f} vs {rss['ref_cl']:.0f}", flush=True)
    return out


def peak_rss_mb(backend: str, n: int, res: int, steps_run: int = 2) -> float:
    """Peak RSS of a fresh process that runs ``steps_run`` SuperNet steps on one backend.

    A process of its own, since a peak never goes down; read from VmHWM, which starts
    afresh at exec (ru_maxrss would inherit the forking parent's peak)."""
    code = (f"import report; report._rss_child({backend!r}, {n}, {res}, {steps_run})")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent,
                          capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def _rss_child(backend: str, n: int, res: int, steps_run: int) -> None:
    run = step(supernet_case(n, res, backend))
    for _ in range(steps_run):
        run()
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(kib / 1024)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("dw", "mixed", "supernet"), action="append",
                   help="sections to run (repeatable; default all)")
    p.add_argument("--reps", type=int, default=7, help="interleaved repetitions per case")
    p.add_argument("--max-shapes", type=int, default=None, help="first N shapes per section")
    p.add_argument("--batch", type=int, default=16, help="depthwise batch")
    p.add_argument("--mixed-batch", type=int, default=8, help="MixedBlock batch")
    p.add_argument("--downscale", type=int, default=2, help="divide MixedBlock map sizes by this")
    p.add_argument("--supernet-batch", type=int, default=8)
    p.add_argument("--resolution", type=int, default=224, help="SuperNet input size")
    p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    sections = args.only or ["dw", "mixed", "supernet"]
    rate = gemm_rate()
    out = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "gemm_gflops": rate / 1e9},
           "command": " ".join(["python"] + sys.argv)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"GEMM {rate / 1e9:.0f} GFLOP/s", flush=True)
    if "dw" in sections:
        out["depthwise"] = section_dw(args)
    if "mixed" in sections:
        out["mixed_block"] = section_mixed(args, rate)
    if "supernet" in sections:
        out["supernet"] = section_supernet(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
