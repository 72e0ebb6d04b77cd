"""GPU report for the fused MixedBlock (issue #7): correctness first, then speed and memory.

One call checks the fused backends against the reference on the device, then times one
training step (forward + backward) of every distinct FBNet layer shape and of the whole
SuperNet at 224x224 (batches 64/128/256), for: eager reference NCHW and channels_last,
torch.compile (default, max-autotune), and ours (triton, cuda), in fp32 and bf16 autocast.
It reports median times, ratios against the best eager baseline, peak memory, images/s and
what that means for the paper's 90-epoch ImageNet-100 search. Writes JSON and a table.

    python bench/gpu_report.py --out runs/gpu_report.json
    TRITON_INTERPRET=1 python bench/gpu_report.py --device cpu --quick   # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

SEARCH_EPOCHS = 90
IMAGES_PER_EPOCH = 128_000          # ImageNet-100: ~1300 images x 100 classes
SUPERNET_BATCHES = (64, 128, 256)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (correctness only)")
    p.add_argument("--quick", action="store_true",
                   help="one small layer, correctness only on CPU; fewer repetitions on GPU")
    p.add_argument("--layer-batch", type=int, default=64, help="batch of the per-layer timings")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per measurement")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--providers", default=None,
                   help="comma-separated subset of: eager_nchw, eager_channels_last, "
                        "compile_default, compile_max_autotune, triton, cuda (default: all)")
    p.add_argument("--no-layers", action="store_true")
    p.add_argument("--no-supernet", action="store_true")
    p.add_argument("--supernet-batches", default=",".join(map(str, SUPERNET_BATCHES)))
    p.add_argument("--supernet-reps", type=int, default=None,
                   help="timed repetitions of a SuperNet step (default: --reps)")
    p.add_argument("--check-only", action="store_true", help="correctness, no timings")
    p.add_argument("--no-check", action="store_true",
                   help="timings only (the correctness was checked in an earlier call)")
    p.add_argument("--out", default=None, help="JSON output path (default: stdout only)")
    return p.parse_args(argv)


# --- correctness -------------------------------------------------------------------------

def check_correctness(device, backends, shapes, dtype):
    """Max error of output / input grad / mask grad / parameter grads / buffers vs the
    reference (fbnet_fast.testing's pair and step), relative to max(1, |reference|)."""
    import torch
    from fbnet_fast.testing import make_pair, run_pair

    def err(pairs):
        return max((a.double() - b.double()).abs().max().item() / max(1.0, b.abs().max().item())
                   for a, b in pairs)

    results = []
    for (c_in, c_out, stride, size), cands in shapes:
        for backend in backends:
            ours, ref = make_pair(backend, c_in, c_out, stride, cands, dtype=dtype, device=device)
            run = run_pair(ours, ref, size=size, per_example=True)
            errs = {"y": err([run.output]), "grad_x": err([run.grad_x]),
                    "grad_mask": err([run.grad_mask]),
                    "grad_params": err(run.grad_params.values()),
                    "buffers": err(run.buffers.values())}
            tol = 1e-9 if dtype == torch.float64 else 2e-3
            results.append({"shape": [c_in, c_out, stride, size], "backend": backend,
                            "dtype": str(dtype).replace("torch.", ""), "errors": errs,
                            "ok": all(v <= tol for v in errs.values())})
    return results


# --- timing ------------------------------------------------------------------------------

def timer(device):
    """run(fn, reps, warmup) -> seconds of each of ``reps`` calls after ``warmup`` ones (CUDA
    events on a GPU, the wall clock on the CPU; bench/report.py times with it too)."""
    import torch
    if device.type == "cuda":
        def run(fn, reps, warmup):
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            return times
    else:
        def run(fn, reps, warmup):
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return times
    return run


def measure(step, device, reps, warmup=3):
    """(median seconds, peak bytes above the memory held before the step)."""
    import torch
    run = timer(device)
    peak = None
    if device.type == "cuda":
        step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    times = run(step, reps, warmup)
    return statistics.median(times), peak


def _providers(device, compile_ok, wanted=None):
    """name -> (backend, memory_format, compile mode or None), restricted to ``wanted``."""
    import torch
    from fbnet_fast.backends import registry as backends
    out = {"eager_nchw": ("reference", torch.contiguous_format, None),
           "eager_channels_last": ("reference", torch.channels_last, None)}
    if compile_ok:
        out["compile_default"] = ("reference", torch.channels_last, "default")
        out["compile_max_autotune"] = ("reference", torch.channels_last, "max-autotune")
    for fam in ("triton", "cuda"):
        if backends.BACKENDS[fam].why_unavailable(device) is None:
            out[fam] = (fam, torch.channels_last, None)
    return {k: v for k, v in out.items() if wanted is None or k in wanted}


def _autocast(device, dtype_name):
    import contextlib
    import torch
    if dtype_name == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def time_layers(device, shapes, batch, reps, dtypes, compile_ok, wanted=None, emit=None):
    import torch
    from fbnet_fast import MixedBlock
    rows = []
    for c_in, c_out, stride, size in shapes:
        for dt in dtypes:
            for name, (backend, fmt, mode) in _providers(device, compile_ok, wanted).items():
                torch.manual_seed(0)
                block = MixedBlock(c_in, c_out, stride, backend=backend).to(device)
                x = torch.randn(batch, c_in, size, size, device=device).to(memory_format=fmt)
                x.requires_grad_()
                w = torch.softmax(torch.randn(block.num_candidates, device=device), 0)
                fwd = torch.compile(block, mode=mode) if mode else block

                def step():
                    with _autocast(device, dt):
                        y = fwd(x, w)
                    y.float().sum().backward()
                try:
                    t, peak = measure(step, device, reps)
                    rows.append({"kind": "layer", "shape": [c_in, c_out, stride, size],
                                 "batch": batch, "dtype": dt, "provider": name,
                                 "median_s": t, "peak_bytes": peak})
                except Exception as e:  # report, keep going (e.g. compile failures)
                    rows.append({"kind": "layer", "shape": [c_in, c_out, stride, size],
                                 "batch": batch, "dtype": dt, "provider": name,
                                 "error": f"{type(e).__name__}: {e}"[:500]})
                if emit:
                    emit(rows[-1])
                del block, x, fwd
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def time_supernet(device, batches, reps, dtypes, compile_ok, wanted=None, emit=None):
    import torch
    import torch.nn.functional as F
    from fbnet_fast import SearchSpace
    from fbnet_fast.nn.supernet import SuperNet
    rows = []
    for batch in batches:
        for dt in dtypes:
            for name, (backend, fmt, mode) in _providers(device, compile_ok, wanted).items():
                torch.manual_seed(0)
                try:
                    net = SuperNet(SearchSpace(), num_classes=100, backend=backend).to(device)
                    net = net.to(memory_format=fmt)
                    opt = torch.optim.SGD(net.weight_parameters(), lr=0.1, momentum=0.9)
                    fwd = torch.compile(net, mode=mode) if mode else net
                    x = torch.randn(batch, 3, 224, 224, device=device).to(memory_format=fmt)
                    y = torch.randint(0, 100, (batch,), device=device)

                    def step():
                        opt.zero_grad(set_to_none=True)
                        with _autocast(device, dt):
                            loss = F.cross_entropy(fwd(x).float(), y)
                        loss.backward()
                        opt.step()
                    t, peak = measure(step, device, reps)
                    ips = batch / t
                    rows.append({"kind": "supernet", "batch": batch, "dtype": dt,
                                 "provider": name, "median_s": t, "peak_bytes": peak,
                                 "images_per_s": ips,
                                 "search_hours_90_epochs": SEARCH_EPOCHS * IMAGES_PER_EPOCH
                                 / ips / 3600})
                except Exception as e:  # out of memory at large batches is a result too
                    rows.append({"kind": "supernet", "batch": batch, "dtype": dt,
                                 "provider": name, "error": f"{type(e).__name__}: {e}"[:500]})
                finally:
                    if emit:
                        emit(rows[-1])
                    net = fwd = opt = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return rows


def add_ratios(rows):
    """speedup = best eager time / this time, within one (kind, shape/batch, dtype)."""
    groups = {}
    for r in rows:
        if "median_s" in r:
            groups.setdefault((r["kind"], str(r.get("shape")), r["batch"], r["dtype"]), []).append(r)
    for g in groups.values():
        eager = [r["median_s"] for r in g if r["provider"].startswith("eager")]
        eager_mem = [r["peak_bytes"] for r in g if r["provider"].startswith("eager")
                     and r["peak_bytes"] is not None]
        for r in g:
            if eager:
                r["speedup_vs_best_eager"] = min(eager) / r["median_s"]
            if eager_mem and r["peak_bytes"]:
                r["memory_vs_best_eager"] = r["peak_bytes"] / min(eager_mem)


def table(rows) -> str:
    lines = [f"{'kind':8} {'shape/batch':22} {'dtype':5} {'provider':22} {'ms':>9} "
             f"{'x eager':>8} {'peak MiB':>9} {'img/s':>8} {'90ep h':>7}"]
    for r in rows:
        where = str(r.get("shape") or r["batch"]) if r["kind"] == "layer" else f"b{r['batch']}"
        if "error" in r:
            lines.append(f"{r['kind']:8} {where:22} {r['dtype']:5} {r['provider']:22} "
                         f"ERROR {r['error'][:60]}")
            continue
        peak = f"{r['peak_bytes'] / 2**20:9.1f}" if r.get("peak_bytes") else f"{'-':>9}"
        ips = f"{r['images_per_s']:8.0f}" if "images_per_s" in r else f"{'-':>8}"
        hours = f"{r['search_hours_90_epochs']:7.1f}" if "images_per_s" in r else f"{'-':>7}"
        lines.append(f"{r['kind']:8} {where:22} {r['dtype']:5} {r['provider']:22} "
                     f"{r['median_s'] * 1e3:9.2f} {r.get('speedup_vs_best_eager', 0):8.2f} "
                     f"{peak} {ips} {hours}")
    return "\n".join(lines)


def _import_path() -> None:
    """Run from a source checkout without installing: put the repository on the path."""
    try:
        import fbnet_fast  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        # Triton decorates its kernels in interpreter mode only if this is set first.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    _import_path()
    import torch
    from fbnet_fast.nn.space import SearchSpace, layer_shapes as space_layer_shapes
    from fbnet_fast.testing import LAYER_SHAPES
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_report: CUDA is not available; use --device cpu --quick for the smoke test",
              file=sys.stderr)
        return 2
    from fbnet_fast.backends import registry as backends
    fused = [b for b in ("triton", "cuda") if backends.BACKENDS[b].why_unavailable(device) is None]
    if not fused:
        print("gpu_report: no fused backend can run here: "
              + "; ".join(str(backends.BACKENDS[b].why_unavailable(device))
                          for b in ("triton", "cuda")), file=sys.stderr)
        return 2
    layer_shapes = sorted(space_layer_shapes(SearchSpace()))
    if args.quick or device.type == "cpu":
        check_shapes = [((16, 24, 2, 5), ("k3_e1", "k5_e1_g2", "skip")),
                        ((16, 16, 1, 4), ("k3_e3", "k5_e1", "skip"))]
    else:
        check_shapes = [((c, o, s, 8), None) for c, o, s in LAYER_SHAPES]
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              platform.processor() or platform.machine(),
              "torch": torch.__version__, "correctness": [], "timings": []}

    def save():
        """After every result, so a run stopped part-way still leaves what it measured."""
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)

    checks = [] if args.no_check else check_correctness(device, fused, check_shapes, dtype)
    report["correctness"] = checks
    save()
    ok = all(c["ok"] for c in checks)
    if checks:
        print(f"correctness ({', '.join(fused)}): {'ok' if ok else 'FAILED'}", flush=True)
    for c in checks:
        print(f"  {c['backend']:7} {c['shape']} {c['dtype']}: "
              + ", ".join(f"{k} {v:.1e}" for k, v in c["errors"].items()))
    if ok and device.type == "cuda" and not args.check_only:
        import triton
        report["triton"] = triton.__version__
        dtypes = args.dtypes.split(",")
        reps = 5 if args.quick else args.reps
        wanted = set(args.providers.split(",")) if args.providers else None
        rows = report["timings"]

        def emit(row):
            rows.append(row)
            add_ratios(rows)
            save()
            print(table([row]).splitlines()[-1], flush=True)
        if not args.no_layers:
            shapes = layer_shapes[:2] if args.quick else layer_shapes
            time_layers(device, shapes, args.layer_batch, reps, dtypes, not args.no_compile,
                        wanted, emit)
        if not args.no_supernet:
            batches = [int(b) for b in args.supernet_batches.split(",")]
            time_supernet(device, batches[:1] if args.quick else batches,
                          args.supernet_reps or reps, dtypes, not args.no_compile, wanted, emit)
        print(table(rows))
    save()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
