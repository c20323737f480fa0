"""LangChain's ChatOpenAI against the OpenAI-compatible server (tp 1, world size 1, tiny checkpoint).

What a LangChain user writes first: structured output with a Pydantic model (method="json_schema") on
a message with an image, and a tool bound with a named tool_choice, then a second turn that carries the
tool's result back. The checkpoint's weights are random, so only constrained outputs are checked for
their content; free text is checked for its shape. One engine and one Serve application on a free
loopback port serve the module; the fixture shuts both down, also when a test or the start fails.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import jsonschema
import numpy as np
import pydantic
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_openai import ChatOpenAI
from PIL import Image

from cluster import start, stop
from cluster.openai_api import engine_request, parse_request
from cluster.serve import model_name, start_server, stop_server
from model.processor import PromptBuilder
from tests.ray_helpers import free_port, tiny_config, tiny_model

pytestmark = pytest.mark.slow  # its own engine and server

RAY_NUM_CPUS = 4
API_KEY = "sk-test-key"
NAMESPACE = "test-langchain"
MAX_TOKENS = 120  # enough for the bounded answers below to complete


@dataclass
class Server:
    url: str
    model: str
    builder: PromptBuilder

    def chat(self, **kwargs: Any) -> ChatOpenAI:
        return ChatOpenAI(
            base_url=f"{self.url}/v1", api_key=API_KEY, model=self.model, max_retries=0, timeout=120, **kwargs
        )


@pytest.fixture(scope="module")
def server(local_ray: None) -> Iterator[Server]:
    checkpoint = tiny_model()
    port = free_port()
    cfg = tiny_config(
        checkpoint,
        "world_size=1",
        "parallel_config.tp_size=1",
        "data_config.input_max_len=1024",  # a tools block (hermes format) and a second turn fit
        f"data_config.max_new_tokens={MAX_TOKENS}",
        f"serve.port={port}",
        f"serve.api_key={API_KEY}",
        f"ray.namespace={NAMESPACE}",
    )
    coordinator = start(cfg)
    try:
        start_server(cfg)
        yield Server(f"http://127.0.0.1:{port}", model_name(cfg), PromptBuilder.from_pretrained(checkpoint))
    finally:
        try:
            stop_server()
        finally:
            stop(coordinator)


def _data_url(width: int, height: int, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Scene(pydantic.BaseModel):
    """What is in the photo (bounded, so even a random-weight model's answer ends)."""

    weather: Literal["sunny", "rainy", "cloudy"]
    people: int = pydantic.Field(ge=0, le=9)


@tool
def count_people(region: Literal["left", "right", "all"], at_most: Annotated[int, pydantic.Field(ge=1, le=9)]) -> str:
    """Count the people in one region of the photo, up to at_most."""
    return f"{min(at_most, 2)} people on the {region}"


def test_structured_output_with_an_image_is_the_pydantic_model(server: Server) -> None:
    content = [
        {"type": "text", "text": "What is the weather, and how many people are there?"},
        {"type": "image_url", "image_url": {"url": _data_url(150, 100, 0)}},
    ]
    llm = server.chat(temperature=0, max_tokens=MAX_TOKENS)
    structured = llm.with_structured_output(Scene, method="json_schema", include_raw=True)
    result = structured.invoke([HumanMessage(content=content)])
    assert result["parsing_error"] is None and isinstance(result["parsed"], Scene)
    raw = result["raw"]
    assert raw.response_metadata["finish_reason"] == "stop"
    assert Scene.model_validate_json(raw.content) == result["parsed"]
    # The image arrived as a part of the prompt: as many prompt tokens as the processor builds from it.
    body = {"messages": [{"role": "user", "content": content}]}
    prepared = server.builder.build(engine_request(parse_request(json.dumps(body).encode()), "r"))
    assert raw.usage_metadata["input_tokens"] == len(prepared.input_ids)


def test_bound_tool_with_a_named_choice_then_its_result_in_a_second_turn(server: Server) -> None:
    llm = server.chat(temperature=0, max_tokens=MAX_TOKENS)
    question = HumanMessage("How many people are on the left?")
    # strict=True adds additionalProperties: false, which bounds the arguments' keys (docs/serving.md).
    reply = llm.bind_tools([count_people], tool_choice="count_people", strict=True).invoke([question])
    assert isinstance(reply, AIMessage) and reply.response_metadata["finish_reason"] == "tool_calls"
    assert not reply.invalid_tool_calls and len(reply.tool_calls) == 1
    call = reply.tool_calls[0]
    assert call["name"] == "count_people" and call["id"]
    jsonschema.validate(call["args"], convert_to_openai_tool(count_people)["function"]["parameters"])

    result = count_people.invoke(call)  # a ToolMessage with the call's id, as an agent loop makes it
    assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
    answer = llm.bind_tools([count_people], strict=True).invoke([question, reply, result])
    assert isinstance(answer.content, str) and not answer.tool_calls
    assert answer.response_metadata["finish_reason"] in ("stop", "length")
    assert answer.usage_metadata["input_tokens"] > reply.usage_metadata["input_tokens"]
