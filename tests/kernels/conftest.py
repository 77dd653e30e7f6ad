"""Kernel tests: Triton kernels against their torch references, on CUDA when present, else in the
Triton interpreter.

Triton reads ``TRITON_INTERPRET`` when it is imported and when ``@triton.jit`` decorates, so it is set
here, before any test module of this folder imports triton. Kernel modules that another test folder
imported earlier (through the dispatcher) did so without triton (``kvferry.kernels._triton`` imports
it only where a kernel can launch); they are reloaded, ``_triton`` first, so that their kernels are
decorated now, as interpreted functions. A reload runs the module again in the same namespace, so
functions imported from it earlier (the dispatcher's) see the new kernels.
"""

import importlib
import os
import sys

import pytest
import torch
from kernel_modules import KERNEL_MODULES


# Triton imported before this file ran, without the interpreter, cannot run kernels on CPU.
_TRITON_IMPORTED_TOO_EARLY = not torch.cuda.is_available() and "triton" in sys.modules
if not torch.cuda.is_available() and not _TRITON_IMPORTED_TOO_EARLY:
    os.environ["TRITON_INTERPRET"] = "1"
    for name in KERNEL_MODULES:
        if name in sys.modules:
            importlib.reload(sys.modules[name])


@pytest.fixture
def device() -> str:
    if _TRITON_IMPORTED_TOO_EARLY and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1; "
                    "run tests/kernels in a session of its own")
    return "cuda" if torch.cuda.is_available() else "cpu"
