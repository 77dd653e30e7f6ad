"""No function in the serving path is longer than a screen: 60 lines from ``def`` to its last line
(decorators not counted, nested functions counted in their parent and on their own)."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = ("router", "transport", "prefill_worker", "decode_worker", "worker_common")
MAX_LINES = 60
# Exceptions, "path:function", each with its reason: none today. Split a long function rather than add one.
ALLOWED: set[str] = set()


def long_functions(source: str, path: str) -> list[str]:
    return [
        f"{path}:{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_LINES and f"{path}:{node.name}" not in ALLOWED
    ]


def test_no_function_is_longer_than_a_screen():
    found = []
    for folder in FOLDERS:
        for p in sorted((ROOT / folder).rglob("*.py")):
            if not p.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                found += long_functions(p.read_text(), str(p.relative_to(ROOT)))
    assert not found, "split these:\n" + "\n".join(found)


def test_the_count_starts_at_def_and_ends_at_the_last_line():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES - 1))
    assert not long_functions("@decorator\n@another\ndef f():\n" + body, "m.py")  # exactly MAX_LINES
    assert long_functions("def f():\n" + body + "    return x0\n", "m.py") == [f"m.py:f ({MAX_LINES + 1} lines, line 1)"]
