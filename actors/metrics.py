"""Metrics exported through `ray.util.metrics` (Prometheus names get Ray's `ray_` prefix)."""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

_LATENCY_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


class EngineMetrics:
    """The Coordinator's metrics: per-request latency, token counts, phase durations, worker memory."""

    def __init__(self) -> None:
        self.ttft = Histogram("qwen_vl_ttft_seconds", "Time to first token per request",
                              boundaries=_LATENCY_BOUNDARIES_S, tag_keys=("dp_rank",))
        self.tpot = Histogram("qwen_vl_tpot_seconds", "Time per output token (after the first) per request",
                              boundaries=_LATENCY_BOUNDARIES_S, tag_keys=("dp_rank",))
        self.e2e = Histogram("qwen_vl_e2e_seconds", "Request latency from start to last token",
                             boundaries=_LATENCY_BOUNDARIES_S, tag_keys=("dp_rank",))
        self.tokens = Counter("qwen_vl_generated_tokens", "Output tokens generated", tag_keys=("dp_rank",))
        self.prompt_tokens = Counter("qwen_vl_prompt_tokens", "Prompt tokens processed", tag_keys=("dp_rank",))
        self.requests = Counter("qwen_vl_requests", "Requests finished, by status", tag_keys=("status",))
        self.phase = Histogram("qwen_vl_phase_seconds", "Duration of each phase of a batch",
                               boundaries=_LATENCY_BOUNDARIES_S, tag_keys=("phase", "dp_rank"))
        self.memory = Gauge("qwen_vl_worker_memory_bytes", "Worker memory (host RSS, device allocated)",
                            tag_keys=("rank", "kind"))

    def record_request(self, record: dict, dp_rank: int | None) -> None:
        tags = {"dp_rank": str(dp_rank)}
        status = "ok" if record.get("error") is None else "failed"
        self.requests.inc(1, {"status": status})
        if status != "ok":
            return
        self.tokens.inc(len(record["output_token_ids"]), tags)
        self.prompt_tokens.inc(record["prompt_tokens"], tags)
        for histogram, key in ((self.ttft, "ttft_s"), (self.tpot, "tpot_s"), (self.e2e, "e2e_s")):
            if record.get(key) is not None:
                histogram.observe(record[key], tags)

    def record_phases(self, phases: dict, dp_rank: int) -> None:
        for name in ("vision_encode_s", "prefill_s", "decode_s"):
            self.phase.observe(phases[name], {"phase": name.removesuffix("_s"), "dp_rank": str(dp_rank)})

    def record_memory(self, rank: int, memory: dict) -> None:
        self.memory.set(memory["rss_bytes"], {"rank": str(rank), "kind": "host_rss"})
        self.memory.set(memory["device_bytes"], {"rank": str(rank), "kind": "device"})
