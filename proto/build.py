"""Generate the Python stubs for every ``*.proto`` in this folder, reproducibly.

    python proto/build.py           # (re)write proto/*_pb2.py, *_pb2.pyi, *_pb2_grpc.py
    python proto/build.py --check   # exit 1 and name the stale files; writes nothing

protoc emits top-level imports (``import worker_pb2 as worker__pb2``); they are rewritten to
``from kvferry.proto import worker_pb2 as worker__pb2`` so the stubs work installed under the
``kvferry`` namespace. Stubs are committed; ``tests/proto/test_stubs_fresh.py`` runs ``--check``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

PROTO_DIR = os.path.dirname(os.path.abspath(__file__))
PACKAGE = "kvferry.proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(proto_dir: str = PROTO_DIR) -> list[str]:
    return sorted(f for f in os.listdir(proto_dir) if f.endswith(".proto"))


def _rewrite_imports(text: str, module_names: set[str]) -> str:
    def repl(match: re.Match) -> str:
        module = match.group(2)
        if module not in module_names:
            return match.group(0)
        return f"{match.group(1)}from {PACKAGE} import {module}{match.group(3)}"

    # `import foo_pb2 as foo__pb2` and `import foo_pb2` (the .pyi form) at line start.
    return re.sub(r"^(\s*)import (\w+_pb2)((?: as \w+)?)$", repl, text, flags=re.MULTILINE)


def generate(out_dir: str, proto_dir: str = PROTO_DIR) -> list[str]:
    """Compile every .proto in ``proto_dir`` into ``out_dir``; returns the generated file names."""
    import grpc_tools
    from grpc_tools import protoc

    protos = proto_files(proto_dir)
    if not protos:
        return []
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    # protoc resolves relative proto names against the -I paths; run from the proto dir so the
    # generated descriptors carry bare file names ("worker.proto"), whatever the caller's cwd.
    cwd = os.getcwd()
    os.chdir(proto_dir)
    try:
        rc = protoc.main(args)
    finally:
        os.chdir(cwd)
    if rc != 0:
        raise RuntimeError(f"protoc failed (exit {rc}) on {', '.join(protos)}")
    stems = [p[: -len(".proto")] for p in protos]
    module_names = {f"{s}_pb2" for s in stems}
    generated = []
    for stem in stems:
        for suffix in GENERATED_SUFFIXES:
            name = stem + suffix
            path = os.path.join(out_dir, name)
            with open(path) as f:
                text = f.read()
            with open(path, "w") as f:
                f.write(_rewrite_imports(text, module_names))
            generated.append(name)
    return generated


def _tools_version() -> str:
    from importlib.metadata import version

    return version("grpcio-tools")


def _committed_tools_version(proto_dir: str) -> str | None:
    for name in sorted(os.listdir(proto_dir)):
        if name.endswith("_pb2_grpc.py"):
            with open(os.path.join(proto_dir, name)) as f:
                found = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'", f.read(), re.MULTILINE)
            if found:
                return found.group(1)
    return None


def _comparable(text: str, name: str, same_tools: bool) -> str:
    """The whole file when built by the same grpcio-tools; otherwise (another protoc writes other
    boilerplate) only what the .proto decides: the serialized descriptor of a ``_pb2.py``."""
    if same_tools:
        return text
    if name.endswith("_pb2.py"):
        found = re.search(r"AddSerializedFile\((b'.*?')\)", text, re.DOTALL)
        return found.group(1) if found else text
    return ""


def stale_files(proto_dir: str = PROTO_DIR) -> list[str]:
    """Generated files that differ from (or are missing beside) a fresh build, plus orphans."""
    same_tools = _committed_tools_version(proto_dir) in (None, _tools_version())
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(tmp, proto_dir)
        stale = []
        for name in fresh:
            committed = os.path.join(proto_dir, name)
            if not os.path.exists(committed):
                stale.append(f"{name} (missing)")
                continue
            with open(committed) as a, open(os.path.join(tmp, name)) as b:
                if _comparable(a.read(), name, same_tools) != _comparable(b.read(), name, same_tools):
                    stale.append(f"{name} (differs)")
    stems = {p[: -len(".proto")] for p in proto_files(proto_dir)}
    for name in sorted(os.listdir(proto_dir)):
        for suffix in GENERATED_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] not in stems:
                stale.append(f"{name} (no .proto)")
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale stubs, write nothing")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale proto stubs (run `python proto/build.py`): " + ", ".join(stale))
            return 1
        print(f"proto stubs up to date ({len(proto_files())} .proto files)")
        return 0
    generated = generate(PROTO_DIR)
    print(f"generated {len(generated)} files from {len(proto_files())} .proto files into {PROTO_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
