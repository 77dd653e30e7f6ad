"""What a request's output is constrained to (structured output): a ``GrammarSpec``, checked once.

A spec is plain data (a kind and its source text) so it travels unchanged from the router to every worker
that samples for the request (in ``SamplingParams`` and the gRPC ``Grammar`` message); each worker compiles
it against its own tokenizer (``grammar_mask.GrammarCompiler``). The grammar library is llguidance (a
Rust Earley parser with a token trie; no dependencies): these kinds are its input formats.

- ``json_schema``: ``source`` is a JSON schema as JSON text. Output is JSON with ``json.dumps``'s
  separators (``", "`` and ``": "``) and no other whitespace: a small model given free whitespace can
  emit newlines until max_tokens. A schema's own ``x-guidance`` options override these.
- ``json_object``: any JSON object (OpenAI's ``response_format: {"type": "json_object"}``); no source.
- ``regex``: ``source`` is a regular expression (Rust ``regex`` syntax) the whole output must match.
- ``lark``: ``source`` is a grammar in llguidance's Lark dialect (``%json {...}`` embeds a JSON schema;
  ``[lazy]`` rules give free text with constrained segments, as tool calls use).

A spec that does not compile raises ``GrammarError`` naming what is wrong, so a bad schema is refused
when the request arrives (HTTP 400 / INVALID_ARGUMENT), never inside an engine step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import llguidance

KINDS = ("json_schema", "json_object", "regex", "lark")
MAX_GRAMMAR_CHARS = 256 * 1024  # a schema or grammar this long is a mistake or an attack, not a format
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = '{"type": "object"}'


class GrammarError(ValueError):
    """A grammar that cannot be used; the message says why (the library's own words)."""


@dataclass(frozen=True)
class GrammarSpec:
    kind: str
    source: str = ""
    # The llguidance grammar the source compiles to: derived, so equal specs compare equal.
    compiled: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"grammar kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.source, str):
            raise GrammarError(f"a grammar's source must be a string, got {type(self.source).__name__}")
        if len(self.source) > MAX_GRAMMAR_CHARS:
            raise GrammarError(f"the grammar is {len(self.source)} characters; at most {MAX_GRAMMAR_CHARS}")
        if self.kind == "json_object" and self.source:
            raise GrammarError("a json_object grammar takes no source")
        if self.kind != "json_object" and not self.source:
            raise GrammarError(f"a {self.kind} grammar needs a source")
        object.__setattr__(self, "compiled", _compile(self.kind, self.source))

    @classmethod
    def json_schema(cls, schema: dict | bool) -> GrammarSpec:
        return cls("json_schema", json.dumps(schema, ensure_ascii=False, separators=(",", ":")))


def _compile(kind: str, source: str) -> str:
    try:
        if kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(source, defaults=JSON_OPTIONS)
        elif kind == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(ANY_JSON_OBJECT, defaults=JSON_OPTIONS)
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(source)
        else:
            grammar = llguidance.LLMatcher.grammar_from_lark(source)
        problem = llguidance.LLMatcher.validate_grammar(grammar, None)
    except Exception as exc:  # noqa: BLE001 - the library's refusal (not JSON, not an object...), whatever its type
        raise GrammarError(f"invalid {kind}: {_first_line(str(exc))}") from None
    if problem:
        raise GrammarError(f"invalid {kind}: {_first_line(problem)}")
    return grammar


def _first_line(message: str, limit: int = 300) -> str:
    """The library's message without its parser-state dump (it can quote the whole grammar)."""
    text = " ".join(line.strip() for line in message.strip().splitlines()[:4] if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."
