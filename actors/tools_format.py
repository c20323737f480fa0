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
CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
OPEN_TAG = "<tool_call>"


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
    """Model output -> (the text outside the calls or None, OpenAI tool_calls). A call whose JSON does not
    parse, names no known function or has no object of arguments is left in the text."""
    calls: list[dict] = []
    kept: list[str] = []
    last = 0
    for match in CALL.finditer(text):
        try:
            body = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(body, dict) or body.get("name") not in known or not isinstance(body.get("arguments"), dict):
            continue
        kept.append(text[last : match.start()])
        last = match.end()
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": body["name"], "arguments": json.dumps(body["arguments"])},
            }
        )
    kept.append(text[last:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


class ToolStream:
    """A streamed answer with tools: text deltas pass on until a `<tool_call>` begins; from there the text
    is held and parsed at the end (`finish`), whose calls go out as `delta.tool_calls`."""

    def __init__(self, known: dict[str, dict]) -> None:
        self.known = known
        self.held = ""  # from the first character that may begin a call
        self.calling = False

    def feed(self, text: str) -> str:
        """A delta of the engine's text -> the part to stream now as content."""
        if self.calling:
            self.held += text
            return ""
        text = self.held + text
        start = text.find(OPEN_TAG)
        if start >= 0:
            self.calling, self.held = True, text[start:]
            return text[:start]
        keep = next((n for n in range(len(OPEN_TAG) - 1, 0, -1) if text.endswith(OPEN_TAG[:n])), 0)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def finish(self) -> tuple[str, list[dict]]:
        """(text still to stream as content, tool_calls) once the answer ended."""
        if not self.calling:
            return self.held, []
        content, calls = parse_calls(self.held, self.known)
        return (content or "") if calls else self.held, calls


def call_deltas(calls: list[dict]) -> list[dict]:
    """OpenAI's streamed `delta.tool_calls` items of parsed calls: per call, its id and name, then its arguments."""
    out = []
    for index, call in enumerate(calls):
        head = {"index": index, "id": call["id"], "type": "function"}
        out.append({**head, "function": {"name": call["function"]["name"], "arguments": ""}})
        out.append({"index": index, "function": {"arguments": call["function"]["arguments"]}})
    return out


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
