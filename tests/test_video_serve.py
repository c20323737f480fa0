"""Video parts in the OpenAI-compatible server: the schema and its translation, then (slow lane) the
openai client against `cluster.serve` (tp 1, tiny checkpoint) with a data URL and an http URL from a
loopback server, streamed and not, a second turn's cached_tokens, and 400s naming the part.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest

from cluster import start, stop
from cluster.openai_api import APIError, check_media, engine_request, parse_request, video_urls
from cluster.serve import start_server, stop_server
from tests.ray_helpers import free_port, tiny_config, tiny_model
from tests.video_files import make_frames, write_video

KWARGS = {"video_min_pixels": 28 * 28, "video_max_pixels": 112 * 168}
CLIP = write_video(None, make_frames(12, 112, 168, seed=9), 6, "mov")


def _body(content: list[dict], **fields: Any) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": content}], **fields}).encode()


def test_video_parts_translate_to_engine_parts() -> None:
    request = parse_request(
        _body(
            [
                {"type": "video_url", "video_url": {"url": "http://x/a.mp4"}, "video_end": 4.5},
                {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}},
                {"type": "text", "text": "Same?"},
            ],
            mm_processor_kwargs={"fps": 1.5, "max_frames": 16, "video_total_pixels": 100000},
        )
    )
    assert list(video_urls(request)) == [
        ("messages[0].content[0].video_url.url", "http://x/a.mp4"),
        ("messages[0].content[1].video_url.url", "data:video/mp4;base64,AAAA"),
    ]
    assert engine_request(request, "r", videos={"http://x/a.mp4": b"MP4"}) == {
        "id": "r",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": b"MP4", "video_end": 4.5},
                    {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}},
                    {"type": "text", "text": "Same?"},
                ],
            }
        ],
        "mm_processor_kwargs": {"fps": 1.5, "max_frames": 16, "video_total_pixels": 100000},
    }


@pytest.mark.parametrize(
    "content,kwargs,param",
    [
        ([{"type": "video_url", "video_url": {}}], None, "messages[0].content[0].video_url.url"),
        (
            [{"type": "video_url", "video_url": {"url": "x"}, "video_start": -1}],
            None,
            "messages[0].content[0].video_start",
        ),
        ([{"type": "text", "text": "hi"}], {"fps": 0}, "mm_processor_kwargs.fps"),
        ([{"type": "text", "text": "hi"}], {"nframes": 8}, "mm_processor_kwargs.nframes"),
    ],
)
def test_bad_video_parts_are_400s_naming_the_field(content: list, kwargs: dict | None, param: str) -> None:
    fields = {} if kwargs is None else {"mm_processor_kwargs": kwargs}
    with pytest.raises(APIError) as info:
        parse_request(_body(content, **fields))
    assert info.value.status == 400 and info.value.param == param


def test_local_video_paths_follow_the_media_policy(tmp_path: Path) -> None:
    request = parse_request(_body([{"type": "video_url", "video_url": {"url": "/etc/passwd.mp4"}}]))
    with pytest.raises(APIError) as info:
        check_media(request, None, None)
    assert info.value.param == "messages[0].content[0].video_url.url"
    with pytest.raises(APIError, match="inside serve.allowed_local_media_path"):
        check_media(request, str(tmp_path), None)
    inside = parse_request(_body([{"type": "video_url", "video_url": {"url": str(tmp_path / "a.mp4")}}]))
    check_media(inside, str(tmp_path), None)


# ------------------------------------------------------------------------------ the server
class _VideoHandler(BaseHTTPRequestHandler):
    def log_message(self, *_: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = CLIP if self.path == "/clip.mov" else b"not found"
        self.send_response(200 if self.path == "/clip.mov" else 404)
        self.send_header("Content-Type", "video/quicktime")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def video_host() -> Iterator[str]:
    """A loopback http server with /clip.mov; its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _VideoHandler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def client(local_ray: None) -> Iterator[openai.OpenAI]:
    port = free_port()
    cfg = tiny_config(
        tiny_model(),
        "world_size=1",
        "parallel_config.tp_size=1",
        "data_config.input_max_len=256",
        "kv_cache.block_size=4",
        f"serve.port={port}",
        "serve.allow_private_media_urls=true",
        "serve.max_video_seconds=60",
        "ray.namespace=test-video-serve",
    )
    coordinator = start(cfg)
    try:
        start_server(cfg)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    finally:
        try:
            stop_server()
        finally:
            stop(coordinator)


def _ask(client: openai.OpenAI, url: str, stream: bool, history: list[dict] | None = None) -> tuple[str, Any]:
    messages = [
        {
            "role": "user",
            "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What?"}],
        }
    ]
    messages += history or []
    extra = {"mm_processor_kwargs": KWARGS}
    if not stream:
        answer = client.chat.completions.create(model=None, messages=messages, max_tokens=4, extra_body=extra)
        return answer.choices[0].message.content, answer.usage
    chunks = client.chat.completions.create(
        model=None,
        messages=messages,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    text, usage = "", None
    for chunk in chunks:
        text += "".join(c.delta.content or "" for c in chunk.choices)
        usage = chunk.usage or usage
    return text, usage


@pytest.mark.slow  # a server of its own: about 40 s on 2 cores
def test_openai_client_sends_videos(client: openai.OpenAI, video_host: str) -> None:
    data_url = "data:video/quicktime;base64," + base64.b64encode(CLIP).decode()
    text, usage = _ask(client, data_url, stream=False)
    streamed, streamed_usage = _ask(client, f"{video_host}/clip.mov", stream=True)
    assert streamed == text  # the same video by either route, greedy
    assert usage.prompt_tokens == streamed_usage.prompt_tokens > 3 * 4 * 6
    # A second turn about the same video reuses its KV from the prefix cache.
    follow = [{"role": "assistant", "content": text}, {"role": "user", "content": "And then?"}]
    _, second = _ask(client, data_url, stream=False, history=follow)
    assert second.prompt_tokens_details.cached_tokens >= usage.prompt_tokens - 8


@pytest.mark.slow
def test_bad_videos_are_400s_naming_the_part(client: openai.OpenAI, video_host: str) -> None:
    for url, message in (
        ("data:video/mp4;base64," + base64.b64encode(b"\0" * 2048).decode(), "cannot decode video"),
        (f"{video_host}/missing.mp4", "HTTP 404"),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            _ask(client, url, stream=False)
        assert message in info.value.message and "messages[0].content[0]" in info.value.message
