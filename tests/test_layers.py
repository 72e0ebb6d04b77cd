"""The package's layers (docs/architecture.md), read from the source with ``ast``: no import
circles, no module importing a higher layer, no private names taken from another module,
and imports inside functions only where they defer a heavy optional dependency."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fbnet_fast

PACKAGE = Path(fbnet_fast.__file__).resolve().parent

# Lowest first. A module may import its own layer and the layers below it. The package
# __init__ files are facades that re-export names; they are left out of the rank rule.
LAYERS = [
    ("nn.space",),
    ("nn.architecture", "nn.layout", "nn.blocks", "nn.models", "nn.timm_format"),
    ("backends",),
    ("nn.mixed_block", "nn.supernet"),
    ("latency",),
    ("search",),
    ("cli", "testing"),
]
# Imports allowed inside a function: heavy or optional dependencies, deferred on purpose.
DEFERRED = ("triton", "matplotlib", "torchvision", "torch.utils.cpp_extension", "onnx", "onnxruntime", "onnxscript", "timm")


def modules() -> dict:
    """Dotted name (without the 'fbnet_fast.' prefix) -> (path, is_package)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = rel.parts
        if parts[0] in ("kernels", "csrc") or parts[-1] == "__main__":
            continue   # the Triton kernels and C++ sources are loaded, not imported
        is_pkg = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_pkg else parts)
        out[name] = (path, is_pkg)
    return out


MODULES = modules()


def rank(name: str) -> int:
    """The layer of a module; a package facade (``nn/__init__``) ranks with its highest
    member, the top ``fbnet_fast/__init__`` above everything."""
    if name == "":
        return len(LAYERS)
    for i, layer in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in layer):
            return i
    members = [rank(m) for m in MODULES if m.startswith(name + ".")]
    if members:
        return max(members)
    raise AssertionError(f"module fbnet_fast.{name} is in no layer of tests/test_layers.py "
                         "and docs/architecture.md: add it to one")


def resolve(name: str, is_pkg: bool, node: ast.ImportFrom) -> str | None:
    """The package-relative module an ``import from`` names, or None outside fbnet_fast."""
    if node.level == 0:
        if not (node.module or "").startswith("fbnet_fast"):
            return None
        return (node.module or "")[len("fbnet_fast."):]
    base = name.split(".") if name else []
    if not is_pkg:
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join(base + ([node.module] if node.module else []))


def edges(name: str, path: Path, is_pkg: bool):
    """(target module, imported names, line, inside a function) for every fbnet_fast import."""
    tree = ast.parse(path.read_text(), str(path))
    in_func = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_func.update(id(n) for n in ast.walk(fn) if n is not fn)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = resolve(name, is_pkg, node)
            if mod is None:
                yield (None, [f"{node.module}.{a.name}" for a in node.names], node.lineno,
                       id(node) in in_func)
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}" if mod else a.name
                target = sub if sub in MODULES else mod
                yield target, [a.name], node.lineno, id(node) in in_func
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("fbnet_fast"):
                    yield a.name[len("fbnet_fast."):], [], node.lineno, id(node) in in_func
                else:
                    yield None, [a.name], node.lineno, id(node) in in_func


def graph() -> dict:
    g = {}
    for name, (path, is_pkg) in MODULES.items():
        g[name] = [(t, names, line, fn) for t, names, line, fn in edges(name, path, is_pkg)]
    return g


GRAPH = graph()


def test_every_module_has_a_layer():
    for name, (_, is_pkg) in MODULES.items():
        if name and not is_pkg:
            rank(name)


def test_no_import_circles():
    code_edges = {n: sorted({t for t, *_ in es if t is not None and t in MODULES
                             and not MODULES[t][1]})
                  for n, es in GRAPH.items() if not MODULES[n][1]}
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in code_edges.get(n, ()):
            if state.get(m) == "open":
                cycle = stack[stack.index(m):] + [m]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(code_edges):
        if n not in state:
            visit(n)


def test_no_module_imports_a_higher_layer():
    bad = []
    for name, es in GRAPH.items():
        if MODULES[name][1] or not name:
            continue
        for target, _, line, _ in es:
            if target is not None and rank(target) > rank(name):
                bad.append(f"fbnet_fast.{name}:{line} imports fbnet_fast.{target}")
    assert not bad, "imports of a higher layer:\n" + "\n".join(bad)


def test_no_private_names_across_modules():
    bad = [f"fbnet_fast.{name}:{line} imports {n} from fbnet_fast.{target}"
           for name, es in GRAPH.items() for target, names, line, _ in es
           if target is not None and target != name
           for n in names if n.startswith("_")]
    assert not bad, "\n".join(bad)


def test_imports_inside_functions_only_defer_heavy_dependencies():
    bad = [f"fbnet_fast.{name}:{line} imports {names[0] or target} inside a function"
           for name, es in GRAPH.items() for target, names, line, fn in es
           if fn and not (target is None and names[0] and names[0].startswith(DEFERRED))]
    assert not bad, "\n".join(bad)


def test_the_layer_rules_catch_a_violation(tmp_path):
    """The checks above are only worth something if they can fail: feed them a module of
    the lowest layer that imports the search loop and takes a private name."""
    src = "from ..search.loop import _accumulate\n"
    node = ast.parse(src).body[0]
    target = resolve("nn.space", False, node)
    assert target == "search.loop"
    assert rank(target) > rank("nn.space")
    assert node.names[0].name.startswith("_")
