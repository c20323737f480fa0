"""Log-probabilities of sampled tokens (model/logprobs.py) against transformers, and their checks.

For greedy requests on the tiny checkpoint, every returned `logprob` is transformers' log-softmax at
that step (teacher-forced on our tokens) within 1e-4 in float32, and `top_logprobs` lists
transformers' most likely tokens in order, in eager and graph mode, in a prefill and in multi-step
decode calls, only for the rows that ask, and before a grammar's mask.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from actors.errors import RequestError
from actors.grammars import GrammarCompiler
from actors.request_fields import check_request_fields
from actors.requests import sampling_params
from cluster.openai_api import chunk_body, completion_body, engine_request, parse_request
from model.logprobs import TokenBytes
from model.processor import PreparedRequest, PromptBuilder
from model.runner import ModelRunner
from model.sampling import MAX_TOP_LOGPROBS, SamplingParams
from tests.reference import HFReference, step_rows

LOGPROB_ATOL = 1e-4
NAMES = ["text", "one_image", "text_long"]
MAX_NEW = [6, 9, 4]


def assert_logprobs_match(
    reference: HFReference, path: Path, request: PreparedRequest, tokens: list[int], entries: list, top: int
) -> None:
    """Each entry's logprob and top tokens are transformers' at that step, after the same prefix."""
    assert len(entries) == len(tokens)
    rows = step_rows(reference.logits(path, request, tokens), len(request.input_ids)).log_softmax(dim=-1)
    for step, (token, (logprob, tops), row) in enumerate(zip(tokens, entries, rows)):
        assert abs(logprob - float(row[token])) <= LOGPROB_ATOL, (step, logprob, float(row[token]))
        assert len(tops) == top
        if not top:
            continue
        values, ids = row.topk(top)
        ours_ids = [i for i, _ in tops]
        # Tokens within the tolerance of each other may swap places; the values must still be the reference's.
        for rank, (i, value) in enumerate(tops):
            assert abs(value - float(values[rank])) <= LOGPROB_ATOL, (step, rank, tops, values)
            assert abs(value - float(row[i])) <= LOGPROB_ATOL, (step, rank, i)
        close = (values[:-1] - values[1:]).abs().min() <= 2 * LOGPROB_ATOL if top > 1 else False
        if not close:
            assert ours_ids == ids.tolist(), (step, ours_ids, ids.tolist())


def test_greedy_logprobs_match_transformers_eager_and_graph(
    tiny_checkpoint: Path, prepared: Callable[[Path], dict[str, PreparedRequest]], hf_reference: HFReference
) -> None:
    requests = [prepared(tiny_checkpoint)[n] for n in NAMES]
    tops = [5, 0, MAX_TOP_LOGPROBS]
    params = [SamplingParams(max_new_tokens=n, logprobs=True, top_logprobs=k) for n, k in zip(MAX_NEW, tops)]
    params[2] = SamplingParams(max_new_tokens=MAX_NEW[2])  # a row that does not ask, in the same batch
    # A constrained row: its values are still the model's own, before the grammar's mask.
    (grammar,) = asyncio.run(_grammars(tiny_checkpoint, [{"response_format": {"type": "json_object"}}]))
    params[1] = dataclasses.replace(params[1], grammar=grammar)
    runner = ModelRunner(tiny_checkpoint, max_batch_size=4, max_seq_len=256)
    eager = runner.generate(requests, params, eos_token_ids=[])
    runner.capture_graphs([4])
    graph = runner.generate(requests, params, eos_token_ids=[])
    for results in (eager, graph):
        assert results[2].logprobs == []
        for i in range(2):
            assert len(results[i].output_token_ids) == MAX_NEW[i]
            assert_logprobs_match(
                hf_reference, tiny_checkpoint, requests[i], results[i].output_token_ids, results[i].logprobs, tops[i]
            )
    assert [r.output_token_ids for r in graph] == [r.output_token_ids for r in eager]
    assert PromptBuilder.from_pretrained(tiny_checkpoint).decode(eager[1].output_token_ids).startswith("{")


async def _grammars(path: Path, requests: list[dict]) -> list[str | None]:
    compiler = GrammarCompiler(PromptBuilder.from_pretrained(path).tokenizer)
    return [await compiler.grammar(r) for r in requests]


def test_sampled_tokens_get_their_raw_logprobs(
    tiny_checkpoint: Path, prepared: Callable[[Path], dict[str, PreparedRequest]], hf_reference: HFReference
) -> None:
    """At temperature 1.5 the values are still the model's own distribution, not the scaled one."""
    request = prepared(tiny_checkpoint)["text"]
    params = SamplingParams(max_new_tokens=5, temperature=1.5, seed=3, logprobs=True, top_logprobs=3)
    runner = ModelRunner(tiny_checkpoint, max_batch_size=1, max_seq_len=256)
    (result,) = runner.generate([request], [params], eos_token_ids=[])
    assert_logprobs_match(hf_reference, tiny_checkpoint, request, result.output_token_ids, result.logprobs, 3)


# --------------------------------------------------------------------------------- request checks
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"logprobs": True, "top_logprobs": MAX_TOP_LOGPROBS + 1}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": 1}, "logprobs"),
        ({"logprobs": True, "top_logprobs": 2.0}, "top_logprobs"),
    ],
)
def test_bad_logprobs_fields_name_the_field(fields: dict, param: str) -> None:
    request = {"prompt": "hi", **fields}
    with pytest.raises(RequestError) as raised:
        check_request_fields(request)
        sampling_params(request, SamplingParams())
    assert raised.value.param == param


def test_logprobs_fields_reach_the_sampling_params() -> None:
    params = sampling_params({"prompt": "hi", "logprobs": True, "top_logprobs": 4}, SamplingParams())
    assert (params.logprobs, params.top_logprobs) == (True, 4)


def test_token_bytes_of_byte_level_special_and_unknown_tokens(tiny_checkpoint: Path) -> None:
    tokenizer = PromptBuilder.from_pretrained(tiny_checkpoint).tokenizer
    token_bytes = TokenBytes(tokenizer)
    ids = tokenizer("Hello there é", add_special_tokens=False)["input_ids"]
    assert b"".join(bytes(token_bytes(i)[1]) for i in ids) == "Hello there é".encode()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert token_bytes(end) == ("<|im_end|>", list(b"<|im_end|>"))
    assert token_bytes(len(tokenizer) + 5) == ("", [])
    entry = token_bytes.record(ids[0], [-0.5, [[ids[0], -0.5], [end, -2.0]]])
    assert entry == {
        "token": token_bytes(ids[0])[0],
        "logprob": -0.5,
        "bytes": token_bytes(ids[0])[1],
        "top_logprobs": [
            {"token": token_bytes(ids[0])[0], "logprob": -0.5, "bytes": token_bytes(ids[0])[1]},
            {"token": "<|im_end|>", "logprob": -2.0, "bytes": list(b"<|im_end|>")},
        ],
    }


def test_a_partial_character_shows_escaped_bytes(tiny_checkpoint: Path) -> None:
    tokenizer = PromptBuilder.from_pretrained(tiny_checkpoint).tokenizer
    token_bytes = TokenBytes(tokenizer)
    byte_token = tokenizer.convert_tokens_to_ids("Ã")  # byte 0xC3 alone: half of a two-byte character
    assert token_bytes(byte_token) == ("\\xc3", [0xC3])


def test_logprobs_of_rows_are_computed_on_the_rows_that_ask() -> None:
    from model.logprobs import LogprobRows

    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [1.0, 1.0, 5.0]])
    params = [SamplingParams(), SamplingParams(logprobs=True, top_logprobs=2), SamplingParams(logprobs=True)]
    rows = LogprobRows(params, "cpu")
    entries = rows.entries(rows.compute(logits, torch.tensor([2, 1, 2])))
    assert set(entries) == {1, 2}
    expected = logits.log_softmax(-1)
    assert entries[1][0] == pytest.approx(float(expected[1, 1]))
    assert [i for i, _ in entries[1][1]] == [0, 1]
    assert entries[2] == [pytest.approx(float(expected[2, 2])), []]


# --------------------------------------------------------------------------------- OpenAI shapes
def test_openai_request_and_response_carry_logprobs() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2}
    request = parse_request(json.dumps(body).encode())
    assert engine_request(request, "r")["logprobs"] is True and engine_request(request, "r")["top_logprobs"] == 2
    entry = {
        "token": "a",
        "logprob": -0.1,
        "bytes": [97],
        "top_logprobs": [{"token": "a", "logprob": -0.1, "bytes": [97]}],
    }
    record = {"logprobs": [entry], "output_token_ids": [5], "prompt_tokens": 3}
    choice = completion_body("c", "m", 0, "a", "stop", record)["choices"][0]
    assert choice["logprobs"] == {"content": [entry], "refusal": None}
    assert completion_body("c", "m", 0, "a", "stop", {"output_token_ids": [5]})["choices"][0]["logprobs"] is None
    chunk = chunk_body("c", "m", 0, {"content": "a"}, logprobs=[entry])
    assert chunk["choices"][0]["logprobs"] == {"content": [entry], "refusal": None}
    assert "logprobs" not in engine_request(
        parse_request(json.dumps({**body, "logprobs": None, "top_logprobs": 0}).encode()), "r"
    )
