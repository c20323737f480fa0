"""The OpenAI-compatible server with its safe defaults (only the port, one KV slot and a waiting
queue of one set): local files and loopback URLs refused, a body over serve.max_request_bytes
refused before it is read, and a full queue answered with 503 and Retry-After while the requests
already in it complete. Only loopback servers the tests start are ever contacted."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import ray
import requests

from cluster import start, stop
from cluster.config import ServeConfig
from cluster.serve import model_name, start_server, stop_server
from tests.media_servers import IMAGE, MediaServer, media_server
from tests.ray_helpers import free_port, tiny_config, tiny_model, wait_for

pytestmark = pytest.mark.integration

RAY_NUM_CPUS = 4
NAMESPACE = "test-serve-limits"
LONG_TOKENS = 400  # keeps the one slot busy while the queue fills
FIELD = "messages[0].content[0].image_url.url"


class Server:
    def __init__(self, cfg: Any, coordinator: Any, port: int) -> None:
        self.cfg, self.coordinator, self.port = cfg, coordinator, port
        self.url = f"http://127.0.0.1:{port}"
        self.model = model_name(cfg)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def status(self) -> dict:
        return ray.get(self.coordinator.status.remote(), timeout=30)


@pytest.fixture(scope="module")
def server(local_ray: None) -> Iterator[Server]:
    port = free_port()
    cfg = tiny_config(
        tiny_model(),
        "world_size=1",
        "parallel_config.tp_size=1",
        "data_config.batch_size=1",
        "data_config.input_max_len=256",
        f"data_config.max_new_tokens={LONG_TOKENS}",
        f"serve.port={port}",
        "serve.max_queued_requests=1",
        f"ray.namespace={NAMESPACE}",
    )
    coordinator = start(cfg)
    try:
        start_server(cfg)
        yield Server(cfg, coordinator, port)
    finally:
        try:
            stop_server()
        finally:
            stop(coordinator)


@pytest.fixture(scope="module")
def trap() -> Iterator[MediaServer]:
    """A loopback server that must never be asked for anything."""
    with media_server() as server:
        yield server


def _image_chat(server: Server, url: str) -> Any:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]
    return server.client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": content}], max_tokens=2
    )


def test_local_files_are_refused_by_default(server: Server, tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(IMAGE)
    for url in (str(tmp_path / "x.png"), f"file://{tmp_path / 'x.png'}"):
        with pytest.raises(openai.BadRequestError) as info:
            _image_chat(server, url)
        body = info.value.body
        assert body["param"] == FIELD and "serve.allowed_local_media_path" in body["message"], body


def test_loopback_urls_are_refused_before_any_connection(server: Server, trap: MediaServer) -> None:
    port = trap.server_address[1]
    for host in ("127.0.0.1", "localhost", "127.1", "[::ffff:127.0.0.1]"):
        with pytest.raises(openai.BadRequestError) as info:
            _image_chat(server, f"http://{host}:{port}/latest/meta-data/")
        body = info.value.body
        assert body["param"] == FIELD and "loopback" in body["message"], body
        assert "serve.allow_private_media_urls" in body["message"]
    assert trap.requests == []


def test_a_body_over_the_limit_is_refused_before_it_is_read(server: Server) -> None:
    """200 MB announced, 64 KiB sent: the 413 comes without the rest of the body."""
    announced = 200 * 1024 * 1024
    limit = ServeConfig().max_request_bytes
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {announced}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(head.encode() + b"{" + b" " * (64 * 1024))
        response = sock.makefile("rb")
        status = response.readline().split()
        headers = {}
        while (line := response.readline().strip()) and b":" in line:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        body = json.loads(response.read(int(headers[b"content-length"])))
    assert status[1] == b"413", status
    error = body["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "request_too_large"
    assert f"{announced} bytes is larger than serve.max_request_bytes={limit}" in error["message"]


def test_a_full_queue_answers_503_while_queued_requests_complete(server: Server) -> None:
    results: dict[str, Any] = {}

    def stream(name: str, max_tokens: int) -> None:
        try:
            chunks = list(
                server.client.chat.completions.create(
                    model=server.model,
                    messages=[{"role": "user", "content": f"Tell me about {name}."}],
                    max_tokens=max_tokens,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True},
                )
            )
            results[name] = chunks[-1].usage.completion_tokens
        except Exception as e:  # noqa: BLE001 - reported below
            results[name] = e

    running = threading.Thread(target=stream, args=("running", LONG_TOKENS))
    running.start()
    assert wait_for(lambda: server.status()["running"] == 1, timeout_s=60)
    queued = threading.Thread(target=stream, args=("queued", 4))
    queued.start()
    assert wait_for(lambda: server.status()["waiting"] == 1, timeout_s=60)
    with pytest.raises(openai.InternalServerError) as info:  # the one slot runs, the one queue place is taken
        server.client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    refused = info.value
    assert refused.status_code == 503 and refused.response.headers["retry-after"] == "5"
    assert refused.body["code"] == "queue_full" and "serve.max_queued_requests=1" in refused.body["message"]
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200  # health does not queue
    running.join(timeout=300)
    queued.join(timeout=300)
    assert results == {"running": LONG_TOKENS, "queued": 4}
    reply = server.client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert reply.usage.completion_tokens >= 1  # the places were given back
