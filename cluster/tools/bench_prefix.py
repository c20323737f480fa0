"""Prefix caching and the paged KV pool, measured through the engine (Coordinator + one worker, tp 1).

`python -m cluster.tools.bench_prefix [--chats 2] [--capacity-requests 48] [--rate 4] [--mix chat|short] [--out DIR]`

1. Multi-turn TTFT: 3-turn chats on the 0.5B-shaped text model, a 1344x1344 image in turn 1 (2,304
   image tokens); each turn sends the whole conversation again, the previous answers included.
   The same chats run with `prefix_caching` on and off, in one run; reported: TTFT per turn, the
   ratio on/off for turns 2 and 3, and the prompt tokens served from the cache.
2. Capacity: short mixed requests under Poisson arrivals, against a KV pool holding the memory of
   4 worst-case slots at input_max_len 4096 (+ the mix's longest output). "slots": batch_size 4 (one
   slot per running request, as the slot design reserved); "paged": the same pool with batch_size 16
   (memory is the bound). Mixes (`--mix`): "chat" (default), prompts of 4-40 words and 64-256 new
   tokens, outputs longer than prompts as in chat traffic; "short", 4-40 words and 16-64 new tokens,
   prefill-dominated. Reported: output throughput and TTFT p99 of each, and their ratios.

Numbers are ratios against baselines measured in the same run: this machine is noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
from PIL import Image

from cluster.config import load_config
from cluster.launch import start, stop
from cluster.tools.bench import CACHE_DIR, CHECKPOINTS, log
from cluster.tools.bench_scheduler import serve_and_summarize
from cluster.tools.tiny_checkpoint import build_tiny_checkpoint
from model.kv_cache import blocks_for

CHAT_IMAGE = 1344  # pixels a side: 48 x 48 merged patches = 2,304 image tokens
TURNS = (
    "Describe this picture in detail.",
    "What colours dominate it, and where?",
    "Summarize our conversation in one sentence.",
)
WORDS = "weather report model design team summary image story river mountain city light".split()


def checkpoint(cache: Path) -> Path:
    """The 0.5B-shaped text model with a small vision tower that takes a 1344x1344 image whole."""
    name, spec = CHECKPOINTS["small"]
    path = cache / f"{name}-hires"
    if not (path / "config.json").is_file():
        build_tiny_checkpoint(path, replace(spec, max_pixels=CHAT_IMAGE * CHAT_IMAGE))
    return path


def chat_image(cache: Path) -> Path:
    path = cache / f"chat-image-{CHAT_IMAGE}.png"
    if not path.is_file():
        rng = np.random.default_rng(1)
        yy, xx = np.mgrid[0:CHAT_IMAGE, 0:CHAT_IMAGE]
        base = np.stack([xx, yy, (xx * yy) % 255], axis=-1) * 255 / CHAT_IMAGE
        Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)).save(path)
    return path


def config(path: Path, name: str, overrides: list[str]) -> Any:
    return load_config(
        None,
        [
            f"model_path={path}",
            "device=cpu",
            "world_size=1",
            "parallel_config.tp_size=1",
            f"ray.num_cpus_per_worker={os.cpu_count() or 1}",
            "ray.log_to_driver=false",
            "ray.address=local",  # a private cluster: never join another one running on this machine
            "vision_cache_mb=0",  # turns 2 and 3 must not get their image from the vision cache either
            f"ray.namespace=bench-prefix-{name}",
            *overrides,
        ],
    )


# ------------------------------------------------------------------------------- multi-turn
def run_chats(path: Path, image: Path, chats: int, caching: bool, new_tokens: int) -> dict:
    """Each chat's turns in order (a turn waits for the previous answer); TTFT per turn."""
    cfg = config(
        path,
        f"chat-{caching}",
        [
            f"prefix_caching={str(caching).lower()}",
            "data_config.input_max_len=3072",
            f"data_config.max_new_tokens={new_tokens}",
            "data_config.batch_size=2",
        ],
    )
    coordinator = start(cfg)
    ttft: list[list[float]] = [[] for _ in TURNS]
    cached: list[list[int]] = [[] for _ in TURNS]
    try:
        for c in range(chats):
            messages: list[dict] = []
            for t, text in enumerate(TURNS):
                content: list[dict] = [{"type": "text", "text": f"[chat {c}] {text}"}]
                if t == 0:
                    content.insert(0, {"type": "image_url", "image_url": {"url": str(image)}})
                messages.append({"role": "user", "content": content})
                request = {"id": f"chat{c}-turn{t}", "messages": messages, "max_new_tokens": new_tokens}
                record = ray.get(coordinator.generate.remote([request]), timeout=1800)[0]
                if record["error"]:
                    raise RuntimeError(f"{request['id']}: {record['error']}")
                ttft[t].append(record["ttft_s"] * 1e3)
                cached[t].append(record["cached_tokens"])
                messages.append({"role": "assistant", "content": record["output_text"]})
                log(
                    f"chats/caching={caching}: chat {c} turn {t + 1}: TTFT {ttft[t][-1]:.0f} ms, "
                    f"{record['prompt_tokens']} prompt tokens, {record['cached_tokens']} cached"
                )
    finally:
        stop(coordinator)
    return {"ttft_ms": [float(np.median(v)) for v in ttft], "cached_tokens": [float(np.mean(v)) for v in cached]}


# ------------------------------------------------------------------------------- capacity
MIXES = {"chat": (64, 128, 192, 256), "short": (16, 32, 48, 64)}  # new tokens per request, drawn uniformly


def capacity_requests(count: int, mix: str, seed: int = 0) -> list[dict]:
    """`count` requests of 4-40 words, EOS ignored, their new tokens drawn from the mix's choices."""
    rng = random.Random(seed)
    return [
        {
            "id": f"c{i}",
            "prompt": "Write about " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40))),
            "max_new_tokens": rng.choice(MIXES[mix]),
            "ignore_eos": True,
        }
        for i in range(count)
    ]


def run_capacity(
    path: Path, requests: list[dict], rate: float, batch_size: int, blocks: int, new_tokens: int, name: str
) -> dict:
    cfg = config(
        path,
        name,
        [
            "prefix_caching=false",
            "data_config.input_max_len=4096",
            f"data_config.max_new_tokens={new_tokens}",
            f"data_config.batch_size={batch_size}",
            f"kv_cache.num_blocks={blocks}",
        ],
    )
    return serve_and_summarize(cfg, requests, rate, f"capacity/{name}")


# ------------------------------------------------------------------------------- report
def format_report(report: dict) -> str:
    lines = []
    chats = report.get("chats")
    if chats:
        on, off = chats["on"], chats["off"]
        lines.append(f"Multi-turn chats ({report['settings']['chats']} chats, 3 turns, a 1344x1344 image in turn 1)")
        lines.append(f"{'turn':<6}{'TTFT off ms':>13}{'TTFT on ms':>12}{'on/off':>8}{'cached tokens':>15}")
        for t in range(len(TURNS)):
            ratio = on["ttft_ms"][t] / off["ttft_ms"][t]
            lines.append(
                f"{t + 1:<6}{off['ttft_ms'][t]:>13.0f}{on['ttft_ms'][t]:>12.0f}{ratio:>8.2f}"
                f"{on['cached_tokens'][t]:>15.0f}"
            )
    cap = report.get("capacity")
    if cap:
        s, p = cap["slots"], cap["paged"]
        lines.append(
            f"Capacity ({report['settings']['capacity_requests']} requests of the {report['settings']['mix']} mix, "
            f"Poisson {report['settings']['rate']}/s, pool of {cap['blocks']} blocks = 4 slots of "
            f"4096+{max(MIXES[report['settings']['mix']])} tokens)"
        )
        for name, x in (("slots (batch 4)", s), ("paged (batch 16)", p)):
            lines.append(
                f"{name:<18}{x['output_throughput_tok_s']:>8.1f} tok/s  TTFT p99 {x['ttft_ms']['p99']:>8.0f} ms  "
                f"preemptions {x['preemptions']}"
            )
        lines.append(
            f"paged/slots: throughput {p['output_throughput_tok_s'] / s['output_throughput_tok_s']:.2f}x, "
            f"TTFT p99 {p['ttft_ms']['p99'] / s['ttft_ms']['p99']:.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.tools.bench_prefix", description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--capacity-requests", type=int, default=48)
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--mix", choices=list(MIXES), default="chat", help="new tokens per capacity request")
    parser.add_argument("--skip", choices=("chats", "capacity"), action="append", default=[])
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    args = parser.parse_args(argv)
    path = checkpoint(args.cache_dir)
    report: dict[str, Any] = {"settings": vars(args) | {"cache_dir": str(args.cache_dir), "out": str(args.out)}}
    if "chats" not in args.skip:
        image = chat_image(args.cache_dir)
        report["chats"] = {
            "off": run_chats(path, image, args.chats, False, args.new_tokens),
            "on": run_chats(path, image, args.chats, True, args.new_tokens),
        }
    if "capacity" not in args.skip:
        new_tokens = max(MIXES[args.mix])
        blocks = 4 * blocks_for(4096 + new_tokens, 16) + 1
        requests = capacity_requests(args.capacity_requests, args.mix)
        report["capacity"] = {
            "blocks": blocks,
            "slots": run_capacity(path, requests, args.rate, 4, blocks, new_tokens, "slots"),
            "paged": run_capacity(path, requests, args.rate, 16, blocks, new_tokens, "paged"),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_prefix.json").write_text(json.dumps(report, indent=2, default=str))
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
