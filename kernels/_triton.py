"""Triton, where it can run: the kernel files import ``triton``/``tl`` from here.

Triton is imported only when a kernel could launch in this process: a CUDA device is present, or
the Triton interpreter was asked for (``TRITON_INTERPRET=1``, which Triton reads when it is imported
and when ``@triton.jit`` decorates, so it must be set before this module is imported). Elsewhere,
on the CPU machines, triton is not imported at all, so the torch references (the CPU path) load
fast and without it, and a later opt-in to the interpreter (the kernel tests) is not spoiled by an
earlier import. ``triton.jit`` is then a stand-in that raises if launched; the kernel files use
``from __future__ import annotations`` so their ``tl.constexpr`` annotations are never evaluated.
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import torch


def _wanted() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


if _wanted():
    import triton
    import triton.language as tl

    HAS_TRITON = True
else:
    HAS_TRITON = False

    class _Unavailable:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise RuntimeError(
                f"Triton kernel {self.fn.__name__} cannot launch here: it needs triton "
                "(pip install 'kvferry[triton]') and a CUDA device, or TRITON_INTERPRET=1 set before import"
            )

    def _jit(fn=None, **_kwargs):
        return _Unavailable(fn) if fn is not None else _Unavailable

    triton = SimpleNamespace(jit=_jit)
    tl = None

__all__ = ["HAS_TRITON", "triton", "tl"]
