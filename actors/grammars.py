"""Structured outputs: a request's `response_format` or `structured_outputs` -> a checked llguidance grammar.

The grammar engine is llguidance (docs/serving.md, "Structured outputs", says why). A request asks
for at most one of:

- `response_format` as OpenAI defines it: {"type": "text"} (no constraint), {"type": "json_object"}
  (any JSON object) or {"type": "json_schema", "json_schema": {"name", "schema", "strict"}};
- `structured_outputs` as vLLM's extra field: exactly one of {"json": schema}, {"regex": pattern},
  {"choice": [strings]} or {"grammar": a Lark grammar (llguidance's dialect)}.

JSON is generated compact: the grammar allows no whitespace between tokens of JSON (llguidance's
`whitespace_flexible: false`, forced over any `x-guidance` in the schema), so a model cannot fill
max_tokens with spaces. Each distinct grammar is checked once against the tokenizer, on a thread with a
deadline (`grammar_compile_timeout_s`), and the verdict kept in a bounded cache (`grammar_cache_size`
entries, least recently used first out); the ranks compile their matchers from the same text
(model/grammar.py). A grammar the engine rejects, or one it cannot check in time, is a RequestError (400)
naming the field and the engine's reason (an unimplemented keyword is named there).
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from typing import Any

import llguidance
import llguidance.hf

from actors.errors import RequestError

JSON_OPTIONS = {"whitespace_flexible": False, "whitespace_pattern": None}  # compact JSON, no free whitespace
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
STRUCTURED_OUTPUT_KINDS = ("json", "regex", "choice", "grammar")


def _json_grammar(schema: Any, param: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise RequestError(f"'{param}' is not valid JSON: {e}", param) from None
    if not isinstance(schema, dict):
        raise RequestError(f"'{param}' must be a JSON schema object, got {schema!r}", param)
    return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)


def _response_format(value: dict) -> tuple[str, str] | None:
    kind = value.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        raise RequestError(
            f"'response_format.type' must be one of {', '.join(RESPONSE_FORMAT_TYPES)}, got {kind!r}",
            "response_format.type",
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return "response_format", _json_grammar({"type": "object"}, "response_format")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise RequestError(
            "'response_format.json_schema' must be an object with 'name' and 'schema'", "response_format.json_schema"
        )
    param = "response_format.json_schema.schema"
    return param, _json_grammar(spec.get("schema", {}), param)


def _structured_outputs(value: dict) -> tuple[str, str]:
    kinds = [k for k in STRUCTURED_OUTPUT_KINDS if value.get(k) is not None]
    unknown = [k for k in value if k not in STRUCTURED_OUTPUT_KINDS]
    if unknown or len(kinds) != 1:
        raise RequestError(
            f"'structured_outputs' takes exactly one of {', '.join(STRUCTURED_OUTPUT_KINDS)}, got {sorted(value)}",
            "structured_outputs",
        )
    kind = kinds[0]
    param, spec = f"structured_outputs.{kind}", value[kind]
    if kind == "json":
        return param, _json_grammar(spec, param)
    if kind == "choice":
        if not isinstance(spec, list) or not spec or not all(isinstance(c, str) and c for c in spec):
            raise RequestError(f"'{param}' must be a non-empty list of non-empty strings, got {spec!r}", param)
        alternatives = " | ".join(json.dumps(c) for c in dict.fromkeys(spec))  # Lark string literals
        return param, llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
    if not isinstance(spec, str) or not spec:
        raise RequestError(f"'{param}' must be a non-empty string, got {spec!r}", param)
    if kind == "regex":
        return param, llguidance.LLMatcher.grammar_from_regex(spec)
    return param, llguidance.LLMatcher.grammar_from_lark(spec)


def grammar_spec(request: dict) -> tuple[str, str] | None:
    """(the field it came from, the llguidance grammar text) of a request, or None when unconstrained.

    Raises RequestError naming the field for a malformed value or when both fields are set.
    """
    response_format, structured = request.get("response_format"), request.get("structured_outputs")
    if response_format is not None and structured is not None:
        raise RequestError("set 'response_format' or 'structured_outputs', not both", "structured_outputs")
    if structured is not None:
        return _structured_outputs(structured)
    if response_format is not None:
        return _response_format(response_format)
    return None


class GrammarCompiler:
    """Checks grammars against the tokenizer once each, off the event loop, within a deadline."""

    def __init__(self, hf_tokenizer: Any, cache_size: int = 256, timeout_s: float = 10.0) -> None:
        self.hf_tokenizer = hf_tokenizer
        self.cache_size = cache_size
        self.timeout_s = timeout_s
        self.tokenizer: llguidance.LLTokenizer | None = None
        self.verdicts: OrderedDict[str, str | None] = OrderedDict()  # grammar -> the engine's error, or None
        self.compiled = 0  # grammars checked (cache misses), for tests and metrics

    async def grammar(self, request: dict) -> str | None:
        """The request's checked grammar text, or None when it asks for no structure (RequestError when the
        engine rejects it or cannot check it within `timeout_s`)."""
        spec = grammar_spec(request)
        if spec is None:
            return None
        param, grammar = spec
        if grammar not in self.verdicts:
            if self.tokenizer is None:  # converted once (about a second for Qwen's tokenizer)
                self.tokenizer = await asyncio.to_thread(llguidance.hf.from_tokenizer, self.hf_tokenizer)
            try:
                verdict = await asyncio.wait_for(asyncio.to_thread(self._check, grammar), self.timeout_s)
            except TimeoutError:
                raise RequestError(
                    f"'{param}': the grammar did not compile within serve.grammar_compile_timeout_s={self.timeout_s:g}",
                    param,
                ) from None
            self.compiled += 1
            self.verdicts[grammar] = verdict
            if len(self.verdicts) > self.cache_size:
                self.verdicts.popitem(last=False)
        self.verdicts.move_to_end(grammar)
        error = self.verdicts[grammar]
        if error is not None:
            raise RequestError(f"'{param}' is rejected by the grammar engine: {error}", param)
        return grammar

    def _check(self, grammar: str) -> str | None:
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        return messages[0] if failed else None
