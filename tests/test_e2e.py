"""End to end through the Coordinator on CPU, tp 2 x dp 2: tokens equal transformers' greedy choices.

Every output token is checked against transformers' logits after the same prefix (tests/reference.py):
it must be the reference's best, or a near tie, where the reference's own top-2 gap is below
NEAR_TIE_MARGIN, and the test allows at most MAX_NEAR_TIES of those.

One local Ray cluster (conftest's local_ray) and one started engine serve the whole module; the
requests are conftest's PROMPTS on its generated images.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import ray

from cluster import start, stop
from model.processor import PromptBuilder
from tests.ray_helpers import CONTRACT_FIELDS, tiny_config
from tests.reference import Generated, assert_greedy_matches_reference

MAX_NEW_TOKENS = 6
NAMESPACE = "test-e2e"


@pytest.fixture(scope="module")
def engine(local_ray, tiny_checkpoint: Path):
    cfg = tiny_config(
        tiny_checkpoint,
        "world_size=4",
        "parallel_config.tp_size=2",
        "data_config.batch_size=2",
        f"data_config.max_new_tokens={MAX_NEW_TOKENS}",
        f"ray.namespace={NAMESPACE}",
    )
    coordinator = start(cfg)
    yield coordinator
    stop(coordinator)


def _requests(raw_requests: dict[str, dict]) -> list[dict]:
    """Every request of conftest's PROMPTS (text, one and two images), twice over: more than one batch per DP group."""
    return [{**request, "id": f"{name}-{round_}"} for round_ in range(2) for name, request in raw_requests.items()]


def test_greedy_tokens_match_transformers(engine, tiny_checkpoint, raw_requests, hf_reference):
    requests = _requests(raw_requests)
    records = ray.get(engine.generate.remote(requests), timeout=300)
    assert [r["id"] for r in records] == [r["id"] for r in requests]
    assert all(r["error"] is None for r in records), [r["error"] for r in records]
    # Both DP groups served several requests.
    served = Counter(r["dp_rank"] for r in records)
    assert set(served) == {0, 1} and min(served.values()) >= 2, served

    builder = PromptBuilder.from_pretrained(tiny_checkpoint)
    outputs = []
    for record, raw in zip(records, requests):
        request = builder.build(raw)
        assert record["prompt_tokens"] == len(request.input_ids)
        outputs.append(
            Generated(record["id"], request, record["output_token_ids"], MAX_NEW_TOKENS, builder.eos_token_ids)
        )
    assert_greedy_matches_reference(hf_reference, tiny_checkpoint, outputs)


def test_records_have_contract_fields(engine, raw_requests):
    requests = _requests(raw_requests)[:3]
    records = ray.get(engine.generate.remote(requests), timeout=300)
    for record in records:
        assert set(CONTRACT_FIELDS) <= set(record), record.keys()
        assert isinstance(record["id"], str) and record["error"] is None
        assert all(isinstance(t, int) for t in record["output_token_ids"])
        assert isinstance(record["output_text"], str) and record["prompt_tokens"] > 0
        assert 0 < record["ttft_s"] <= record["e2e_s"]
        n = len(record["output_token_ids"])
        expected = (record["e2e_s"] - record["ttft_s"]) / (n - 1)
        assert record["tpot_s"] == pytest.approx(expected)


def test_per_request_max_new_tokens_and_temperature(engine, tiny_checkpoint):
    eos = set(PromptBuilder.from_pretrained(tiny_checkpoint).eos_token_ids)
    prompt = "Describe the weather today and tomorrow."
    requests = [
        {"id": "short", "prompt": prompt, "max_new_tokens": 2},
        {"id": "one", "prompt": prompt, "max_new_tokens": 1},
        {"id": "default", "prompt": prompt},
        {"id": "hot-a", "prompt": prompt, "temperature": 1.5, "seed": 7},
        {"id": "hot-b", "prompt": prompt, "temperature": 1.5, "seed": 11},
    ]
    first = {r["id"]: r for r in ray.get(engine.generate.remote(requests), timeout=300)}
    second = {r["id"]: r for r in ray.get(engine.generate.remote(requests), timeout=300)}
    for rid, limit in (("short", 2), ("one", 1), ("default", MAX_NEW_TOKENS)):
        tokens = first[rid]["output_token_ids"]
        assert len(tokens) == limit or (tokens and tokens[-1] in eos and len(tokens) < limit), (rid, tokens)
    # Greedy is the same for every length: the short outputs are prefixes of the default one.
    assert first["default"]["output_token_ids"][:2] == first["short"]["output_token_ids"]
    # A seeded sample is reproducible, and sampling is not greedy.
    for rid in ("hot-a", "hot-b"):
        assert first[rid]["output_token_ids"] == second[rid]["output_token_ids"]
    sampled = [first[rid]["output_token_ids"] for rid in ("hot-a", "hot-b")]
    assert any(s != first["default"]["output_token_ids"] for s in sampled)


def test_topology_single_node(engine):
    topology = ray.get(engine.topology.remote(), timeout=60)
    assert [t["rank"] for t in topology] == [0, 1, 2, 3]
    assert [(t["dp_rank"], t["tp_rank"]) for t in topology] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    node = ray.get_runtime_context().get_node_id()
    for t in topology:
        assert {"rank", "tp_rank", "dp_rank", "node_id", "node_ip", "device_ids"} <= set(t)
        assert t["node_id"] == node and t["device_ids"] == [] and t["alive"]
    assert len({t["pid"] for t in topology}) == 4
