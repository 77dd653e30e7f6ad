"""A digest of a checkpoint's weights, so that a compatibility fingerprint tells apart two models of the
same architecture and config (a fine-tune, another quantization, a corrupt copy).

The digest is SHA-256 over every weight file's bytes (the GGUF file, or each safetensors shard in load
order, with its name and size), read in 8 MiB pieces: about 0.1 s for the default 90 MB GGUF, a
few seconds per 10 GB. A file is hashed once: the result is kept in
``$XDG_CACHE_HOME/kvferry/weight-digests.json`` (``config.cache_dir``) under the file's path, size, mtime, ctime and inode, so
a restarted worker reads it back at once, and any rewrite of the file (which changes its ctime, whatever
the mtime says) hashes it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile

from kvferry.engine.config import cache_dir

CHUNK_BYTES = 8 << 20
DIGEST_CHARS = 32  # 128 bits of SHA-256


def default_cache_path() -> pathlib.Path:
    return pathlib.Path(cache_dir()) / "weight-digests.json"


def _file_key(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _load_cache(path: pathlib.Path) -> dict[str, str]:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store_cache(path: pathlib.Path, entries: dict[str, str]) -> None:
    """Merged into what is there and replaced atomically: workers loading at once both keep theirs."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_load_cache(path), **entries}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".digests-")
        with os.fdopen(fd, "w") as f:
            json.dump(merged, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: hash again next time


def weights_digest(files: list[str], cache_path: pathlib.Path | None = None) -> str:
    """The digest of these weight files, in this order (hex, ``DIGEST_CHARS`` long)."""
    cache_path = cache_path or default_cache_path()
    cache = _load_cache(cache_path)
    fresh: dict[str, str] = {}
    total = hashlib.sha256()
    for path in files:
        key = _file_key(path)
        file_digest = cache.get(key) or fresh.get(key)
        if file_digest is None:
            file_digest = fresh[key] = file_sha256(path)
        total.update(f"{os.path.basename(path)}\0{os.path.getsize(path)}\0{file_digest}\n".encode())
    if fresh:
        _store_cache(cache_path, fresh)
    return total.hexdigest()[:DIGEST_CHARS]
