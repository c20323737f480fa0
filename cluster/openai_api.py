"""OpenAI chat-completions schema and its translation to and from the Coordinator's request and record.

Only what the server needs: the request body (validated with pydantic; an error names the
field), the engine request built from it, the response and SSE chunk bodies and the error body.
Stop strings are checked by the engine's own rule (actors.stop_strings); the engine cuts them.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from actors.stop_strings import MAX_STOP_STRINGS as MAX_STOP_STRINGS  # one definition, re-exported
from actors.stop_strings import check_stop_strings
from actors.tools_format import ToolError, chosen_function, functions
from model.images import ImageLoadError, local_image_path
from model.sampling import MAX_TOP_LOGPROBS


class APIError(Exception):
    """An error answered with OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, type_: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _ERROR_TYPES.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    503: "service_unavailable",
}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ----------------------------------------------------------------------------------------- request
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Strict):
    url: str


class VideoPart(_Strict):
    """vLLM's video part; video_start / video_end (seconds) clip it, as qwen-vl-utils takes them."""

    type: Literal["video_url"]
    video_url: VideoURL
    video_start: float | None = Field(default=None, ge=0)
    video_end: float | None = Field(default=None, gt=0)


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name"

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None  # None: an assistant turn of tool_calls only
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls (cluster/tools_format.py)
    tool_call_id: str | None = None  # a tool result's call


class MMProcessorKwargs(_Strict):
    """vLLM's per-request image budget and qwen-vl-utils' video sampling; the engine checks their limits."""

    min_pixels: StrictInt | None = Field(default=None, ge=1)
    max_pixels: StrictInt | None = Field(default=None, ge=1)
    fps: float | None = Field(default=None, gt=0)
    max_frames: StrictInt | None = Field(default=None, ge=1)
    video_min_pixels: StrictInt | None = Field(default=None, ge=1)
    video_max_pixels: StrictInt | None = Field(default=None, ge=1)
    video_total_pixels: StrictInt | None = Field(default=None, ge=1)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The body of POST /v1/chat/completions. Fields we do not implement are refused, not ignored."""

    model_config = ConfigDict(extra="ignore")  # user, metadata, store, ...

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    mm_processor_kwargs: MMProcessorKwargs | None = None
    ignore_eos: bool | None = None  # vLLM's extension: generate exactly max_tokens (benchmarks)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = None  # checked by actors/grammars.py
    structured_outputs: dict[str, Any] | None = None  # vLLM's extension: json, regex, choice or grammar
    tools: list[Any] | None = None  # checked, rendered and parsed by cluster/tools_format.py
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id -> bias; checked by actors/request_fields.py
    repetition_penalty: float | None = Field(default=None, gt=0, le=2)  # vLLM's extensions from here
    top_k: int | None = Field(default=None, ge=-1)
    min_tokens: int | None = Field(default=None, ge=0)
    n: int | None = Field(default=None, ge=1)  # choices, from one prefill; at most serve.max_n (check_n)
    # Refused unless left at their defaults.
    functions: list[Any] | None = None
    function_call: Any = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str] | None:
        return check_stop_strings(value) or None

    def check_supported(self) -> None:
        """Raise a 400 for a parameter we do not implement."""
        if bool(self.functions) or self.function_call not in (None, "none"):
            raise APIError(
                400, "'functions' is not supported by this server", param="functions", code="unsupported_parameter"
            )
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, f"top_logprobs={self.top_logprobs} needs logprobs=true", param="top_logprobs")
        self._check_tools()

    def check_n(self, max_n: int) -> None:
        """A 400 naming `n` when it asks for more choices than serve.max_n."""
        if self.n is not None and self.n > max_n:
            raise APIError(400, f"n={self.n} is more choices than this server gives (serve.max_n={max_n})", "n")

    @property
    def choices(self) -> int:
        return self.n or 1

    def known_tools(self) -> dict[str, dict]:
        """The request's functions by name ({} without tools)."""
        return functions(self.tools or [])

    def parses_tools(self) -> bool:
        """Whether the answer's `<tool_call>` blocks become tool_calls (tools given, tool_choice not 'none')."""
        return bool(self.tools) and self.tool_choice != "none"

    def _check_tools(self) -> None:
        try:
            known = self.known_tools()
            chosen_function(self.tool_choice, known)
        except ToolError as e:
            raise APIError(400, str(e), param=e.param) from None
        forced = self.tool_choice not in (None, "none", "auto")
        if forced and not known:
            raise APIError(400, f"tool_choice={self.tool_choice!r} needs tools", param="tool_choice")
        if forced and (self.response_format not in (None, {"type": "text"}) or self.structured_outputs is not None):
            raise APIError(
                400, "tool_choice 'required' or a named function cannot go with a response format", "tool_choice"
            )
        for i, message in enumerate(self.messages):
            if message.content is None and not (message.role == "assistant" and message.tool_calls):
                raise APIError(400, f"messages[{i}].content is required", param=f"messages[{i}].content")
            if message.role == "tool" and not isinstance(message.content, str):
                raise APIError(
                    400, f"messages[{i}].content of a tool result must be a string", f"messages[{i}].content"
                )


def parse_request(body: bytes) -> ChatCompletionRequest:
    """The validated request, or a 400 naming the field (``messages[0].content``)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}")
    try:
        request = ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        error = max(e.errors(), key=lambda err: len(err["loc"]))  # the deepest: the most specific
        param = _field_path(error["loc"])
        raise APIError(400, f"{param}: {error['msg']}" if param else error["msg"], param=param) from None
    request.check_supported()
    return request


def _field_path(loc: tuple[Any, ...]) -> str:
    """pydantic's error location as a field path (``messages[0].content[1].text``).

    Union branch names (``str``, ``list[...]``) are dropped, and so is the tag pydantic adds after
    the index of a tagged-union item.
    """
    out, tag_next = "", 0
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            tag_next = max(tag_next - 1, 0)
            continue
        if part.startswith("list[tagged-union"):
            tag_next = 2  # the index, then the tag
        elif tag_next == 1:
            tag_next = 0
        elif "[" not in part and part not in ("str", "int", "bool"):
            out += f".{part}" if out else part
    return out


def engine_request(
    request: ChatCompletionRequest,
    request_id: str,
    images: dict[str, bytes] | None = None,
    videos: dict[str, bytes] | None = None,
) -> dict[str, Any]:
    """The Coordinator's request dict for a chat request; `images` and `videos` map fetched http(s) URLs to bytes."""
    images = images or {}
    videos = videos or {}
    messages = []
    for message in request.messages:
        if message.tool_calls or message.role == "tool" or message.content is None:
            messages.append(message.model_dump(exclude_none=True))
            continue
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
            continue
        parts: list[dict[str, Any]] = []
        for part in message.content:
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            elif isinstance(part, VideoPart):
                clip = {"video_start": part.video_start, "video_end": part.video_end}
                clip = {k: v for k, v in clip.items() if v is not None}
                url = part.video_url.url
                if url in videos:
                    parts.append({"type": "video", "video": videos[url], **clip})
                else:
                    parts.append({"type": "video_url", "video_url": {"url": url}, **clip})
            elif part.image_url.url in images:
                parts.append({"type": "image", "image": images[part.image_url.url]})
            else:
                parts.append({"type": "image_url", "image_url": {"url": part.image_url.url}})
        messages.append({"role": message.role, "content": parts})
    out: dict[str, Any] = {"id": request_id, "messages": messages}  # tools: rendered as it prepares (tools_format)
    max_tokens = request.max_completion_tokens or request.max_tokens
    for key, value in (
        ("max_new_tokens", max_tokens),
        ("temperature", request.temperature),
        ("top_p", request.top_p),
        ("seed", request.seed),
        ("stop", request.stop),
        ("ignore_eos", request.ignore_eos),
        ("logprobs", request.logprobs),
        ("top_logprobs", request.top_logprobs if request.logprobs else None),
        ("response_format", request.response_format),
        ("presence_penalty", request.presence_penalty),
        ("frequency_penalty", request.frequency_penalty),
        ("repetition_penalty", request.repetition_penalty),
        ("logit_bias", request.logit_bias),
        ("top_k", request.top_k),
        ("min_tokens", request.min_tokens),
        ("n", request.n if request.choices > 1 else None),
        ("structured_outputs", request.structured_outputs),
        ("tools", request.tools),
        ("tool_choice", request.tool_choice),
        ("parallel_tool_calls", request.parallel_tool_calls),
        (
            "mm_processor_kwargs",
            request.mm_processor_kwargs and request.mm_processor_kwargs.model_dump(exclude_none=True),
        ),
    ):
        if value is not None:
            out[key] = value
    return out


HTTP_SCHEMES = ("http://", "https://")


def image_urls(request: ChatCompletionRequest) -> Iterator[tuple[str, str]]:
    """(field path, url) of every image part, in order: ("messages[1].content[0].image_url.url", url)."""
    for i, message in enumerate(request.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if isinstance(part, ImagePart):
                    yield f"messages[{i}].content[{j}].image_url.url", part.image_url.url


def video_urls(request: ChatCompletionRequest) -> Iterator[tuple[str, str]]:
    """(field path, url) of every video part, in order: ("messages[0].content[1].video_url.url", url)."""
    for i, message in enumerate(request.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if isinstance(part, VideoPart):
                    yield f"messages[{i}].content[{j}].video_url.url", part.video_url.url


def http_image_urls(request: ChatCompletionRequest) -> list[str]:
    """The distinct http(s) image URLs of a request, in order (the server fetches them)."""
    return list(dict.fromkeys(url for _, url in image_urls(request) if url.startswith(HTTP_SCHEMES)))


def check_media(
    request: ChatCompletionRequest, allowed_local_path: str | None, allowed_domains: list[str] | None
) -> None:
    """Refuse, with a 400 naming the part, an image or video URL outside the server's media policy: a
    local path or file:// URL when `allowed_local_path` is None or outside it, an http(s) URL whose
    host is not in `allowed_domains` (None: no limit; the addresses are checked when fetched)."""
    for field, url in (*image_urls(request), *video_urls(request)):
        if url.startswith("data:"):
            continue
        if url.startswith(HTTP_SCHEMES):
            host = urlparse(url).hostname or ""
            if allowed_domains is not None and host not in allowed_domains:
                raise APIError(400, f"{field}: image host {host!r} is not in serve.allowed_media_domains", param=field)
            continue
        if allowed_local_path is None:
            raise APIError(
                400,
                f"{field}: local image paths and file:// URLs are not allowed; send a data: or http(s) URL "
                "(the server's operator can allow a directory with serve.allowed_local_media_path)",
                param=field,
            )
        try:
            path = local_image_path(url)
        except ImageLoadError as e:
            raise APIError(400, f"{field}: {e}", param=field) from None
        real = os.path.realpath(path)
        if not path.is_absolute() or os.path.commonpath([real, allowed_local_path]) != allowed_local_path:
            raise APIError(
                400,
                f"{field}: a local image must be an absolute path inside "
                f"serve.allowed_local_media_path={allowed_local_path}",
                param=field,
            )


# ---------------------------------------------------------------------------------------- response
def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(record: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens` counts the prompt tokens served from the
    prefix cache. With n > 1 choices the prompt counts once and the completion tokens of every choice."""
    prompt = int(record.get("prompt_tokens") or 0)
    if record.get("choices"):
        completion = sum(len(choice["token_ids"]) for choice in record["choices"])
    else:
        completion = len(record.get("output_token_ids") or ())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": int(record.get("cached_tokens") or 0)},
    }


def finish_reason(record: dict[str, Any]) -> str:
    """OpenAI's finish_reason: "stop" for EOS or a stop string (or an answer of tool calls, which
    `completion_choice` names), else "length"."""
    return "stop" if record.get("finish_reason") in ("stop", "tool_calls") else "length"


def choice_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """A choice's `logprobs` object from a record's entries (None when the request did not ask)."""
    return None if entries is None else {"content": entries, "refusal": None}


def completion_choice(
    index: int,
    content: str | None,
    reason: str,
    logprobs: list[dict[str, Any]] | None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One choice of a chat.completion; with tool_calls (cluster/tools_format.parse_calls), finish_reason
    'tool_calls'."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"], reason = tool_calls, "tool_calls"
    return {"index": index, "message": message, "logprobs": choice_logprobs(logprobs), "finish_reason": reason}


def completion_body(
    completion_id: str,
    model: str,
    created: int,
    content: str | None,
    reason: str,
    record: dict[str, Any],
    tool_calls: list[dict[str, Any]] | None = None,
    choices: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A chat.completion of one choice (content, reason, the record's logprobs, tool_calls), or of `choices`
    (`completion_choice` each, n > 1); usage from the record."""
    if choices is None:
        choices = [completion_choice(0, content, reason, record.get("logprobs"), tool_calls)]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(record),
    }


def chunk_body(
    completion_id: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None,
    reason: str | None = None,
    usage_: dict[str, int] | None = None,
    include_usage: bool = False,
    logprobs: list[dict[str, Any]] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    """A chat.completion.chunk of choice `index`; with delta None, the usage-only chunk (no choices).
    `logprobs`: the entries of the delta's tokens (a record's `logprobs` field), when the request asked."""
    body: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
    choice = {"index": index, "delta": delta, "logprobs": choice_logprobs(logprobs), "finish_reason": reason}
    body["choices"] = [] if delta is None else [choice]
    if include_usage:
        body["usage"] = usage_
    return body


def sse(body: dict[str, Any] | str) -> bytes:
    data = body if isinstance(body, str) else json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def now() -> int:
    return int(time.time())
