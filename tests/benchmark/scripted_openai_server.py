"""An OpenAI-compatible server on 127.0.0.1 whose every answer is scripted by the prompt, for testing
the benchmark client against known timings.

The prompt (or the first chat message) is ``key=value`` words:
- ``ttft=S`` seconds before the first token, ``itl=S`` between tokens; ``max_tokens`` tokens in all,
  each sent at ``start + ttft + k * itl`` (an absolute schedule, so jitter does not add up);
- ``status=N`` answers HTTP N with an OpenAI error body at once (``retry=S`` adds Retry-After);
- ``error_after=K`` sends K tokens, then an ``error`` event (a worker failing mid-stream);
- ``timings=1`` puts ``kvferry_timings`` ({"prefill_compute": 0.05, "decode": ttft}) in the last chunk.
Every request body is kept in ``ScriptedServer.bodies``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

MODEL = "scripted-model"


def _script(body: dict) -> dict[str, float]:
    text = body.get("prompt") if "prompt" in body else body["messages"][0]["content"]
    return {k: float(v) for k, _, v in (w.partition("=") for w in text.split()) if v}


def _sse(data) -> str:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


def make_app(bodies: list[dict]) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    async def generate(request: Request, chat: bool):
        start = time.perf_counter()
        body = await request.json()
        bodies.append(body)
        script = _script(body)
        if "status" in script:
            headers = {"Retry-After": f"{script['retry']:g}"} if "retry" in script else None
            return JSONResponse({"error": {"message": f"scripted status {int(script['status'])}",
                                           "type": "server_error"}}, status_code=int(script["status"]),
                                headers=headers)
        num_tokens = body["max_tokens"]
        ttft, itl = script.get("ttft", 0.0), script.get("itl", 0.0)
        error_after = int(script.get("error_after", -1))

        def chunk(k: int) -> dict:
            choice = ({"index": 0, "delta": {"content": f" t{k}"}, "finish_reason": None} if chat
                      else {"index": 0, "text": f" t{k}", "finish_reason": None})
            return {"id": "x", "object": "chat.completion.chunk" if chat else "text_completion",
                    "model": MODEL, "choices": [choice]}

        async def events():
            if chat:  # like vLLM and kvferry: a role chunk with empty content first; it carries no text
                await asyncio.sleep(max(0.0, start + ttft - time.perf_counter()) / 2)
                yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            for k in range(num_tokens):
                await asyncio.sleep(max(0.0, start + ttft + k * itl - time.perf_counter()))
                if k == error_after:
                    yield _sse({"error": {"message": "scripted failure mid-stream", "code": "worker_error"}})
                    yield _sse("[DONE]")
                    return
                yield _sse(chunk(k))
            last = {"id": "x", "model": MODEL, "choices": [],
                    "usage": {"prompt_tokens": 7, "completion_tokens": num_tokens, "total_tokens": 7 + num_tokens}}
            if script.get("timings"):
                last["kvferry_timings"] = {"prefill_compute": 0.05, "decode": ttft}
            yield _sse(last)
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await generate(request, chat=True)

    return app


class ScriptedServer:
    """The app under uvicorn in a thread, on a free loopback port."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(make_app(self.bodies), host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the scripted server did not start")
            time.sleep(0.01)
        # Warm up (first-request costs of the app and the loopback path), so timed requests see none.
        for _ in range(3):
            httpx.post(self.url + "/v1/completions", json={"prompt": "ttft=0", "max_tokens": 2}, timeout=10,
                       trust_env=False).raise_for_status()
        self.bodies.clear()
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
