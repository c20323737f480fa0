"""A request's text, without Ray: the incremental detokenizer against the tokenizer's own decode of the whole
output, stop strings across deliveries, the tokens a stop string keeps, the held-back tail, the work per
delivery, and typed request errors."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from transformers.convert_slow_tokenizer import bytes_to_unicode

from actors.detokenizer import MAX_HELD_TOKENS, IncrementalDetokenizer
from actors.errors import NoLiveGroupError, RequestError
from actors.records import new_record
from actors.requests import RequestState, sampling_params, stop_strings
from actors.stop_strings import MAX_STOP_STRINGS, StopMatcher, check_stop_strings
from model.processor import PreparedRequest, PromptBuilder
from model.sampling import SamplingParams
from tests.test_stop_strings import first_stop

BYTE_TOKENS = bytes_to_unicode()  # byte -> its byte-level BPE token
MULTI_BYTE = "天气很好，我们去公园散步吧 😀🎉 naïve café — ok! 中文和 emoji 👩‍💻 混在一起。"


@pytest.fixture(scope="module")
def builder(tiny_checkpoint: Path) -> PromptBuilder:
    return PromptBuilder.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def vocab_size(tiny_checkpoint: Path) -> int:
    import json

    return json.loads((tiny_checkpoint / "config.json").read_text())["vocab_size"]


def _deliveries(ids: list[int], rng: random.Random, most: int = 5) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, most)
        out.append(ids[i : i + n])
        i += n
    return out


def _detokenize(decode, deliveries: list[list[int]]) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(decode)
    pieces = [detok.add(d) for d in deliveries]
    return pieces, detok.flush()


def test_detokenizer_matches_decode_of_the_whole_output(builder: PromptBuilder, vocab_size: int) -> None:
    rng = random.Random(0)
    text_ids = builder.tokenizer(MULTI_BYTE, add_special_tokens=False)["input_ids"]
    assert len(text_ids) > len(MULTI_BYTE)  # characters are split over byte-level tokens
    special = sorted(builder.tokenizer.all_special_ids)
    for trial in range(60):
        if trial % 3 == 0:  # any id of the model's vocabulary: bytes, specials, ids beyond the tokenizer ('')
            ids = [rng.randrange(vocab_size) for _ in range(rng.randint(1, 120))]
        elif trial % 3 == 1:  # real multi-byte text, specials and out-of-tokenizer ids mixed in
            extra = [[] if rng.random() < 0.8 else [rng.choice(special), vocab_size - 1] for _ in text_ids]
            ids = [i for t, more in zip(text_ids, extra) for i in [t, *more]]
        else:  # one token per byte: every multi-byte character split over 2-4 tokens
            ids = builder.tokenizer.convert_tokens_to_ids([BYTE_TOKENS[b] for b in MULTI_BYTE.encode()])
        whole = builder.decode(ids)
        pieces, rest = _detokenize(builder.decode, _deliveries(ids, rng))
        assert "".join(pieces) + rest == whole, (trial, ids)
        if trial % 3:  # valid text: no U+FFFD ever, nothing left at the end
            assert whole.replace("<|endoftext|>", "") == whole and "\ufffd" not in whole
            assert all("\ufffd" not in p for p in pieces) and rest == ""


def test_a_character_split_over_deliveries_comes_out_once_complete(builder: PromptBuilder) -> None:
    ids = builder.tokenizer("中😀", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 4  # 3 + 4 UTF-8 bytes over several tokens
    detok = IncrementalDetokenizer(builder.decode)
    out = [detok.add([i]) for i in ids]
    assert "".join(out) == "中😀" and all(piece in ("", "中", "😀") for piece in out)
    # A long run of broken bytes (lone continuation bytes) is settled as it comes, so the window stays
    # short; a character split over the last tokens still comes out whole.
    broken = builder.tokenizer.convert_tokens_to_ids([BYTE_TOKENS[0x80]] * 30)
    detok = IncrementalDetokenizer(builder.decode)
    out = []
    for i in [*broken, *ids]:
        out.append(detok.add([i]))
        assert len(detok.ids) - detok.read <= MAX_HELD_TOKENS + 1
    assert "".join(out) + detok.flush() == builder.decode([*broken, *ids]) == "\ufffd" * 30 + "中😀"
    # A character never completed comes out as U+FFFD when the request ends, as decode gives it.
    detok = IncrementalDetokenizer(builder.decode)
    assert detok.add(ids[:1]) == "" and detok.flush() == builder.decode(ids[:1]) == "\ufffd"


class CountingDecode:
    """builder.decode that counts the ids it is given per call."""

    def __init__(self, decode) -> None:
        self.decode = decode
        self.ids = 0

    def __call__(self, ids: list[int]) -> str:
        self.ids += len(ids)
        return self.decode(ids)


def test_work_per_delivery_does_not_grow_with_output_length(builder: PromptBuilder, vocab_size: int) -> None:
    rng = random.Random(1)
    counting = CountingDecode(builder.decode)
    detok = IncrementalDetokenizer(counting)
    matcher = StopMatcher(["never appears ~~", "zz"])
    per_delivery = []
    for _ in range(1500):
        new = [rng.randrange(vocab_size) for _ in range(4)]
        counting.ids = 0
        matcher.feed(detok.add(new))
        per_delivery.append(counting.ids)
        assert len(matcher.held) < len("never appears ~~")
    # Ids decoded per delivery: one window (the previous settled ids, the held and the new ones), and
    # at most MAX_HELD_TOKENS + 1 shorter ones when held ids are settled; never the output so far
    # (6,000 ids by the end).
    window = 2 * (MAX_HELD_TOKENS + 1) + 2 * 4
    bound = window * (MAX_HELD_TOKENS + 2)
    assert max(per_delivery) <= bound
    assert sum(per_delivery[-100:]) <= 2 * sum(per_delivery[:100])


def _state(builder: PromptBuilder, stop: list[str]) -> RequestState:
    prepared = PreparedRequest("r", [1, 2, 3], None, None)
    return RequestState("r#0", prepared, SamplingParams(), stop, new_record("r", 0.0), builder.decode)


def _ids(builder: PromptBuilder, text: str) -> list[int]:
    return builder.tokenizer(text, add_special_tokens=False)["input_ids"]


def _drain(state: RequestState) -> list[dict]:
    items = []
    while not state.queue.empty():
        items.append(state.queue.get_nowait())
    return items


def test_stop_string_across_deliveries(builder: PromptBuilder) -> None:
    state = _state(builder, ["END", "never"])
    streamed = []
    for piece in ("The weather is fine E", "N", "D and more text"):
        item, stopped = state.add_tokens(_ids(builder, piece), [1.0])
        streamed.append(item["text"])
    assert stopped and "".join(streamed) == "The weather is fine "
    assert streamed[1] == ""  # "EN" may still become "END": held back
    record = state.finish("stop")
    assert record["output_text"] == "The weather is fine " and record["finish_reason"] == "stop"
    assert [i for i in _drain(state) if not i.get("final")] == []


def test_stop_prefix_held_back_then_released_at_the_end(builder: PromptBuilder) -> None:
    state = _state(builder, ["</answer>"])
    first, _ = state.add_tokens(_ids(builder, "Yes </ans"), [1.0])
    assert first["text"] == "Yes "
    second, stopped = state.add_tokens(_ids(builder, "wer"), [2.0])
    assert second["text"] == "" and not stopped
    record = state.finish("length")  # ends without the stop string: the held tail is streamed first
    items = _drain(state)
    assert items[0]["text"] == "</answer" and items[-1]["final"]
    assert record["output_text"] == "Yes </answer" == first["text"] + items[0]["text"]
    assert record["finish_reason"] == "length"


def test_held_tail_is_streamed_when_eos_ends_the_request(builder: PromptBuilder) -> None:
    state = _state(builder, ["</answer>"])
    item, _ = state.add_tokens([*_ids(builder, "Yes </ans"), *builder.eos_token_ids[:1]], [1.0, 2.0])
    record = state.finish("stop")  # EOS: the Coordinator ends it without asking for the tail
    streamed = item["text"] + "".join(i["text"] for i in _drain(state) if not i.get("final"))
    assert streamed == record["output_text"] == "Yes </ans" and record["finish_reason"] == "stop"


def test_stop_string_completed_by_the_last_character_cuts_the_text(builder: PromptBuilder) -> None:
    euro = _ids(builder, "€")
    assert len(euro) > 1
    state = _state(builder, ["€"])
    item, stopped = state.add_tokens(_ids(builder, "cost: ") + euro[:-1], [1.0])
    assert item["text"] == "cost: " and not stopped  # an incomplete character is never shown
    item, stopped = state.add_tokens(euro[-1:], [2.0])
    assert stopped and item["text"] == ""
    assert state.finish("stop")["output_text"] == "cost: "


def test_tokens_after_the_one_completing_a_stop_string_are_dropped(builder: PromptBuilder) -> None:
    ids = _ids(builder, "It is fine END and then more words follow")
    kept = next(k for k in range(1, len(ids) + 1) if "END" in builder.decode(ids[:k]))
    assert kept < len(ids) - 3
    state = _state(builder, ["END"])
    item, stopped = state.add_tokens(ids, [float(t) for t in range(len(ids))])  # one call, one time per token
    assert stopped and item["token_ids"] == ids[:kept] and item["text"] == "It is fine "
    record = state.finish("stop")
    assert record["output_token_ids"] == ids[:kept] and record["output_text"] == "It is fine "
    assert len(record["itl_s"]) == kept - 1 and record["device_itl_s"] == [1.0] * (kept - 1)


def test_latencies_count_tokens_when_delivered_and_keep_the_workers_clock_apart(builder: PromptBuilder) -> None:
    """Tokens delivered together count at their delivery's time; the workers' step times go to device_itl_s."""
    state = _state(builder, [])
    ids = _ids(builder, "one two three four five six")
    start = time.time()
    state.add_tokens(ids[:3], [100.0, 100.5, 101.0])  # one call of three steps
    state.add_tokens(ids[3:5], [101.5, 102.0])
    record = state.finish("length")
    assert record["itl_s"][:2] == [0.0, 0.0] and record["itl_s"][3] == 0.0  # within each delivery
    assert record["itl_s"][2] >= 0.0 and record["first_token_time"] >= start  # the Coordinator's clock
    assert record["device_itl_s"] == [0.5, 0.5, 0.5, 0.5]


def test_kept_tokens_and_text_do_not_depend_on_the_deliveries(builder: PromptBuilder) -> None:
    """Whatever the calls delivered, a request keeps the shortest start of its tokens whose text holds a stop
    string, and its text is the whole text cut by the rule (tests/test_stop_strings.first_stop); multi-byte
    characters split over tokens included."""
    rng = random.Random(3)
    byte_ids = builder.tokenizer.convert_tokens_to_ids([BYTE_TOKENS[b] for b in MULTI_BYTE.encode()])
    for trial in range(80):
        ids = byte_ids if trial % 2 else _ids(builder, MULTI_BYTE)
        whole = builder.decode(ids)
        stops = []
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(whole))
            stops.append(whole[at : at + rng.randint(1, 4)] if rng.random() < 0.8 else "never here")
        cut, end = first_stop(whole, stops)
        kept = (
            len(ids)
            if end is None
            else next(k for k in range(1, len(ids) + 1) if first_stop(builder.decode(ids[:k]), stops)[1])
        )
        state, stopped, streamed = _state(builder, stops), False, []
        for delivery in _deliveries(ids, rng, most=8):
            item, stopped = state.add_tokens(delivery, [1.0] * len(delivery))
            streamed.append(item)
            if stopped:
                break
        record = state.finish("stop" if stopped else "length")
        tail = [i["text"] for i in _drain(state) if not i.get("final")]
        assert stopped == (end is not None), (trial, stops)
        assert [t for i in streamed for t in i["token_ids"]] == record["output_token_ids"] == ids[:kept], (trial, stops)
        assert "".join(i["text"] for i in streamed) + "".join(tail) == record["output_text"] == cut, (trial, stops)
        assert len(state.token_times) == kept


def test_failed_request_carries_its_status_on_the_final_item_only(builder: PromptBuilder) -> None:
    state = _state(builder, [])
    state.add_tokens(_ids(builder, "partial"), [1.0])
    _drain(state)
    record = state.finish(None, NoLiveGroupError("no live DP group to serve it (dp group 0 died)"))
    final = _drain(state)[-1]
    assert record["error"] == "no live DP group to serve it (dp group 0 died)" and record["output_text"] == ""
    assert final["error_status"] == 503 and "error_status" not in record
    state = _state(builder, [])
    state.finish(None, "shard-worker-0 (rank 0) of dp group 0 died")
    assert _drain(state)[-1]["error_status"] == 500


@pytest.mark.parametrize(
    ("request_", "param", "message"),
    [
        ({"temperature": -1}, "temperature", "temperature=-1 must be >= 0"),
        ({"top_p": 0}, "top_p", "top_p=0 must be in"),
        ({"max_new_tokens": 0}, "max_new_tokens", r"must be in \[1, "),
        ({"seed": "x"}, "seed", "must be an integer"),
        ({"ignore_eos": 1}, "ignore_eos", "true or false"),
        ({"temperature": float("nan")}, "temperature", "finite number"),
    ],
)
def test_sampling_errors_name_the_field(request_: dict, param: str, message: str) -> None:
    with pytest.raises(RequestError, match=message) as info:
        sampling_params(request_, SamplingParams())
    assert (info.value.param, info.value.status) == (param, 400)


def test_stop_strings_validated_in_one_place() -> None:
    assert stop_strings({"stop": "x"}) == ["x"] and stop_strings({}) == []
    for bad, message in (
        (["a"] * (MAX_STOP_STRINGS + 1), f"at most {MAX_STOP_STRINGS} stop strings"),
        ("", "must not be empty"),
        ([1], "a string or a list of strings"),
    ):
        with pytest.raises(RequestError, match=message) as info:
            check_stop_strings(bad)
        assert info.value.param == "stop"
    # The HTTP schema applies the same rule.
    from cluster.openai_api import APIError, parse_request

    with pytest.raises(APIError, match=f"at most {MAX_STOP_STRINGS} stop strings") as info:
        parse_request(b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["a","b","c","d","e"]}')
    assert info.value.param == "stop"
