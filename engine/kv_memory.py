"""Where a CPU KV cache's memory comes from: one memfd per cache on Linux, so that a decode worker on
the same host can map it read-only and copy a request's blocks straight out of it (the shm data
plane's one-copy path, transport/shm_cache.py).

A memfd costs what ``torch.zeros`` does: its pages are zero until first written, like anonymous
memory, and are 4 KiB pages like the (not madvised) anonymous memory torch allocates. Each layer
starts on a page boundary. The mapping is ``mmap``'d in Python and wrapped with ``torch.frombuffer``;
Python's ``mmap`` keeps its own duplicate of the descriptor, so the memfd lives exactly as long as the
tensors do, and the sender finds it again from a layer's address (``/proc/self/maps``) when it is
first asked to share it. No name in /dev/shm, nothing left behind under kill -9.
"""

from __future__ import annotations

import mmap
import os
import sys

import torch

KV_CACHE_MEMFD = "kvferry-kv-cache"  # shown in /proc/<pid>/maps as /memfd:kvferry-kv-cache (deleted)


def memfd_supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "memfd_create")


def shared_zeros(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[torch.Tensor]:
    """One zeroed tensor per shape, all in one memfd mapping, each page-aligned."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    sizes = [-(-int(torch.Size(s).numel()) * itemsize // mmap.PAGESIZE) * mmap.PAGESIZE for s in shapes]
    total = max(sum(sizes), mmap.PAGESIZE)
    fd = os.memfd_create(KV_CACHE_MEMFD, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, total)
        mm = mmap.mmap(fd, total)  # MAP_SHARED, read-write; keeps a duplicate of fd while mapped
    finally:
        os.close(fd)
    flat = torch.frombuffer(mm, dtype=torch.uint8)  # holds the mapping alive
    out, offset = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        nbytes = int(torch.Size(shape).numel()) * itemsize
        out.append(flat[offset : offset + nbytes].view(dtype).view(shape))
        offset += size
    return out
