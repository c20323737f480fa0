"""Tool calls: tools into the prompt, `<tool_call>` output into `tool_calls`.

A checkpoint whose chat template has a tools section renders the tools, the tool results and earlier
calls itself (model/template_tools.py). Qwen2.5-VL's template has neither a tools section nor a `tool`
role, so for it the messages are rendered here into what Qwen2.5's own template (the text models')
renders, the hermes format: a `# Tools` block in the system turn with each function's signature inside
`<tools></tools>`, the model's calls as `<tool_call>{"name", "arguments"}</tool_call>` in its turn, and
tool results as a user turn of `<tool_response>` blocks. Either way the texts are the client's text:
the processor keeps a control token written in a tool's description or result plain text.

`tool_choice`: "none" renders the tools but leaves the output as text; "auto" parses well-formed calls
out of the output (a malformed one stays text); "required" and a named function are enforced by the
grammar engine (a Lark grammar of one call, or of several when parallel_tool_calls, each call's JSON
that function's name and an `arguments` object of its parameter schema).

`tool_request` applies it to every request the Coordinator prepares (from the server, the driver API or a
request file), whose records then carry `tool_calls`; the server parses the same text (cluster/serve.py).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from actors.errors import RequestError

DEFAULT_SYSTEM = "You are a helpful assistant."
TOOLS_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
CALL_PROMPT = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call>"
)
OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"


class ToolError(RequestError):
    """A bad `tools`, `tool_choice` or tool message (HTTP 400); `param` names the field."""


def functions(tools: list[dict]) -> dict[str, dict]:
    """name -> function object ({"name", "description", "parameters"}) of OpenAI `tools` (ToolError naming it)."""
    out: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ToolError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", f"tools[{i}]")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ToolError(f"tools[{i}].function.name must be a non-empty string", f"tools[{i}].function.name")
        if not isinstance(function.get("parameters", {}), dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object", f"tools[{i}].function")
        out[name] = function
    return out


def chosen_function(tool_choice: Any, known: dict[str, dict]) -> str | None:
    """The function a named tool_choice asks for (ToolError when it is not one of `tools`), else None."""
    if tool_choice in (None, "none", "auto", "required"):
        return None
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise ToolError(
            "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name'}}",
            "tool_choice",
        )
    if name not in known:
        raise ToolError(f"tool_choice names function {name!r}, which is not in tools ({sorted(known)})", "tool_choice")
    return name


def render_messages(messages: list[dict], known: dict[str, dict]) -> list[dict]:
    """OpenAI messages with tools -> plain system/user/assistant messages in the hermes format."""
    out: list[dict] = []
    rest = messages
    system = DEFAULT_SYSTEM
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        system, rest = messages[0]["content"], messages[1:]
    if known:
        signatures = "".join("\n" + json.dumps({"type": "function", "function": f}) for f in known.values())
        system += TOOLS_PROMPT + signatures + CALL_PROMPT
    out.append({"role": "system", "content": system})
    for message in rest:
        role = message.get("role")
        if role == "tool":
            block = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
            if out[-1].get("role") == "user" and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "tool_results": True})
            continue
        if role == "assistant" and message.get("tool_calls"):
            text = message.get("content") or ""
            for call in message["tool_calls"]:
                function = call.get("function", {})
                arguments = function.get("arguments")
                arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
                body = json.dumps({"name": function.get("name"), "arguments": arguments})
                text += ("\n" if text else "") + f"<tool_call>\n{body}\n</tool_call>"
            out.append({"role": "assistant", "content": text})
            continue
        out.append(message)
    return [{k: v for k, v in m.items() if k != "tool_results"} for m in out]


def call_grammar(known: dict[str, dict], only: str | None, parallel: bool, tag_tokens: bool = False) -> str:
    """A Lark grammar (llguidance's dialect) of the calls `required` or a named tool_choice allows. With
    `tag_tokens` (the tokenizer has `<tool_call>` and `</tool_call>` as tokens, as Qwen2.5's has), the tags
    are those tokens, which the model writes, rather than their characters spelled in other tokens."""
    names = [only] if only is not None else list(known)
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": name},
                "arguments": known[name].get("parameters") or {"type": "object", "properties": {}},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name in names
    ]
    schema = {"anyOf": options, "x-guidance": {"whitespace_flexible": False}}
    repeat = ' ("\\n" call)*' if parallel and only is None else ""  # calls one per line, as the template renders them
    call = '<tool_call> "\\n" body "\\n" </tool_call>' if tag_tokens else '"<tool_call>\\n" body "\\n</tool_call>"'
    return f"start: call{repeat}\ncall: {call}\nbody: %json {json.dumps(schema)}\n"


def parse_calls(text: str, known: dict[str, dict]) -> tuple[str | None, list[dict]]:
    """Model output -> (the text outside the calls or None, OpenAI tool_calls). A call is `<tool_call>`, one
    JSON object (a `</tool_call>` inside its strings is text of the call), then `</tool_call>`; one whose JSON
    does not parse, names no known function or has no object of arguments is left in the text."""
    calls: list[dict] = []
    kept: list[str] = []
    last = 0
    start = text.find(OPEN_TAG)
    while start >= 0:
        block = _call_block(text, start)
        if block is None:
            start = text.find(OPEN_TAG, start + len(OPEN_TAG))
            continue
        body, end = block
        call = _known_call(body, known)
        if call is not None:
            kept.append(text[last:start])
            last = end
            name, arguments = call
            calls.append(
                {"id": _call_id(), "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
            )
        start = text.find(OPEN_TAG, end)
    kept.append(text[last:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


_SPACE = re.compile(r"\s*")
_DECODER = json.JSONDecoder()


def _known_call(body: Any, known: dict[str, dict]) -> tuple[str, dict] | None:
    """(name, arguments) of a call's JSON that names a known function and has an object of arguments, else None."""
    name = body.get("name") if isinstance(body, dict) else None
    arguments = body.get("arguments") if isinstance(body, dict) else None
    return (name, arguments) if isinstance(name, str) and name in known and isinstance(arguments, dict) else None


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call_block(text: str, start: int) -> tuple[dict, int] | None:
    """(the JSON object, the end of the block) of the `<tool_call>` block at `start`, or None when what
    follows the tag is not one JSON object then `</tool_call>`."""
    at = _SPACE.match(text, start + len(OPEN_TAG)).end()
    try:
        body, end = _DECODER.raw_decode(text, at)
    except json.JSONDecodeError:
        return None
    end = _SPACE.match(text, end).end()
    if not isinstance(body, dict) or not text.startswith(CLOSE_TAG, end):
        return None
    return body, end + len(CLOSE_TAG)


JSON_SPACE = " \t\n\r"
JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
# A streamable call's JSON up to its arguments object, JSON whitespace allowed between the parts.
CALL_HEAD = ("{", '"name"', ":", JSON_STRING, ",", '"arguments"', ":", "{")


def _call_head(text: str, pos: int) -> tuple[bool | None, str, int]:
    """Whether text[pos:] begins `{"name": "NAME", "arguments": {`: (True, NAME, where the arguments object
    begins) once it does; (None, "", pos) while the text so far may still become it; (False, "", pos) when
    it cannot."""
    name = ""
    for want in CALL_HEAD:
        while pos < len(text) and text[pos] in JSON_SPACE:
            pos += 1
        if pos == len(text):
            return None, "", pos
        if isinstance(want, str):
            if not text.startswith(want, pos):
                return (None if want.startswith(text[pos:]) else False), "", pos
            pos += len(want)
            continue
        match = want.match(text, pos)
        if match is None:  # an open string waits for its closing quote
            return (None if text[pos] == '"' else False), "", pos
        try:
            name = json.loads(match.group())
        except ValueError:  # a bad escape or a raw control character
            return False, "", pos
        pos = match.end()
    return True, name, pos - 1


class _Brackets:
    """A string-aware bracket-depth scan (not a JSON parser) of a call's JSON as it grows: where its object
    closes, where the first value nested in it closes, and the first character no JSON object has there."""

    def __init__(self, pos: int) -> None:
        self.pos = pos  # the next character to scan
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.inner_end: int | None = None  # just past the first nested value
        self.end: int | None = None  # just past the object
        self.stray: int | None = None  # text before the object, or a `<` outside strings

    def scan(self, text: str) -> None:
        while self.pos < len(text) and self.end is None and self.stray is None:
            c = text[self.pos]
            self.pos += 1
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif self.depth == 0:
                if c == "{":
                    self.depth = 1
                elif c not in JSON_SPACE:
                    self.stray = self.pos - 1
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 1 and self.inner_end is None:
                    self.inner_end = self.pos
                elif self.depth == 0:
                    self.end = self.pos
            elif c == "<":
                self.stray = self.pos - 1


@dataclass
class _Block:
    """One `<tool_call>` block of a streamed answer, as far as it has come (offsets into ToolStream.text)."""

    start: int  # its `<tool_call>`
    body: int  # just past the tag
    brackets: _Brackets
    head: bool | None = None  # streamed (name first, a known function), held, or not yet known
    name: str = ""
    index: int = -1  # its delta.tool_calls index once streamed
    args: int = 0  # where its arguments begin
    sent: int = 0  # its arguments sent up to here
    seek: int = 0  # where to look for its `</tool_call>` once its text is no call's JSON
    end: int | None = None  # just past its `</tool_call>`
    shaped: bool = False  # one JSON object, then the tag


def _call_item(index: int, name: str) -> dict:
    """The first delta.tool_calls item of a call: its index, id, type and name."""
    return {
        "index": index,
        "id": _call_id(),
        "type": "function",
        "function": {"name": name, "arguments": ""},
    }


def _same_json(text: str, value: Any) -> bool:
    try:
        return json.dumps(json.loads(text)) == json.dumps(value)
    except ValueError:
        return False


class ToolStream:
    """A streamed answer with tools, its calls streamed as OpenAI streams them: `feed` takes each delta of
    the engine's text and returns the content to send now and the `delta.tool_calls` items to send now.

    Text before the first `<tool_call>` streams as it comes. A call whose JSON begins `{"name": NAME,
    "arguments": {` with NAME a known function (the hermes format, and the only form the grammar of
    `required` or a named function allows) is streamed: one item with its index, id, type and name
    (arguments "") once that head is whole, then items of the raw arguments text as it grows, up to the
    arguments' closing brace (found by a string-aware bracket-depth scan); the pieces concatenated are the
    arguments' JSON text. Any other block (arguments first, say) is held and, when its `</tool_call>` comes,
    sent whole (head, then json.dumps of its arguments) if it parses to a known function's name and an object
    of arguments, else kept as text. Indexes follow the calls' order in the text; only a call's first item
    carries its id.

    When a streamed block ends it is verified whole: one JSON object whose name is the one sent and whose
    arguments equal the pieces' JSON, then `</tool_call>`. Items sent cannot be taken back, so a streamed
    call that fails (an `auto` call whose JSON proves malformed, or any call cut by max_tokens) stays with
    the client as sent: its id, name and the pieces so far, which may not parse. Its text is not repeated as
    content, and the choice's finish_reason is then the engine's ("stop" or "length") instead of
    "tool_calls": the client's sign that a call is not whole. Text after the first `<tool_call>` that no call
    took (between and after calls, blocks kept as text) goes out as content at `finish`: all of it when no
    call was sent, else only when it is more than whitespace.
    """

    def __init__(self, known: dict[str, dict]) -> None:
        self.known = known
        self.text = ""  # before any call, a possible `<tool_call>`'s start; then the answer from the first on
        self.calling = False
        self.block: _Block | None = None  # the call under way
        self.mark = 0  # the end of the last block
        self.seek = 0  # where to look for the next `<tool_call>`
        self.outside: list[str] = []  # the text after the first `<tool_call>` that no call took
        self.sent = 0  # calls sent
        self.whole = True  # every streamed call verified

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """A delta of the engine's text -> (the part to stream now as content, delta.tool_calls items)."""
        if self.calling:
            self.text += text
            return "", self._advance()
        text = self.text + text
        start = text.find(OPEN_TAG)
        if start >= 0:
            self.calling, self.text = True, text[start:]
            return text[:start], self._advance()
        keep = next((n for n in range(len(OPEN_TAG) - 1, 0, -1) if text.endswith(OPEN_TAG[:n])), 0)
        self.text = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], []

    def finish(self, reason: str) -> tuple[str, str]:
        """(text still to stream as content, the choice's finish_reason) once the answer ended; `reason` is
        the engine's."""
        if not self.calling:
            return self.text, reason
        block = self.block
        if block is None:
            self.outside.append(self.text[self.mark :])
        elif block.index >= 0:
            self.whole = False  # the answer ended inside a streamed call
        else:
            self.outside.append(self.text[block.start :])
        rest = "".join(self.outside)
        if not self.sent:
            return rest, reason
        return (rest if rest.strip() else ""), ("tool_calls" if self.whole else reason)

    def _advance(self) -> list[dict]:
        """The items the text so far allows, block after block."""
        items: list[dict] = []
        while True:
            if self.block is None:
                start = self.text.find(OPEN_TAG, self.seek)
                if start < 0:
                    self.seek = max(self.seek, len(self.text) - len(OPEN_TAG) + 1)
                    return items
                self.outside.append(self.text[self.mark : start])
                body = start + len(OPEN_TAG)
                self.block = _Block(start, body, _Brackets(body))
            block = self.block
            items += self._stream(block)
            if block.end is None:
                return items
            items += self._close(block)
            self.block, self.mark, self.seek = None, block.end, block.end

    def _stream(self, block: _Block) -> list[dict]:
        """A streamed call's head once known and its new arguments text; finds where the block ends."""
        items: list[dict] = []
        text, brackets = self.text, block.brackets
        if block.head is None:
            head, name, args = _call_head(text, block.body)
            block.head = None if head is None else head and name in self.known
            if block.head:
                block.name, block.index, block.args, block.sent = name, self.sent, args, args
                self.sent += 1
                items.append(_call_item(block.index, name))
        brackets.scan(text)
        if block.head:
            end = next(p for p in (brackets.inner_end, brackets.stray, brackets.pos) if p is not None)
            if end > block.sent:
                items.append({"index": block.index, "function": {"arguments": text[block.sent : end]}})
                block.sent = end
        if brackets.stray is None and brackets.end is not None:
            tail = brackets.end
            while tail < len(text) and text[tail] in JSON_SPACE:
                tail += 1
            if text.startswith(CLOSE_TAG, tail):
                block.end, block.shaped = tail + len(CLOSE_TAG), True
            elif not CLOSE_TAG.startswith(text[tail:]):
                brackets.stray = tail
        if brackets.stray is not None and block.end is None:  # no call: the block ends at the next tag
            close = text.find(CLOSE_TAG, max(brackets.stray, block.seek))
            if close >= 0:
                block.end = close + len(CLOSE_TAG)
            else:
                block.seek = max(brackets.stray, len(text) - len(CLOSE_TAG) + 1)
        return items

    def _close(self, block: _Block) -> list[dict]:
        """A block that ended: verify a streamed call; send a held one whole if it is a call, else keep its text."""
        body: Any = None
        if block.shaped:
            try:
                body = json.loads(self.text[block.body : block.brackets.end])
            except ValueError:
                body = None
        call = _known_call(body, self.known)
        if block.index >= 0:
            if not (call and call[0] == block.name and _same_json(self.text[block.args : block.sent], call[1])):
                self.whole = False
            return []
        if call is None:
            self.outside.append(self.text[block.start : block.end])
            return []
        name, arguments = call
        index, self.sent = self.sent, self.sent + 1
        return [_call_item(index, name), {"index": index, "function": {"arguments": json.dumps(arguments)}}]


def tool_request(
    request: dict, template_tools: bool = False, tag_tokens: bool = False
) -> tuple[dict, dict[str, dict] | None]:
    """A Coordinator request with `tools` -> (the request with its messages rendered in the hermes format,
    or, when the checkpoint's template renders tools (`template_tools`), its messages and `tools` as given;
    and, for `required` or a named function, the grammar of its calls as structured_outputs; the functions
    whose calls its record parses, None when tool_choice is 'none' or there are no tools). `tag_tokens`: as
    for `call_grammar`. RequestError naming the field."""
    tools, choice = request.get("tools"), request.get("tool_choice")
    messages = request.get("messages")
    has_tool_turns = isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages
    )
    if not tools and not has_tool_turns:
        if choice not in (None, "none", "auto"):
            raise ToolError(f"tool_choice={choice!r} needs tools", "tool_choice")
        return request, None
    known = functions(tools or [])
    only = chosen_function(choice, known)
    out = {k: v for k, v in request.items() if k not in ("tools", "tool_choice", "parallel_tool_calls")}
    if messages is None:  # prompt and images: one user turn, as the builder makes it
        parts = [{"type": "image", "image": image} for image in request.get("images") or []]
        messages = [{"role": "user", "content": [*parts, {"type": "text", "text": request.get("prompt") or ""}]}]
        out.pop("prompt", None)
        out.pop("images", None)
    if template_tools:
        out["messages"] = messages
        if tools:
            out["tools"] = [{"type": "function", "function": function} for function in known.values()]
    else:
        out["messages"] = render_messages(messages, known)
    if choice not in (None, "none", "auto"):
        if not known:
            raise ToolError(f"tool_choice={choice!r} needs tools", "tool_choice")
        if request.get("response_format") is not None or request.get("structured_outputs") is not None:
            raise ToolError(
                "tool_choice 'required' or a named function cannot go with a response format", "tool_choice"
            )
        out["structured_outputs"] = {
            "grammar": call_grammar(known, only, request.get("parallel_tool_calls") is not False, tag_tokens)
        }
    return out, (known if known and choice != "none" else None)
