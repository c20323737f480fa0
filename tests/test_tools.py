"""Tool calls (cluster/tools_format.py): hermes rendering, parsing, streaming, checks, and `required` /
named calls enforced by the grammar engine on the tiny random-weight checkpoint (always valid calls)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import jsonschema
import pytest

from actors.errors import RequestError
from actors.grammars import GrammarCompiler
from actors.request_fields import check_request_fields
from actors.requests import RequestState
from actors.tools_format import ToolStream, call_grammar, functions, parse_calls, tool_request
from cluster.openai_api import APIError, engine_request, parse_request
from model.processor import PromptBuilder
from model.runner import ModelRunner
from model.sampling import SamplingParams
from tests.structured_schemas import object_schemas

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city <|im_end|> (a control token in a description stays text)",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def _body(**fields: object) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "Weather in Paris?"}], **fields}).encode()


def test_tools_render_in_hermes_format_through_text_slots(tiny_checkpoint: Path) -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny <|im_start|>"},
    ]
    builder = PromptBuilder.from_pretrained(tiny_checkpoint)
    body = parse_request(json.dumps({"messages": messages, "tools": [WEATHER]}).encode())
    request, _ = tool_request(engine_request(body, "r"), builder.template_tools)
    roles = [m["role"] for m in request["messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    system = request["messages"][0]["content"]
    assert system.startswith("You are a helpful assistant.\n\n# Tools") and '"name": "get_weather"' in system
    assert (
        request["messages"][2]["content"]
        == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    assert request["messages"][3]["content"] == "<tool_response>\nsunny <|im_start|>\n</tool_response>"
    ids = builder.build(request).input_ids
    assert "sunny <|im_start|>" in builder.tokenizer.decode(ids)
    # 4 turns and the generation prompt open with the control token; the one in the tool result is plain text
    assert ids.count(builder.tokenizer.convert_tokens_to_ids("<|im_start|>")) == 5


def test_parse_calls_and_stream() -> None:
    known = functions([WEATHER, TIME])
    text = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    )
    content, calls = parse_calls(text, known)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"} and calls[0]["type"] == "function"
    bad = '<tool_call>{"name": "nope", "arguments": {}}</tool_call> and <tool_call>{not json</tool_call>'
    assert parse_calls(bad, known) == (bad, [])
    odd = '<tool_call>{"name": ["get_time"], "arguments": {}}</tool_call> <tool_call>{"name": "get_time"}</tool_call>'
    assert parse_calls(odd, known) == (odd, [])  # a name that is not a string, no arguments: text
    # A `</tool_call>` inside a string is text of the call, not its end.
    inside = '<tool_call>{"name": "get_weather", "arguments": {"city": "a</tool_call>b"}}</tool_call> done'
    content, [call] = parse_calls(inside, known)
    assert content == "done" and json.loads(call["function"]["arguments"]) == {"city": "a</tool_call>b"}
    stream = ToolStream(known)  # tests/test_tool_stream.py tests it further
    fed = [stream.feed(text[i : i + 5]) for i in range(0, len(text), 5)]
    assert "".join(content for content, _ in fed) == "Let me check.\n"
    items = [item for _, batch in fed for item in batch]
    assert stream.finish("stop") == ("", "tool_calls")
    for index, call in enumerate(calls):
        mine = [item for item in items if item["index"] == index]
        assert mine[0]["function"] == {"name": call["function"]["name"], "arguments": ""}
        pieces = "".join(item["function"]["arguments"] for item in mine)
        assert json.loads(pieces) == json.loads(call["function"]["arguments"])
    assert sum(item["index"] == 0 for item in items) > 2  # the first call's arguments came in pieces
    plain = ToolStream(known)
    assert plain.feed("a <tool") == ("a ", []) and plain.feed("s> b") == ("<tools> b", [])
    assert plain.finish("stop") == ("", "stop")


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "fly"}}},
            "tool_choice",
            "not in tools",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name", "non-empty"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0]", "type"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            "response format",
        ),
        ({"messages": [{"role": "assistant", "content": None}]}, "messages[0].content", "required"),
    ],
)
def test_bad_tool_fields_name_the_field(fields: dict, param: str, message: str) -> None:
    with pytest.raises(APIError) as info:
        parse_request(_body(**fields))
    assert info.value.status == 400 and info.value.param == param and message in info.value.message


def _without_tag_tokens(checkpoint: Path, out: Path) -> Path:
    """A copy of the checkpoint whose tokenizer has no `<tool_call>` tokens (the tags are spelled in text)."""
    shutil.copytree(checkpoint, out)
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if "tool_call" not in t["content"]]
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((out / "tokenizer_config.json").read_text())
    added = config["added_tokens_decoder"]
    config["added_tokens_decoder"] = {k: v for k, v in added.items() if "tool_call" not in v["content"]}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("tags", ["tokens", "spelled"])
def test_required_and_named_calls_are_always_valid(tiny_checkpoint: Path, tmp_path: Path, tags: str) -> None:
    """Random parameter schemas at temperature 0 and 1: every output is one or more valid calls, with the
    tags as the tokenizer's `<tool_call>` tokens where it has them (Qwen2.5's), else spelled."""
    checkpoint = tiny_checkpoint if tags == "tokens" else _without_tag_tokens(tiny_checkpoint, tmp_path / "ckpt")
    builder = PromptBuilder.from_pretrained(checkpoint)
    assert builder.tool_call_tokens == (tags == "tokens")
    tag_ids = {builder.tokenizer.convert_tokens_to_ids(t) for t in ("<tool_call>", "</tool_call>")}
    tools = [
        {"type": "function", "function": {"name": f"f{i}", "parameters": s}} for i, s in enumerate(object_schemas(6, 4))
    ]
    known = functions(tools)
    # (tool_choice, parallel_tool_calls): one call, one or more, and one call of a named function
    cases = [("required", False), ("required", True), ({"type": "function", "function": {"name": "f2"}}, True)]
    requests = []
    for choice, parallel in cases:
        body = parse_request(_body(tools=tools, tool_choice=choice, parallel_tool_calls=parallel))
        request, _ = tool_request(engine_request(body, "r"), builder.template_tools, builder.tool_call_tokens)
        requests.append(request)
    compiler = GrammarCompiler(builder.tokenizer)

    async def grammars() -> list[str]:
        return [await compiler.grammar(r) for r in requests]

    compiled = asyncio.run(grammars())
    prepared = builder.build({"id": "r", "prompt": "Call a tool."})  # the grammar, not the prompt, makes the calls
    runner = ModelRunner(checkpoint, max_batch_size=8, max_seq_len=512)
    runs = [
        (case, SamplingParams(max_new_tokens=250, temperature=t, seed=0, grammar=g))
        for case, g in zip(cases, compiled)
        for t in (0.0, 1.0)
    ]
    results = runner.generate([prepared] * len(runs), [p for _, p in runs], builder.eos_token_ids)
    for ((choice, parallel), _), result in zip(runs, results):
        text = builder.decode(result.output_token_ids)
        one = not parallel or choice != "required"
        if result.finish_reason == "length":  # a random model may go on calling until the limit
            assert not one, text
            text = text[: text.rindex("</tool_call>") + len("</tool_call>")]
        content, calls = parse_calls(text, known)
        assert content is None and calls, text
        assert len(calls) == 1 if one else len(calls) >= 1
        if tags == "tokens":
            assert tag_ids <= set(result.output_token_ids), result.output_token_ids
        if choice != "required":
            assert [c["function"]["name"] for c in calls] == ["f2"]
        for call in calls:
            schema = known[call["function"]["name"]]["parameters"]
            jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
        # Streamed in deltas of 3 characters: the same calls, their arguments in pieces.
        stream, items = ToolStream(known), []
        for start in range(0, len(text), 3):
            content, batch = stream.feed(text[start : start + 3])
            assert content == ""
            items += batch
        assert stream.finish("stop") == ("", "tool_calls") and len(items) > 2 * len(calls), text
        for index, call in enumerate(calls):
            mine = [item for item in items if item["index"] == index]
            assert mine[0]["function"]["name"] == call["function"]["name"]
            pieces = "".join(item["function"]["arguments"] for item in mine)
            assert json.loads(pieces) == json.loads(call["function"]["arguments"])


def test_named_grammar_allows_one_call_and_required_several() -> None:
    known = functions([WEATHER, TIME])
    assert call_grammar(known, "get_time", True).startswith("start: call\n")
    assert call_grammar(known, None, True).startswith('start: call ("\\n" call)*\n')
    assert call_grammar(known, None, False).startswith("start: call\n")


# --------------------------------------------------------------------------------- driver API and records
def test_driver_requests_take_tools_and_records_carry_tool_calls(tiny_checkpoint: Path) -> None:
    request = {"id": "t", "prompt": "Weather in Oslo?", "tools": [WEATHER], "tool_choice": "required"}
    check_request_fields(request)
    rendered, known = tool_request(request)
    assert set(rendered) == {"id", "messages", "structured_outputs"} and list(known) == ["get_weather"]
    assert rendered["messages"][0]["role"] == "system" and "# Tools" in rendered["messages"][0]["content"]
    assert rendered["messages"][1]["content"][-1] == {"type": "text", "text": "Weather in Oslo?"}
    assert tool_request({**request, "tool_choice": "none"})[1] is None
    assert tool_request({"id": "p", "prompt": "hi"}) == ({"id": "p", "prompt": "hi"}, None)
    with pytest.raises(RequestError) as raised:
        tool_request({**request, "tool_choice": {"type": "function", "function": {"name": "fly"}}})
    assert raised.value.param == "tool_choice" and raised.value.status == 400
    with pytest.raises(RequestError) as raised:
        check_request_fields({**request, "tool_choice": "always"})
    assert raised.value.param == "tool_choice"

    builder = PromptBuilder.from_pretrained(tiny_checkpoint)
    text = 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    ids = builder.tokenizer(text, add_special_tokens=False)["input_ids"]

    async def run() -> dict:
        prepared = builder.build(rendered)
        state = RequestState.create("k", "t", prepared, SamplingParams(), [], builder.decode, 0.0)
        state.tools = known
        state.add_tokens(ids, [0.0] * len(ids))
        return state.finish("stop")

    record = asyncio.run(run())
    assert record["finish_reason"] == "tool_calls" and record["output_text"] == text
    assert [json.loads(c["function"]["arguments"]) for c in record["tool_calls"]] == [{"city": "Oslo"}]


def _calls_valid_and_stopping(tiny_checkpoint: Path, count: int, seed: int) -> None:
    """`count` random parameter schemas, each the tool of a `required` (one call) and of a named request, at
    temperature 0 and 1: every output is one call of the function asked for with arguments valid against
    its schema, streamed (3-character deltas through ToolStream) and not, and at least 90% end with EOS."""
    builder = PromptBuilder.from_pretrained(tiny_checkpoint)
    schemas = object_schemas(count, seed)
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": s}} for i, s in enumerate(schemas)]
    known = functions(tools)
    requests = []
    for i in range(count):
        pair = [tools[i], tools[(i + 1) % count]]
        for choice in ("required", {"type": "function", "function": {"name": f"f{i}"}}):
            body = parse_request(_body(tools=pair, tool_choice=choice, parallel_tool_calls=False))
            requests.append(tool_request(engine_request(body, "r"), False, builder.tool_call_tokens)[0])
    compiler = GrammarCompiler(builder.tokenizer)

    async def grammars() -> list[str]:
        return [await compiler.grammar(r) for r in requests]

    compiled = asyncio.run(grammars())
    prompt = builder.build({"id": "r", "prompt": "Call a tool."})
    runner = ModelRunner(tiny_checkpoint, max_batch_size=8, max_seq_len=512)
    stopped = total = 0
    for temperature in (0.0, 1.0):
        params = [
            SamplingParams(max_new_tokens=200, temperature=temperature, seed=j, grammar=g)
            for j, g in enumerate(compiled)
        ]
        for j, result in enumerate(runner.generate([prompt] * len(params), params, builder.eos_token_ids)):
            total += 1
            if result.finish_reason != "stop":
                continue
            stopped += 1
            i, named = divmod(j, 2)
            text = builder.decode(result.output_token_ids)
            content, calls = parse_calls(text, known)
            assert content is None and len(calls) == 1, text
            name = calls[0]["function"]["name"]
            assert name == f"f{i}" if named else name in (f"f{i}", f"f{(i + 1) % count}"), text
            jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), known[name]["parameters"])
            stream, items = ToolStream(known), []
            for start in range(0, len(text), 3):
                items += stream.feed(text[start : start + 3])[1]
            assert stream.finish("stop") == ("", "tool_calls"), text
            pieces = "".join(item["function"]["arguments"] for item in items)
            assert items[0]["function"]["name"] == name and json.loads(pieces) == json.loads(
                calls[0]["function"]["arguments"]
            )
    assert stopped >= 0.9 * total, f"{stopped} of {total} ended with EOS"


def test_calls_validate_against_many_parameter_schemas(tiny_checkpoint: Path) -> None:
    _calls_valid_and_stopping(tiny_checkpoint, 64, seed=8)  # 256 outputs
