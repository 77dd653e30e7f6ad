"""Build-once, load-lazily C++ extensions (``csrc/``) with ``torch.utils.cpp_extension``.

Each extension compiles on first use with g++ and ninja (cached in torch's extension folder, so later
processes load it in milliseconds; ``make setup`` builds them ahead of the first worker). Where one
cannot run — ``KVFERRY_CPU_KERNELS=0``, a CPU it was not written for, no compiler, a build error —
``load()`` returns None and logs why once; every caller has a torch path to fall back on.
"""

from __future__ import annotations

import logging
import os
import pathlib
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

CSRC = pathlib.Path(__file__).parent / "csrc"


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
        self.sources = [str(CSRC / s) for s in sources]
        self.cflags = cflags
        self.ldflags = ldflags or []
        self.unavailable_reason = unavailable_reason
        self.fallback = fallback
        self._lock = threading.Lock()
        self._module = None
        self._settled = False

    def load(self):
        """The compiled module, or None where it cannot run."""
        if self._settled:  # hot paths ask often: no lock once settled
            return self._module
        with self._lock:
            if self._settled:
                return self._module
            reason = "KVFERRY_CPU_KERNELS=0" if os.environ.get("KVFERRY_CPU_KERNELS", "1") == "0" else None
            reason = reason or self.unavailable_reason()
            if reason:
                logger.info("%s off (%s): %s run instead", self.name, reason, self.fallback)
            else:
                try:
                    from torch.utils.cpp_extension import load as load_extension

                    self._module = load_extension(
                        name=self.name,
                        sources=self.sources,
                        extra_cflags=self.cflags,
                        extra_ldflags=self.ldflags,
                        verbose=False,
                    )
                except Exception as e:  # no compiler or ninja, or a build error: the torch paths still work
                    logger.warning("%s unavailable (%s: %s): %s run instead", self.name, type(e).__name__, e,
                                   self.fallback)
            self._settled = True  # only now: the lock-free check above must not see "settled" before the module
            return self._module
