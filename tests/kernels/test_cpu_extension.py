"""Extensions are built by an explicit step and only loaded at run time: never compiled, never waiting on a lock."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from kvferry.kernels import build, cpu_extension
from kvferry.kernels.cpu_extension import LazyExtension

TINY = textwrap.dedent("""
    #include <pybind11/pybind11.h>
    #include "tiny.h"
    PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", [] { return ANSWER; }); }
""")


def tiny_extension(folder: pathlib.Path, answer: int = 42) -> LazyExtension:
    (folder / "tiny.cpp").write_text(TINY)
    (folder / "tiny.h").write_text(f"#define ANSWER {answer}\n")
    return LazyExtension("kvferry_test_tiny", [str(folder / "tiny.cpp")], ["-O1"])


def test_load_never_compiles_and_reports_what_to_run(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KVFERRY_KERNEL_DIR", str(tmp_path / "cache"))
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise AssertionError("load() compiled at run time")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    ext = tiny_extension(tmp_path)
    with caplog.at_level("INFO"):
        assert ext.load() is None
    assert "python -m kvferry.kernels.build" in caplog.text
    assert not (tmp_path / "cache").exists()  # nothing was written either


def test_disabled_by_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("KVFERRY_CPU_KERNELS", "0")
    assert tiny_extension(tmp_path).load() is None


def test_build_dir_follows_sources_and_their_headers(tmp_path, monkeypatch):
    monkeypatch.setenv("KVFERRY_KERNEL_DIR", str(tmp_path / "cache"))
    first = tiny_extension(tmp_path, 1).build_dir
    assert tiny_extension(tmp_path, 1).build_dir == first
    assert tiny_extension(tmp_path, 2).build_dir != first  # a header change is a new build
    assert first.parent == tmp_path / "cache"


@pytest.mark.slow
def test_build_then_load_in_a_fresh_process_past_stale_locks(tmp_path):
    """A real build (a tiny pybind11 module), with a stale lock where torch's JIT would look and a
    scratch folder left by a killed build: the build completes and a new process loads the result."""
    cache, torch_cache = tmp_path / "cache", tmp_path / "torch_extensions"
    (torch_cache / "kvferry_test_tiny").mkdir(parents=True)
    (torch_cache / "kvferry_test_tiny" / "lock").write_text("")
    (cache / ".kvferry_test_tiny-killed").mkdir(parents=True)
    (cache / ".kvferry_test_tiny-killed" / "lock").write_text("")
    tiny_extension(tmp_path)  # writes the sources
    script = textwrap.dedent(f"""
        import sys
        from kvferry.kernels.cpu_extension import LazyExtension
        ext = LazyExtension("kvferry_test_tiny", [{str(tmp_path / "tiny.cpp")!r}], ["-O1"], ["-lm"])
        if sys.argv[1] == "build":
            ext.build()
            assert ext.is_built(), "the build must land where load() looks (torch extends flag lists in place)"
        print(ext.load().answer(), ext.library)
    """)
    env = {**os.environ, "KVFERRY_KERNEL_DIR": str(cache), "TORCH_EXTENSIONS_DIR": str(torch_cache)}
    built = subprocess.run([sys.executable, "-c", script, "build"], env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    assert built.stdout.split()[0] == "42"
    loaded = subprocess.run([sys.executable, "-c", script, "load"], env=env, capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.split() == built.stdout.split()
    assert [p.name for p in cache.iterdir()] and not [p for p in cache.glob(".kvferry_test_tiny-*") if p.name != ".kvferry_test_tiny-killed"]


def test_every_extension_this_cpu_runs_is_built():
    """`make setup` builds them: a broken build must fail here, not silently fall back."""
    missing = [ext.name for ext in build.EXTENSIONS if ext.unavailable_reason() is None and not ext.is_built()]
    if cpu_extension.disabled():
        pytest.skip("KVFERRY_CPU_KERNELS=0")
    assert not missing, f"not built: {missing}; run python -m kvferry.kernels.build and read its errors"
