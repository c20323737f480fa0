"""Streamed tool calls (actors/tools_format.ToolStream): a call's arguments go out in pieces as the model
writes them, as OpenAI streams `delta.tool_calls`. The reference is the calls the test wrote into the text
(and parse_calls of the whole text, the non-streamed answer); the stream must agree with it however the
text is split into deltas."""

from __future__ import annotations

import json
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.tools_format import ToolStream, parse_calls

NAMES = ["get_weather", "get_time", "météo", "f"]
KNOWN = {name: {"name": name, "parameters": {"type": "object"}} for name in NAMES}
# Pieces of string values the bracket scan must not take for structure.
TRICKY = ["{", "}", "[", "]", '"', '\\"', "\\", "\\\\", "</tool_call>", "<tool_call>", "é", "😀", "\n", ":", ","]


@dataclass
class Sent:
    """What a client assembles from one choice's stream."""

    content: str
    calls: dict[int, list[dict]]  # index -> its items, in order
    reason: str


def stream(text: str, cuts: list[int], reason: str = "stop") -> Sent:
    """`text` fed to a ToolStream in deltas split at `cuts`, then finished with the engine's `reason`."""
    bounds = sorted({0, len(text), *(c for c in cuts if 0 < c < len(text))})
    tools, content, calls = ToolStream(KNOWN), "", {}
    for a, b in zip(bounds, bounds[1:]):
        piece, items = tools.feed(text[a:b])
        content += piece
        for item in items:
            calls.setdefault(item["index"], []).append(item)
    rest, reason = tools.finish(reason)
    return Sent(content + rest, calls, reason)


def arguments(items: list[dict]) -> str:
    return "".join(item["function"]["arguments"] for item in items)


def check_items(sent: Sent) -> None:
    """Indexes 0, 1, ... in order; per call a first item with its id, type and name, then argument pieces."""
    assert list(sent.calls) == list(range(len(sent.calls)))
    ids = set()
    for index, items in sent.calls.items():
        head, *rest = items
        assert head["id"].startswith("call_") and head["type"] == "function" and head["function"]["arguments"] == ""
        ids.add(head["id"])
        for item in rest:
            assert item["index"] == index and set(item["function"]) == {"arguments"}
            assert item.get("id", head["id"]) == head["id"] and "name" not in item["function"]
    assert len(ids) == len(sent.calls)


tricky_strings = st.lists(st.sampled_from(TRICKY) | st.text(max_size=3), max_size=5).map("".join)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | tricky_strings,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(tricky_strings, inner, max_size=3),
    max_leaves=8,
)
# Whitespace variants of the JSON: compact (the grammar's), json.dumps' default, indented.
styles = st.sampled_from([{"separators": (",", ":")}, {}, {"indent": 2}])
surrounding = st.lists(st.sampled_from(["ok", " ", "\n", "<", "<tool", "<tools>", "{", '"', "é"]), max_size=4).map(
    "".join
)


@dataclass
class Written:
    """An answer as the test wrote it: its text, the text outside its calls (before, then after each call),
    and per call its name, arguments, whether the name comes first and the arguments' JSON text."""

    text: str
    outside: list[str]
    calls: list[tuple[str, dict, bool, str]]


@st.composite
def answers(draw: st.DrawFn) -> Written:
    """An answer of 0-3 calls in the hermes format's whitespace variants, with text around them."""
    outside, calls, text = [draw(surrounding)], [], ""
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(NAMES))
        args = draw(st.dictionaries(tricky_strings, json_values, max_size=4))
        style = {**draw(styles), "ensure_ascii": draw(st.booleans())}
        name_first = draw(st.booleans())
        args_text = json.dumps(args, **style)
        key_sep, sep = draw(st.sampled_from([(": ", ", "), (":", ","), (" : ", " ,\n ")]))
        parts = [f'"name"{key_sep}{json.dumps(name, **style)}', f'"arguments"{key_sep}{args_text}']
        body = "{" + sep.join(parts if name_first else parts[::-1]) + "}"
        text += outside[-1] + "<tool_call>" + draw(st.sampled_from(["\n", "", " "])) + body
        text += draw(st.sampled_from(["\n", "", "\n\n"])) + "</tool_call>"
        outside.append(draw(surrounding))
        calls.append((name, args, name_first, args_text))
    return Written(text + outside[-1], outside, calls)


@settings(max_examples=300, deadline=None)
@given(written=answers(), cuts=st.lists(st.integers(0, 400), max_size=40), one_char=st.booleans())
def test_streamed_calls_match_the_calls_written_however_the_text_is_split(
    written: Written, cuts: list[int], one_char: bool
) -> None:
    text = written.text
    sent = stream(text, list(range(len(text))) if one_char else cuts)
    check_items(sent)
    assert [items[0]["function"]["name"] for items in sent.calls.values()] == [name for name, *_ in written.calls]
    assert [json.loads(arguments(items)) for items in sent.calls.values()] == [args for _, args, *_ in written.calls]
    for items, (_, args, name_first, args_text) in zip(sent.calls.values(), written.calls):
        if not name_first:  # held until its `</tool_call>`, then sent whole
            assert [item["function"]["arguments"] for item in items[1:]] == [json.dumps(args)]
        else:  # the arguments' text as written, with one character a delta: a piece per character
            assert arguments(items) == args_text
            if one_char:
                assert len(items) == 1 + len(args_text)
    before, after = written.outside[0], "".join(written.outside[1:])
    if not written.calls:
        assert (sent.content, sent.reason) == (text, "stop")
    else:  # text before the calls as it comes; after the first, at the end unless it is only whitespace
        assert (sent.content, sent.reason) == (before + (after if after.strip() else ""), "tool_calls")
    # The non-streamed answer has the same calls and content (a `</tool_call>` inside a string included).
    content, parsed = parse_calls(text, KNOWN)
    assert sent.content.strip() == (content or "").strip()
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed] == [
        (items[0]["function"]["name"], json.loads(arguments(items))) for items in sent.calls.values()
    ]


def test_arguments_stream_while_the_call_is_written() -> None:
    text = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n</tool_call>'
    tools = ToolStream(KNOWN)
    assert tools.feed('Checking.\n<tool_call>\n{"name": "get_wea') == ("Checking.\n", [])
    content, items = tools.feed('ther", "arguments": {"ci')
    assert content == "" and items[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert items[1:] == [{"index": 0, "function": {"arguments": '{"ci'}}]
    assert tools.feed('ty": "Oslo", ') == ("", [{"index": 0, "function": {"arguments": 'ty": "Oslo", '}}])
    # The object's closing brace and the tag are not part of the arguments.
    assert tools.feed('"days": 3}}\n</tool') == ("", [{"index": 0, "function": {"arguments": '"days": 3}'}}])
    assert tools.feed("_call>") == ("", []) and tools.finish("stop") == ("", "tool_calls")
    assert parse_calls(text, KNOWN)[0] == "Checking."


def test_arguments_before_the_name_go_out_whole_when_the_call_closes() -> None:
    text = '<tool_call>\n{"arguments": {"city": "Oslo"}, "name": "get_weather"}\n</tool_call>'
    tools = ToolStream(KNOWN)
    assert all(tools.feed(c) == ("", []) for c in text[:-1])
    content, items = tools.feed(text[-1])
    assert content == "" and [item["function"] for item in items] == [
        {"name": "get_weather", "arguments": ""},
        {"arguments": '{"city": "Oslo"}'},
    ]
    assert tools.finish("stop") == ("", "tool_calls")


def test_a_malformed_streamed_call_stays_as_sent_and_the_finish_reason_is_the_engines() -> None:
    # An `auto` answer whose call proves malformed after its head and arguments went out: nothing more is sent
    # for it, its text is not repeated as content, and finish_reason is not "tool_calls".
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}, "days": }\n</tool_call> done'
    sent = stream(text, list(range(len(text))))
    check_items(sent)
    assert arguments(sent.calls[0]) == '{"city": "Oslo"}' and (sent.content, sent.reason) == (" done", "stop")
    assert parse_calls(text, KNOWN) == (text, [])  # the non-streamed answer keeps it as text
    # Cut by max_tokens inside the arguments: the pieces so far, which do not parse, and "length".
    cut = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "Europe/Os'
    sent = stream(cut, [20, 50, 60], reason="length")
    assert arguments(sent.calls[0]) == '{"zone": "Europe/Os' and (sent.content, sent.reason) == ("", "length")
    # A `<` outside strings ends the call's JSON: no piece past it.
    broken = '<tool_call>{"name": "f", "arguments": {"a": <b>}}</tool_call>'
    sent = stream(broken, [35, 40])
    assert arguments(sent.calls[0]) == '{"a": ' and sent.reason == "stop"
    # A whole call, then a malformed one: both as sent; finish_reason says not every call is whole.
    pair = '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "f", "arguments": {}}}</tool_call>'
    sent = stream(pair, [30, 60])
    assert [arguments(items) for items in sent.calls.values()] == ["{}", "{}"] and sent.reason == "stop"
    # Two `arguments` keys: the streamed first one is not the call's arguments.
    twice = '<tool_call>{"name": "f", "arguments": {"a": 1}, "arguments": {"a": 2}}</tool_call>'
    assert stream(twice, [40]).reason == "stop"


def test_blocks_that_are_not_calls_stay_content() -> None:
    for text in [
        'a <tool_call>{"name": "nope", "arguments": {}}</tool_call> b',  # an unknown function
        "a <tool_call>{not json</tool_call> b",
        '<tool_call>{"name": "f", "arguments": "{}"}</tool_call>',  # arguments not an object
        '<tool_call>\n{"arguments": {"a": 1}, "name": "f"}',  # held, and no closing tag came
        "<tools> and <tool_call",
    ]:
        for cuts in ([], list(range(len(text)))):
            assert stream(text, cuts) == Sent(text, {}, "stop"), (text, cuts)


def test_content_before_between_and_after_calls() -> None:
    text = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        'and <tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
    )
    tools = ToolStream(KNOWN)
    assert tools.feed(text[:20]) == ("Let me check.\n", [])  # before the first call: at once
    content, items = tools.feed(text[20:])
    assert content == "" and [item["index"] for item in items] == [0, 0, 1, 1]
    assert tools.finish("stop") == ("\nand \n", "tool_calls")  # between and after: at the end
    only_space = '<tool_call>{"name": "f", "arguments": {}}</tool_call>\n'
    assert stream(only_space, []).content == ""
