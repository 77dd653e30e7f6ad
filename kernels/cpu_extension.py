"""C++ extensions (``csrc/``): built once by an explicit step, loaded in milliseconds, never compiled at run time.

``python -m kvferry.kernels.build`` (which ``make setup`` runs; ``kernels/build.py``) compiles every extension
this CPU can run with ``torch.utils.cpp_extension`` and g++/ninja. Each lands in its own folder of the kernel
cache, named by a hash of its sources, flags, torch and Python versions, so checkouts with different sources
never overwrite each other's build and checkouts with the same sources share one. A build runs in a fresh
temporary folder and its ``.so`` is moved into place with one atomic rename: a build killed half-way leaves
nothing that a later build or load waits on (torch's own JIT cache kept a lock file that did exactly that).

``load()`` only imports a built ``.so``. Where there is none — not built, no compiler, a build error,
``KVFERRY_CPU_KERNELS=0``, a CPU it was not written for — it returns None and logs why once; every caller
has a torch path to fall back on.

The cache is ``$KVFERRY_KERNEL_DIR``, else ``$XDG_CACHE_HOME/kvferry/kernels`` (``~/.cache/kvferry/kernels``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import pathlib
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

CSRC = pathlib.Path(__file__).parent / "csrc"


def cache_root() -> pathlib.Path:
    if os.environ.get("KVFERRY_KERNEL_DIR"):
        return pathlib.Path(os.environ["KVFERRY_KERNEL_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "kvferry" / "kernels"


def disabled() -> bool:
    return os.environ.get("KVFERRY_CPU_KERNELS", "1") == "0"


_INCLUDE = re.compile(rb'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def _with_local_includes(sources: list[pathlib.Path]) -> set[pathlib.Path]:
    """The sources and every ``#include "..."`` they reach under csrc/ (what a change of must rebuild)."""
    seen: set[pathlib.Path] = set()
    todo = list(sources)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _INCLUDE.findall(path.read_bytes()):
            header = path.parent / name.decode()
            if header.is_file():
                todo.append(header)
    return seen


class LazyExtension:
    def __init__(
        self,
        name: str,
        sources: list[str],  # file names under csrc/
        cflags: list[str],
        ldflags: list[str] | None = None,
        unavailable_reason: Callable[[], str | None] = lambda: None,  # why this machine cannot run it
        fallback: str = "the torch paths",  # what runs instead, for the log line
    ):
        self.name = name
        self.sources = [CSRC / s for s in sources]
        self.cflags = cflags
        self.ldflags = ldflags or []
        self.unavailable_reason = unavailable_reason
        self.fallback = fallback
        self._lock = threading.Lock()
        self._module = None
        self._settled = False

    @property
    def build_dir(self) -> pathlib.Path:
        """Where this version of the extension lives: the hash covers everything that changes the binary."""
        import torch

        digest = hashlib.sha256()
        for path in sorted(_with_local_includes(self.sources)):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        digest.update(repr((self.cflags, self.ldflags, torch.__version__, sys.version_info[:2])).encode())
        return cache_root() / f"{self.name}-{digest.hexdigest()[:16]}"

    @property
    def library(self) -> pathlib.Path:
        return self.build_dir / f"{self.name}.so"

    def is_built(self) -> bool:
        return self.library.is_file()

    def build(self) -> pathlib.Path:
        """Compile into a fresh temporary folder, then move the ``.so`` into place atomically."""
        from torch.utils.cpp_extension import load as compile_and_load

        final = self.library
        final.parent.mkdir(parents=True, exist_ok=True)
        scratch = pathlib.Path(tempfile.mkdtemp(prefix=f".{self.name}-", dir=final.parent.parent))
        try:
            compile_and_load(
                name=self.name,
                sources=[str(s) for s in self.sources],
                extra_cflags=list(self.cflags),  # copies: torch appends to these lists in place, and the
                extra_ldflags=list(self.ldflags),  # build folder's hash covers them
                build_directory=str(scratch),
                verbose=False,
            )
            os.replace(scratch / f"{self.name}.so", final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return final

    def load(self):
        """The built module, or None where it is not built or cannot run (the reason is logged once)."""
        if self._settled:  # hot paths ask often: no lock once settled
            return self._module
        with self._lock:
            if not self._settled:
                self._module = self._import()
                self._settled = True  # only now: the lock-free check must not see "settled" before the module
            return self._module

    def _import(self):
        reason = "KVFERRY_CPU_KERNELS=0" if disabled() else self.unavailable_reason()
        try:
            if reason is None and not self.is_built():
                reason = f"not built: `python -m kvferry.kernels.build` (make setup runs it) builds {self.library}"
        except OSError as e:  # a source file missing from this install
            reason = f"sources unreadable ({e})"
        if reason is not None:
            logger.info("%s off (%s): %s run instead", self.name, reason, self.fallback)
            return None
        try:
            spec = importlib.util.spec_from_file_location(self.name, self.library)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        except Exception as e:  # a .so that does not load here (other torch ABI): the torch paths still work
            logger.warning("%s unavailable (%s: %s): %s run instead", self.name, type(e).__name__, e, self.fallback)
            return None
