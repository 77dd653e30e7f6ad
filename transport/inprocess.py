"""In-process KV transport: the sender writes straight into a ``KVReceiver`` in the same process.

It is the test transport (workers and the decode loop are tested through it without sockets) and the
path for a prefill and a decode engine sharing one process. Receivers are found by address in a dict
the caller owns; an address missing from it behaves like a dead peer.
"""

from __future__ import annotations

import time

import torch

from kvferry.transport.base import (
    FirstToken, KVSendHandle, KVSender, KVTarget, KVTrailer, TransferError, TransferErrorCode, TransferState,
    gather_blocks,
)
from kvferry.transport.integrity import CHECKSUM_ALGORITHM, LayerChecksums
from kvferry.transport.receiver import KVReceiver, ReceiveSession


class InProcessSendHandle(KVSendHandle):
    def __init__(
        self, request_id: str, session: ReceiveSession | None, error: TransferError | None, num_layers: int = 0
    ):
        self.request_id = request_id
        self._session = session
        self._checksums = LayerChecksums(num_layers)
        self.error = error
        self._state = TransferState.FAILED if error else TransferState.PENDING
        self._opened = time.monotonic()

    def send_layer(self, layer_idx: int, kv_cache_layer: torch.Tensor, block_ids: list[int]) -> None:
        if self._state is not TransferState.PENDING:
            return
        data = gather_blocks(kv_cache_layer, block_ids).cpu().view(torch.uint8).reshape(-1).numpy()
        self._checksums.update(layer_idx, data)
        self._run(lambda: self._session.write(layer_idx, 0, data))
        self.bytes_sent += data.nbytes if self._state is TransferState.PENDING else 0

    def finish(self, first_token: FirstToken) -> None:
        if self._state is not TransferState.PENDING:
            return
        trailer = KVTrailer(first_token, self.bytes_sent, tuple(self._checksums.digests()), CHECKSUM_ALGORITHM)
        self._run(lambda: self._session.finish(trailer))
        if self._state is TransferState.PENDING:
            self._state = TransferState.DONE
            self.seconds = time.monotonic() - self._opened

    def abort(self, reason: str) -> None:
        if self._state is TransferState.PENDING:
            self._fail(TransferError(TransferErrorCode.ABORTED, f"sender aborted: {reason}"))

    def poll(self) -> TransferState:
        return self._state

    def wait(self, timeout: float | None = None) -> TransferState:
        return self._state  # synchronous: never pending on anything but the caller

    def _run(self, fn) -> None:
        try:
            fn()
        except TransferError as e:
            self._fail(e)

    def _fail(self, error: TransferError) -> None:
        self.error = error
        self._state = TransferState.FAILED
        self._session.fail(error)


class InProcessKVSender(KVSender):
    def __init__(self, receivers: dict[str, KVReceiver], fingerprint, sender_id: str = ""):
        super().__init__(fingerprint, sender_id)
        self.receivers = receivers  # address -> receiver; the caller adds and removes peers

    def open(self, target: KVTarget, request_id: str, num_blocks: int) -> KVSendHandle:
        receiver = self.receivers.get(target.address)
        if receiver is None:
            error = TransferError(TransferErrorCode.UNAVAILABLE, f"no receiver at {target.address}")
            return InProcessSendHandle(request_id, None, error)
        handshake = receiver.handshake(self.fingerprint)
        if not handshake.compatible:
            return InProcessSendHandle(request_id, None, handshake.mismatch_error(target.address))
        try:
            session = receiver.open(self.header(target, request_id, num_blocks), transport="inprocess")
        except TransferError as e:
            return InProcessSendHandle(request_id, None, e)
        return InProcessSendHandle(request_id, session, None, self.fingerprint.num_layers)
