"""Tokenizer: encode/decode, the model's own chat template, EOS/BOS ids, and streaming detokenization.

``Tokenizer`` wraps a transformers fast tokenizer built the way transformers builds it (from a
``tokenizer.json`` directory, or from a GGUF file's metadata through transformers' GGUF tokenizer
converter), so BOS handling and chat templates follow the model's files exactly. Encode and decode call
the Rust ``tokenizers`` backend directly (no per-call Python overhead of transformers).

``IncrementalDetokenizer`` turns a stream of token ids into text deltas with the prefix/read-offset
method of vLLM and TGI: decode a short window of already-emitted tokens with and without the new ones,
and emit the difference only once it no longer ends in U+FFFD (half of a multi-byte character).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from kvferry.engine.config import ConfigError


class Tokenizer:
    def __init__(self, hf_tokenizer: Any, eos_token_ids: Iterable[int] = ()) -> None:
        """``hf_tokenizer``: a transformers ``PreTrainedTokenizerFast``; ``eos_token_ids``: stop ids from
        the model's config / generation config, merged with the tokenizer's own EOS."""
        self.hf = hf_tokenizer
        self.backend = hf_tokenizer.backend_tokenizer  # tokenizers.Tokenizer
        own_eos = [] if hf_tokenizer.eos_token_id is None else [hf_tokenizer.eos_token_id]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys([*eos_token_ids, *own_eos]))
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        self.vocab_size: int = self.backend.get_vocab_size(with_added_tokens=True)
        self.chat_template: str | None = hf_tokenizer.chat_template

    @classmethod
    def from_dir(cls, path: str, eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """A Hugging Face directory: tokenizer.json, tokenizer_config.json, chat_template.jinja."""
        from transformers import PreTrainedTokenizerFast

        if not os.path.isfile(os.path.join(path, "tokenizer.json")):
            raise ConfigError(f"{path}: no tokenizer.json (only fast tokenizers are supported)")
        try:
            hf = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any parse failure becomes a clear config error
            raise ConfigError(f"{path}: cannot load the tokenizer: {e}") from e
        return cls(hf, eos_token_ids)

    @classmethod
    def from_gguf(cls, path: str, eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """A GGUF file's vocabulary, merges, special tokens and chat template, as transformers reads them."""
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

        try:
            architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(path)
            backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{path}: cannot build a tokenizer from the GGUF metadata: {e}") from e
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
        return cls(hf, eos_token_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The conversation rendered by the model's own Jinja template (not tokenized)."""
        if not self.chat_template:
            raise ConfigError("this model has no chat template; send a plain prompt instead")
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )


class IncrementalDetokenizer:
    """Streaming detokenization of one request's output; ``prompt_ids`` give the first tokens context.

    Invariant: ``text`` is the decode of every output token added so far, minus a held-back tail that
    does not yet decode to complete characters.
    """

    # Tokens of context decoded before the new ones, so a token whose text depends on its left
    # neighbour (sentencepiece's leading space, byte fallback) decodes as in the full text.
    INITIAL_OFFSET = 5

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self.backend = tokenizer.backend
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = list(prompt_ids)
        self.prefix_offset = max(len(self.token_ids) - self.INITIAL_OFFSET, 0)
        self.read_offset = len(self.token_ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the new complete text (possibly "")."""
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # nothing new yet, or an incomplete UTF-8 sequence at the end: wait for more
        delta = new_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += delta
        return delta
