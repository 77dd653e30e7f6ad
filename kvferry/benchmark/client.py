"""One streaming request to an OpenAI-compatible server, timed as it arrives.

A request is ``POST {base_url}/v1/completions`` (or ``/v1/chat/completions``) with ``stream: true`` and
``stream_options: {include_usage: true}``; with fixed output lengths it also carries ``ignore_eos:
true``, ``max_tokens`` and ``min_tokens`` (vLLM and SGLang honour both; kvferry and llama.cpp's server
read ``ignore_eos``; servers ignore fields they do not know). Times are taken when each server-sent
event arrives:

- TTFT: send -> first event carrying output text;
- ITL: the gaps between successive events carrying text (one event is counted as one token's arrival);
- end-to-end latency: send -> end of the stream;
- TPOT: ``(e2e - ttft) / (output_tokens - 1)`` as vLLM defines it, ``output_tokens`` being the usage's
  ``completion_tokens`` (the event count where the server sends no usage); undefined for one token.

A request that fails (HTTP error status, an ``error`` event mid-stream, a broken connection, no text at
all) is recorded with its error text; HTTP 429 (the server rejecting early, e.g. kvferry's SLO
admission) is kept apart from other failures, with its ``Retry-After``. When the server is kvferry, the
``kvferry_timings`` field of a chunk (phase name -> seconds) is kept with the record.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
ERROR_TEXT_LIMIT = 200


@dataclass(frozen=True)
class RequestOptions:
    base_url: str  # scheme://host:port, without /v1
    model: str
    endpoint: str = "completions"
    ignore_eos: bool = True
    temperature: float = 0.0
    timeout_s: float = 600.0
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {self.endpoint!r}; choose one of {', '.join(ENDPOINTS)}")

    @property
    def url(self) -> str:
        return self.base_url + ENDPOINTS[self.endpoint]


@dataclass
class RequestRecord:
    """One request's outcome; times in seconds, ``send_time`` from the start of its round."""

    index: int
    prompt_words: int
    output_len: int  # requested
    send_time: float
    done: bool = False  # False while in flight (and for good, when cancelled at the round's deadline)
    success: bool = False
    status: int | None = None  # HTTP status; None when no response came
    error: str | None = None
    retry_after: float | None = None
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    timings: dict[str, float] | None = None

    @property
    def rejected(self) -> bool:
        """The server said 429: early rejection (or a rate limit), counted apart from failures."""
        return self.status == 429

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def request_body(options: RequestOptions, prompt: str, output_len: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": options.model,
        "max_tokens": output_len,
        "temperature": options.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if options.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if options.ignore_eos:
        body["ignore_eos"] = True
        body["min_tokens"] = output_len
    body.update(options.extra_body)
    return body


def make_client(options: RequestOptions) -> httpx.AsyncClient:
    # trust_env=False: no proxy from the environment, so traffic only ever goes to the URL given.
    return httpx.AsyncClient(
        timeout=httpx.Timeout(options.timeout_s, connect=min(30.0, options.timeout_s)),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        trust_env=False,
    )


async def send_request(client: httpx.AsyncClient, options: RequestOptions, prompt: str, record: RequestRecord) -> None:
    """Send one request and fill ``record`` in as its events arrive (a cancelled request keeps what it had)."""
    body = request_body(options, prompt, record.output_len)
    start = time.perf_counter()
    try:
        async with client.stream("POST", options.url, json=body) as response:
            record.status = response.status_code
            if response.status_code == 200:
                await _read_stream(response, start, record)
            else:
                text = (await response.aread()).decode("utf-8", errors="replace")
                record.error = f"HTTP {response.status_code}: {error_message(text)}"
                if response.status_code == 429:
                    record.retry_after = parse_retry_after(response.headers.get("retry-after"))
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {str(exc)[:ERROR_TEXT_LIMIT] or 'no detail'}"
    # Not reached when cancelled (CancelledError is no Exception): ``done`` stays False and the runner
    # counts the request as unfinished.
    if record.error is None and record.ttft is None:
        record.error = "the stream carried no output text"
    record.success = record.error is None
    record.done = True


async def _read_stream(response: httpx.Response, start: float, record: RequestRecord) -> None:
    last = start
    arrivals = 0
    usage_tokens = None
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            continue
        now = time.perf_counter()
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            record.error = f"malformed event: {data[:ERROR_TEXT_LIMIT]}"
            return
        if not isinstance(chunk, dict):
            continue
        if "error" in chunk:
            record.error = f"stream error: {error_message(json.dumps(chunk))}"
            return
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            usage_tokens = usage.get("completion_tokens", usage_tokens)
            record.prompt_tokens = usage.get("prompt_tokens", record.prompt_tokens)
        timings = chunk.get("kvferry_timings")
        if isinstance(timings, dict):
            record.timings = {k: float(v) for k, v in timings.items() if isinstance(v, (int, float))}
        if _carries_text(chunk):
            if record.ttft is None:
                record.ttft = now - start
            else:
                record.itl.append(now - last)
            last = now
            arrivals += 1
    record.e2e = time.perf_counter() - start
    record.output_tokens = usage_tokens if isinstance(usage_tokens, int) else arrivals


def _carries_text(chunk: dict) -> bool:
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or delta.get("reasoning_content"):
            return True
    return False


def error_message(text: str) -> str:
    """The message of an OpenAI-style error body (or FastAPI's ``detail``), else the text, shortened."""
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return text.strip()[:ERROR_TEXT_LIMIT] or "empty body"
    if isinstance(body, dict):
        error = body.get("error", body.get("detail"))
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"][:ERROR_TEXT_LIMIT]
        if isinstance(error, str):
            return error[:ERROR_TEXT_LIMIT]
        if isinstance(body.get("message"), str):
            return body["message"][:ERROR_TEXT_LIMIT]
    return text.strip()[:ERROR_TEXT_LIMIT]


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is not used by LLM servers and is read as None)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def discover_model(base_url: str, timeout_s: float = 30.0) -> str:
    """The first model id the server lists at ``/v1/models``."""
    try:
        response = httpx.get(base_url + "/v1/models", timeout=timeout_s, trust_env=False)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise RuntimeError(f"could not read the model name from {base_url}/v1/models ({exc}); "
                           "pass --model") from None


def normalize_base_url(url: str) -> str:
    """``http://host:8000``, ``http://host:8000/`` and ``http://host:8000/v1`` all mean the same server."""
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url must start with http:// or https://, got {url!r}")
    return url
