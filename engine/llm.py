"""The Python API: ``LLM(model=...).generate(prompts, SamplingParams(...))``, plus chat and streaming."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from kvferry.engine.config import CacheConfig, EngineConfig, SchedulerConfig, default_model_path
from kvferry.engine.device import resolve_device
from kvferry.engine.engine import LLMEngine, RequestOutput
from kvferry.engine.sampling import SamplingParams, TokenLogprobs

Prompt = str | list[int]
Messages = list[dict[str, str]]


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    error: str | None = None


class LLM:
    def __init__(
        self,
        model: str | None = None,
        dtype: str | None = None,
        device: str = "cpu",
        block_size: int = 16,
        num_blocks: int = 0,
        kv_cache_bytes: int = 512 * 1024 * 1024,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int = 8192,
        seed: int = 0,
        weights: str | None = None,  # GGUF: "quantized", "dequantized" or None (auto; see EngineConfig)
        prompt_weights: str | None = None,  # quantized weights: "dense", "per-call" or None (auto)
        gpu_memory_utilization: float | None = None,  # CUDA: size the KV cache by it (engine/device.py)
    ):
        config = EngineConfig(
            model=model or default_model_path(),
            dtype=dtype,
            device=resolve_device(device),  # "auto" allowed; a CUDA device that is not there: ConfigError
            cache=CacheConfig(block_size, num_blocks, kv_cache_bytes, enable_prefix_caching, gpu_memory_utilization),
            scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len),
            seed=seed,
            weights=weights,
            prompt_weights=prompt_weights,
        )
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Run every prompt to completion in one continuous batch; results in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        results: dict[str, Completion] = {}
        for prompt, p in zip(prompts, params):
            request_id = f"gen-{next(self._ids)}"
            request = self.engine.add_request(request_id, prompt, p)
            results[request_id] = Completion(request_id, list(request.prompt_token_ids))
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                _accumulate(results[out.request_id], out)
        return list(results.values())

    def chat(
        self, conversations: Messages | Sequence[Messages], params: SamplingParams | None = None
    ) -> list[Completion]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        prompts = [self.tokenizer.apply_chat_template(list(c)) for c in conversations]
        return self.generate(prompts, params)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield outputs as they come; leaving the loop early aborts the request and frees its blocks."""
        request_id = f"stream-{next(self._ids)}"
        self.engine.add_request(request_id, prompt, params)
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.engine.abort_request(request_id)


def _accumulate(result: Completion, out: RequestOutput) -> None:
    result.text += out.new_text
    result.token_ids += out.new_token_ids
    if out.new_logprobs is not None:
        result.logprobs = (result.logprobs or []) + out.new_logprobs
    if out.finished:
        result.finish_reason = out.finish_reason
        result.error = out.error
        result.num_cached_tokens = out.num_cached_tokens
