"""TPOT at one decode step per call, as a caller of the Ray API receives the tokens, against transformers.

`python -m cluster.tools.bench_tpot [CONF] [key=value ...] [--tokens 128] [--requests 4] [--json OUT]`

The engine runs CONF (default conf/tiny_cpu.yaml) on the tiny checkpoint (built into the cache when
missing) at tp 1, graph mode, batch 1, `scheduler.decode_steps_per_call=1`, EOS ignored; the key=value
overrides come last. After one warm-up request, `--requests` text requests of `--tokens` tokens run one
after another through `coordinator.generate`; each one's delivered `tpot_s` (the Coordinator's delivery
times) and the median of its `device_itl_s` (the worker's step clock) are kept. transformers' `generate`
makes the same tokens from the same prompts in the same process, before and after the engine (its TPOT:
the median gap between its steps' logits). The figure: the median engine TPOT over the median
transformers TPOT.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster.config import ConfigError, RunConfig, load_config
from cluster.tools.bench import CACHE_DIR, CHECKPOINTS, log, run_hf
from cluster.tools.tiny_checkpoint import build_tiny_checkpoint
from model.processor import PreparedRequest, PromptBuilder

DEFAULT_CONF = "conf/tiny_cpu.yaml"
SETTINGS = [
    "world_size=1",
    "parallel_config.tp_size=1",
    "exe_mode=graph",
    "data_config.batch_size=1",
    "data_config.ignore_eos=true",
    "scheduler.decode_steps_per_call=1",
    "ray.address=local",
    "ray.log_to_driver=false",
    "ray.namespace=bench-tpot",
]


def prompts(count: int) -> list[str]:
    """count + 1 distinct prompts (the first is the warm-up)."""
    return [f"Request {i}: describe the weather today and tomorrow in detail." for i in range(count + 1)]


def engine_tpot(cfg: RunConfig, texts: list[str]) -> dict[str, Any]:
    """Delivered TPOT and device ITL medians (ms) of each request but the warm-up, and the start-up time."""
    import ray

    from cluster import start, stop

    t = time.perf_counter()
    coordinator = start(cfg)
    startup = time.perf_counter() - t
    try:
        tpot, device = [], []
        for i, text in enumerate(texts):
            (record,) = ray.get(coordinator.generate.remote([{"id": f"tpot-{i}", "prompt": text, "images": []}]))
            if record["error"]:
                raise RuntimeError(f"request {i} failed: {record['error']}")
            if i:  # the first is the warm-up
                tpot.append(record["tpot_s"] * 1e3)
                device.append(statistics.median(record["device_itl_s"]) * 1e3)
    finally:
        stop(coordinator)
        ray.shutdown()
    return {"tpot_ms": tpot, "device_itl_ms": device, "startup_s": startup}


def transformers_tpot(hf: Any, batches: list[list[PreparedRequest]], tokens: int) -> list[float]:
    """transformers' TPOT (ms) per request but the warm-up: the median gap between its steps' logits."""
    return [statistics.median(np.diff(times[0])) * 1e3 for _, times, _ in run_hf(hf, batches, tokens)[1:]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.tools.bench_tpot", description=__doc__.splitlines()[0])
    parser.add_argument("args", nargs="*", help=f"[CONF] [key=value ...] (CONF default {DEFAULT_CONF})")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per request (default 128)")
    parser.add_argument("--requests", type=int, default=4, help="timed requests (default 4)")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--cache-dir", default=str(CACHE_DIR), help="where the tiny checkpoint is built and reused")
    args = parser.parse_args(argv)
    conf, overrides = DEFAULT_CONF, list(args.args)
    if overrides and "=" not in overrides[0]:
        conf = overrides.pop(0)
    if args.tokens < 2 or args.requests < 1:
        parser.error("--tokens must be >= 2 and --requests >= 1")
    directory, spec = CHECKPOINTS["tiny"]
    model = build_tiny_checkpoint(Path(args.cache_dir) / directory, spec)
    try:  # before anything runs: a bad key or value fails here, naming it
        cfg = load_config(
            conf, [f"model_path={model}", f"data_config.max_new_tokens={args.tokens}", *SETTINGS, *overrides]
        )
    except ConfigError as e:
        parser.error(str(e))
    texts = prompts(args.requests)
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model, torch_dtype=torch.float32).eval()
    builder = PromptBuilder.from_pretrained(model)
    batches = [[builder.build({"id": str(i), "prompt": text, "images": []})] for i, text in enumerate(texts)]

    log("transformers (before the engine)")
    hf = transformers_tpot(hf_model, batches, args.tokens)
    log("engine")
    ours = engine_tpot(cfg, texts)
    log("transformers (after the engine)")
    hf += transformers_tpot(hf_model, batches, args.tokens)
    ratio = statistics.median(ours["tpot_ms"]) / statistics.median(hf)
    report = {"conf": conf, "overrides": overrides, "tokens": args.tokens, **ours, "transformers_tpot_ms": hf}
    report["ratio"] = ratio
    print(
        f"engine TPOT {', '.join(f'{x:.3f}' for x in ours['tpot_ms'])} ms (device ITL "
        f"{', '.join(f'{x:.3f}' for x in ours['device_itl_ms'])} ms); transformers "
        f"{min(hf):.3f}-{max(hf):.3f} ms; median over median {ratio:.3f}x (start-up {ours['startup_s']:.1f} s)"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
