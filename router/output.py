"""Turning one choice's token ids into text deltas: incremental detokenization and stop conditions.

Workers stream token ids; the router owns the text. Each token goes through the same steps as in the
single-process engine, so the two produce the same text: detokenize incrementally (never half a UTF-8
character), check EOS / stop tokens / stop strings / max_tokens with ``check_stop``, hold back a tail that
could still become a stop string, and cut the stop string (and the EOS text) from the output.
A stop string is found here, not on the worker, so the router then aborts the request on its worker.
"""

from __future__ import annotations

from typing import Sequence

from kvferry.common.sampling import SamplingParams, TokenLogprobs
from kvferry.engine.sampling import check_stop, stop_holdback
from kvferry.engine.tokenizer import IncrementalDetokenizer
from kvferry.router.request import ChoiceDelta, TokenizerLike


class ChoiceState:
    def __init__(
        self,
        index: int,
        tokenizer: TokenizerLike,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
    ) -> None:
        self.index = index
        self.params = params
        self.eos_token_ids = tuple(tokenizer.eos_token_ids)
        self.detokenizer = IncrementalDetokenizer(tokenizer, list(prompt_token_ids))
        self.output_token_ids: list[int] = []
        self.text = ""
        self.emitted_chars = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs] | None) -> ChoiceDelta:
        """Consume tokens; the delta carries the tokens taken (up to a stop) and the text now safe to emit."""
        delta = ChoiceDelta(self.index, logprobs=[] if self.params.logprobs is not None else None)
        for i, token_id in enumerate(token_ids):
            if self.finished:
                break  # tokens a worker produced after a stop the router found: dropped
            new_text = self.detokenizer.add(token_id)
            self.text += new_text
            self.output_token_ids.append(token_id)
            delta.token_ids.append(token_id)
            if delta.logprobs is not None and logprobs is not None and i < len(logprobs):
                delta.logprobs.append(logprobs[i])
            decision = check_stop(
                self.output_token_ids, token_id, self.text, self.params, self.eos_token_ids, len(new_text)
            )
            if decision.finished:
                self.finish_reason = decision.reason
                self.stop_reason = decision.stop_reason
                if decision.trim_text_to is not None:
                    self.text = self.text[: decision.trim_text_to]
        end = len(self.text) if self.finished else len(self.text) - stop_holdback(self.text, self.params)
        end = max(end, self.emitted_chars)
        delta.text = self.text[self.emitted_chars : end]
        self.emitted_chars = end
        delta.finish_reason = self.finish_reason
        return delta

    def finish(self, reason: str, error: str | None = None) -> ChoiceDelta:
        """The worker ended the choice (length at the context limit, abort, error): flush held-back text."""
        self.finish_reason = reason
        delta = ChoiceDelta(self.index, text=self.text[self.emitted_chars :], finish_reason=reason, error=error)
        self.emitted_chars = len(self.text)
        return delta
