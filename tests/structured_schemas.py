"""Seeded random JSON schemas for the structured-output property tests: nested objects, bounded arrays,
enums, bounded numbers, strings with lengths or patterns, required and optional fields.

Every string, array and number is bounded (numbers by a range and a multipleOf, else a model may write
fraction digits forever), so a valid output has a bounded length: a request constrained by one of them
ends (`stop`) well within its max_tokens.
"""

from __future__ import annotations

import random
from typing import Any

PATTERNS = ["^[a-z]{1,6}$", "^[0-9]{2,4}$", "^[A-Z][a-z]{0,4}$", "^(yes|no|maybe)$", "^[a-f0-9]{3}-[a-f0-9]{2}$"]
WORDS = ["red", "green", "blue", "cat", "dog", "x", "long word", "é"]


def leaf(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["string", "pattern", "enum", "integer", "number", "boolean", "null", "int_enum"])
    if kind == "string":
        low = rng.randint(0, 3)
        return {"type": "string", "minLength": low, "maxLength": low + rng.randint(0, 8)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(PATTERNS)}
    if kind == "enum":
        return {"type": "string", "enum": rng.sample(WORDS, rng.randint(1, 4))}
    if kind == "int_enum":
        return {"enum": rng.sample([0, 1, 7, -3, 42, 1000], rng.randint(1, 3))}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "number":
        low = rng.randint(-10, 10)  # multipleOf bounds the fraction's digits (binary fractions: exact checks)
        step = rng.choice([0.5, 0.25])
        return {"type": "number", "minimum": low, "maximum": low + rng.randint(1, 100), "multipleOf": step}
    return {"type": kind}


def schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """One schema; objects and arrays nest up to depth 2."""
    roll = rng.random()
    if depth < 2 and roll < 0.25:
        low = rng.randint(0, 2)
        return {"type": "array", "items": schema(rng, depth + 1), "minItems": low, "maxItems": low + rng.randint(0, 2)}
    if depth < 2 and roll < 0.7:
        names = rng.sample(["id", "name", "size", "tags", "ok", "kind", "items", "note"], rng.randint(1, 4))
        properties = {n: schema(rng, depth + 1) for n in names}
        required = [n for n in names if rng.random() < 0.6]
        return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return leaf(rng)


def object_schemas(count: int, seed: int) -> list[dict[str, Any]]:
    """`count` schemas whose top level is an object (as response_format json_schema asks)."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        s = schema(rng)
        if s.get("type") == "object":
            out.append(s)
    return out
