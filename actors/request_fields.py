"""The fields a request may carry: one registry for the driver API, request files and the server.

A request is a dict given to `Coordinator.generate`/`stream`/`submit` (the router has the same API),
read from a row of a request file (cluster.datasets) or built by the server from an OpenAI body
(cluster.openai_api). Its keys are names of `FIELDS`; a value of None leaves the field unset.
`check_request_fields` refuses any other key and checks each set value's type and range; what only
the checkpoint can tell (prompt length, image loading, mm_processor_kwargs within the checkpoint's
pixel limits) is checked when the request is prepared (model.processor).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from actors.errors import RequestError
from actors.stop_strings import MAX_STOP_STRINGS, check_stop_strings
from model.sampling import MAX_TOP_LOGPROBS, SamplingParams

MAX_LOGIT_BIAS = 300  # token ids in one request's logit_bias (as OpenAI)
MAX_INTEGER = 2**63 - 1  # the largest seed a torch.Generator takes; also bounds max_new_tokens


@dataclass(frozen=True)
class RequestField:
    """One key of a request: its name, what it means, and the check of a set value."""

    name: str
    meaning: str
    check: Callable[[str, Any], None]  # (name, value); raises RequestError naming the field


def _string(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise RequestError(f"'{name}' must be a string, got {value!r}", name)


def _identifier(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise RequestError(f"'{name}' must be a non-empty string, got {value!r}", name)


def _list(name: str, value: Any) -> None:
    if not isinstance(value, list):
        raise RequestError(f"'{name}' must be a list, got {value!r}", name)


def _object(name: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise RequestError(f"'{name}' must be an object, got {value!r}", name)


def _integer(low: int) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(f"'{name}' must be an integer, got {value!r}", name)
        if not low <= value <= MAX_INTEGER:
            raise RequestError(f"'{name}'={value!r} must be in [{low}, {MAX_INTEGER}]", name)

    return check


def _sampling_number(name: str, value: Any) -> None:
    """A finite number within the range SamplingParams accepts for `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"'{name}' must be a finite number, got {value!r}", name)
    try:
        SamplingParams(**{name: value})
    except ValueError as e:
        raise RequestError(str(e), name) from None


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be true or false, got {value!r}", name)


def _top_logprobs(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise RequestError(f"'{name}' must be an integer in [0, {MAX_TOP_LOGPROBS}], got {value!r}", name)


def _logit_bias(name: str, value: Any) -> None:
    """{token id (an integer or its decimal string, as JSON keys are): bias in [-100, 100]}."""
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise RequestError(f"'{name}' must be an object of at most {MAX_LOGIT_BIAS} token ids, got {value!r}", name)
    for token, bias in value.items():
        if isinstance(token, bool) or not str(token).isdigit():
            raise RequestError(f"'{name}': key {token!r} is not a token id", name)
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise RequestError(f"'{name}[{token}]' must be a number in [-100, 100], got {bias!r}", name)


def _choice(name: str, value: Any) -> None:
    if value not in ("none", "auto", "required") and not isinstance(value, dict):
        raise RequestError(f"'{name}' must be 'none', 'auto', 'required' or a function object, got {value!r}", name)


def _stop(name: str, value: Any) -> None:
    check_stop_strings(value)


FIELDS: dict[str, RequestField] = {
    f.name: f
    for f in (
        RequestField("id", "the request's name in its record and stream items", _identifier),
        RequestField("prompt", "the user's text, one user turn after the images", _string),
        RequestField("images", "image sources (paths, file://, data: or http(s) URLs, bytes), in order", _list),
        RequestField(
            "videos",
            "videos after the images: sources as images', frame lists, or {video, video_start, video_end}",
            _list,
        ),
        RequestField("messages", "OpenAI-style chat turns, instead of prompt and images", _list),
        RequestField(
            "mm_processor_kwargs",
            "pixel budgets: min_pixels, max_pixels (images); fps, max_frames, video_min_pixels, video_max_pixels, "
            "video_total_pixels (videos)",
            _object,
        ),
        RequestField("max_new_tokens", "the most tokens to generate", _integer(1)),
        RequestField(
            "n", "choices to generate from one prefill of the prompt, choice i sampled with seed + i", _integer(1)
        ),
        RequestField("temperature", "0 is greedy; above 0, sample from the scaled distribution", _sampling_number),
        RequestField("top_p", "sample among the most likely tokens up to probability top_p", _sampling_number),
        RequestField("seed", "the seed of the request's sampling generator", _integer(0)),
        RequestField("ignore_eos", "generate max_new_tokens tokens, past end of sequence (benchmarks)", _boolean),
        RequestField("stop", f"a string or up to {MAX_STOP_STRINGS} strings the output ends before", _stop),
        RequestField("response_format", "OpenAI's: json_object, or json_schema {name, schema}", _object),
        RequestField("structured_outputs", "vLLM's: one of json, regex, choice, grammar (Lark)", _object),
        RequestField("top_k", "sample among the k most likely tokens (0 or -1: all)", _integer(-1)),
        RequestField("min_tokens", "end-of-sequence is not sampled before this many tokens", _integer(0)),
        RequestField("presence_penalty", "in [-2, 2]: subtracted from a generated token's logit", _sampling_number),
        RequestField("frequency_penalty", "in [-2, 2]: subtracted per time a token was generated", _sampling_number),
        RequestField("repetition_penalty", "in (0, 2]: vLLM's, over prompt and generated tokens", _sampling_number),
        RequestField("logit_bias", "{token id: bias in [-100, 100]} added to the logits", _logit_bias),
        RequestField(
            "tools", "OpenAI's function tools, rendered by the chat template or as hermes (tools_format)", _list
        ),
        RequestField(
            "tool_choice", "'none', 'auto', 'required' or {'type': 'function', 'function': {'name'}}", _choice
        ),
        RequestField("parallel_tool_calls", "with tool_choice 'required': one or more calls (default true)", _boolean),
        RequestField("logprobs", "return each output token's log-probability (raw, before sampling)", _boolean),
        RequestField(
            "top_logprobs", f"and the up to {MAX_TOP_LOGPROBS} most likely tokens at each step", _top_logprobs
        ),
    )
}
# The fields that override the run's SamplingParams, one a field of SamplingParams.
SAMPLING_FIELDS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "seed",
    "ignore_eos",
    "logprobs",
    "top_logprobs",
    "top_k",
    "min_tokens",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
)


def check_field(name: str, value: Any) -> None:
    """Check a set (not None) value of the field `name` (RequestError names the field)."""
    FIELDS[name].check(name, value)


def check_request_fields(request: Any) -> None:
    """Refuse a request that is not a dict, has a key that is not a request field, or a field's value
    of the wrong type or range.

    Raises:
        RequestError: (HTTP 400) whose `param` is the field at fault; an unknown key's message names the
            request's id and lists the fields.
    """
    if not isinstance(request, dict):
        raise RequestError(f"request is not a dict: {request!r}")
    for key, value in request.items():
        if key not in FIELDS:
            rid = request.get("id")
            who = f"request {rid!r}" if isinstance(rid, str) else "request"
            raise RequestError(f"{who}: unknown field {key!r}; a request takes {', '.join(FIELDS)}", str(key))
        if value is not None:
            check_field(key, value)
