"""The endpoints beside generation that OpenAI clients and vLLM users expect: ``/tokenize``,
``/detokenize`` (vLLM's request and response shapes), ``/version`` and ``/v1/models/{id}``.

All of them answer from the router's own tokenizer and model; no worker is involved. Errors are
``APIError``s (OpenAI's error body, the parameter named); an unknown model is a 404 ``model_not_found``.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from fastapi import FastAPI, Request

import kvferry
from kvferry.router.openai_models import (
    DetokenizeRequest, DetokenizeResponse, ModelCard, TokenizeRequest, TokenizeResponse, VersionResponse, validate,
)
from kvferry.router.openapi_schema import error_responses
from kvferry.router.openai_protocol import chat_prompt_text, check_model, model_not_found
from kvferry.router.request import APIError, ServedModel, check_token_ids


def model_card(model: ServedModel) -> dict:
    """The model object of ``/v1/models`` and ``/v1/models/{id}``."""
    return {"id": model.name, "object": "model", "created": int(time.time()), "owned_by": "kvferry",
            "max_model_len": model.max_model_len}


def tokenize(body: Any, model: ServedModel) -> dict:
    """vLLM's ``/tokenize``: ``prompt`` (a string) or ``messages`` (through the chat template).

    Special tokens default as in vLLM: added to a prompt, not to messages (the template has its own).
    """
    request = validate(TokenizeRequest, body)
    check_model(request.model, model)
    if request.messages is not None:
        if request.prompt is not None:
            raise APIError("give prompt or messages, not both", param="prompt")
        add_generation_prompt = True if request.add_generation_prompt is None else request.add_generation_prompt
        text = chat_prompt_text(request.messages, model, add_generation_prompt)
        add_special = bool(request.add_special_tokens)
    elif request.prompt is not None:
        text = request.prompt
        add_special = True if request.add_special_tokens is None else request.add_special_tokens
    else:
        raise APIError("prompt (a string) or messages is required", param="prompt", code="missing_required_parameter")
    tokens = model.tokenizer.encode(text, add_special_tokens=add_special)
    return {"count": len(tokens), "max_model_len": model.max_model_len, "tokens": tokens}


def detokenize(body: Any, model: ServedModel) -> dict:
    """vLLM's ``/detokenize``: ``tokens`` (ids in the vocabulary) -> ``prompt`` (the text)."""
    request = validate(DetokenizeRequest, body)
    check_model(request.model, model)
    ids = check_token_ids(model, request.tokens, "tokens") if request.tokens else ()
    return {"prompt": model.tokenizer.decode(list(ids))}


MAX_JSON_DEPTH = 32  # the deepest request shape (chat content parts) nests 5 levels


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def parse_json(raw: bytes) -> Any:
    """The body as JSON, or a 400 ``invalid_json``: malformed, not UTF-8, NaN/Infinity, integers of more
    digits than Python converts, nesting deeper than ``MAX_JSON_DEPTH``, lone UTF-16 surrogates."""
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int_max_str_digits, NaN
        raise APIError(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    _check_json_value(value)
    return value


def _check_json_value(value: Any) -> None:
    """Depth and strings, without recursion; a lone surrogate (``"\\ud800"``) is valid JSON but no text
    the tokenizer, the chat template or a response can carry."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError("the request body has a string with a lone UTF-16 surrogate (not text)",
                               code="invalid_json") from None
        elif isinstance(item, (list, dict)):
            if depth > MAX_JSON_DEPTH:
                raise APIError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
            if isinstance(item, dict):
                stack.extend((k, depth) for k in item)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)


def add_routes(app: FastAPI, served_model: Callable[[], ServedModel]) -> None:
    """Register the endpoints on ``app``; ``served_model()`` is read per request (workers can shorten
    the context the router serves)."""

    @app.post("/tokenize", summary="Tokenize a prompt or chat messages (vLLM)",
              responses={200: {"model": TokenizeResponse}, **error_responses(400, 404, 413)})
    async def tokenize_route(request: Request) -> dict:
        return tokenize(parse_json(await request.body()), served_model())

    @app.post("/detokenize", summary="Token ids back to text (vLLM)",
              responses={200: {"model": DetokenizeResponse}, **error_responses(400, 404, 413)})
    async def detokenize_route(request: Request) -> dict:
        return detokenize(parse_json(await request.body()), served_model())

    @app.get("/version", summary="The kvferry version (vLLM)", responses={200: {"model": VersionResponse}})
    async def version() -> dict:
        return {"version": kvferry.__version__}

    @app.get("/v1/models/{model_id:path}", summary="One model's card (OpenAI)",
             responses={200: {"model": ModelCard}, **error_responses(404)})
    async def model_route(model_id: str) -> dict:
        model = served_model()
        if model_id != model.name:
            raise model_not_found(model_id, model)
        return model_card(model)
