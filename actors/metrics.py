"""Metrics exported through `ray.util.metrics` (Prometheus names get Ray's `ray_` prefix).

:data:`METRICS` is the one list of what the engine exports: `EngineMetrics` builds its metrics from it,
and the Grafana board in conf/grafana/ is tested to query only names found there.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.util.metrics import Counter, Gauge, Histogram

# Ray exports a histogram's `_sum` from bucket midpoints, not from the observed values, so means derived
# from it are as fine as these buckets: 1.25-1.7x apart between 7.5 ms and 30 s.
_LATENCY_BOUNDARIES_S = (
    0.001,
    0.002,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    60.0,
    120.0,
)
PHASES = ("vision_encode", "prefill", "decode")


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric: its kind (`counter`, `gauge` or `histogram`), help text and tag keys."""

    kind: str
    description: str
    tag_keys: tuple[str, ...]


METRICS: dict[str, MetricSpec] = {
    "qwen_vl_ttft_seconds": MetricSpec("histogram", "Time to first token per request", ("dp_rank",)),
    "qwen_vl_tpot_seconds": MetricSpec(
        "histogram", "Time per output token (after the first) per request", ("dp_rank",)
    ),
    "qwen_vl_e2e_seconds": MetricSpec("histogram", "Request latency from arrival to last token", ("dp_rank",)),
    "qwen_vl_queue_seconds": MetricSpec("histogram", "Request wait from arrival to first scheduling", ("dp_rank",)),
    "qwen_vl_generated_tokens": MetricSpec("counter", "Output tokens generated", ("dp_rank",)),
    "qwen_vl_prompt_tokens": MetricSpec("counter", "Prompt tokens processed", ("dp_rank",)),
    "qwen_vl_video_tokens": MetricSpec("counter", "Prompt tokens that stand for video frames", ("dp_rank",)),
    "qwen_vl_video_frames": MetricSpec("counter", "Video frames sampled from requests' videos", ("dp_rank",)),
    "qwen_vl_requests": MetricSpec("counter", "Requests finished, by status", ("status",)),
    "qwen_vl_requests_waiting": MetricSpec("gauge", "Requests waiting to be scheduled", ("dp_rank",)),
    "qwen_vl_requests_running": MetricSpec("gauge", "Requests being served (prefill or decode)", ("dp_rank",)),
    "qwen_vl_phase_seconds": MetricSpec(
        "histogram", "Duration of one vision-encode, prefill or decode call", ("phase", "dp_rank")
    ),
    "qwen_vl_vision_cache_hits": MetricSpec(
        "counter", "Images whose embeddings came from the vision cache", ("dp_rank",)
    ),
    "qwen_vl_vision_cache_misses": MetricSpec("counter", "Images the vision tower had to encode", ("dp_rank",)),
    "qwen_vl_worker_memory_bytes": MetricSpec("gauge", "Worker memory (host RSS, device allocated)", ("rank", "kind")),
    "qwen_vl_prefix_cache_hit_tokens": MetricSpec(
        "counter", "Prompt tokens whose KV came from the prefix cache", ("dp_rank",)
    ),
    "qwen_vl_prefix_cache_query_tokens": MetricSpec(
        "counter", "Prompt tokens looked up in the prefix cache (hit rate = hits / queries)", ("dp_rank",)
    ),
    "qwen_vl_kv_blocks": MetricSpec("gauge", "KV blocks of a DP group's pool, by state", ("dp_rank", "state")),
    "qwen_vl_preemptions": MetricSpec(
        "counter", "Requests preempted (KV freed, recomputed later) for lack of KV blocks", ("dp_rank",)
    ),
    "qwen_vl_spec_rounds": MetricSpec(
        "counter", "Speculative rounds with proposals (mean acceptance length = 1 + accepted / rounds)", ("dp_rank",)
    ),
    "qwen_vl_spec_proposed_tokens": MetricSpec(
        "counter", "Tokens proposed by speculative decoding, by position in the round (1..k)", ("dp_rank", "position")
    ),
    "qwen_vl_spec_accepted_tokens": MetricSpec(
        "counter", "Proposed tokens the target accepted, by position in the round (1..k)", ("dp_rank", "position")
    ),
}

# Cumulative scheduler counts -> the counter they feed (see EngineMetrics.record_kv_cache).
_KV_COUNTERS = {
    "hit_tokens": "qwen_vl_prefix_cache_hit_tokens",
    "query_tokens": "qwen_vl_prefix_cache_query_tokens",
    "preemptions": "qwen_vl_preemptions",
}


def generated_tokens(record: dict) -> int:
    """Output tokens of a record, of every choice when it has several (n > 1)."""
    choices = record.get("choices")
    return sum(len(c["token_ids"]) for c in choices) if choices else len(record.get("output_token_ids") or ())


def prometheus_series(name: str) -> tuple[str, ...]:
    """The Prometheus series Ray exports for one of :data:`METRICS`.

    Ray prefixes `ray_`; a histogram becomes `_bucket`, `_sum` and `_count` series, a counter gets
    `_total`, a gauge keeps its name.
    """
    kind = METRICS[name].kind
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "gauge": ("",)}[kind]
    return tuple(f"ray_{name}{suffix}" for suffix in suffixes)


def _make(name: str, spec: MetricSpec) -> Counter | Gauge | Histogram:
    if spec.kind == "histogram":
        return Histogram(name, spec.description, boundaries=list(_LATENCY_BOUNDARIES_S), tag_keys=spec.tag_keys)
    if spec.kind == "counter":
        return Counter(name, spec.description, tag_keys=spec.tag_keys)
    if spec.kind == "gauge":
        return Gauge(name, spec.description, tag_keys=spec.tag_keys)
    raise ValueError(f"metric {name}: unknown kind {spec.kind!r}")


class EngineMetrics:
    """The Coordinator's metrics: per-request latency and tokens, queue depth, phases, vision cache, memory."""

    def __init__(self) -> None:
        self.metrics = {name: _make(name, spec) for name, spec in METRICS.items()}
        # Last cumulative vision-cache counts per DP group, to turn them into counter increments.
        self._vision_cache_seen: dict[str, tuple[int, int]] = {}
        self._kv_seen: dict[tuple[str, str], int] = {}
        # Last value set per (gauge, tags): a gauge is set only when it changes (each set costs Ray ~tens of us,
        # and the Coordinator sets its gauges every round of every group).
        self._gauge_seen: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def record_request(self, record: dict, dp_rank: int | None) -> None:
        """Count a finished request; for a successful one, its tokens and TTFT/TPOT/E2E."""
        m, tags = self.metrics, {"dp_rank": str(dp_rank)}
        status = "ok" if record.get("error") is None else "failed"
        m["qwen_vl_requests"].inc(1, {"status": status})
        if status != "ok":
            return
        for name, count in (
            ("qwen_vl_generated_tokens", generated_tokens(record)),
            ("qwen_vl_prompt_tokens", record["prompt_tokens"]),
            ("qwen_vl_video_tokens", record.get("video_tokens") or 0),
            ("qwen_vl_video_frames", sum(record.get("video_frames") or ())),
        ):
            if count > 0:  # Ray counters take positive increments only (an aborted request may have none)
                m[name].inc(count, tags)
        for name, key in (
            ("qwen_vl_ttft_seconds", "ttft_s"),
            ("qwen_vl_tpot_seconds", "tpot_s"),
            ("qwen_vl_e2e_seconds", "e2e_s"),
        ):
            if record.get(key) is not None:
                m[name].observe(record[key], tags)

    def record_queue(self, seconds: float, dp_rank: int) -> None:
        """One request's wait from arrival to its first scheduling on `dp_rank`."""
        self.metrics["qwen_vl_queue_seconds"].observe(seconds, {"dp_rank": str(dp_rank)})

    def set_queue_depth(self, dp_rank: int, waiting: int, running: int) -> None:
        """Current number of waiting and running requests of one DP group."""
        tags = {"dp_rank": str(dp_rank)}
        self._set("qwen_vl_requests_waiting", waiting, tags)
        self._set("qwen_vl_requests_running", running, tags)

    def record_phase(self, name: str, seconds: float, dp_rank: int) -> None:
        """One call of a phase (`vision_encode`, `prefill` or `decode`; a trailing `_s` is dropped)."""
        phase = name.removesuffix("_s")
        if phase not in PHASES:
            raise ValueError(f"unknown phase {name!r}; expected one of {PHASES}")
        self.metrics["qwen_vl_phase_seconds"].observe(seconds, {"phase": phase, "dp_rank": str(dp_rank)})

    def record_vision_cache(self, dp_rank: int, hits: int, misses: int) -> None:
        """The vision cache's cumulative hit and miss counts of one DP group (as `vision_cache_stats()` gives).

        Counters take increments: the difference to the previous call is added. A count below the previous
        one means the cache started over (the group was rebuilt) and is added whole.
        """
        key = str(dp_rank)
        prev_hits, prev_misses = self._vision_cache_seen.get(key, (0, 0))
        self._vision_cache_seen[key] = (hits, misses)
        tags = {"dp_rank": key}
        for name, now, prev in (
            ("qwen_vl_vision_cache_hits", hits, prev_hits),
            ("qwen_vl_vision_cache_misses", misses, prev_misses),
        ):
            increment = now - prev if now >= prev else now
            if increment > 0:
                self.metrics[name].inc(increment, tags)

    def record_kv_cache(self, dp_rank: int, stats: dict) -> None:
        """A group scheduler's `stats()`: KV blocks used, free and cached now; cumulative prefix-cache hit and
        query tokens and preemptions (added as increments; a count below the last one restarts the series)."""
        tags = {"dp_rank": str(dp_rank)}
        for state in ("used", "free", "cached"):
            self._set("qwen_vl_kv_blocks", stats.get(state, 0), {**tags, "state": state})
        for key, name in _KV_COUNTERS.items():
            now = int(stats.get(key, 0))
            prev = self._kv_seen.get((tags["dp_rank"], key), 0)
            self._kv_seen[tags["dp_rank"], key] = now
            increment = now - prev if now >= prev else now
            if increment > 0:
                self.metrics[name].inc(increment, tags)

    def record_speculation(self, dp_rank: int, rounds: list[tuple[int, int]]) -> None:
        """Speculative rounds of one group's call: (proposed, accepted) per row and round with proposals."""
        if not rounds:
            return
        dp = str(dp_rank)
        self.metrics["qwen_vl_spec_rounds"].inc(len(rounds), {"dp_rank": dp})
        longest = max(p for p, _ in rounds)
        for position in range(1, longest + 1):
            tags = {"dp_rank": dp, "position": str(position)}
            proposed = sum(p >= position for p, _ in rounds)
            accepted = sum(a >= position for _, a in rounds)
            self.metrics["qwen_vl_spec_proposed_tokens"].inc(proposed, tags)
            if accepted:
                self.metrics["qwen_vl_spec_accepted_tokens"].inc(accepted, tags)

    def _set(self, name: str, value: float, tags: dict[str, str]) -> None:
        key = (name, tuple(sorted(tags.items())))
        if self._gauge_seen.get(key) != value:
            self._gauge_seen[key] = value
            self.metrics[name].set(value, tags)

    def record_memory(self, rank: int, memory: dict) -> None:
        """A worker's host RSS and device-allocated bytes."""
        gauge = self.metrics["qwen_vl_worker_memory_bytes"]
        gauge.set(memory["rss_bytes"], {"rank": str(rank), "kind": "host_rss"})
        gauge.set(memory["device_bytes"], {"rank": str(rank), "kind": "device"})
