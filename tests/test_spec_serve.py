"""Speculative decoding as a user meets it: the OpenAI server at tp 2, the `openai` client, the same text.

The server of conf/tiny_cpu.yaml (2 workers in one TP group) answers the same chat requests (text, an
image, a prompt that repeats itself) streamed and not: without speculation (vision dp), with
`speculative.method=ngram speculative.num_tokens=4` (vision dp), and with a draft sharded over both ranks
(vision tp; the target as its own draft). Greedy text must be the same everywhere; the draft's record says
its proposals were accepted.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
import ray
from PIL import Image

from cluster import start, stop
from cluster.serve import model_name, start_server, stop_server
from tests.ray_helpers import free_port, tiny_config, tiny_model

pytestmark = pytest.mark.slow  # three engines of two workers: about a minute and a half on 2 cores
TOKENS = 24


def _image_url() -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


MESSAGES = [
    [{"role": "user", "content": "Hello there, tell me a story."}],
    [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _image_url()}},
                {"type": "text", "text": "What is in this photo?"},
            ],
        }
    ],
    [{"role": "user", "content": "one two three four five one two three four five one two three four five one two"}],
]


def _answers(overrides: list[str], namespace: str) -> tuple[list[str], list[str], list[dict]]:
    """(non-streamed texts, streamed texts, the engine's records) from a server with `overrides`."""
    port = free_port()
    cfg = tiny_config(
        tiny_model(),
        f"serve.port={port}",
        f"data_config.max_new_tokens={TOKENS}",
        f"ray.namespace={namespace}",
        *overrides,
    )
    coordinator = start(cfg)
    try:
        # First, while the group's gate has measured nothing and so speculates: what the records say.
        repeat = {"id": "repeat", "messages": MESSAGES[2], "max_new_tokens": TOKENS}
        records = ray.get(coordinator.generate.remote([repeat]))
        start_server(cfg)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        plain, streamed = [], []
        for messages in MESSAGES:
            kwargs = {"model": model_name(cfg), "messages": messages, "max_tokens": TOKENS, "temperature": 0}
            plain.append(client.chat.completions.create(**kwargs).choices[0].message.content)
            chunks = client.chat.completions.create(**kwargs, stream=True)
            streamed.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
        return plain, streamed, records
    finally:
        try:
            stop_server()
        finally:
            stop(coordinator)


def test_the_server_answers_the_same_text_with_speculation(local_ray: None) -> None:
    draft = tiny_model()  # the target as its own draft: every proposal is accepted, so every round skips ahead
    plain, plain_streamed, [record] = _answers([], "spec-off")
    assert plain == plain_streamed and all(plain)
    assert record["spec_proposed_tokens"] == 0 and record["output_text"] == plain[2]
    ngram, ngram_streamed, [record] = _answers(["speculative.method=ngram", "speculative.num_tokens=4"], "spec-ngram")
    assert ngram == plain and ngram_streamed == plain
    assert record["output_text"] == plain[2]
    drafted, drafted_streamed, [record] = _answers(
        [
            "parallel_config.vision_mode=tp",
            "speculative.method=draft",
            "speculative.num_speculative_tokens=3",
            f"speculative.model={draft}",
        ],
        "spec-draft",
    )
    assert drafted == plain and drafted_streamed == plain
    assert record["output_text"] == plain[2] and record["spec_accepted_tokens"] > 0
