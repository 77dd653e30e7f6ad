"""Imports point one way (docs/ARCHITECTURE.md, "Layers"): a module may import its own layer and the
layers below it, never one above, and never a sibling package of its own layer; inside the edge (the
last layer, where anything below goes) modules never import each other in a circle. Read from the
source with ast, so an import inside a function counts as much as one at the top."""

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


# Cycles allowed inside the edge, each with its reason. Split them rather than add one.
EDGE_CYCLES_ALLOWED: set[frozenset[str]] = set()


def known_modules() -> set[str]:
    return {module_name(p).removesuffix(".__init__") for p in source_files()}


def module_of(target: str, modules: set[str]) -> str | None:
    """The module an import names (``kvferry.x.y`` where y is a class: ``kvferry.x``)."""
    parts = target.split(".")
    return next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in modules), None)


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The sets of modules that import each other, directly or through others (each set a cycle's members)."""

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reachable = {m: reach(m) for m in graph}
    return {frozenset({m} | {o for o in reachable[m] if m in reachable[o]}) for m in graph if m in reachable[m]}


def edge_graph() -> dict[str, set[str]]:
    """Imports between the modules of the edge (the last layer), as a graph of module names."""
    modules, edge = known_modules(), len(LAYERS) - 1
    graph: dict[str, set[str]] = {}
    for p in source_files():
        name = module_name(p).removesuffix(".__init__")
        if place(name)[0] != edge:
            continue
        targets = {module_of(t, modules) for _, t in imported_modules(ast.parse(p.read_text()))}
        graph[name] = {t for t in targets if t and t != name and place(t)[0] == edge}
    return graph


def test_the_edge_imports_one_way():
    """The edge may import anything below it, but its own modules (the command line, `kvferry serve`,
    Ray) must not import each other in a circle: what two of them share goes down a layer."""
    found = cycles(edge_graph()) - EDGE_CYCLES_ALLOWED
    assert not found, "import cycles in the edge:\n" + "\n".join(" <-> ".join(sorted(c)) for c in found)


def test_the_cycle_check_sees_a_circle_through_a_third_module():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == {frozenset("abc")}
    assert not cycles({"a": {"b"}, "b": {"c"}, "c": set()})
    # The shape this test was written for: launch_serve starts Ray's serve, which took Child from it.
    assert cycles({"kvferry.router.launch_serve": {"kvferry.deploy.ray_serve"},
                   "kvferry.deploy.ray_serve": {"kvferry.router.launch_serve"}})


def test_the_vocabulary_needs_neither_torch_nor_grpc():
    for p in sorted((ROOT / "common").rglob("*.py")):
        roots = {a.name.split(".")[0] for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Import)
                 for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(ast.parse(p.read_text()))
                  if isinstance(n, ast.ImportFrom) and n.module}
        assert not roots & {"torch", "numpy", "grpc", "google"}, p
