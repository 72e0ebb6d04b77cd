"""The runtime a table's latencies are timed in: eager PyTorch or ONNX Runtime.

Users deploy exported models, and ONNX Runtime (CPU execution provider) orders networks
differently from eager PyTorch (docs/latency.md), so a table can be measured in the
runtime the model ships with. ONNX export uses ``torch.onnx.export(dynamo=True)``: the
``torch.export``-based exporter, the default and the supported one since PyTorch 2.9
(the TorchScript exporter is deprecated for removal); it needs ``onnxscript``.

onnx, onnxruntime and onnxscript are the optional extra ``fbnet_fast[onnx]``: they are
imported inside the functions that need them, and a missing one raises
``MissingExtra`` naming the extra.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from .timing import torch_runner

__all__ = ["RUNTIMES", "ONNX_EXTRA", "MissingExtra", "onnx_modules", "runtime_meta",
           "table_runtime", "check_runtime", "export_onnx", "export_many", "chain",
           "identity_model", "ort_session", "ort_runner", "runners", "run_onnx"]

RUNTIMES = ("torch", "onnxruntime")
ONNX_EXTRA = 'pip install "fbnet_fast[onnx]"'


class MissingExtra(ImportError, ValueError):
    """An optional dependency is not installed. A ValueError too, so the CLI prints it as
    one line."""


def onnx_modules():
    """``(onnx, onnxruntime)``, or ``MissingExtra`` naming the extra to install."""
    try:
        # deferred: onnx, onnxruntime and onnxscript (torch.onnx's exporter) are the
        # optional extra fbnet_fast[onnx]; eager-PyTorch tables never need them
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise MissingExtra(f"ONNX export and ONNX Runtime need {e.name or 'onnx'}, which is "
                           f"not installed: {ONNX_EXTRA}") from None
    return onnx, onnxruntime


def runtime_meta(runtime: str) -> dict:
    """What a table file records of its runtime: name, version and a readable line."""
    if runtime == "torch":
        return {"runtime": f"pytorch {torch.__version__} eager", "runtime_name": "torch",
                "runtime_version": torch.__version__}
    _, ort = onnx_modules()
    return {"runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
            "runtime_name": "onnxruntime", "runtime_version": ort.__version__,
            "exporter": f"torch.onnx dynamo (torch {torch.__version__})"}


def table_runtime(meta: dict) -> str:
    """The runtime a table was measured in; tables older than ``runtime_name`` are torch."""
    name = meta.get("runtime_name")
    if name is None:
        name = "onnxruntime" if str(meta.get("runtime", "")).startswith("onnxruntime") \
            else "torch"
    return name


def check_runtime(runtime: str, device: torch.device, dtype, memory_format: str) -> None:
    """One clear line for a runtime and settings that do not go together."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "onnxruntime":
        if device.type != "cpu":
            raise ValueError("runtime 'onnxruntime' times the CPU execution provider: use "
                             "--device cpu")
        if dtype != torch.float32 or memory_format != "contiguous":
            raise ValueError("runtime 'onnxruntime' runs float32 NCHW models (the ONNX "
                             "layout); leave dtype and memory format at their defaults")
        onnx_modules()


def export_onnx(module: nn.Module, x: torch.Tensor, path=None):
    """The ONNX model (an ``onnx.ModelProto``) of ``module`` in eval mode on input ``x``;
    written to ``path`` when given."""
    model = export_many([module], [x])[0]
    if path is not None:
        onnx, _ = onnx_modules()
        onnx.save(model, str(path))
    return model


def export_many(modules, xs, max_bytes: int = 1 << 29) -> list:
    """ONNX models of several modules, each on its own input, in few exports.

    Each ``torch.onnx.export`` call has a large fixed cost (about a second), so modules
    are exported together, as one graph with input ``x{i}`` and output ``y{i}`` per
    module (up to ``max_bytes`` of weights per graph, far below protobuf's 2 GB), and
    each module's part is cut out with ``onnx.utils.Extractor``.
    """
    onnx, _ = onnx_modules()
    chunks, size = [[]], 0
    for m, x in zip(modules, xs):
        nbytes = sum(p.numel() * p.element_size() for p in m.parameters())
        if chunks[-1] and size + nbytes > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append((m, x))
        size += nbytes
    return [model for chunk in chunks if chunk for model in _export_chunk(onnx, *zip(*chunk))]


class _Many(nn.Module):
    def __init__(self, modules):
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, *xs):
        return tuple(m(x) for m, x in zip(self.parts, xs))


def _export_chunk(onnx, modules, xs) -> list:
    n = len(modules)
    with torch.no_grad():
        program = torch.onnx.export(
            # distinct input tensors: the exporter merges inputs that are one tensor
            _Many([m.eval() for m in modules]).eval(), tuple(x.clone() for x in xs),
            dynamo=True,
            verbose=False, input_names=[f"x{i}" for i in range(n)],
            output_names=[f"y{i}" for i in range(n)])
    model = program.model_proto
    if n == 1:
        return [model]
    ex = onnx.utils.Extractor(model)
    return [ex.extract_model([f"x{i}"], [f"y{i}"]) for i in range(n)]


def chain(models):
    """One ONNX model running ``models`` in sequence, each one's output feeding the next.

    A whole network from its ops' exports (stem, blocks, head) in milliseconds instead of
    a whole-network export's seconds, so fitting a table to dozens of networks fits the
    time budget. Each part's names get their own prefix, so a part used twice holds its
    weights twice, as a network does.
    """
    onnx, _ = onnx_modules()
    nodes, inits, prev = [], [], None
    for i, m in enumerate(models):
        g = onnx.compose.add_prefix(m, f"p{i}_").graph
        src, out = g.input[0].name, g.output[0].name
        if prev is None:
            first = g.input[0]
        else:
            for node in g.node:
                node.input[:] = [prev if n == src else n for n in node.input]
        nodes += g.node
        inits += g.initializer
        prev, last = (prev if out == src and prev is not None else out), g.output[0]
    last = onnx.helper.make_tensor_value_info(prev, last.type.tensor_type.elem_type, None)
    graph = onnx.helper.make_graph(nodes, "chain", [first], [last], inits)
    return onnx.helper.make_model(graph, opset_imports=models[0].opset_import,
                                  ir_version=models[0].ir_version)


def identity_model():
    """The smallest ONNX model (one Identity on a float32 [1]): timed, it is what every
    ``session.run`` costs besides its ops, paid once per network but once per op when
    ops are timed as sessions of their own."""
    onnx, _ = onnx_modules()
    h = onnx.helper
    io = [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in "xy"]
    graph = h.make_graph([h.make_node("Identity", ["x"], ["y"])], "identity", io[:1], io[1:])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def ort_session(model, threads: int):
    """An ONNX Runtime session of ``model`` (a ModelProto, its bytes or a file) as
    benchmark tools make one: CPU execution provider, every graph optimisation,
    ``threads`` intra-op threads, sequential execution, denormals flushed (random weights
    produce them; trained ones do not, and torch flushes too)."""
    _, ort = onnx_modules()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        model = os.fspath(model)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def ort_runner(session, x):
    """One inference of ``session`` on ``x`` as a callable for ``timing.benchmark``."""
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(x.detach().cpu().numpy())}
    return lambda: session.run(None, feed)


def run_onnx(model, x: torch.Tensor, threads: int = 1) -> torch.Tensor:
    """The first output of an ONNX model (as ``ort_session`` takes it) run once in ONNX
    Runtime on ``x``."""
    return torch.from_numpy(ort_runner(ort_session(model, threads), x)()[0])


def runners(modules, xs, runtime: str, device: torch.device, threads: int,
            onnx_models=None) -> list:
    """One callable per module running it on its input in ``runtime`` (modules already in
    eval mode on ``device``; torch callables must run under ``torch.inference_mode``).
    ONNX Runtime runs ``onnx_models`` when given, else the modules' exports."""
    if runtime == "torch":
        return [torch_runner(m, x, device) for m, x in zip(modules, xs)]
    models = onnx_models if onnx_models is not None else export_many(modules, xs)
    return [ort_runner(ort_session(m, threads), x) for m, x in zip(models, xs)]
