"""Structured outputs: grammars from request fields (actors/grammars.py), masks where sampling happens
(model/grammar.py, model/batch.py), on the tiny random-weight checkpoint whose free output is gibberish.

The property: for seeded random JSON schemas (tests/structured_schemas.py) at temperature 0 and 1,
every output parses and validates against its schema (jsonschema), and at least 90% end with `stop`.
Requests run in batches of 8 through one multi-step decode call each (`model.batch.generate`), so a
mask is applied at every step of a call; a graph-mode run gives the eager run's tokens.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import jsonschema
import pytest

from actors.errors import RequestError
from actors.grammars import GrammarCompiler, grammar_spec
from cluster.datasets import load_requests
from model.batch import RunningBatch
from model.kv_cache import slot_tables
from model.processor import PromptBuilder
from model.runner import ModelRunner
from model.sampling import SamplingParams
from tests.structured_schemas import object_schemas

MAX_TOKENS = 200
STOP_SHARE = 0.9


@pytest.fixture(scope="module")
def builder(tiny_checkpoint: Path) -> PromptBuilder:
    return PromptBuilder.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def runner(tiny_checkpoint: Path) -> ModelRunner:
    return ModelRunner(tiny_checkpoint, max_batch_size=8, max_seq_len=512)


def compile_all(builder: PromptBuilder, requests: list[dict], **options: float) -> list[str]:
    compiler = GrammarCompiler(builder.tokenizer, **options)

    async def run() -> list[str]:
        return [await compiler.grammar(r) for r in requests]

    return asyncio.run(run())


def json_schema_request(schema: dict) -> dict:
    return {
        "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
    }


def run_constrained(
    runner: ModelRunner, builder: PromptBuilder, grammars: list[str], temperature: float, max_tokens: int = MAX_TOKENS
) -> list:
    prompt = builder.build({"id": "p", "prompt": "Answer in JSON."})
    params = [
        SamplingParams(max_new_tokens=max_tokens, temperature=temperature, seed=i, grammar=g)
        for i, g in enumerate(grammars)
    ]
    return runner.generate([prompt] * len(grammars), params, builder.eos_token_ids)


def assert_valid_json(builder: PromptBuilder, schemas: list[dict], results: list) -> None:
    """Every output parses and validates; at least STOP_SHARE of them end with EOS."""
    for schema, result in zip(schemas, results):
        text = builder.decode(result.output_token_ids)
        assert result.finish_reason in ("stop", "length"), result.error
        if result.finish_reason == "stop":
            jsonschema.validate(json.loads(text), schema)
    stopped = sum(r.finish_reason == "stop" for r in results)
    assert stopped >= STOP_SHARE * len(results), [builder.decode(r.output_token_ids) for r in results]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_outputs_validate_against_random_schemas(
    runner: ModelRunner, builder: PromptBuilder, temperature: float
) -> None:
    schemas = object_schemas(16, seed=1)
    grammars = compile_all(builder, [json_schema_request(s) for s in schemas])
    assert_valid_json(builder, schemas, run_constrained(runner, builder, grammars, temperature))


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_outputs_validate_against_hundreds_of_schemas(
    runner: ModelRunner, builder: PromptBuilder, temperature: float
) -> None:
    schemas = object_schemas(200, seed=2)
    grammars = compile_all(builder, [json_schema_request(s) for s in schemas])
    assert_valid_json(builder, schemas, run_constrained(runner, builder, grammars, temperature))


@pytest.mark.slow  # tests/test_logprobs.py runs a constrained row in graph mode in the default lane
def test_graph_mode_masks_every_step_as_eager(tiny_checkpoint: Path, builder: PromptBuilder) -> None:
    schemas = object_schemas(4, seed=3)
    grammars = compile_all(builder, [json_schema_request(s) for s in schemas])
    graph_runner = ModelRunner(tiny_checkpoint, max_batch_size=4, max_seq_len=512)
    eager = run_constrained(graph_runner, builder, grammars, 1.0)
    graph_runner.capture_graphs([4])
    graph = run_constrained(graph_runner, builder, grammars, 1.0)
    assert [r.output_token_ids for r in graph] == [r.output_token_ids for r in eager]
    assert_valid_json(builder, schemas, graph)


def test_a_truncated_output_ends_with_length(runner: ModelRunner, builder: PromptBuilder) -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string", "minLength": 30, "maxLength": 40}},
        "required": ["a"],
    }
    (grammar,) = compile_all(builder, [json_schema_request(schema)])
    (result,) = run_constrained(runner, builder, [grammar], 0.0, max_tokens=8)
    assert result.finish_reason == "length" and len(result.output_token_ids) == 8
    assert builder.decode(result.output_token_ids).startswith('{"a":"')


def test_json_object_choice_regex_and_lark(runner: ModelRunner, builder: PromptBuilder) -> None:
    choices = ["apple pie", "banana", "cherry"]
    requests = [
        {"response_format": {"type": "json_object"}},
        {"structured_outputs": {"choice": choices}},
        {"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2,4}"}},
        {"structured_outputs": {"grammar": 'start: "(" item ("," item)* ")"\nitem: /[xyz]/'}},
        {"structured_outputs": {"json": json.dumps({"type": "array", "items": {"type": "boolean"}, "maxItems": 3})}},
    ]
    grammars = compile_all(builder, requests)
    for temperature in (0.0, 1.0):
        results = run_constrained(runner, builder, grammars, temperature, max_tokens=60)
        texts = [builder.decode(r.output_token_ids) for r in results]
        assert [r.finish_reason for r in results[:3]] == ["stop"] * 3, texts
        assert isinstance(json.loads(texts[0]), dict)
        assert texts[1] in choices
        assert re.fullmatch("[0-9]{3}-[a-z]{2,4}", texts[2]), texts[2]
        if results[3].finish_reason == "stop":
            assert re.fullmatch(r"\([xyz](,[xyz])*\)", texts[3]), texts[3]
        assert results[4].finish_reason == "stop"
        jsonschema.validate(json.loads(texts[4]), {"type": "array", "items": {"type": "boolean"}, "maxItems": 3})


def test_unconstrained_rows_in_a_constrained_batch_are_untouched(runner: ModelRunner, builder: PromptBuilder) -> None:
    prompt = builder.build({"id": "p", "prompt": "Answer in JSON."})
    (grammar,) = compile_all(builder, [{"response_format": {"type": "json_object"}}])
    free = SamplingParams(max_new_tokens=12, ignore_eos=True)
    alone = runner.generate([prompt], [free], builder.eos_token_ids)[0].output_token_ids
    mixed = runner.generate(
        [prompt, prompt], [SamplingParams(max_new_tokens=12, grammar=grammar), free], builder.eos_token_ids
    )
    assert mixed[1].output_token_ids == alone


# --------------------------------------------------------------------------------- request checks
@pytest.mark.parametrize(
    ("request_fields", "param", "message"),
    [
        ({"response_format": {"type": "xml"}}, "response_format.type", "must be one of"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "must be an object"),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs",
            "not both",
        ),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"guided_json": {}}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty list"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "not valid JSON"),
        ({"structured_outputs": {"regex": ""}}, "structured_outputs.regex", "non-empty string"),
    ],
)
def test_malformed_fields_name_the_field(request_fields: dict, param: str, message: str) -> None:
    with pytest.raises(RequestError) as raised:
        grammar_spec(request_fields)
    assert raised.value.param == param and message in str(raised.value)


@pytest.mark.parametrize(
    ("request_fields", "param", "message"),
    [
        (
            json_schema_request({"type": "object", "not": {"type": "string"}}),
            "response_format.json_schema.schema",
            '"not"',
        ),
        (json_schema_request({"type": "strin"}), "response_format.json_schema.schema", "strin"),
        ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs.regex", "unclosed group"),
        ({"structured_outputs": {"grammar": "start: nothing_here"}}, "structured_outputs.grammar", "nothing_here"),
    ],
)
def test_a_grammar_the_engine_rejects_is_a_400_naming_the_field(
    builder: PromptBuilder, request_fields: dict, param: str, message: str
) -> None:
    with pytest.raises(RequestError) as raised:
        compile_all(builder, [request_fields])
    assert raised.value.status == 400 and raised.value.param == param and message in str(raised.value)


def test_grammars_are_checked_once_each_in_a_bounded_cache(builder: PromptBuilder) -> None:
    compiler = GrammarCompiler(builder.tokenizer, cache_size=2)
    requests = [json_schema_request({"type": "object", "properties": {str(i): {"type": "integer"}}}) for i in range(3)]

    async def run() -> None:
        for request in [requests[0], requests[0], requests[1], requests[0], requests[2], requests[1]]:
            assert await compiler.grammar(request) is not None
        assert await compiler.grammar({"response_format": {"type": "text"}}) is None

    asyncio.run(run())
    # 0, 1 checked; 0 again hit; 2 evicts 1 (0 was used more recently); 1 is checked again
    assert compiler.compiled == 4 and len(compiler.verdicts) == 2


def test_a_grammar_not_checked_in_time_is_refused(builder: PromptBuilder, monkeypatch: pytest.MonkeyPatch) -> None:
    compiler = GrammarCompiler(builder.tokenizer, timeout_s=0.05)
    monkeypatch.setattr(compiler, "_check", lambda grammar: time.sleep(1.0))

    async def run() -> None:
        await compiler.grammar(json_schema_request({"type": "object"}))

    with pytest.raises(RequestError) as raised:
        asyncio.run(run())
    assert raised.value.param == "response_format.json_schema.schema"
    assert "serve.grammar_compile_timeout_s=0.05" in str(raised.value)


def test_request_files_carry_the_new_fields(tmp_path: Path) -> None:
    """A request file's rows take response_format, structured_outputs, logprobs and penalties (cluster.launch)."""
    row = {
        "id": "r1",
        "prompt": "JSON please",
        "response_format": {"type": "json_object"},
        "logprobs": True,
        "top_logprobs": 3,
        "presence_penalty": 0.5,
        "logit_bias": {"5": -100},
    }
    other = {"id": "r2", "prompt": "a or b", "structured_outputs": {"choice": ["a", "b"]}}
    path = tmp_path / "requests.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(other) + "\n")
    requests = load_requests(str(path), None, 4, 1, None, tmp_path)
    assert requests[0] == {**row, "images": []} and requests[1]["structured_outputs"] == {"choice": ["a", "b"]}


def test_a_preempted_request_resumes_its_grammar_where_it_was(runner: ModelRunner, builder: PromptBuilder) -> None:
    """Preemption drops the KV; the rank keeps the request's tokens and matcher, so after the prompt and the
    tokens so far are computed again, decoding goes on as if it never stopped."""
    schema = object_schemas(1, seed=5)[0]
    (grammar,) = compile_all(builder, [json_schema_request(schema)])
    prompt = builder.build({"id": "p", "prompt": "Answer in JSON."})
    params = SamplingParams(max_new_tokens=MAX_TOKENS, temperature=1.0, seed=7, grammar=grammar)
    (straight,) = runner.generate([prompt], [params], builder.eos_token_ids)
    batch = RunningBatch(runner)
    batch.admit(prompt, params, builder.eos_token_ids, None)
    table = slot_tables(1, runner.max_seq_len, runner.block_size)[0]
    batch.set_tables({"p": (0, table)})
    tokens = batch.forward([("p", 0, len(prompt.input_ids))], [])["p"].tokens
    tokens += batch.decode(["p"], 5)["p"].tokens
    batch.preempt("p")
    batch.admit(prompt, params, builder.eos_token_ids, None)
    batch.set_tables({"p": (0, table)})
    seq = batch.seqs["p"]
    tokens += batch.forward([("p", 0, len(seq.tokens))], [])["p"].tokens
    while seq.finish_reason is None:
        tokens += batch.decode(["p"], MAX_TOKENS)["p"].tokens
    assert tokens == straight.output_token_ids and seq.finish_reason == "stop"
    jsonschema.validate(json.loads(builder.decode(tokens)), schema)
