"""Imports point one way (docs/ARCHITECTURE.md, "Layers"): a module may import its own layer and the
layers below it, never one above, and never a sibling package of its own layer. Read from the source
with ast, so an import inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Lowest first. Names are modules under the kvferry namespace; a module belongs to the longest name
# that prefixes it. The last layer is the edge (command line, `kvferry serve`, Ray): anything goes there.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("kvferry.__init__", "kvferry.common"),  # the version, and the torch-free vocabulary
    ("kvferry.kernels", "kvferry.proto"),
    ("kvferry.engine",),
    ("kvferry.transport",),
    ("kvferry.worker_common",),
    ("kvferry.prefill_worker", "kvferry.decode_worker"),
    ("kvferry.router",),
    ("kvferry", "kvferry.router.launch_serve", "kvferry.deploy"),
)
FOLDERS = ("common", "kernels", "proto", "engine", "transport", "worker_common", "prefill_worker",
           "decode_worker", "router", "kvferry", "deploy")


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] != "kvferry":
        parts.insert(0, "kvferry")
    return ".".join(parts)


def place(module: str) -> tuple[int, str]:
    """(layer index, the name it matched) of a kvferry module."""
    if module == "kvferry":
        module = "kvferry.__init__"
    best = max((name for layer in LAYERS for name in layer if module == name or module.startswith(name + ".")),
               key=len)
    return next(i for i, layer in enumerate(LAYERS) if best in layer), best


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every kvferry import; ``from kvferry.x import y`` is kvferry.x.y where y is a module."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "kvferry"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "kvferry":
                out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def violations(source: str, module: str) -> list[str]:
    layer, name = place(module)
    if layer == len(LAYERS) - 1:
        return []
    out = []
    for line, target in imported_modules(ast.parse(source)):
        their_layer, their_name = place(target)
        if their_layer > layer:
            out.append(f"{module}:{line} imports {target} (layer {their_layer}, above its own {layer})")
        elif their_layer == layer and their_name != name:
            out.append(f"{module}:{line} imports {target}, a sibling of its layer")
    return out


def source_files() -> list[pathlib.Path]:
    return [p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))]


def test_no_module_imports_a_higher_layer():
    found = [v for p in source_files() for v in violations(p.read_text(), module_name(p))]
    assert not found, "imports against the layering:\n" + "\n".join(found)


def test_the_check_sees_upward_and_sideways_imports():
    assert violations("from kvferry.router.registry import Worker\n", "kvferry.engine.engine")
    assert violations("def f():\n    from kvferry.worker_common import process\n", "kvferry.transport.base")
    assert violations("import kvferry.decode_worker.worker\n", "kvferry.prefill_worker.worker")
    assert violations("from kvferry.kernels import dispatch\n", "kvferry.proto.convert")
    assert violations("from kvferry import status_cli\n", "kvferry.router.dispatch")
    assert not violations("from kvferry.common.worker import NoRoom\nimport kvferry\n", "kvferry.worker_common.registration")
    assert not violations("from kvferry.deploy import ray_args\n", "kvferry.router.launch_serve")


def test_the_vocabulary_needs_neither_torch_nor_grpc():
    for p in sorted((ROOT / "common").rglob("*.py")):
        roots = {a.name.split(".")[0] for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Import)
                 for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(ast.parse(p.read_text()))
                  if isinstance(n, ast.ImportFrom) and n.module}
        assert not roots & {"torch", "numpy", "grpc", "google"}, p
