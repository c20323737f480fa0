"""Latency as an OpenAI client sees it, per scheduler setting: a long stream's chunks, arrivals among long
streams, and a mixed load, against transformers' `generate` in the same run.

`python -m cluster.tools.bench_stream CONF [key=value ...] [--settings "A;B;..."] [--passes P]
[--tokens 300] [--arrivals 20] [--out PATH]` (the config's data_config.max_new_tokens must allow 600)

Each setting is a comma-separated list of overrides on top of CONF and the key=value overrides
(`""` is the config as given). Per pass and setting, in turn (the settings interleaved, so they meet
the same load on the machine), a fresh engine and OpenAI server run in a subprocess with a Ray of
their own, and an `openai` client measures:
- stream: one request of --tokens tokens (EOS ignored), streamed: content chunks, the gaps between
  them, and the whole answer's time from the request to its last chunk;
- arrivals: with 2 long requests streaming, --arrivals short requests (8 tokens) sent one after
  another: each one's time to first token, against the same requests sent to the idle engine and
  the long streams' gap between token chunks (a decode step as delivered);
- mixed: 4 long requests (600 tokens) and 12 short ones (8 tokens) at seeded Poisson arrivals of 10/s,
  all streamed (EOS ignored): the short requests' median latency (request to last chunk) and the long
  requests' output tokens per second over the run's wall time.
A stream's chunks are the chunks the server sends for delivered tokens, one per token (as vLLM streams);
"text chunks" are those with text: a token that completes no character (a random checkpoint makes many)
has a chunk with empty content. The stream's gaps are taken at chunks with text (what a reader sees
change); times to first token, decode steps and the ends of answers at the chunks of tokens.
transformers' `generate` on the same checkpoint makes the same --tokens tokens (greedy, EOS ignored)
in this process once per pass, for the stream's time. Prints a table per setting (medians over
passes) and writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PROMPT = "Tell me a long story about a lighthouse keeper and the sea."
SHORT_TOKENS, LONG_TOKENS = 8, 600


async def _stream(client: Any, model: str, max_tokens: int, stop_after: asyncio.Event | None = None) -> dict:
    """One streamed chat completion: the send time, each content chunk's arrival time, the end time."""
    sent = time.perf_counter()
    chunks: list[float] = []
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    tokens: list[float] = []  # arrivals of the chunks of delivered tokens, with or without text
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content is not None and not chunk.choices[0].delta.role:
            tokens.append(time.perf_counter())
        if chunk.choices and chunk.choices[0].delta.content:
            chunks.append(time.perf_counter())
        if stop_after is not None and stop_after.is_set():
            await stream.close()
            break
    return {"sent": sent, "chunks": chunks, "tokens": tokens, "end": time.perf_counter()}


async def _measure(base_url: str, model: str, tokens: int, arrivals: int, seed: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="unused", timeout=600)
    await _stream(client, model, SHORT_TOKENS)  # warm-up
    out: dict[str, Any] = {}
    one = await _stream(client, model, tokens)
    gaps = np.diff(one["chunks"]) * 1e3
    out["stream"] = {
        "chunks": len(one["tokens"]),
        "text_chunks": len(one["chunks"]),
        "total_s": one["tokens"][-1] - one["sent"],
        "gap_p50_ms": float(np.median(gaps)),
        "gap_p99_ms": float(np.percentile(gaps, 99)),
    }
    idle = [await _stream(client, model, SHORT_TOKENS) for _ in range(arrivals)]
    done = asyncio.Event()

    async def long_stream() -> list[dict]:  # one long request after another until the arrivals are done
        runs = []
        while not done.is_set():
            runs.append(await _stream(client, model, LONG_TOKENS, done))
        return runs

    longs = [asyncio.create_task(long_stream()) for _ in range(2)]
    await asyncio.sleep(0.5)  # both long requests decoding
    loaded = [await _stream(client, model, SHORT_TOKENS) for _ in range(arrivals)]
    done.set()
    long_runs = [r for runs in await asyncio.gather(*longs) for r in runs]
    step = [float(np.median(np.diff(r["tokens"]))) for r in long_runs if len(r["tokens"]) > 2]

    def ttft(runs: list[dict]) -> float:  # to the first token's chunk
        return float(np.median([r["tokens"][0] - r["sent"] for r in runs]))

    out["arrivals"] = {
        "idle_ttft_ms": ttft(idle) * 1e3,
        "loaded_ttft_ms": ttft(loaded) * 1e3,
        "long_step_ms": float(np.median(step)) * 1e3 if step else None,
    }
    rng = np.random.default_rng(seed)
    kinds = [LONG_TOKENS] * 4 + [SHORT_TOKENS] * 12
    rng.shuffle(kinds)
    offsets = np.cumsum(rng.exponential(1 / 10.0, len(kinds)))
    start = time.perf_counter()

    async def later(offset: float, max_tokens: int) -> dict:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        return {"max_tokens": max_tokens, **(await _stream(client, model, max_tokens))}

    runs = await asyncio.gather(*(later(o, k) for o, k in zip(offsets, kinds)))
    wall = max(r["end"] for r in runs) - start
    out["mixed"] = {
        "short_latency_p50_s": float(np.median([r["tokens"][-1] - r["sent"] for r in runs if r["max_tokens"] < 100])),
        "long_output_tok_s": sum(r["max_tokens"] for r in runs if r["max_tokens"] >= 100) / wall,
    }
    await client.close()
    return out


def run_one(config: str, overrides: list[str], tokens: int, arrivals: int, seed: int) -> dict:
    """Start the engine and the server with `overrides`, measure, stop both (in this process)."""
    from cluster.config import load_config
    from cluster.launch import start, stop
    from cluster.serve import model_name, start_server, stop_server

    cfg = load_config(config, overrides)
    coordinator = start(cfg)
    try:
        start_server(cfg)
        base_url = f"http://{cfg.serve.host}:{cfg.serve.port}/v1"
        return asyncio.run(_measure(base_url, model_name(cfg), tokens, arrivals, seed))
    finally:
        try:
            stop_server()
        finally:
            stop(coordinator)


def transformers_time(config: str, overrides: list[str], tokens: int) -> float:
    """Seconds transformers' `generate` takes for the same prompt and `tokens` tokens (greedy, EOS ignored)."""
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from cluster.config import load_config

    cfg = load_config(config, overrides)
    path = os.path.expanduser(cfg.model_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.tools.bench_stream", description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument(
        "--settings",
        default=";scheduler.async_scheduling=false;scheduler.async_scheduling=false,scheduler.decode_steps_per_call=1",
    )
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--arrivals", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/bench_stream/bench_stream.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one setting, JSON to this path
    args = parser.parse_args(argv)
    if args.one:
        extra = [o for o in os.environ.get("BENCH_STREAM_SETTING", "").split(",") if o]
        result = run_one(args.config, args.overrides + extra, args.tokens, args.arrivals, args.seed)
        Path(args.one).write_text(json.dumps(result))
        return 0
    settings = args.settings.split(";")
    results: dict[str, list[dict]] = {s or "(as configured)": [] for s in settings}
    hf: list[float] = []
    for p in range(args.passes):
        for setting in settings:
            out = Path(tempfile.mkdtemp()) / "one.json"
            env = dict(os.environ, RAY_ADDRESS="local", BENCH_STREAM_SETTING=setting)
            cmd = [sys.executable, "-m", "cluster.tools.bench_stream", args.config, *args.overrides, "--one", str(out)]
            cmd += ["--tokens", str(args.tokens), "--arrivals", str(args.arrivals), "--seed", str(args.seed + p)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                print(f"setting {setting!r} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            results[setting or "(as configured)"].append(json.loads(out.read_text()))
            print(f"pass {p} {setting or '(as configured)'}: {out.read_text()}", flush=True)
        hf.append(transformers_time(args.config, args.overrides, args.tokens))
        print(f"pass {p} transformers generate {args.tokens} tokens: {hf[-1]:.3f} s", flush=True)

    def med(runs: list[dict], part: str, key: str) -> float:
        values = [r[part][key] for r in runs if r[part][key] is not None]
        return statistics.median(values) if values else float("nan")

    print(f"\ntransformers generate, {args.tokens} tokens: {statistics.median(hf):.3f} s (median of {len(hf)})")
    header = "setting | chunks | text chunks | stream s | gap p50 ms | idle TTFT ms | TTFT among 2 long ms"
    print(header + " | long step ms | mixed: short p50 s | long tok/s")
    for name, runs in results.items():
        print(
            f"{name} | {med(runs, 'stream', 'chunks'):.0f} | {med(runs, 'stream', 'text_chunks'):.0f} | "
            f"{med(runs, 'stream', 'total_s'):.3f} | "
            f"{med(runs, 'stream', 'gap_p50_ms'):.2f} | {med(runs, 'arrivals', 'idle_ttft_ms'):.1f} | "
            f"{med(runs, 'arrivals', 'loaded_ttft_ms'):.1f} | {med(runs, 'arrivals', 'long_step_ms'):.2f} | "
            f"{med(runs, 'mixed', 'short_latency_p50_s'):.3f} | {med(runs, 'mixed', 'long_output_tok_s'):.0f}"
        )
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"transformers_s": hf, "settings": results}, indent=2) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
