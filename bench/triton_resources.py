"""Compile every Triton kernel ahead of time for sm_90 and sm_80, exactly as the launchers
would launch it for the FBNet layer shapes, and report shared memory, registers and spills.

No GPU is needed: the launchers run on meta tensors inside ``kernels.utils.recording``
(they record their ``Launch`` instead of running it), Triton's own argument binder turns
each launch into the signature, constexprs and alignment attributes its JIT would compile,
and ``triton.compile`` builds it for a target that is not there; ``ptxas -v`` reports the
resources. It must run without TRITON_INTERPRET (the interpreter's kernels cannot be
compiled), so tests/test_triton_aot.py runs it in a subprocess.

    python bench/triton_resources.py                 # the whole matrix, a markdown table
    python bench/triton_resources.py --ci --json f   # one compile per configuration class
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

try:
    import fbnet_fast  # noqa: F401
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fbnet_fast.backends.plan import Segment, plan_for  # noqa: E402
from fbnet_fast.nn.layout import MixedLayout  # noqa: E402
from fbnet_fast.nn.space import CANDIDATES, SearchSpace, layer_shapes  # noqa: E402

# The most shared memory one block may use (opt-in), bytes: A100 (sm_80), H100 (sm_90).
SHARED_LIMIT = {80: 166912, 90: 232448}
BATCHES = (64, 256)
# (name, compute dtype, TF32 dots): the dtypes the fused path runs (bf16/fp16 by autocast).
DTYPES = (("fp32-tf32", torch.float32, True), ("fp32-ieee", torch.float32, False),
          ("bf16", torch.bfloat16, False), ("fp16", torch.float16, False),
          ("fp64", torch.float64, False))


def kernels():
    """fbnet_fast.kernels, compiled or interpreted as TRITON_INTERPRET says (deferred)."""
    from fbnet_fast.backends.fused_triton import load_kernels
    return load_kernels()


# --- what the fused pipeline launches for one MixedBlock ----------------------------------

def block_launches(layout: MixedLayout, n: int, h: int, cdt: torch.dtype, device="meta",
                   per_example: bool = False) -> list:
    """The launchers' calls of one training step of the Triton MixedBlock (forward with BN
    statistics, backward's recomputed forward, backward), in the order and with the
    arguments of fbnet_fast/backends/fused_triton.py, recorded (not run) on ``device``
    tensors. tests/test_triton_aot.py checks them against a real run of the backend."""
    K = kernels()
    plan = plan_for(layout)
    L, geo = layout, plan.geometry((n, layout.in_channels, h, h))
    acc = K.utils.acc_dtype(cdt)
    hw, T, C_in, C_out = geo.ho * geo.wo, L.total_mid, L.in_channels, L.out_channels
    ncol = len(plan.mask_cols)

    def t(rows, cols, dtype=cdt):
        return torch.randn(rows, cols, dtype=dtype, device=device)

    def v(numel, dtype=acc):
        return torch.rand(numel, dtype=dtype, device=device) + 0.5

    dense1, dense_skip = (Segment(0, T, 0, C_in, 0),), (Segment(0, C_out, 0, C_in, 0),)
    X, W1, dww, pw2 = t(geo.rows_in, C_in), v(T * C_in, cdt), v(L.dw_numel, cdt), v(L.pw2_numel, cdt)
    skw = v(C_out * C_in, cdt) if L.skip_is_conv else None
    mask = v(ncol * (n if per_example else 1), acc).view(-1, ncol)
    mode = K.combine.SKIP_NONE if L.skip_index < 0 else (
        K.combine.SKIP_CONV if L.skip_is_conv else K.combine.SKIP_IDENTITY)
    with K.utils.recording() as launches:
        for stats in (True, False):   # the training forward, then backward's recomputation
            A = K.pointwise.pointwise_forward(X, W1, dense1, T, stats=stats)[0]
            D = K.depthwise.depthwise_forward(A, dww, n, h, h, L.stride, geo.runs, v(T), v(T),
                                              stats)[0]
            Z = K.pointwise.pointwise_forward(D, pw2, plan.pw2_groups, plan.n_conv * C_out,
                                              v(T), v(T), stats)[0]
            Xs = t(geo.rows_out, C_in) if L.stride != 1 else X
            S = K.pointwise.pointwise_forward(Xs, skw, dense_skip, C_out, stats=stats)[0] \
                if skw is not None else None
            scale3 = v(plan.n_conv * C_out)
            skip_kw = dict(res=X if L.residual else None, skip=X if mode == 1 else S,
                           skip_mode=mode, skip_scale=v(C_out) if S is not None else None,
                           skip_shift=v(C_out) if S is not None else None)
            if stats:
                K.combine.combine_forward(Z, scale3, scale3, mask, n, hw, C_out, **skip_kw)
        dY = t(geo.rows_out, C_out)
        K.combine.combine_backward(dY, Z, scale3, scale3, mask, n, hw, C_out, **skip_kw)
        dZ, dS = K.combine.combine_grad_inputs(
            dY, Z, mask, scale3, scale3, scale3, n, hw, C_out, skip=S,
            skip_scale=skip_kw["skip_scale"], skip_shift=skip_kw["skip_shift"],
            skip_coeffs=(v(C_out),) * 3 if S is not None else None)
        K.pointwise.pointwise_grad_weight(dZ, D, plan.pw2_groups, L.pw2_numel, v(T), v(T))
        dD = K.pointwise.pointwise_grad_input(dZ, pw2, plan.pw2_groups, T, out_dtype=acc)
        K.bn.relu_grad_sums_(dD, D, v(T), v(T))
        dD = K.bn.bn_grad_apply(dD, D, v(T), v(T), v(T), out=dD if cdt == acc else None,
                                out_dtype=cdt)
        K.depthwise.depthwise_grad_weight(dD, A, n, h, h, L.stride, geo.runs, L.dw_numel,
                                          v(T), v(T))
        dA = K.depthwise.depthwise_grad_input(dD, dww, n, h, h, L.stride, geo.runs, A, v(T),
                                              v(T))[0]
        K.bn.bn_grad_apply(dA, A, v(T), v(T), v(T), out=dA)
        K.pointwise.pointwise_grad_weight(dA, X, dense1, W1.numel())
        K.pointwise.pointwise_grad_input(dA, W1, dense1, C_in, out_dtype=acc)
        if S is not None:
            K.pointwise.pointwise_grad_weight(dS, Xs, dense_skip, skw.numel())
            K.pointwise.pointwise_grad_input(dS, skw, dense_skip, C_in, out_dtype=acc)
    return launches


def fbnet_cases() -> list:
    """(where, layout, N, H): the 224x224 space's distinct layer shapes at each batch, and
    the 32x32 quick space's."""
    out = []
    for space, batches in ((SearchSpace(), BATCHES), (SearchSpace.small(), (BATCHES[0],))):
        for c_in, c_out, stride, h in layer_shapes(space):
            layout = MixedLayout.build(c_in, c_out, stride, CANDIDATES)
            for n in batches:
                out.append((f"{space.resolution}px {c_in}->{c_out} s{stride} H{h} N{n}",
                            layout, n, h))
    return out


# --- one launch as Triton's JIT would compile it ------------------------------------------

def jit_spec(launch, arch: int) -> tuple:
    """(signature, constexprs, attrs, options) of ``launch`` for sm_<arch>, from Triton's own
    argument binder: what its JIT would compile (alignment and value specialisations too).
    Triton's internals; checked on 3.8, guarded by the test."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.constexprs, num_warps=launch.num_warps)
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return signature, constexprs, attrs, options


def compile_key(launch, arch: int) -> tuple:
    """(kernel name, arch, signature, constexprs by name, attrs, warps), hashable: two
    launches with the same key are the same compile."""
    signature, constexprs, attrs, _ = jit_spec(launch, arch)
    names = launch.kernel.arg_names
    return (launch.kernel.__name__, arch, tuple(signature.items()),
            tuple(sorted((names[p[0]], repr(v)) for p, v in constexprs.items())),
            tuple(sorted((str(p), repr(v)) for p, v in attrs.items())), launch.num_warps)


def _same_compile(launch, arch: int) -> tuple:
    """What decides a launch's compile key, cheaply: meta tensors by dtype, ints by value."""
    args = tuple(str(a.dtype) if isinstance(a, torch.Tensor) else a for a in launch.args)
    return launch.kernel.__name__, arch, args, tuple(sorted(launch.constexprs.items())), \
        launch.num_warps


FLAGS = ("PROLOGUE", "STATS", "HAS_RES", "SKIP_MODE", "SKIP_CONV", "RELU_BN_EPILOGUE")


def config_class(key: tuple) -> tuple:
    """What the launcher chose (kernel, target, dtypes, tiles, warps, kernel size, stride),
    without the fusion flags and the shapes' alignment: the CI compiles one per class."""
    consts = tuple(kv for kv in key[3] if kv[0] not in FLAGS)
    first_pointer = key[2][0]
    return key[0], key[1], first_pointer, consts, key[5]


def flags_on(key: tuple) -> int:
    """How much a compile fuses in (the flags' sum): the class's most demanding member."""
    return sum(int(v == "True") + (int(v) if v.isdigit() else 0)
               for k, v in key[3] if k in FLAGS)


_ITEMS: list = []   # (key, Launch) to compile: set before the worker processes fork


def _compile(i: int) -> dict:
    """Compile ``_ITEMS[i]`` (in a worker process) and read ``ptxas -v``'s report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    key, launch = _ITEMS[i]
    name, arch = key[0], key[1]
    fn = launch.kernel
    signature, constexprs, attrs, options = jit_spec(launch, arch)
    row = dict(kernel=name, arch=arch, warps=launch.num_warps,
               constexprs={k: (v if isinstance(v, (int, bool, str)) else str(v))
                           for k, v in launch.constexprs.items()},
               signature=" ".join(f"{k}:{v}" for k, v in signature.items() if v != "constexpr"))
    log = io.StringIO()
    try:
        triton.knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", arch, 32),
                                      options=options.__dict__)
    except Exception as e:   # a compile error is a result: the test reports it
        row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        return row
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    if not (regs and spills and stack):
        row["error"] = f"no ptxas -v report in the compile log: {text[-500:]!r}"
        return row
    row.update(shared=compiled.metadata.shared, registers=int(regs[1]),
               spill_stores=int(spills[1]), spill_loads=int(spills[2]), stack=int(stack[1]))
    return row


def collect(ci: bool = False) -> tuple:
    """({compile key: (Launch, [where it is launched])}, count of launches) over the FBNet
    cases, every dtype and both targets; with ``ci`` only the member of each configuration
    class that fuses the most."""
    K = kernels()
    if K.INTERPRETED:
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    keys: dict = {}
    memo: dict = {}
    total = 0
    tf32 = torch.backends.cudnn.allow_tf32
    try:
        for where, layout, n, h in fbnet_cases():
            for dname, cdt, allow_tf32 in DTYPES:
                torch.backends.cudnn.allow_tf32 = allow_tf32
                for per_example in (False, True):
                    for launch in block_launches(layout, n, h, cdt, per_example=per_example):
                        for arch in SHARED_LIMIT:
                            total += 1
                            same = _same_compile(launch, arch)
                            if same not in memo:
                                memo[same] = compile_key(launch, arch)
                            key = memo[same]
                            keys.setdefault(key, (launch, []))[1].append(f"{where} {dname}")
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    if ci:
        best: dict = {}
        for key in keys:
            c = config_class(key)
            if c not in best or flags_on(key) > flags_on(best[c]):
                best[c] = key
        keys = {k: keys[k] for k in best.values()}
    return keys, total


def run(ci: bool = False, workers: int = 2) -> dict:
    """Compile the matrix; one row per distinct compile with where the launchers use it."""
    start = time.time()
    keys, total = collect(ci)
    _ITEMS[:] = [(k, v[0]) for k, v in keys.items()]
    with tempfile.TemporaryDirectory() as cache:   # a fresh cache: ptxas runs every time
        os.environ["TRITON_CACHE_DIR"] = cache
        ctx = multiprocessing.get_context("fork")  # the workers inherit _ITEMS
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            rows = []
            for row in pool.map(_compile, range(len(_ITEMS)), chunksize=2):
                rows.append(row)
                if len(rows) % 50 == 0:
                    print(f"{len(rows)}/{len(_ITEMS)} compiled, {time.time() - start:.0f} s",
                          file=sys.stderr, flush=True)
    for row, (_, where) in zip(rows, keys.values()):
        row["used_by"] = where
    return dict(launches=total, compiles=len(rows), seconds=round(time.time() - start, 1),
                rows=rows)


def problems(row: dict) -> list:
    """What is wrong with one compiled configuration, as sentences naming it."""
    what = (f"{row['kernel']} sm_{row['arch']} warps={row['warps']} {row['constexprs']} "
            f"[{row['signature']}] (used by {row['used_by'][0]}, +{len(row['used_by']) - 1})")
    if "error" in row:
        return [f"{what}: does not compile: {row['error']}"]
    out = []
    if row["shared"] > SHARED_LIMIT[row["arch"]]:
        out.append(f"{what}: needs {row['shared']} B of shared memory, over sm_{row['arch']}'s "
                   f"{SHARED_LIMIT[row['arch']]} B")
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"{what}: spills ({row['registers']} registers, {row['spill_stores']} B "
                   f"spill stores, {row['spill_loads']} B spill loads)")
    return out


def table(report: dict) -> str:
    """Per kernel, target and dtype: the worst shared memory, registers and spills."""
    agg: dict = {}
    for r in report["rows"]:
        if "error" in r:
            continue
        dtype = r["signature"].split()[0].split(":")[1].lstrip("*")
        if dtype == "fp32" and "PRECISION" in r["constexprs"]:
            dtype += f" {r['constexprs']['PRECISION']}"
        k = (r["kernel"], r["arch"], dtype)
        a = agg.setdefault(k, dict(n=0, shared=0, rmin=999, rmax=0, spill=0))
        a["n"] += 1
        a["shared"] = max(a["shared"], r["shared"])
        a["rmin"], a["rmax"] = min(a["rmin"], r["registers"]), max(a["rmax"], r["registers"])
        a["spill"] = max(a["spill"], r["spill_stores"])
    lines = ["| kernel | target | dtype | compiles | max shared B | registers | max spill stores B |",
             "|---|---|---|---|---|---|---|"]
    for (kernel, arch, dtype), a in sorted(agg.items()):
        lines.append(f"| {kernel} | sm_{arch} | {dtype} | {a['n']} | {a['shared']} | "
                     f"{a['rmin']}-{a['rmax']} | {a['spill']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ci", action="store_true", help="one compile per configuration class")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    report = run(args.ci, args.workers)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(table(report))
    bad = [p for r in report["rows"] for p in problems(r)]
    print(f"\n{report['launches']} launches, {report['compiles']} distinct compiles, "
          f"{report['seconds']} s; {len(bad)} problems")
    for p in bad:
        print(" -", p)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
