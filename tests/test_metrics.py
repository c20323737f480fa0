"""Metrics reach the node's Prometheus endpoint: read ray_qwen_vl_generated_tokens back after a run."""

from __future__ import annotations

import re
import urllib.request

import pytest
import ray

from cluster import start, stop
from tests.ray_helpers import free_port, init_local_ray, tiny_config, tiny_model, wait_for


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


@pytest.fixture(scope="module")
def metrics_port():
    port = free_port()
    init_local_ray(num_cpus=2, _metrics_export_port=port)
    yield port
    ray.shutdown()


def test_generated_tokens_exported(metrics_port):
    coordinator = start(tiny_config(tiny_model(), "world_size=1", "parallel_config.tp_size=1",
                                    "ray.namespace=test-metrics"))
    try:
        records = ray.get(coordinator.generate.remote(
            [{"id": "a", "prompt": "Hello there.", "max_new_tokens": 4},
             {"id": "b", "prompt": "Tell me a story.", "max_new_tokens": 3}]), timeout=120)
        generated = sum(len(r["output_token_ids"]) for r in records)
        assert generated > 0 and all(r["error"] is None for r in records)
        # Export is periodic: poll with a bounded wait.
        def exported() -> str:
            text = _scrape(metrics_port)
            return text if _total(text, "ray_qwen_vl_generated_tokens") >= generated else ""

        text = wait_for(exported, timeout_s=60, interval_s=1.0) or _scrape(metrics_port)
        assert _total(text, "ray_qwen_vl_generated_tokens") == generated, text[-2000:]
        assert _total(text, "ray_qwen_vl_requests") == 2
        assert _total(text, "ray_qwen_vl_ttft_seconds_count") == 2
    finally:
        stop(coordinator)
