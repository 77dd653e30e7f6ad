"""The shm plane's one-copy path, sender side: find the memfd behind a CPU KV cache
(``engine/kv_memory.py``), and the guard page that tells the receiver whether it may still trust what
it read from that cache.

``find_shared_cache(tensor)`` reads ``/proc/self/maps`` for the mapping that holds the tensor (named
``/memfd:kvferry-kv-cache``), finds the descriptor of that memfd in ``/proc/self/fd`` (Python's
``mmap`` keeps one while mapped) by its inode, and opens it again read-only: the receiver gets a
descriptor it cannot map writable, so no bug or crash on the decode side can write into the prefill
worker's cache. A cache not in such a memfd (CUDA, another platform, a test's ``torch.zeros``) is
None: those transfers go through the slots.

The guard (``Guard``): one page per connection, the sender's, mapped read-only by the receiver. The
sender writes the transfer's sequence number there before it names any block, and 0 the moment the
transfer fails (abort, deadline) — before the prefill worker may free and reuse the blocks. The
receiver checks it after its last copy and before the KV counts as received: a receiver that was
stopped mid-copy while the sender gave up fails instead of committing blocks that changed under it.
(Stores become visible in program order on x86-64; on both ends locks, each a full barrier, lie
between the writes or reads of the blocks and of the guard.)
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np
import torch

from kvferry.engine.kv_memory import KV_CACHE_MEMFD

GUARD_MEMFD = "kvferry-kv-guard"


@dataclass(frozen=True)
class SharedCache:
    """A memfd holding a CPU KV cache; ``fd`` is a read-only descriptor of it (the sender owns it)."""

    fd: int
    size: int  # bytes of the memfd
    map_start: int  # address of the mapping in this process
    map_end: int
    file_offset: int  # of map_start within the memfd

    def offset_of(self, tensor: torch.Tensor) -> int | None:
        """Byte offset of ``tensor``'s first element within the memfd; None when it is not inside."""
        start, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        if not (self.map_start <= start and start + nbytes <= self.map_end):
            return None
        return start - self.map_start + self.file_offset

    def close(self) -> None:
        os.close(self.fd)


def find_shared_cache(tensor: torch.Tensor) -> SharedCache | None:
    if tensor.device.type != "cpu" or not os.path.exists("/proc/self/maps"):
        return None
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or not fields[5].startswith(f"/memfd:{KV_CACHE_MEMFD}"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end and "w" in fields[1] and "s" in fields[1]:
                return _reopen(int(fields[4]), start, end, int(fields[2], 16))
    return None


def _reopen(inode: int, start: int, end: int, file_offset: int) -> SharedCache | None:
    for name in os.listdir("/proc/self/fd"):
        path = f"/proc/self/fd/{name}"
        try:
            if os.stat(path).st_ino != inode or not os.readlink(path).startswith(f"/memfd:{KV_CACHE_MEMFD}"):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # closed meanwhile, or not ours to open
            continue
        return SharedCache(fd, os.fstat(fd).st_size, start, end, file_offset)
    return None


class Guard:
    """The sender's guard page: ``valid`` is the sequence number of the transfer the receiver may trust."""

    def __init__(self):
        fd = os.memfd_create(GUARD_MEMFD, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, mmap.PAGESIZE)
            self._mm = mmap.mmap(fd, mmap.PAGESIZE)
            self.fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)  # what the receiver gets
        finally:
            os.close(fd)
        self._word = np.frombuffer(self._mm, dtype=np.int64, count=1)

    def set(self, value: int) -> None:
        self._word[0] = value

    def close(self) -> None:
        self._word = None
        os.close(self.fd)
        try:
            self._mm.close()
        except BufferError:
            pass


class GuardView:
    """The receiver's read-only mapping of a sender's guard page."""

    def __init__(self, fd: int):
        self._mm = mmap.mmap(fd, mmap.PAGESIZE, access=mmap.ACCESS_READ)
        self._word = np.frombuffer(self._mm, dtype=np.int64, count=1)

    def valid(self) -> int:
        return int(self._word[0])

    def close(self) -> None:
        self._word = None
        try:
            self._mm.close()
        except BufferError:
            pass
