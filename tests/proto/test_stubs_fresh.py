"""The committed gRPC stubs match the .proto files (run `python proto/build.py` when this fails)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _build_module():
    spec = importlib.util.spec_from_file_location("kvferry_proto_build", os.path.join(ROOT, "proto", "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_fresh():
    build = _build_module()
    assert build.proto_files(), "no .proto files found"
    stale = build.stale_files()
    assert not stale, "stale proto stubs, run `python proto/build.py`: " + ", ".join(stale)


def test_stubs_import_under_kvferry_namespace():
    build = _build_module()
    for proto in build.proto_files():
        stem = proto[: -len(".proto")]
        importlib.import_module(f"kvferry.proto.{stem}_pb2")
        importlib.import_module(f"kvferry.proto.{stem}_pb2_grpc")
