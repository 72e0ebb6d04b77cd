"""``fbnet-fast export ARCH --onnx OUT.onnx [--checkpoint CKPT]``: one architecture, with
the weights of a ``fbnet-fast train`` run when given, as a file a deployment runtime reads.
``fbnet-fast export ARCH --timm [--checkpoint CKPT --out FILE.pth]``: the architecture as a
timm EfficientNet (``nn/timm_format.py``), to train or fine-tune with timm's scripts.

Every format is checked after writing: the exported model runs on one input and must
match PyTorch. ONNX is the first format (``latency/runtimes.py``: the exporter, ONNX
Runtime); another format is one more flag in the "formats" group of ``register`` and
one more branch of ``run``.
"""
from __future__ import annotations

import os

import torch

from ..latency.runtimes import export_onnx, run_onnx
from ..nn.architecture import resolve_arch
from ..nn.models import FBNet, create_model
from ..nn.timm_format import create_timm_model, timm_source, timm_state_dict
from ..search.rundir import RunDir
from . import one_line_errors


def register(sub) -> None:
    p = sub.add_parser("export", help="write an architecture (and trained weights) as ONNX "
                                      "or for timm")
    p.add_argument("arch", help="zoo name, architecture JSON (e.g. RUN_DIR/arch.json) or "
                                "short string")
    fmts = p.add_argument_group("formats (at least one)")
    fmts.add_argument("--onnx", metavar="OUT.onnx", default=None,
                      help="ONNX file (torch.onnx, checked in ONNX Runtime; needs pip "
                           "install \"fbnet_fast[onnx]\")")
    fmts.add_argument("--timm", action="store_true",
                      help="print a Python file that registers the architecture with timm "
                           "(its EfficientNet block strings and settings); with --checkpoint "
                           "also write the weights under timm's names to --out")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint.pt of a `fbnet-fast train` run, or the run directory; "
                        "default: random weights")
    p.add_argument("--out", metavar="FILE.pth", default=None,
                   help="with --timm --checkpoint: where to write the timm state dict")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier size without a checkpoint (default 1000)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the exported input")
    p.add_argument("--rtol", type=float, default=1e-3,
                   help="largest |exported - PyTorch| accepted on the check input, relative "
                        "to PyTorch's largest output (default 1e-3)")
    one_line_errors(p, "export")
    p.set_defaults(func=run)


def load_model(arch, checkpoint: str | None = None, num_classes: int | None = None) -> FBNet:
    """The model of ``arch`` in eval mode, with a training checkpoint's weights if given.

    A checkpoint is a pickle (it holds the RNG states for exact resume): load only your
    own runs'. Its classifier sets the number of classes.
    """
    arch = resolve_arch(arch)
    if checkpoint is None:
        return create_model(arch, num_classes or 1000).eval()
    path = RunDir(checkpoint).checkpoint if os.path.isdir(checkpoint) else checkpoint
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)
    weights = state.get("model") if isinstance(state, dict) else None
    if not isinstance(weights, dict) or "classifier.weight" not in weights:
        raise ValueError(f"{path!r} is not a checkpoint of `fbnet-fast train` (no model "
                         "weights with a classifier)")
    classes = weights["classifier.weight"].shape[0]
    if num_classes is not None and num_classes != classes:
        raise ValueError(f"--num-classes {num_classes} but the checkpoint's classifier has "
                         f"{classes} classes")
    model = create_model(arch, classes)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise ValueError(f"the checkpoint {path!r} does not fit architecture "
                         f"{arch.name or arch.to_string()}: {first}") from None
    return model.eval()


def run(args) -> int:
    if not (args.onnx or args.timm):
        raise ValueError("give an output format: --onnx OUT.onnx or --timm")
    if args.out and not (args.timm and args.checkpoint):
        raise ValueError("--out is where --timm writes a checkpoint's weights: give --timm "
                         "and --checkpoint with it")
    if args.timm and args.checkpoint and not args.out:
        raise ValueError("--timm with --checkpoint writes timm weights: give --out FILE.pth")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    model = load_model(args.arch, args.checkpoint, args.num_classes)
    classes = model.classifier.out_features
    # what timm cannot build is an error before any file is written
    source = timm_source(model.arch, classes, args.out) if args.timm else None
    res = model.arch.space.resolution
    x = torch.randn(args.batch, 3, res, res, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
    if args.onnx:
        export_onnx(model, x, args.onnx)
        err = float((run_onnx(args.onnx, x) - want).abs().max() / want.abs().max())
        if not err <= args.rtol:
            raise ValueError(f"{args.onnx}: ONNX Runtime differs from PyTorch by {err:.1e} of "
                             f"the largest output (> --rtol {args.rtol}); the file is not "
                             "faithful")
        print(f"wrote {args.onnx}: {model.arch.name or 'architecture'} {res}x{res}, "
              f"{classes} classes; ONNX Runtime matches PyTorch (max |diff| {err:.1e} "
              "of the largest output)")
    if args.timm and args.checkpoint:
        weights = timm_state_dict(model)
        timm_model = create_timm_model(model.arch, classes).eval()
        timm_model.load_state_dict(weights)
        with torch.no_grad():
            err = float((timm_model(x) - want).abs().max() / want.abs().max())
        if not err <= args.rtol:
            raise ValueError(f"timm's model differs from fbnet_fast's by {err:.1e} of the "
                             f"largest output (> --rtol {args.rtol}); not writing {args.out}")
        torch.save(weights, args.out)
        print(f"# wrote {args.out}: timm's model with these weights matches fbnet_fast's "
              f"(max |diff| {err:.1e} of the largest output)")
    if args.timm:
        print(source, end="")
    return 0
