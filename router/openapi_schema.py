"""The router's OpenAPI schema, served at ``/openapi.json`` (and as Swagger UI at ``/docs``).

FastAPI describes the routes and their responses; the request bodies are added here, because the
handlers read and validate their bodies themselves (JSON checks first, then the pydantic models of
``openai_models``, off the event loop) and so declare no body parameter FastAPI could see. With an API
key, every route that needs it carries the bearer security scheme and its 401.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from kvferry.router.openai_models import (
    ChatCompletionChunk, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ErrorResponse, TokenizeRequest,
)

REQUEST_BODIES: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}
STREAM_CHUNKS = (ChatCompletionChunk, ErrorResponse)  # referenced from the SSE events' descriptions
_REF = "#/components/schemas/{model}"

ERRORS = {
    400: "invalid request: the error names the parameter (invalid_json, invalid_type, invalid_value, ...)",
    401: "missing or wrong API key (invalid_api_key)",
    404: "unknown model (model_not_found)",
    413: "request body over --max-body-bytes (request_too_large)",
    429: "refused for its time-to-first-token target (slo_rejected), with Retry-After",
    502: "a worker failed the request (worker_error)",
    503: "no worker had room in time (no_capacity), or the router is shutting down",
    504: "not finished within --request-timeout (timeout)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse, "description": ERRORS[s]} for s in statuses}


def streamed(model: type[BaseModel], chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """A 200 that is JSON, or with ``stream: true`` server-sent events: ``data:`` lines of ``chunk``
    objects (an error object if the request fails mid-stream), then ``data: [DONE]``. Each event is
    described as OpenAPI 3.2 does (``itemSchema``, the data's JSON as ``contentSchema``)."""
    data = {"type": "string", "if": {"const": "[DONE]"}, "else": {
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [{"$ref": _REF.format(model=m.__name__)} for m in (chunk, ErrorResponse)]},
    }}
    event = {"type": "object", "required": ["data"], "properties": {"data": data},
             "description": "with stream_options.include_usage, a last chunk with usage and no choices"}
    return {200: {"model": model, "content": {"text/event-stream": {"itemSchema": event}}}}


def install_openapi(app: FastAPI, api_key_required: bool, open_paths: frozenset[str]) -> None:
    """Make ``app.openapi()`` return the complete schema (built once, on first use)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _build(app, api_key_required, open_paths)
        return app.openapi_schema

    app.openapi = openapi  # FastAPI's documented way to customise the schema


def _build(app: FastAPI, api_key_required: bool, open_paths: frozenset[str]) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _, defs = models_json_schema([(m, "validation") for m in REQUEST_BODIES.values()]
                                 + [(m, "serialization") for m in STREAM_CHUNKS], ref_template=_REF)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name, definition in defs.get("$defs", {}).items():
        schemas.setdefault(name, definition)
    for path, model in REQUEST_BODIES.items():
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}},
        }
    for operations in schema["paths"].values():
        for operation in operations.values():
            operation["responses"].pop("422", None)  # invalid input is OpenAI's 400, never FastAPI's 422
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    if api_key_required:
        components["securitySchemes"] = {"apiKey": {
            "type": "http", "scheme": "bearer", "description": "the router's --api-key",
        }}
        error_ref = {"description": ERRORS[401], "content": {"application/json": {
            "schema": {"$ref": _REF.format(model=ErrorResponse.__name__)}}}}
        for path, operations in schema["paths"].items():
            if path in open_paths:
                continue
            for operation in operations.values():
                operation["security"] = [{"apiKey": []}]
                operation["responses"].setdefault("401", error_ref)
    return schema
