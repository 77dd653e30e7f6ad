"""The token mask of structured output: a request's grammar state, and the logits it allows.

1. ``GrammarCompiler`` (one per engine) holds the tokenizer as llguidance sees it, built on the first
   grammar request (~0.5 s for a 49k vocabulary, then cached), and makes a ``GrammarMatcher`` per request.
2. ``GrammarMatcher``: one request's parser state. ``consume(token_id)`` for every accepted output token
   (the sampling state calls it, so a first token from a prefill worker and a migrated stream's tokens
   advance it the same way); ``fill_bitmask(bitmask, row)`` writes the tokens allowed next.
3. ``fill_bitmasks`` computes the rows of a batch (in parallel on llguidance's threads) and
   ``masked_logits`` sets every disallowed logit to -inf, on whatever device the logits are.

A grammar that is complete allows only EOS, so the request ends with finish reason ``stop``. A matcher
that failed (a token it did not allow was forced on it) allows only EOS too: the request ends rather
than sampling from an empty distribution.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Sequence

import llguidance
import llguidance.hf
import numpy as np
import torch

from kvferry.common.grammar import GrammarError, GrammarSpec

logger = logging.getLogger(__name__)

PARALLEL_ROWS = 4  # from this many grammar rows in a step, their masks are computed in parallel


class GrammarMatcher:
    def __init__(self, matcher: llguidance.LLMatcher, eos_token_ids: Sequence[int]) -> None:
        self._matcher = matcher
        self._eos_token_ids = list(eos_token_ids)
        self._failed = False

    @property
    def llmatcher(self) -> llguidance.LLMatcher:
        return self._matcher

    @property
    def failed(self) -> bool:
        return self._failed

    @property
    def is_stopped(self) -> bool:
        """Complete: only EOS may follow."""
        return self._matcher.is_stopped()

    def consume(self, token_id: int) -> None:
        if self._failed or self._matcher.is_stopped():
            return  # EOS after a complete grammar, or anything after a failure: nothing to advance
        if not self._matcher.consume_token(token_id):
            self._failed = True
            logger.warning("grammar refused token %d; the request can only end now: %s", token_id,
                           self._matcher.get_error().splitlines()[0] if self._matcher.get_error() else "")

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """``bitmask``: [rows, ceil(vocab / 32)] int32 on the CPU; bit t of row ``row`` = token t allowed."""
        if self._failed or self._matcher.is_error():
            eos_only(bitmask, row, self._eos_token_ids)
        else:
            v = bitmask[row]
            self._matcher.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())


class GrammarCompiler:
    """Matchers for one tokenizer. ``tokenizer``: the engine's ``Tokenizer`` (a transformers fast one)."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._lltokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._lock = threading.Lock()  # requests arrive on gRPC threads; the tokenizer is built once

    def _ll(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._lltokenizer is None:
                self._lltokenizer = llguidance.hf.from_tokenizer(
                    self._tokenizer.hf, n_vocab=self.vocab_size, eos_token=list(self._tokenizer.eos_token_ids))
                self._executor = llguidance.LLExecutor(max(1, torch.get_num_threads()))
            return self._lltokenizer

    def matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        """A fresh matcher at the grammar's start; ``GrammarError`` if it does not build for this vocabulary."""
        matcher = llguidance.LLMatcher(self._ll(), spec.compiled, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"invalid {spec.kind}: {matcher.get_error().splitlines()[0]}")
        return GrammarMatcher(matcher, self._tokenizer.eos_token_ids)

    def fill_bitmasks(self, matchers: Sequence[GrammarMatcher]) -> torch.Tensor:
        """The batch's bitmask, one row per matcher: [len(matchers), ceil(vocab / 32)] int32 (CPU)."""
        # Written through raw pointers (llguidance's own torch helpers import torch.compile: ~3 s).
        bitmask = torch.empty(len(matchers), (self.vocab_size + 31) // 32, dtype=torch.int32)
        live = [(m.llmatcher, row) for row, m in enumerate(matchers) if not (m.failed or m.llmatcher.is_error())]
        # A few rows are cheaper in turn (~0.1-0.5 ms each) than woken threads on a busy small box.
        if len(live) >= PARALLEL_ROWS and self._executor is not None:  # the rows on llguidance's threads
            row_bytes = bitmask.shape[1] * bitmask.element_size()
            self._executor.unsafe_compute_mask_ptr(live, bitmask.data_ptr(), row_bytes, bitmask.shape[0])
            done = {row for _, row in live}
        else:
            done = set()
        for row, m in enumerate(matchers):
            if row not in done:
                m.fill_bitmask(bitmask, row)
        return bitmask


def eos_only(bitmask: torch.Tensor, row: int, eos_token_ids: Sequence[int]) -> None:
    bitmask[row].zero_()
    for t in eos_token_ids:
        bitmask[row, t // 32] |= _bit(t % 32)


def _bit(i: int) -> int:
    return (1 << i) - (1 << 32) if i == 31 else 1 << i  # bit 31 of an int32 is its sign


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> np.ndarray:
    """The bitmask unpacked: [rows, vocab_size] bool, True where a token is allowed (bit i of word w is
    token 32 w + i on a little-endian host); columns past the bitmask's words are False."""
    assert sys.byteorder == "little", "the token bitmask is unpacked as little-endian words"
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little").view(np.bool_)
    if bits.shape[1] < vocab_size:  # a padded vocabulary: its extra rows of the lm_head are never allowed
        bits = np.pad(bits, ((0, 0), (0, vocab_size - bits.shape[1])))
    return bits[:, :vocab_size]


def masked_logits(logits: torch.Tensor, rows: Sequence[int], bitmask: torch.Tensor) -> torch.Tensor:
    """A copy of ``logits`` [num_seqs, vocab] whose ``rows`` have their disallowed tokens at -inf
    (``bitmask`` row j for ``rows[j]``). On the CPU the work is numpy's, on one thread: torch's
    elementwise ops over a few 49k-token rows fork two OpenMP threads, and on two busy cores waiting
    for the descheduled one took 10-50 ms a step where numpy takes ~0.1 ms."""
    allowed = allowed_tokens(bitmask, logits.shape[1])  # [len(rows), vocab]
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        out = logits.detach().numpy().copy()
        out[list(rows)] = np.where(allowed, out[list(rows)], -np.inf)
        return torch.from_numpy(out)
    index = torch.tensor(list(rows), device=logits.device)
    out = logits.clone()
    out[index] = logits[index].masked_fill(~torch.from_numpy(allowed).to(logits.device), float("-inf"))
    return out
