"""Side-by-side CPU timings of the fused paths against PyTorch, as time ratios.

Each ratio is the median over repetitions of (baseline time / ours time), the two timed
back to back in every repetition (docs/architecture.md, "Measuring"), so a busy machine
slows both alike. Also reports bytes saved for backward (saved_tensors_hooks, deduplicated
by storage, parameters and buffers left out), the compute floor (FLOPs over a GEMM rate
measured on the spot) and the bandwidth floor of the fused CPU step (the bytes its passes
over memory move, counted from the pipeline in ``PASSES``, over a copy bandwidth measured on
the spot).

    python bench/report.py                       # all sections, a few minutes
    python bench/report.py --only dw --reps 5 --json out.json
    python bench/report.py --only budget         # the pass budget alone: no timing
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
from fbnet_fast.backends import registry
from fbnet_fast.backends.plan import bn1_stats_via_covariance
from fbnet_fast.nn.space import SearchSpace, conv_out
from fbnet_fast.nn.space import layer_shapes as space_layer_shapes
from fbnet_fast.testing import make_pair

import gpu_report  # its CPU timer; a sibling script, importable from bench/

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


# --- the pass budget of the fused CPU step --------------------------------------------
# One training step (forward, then backward with the forward recomputed from x) of the
# fused CPU block, step by step: how many times each tensor is read or written in full,
# "before" (the pipeline up to issue 14: BN applied and its statistics taken in passes of
# their own) and "now". Tensors: A = the expanded [N*H*W, T] tensor (the first 1x1's output,
# T = sum of the candidates' expanded channels = 22 C_in for the paper's), D = [N*H'*W', T]
# (the depthwise output), Z = [N*H'*W', k*C_out] (the k candidates' second 1x1 outputs),
# X = [N*H*W, C_in], Y = [N*H'*W', C_out]. A pass over cached data (a row or tile just
# written) is not counted.
# (step, {tensor: passes} before, {tensor: passes} now[, now where A is made whole: maps with
# at most C_in^2 / 16 rows, where BN1's statistics are taken from A, not X's covariance])
PASSES = [
    ("first 1x1, forward + recomputed (now the forward's is made per tile in the depthwise's"
     " prologue, where BN1's statistics come from the covariance)", {"X": 2, "A": 2},
     {"X": 1, "A": 1}, {"X": 2, "A": 2}),
    ("BN1 statistics (from X's [C, C] covariance)", {"X": 4}, {"X": 4}),
    ("BN1 + ReLU applied (the depthwise prologue)", {}, {}),
    ("depthwise forward + recomputed (now the forward reads X, not A)", {"A": 2, "D": 2},
     {"X": 1, "A": 1, "D": 2}, {"A": 2, "D": 2}),
    ("BN2 statistics (the depthwise epilogue)", {}, {}),
    ("BN2 + ReLU applied, forward + recomputed (now the second 1x1s' prologue)",
     {"D": 3}, {}),
    ("second 1x1s, forward + recomputed", {"D": 2, "Z": 2}, {"D": 2, "Z": 2}),
    ("BN3 statistics (now the second 1x1s' epilogue), mask-weighted combine",
     {"Z": 2, "Y": 2, "X": 1}, {"Z": 1, "Y": 2, "X": 1}),
    ("BN3 backward, mask gradient", {"Z": 3, "Y": 4, "X": 1}, {"Z": 3, "Y": 4, "X": 1}),
    ("second 1x1s backward (now one op: dZ read once, BN2's ReLU mask and sums inside)",
     {"Z": 2, "D": 2}, {"Z": 1, "D": 2}),
    ("BN2 + ReLU backward (sums, then apply; now the depthwise backward's prologue)",
     {"D": 5}, {}),
    ("depthwise backward: grad-input, grad-weight, ReLU mask + BN1 sums inside (now one "
     "pass over tiles reading BN2's input gradient and D once)",
     {"D": 2, "A": 3}, {"D": 2, "A": 2}),
    ("BN1 + ReLU backward (folded into the first 1x1's backward)", {}, {}),
    ("first 1x1 backward (weights, input; now the products of g are the depthwise backward's"
     " epilogue, up to 512 KB of weight, whole GEMMs reading g twice above)",
     {"A": 2, "X": 9}, {"X": 9}),
]


def pass_budget(n: int, c_in: int, c_out: int, s: int, h: int, bandwidth: float) -> dict:
    """Bytes the fused CPU step moves (float32) before and now, in passes over A (the
    [N*H*W, T] expanded tensor) and as a floor in ms at ``bandwidth`` bytes/s."""
    layout = MixedBlock(c_in, c_out, s, backend="reference").layout
    ho = conv_out(h, s)
    m1, m2, t = n * h * h, n * ho * ho, layout.total_mid
    size = {"A": m1 * t, "D": m2 * t, "Z": m2 * len(layout.slots) * c_out, "X": m1 * c_in,
            "Y": m2 * c_out}
    whole_a = not bn1_stats_via_covariance(m1, c_in)
    out = {}
    for col, when in ((1, "before"), (2, "now")):
        elems = sum(size[k] * v for row in PASSES
                    for k, v in (row[3] if col == 2 and whole_a and len(row) > 3
                                 else row[col]).items())
        out[f"passes_{when}"] = elems / size["A"]
        out[f"MB_{when}"] = 4 * elems / 2**20
        out[f"bw_floor_ms_{when}"] = 4 * elems / bandwidth * 1e3
    return out


def copy_bandwidth(mb: int = 64, reps: int = 5) -> float:
    """Bytes/s of a plain float32 copy of ``mb`` MB (read + write counted), best of reps."""
    a = torch.randn(mb * 2**20 // 4)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best


def supernet_case(n: int, res: int, backend: str, channels_last: bool = True,
                  mask: str = "soft", space: SearchSpace | None = None, classes: int = 100):
    torch.manual_seed(0)
    net = fbnet_fast.SuperNet(space or SearchSpace(resolution=res), num_classes=classes,
                              backend=backend, mask=mask)
    registry.fast_layers(net, "cpu", backend)  # the stem and head as the search runs them
    x = torch.randn(n, 3, res, res)
    if channels_last:
        net = net.to(memory_format=CL)
        x = x.contiguous(memory_format=CL)
    target = torch.randint(0, classes, (n,))
    net.train()
    one = torch.ones(())

    def fwd():
        net.zero_grad(set_to_none=True)
        return F.cross_entropy(net(x), target), one

    fwd.module = net
    return fwd


# --- measurement -------------------------------------------------------------------

def timed_alone(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls in a row after one warm-up: the steady state a
    training loop sees, where ``ratios`` starts each call after another variant's."""
    return statistics.median(gpu_report.timer(torch.device("cpu"))(fn, reps, 1))


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


def section_budget(args, rate, bandwidth) -> list:
    """The pass budget and both floors per layer shape: arithmetic, nothing timed."""
    rows = []
    for c_in, c_out, s, h in layer_shapes(args.quick)[: args.max_shapes]:
        h = args.size or max(1, h // args.downscale)
        b = pass_budget(args.mixed_batch, c_in, c_out, s, h, bandwidth)
        flop = mixed_flops(args.mixed_batch, c_in, c_out, s, h) / rate * 1e3
        rows.append({"C_in": c_in, "C_out": c_out, "stride": s, "H": h, "batch": args.mixed_batch,
                     **b, "floor_ms": flop})
        print(f"budget {c_in:3d}->{c_out:3d} s{s} H={h:3d}  passes over A {b['passes_before']:.1f}"
              f" -> {b['passes_now']:.1f}  MB {b['MB_before']:.0f} -> {b['MB_now']:.0f}  "
              f"bandwidth floor {b['bw_floor_ms_before']:.2f} -> {b['bw_floor_ms_now']:.2f} ms  "
              f"FLOP floor {flop:.2f} ms", flush=True)
    return rows


def section_mixed(args, rate, bandwidth) -> list:
    rows = []
    for c_in, c_out, s, h in layer_shapes(args.quick)[: args.max_shapes]:
        h = args.size or max(1, h // args.downscale)
        budget = pass_budget(args.mixed_batch, c_in, c_out, s, h, bandwidth)
        fwds = mixed_case(args.mixed_batch, c_in, c_out, s, h)
        res = ratios(steps(fwds), "fused", args.reps)
        mem = {k: saved_bytes(fwds[k], _state(fwds[k].module)) for k in ("fused", "ref_cl", "ref_ckpt")}
        floor = mixed_flops(args.mixed_batch, c_in, c_out, s, h) / rate
        rows.append({"C_in": c_in, "C_out": c_out, "stride": s, "H": h, "batch": args.mixed_batch,
                     **{f"{k}_ms": v[0] * 1e3 for k, v in res.items()},
                     **{f"speedup_vs_{k}": v[1] for k, v in res.items() if k != "fused"},
                     "floor_ms": floor * 1e3, "passes": budget["passes_now"],
                     "bw_floor_ms": budget["bw_floor_ms_now"],
                     **{f"saved_MB_{k}": v / 2**20 for k, v in mem.items()}})
        r = rows[-1]
        print(f"mixed {c_in:3d}->{c_out:3d} s{s} H={h:3d}  fused {r['fused_ms']:8.2f} ms "
              f"(floors: FLOP {r['floor_ms']:.2f}, bandwidth {r['bw_floor_ms']:.2f})  "
              f"ref NCHW x{r['speedup_vs_ref_nchw']:.2f}  "
              f"CL x{r['speedup_vs_ref_cl']:.2f}  ckpt x{r['speedup_vs_ref_ckpt']:.2f}  saved MB "
              f"fused {r['saved_MB_fused']:.2f} / ref {r['saved_MB_ref_cl']:.2f} "
              f"(ckpt {r['saved_MB_ref_ckpt']:.2f})", flush=True)
    return rows


MASK_SIZES = {  # name: (batch, resolution, space)
    "quick": (32, 32, lambda: SearchSpace.small(resolution=32, width=0.25, head_channels=256)),
    "224": (8, 224, lambda: SearchSpace(resolution=224)),
}


def section_supernet(args) -> dict:
    n, res = (2, 32) if args.quick else (args.supernet_batch, args.resolution)
    fwds = {"fused": supernet_case(n, res, "cpu"), "ref_cl": supernet_case(n, res, "reference")}
    timed = _fused_vs_reference(fwds, max(2, args.reps // 2))
    mem = {k: saved_bytes(f, _state(f.module)) for k, f in fwds.items()}
    del fwds
    rss = {k: peak_rss_mb(b, n, res) for k, b in (("fused", "cpu"), ("ref_cl", "reference"))}
    out = {"resolution": res, "batch": n, **timed,
           "saved_MB_fused": mem["fused"] / 2**20, "saved_MB_ref_cl": mem["ref_cl"] / 2**20,
           "max_rss_MB_fused": rss["fused"], "max_rss_MB_ref_cl": rss["ref_cl"]}
    print(f"supernet {res}px batch {n}: fused {out['fused_s']:.3f} s, "
          f"reference CL {out['ref_cl_s']:.3f} s (x{out['speedup_vs_ref_cl']:.2f}); saved MB "
          f"{out['saved_MB_fused']:.1f} vs {out['saved_MB_ref_cl']:.1f}; max RSS MB "
          f"{rss['fused']:.0f} vs {rss['ref_cl']:.0f}", flush=True)
    out["quick_size"] = _quick_size_step(args)
    return out


def _fused_vs_reference(fwds: dict, reps: int) -> dict:
    """Steps of ``fwds["fused"]`` and ``fwds["ref_cl"]`` timed interleaved: both times and the
    median per-repetition ratio."""
    times = ratios(steps(fwds), "fused", reps)
    return {"fused_s": times["fused"][0], "ref_cl_s": times["ref_cl"][0],
            "speedup_vs_ref_cl": times["ref_cl"][1]}


def _quick_size_step(args) -> dict:
    """The weight step the main job runs most (quick preset: 32x32 small-input macro, width
    0.25, head 256, 10 classes, batch 32), fused against the channels-last reference, and
    the fused step alone, as the main job runs it."""
    n, res, space = MASK_SIZES["quick"]
    n = 2 if args.quick else n
    fwds = {k: supernet_case(n, res, b, space=space(), classes=10)
            for k, b in (("fused", "cpu"), ("ref_cl", "reference"))}
    out = {"batch": n, "resolution": res, **_fused_vs_reference(fwds, max(3, args.reps)),
           "fused_alone_s": timed_alone(step(fwds["fused"]), max(3, args.reps))}
    print(f"supernet at the quick preset's size (batch {n}): fused {out['fused_s'] * 1e3:.0f} ms,"
          f" reference CL {out['ref_cl_s'] * 1e3:.0f} ms (x{out['speedup_vs_ref_cl']:.2f});"
          f" fused timed alone, step after step {out['fused_alone_s'] * 1e3:.0f} ms",
          flush=True)
    return out


def section_masks(args) -> dict:
    """Images/s of a weight step (forward + backward) with soft, hard and two-path masks:
    what each sampling mode costs at the quick preset's size and at 224x224."""
    out = {}
    for size, (n, res, space) in MASK_SIZES.items():
        if args.quick:
            n = 2
        fwds = {m: supernet_case(n, res, "auto", mask=m, space=space(), classes=10)
                for m in ("soft", "hard", "two-path")}
        times = ratios(steps(fwds), "soft", max(3, args.reps))
        out[size] = {m: {"batch": n, "resolution": res, "step_s": t,
                         "images_per_s": n / t, "speedup_vs_soft": 1 / r}
                     for m, (t, r) in times.items()}
        print(f"masks at {size} (batch {n}): " + ", ".join(
            f"{m} {v['images_per_s']:.0f} img/s (x{v['speedup_vs_soft']:.2f})"
            for m, v in out[size].items()), flush=True)
    return out


def discrete_case(net, arch, backend: str, n: int, res: int):
    """One SGD step of the discrete FBNet ``arch`` carrying ``net``'s weights, on the layers
    ``registry.fast_layers`` gives it for ``backend``: what fine-tuning runs."""
    torch.manual_seed(0)
    model = registry.fast_layers(net.extract(arch), "cpu", backend).to(memory_format=CL)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(n, 3, res, res).contiguous(memory_format=CL)
    target = torch.randint(0, net.classifier.out_features, (n,))

    def run():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        opt.step()
    return run


def section_discrete(args) -> list:
    """Training steps of discrete architectures drawn from a quick-preset supernet (what the
    main job's fine-tuning, ``fbnet-fast train`` and ``baseline`` run): the plain model
    against the one on the C++ layers and fused candidate blocks."""
    n, res, space = MASK_SIZES["quick"]
    n = 2 if args.quick else n
    torch.manual_seed(0)
    net = fbnet_fast.SuperNet(space(), num_classes=10)
    g = torch.Generator().manual_seed(0)
    out = []
    for k in range(args.archs):
        arch = net.sample_architecture(g, name=f"sample_{k + 1}")
        runs = {v: discrete_case(net, arch, b, n, res)
                for v, b in (("fused", "cpu"), ("plain", "reference"))}
        t = ratios(runs, "fused", max(3, args.reps))
        out.append({"arch": list(arch.blocks), "batch": n, "fused_ms": t["fused"][0] * 1e3,
                    "plain_ms": t["plain"][0] * 1e3, "speedup": t["plain"][1]})
        print(f"discrete {arch.name} (batch {n}): fused {out[-1]['fused_ms']:.0f} ms, plain "
              f"{out[-1]['plain_ms']:.0f} ms (x{out[-1]['speedup']:.2f})", flush=True)
    print(f"discrete: median x{statistics.median(o['speedup'] for o in out):.2f}", flush=True)
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


SECTIONS = ("budget", "dw", "mixed", "supernet", "masks", "discrete")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", choices=SECTIONS,
                   help="sections to run (repeatable; default all)")
    p.add_argument("--reps", type=int, default=7, help="interleaved repetitions per case")
    p.add_argument("--max-shapes", type=int, default=None, help="first N shapes per section")
    p.add_argument("--batch", type=int, default=16, help="depthwise batch")
    p.add_argument("--mixed-batch", type=int, default=8, help="MixedBlock batch")
    p.add_argument("--downscale", type=int, default=2, help="divide MixedBlock map sizes by this")
    p.add_argument("--size", type=int, default=None,
                   help="every MixedBlock map this size instead (e.g. 4: the fixed cost per call)")
    p.add_argument("--supernet-batch", type=int, default=8)
    p.add_argument("--resolution", type=int, default=224, help="SuperNet input size")
    p.add_argument("--archs", type=int, default=6, help="sampled architectures (discrete)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    sections = args.only or SECTIONS
    rate, bandwidth = gemm_rate(), copy_bandwidth()
    out = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "gemm_gflops": rate / 1e9, "copy_GBps": bandwidth / 1e9},
           "command": " ".join(["python"] + sys.argv)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"GEMM {rate / 1e9:.0f} GFLOP/s, copy {bandwidth / 1e9:.1f} GB/s", flush=True)
    if "budget" in sections:
        out["budget"] = section_budget(args, rate, bandwidth)
    if "dw" in sections:
        out["depthwise"] = section_dw(args)
    if "mixed" in sections:
        out["mixed_block"] = section_mixed(args, rate, bandwidth)
    if "supernet" in sections:
        out["supernet"] = section_supernet(args)
    if "masks" in sections:
        out["masks"] = section_masks(args)
    if "discrete" in sections:
        out["discrete"] = section_discrete(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
