"""Facts about this host that the KV handshake compares: the boot id (shared memory needs the same one)."""

from __future__ import annotations

import functools

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


@functools.cache
def boot_id() -> str:
    """This kernel's boot id: equal for two processes exactly when they run on the same host (and
    boot); empty where the file does not exist (not Linux), which never matches a peer's."""
    try:
        with open(BOOT_ID_PATH) as f:
            return f.read().strip()
    except OSError:
        return ""
