"""Serving benchmark: the same requests over HTTP and through the Ray API, idle and under Poisson arrivals.

`python -m cluster.tools.bench_serve CONF [key=value ...] [--num-requests N] [--request-rate R]
[--max-tokens M] [--rounds K] [--idle-pairs P] [--url URL] [--out PATH]` starts the engine and the
OpenAI-compatible server (the config's serve.* keys) and turns the config's dataset into chat
requests (cycled up to --num-requests; images as local paths, greedy, EOS ignored). Unless the
config names one, the server's serve.allowed_local_media_path is the images' common directory.

Idle engine: P pairs, one request at a time, the same body once over each path (alternating which
goes first); the per-pair differences, HTTP minus Ray API, are the cost of the HTTP path alone,
free of queueing and batching noise.

Under load: the requests go at seeded Poisson arrival times, K passes over the list. Request by
request the two paths take turns (swapped each pass, so every request goes once each way over two
passes): a streaming chat completion to http://serve.host:serve.port/v1 (the HTTP path), or
`coordinator.stream` from this driver (the Ray API). Interleaved, both paths meet the same load
on the machine and in the engine. Both are timed by the client in the same way: TTFT to the first
piece of text, ITL between pieces, E2E to the last, TPOT = (E2E - TTFT) / (output tokens - 1).

It prints the idle per-pair overhead, each loaded path's summary (cluster.report; its requests
over the shared wall time) and the loaded HTTP overhead, HTTP minus Ray API, per metric, and
writes them as JSON."""

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from actors.records import failed_record, fill_latencies, new_record
from cluster.config import RunConfig, load_config
from cluster.datasets import load_requests
from cluster.launch import USER_ERRORS, start, stop
from cluster.openai_api import ChatCompletionRequest, engine_request
from cluster.report import format_summary, latency_stats, summarize
from cluster.serve import model_name, start_server, stop_server

WARMUP_REQUESTS = 2
IDLE_PAIRS = 20


def media_dir(requests: list[dict]) -> str | None:
    """The deepest directory holding every request's image files, or None without images."""
    paths = [os.path.realpath(path) for request in requests for path in request.get("images") or []]
    return os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else None


def chat_bodies(cfg: RunConfig, requests: list[dict], max_tokens: int) -> list[dict[str, Any]]:
    """Streaming chat-completion bodies for dataset requests: the images (as paths), then the prompt."""
    bodies = []
    for request in requests:
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": str(path)}} for path in request.get("images") or []
        ]
        content.append({"type": "text", "text": request["prompt"]})
        body = {
            "model": model_name(cfg),
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.get("mm_processor_kwargs"):
            body["mm_processor_kwargs"] = request["mm_processor_kwargs"]
        bodies.append(body)
    return bodies


def arrival_offsets(count: int, rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each request is sent: Poisson arrivals at `rate` per second."""
    if not np.isfinite(rate):
        return [0.0] * count
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=count)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]).tolist()


def _finish(record: dict[str, Any], times: list[float], tokens: int, prompt_tokens: int) -> dict[str, Any]:
    """Latencies from the arrival and the Unix times of the text pieces; TPOT over `tokens` tokens."""
    fill_latencies(record, times)
    record["prompt_tokens"] = prompt_tokens
    record["output_token_ids"] = record["output_token_ids"] or [-1] * tokens  # HTTP gives the count only
    if tokens > 1 and record["ttft_s"] is not None:
        record["tpot_s"] = (record["e2e_s"] - record["ttft_s"]) / (tokens - 1)
    record["end_time"] = time.time()
    return record


async def ray_request(coordinator: Any, body: dict[str, Any], request_id: str) -> dict[str, Any]:
    """One request through coordinator.stream, timed from this driver."""
    request = engine_request(ChatCompletionRequest.model_validate(body), request_id)
    record = new_record(request_id, time.time())
    times: list[float] = []
    try:
        async for ref in coordinator.stream.options(num_returns="streaming").remote(request):
            item = await ref
            if item.get("final"):
                if item.get("error"):
                    return failed_record(request_id, item["error"], arrival_time=record["arrival_time"])
                record["output_token_ids"] = list(item["output_token_ids"])
                return _finish(record, times, len(item["output_token_ids"]), item["prompt_tokens"])
            if item.get("text"):
                times.append(time.time())
    except Exception as e:  # noqa: BLE001 - a failed request is a failed record, as in the engine
        return failed_record(request_id, f"{type(e).__name__}: {e}", arrival_time=record["arrival_time"])
    return failed_record(request_id, "stream ended without a final record", arrival_time=record["arrival_time"])


async def http_request(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], request_id: str, headers: dict[str, str]
) -> dict[str, Any]:
    """One streaming chat completion over HTTP, timed by the client."""
    record = new_record(request_id, time.time())
    times: list[float] = []
    counts = None
    try:
        async with session.post(url, json=body, headers=headers) as response:
            if response.status != 200:
                text = await response.text()
                return failed_record(request_id, f"HTTP {response.status}: {text}", arrival_time=record["arrival_time"])
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    return failed_record(request_id, event["error"]["message"], arrival_time=record["arrival_time"])
                if event.get("usage"):
                    counts = event["usage"]
                if event["choices"] and event["choices"][0]["delta"].get("content"):
                    times.append(time.time())
    except aiohttp.ClientError as e:
        return failed_record(request_id, f"{type(e).__name__}: {e}", arrival_time=record["arrival_time"])
    if counts is None:
        return failed_record(request_id, "no usage chunk in the stream", arrival_time=record["arrival_time"])
    return _finish(record, times, counts["completion_tokens"], counts["prompt_tokens"])


async def _run(
    senders: list[Any], bodies: list[dict[str, Any]], offsets: list[float], tag: str
) -> tuple[list[dict], float]:
    """Send body i at its offset through senders[i]; the records in order and the wall time."""
    start = time.perf_counter()

    async def one(i: int) -> dict[str, Any]:
        await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
        return await senders[i](bodies[i], f"{tag}-{i}")

    records = await asyncio.gather(*(one(i) for i in range(len(bodies))))
    return list(records), time.perf_counter() - start


async def idle_overhead(paths: dict[str, Any], bodies: list[dict[str, Any]], pairs: int) -> dict[str, Any]:
    """One request at a time on an idle engine, each body once per path (alternating which goes
    first): per-pair HTTP minus Ray API TTFT and E2E, {"mean", "median", "p99"} in ms."""
    got: dict[str, list[list[dict]]] = {"http": [], "ray_api": []}
    for i in range(pairs):
        for name in ["http", "ray_api"] if i % 2 == 0 else ["ray_api", "http"]:
            got[name].append([await paths[name](bodies[i % len(bodies)], f"idle-{name}-{i}")])
    deltas = paired_overhead(got["http"], got["ray_api"])
    return {"pairs": pairs, "pairs_failed": pairs - deltas.pop("requests"), **deltas}


async def benchmark(
    coordinator: Any,
    cfg: RunConfig,
    bodies: list[dict[str, Any]],
    offsets: list[float],
    rounds: int = 2,
    base_url: str | None = None,
    idle_pairs: int = IDLE_PAIRS,
) -> dict:
    """Warm up both paths; `idle_pairs` pairs one at a time; then the bodies `rounds` times at their
    arrival offsets, the paths taking turns. The idle overhead, each loaded path's summary (its
    requests over the shared wall time) and the loaded HTTP overhead."""
    url = f"{base_url or f'http://{cfg.serve.host}:{cfg.serve.port}/v1'}/chat/completions"
    headers = {"Authorization": f"Bearer {cfg.serve.api_key}"} if cfg.serve.api_key else {}
    timeout = aiohttp.ClientTimeout(total=cfg.ray.worker_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def via_ray(body: dict[str, Any], request_id: str) -> dict[str, Any]:
            return await ray_request(coordinator, body, request_id)

        async def via_http(body: dict[str, Any], request_id: str) -> dict[str, Any]:
            return await http_request(session, url, body, request_id, headers)

        paths = {"ray_api": via_ray, "http": via_http}
        names = list(paths)
        warm = bodies[:WARMUP_REQUESTS]
        for name in names:
            await _run([paths[name]] * len(warm), warm, [0.0] * len(warm), f"warmup-{name}")
        idle = await idle_overhead(paths, bodies, idle_pairs)
        # The paths take turns request by request (and swap turns each round), so that both meet the
        # same load, on the machine and in the engine: the overhead is then the paths' difference alone.
        records: dict[str, list[dict]] = {name: [] for name in names}
        by_body: dict[str, list[list[dict]]] = {name: [[] for _ in bodies] for name in names}
        wall = 0.0
        for round_ in range(rounds):
            turn = [names[(i + round_) % 2] for i in range(len(bodies))]
            done, seconds = await _run([paths[name] for name in turn], bodies, offsets, f"round{round_}")
            wall += seconds
            for i, (name, record) in enumerate(zip(turn, done, strict=True)):
                records[name].append(record)
                by_body[name][i].append(record)
        walls = dict.fromkeys(names, wall)
        results = {name: summarize(records[name], walls[name]) for name in paths}
        for name in paths:
            for r in [r for r in records[name] if r["error"]][:5]:
                print(f"{name} request {r['id']} failed: {r['error']}", file=sys.stderr)
    results["http_overhead_ms"] = overhead(results["http"], results["ray_api"])
    results["paired_http_overhead_ms"] = paired_overhead(by_body["http"], by_body["ray_api"])
    results["idle_http_overhead_ms"] = idle
    return results


def paired_overhead(http: list[list[dict]], ray_api: list[list[dict]]) -> dict[str, Any]:
    """Per request body, its mean TTFT (and E2E) over HTTP minus its mean through the Ray API (ms).

    Taken body by body, the differences are free of the spread between bodies (text or image,
    short or long prompts) that makes a difference of two medians noisy.
    """
    deltas: dict[str, list[float]] = {"ttft_ms": [], "e2e_ms": []}
    for a, b in zip(http, ray_api, strict=True):
        for metric, key in (("ttft_ms", "ttft_s"), ("e2e_ms", "e2e_s")):
            x = [r[key] for r in a if r["error"] is None and r[key] is not None]
            y = [r[key] for r in b if r["error"] is None and r[key] is not None]
            if x and y:
                deltas[metric].append((float(np.mean(x)) - float(np.mean(y))) * 1e3)
    return {"requests": len(deltas["ttft_ms"]), **{metric: latency_stats(values) for metric, values in deltas.items()}}


def overhead(http: dict[str, Any], ray_api: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """HTTP minus Ray API for each latency metric's mean, median and p99 (ms)."""
    out: dict[str, dict[str, float | None]] = {}
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        out[metric] = {}
        for stat in ("mean", "median", "p99"):
            a, b = http[metric][stat], ray_api[metric][stat]
            out[metric][stat] = None if a is None or b is None else a - b
    return out


def format_overhead(delta: dict[str, Any], title: str = "HTTP overhead (HTTP - Ray API)") -> str:
    lines = ["{:=^50}".format(f" {title} "), f"{'(ms)':<14}{'mean':>12}{'median':>12}{'p99':>12}"]
    for metric, stats in delta.items():
        if not metric.endswith("_ms"):
            continue
        cells = "".join(f"{'-' if v is None else f'{v:.2f}':>12}" for v in stats.values())
        lines.append(f"{metric.removesuffix('_ms').upper():<14}{cells}")
    lines.append("=" * 50)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.tools.bench_serve", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML run config, e.g. conf/tiny_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. serve.port=8001")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument(
        "--request-rate",
        type=float,
        default=None,
        help="arrivals per second (default: data_config.request_rate; inf: all at once)",
    )
    parser.add_argument("--max-tokens", type=int, default=None, help="default: data_config.max_new_tokens")
    parser.add_argument("--url", default=None, help="the server's /v1 URL (default: http://serve.host:serve.port/v1)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="passes over the requests; the paths take turns request by request, swapped each pass",
    )
    parser.add_argument(
        "--idle-pairs",
        type=int,
        default=IDLE_PAIRS,
        help="requests sent one at a time over each path before the loaded run (0: none)",
    )
    parser.add_argument("--out", default="outputs/bench_serve/bench_serve.json")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        data = cfg.data_config
        requests = load_requests(
            data.dataset, data.dataset_dir, data.batch_size, cfg.dp_size, args.num_requests, base_dir=Path.cwd()
        )
        coordinator = start(cfg)
    except (*USER_ERRORS, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rate = data.request_rate if args.request_rate is None else args.request_rate
    requests = [requests[i % len(requests)] for i in range(args.num_requests)]  # a short file is cycled
    bodies = chat_bodies(cfg, requests, args.max_tokens or data.max_new_tokens)
    if cfg.serve.allowed_local_media_path is None:
        cfg.serve.allowed_local_media_path = media_dir(requests)
    offsets = arrival_offsets(len(bodies), rate, data.seed)
    try:
        ingress = start_server(cfg)
        results = asyncio.run(
            benchmark(coordinator, cfg, bodies, offsets, args.rounds, args.url, max(args.idle_pairs, 0))
        )
    finally:
        try:
            stop_server()
        finally:
            stop(coordinator)
    results["config"] = {
        "ingress": ingress,
        "model_path": cfg.model_path,
        "device": cfg.device,
        "world_size": cfg.world_size,
        "tp_size": cfg.tp_size,
        "num_requests": len(bodies),
        "rounds": args.rounds,
        "request_rate": rate,
        "max_tokens": bodies[0]["max_tokens"] if bodies else None,
    }
    for name, title in (("ray_api", "Ray API (coordinator.stream)"), ("http", "HTTP (OpenAI chat completions)")):
        print(f"\n{title}\n{format_summary(results[name])}")
    idle = results["idle_http_overhead_ms"]
    print(format_overhead(idle, f"Idle engine, {idle['pairs']} pairs: HTTP - Ray API"))
    print(format_overhead(results["http_overhead_ms"], "Under load: HTTP - Ray API"))
    paired = results["paired_http_overhead_ms"]
    print(format_overhead(paired, f"Under load, per request ({paired['requests']}): HTTP - Ray API"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"results: {out}")
    return 0 if all(results[n]["requests_failed"] == 0 for n in ("ray_api", "http")) else 1


if __name__ == "__main__":
    sys.exit(main())
