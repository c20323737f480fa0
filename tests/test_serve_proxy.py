"""The server on Serve's Python proxy, reached the way `serve.ingress=auto` reaches it when HAProxy
cannot start: a stream, a full answer, and a non-streamed request whose client leaves while it waits
for a KV slot (the proxy reports the disconnect, so the request is dropped)."""

from __future__ import annotations

import http.client
import json
import time

import openai
import pytest
import ray

import cluster.serve as serve_module
from cluster import start, stop
from cluster.serve import model_name, start_server, stop_server
from tests.ray_helpers import free_port, tiny_config, tiny_model, wait_for

RAY_NUM_CPUS = 4
NAMESPACE = "test-serve-proxy"
LONG_TOKENS = 20_000  # the fillers outlast every wait below (about a minute of decoding); the test aborts them
SLOTS = 2


def test_auto_falls_back_to_the_python_proxy(local_ray: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with_haproxy = serve_module.haproxy_env
    broken = {"RAY_SERVE_HAPROXY_BINARY_PATH": "/bin/false"}  # an HAProxy that exits at once
    monkeypatch.setattr(serve_module, "haproxy_env", lambda: {**with_haproxy(), **broken})
    port = free_port()
    cfg = tiny_config(
        tiny_model(),
        "world_size=1",
        "parallel_config.tp_size=1",
        f"data_config.batch_size={SLOTS}",
        "data_config.input_max_len=256",
        f"data_config.max_new_tokens={LONG_TOKENS}",
        f"serve.port={port}",
        f"ray.namespace={NAMESPACE}",
    )
    coordinator = start(cfg)
    try:
        assert start_server(cfg) == "proxy"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "Say something."}]
        reply = client.chat.completions.create(model=model_name(cfg), messages=messages, max_tokens=4, temperature=0)
        chunks = list(
            client.chat.completions.create(
                model=model_name(cfg), messages=messages, max_tokens=4, temperature=0, stream=True
            )
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert reply.usage.completion_tokens == 4 and streamed == reply.choices[0].message.content

        def status() -> dict:
            return ray.get(coordinator.status.remote(), timeout=30)

        fillers = [
            {"id": f"filler-{i}", "prompt": "A long story.", "max_new_tokens": LONG_TOKENS, "ignore_eos": True}
            for i in range(SLOTS)
        ]
        done = coordinator.generate.remote(fillers)
        try:
            assert wait_for(lambda: status()["running"] == SLOTS, timeout_s=60)
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            body = {"messages": messages, "max_tokens": 4}
            connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            assert wait_for(lambda: status()["waiting"] == 1, timeout_s=30)
            time.sleep(0.5)
            connection.close()
            left = wait_for(lambda: status()["waiting"] == 0, timeout_s=30)
            assert left, f"the request stayed queued 30 s after its client left: {status()}"
            assert status()["running"] == SLOTS  # it left the queue without being served
        finally:
            for filler in fillers:
                coordinator.abort.remote(filler["id"])
            ray.get(done, timeout=120)
    finally:
        try:
            stop_server()
        finally:
            stop(coordinator)
