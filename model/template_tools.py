"""Tools rendered by the checkpoint's own chat template, with their texts kept as plain text.

A template with a tools section (Qwen2.5's text models', Qwen3's, ...) renders `tools` and the calls of
earlier assistant turns itself, mostly through `tojson`. Their strings are the client's text, so a
control token written in them must stay plain characters, as in any other user text (model/processor.py
renders templates around numbered slots). A string that holds an added token's text is therefore
replaced by a JSON slot before rendering: private-use characters around its index with a `"` inside.
`tojson` escapes that quote and nothing else of the slot, so after rendering the slot says how the
template wrote the string: escaped (`\\"`) means inside a JSON text, and it is filled with the string's
JSON escaping (what `tojson` would have written); bare means as is. Strings without an added token are
left alone: they render exactly as the template renders them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import jinja2
import jinja2.meta

_JSON_SLOT = '\ue002{}"\ue003'
JSON_SLOT_RE = re.compile('\ue002(\\d+)(\\\\?)"\ue003')


def template_has_tools(template: str) -> bool:
    """Whether a chat template reads a `tools` variable (renders a tools section)."""
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateSyntaxError:
        return False


def with_slots(value: Any, needs_slot: re.Pattern[str], strings: list[str]) -> Any:
    """`value` (JSON data) with every string, key or value, that `needs_slot` finds a match in replaced
    by a JSON slot; the strings are appended to `strings` in slot order."""
    if isinstance(value, str):
        if not needs_slot.search(value):
            return value
        strings.append(value)
        return _JSON_SLOT.format(len(strings) - 1)
    if isinstance(value, dict):
        return {with_slots(k, needs_slot, strings): with_slots(v, needs_slot, strings) for k, v in value.items()}
    if isinstance(value, list):
        return [with_slots(v, needs_slot, strings) for v in value]
    return value


def fill_slots(rendered: str, strings: list[str], text_slot: Callable[[str], str]) -> str:
    """The rendered template with each JSON slot replaced by `text_slot` of its string (the processor's slot
    of a user text), JSON-escaped where the template wrote the slot inside a JSON text."""

    def fill(match: re.Match[str]) -> str:
        text = strings[int(match.group(1))]
        return text_slot(json.dumps(text, ensure_ascii=False)[1:-1] if match.group(2) else text)

    return JSON_SLOT_RE.sub(fill, rendered)
