"""One real launch run on CPU (tp 2): results, summary and plot agree; dist_env and profiling reach workers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import ray

from actors.shard_worker import worker_actor_name
from cluster import start, stop
from cluster.datasets import load_requests
from cluster.launch import run
from tests.ray_helpers import CONTRACT_FIELDS, REPO, tiny_config, tiny_model

NAMESPACE = "test-launch-run"


@pytest.fixture(scope="module")
def launched(local_ray, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("launch-run")
    cfg = tiny_config(
        tiny_model(),
        f"output_path={out / 'results.jsonl'}",
        "data_config.num_samples=6",
        "data_config.batch_size=2",
        "data_config.max_new_tokens=5",
        "profile=true",
        f"profile_dir={out / 'profile'}",
        f"ray.namespace={NAMESPACE}",
    )
    data = cfg.data_config
    requests = load_requests(
        data.dataset, data.dataset_dir, data.batch_size, cfg.dp_size, data.num_samples, base_dir=REPO
    )
    status = run(cfg)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    summary = json.loads((out / "results.summary.json").read_text())
    return {"status": status, "records": records, "summary": summary, "out": out, "ids": [r["id"] for r in requests]}


def _stats_ms(values: list[float]) -> dict:
    ms = np.array(values) * 1000.0
    return {"mean": float(ms.mean()), "median": float(np.median(ms)), "p99": float(np.percentile(ms, 99))}


def test_every_request_has_a_record(launched):
    assert launched["status"] == 0
    records = launched["records"]
    # Records are appended as requests complete, so the file's order is completion order.
    assert len(launched["ids"]) == 6
    assert sorted(r["id"] for r in records) == sorted(launched["ids"])
    for record in records:
        assert set(CONTRACT_FIELDS) <= set(record)
        assert record["error"] is None and 1 <= len(record["output_token_ids"]) <= 5


def test_summary_matches_the_records_of_the_same_run(launched):
    records, summary = launched["records"], launched["summary"]
    assert summary["requests_ok"] == len(records) and summary["requests_failed"] == 0
    assert summary["input_tokens"] == sum(r["prompt_tokens"] for r in records)
    assert summary["output_tokens"] == sum(len(r["output_token_ids"]) for r in records)
    for key in ("ttft", "e2e"):
        expected = _stats_ms([r[f"{key}_s"] for r in records])
        assert summary[f"{key}_ms"] == pytest.approx(expected)
    expected_tpot = _stats_ms([r["tpot_s"] for r in records if r["tpot_s"] is not None])
    assert summary["tpot_ms"] == pytest.approx(expected_tpot)
    assert summary["output_throughput_tok_s"] == pytest.approx(summary["output_tokens"] / summary["wall_s"])
    phases = summary["phases"]
    assert phases["prefill_s"] > 0 and phases["decode_s"] > 0 and "warmup_s" in phases
    png = launched["out"] / "results.latency.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_writes_one_trace_per_worker(launched):
    traces = sorted(p.name for p in (launched["out"] / "profile").glob("*.trace.json"))
    assert traces == ["shard-worker-0.trace.json", "shard-worker-1.trace.json"]


def test_dist_env_reaches_every_worker(local_ray):
    cfg = tiny_config(
        tiny_model(),
        "dist_env.GLOO_SOCKET_IFNAME=lo",
        "dist_env.QWEN_VL_TEST_MARKER=42",
        f"ray.namespace={NAMESPACE}-env",
    )
    coordinator = start(cfg)
    try:
        for rank in range(cfg.world_size):
            worker = ray.get_actor(worker_actor_name(rank), namespace=cfg.ray.namespace)
            seen = ray.get(worker.environment.remote(["GLOO_SOCKET_IFNAME", "QWEN_VL_TEST_MARKER"]), timeout=30)
            assert seen == {"GLOO_SOCKET_IFNAME": "lo", "QWEN_VL_TEST_MARKER": "42"}
    finally:
        stop(coordinator)
