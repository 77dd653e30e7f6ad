"""The collective data plane's wire: one 2-rank ``torch.distributed`` group per prefill-decode pair.

There is no global world and no ``init_process_group``: each pair builds its own group at run time,
``ProcessGroupGloo`` (CPU staging buffers) or ``ProcessGroupNCCL`` (staging on the cache's GPU)
constructed directly over a ``TCPStore`` that the decode worker opens for that pair alone (its port and
a secret prefix travel in the answer to the pair's authenticated hello; it dies with the group, so no
keys pile up). Rank 0 is the prefill worker, rank 1 the decode worker. Each group is one *epoch* of
its pair: a broken group is never repaired, the next transfer builds a new one under a new epoch.

Ordering: NCCL ignores tags (and Gloo matches them first in, first out), so both ends post their
operations in the order of the pair's control frames; every message ends with a 16-byte stamp
(epoch, sequence number) that the receiver checks, so a message out of place fails the pair loudly
instead of landing in the wrong blocks.

Deadlines: every wait has one (``Work.wait(timeout)``). Neither backend can cancel one operation, and
a wait blocked in one thread is not woken by ``abort``/``shutdown`` from another (Gloo: only its
timeout, or the peer's side of the group going away, ends it), so any failed or timed-out operation
breaks the whole group; the peer learns it from the control connection closing.

Teardown: ``close()`` destroys the group on the calling thread, never concurrently with an operation
on it (callers hold their pair's lock or are its only thread). torch aborts the process if a group is
being destroyed on one thread while the interpreter finalizes on another, so an ``atexit`` hook waits
(up to 5 s) for destructions in progress.
"""

from __future__ import annotations

import atexit
import datetime
import socket
import struct
import threading
import time

import torch
import torch.distributed as dist

from kvferry.transport.base import TransferError, TransferErrorCode

BACKENDS = ("gloo", "nccl")
_destroying = threading.Condition()
_num_destroying = 0  # groups being destroyed right now, on any thread
STAMP = struct.Struct("<QQ")  # (epoch, sequence number), after each message's payload
SENDER_RANK, RECEIVER_RANK = 0, 1


def backend_unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot run in this process, or None when it can."""
    if not dist.is_available():
        return f"torch {torch.__version__} was built without torch.distributed"
    if backend == "gloo":
        return None if dist.is_gloo_available() else f"torch {torch.__version__} was built without Gloo"
    if backend == "nccl":
        if not dist.is_nccl_available():
            return f"NCCL needs CUDA: torch {torch.__version__} has no NCCL"
        if not torch.cuda.is_available():
            return "NCCL needs CUDA: no GPU is visible to this process"
        return None
    return f"unknown collective backend {backend!r}"


def staging_device(backend: str, cache_device: torch.device) -> torch.device:
    """Gloo moves host memory (a GPU cache is staged through the host); NCCL moves the cache's GPU memory."""
    return cache_device if backend == "nccl" else torch.device("cpu")


def open_store(local_host: str, timeout_s: float) -> dist.TCPStore:
    """The decode worker's rendezvous store for one pair, listening on ``local_host`` only (a store
    given port 0 would listen on every interface)."""
    family = socket.AF_INET6 if ":" in local_host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.bind((local_host, 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        store = dist.TCPStore(local_host, port, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout_s), master_listen_fd=listener.fileno())
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store owns the listening socket now and closes it with itself
    return store


def connect_store(host: str, port: int, deadline: float) -> dist.TCPStore:
    try:
        return dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=_remaining(deadline)))
    except (RuntimeError, dist.DistError) as e:  # DistNetworkError / DistStoreError
        raise TransferError(TransferErrorCode.UNAVAILABLE, f"KV pair rendezvous store {host}:{port}: {e}") from None


class PairGroup:
    """One epoch of one pair: the 2-rank group, its sequence numbers and its teardown."""

    def __init__(self, backend: str, store: dist.Store, prefix: str, rank: int, epoch: int, local_host: str,
                 deadline: float):
        """Blocks until the peer joined (Gloo connects here; NCCL connects at the first operation) or
        ``deadline`` passes. ``local_host``: this end's address on the path to the peer (the control
        connection's local address), where Gloo listens for the pair."""
        self.backend = backend
        self.rank = rank
        self.peer = RECEIVER_RANK if rank == SENDER_RANK else SENDER_RANK
        self.epoch = epoch
        self.store = store  # kept alive with the group: NCCL rendezvouses lazily, at the first operation
        self._lock = threading.Lock()
        self.broken: TransferError | None = None
        timeout = datetime.timedelta(seconds=_remaining(deadline))
        prefixed = dist.PrefixStore(prefix, store)
        try:
            if backend == "gloo":
                options = dist.ProcessGroupGloo._Options()
                options._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host)]
                options._timeout = timeout
                self.group = dist.ProcessGroupGloo(prefixed, rank, 2, options)
            else:
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = timeout
                self.group = dist.ProcessGroupNCCL(prefixed, rank, 2, options)
        except (RuntimeError, dist.DistError) as e:
            code = TransferErrorCode.DEADLINE if time.monotonic() >= deadline else TransferErrorCode.UNAVAILABLE
            raise TransferError(code, f"KV pair {backend} group (epoch {epoch}) not formed: {_short(e)}") from None

    def send(self, tensor: torch.Tensor) -> dist.Work:
        return self._post(lambda: self.group.send([tensor], self.peer, 0), "send")

    def recv(self, tensor: torch.Tensor) -> dist.Work:
        return self._post(lambda: self.group.recv([tensor], self.peer, 0), "recv")

    def wait(self, work: dist.Work, deadline: float, what: str) -> None:
        """Wait for one operation until ``deadline``; a failure or timeout breaks the group (raised)."""
        self._check()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self.fail(TransferError(TransferErrorCode.DEADLINE, f"{what}: deadline passed"))
        try:
            work.wait(datetime.timedelta(seconds=remaining))
        except (RuntimeError, dist.DistError) as e:
            timed_out = time.monotonic() >= deadline - 0.01
            code = TransferErrorCode.DEADLINE if timed_out else TransferErrorCode.UNAVAILABLE
            raise self.fail(TransferError(code, f"{what}: {self.backend} {_short(e)}")) from None

    def fail(self, error: TransferError) -> TransferError:
        """Mark the group broken (the first reason stays) and abort it; returns the recorded reason."""
        with self._lock:
            if self.broken is None:
                self.broken = error
                first = True
            else:
                first = False
        if first and self.backend == "nccl":
            # Frees the communicator and unblocks its kernels; Gloo's waits end by their deadlines or
            # when the peer's side closes, so Gloo needs nothing here (and its abort wakes nobody).
            try:
                self.group.abort()
            except RuntimeError:
                pass
        return self.broken

    def close(self) -> None:
        """Destroy the group and its store now (Gloo closes its connections: the peer's waits end at
        once). No operation may be waiting on it."""
        global _num_destroying
        with _destroying:
            _num_destroying += 1
        try:
            self.fail(TransferError(TransferErrorCode.ABORTED, f"KV pair group (epoch {self.epoch}) closed"))
            self.group = self.store = None  # the last references: destroyed here
        finally:
            with _destroying:
                _num_destroying -= 1
                _destroying.notify_all()

    def _post(self, op, what: str) -> dist.Work:
        self._check()
        try:
            return op()
        except (RuntimeError, dist.DistError) as e:
            raise self.fail(TransferError(TransferErrorCode.UNAVAILABLE, f"{self.backend} {what}: {_short(e)}")) from None

    def _check(self) -> None:
        if self.broken is not None:
            raise self.broken


@atexit.register
def _wait_for_destructions() -> None:
    with _destroying:
        _destroying.wait_for(lambda: _num_destroying == 0, timeout=5.0)


def stamp(epoch: int, seq: int) -> torch.Tensor:
    return torch.frombuffer(bytearray(STAMP.pack(epoch, seq)), dtype=torch.uint8)


def read_stamp(tail: torch.Tensor) -> tuple[int, int]:
    return STAMP.unpack(tail.cpu().numpy().tobytes())


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TransferError(TransferErrorCode.DEADLINE, "KV pair rendezvous: deadline passed")
    return remaining


def _short(e: BaseException) -> str:
    """torch's message without its file path prefix and advice."""
    text = str(e).split("This is typically caused", 1)[0].strip()
    return text.split("] ", 1)[1] if text.startswith("[") and "] " in text else text
