"""The request-field registry: what the driver API takes, what it refuses, and what the server builds."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from actors.errors import RequestError
from actors.request_fields import FIELDS, SAMPLING_FIELDS, check_request_fields
from actors.requests import sampling_params
from cluster.openai_api import engine_request, parse_request
from model.sampling import SamplingParams

FULL = {
    "id": "a",
    "prompt": "Describe it.",
    "images": ["/data/cat.jpg"],
    "mm_processor_kwargs": {"max_pixels": 200704},
    "max_new_tokens": 8,
    "temperature": 0.7,
    "top_p": 0.9,
    "seed": 3,
    "ignore_eos": True,
    "stop": ["\n", "END"],
}


def test_the_sampling_fields_are_samplingparams_fields() -> None:
    # `grammar` is compiled from response_format or structured_outputs (actors/grammars.py), not given as is
    assert set(SAMPLING_FIELDS) == {f.name for f in dataclasses.fields(SamplingParams)} - {"grammar"}
    assert set(SAMPLING_FIELDS) <= set(FIELDS)
    params = sampling_params(FULL, SamplingParams())
    assert params == SamplingParams(max_new_tokens=8, temperature=0.7, top_p=0.9, seed=3, ignore_eos=True)


def test_known_fields_pass_and_none_leaves_a_field_unset() -> None:
    check_request_fields(FULL)
    check_request_fields({"id": "b", "messages": [{"role": "user", "content": "hi"}], "stop": "x"})
    check_request_fields({name: None for name in FIELDS})


@pytest.mark.parametrize("key", ["temprature", "max_tokens", "best_of", "question_id"])
def test_an_unknown_field_is_refused_naming_it_and_the_request(key: str) -> None:
    with pytest.raises(RequestError) as info:
        check_request_fields({**FULL, key: 1})
    assert (info.value.param, info.value.status) == (key, 400)
    assert f"request 'a': unknown field {key!r}" in str(info.value)
    assert "max_new_tokens" in str(info.value)  # the fields it takes are listed


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("id", "", "must be a non-empty string"),
        ("prompt", 3, "must be a string"),
        ("images", "cat.jpg", "must be a list"),
        ("messages", {"role": "user"}, "must be a list"),
        ("mm_processor_kwargs", [1], "must be an object"),
        ("max_new_tokens", 0, r"must be in \[1, "),
        ("n", 0, r"must be in \[1, "),
        ("n", 2.0, "must be an integer"),
        ("seed", -1, r"must be in \[0, "),
        ("temperature", -1, "must be >= 0"),
        ("top_p", 1.5, r"must be in \(0, 1\]"),
        ("top_p", float("inf"), "finite number"),
        ("ignore_eos", "yes", "true or false"),
        ("stop", [""], "must not be empty"),
    ],
)
def test_a_bad_value_is_refused_naming_the_field(field: str, value: Any, message: str) -> None:
    with pytest.raises(RequestError, match=message) as info:
        check_request_fields({**FULL, field: value})
    assert info.value.param == field


def test_a_request_the_server_builds_passes_the_check() -> None:
    body = {
        "model": "tiny",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "name": "someone",
                "content": [
                    {"type": "text", "text": "What is it?"},
                    {"type": "image_url", "image_url": {"url": "http://x/a.png"}},
                    {"type": "image_url", "image_url": {"url": "/tmp/b.png", "detail": "low"}},
                ],
            },
        ],
        "max_completion_tokens": 7,
        "temperature": 0.5,
        "top_p": 0.8,
        "seed": 3,
        "stop": "END",
        "ignore_eos": True,
        "logprobs": True,
        "top_logprobs": 2,
        "top_k": 5,
        "min_tokens": 1,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "repetition_penalty": 1.05,
        "logit_bias": {"3": 1.5},
        "mm_processor_kwargs": {"min_pixels": 3136, "max_pixels": 50000},
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "someone",  # OpenAI fields the server accepts without using stay out of the request
        "metadata": {"k": "v"},
        "n": 1,
    }
    request = engine_request(parse_request(json.dumps(body).encode()), "chatcmpl-1", {"http://x/a.png": b"PNG"})
    check_request_fields(request)
    assert set(request) == {"id", "messages", *SAMPLING_FIELDS, "stop", "mm_processor_kwargs"}
