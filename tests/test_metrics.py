"""Metrics reach the node's Prometheus endpoint: read them back after a run, and check that what Ray exports
for EngineMetrics is exactly the series `actors.metrics.METRICS` names (which the Grafana board is tested against).
"""

from __future__ import annotations

import re
import urllib.request

import pytest
import ray

from actors.metrics import METRICS, prometheus_series
from cluster import start, stop
from tests.ray_helpers import free_port, init_local_ray, tiny_config, tiny_model, wait_for

PROBE_DP_RANK = 97  # a DP rank no engine in these tests has, so the probe's series are told apart
_SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()
    except OSError:
        return ""


def _total(text: str, name: str) -> float:
    """Sum of a metric's samples over all tag sets (0 when absent); counters may carry a `_total` suffix."""
    pattern = re.compile(rf"^{name}(?:_total)?(?:{{[^}}]*}})? ([0-9.eE+-]+)$", re.MULTILINE)
    return sum(float(v) for v in pattern.findall(text))


def _samples(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of series `name` whose labels include `labels`."""
    total = 0.0
    for series, label_text, value in _SAMPLE.findall(text):
        if series == name and labels.items() <= dict(_LABEL.findall(label_text or "")).items():
            total += float(value)
    return total


@pytest.fixture(scope="module")
def metrics_port():
    port = free_port()
    init_local_ray(num_cpus=2, _metrics_export_port=port)
    yield port
    ray.shutdown()


def test_generated_tokens_exported(metrics_port):
    # Counts are compared as increments, so that other tests' series on this node do not matter.
    before = _scrape(metrics_port)
    base = {
        name: _total(before, name)
        for name in ("ray_qwen_vl_generated_tokens", "ray_qwen_vl_requests", "ray_qwen_vl_ttft_seconds_count")
    }
    coordinator = start(
        tiny_config(tiny_model(), "world_size=1", "parallel_config.tp_size=1", "ray.namespace=test-metrics")
    )
    try:
        records = ray.get(
            coordinator.generate.remote(
                [
                    {"id": "a", "prompt": "Hello there.", "max_new_tokens": 4},
                    {"id": "b", "prompt": "Tell me a story.", "max_new_tokens": 3},
                ]
            ),
            timeout=120,
        )
        generated = sum(len(r["output_token_ids"]) for r in records)
        assert generated > 0 and all(r["error"] is None for r in records)

        # Export is periodic: poll with a bounded wait.
        def exported() -> str:
            text = _scrape(metrics_port)
            return (
                text
                if _total(text, "ray_qwen_vl_generated_tokens") >= base["ray_qwen_vl_generated_tokens"] + generated
                else ""
            )

        text = wait_for(exported, timeout_s=60, interval_s=1.0) or _scrape(metrics_port)
        increments = {name: _total(text, name) - value for name, value in base.items()}
        assert increments["ray_qwen_vl_generated_tokens"] == generated, text[-2000:]
        assert increments["ray_qwen_vl_requests"] == 2
        assert increments["ray_qwen_vl_ttft_seconds_count"] == 2
    finally:
        stop(coordinator)


@ray.remote(num_cpus=0)
class _MetricsProbe:
    """Calls every EngineMetrics method once or more, tagged with PROBE_DP_RANK."""

    def record(self, dp_rank: int) -> None:
        from actors.metrics import EngineMetrics

        self.metrics = m = EngineMetrics()  # kept alive: its series stay exported
        m.record_request(
            {
                "output_token_ids": [1, 2, 3],
                "prompt_tokens": 7,
                "video_tokens": 4,
                "video_frames": [4],
                "ttft_s": 0.1,
                "tpot_s": 0.01,
                "e2e_s": 0.12,
                "error": None,
            },
            dp_rank,
        )
        m.record_queue(0.02, dp_rank)
        m.set_queue_depth(dp_rank, waiting=3, running=2)
        for phase, seconds in (("vision_encode", 0.01), ("prefill", 0.02), ("decode", 0.03)):
            m.record_phase(phase, seconds, dp_rank)
        m.record_phase("decode", 0.04, dp_rank)
        for hits, misses in ((2, 1), (5, 1), (1, 0)):  # cumulative; the last: the group's cache started over
            m.record_vision_cache(dp_rank, hits, misses)
        m.record_memory(dp_rank, {"rss_bytes": 1000, "device_bytes": 0})
        for hits, queries, preempted in ((32, 64, 1), (48, 80, 3), (16, 16, 2)):  # cumulative; the last: a reset
            stats = {"used": 3, "free": 5, "cached": 2, "hit_tokens": hits, "query_tokens": queries}
            m.record_kv_cache(dp_rank, {**stats, "preemptions": preempted})
        m.record_speculation(dp_rank, [(3, 3), (3, 1), (2, 0)])  # (proposed, accepted) per round


def test_exported_series_match_the_metrics_table(metrics_port):
    probe = _MetricsProbe.remote()
    ray.get(probe.record.remote(PROBE_DP_RANK), timeout=60)
    dp = str(PROBE_DP_RANK)

    def exported() -> str:
        text = _scrape(metrics_port)
        done = (
            _samples(text, "ray_qwen_vl_vision_cache_hits_total", dp_rank=dp) == 6
            and _samples(text, "ray_qwen_vl_worker_memory_bytes", rank=dp, kind="host_rss") == 1000
        )
        return text if done else ""

    text = wait_for(exported, timeout_s=60, interval_s=1.0) or _scrape(metrics_port)
    series = {name for name, _, _ in _SAMPLE.findall(text) if name.startswith("ray_qwen_vl_")}
    assert series == {s for name in METRICS for s in prometheus_series(name)}
    types = dict(re.findall(r"^# TYPE (ray_qwen_vl_\w+) (\w+)$", text, re.MULTILINE))
    assert {re.sub(r"_total$", "", name).removeprefix("ray_"): kind for name, kind in types.items()} == {
        name: spec.kind for name, spec in METRICS.items()
    }

    # The values: counters take the increments of the cumulative vision-cache counts (2 + 3 + 1 after the reset).
    assert _samples(text, "ray_qwen_vl_vision_cache_hits_total", dp_rank=dp) == 6
    assert _samples(text, "ray_qwen_vl_vision_cache_misses_total", dp_rank=dp) == 1
    assert _samples(text, "ray_qwen_vl_prefix_cache_hit_tokens_total", dp_rank=dp) == 32 + 16 + 16
    assert _samples(text, "ray_qwen_vl_prefix_cache_query_tokens_total", dp_rank=dp) == 64 + 16 + 16
    assert _samples(text, "ray_qwen_vl_preemptions_total", dp_rank=dp) == 1 + 2 + 2
    assert _samples(text, "ray_qwen_vl_kv_blocks", dp_rank=dp, state="free") == 5
    assert _samples(text, "ray_qwen_vl_requests_waiting", dp_rank=dp) == 3
    assert _samples(text, "ray_qwen_vl_requests_running", dp_rank=dp) == 2
    # Ray exports a histogram's sum from bucket midpoints: it lies within the observation's bucket (0.015, 0.02].
    assert _samples(text, "ray_qwen_vl_queue_seconds_count", dp_rank=dp) == 1
    assert 0.015 <= _samples(text, "ray_qwen_vl_queue_seconds_sum", dp_rank=dp) <= 0.02
    assert _samples(text, "ray_qwen_vl_phase_seconds_count", dp_rank=dp, phase="decode") == 2
    assert _samples(text, "ray_qwen_vl_phase_seconds_count", dp_rank=dp, phase="vision_encode") == 1
    assert _samples(text, "ray_qwen_vl_generated_tokens_total", dp_rank=dp) == 3
    assert _samples(text, "ray_qwen_vl_spec_rounds_total", dp_rank=dp) == 3
    assert _samples(text, "ray_qwen_vl_spec_proposed_tokens_total", dp_rank=dp, position="3") == 2
    assert _samples(text, "ray_qwen_vl_spec_accepted_tokens_total", dp_rank=dp, position="1") == 2
    assert _samples(text, "ray_qwen_vl_ttft_seconds_bucket", dp_rank=dp, le="0.1") == 1
    assert _samples(text, "ray_qwen_vl_ttft_seconds_bucket", dp_rank=dp, le="0.05") == 0
    ray.kill(probe)
