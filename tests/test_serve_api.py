"""The chat-completions schema and its translation, without a server: request errors, chunks, error statuses."""

from __future__ import annotations

import json

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from cluster.openai_api import (
    APIError,
    check_media,
    chunk_body,
    completion_body,
    completion_choice,
    engine_request,
    http_image_urls,
    parse_request,
)

USER = {"role": "user", "content": "hi"}


def _body(**fields) -> bytes:
    return json.dumps({"messages": [USER], **fields}).encode()


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "must be a JSON object"),
        (json.dumps({"messages": []}).encode(), "messages", "at least 1"),
        (json.dumps({"model": "m"}).encode(), "messages", "Field required"),
        (json.dumps({"messages": [{"role": "bot", "content": "x"}]}).encode(), "messages[0].role", "Input should be"),
        (
            json.dumps({"messages": [{"role": "user", "content": [{"type": "text"}]}]}).encode(),
            "messages[0].content[0].text",
            "Field required",
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}).encode(),
            "messages[0].content[0]",
            "tag",
        ),
        (_body(max_tokens=0), "max_tokens", "greater than or equal to 1"),
        (_body(temperature=-1), "temperature", "greater than or equal to 0"),
        (_body(top_p=0), "top_p", "greater than 0"),
        (_body(stop=["a", "b", "c", "d", "e"]), "stop", "at most 4 stop strings"),
        (_body(stop=""), "stop", "must not be empty"),
        (_body(n=0), "n", "greater than or equal to 1"),
        (_body(logprobs=True, top_logprobs=21), "top_logprobs", "less than or equal to 20"),
        (_body(logprobs=False, top_logprobs=1), "top_logprobs", "needs logprobs=true"),
        (_body(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="auto", n=0), "n", "or equal to 1"),
        (_body(mm_processor_kwargs={"max_pixels": "many"}), "mm_processor_kwargs.max_pixels", "valid integer"),
        (_body(mm_processor_kwargs={"dpi": 3}), "mm_processor_kwargs.dpi", "Extra inputs"),
        (_body(stream="yes please"), "stream", "valid boolean"),
    ],
)
def test_bad_requests_name_the_field(body: bytes, param: str | None, message: str) -> None:
    with pytest.raises(APIError) as info:
        parse_request(body)
    error = info.value
    assert error.status == 400 and error.param == param and message in error.message
    assert error.body() == {
        "error": {"message": error.message, "type": "invalid_request_error", "param": param, "code": error.code}
    }


def test_engine_request() -> None:
    request = parse_request(
        _body(
            messages=[
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is it?"},
                        {"type": "image_url", "image_url": {"url": "http://x/a.png"}},
                        {"type": "image_url", "image_url": {"url": "/tmp/b.png"}},
                    ],
                },
            ],
            max_completion_tokens=7,
            max_tokens=3,
            temperature=0.5,
            seed=3,
            stop="END",
            mm_processor_kwargs={"max_pixels": 50000},
            user="someone",
        )
    )
    assert http_image_urls(request) == ["http://x/a.png"]
    assert engine_request(request, "r1", {"http://x/a.png": b"PNG"}) == {
        "id": "r1",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is it?"},
                    {"type": "image", "image": b"PNG"},
                    {"type": "image_url", "image_url": {"url": "/tmp/b.png"}},
                ],
            },
        ],
        "max_new_tokens": 7,
        "temperature": 0.5,
        "seed": 3,
        "stop": ["END"],
        "mm_processor_kwargs": {"max_pixels": 50000},
    }
    assert engine_request(parse_request(_body()), "r2") == {"id": "r2", "messages": [USER]}


def test_n_choices_count_the_prompt_once_and_n_above_max_n_is_refused_naming_n() -> None:
    request = parse_request(_body(n=3))
    request.check_n(3)
    assert engine_request(request, "r")["n"] == 3 and "n" not in engine_request(parse_request(_body(n=1)), "r")
    with pytest.raises(APIError) as info:
        request.check_n(2)
    assert (info.value.status, info.value.param) == (400, "n") and "serve.max_n=2" in info.value.message
    record = {
        "output_text": "a",
        "output_token_ids": [5],
        "prompt_tokens": 11,
        "choices": [
            {"index": 0, "text": "a", "token_ids": [5], "finish_reason": "length", "logprobs": None},
            {"index": 1, "text": "bc", "token_ids": [6, 7], "finish_reason": "stop", "logprobs": None},
        ],
    }
    choices = [completion_choice(c["index"], c["text"], c["finish_reason"], None) for c in record["choices"]]
    completion = ChatCompletion.model_validate(completion_body("c", "tiny", 1, None, "", record, choices=choices))
    assert [c.message.content for c in completion.choices] == ["a", "bc"]
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (11, 3)
    chunk = ChatCompletionChunk.model_validate(chunk_body("c", "tiny", 1, {"content": "b"}, index=1))
    assert chunk.choices[0].index == 1


def test_bodies_parse_as_openai_types() -> None:
    record = {"output_text": "hi there", "output_token_ids": [5, 6, 7], "prompt_tokens": 11}
    completion = ChatCompletion.model_validate(completion_body("c1", "tiny", 1, "hi there", "stop", record))
    assert completion.choices[0].message.content == "hi there"
    assert completion.usage.total_tokens == 14 and completion.choices[0].finish_reason == "stop"
    chunk = ChatCompletionChunk.model_validate(chunk_body("c1", "tiny", 1, {"content": "hi"}))
    assert chunk.choices[0].delta.content == "hi" and chunk.usage is None
    last = ChatCompletionChunk.model_validate(
        chunk_body(
            "c1",
            "tiny",
            1,
            None,
            usage_={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            include_usage=True,
        )
    )
    assert last.choices == [] and last.usage.completion_tokens == 2


def test_engine_errors_map_to_http_statuses() -> None:
    import asyncio

    from ray.exceptions import RayActorError

    from actors.errors import NoLiveGroupError, RequestError
    from cluster.serve import OpenAIServer, _engine_error, _record_error
    from model.processor import InvalidRequestError

    # By type and attribute: a message that merely mentions a field or "no live DP group" maps to nothing.
    error = _engine_error(InvalidRequestError("request r: bad pixels", "mm_processor_kwargs.max_pixels"))
    assert (error.status, error.param) == (400, "mm_processor_kwargs.max_pixels")
    error = _engine_error(RequestError("request 'r': prompt has 900 tokens, more than input_max_len=512", "messages"))
    assert (error.status, error.param) == (400, "messages") and "input_max_len" in error.message
    error = _engine_error(NoLiveGroupError())
    assert (error.status, error.param, error.type) == (503, None, "service_unavailable")
    error = _engine_error(ValueError("no live DP group to serve it; 'temperature' is fine"))
    assert (error.status, error.param) == (400, None)
    assert _engine_error(RayActorError()).status == 503
    assert _engine_error(RuntimeError("boom")).status == 500
    assert _record_error({"error": "no live DP group to serve it (dp group 0 died)", "error_status": 503}).status == 503
    assert _record_error({"error": "shard-worker-0 (rank 0) of dp group 0 died", "error_status": 500}).status == 500
    assert _record_error({"error": "no live DP group to serve it"}).status == 500  # no status: not guessed from text

    class Status:
        def __init__(self, live: int) -> None:
            self.live = live

        async def remote(self) -> dict:
            return {"live_groups": self.live, "dp_size": 1, "waiting": 0, "running": 0}

    server = object.__new__(OpenAIServer.func_or_class)
    server.coordinator = type("Coordinator", (), {"status": Status(0)})()
    with pytest.raises(APIError) as info:
        asyncio.run(server.health())
    assert info.value.status == 503 and "no live DP group" in info.value.message
    server.coordinator.status = Status(1)
    assert asyncio.run(server.health())["live_groups"] == 1


def test_ingress_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster import serve

    monkeypatch.setattr(serve, "haproxy_binary", lambda: "/usr/sbin/haproxy")
    assert [serve.resolve_ingress(i) for i in ("auto", "haproxy", "proxy")] == ["haproxy", "haproxy", "proxy"]
    monkeypatch.setattr(serve, "haproxy_binary", lambda: None)
    assert [serve.resolve_ingress(i) for i in ("auto", "proxy")] == ["proxy", "proxy"]
    with pytest.raises(RuntimeError, match="serve.ingress=haproxy but no HAProxy binary"):
        serve.resolve_ingress("haproxy")


def test_haproxy_binary_follows_serves_override(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from cluster.serve import haproxy_binary

    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", "/bin/true")
    assert haproxy_binary() == "/bin/true"
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "missing"))
    assert haproxy_binary() is None


def test_media_policy(tmp_path) -> None:
    allowed = tmp_path / "media"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "a.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"x")
    (allowed / "escape.png").symlink_to(tmp_path / "secret.png")
    root = str(allowed.resolve())

    def request(*urls: str):
        parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
        return parse_request(_body(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": parts}]))

    ok = request(
        f"{allowed}/sub/a.png",
        f"file://{allowed}/sub/a.png",
        "data:image/png;base64,AAAA",
        "https://img.example.com/x.png",
    )
    check_media(ok, root, ["img.example.com"])
    check_media(request("http://anywhere/x.png"), None, None)  # no domain list: any host (addresses checked later)
    refused = [
        (str(tmp_path / "secret.png"), "allowed_local_media_path"),
        (f"{allowed}/../secret.png", "allowed_local_media_path"),
        (str(allowed / "escape.png"), "allowed_local_media_path"),  # a symlink out of the directory
        ("media/sub/a.png", "absolute path"),
        ("file://otherhost/etc/passwd", "another host"),
        ("https://evil.example.org/x.png", "'evil.example.org' is not in serve.allowed_media_domains"),
    ]
    for url, message in refused:
        with pytest.raises(APIError) as info:
            check_media(request(f"{allowed}/sub/a.png", url), root, ["img.example.com"])
        assert info.value.status == 400 and message in info.value.message, (url, info.value.message)
        assert info.value.param == "messages[1].content[1].image_url.url"


def test_local_media_is_off_by_default(tmp_path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    for url in (str(tmp_path / "a.png"), f"file://{tmp_path / 'a.png'}", "relative.png", "ftp://host/a.png"):
        parts = [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]
        with pytest.raises(APIError) as info:
            check_media(parse_request(_body(messages=[{"role": "user", "content": parts}])), None, None)
        error = info.value
        assert error.status == 400 and error.param == "messages[0].content[1].image_url.url"
        assert "not allowed" in error.message and "serve.allowed_local_media_path" in error.message


def _request(body: bytes, chunks: int = 1, content_length: bool = True):
    """A starlette Request whose body arrives in `chunks` pieces."""
    from starlette.requests import Request

    size = -(-len(body) // chunks)
    pieces = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)]
    headers = [(b"content-length", str(len(body)).encode())] if content_length else []

    async def receive() -> dict:
        return messages.pop(0)

    return Request({"type": "http", "method": "POST", "headers": headers}, receive), messages


def test_request_body_limit() -> None:
    import asyncio

    from cluster.request_limits import read_body

    body = b"x" * 1000
    assert asyncio.run(read_body(_request(body, chunks=3)[0], 1000)) == body
    request, unread = _request(body, chunks=3)
    with pytest.raises(APIError) as info:  # refused on its Content-Length: nothing read
        asyncio.run(read_body(request, 999))
    assert info.value.status == 413 and "1000 bytes is larger than serve.max_request_bytes=999" in info.value.message
    assert len(unread) == 3 and info.value.body()["error"]["type"] == "invalid_request_error"
    request, unread = _request(body, chunks=4, content_length=False)  # chunked: cut once over the limit
    with pytest.raises(APIError, match="larger than serve.max_request_bytes=300") as info:
        asyncio.run(read_body(request, 300))
    assert info.value.status == 413 and len(unread) == 2


def test_total_pixels_per_request(tmp_path) -> None:
    import base64

    from cluster.request_limits import check_pixels, image_sources
    from tests.media_servers import png_bytes

    (tmp_path / "local.png").write_bytes(png_bytes(50, 40))
    urls = [
        "data:image/png;base64," + base64.b64encode(png_bytes(30, 20)).decode(),  # 600
        "http://images.test/a.png",  # 100 x 10 = 1000, fetched
        "data:image/png;base64,!!!",  # malformed: left to the engine
        "data:image/png;base64," + base64.b64encode(b"not an image").decode(),  # idem
        str(tmp_path / "local.png"),  # 2000
    ]
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    request = parse_request(_body(messages=[{"role": "user", "content": parts}]))
    fetched = {"http://images.test/a.png": png_bytes(100, 10)}
    check_pixels(image_sources(request, fetched), 3600)
    with pytest.raises(APIError) as info:
        check_pixels(image_sources(request, fetched), 3599)
    error = info.value
    assert (error.status, error.param, error.code) == (400, "messages[0].content[4].image_url.url", "too_many_pixels")
    assert "3600 pixels in total, more than serve.max_request_pixels=3599" in error.message
    with pytest.raises(APIError) as info:
        check_pixels(image_sources(request, fetched), 1000)
    assert info.value.param == "messages[0].content[1].image_url.url"


def test_errors_name_the_api_fields() -> None:
    from cluster.request_limits import with_api_names

    engine = APIError(400, "prompt of 9 tokens + max_new_tokens=1000000000 needs 1000000009 KV slots", "max_new_tokens")
    error = with_api_names(engine, parse_request(_body(max_tokens=10**9)))
    assert (error.status, error.param) == (400, "max_tokens")
    assert "max_tokens=1000000000" in error.message and "max_new_tokens" not in error.message
    error = with_api_names(engine, parse_request(_body(max_completion_tokens=10**9)))
    assert error.param == "max_completion_tokens" and "max_completion_tokens=1000000000" in error.message
    other = APIError(400, "messages[0].content: bad", param="messages[0].content")
    assert with_api_names(other, parse_request(_body())) is other


def test_admission_bounds_the_queue() -> None:
    from cluster.admission import Admission, Overloaded

    admission = Admission(slots=2, max_queued=1, retry_after_s=2.5)
    tickets = [admission.enter() for _ in range(3)]
    with pytest.raises(Overloaded) as info:
        admission.enter()
    error = info.value
    assert (error.status, error.code, error.headers) == (503, "queue_full", {"Retry-After": "3"})
    assert "serve.max_queued_requests=1" in error.message and error.body()["error"]["type"] == "service_unavailable"
    tickets[0].release()
    tickets[0].release()  # once only
    assert admission.active == 2
    admission.enter()
    with pytest.raises(Overloaded):
        admission.enter()


def _server(queue_timeout_s: float | None):
    """An OpenAIServer without Ray: a coordinator that records aborts."""
    from cluster.admission import Admission
    from cluster.config import ServeConfig
    from cluster.serve import OpenAIServer

    aborted: list[str] = []
    server = object.__new__(OpenAIServer.func_or_class)
    server.settings = ServeConfig(queue_timeout_s=queue_timeout_s, retry_after_s=1)
    server.model = "tiny"
    server.admission = Admission(1, 0, 1)
    server.coordinator = type("C", (), {"abort": type("A", (), {"remote": staticmethod(aborted.append)})()})()
    return server, aborted


class _SilentStream:
    """An engine stream that never yields (the request waits for a slot)."""

    def __aiter__(self):
        return self

    async def __anext__(self):
        import asyncio

        await asyncio.Event().wait()

    def ready(self):
        return None


def test_queue_timeout_drops_a_request_without_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import time

    from cluster import serve
    from cluster.admission import Overloaded

    server, aborted = _server(queue_timeout_s=0.05)
    with pytest.raises(Overloaded) as info:
        asyncio.run(server._next(_SilentStream(), 0.05))
    assert (info.value.status, info.value.code) == (503, "queue_timeout")
    assert "serve.queue_timeout_s=0.05" in info.value.message and info.value.headers == {"Retry-After": "1"}

    # A stream, answered at once, gets the error as its last event and the request is aborted.
    monkeypatch.setattr(serve, "KEEPALIVE_S", 0.01)
    ticket = server.admission.enter()
    body = parse_request(_body(stream=True))

    async def events() -> list[bytes]:
        ack = {"final": False}
        gen = server._events(_SilentStream(), ack, "c1", body, ticket, time.monotonic() + 0.05)
        return [event async for event in gen]

    events_ = asyncio.run(events())
    assert b'"role":"assistant"' in events_[0] and events_[-1] == b"data: [DONE]\n\n"
    error = json.loads(events_[-2].removeprefix(b"data: "))["error"]
    assert error["code"] == "queue_timeout" and aborted == ["c1"] and server.admission.active == 0


def test_every_delivered_token_gets_a_chunk_and_items_that_gathered_go_out_in_one_write() -> None:
    """A token that completes no character still gets its chunk (empty content, as vLLM streams); the items
    that arrived while the server was writing go out together, one chunk each, and the final record with them."""
    import asyncio

    from actors.deliveries import RequestStream

    server, aborted = _server(queue_timeout_s=None)
    body = parse_request(_body(stream=True))

    async def events() -> list[bytes]:
        queue: asyncio.Queue = asyncio.Queue()
        stream = RequestStream(None, "0", queue, None, ack=False)  # type: ignore[arg-type]
        for text in ("", "b"):
            queue.put_nowait({"id": "c1", "token_ids": [7], "text": text})
        queue.put_nowait({"id": "c1", "final": True, "error": None, "finish_reason": "length"})
        first = {"id": "c1", "token_ids": [5], "text": "a"}
        return [event async for event in server._events(stream, first, "c1", body, server.admission.enter(), None)]

    writes = asyncio.run(events())
    assert b'"role":"assistant"' in writes[0] and writes[-1] == b"data: [DONE]\n\n"
    deltas = [json.loads(e) for e in writes[1].split(b"data: ")[1:]]
    assert [d["choices"][0]["delta"]["content"] for d in deltas] == ["a", "", "b"]  # one write, one chunk per token
    assert json.loads(writes[2].removeprefix(b"data: "))["choices"][0]["finish_reason"] == "length"
    assert aborted == [] and server.admission.active == 0


def test_a_request_stream_hands_over_what_arrived_without_waiting_and_keeps_an_error_for_its_next_item() -> None:
    import asyncio

    from actors.deliveries import RequestStream

    async def run() -> None:
        queue: asyncio.Queue = asyncio.Queue()
        stream = RequestStream(None, "0", queue, None, ack=False)  # type: ignore[arg-type]
        assert stream.ready() is None  # nothing yet: no wait
        queue.put_nowait({"text": "a"})
        queue.put_nowait(RuntimeError("the Coordinator died"))
        assert stream.ready() == {"text": "a"}
        assert stream.ready() is None  # the error is not an item
        with pytest.raises(RuntimeError, match="the Coordinator died"):
            await stream.__anext__()

    asyncio.run(run())
