"""Capacity planner: this engine's own Coordinator and scheduler against a target's modelled costs, in simulated time.

`python -m cluster.tools.simulate CONF [key=value ...] --model-shape NAME|PATH --weights bf16|w8a8
--hardware NAME --workload NAME|FILE --rate R [R ...] --requests N [--policy continuous|static]
[--seed S] [--max-concurrency N] [--goodput ttft_ms:2000 tpot_ms:50] [--json OUT] [--plot OUT.png]`
and `python -m cluster.tools.simulate --calibrate [--json OUT]` (cluster/tools/sim_calibrate.py).

The run config (CONF and its overrides, as `cluster.launch` takes them) sets the engine: TP and DP,
batch size, KV pool, scheduler policy, token budget, stall cap, steps per call, prefix caching. The
flags override the keys they name (`--policy` scheduler.policy, `--rate` data_config.request_rate,
`--requests` data_config.num_samples, `--seed` data_config.seed). The real Coordinator
(actors/coordinator.py: routing, GroupScheduler, KV block pool, prefix cache, token budget, stall cap,
steps per call, preemption) runs in this process without Ray over simulated worker groups
(cluster/tools/sim_workers.py) whose calls last what the cost model gives for `--model-shape`,
`--weights` and `--hardware` (cluster/tools/cost_model.py), on a discrete-event loop
(cluster/tools/sim_loop.py); request preparation hands the Coordinator synthetic prepared requests of
the workload's token counts, image spans and content keys (cluster/tools/sim_workloads.py). Only the
tokenizer of the tiny checkpoint is used (for the template's ids and detokenizing).

Prints the run summary `cluster.launch` prints and a row of percentiles per rate; `--json` writes the
summary (one rate: an object, a sweep: a list) with `hardware`, `model_shape`, `weights`, `workload`,
the KV blocks in use over time and the goodput; `--plot` draws TTFT and TPOT against the request rate.
docs/simulator.md has the validation and the decisions made with it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors import clock
from actors.coordinator import Coordinator
from cluster.config import ConfigError, RunConfig, load_config
from cluster.launch import arrival_offsets, engine_config
from cluster.report import format_summary, latency_samples_ms, summarize
from cluster.results import json_default
from cluster.tools import cost_model, sim_loop
from cluster.tools.hardware import Hardware, hardware
from cluster.tools.model_shapes import ModelShape, model_shape
from cluster.tools.sim_workers import SimWorkerGroup, Target
from cluster.tools.sim_workloads import SimRequest, workload
from model.config import ModelConfig
from model.device import KV_BLOCK_SIZE
from model.processor import PreparedRequest

GOODPUT_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")
KV_SAMPLE_S = 0.25  # simulated seconds between two readings of the KV blocks in use


@dataclass
class Plan:
    """One simulation: the run config, the target, the workload and the load."""

    cfg: RunConfig
    shape: ModelShape
    hw: Hardware
    weights: str
    workload: str
    requests: list[SimRequest]
    rate: float
    max_concurrency: int | None = None
    goodput: dict[str, float] | None = None


class NoPlacement:
    """Simulated groups need no placement group."""

    def strategy(self, index: int) -> None:
        return None

    def remove(self) -> None:
        pass


def parse_goodput(items: Sequence[str] | None) -> dict[str, float] | None:
    """`ttft_ms:2000 tpot_ms:50` -> {"ttft_ms": 2000.0, "tpot_ms": 50.0}; ValueError naming a bad item."""
    if not items:
        return None
    out = {}
    for item in items:
        key, _, value = item.partition(":")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if key not in GOODPUT_KEYS or not number > 0:
            raise ValueError(f"--goodput {item!r}: expected KEY:MS with KEY one of {', '.join(GOODPUT_KEYS)}, MS > 0")
        out[key] = number
    return out


def kv_blocks_for_memory(shape: ModelShape, cfg: RunConfig, block_size: int, weights: str) -> int:
    """kv_cache.memory_gb as blocks of the target shape (keys and values of every layer, one rank)."""
    per_block = cost_model.kv_bytes_per_token(shape, cfg.tp_size, weights) * block_size
    blocks = int(cfg.kv_cache.memory_gb * (1 << 30)) // per_block
    if blocks < 2:
        raise ConfigError(f"kv_cache.memory_gb={cfg.kv_cache.memory_gb!r}: holds {blocks} KV blocks; at least 2 needed")
    return blocks


def tokenizer_checkpoint() -> Path:
    """The tiny checkpoint whose tokenizer and template the Coordinator loads (no weights are used)."""
    from cluster.tools.bench import CACHE_DIR, CHECKPOINTS
    from cluster.tools.tiny_checkpoint import build_tiny_checkpoint

    directory, spec = CHECKPOINTS["tiny"]
    return build_tiny_checkpoint(CACHE_DIR / directory, spec)


def prepared(request: SimRequest) -> tuple[PreparedRequest, list[tuple[int, int, bytes]]]:
    """What Preparation.build returns for a synthetic request: its ids, a grid per image, and pixel values
    that take no memory (one value broadcast over each patch row; only their count is read)."""
    grid = None
    pixels = None
    if request.grids:
        grid = torch.tensor(request.grids, dtype=torch.int64)
        pixels = torch.zeros(1, 1).expand(int(grid.prod(dim=1).sum()), 1)
    return PreparedRequest(request.id, list(request.prompt_ids), pixels, grid), list(request.images)


async def _inline(fn: Any, *args: Any) -> Any:
    return fn(*args)


def make_coordinator(plan: Plan) -> Coordinator:
    """The engine's Coordinator over simulated groups, its preparation handing it `plan.requests` as prepared."""
    cfg = plan.cfg
    ecfg = engine_config(cfg)
    target = Target(plan.shape, plan.hw, plan.weights, cfg.tp_size, cfg.exe_mode == "graph",
                    cfg.parallel_config.vision_mode)  # fmt: skip

    def group(dp_rank: int, engine_cfg: Any, strategies: list[Any]) -> SimWorkerGroup:
        return SimWorkerGroup(dp_rank, engine_cfg, strategies, target=target, tp_degree=cfg.tp_size)

    coordinator = Coordinator(ecfg, NoPlacement(), list(range(cfg.dp_size)), group_factory=group)
    by_id = {r.id: r for r in plan.requests}
    coordinator.preparation.offload = _inline
    coordinator.preparation.build = lambda request: prepared(by_id[request["id"]])
    return coordinator


async def serve(plan: Plan) -> dict:
    """Run the plan's requests through the Coordinator on the simulated clock; the run summary."""
    coordinator = make_coordinator(plan)
    await coordinator.setup()
    start = clock.wall()
    offsets = arrival_offsets(len(plan.requests), plan.rate, plan.cfg.data_config.seed)
    ended = {r.id: asyncio.Event() for r in plan.requests}
    slots = asyncio.Semaphore(plan.max_concurrency) if plan.max_concurrency else None
    records: list[dict] = []
    kv: list[tuple[float, int]] = []

    async def one(request: SimRequest, offset: float) -> None:
        await asyncio.sleep(max(0.0, start + offset - clock.wall()))
        if request.follows is not None:
            await ended[request.follows].wait()
        if slots is not None:
            await slots.acquire()
        try:
            body = {"id": request.id, "prompt": "", "max_new_tokens": request.max_new_tokens, "ignore_eos": True}
            records.extend(await coordinator.generate([body]))
        finally:
            if slots is not None:
                slots.release()
            ended[request.id].set()

    async def sample_kv() -> None:
        while True:
            kv.append((clock.wall() - start, sum(s["used"] for s in coordinator.kv_cache_stats())))
            await asyncio.sleep(KV_SAMPLE_S)

    sampler = asyncio.ensure_future(sample_kv())
    await asyncio.gather(*(one(r, o) for r, o in zip(plan.requests, offsets)))
    wall = clock.wall() - start
    sampler.cancel()
    stats = coordinator.kv_cache_stats()
    phases = dict(coordinator.phase_totals)
    await coordinator.shutdown()
    return run_summary(plan, records, wall, phases, kv, stats)


def run_summary(plan: Plan, records: list[dict], wall: float, phases: dict, kv: list, stats: list[dict]) -> dict:
    """The summary `cluster.launch` writes, plus p90s, goodput, KV blocks over time and what was simulated."""
    cfg = plan.cfg
    samples = latency_samples_ms(records)
    used = [u for _, u in kv]
    capacity = sum(s["used"] + s["free"] for s in stats)
    good = None
    if plan.goodput:
        good = sum(
            r.get("error") is None
            and all((r.get(k.replace("_ms", "_s")) or 0.0) * 1e3 <= v for k, v in plan.goodput.items())
            for r in records
        )
    summary = summarize(
        records,
        wall,
        phases=phases,
        extra={
            "config": {
                "device": cfg.device,
                "world_size": cfg.world_size,
                "tp_size": cfg.tp_size,
                "dp_size": cfg.dp_size,
                "exe_mode": cfg.exe_mode,
                "vision_mode": cfg.parallel_config.vision_mode,
                "batch_size": cfg.data_config.batch_size,
                "policy": cfg.scheduler.policy,
                "request_rate": plan.rate,
                "prefill_chunk_tokens": cfg.scheduler.prefill_chunk_tokens,
                "max_decode_stall": cfg.scheduler.max_decode_stall,
                "encoder_budget_tokens": cfg.scheduler.encoder_budget_tokens,
                "max_decode_call_ms": cfg.scheduler.max_decode_call_ms,
                "decode_steps_per_call": cfg.scheduler.decode_steps_per_call,
                "kv_blocks_per_group": capacity // max(1, len(stats)),
                "max_concurrency": plan.max_concurrency,
            },
            "simulated": True,
            "hardware": plan.hw.to_dict(),
            "model_shape": plan.shape.to_dict(),
            "weights": plan.weights,
            "workload": plan.workload,
            "goodput_slo": plan.goodput,
            "request_goodput": None if good is None or wall <= 0 else good / wall,
            "kv_blocks": {
                "capacity": capacity,
                "peak": max(used, default=0),
                "mean": float(np.mean(used)) if used else 0.0,
                "every_s": KV_SAMPLE_S,
                "used": used,
            },
        },
    )
    for metric in ("queue", "ttft", "tpot", "itl", "e2e"):
        values = samples[metric]
        summary[f"{metric}_ms"]["p90"] = float(np.percentile(values, 90)) if values else None
    return summary


def simulate(plan: Plan) -> dict:
    """One simulated run (see `serve`) on a fresh discrete-event loop."""
    return sim_loop.run(serve(plan))


def memory_note(plan: Plan) -> str | None:
    """A warning when one rank's weights and KV pool would not fit the device's memory."""
    cfg = plan.cfg
    weights = cost_model.weight_bytes(plan.shape, plan.weights, cfg.tp_size)
    weights += plan.shape.vocab * plan.shape.hidden * cost_model.element_bytes(plan.weights) / cfg.tp_size  # embeddings
    blocks, block_size = engine_config(cfg).worker.kv_pool()
    kv = blocks * block_size * cost_model.kv_bytes_per_token(plan.shape, cfg.tp_size, plan.weights)
    if weights + kv > plan.hw.memory_bytes:
        return (
            f"note: one rank needs {weights / 1e9:.1f} GB of weights + {kv / 1e9:.1f} GB of KV, more than "
            f"{plan.hw.name}'s {plan.hw.memory_bytes / 1e9:.0f} GB"
        )
    return None


def format_row(summary: dict) -> str:
    s = summary
    return (
        f"{s['config']['request_rate']:>8g}{s['request_throughput'] or 0:>9.2f}"
        f"{s['output_throughput_tok_s'] or 0:>9.1f}"
        f"{s['ttft_ms']['median'] or 0:>10.0f}{s['ttft_ms']['p99'] or 0:>10.0f}{s['tpot_ms']['median'] or 0:>10.1f}"
        f"{s['tpot_ms']['p99'] or 0:>10.1f}{s['itl_ms']['p99'] or 0:>10.0f}{s['e2e_ms']['p99'] or 0:>10.0f}"
        f"{s['queue_ms']['p99'] or 0:>10.0f}{s['preemptions']:>7}{s['kv_blocks']['peak']:>9}"
        f"{'' if s['request_goodput'] is None else format(s['request_goodput'], '.2f'):>9}"
    )


HEADER = (
    f"{'rate':>8}{'req/s':>9}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'TPOT p99':>10}"
    f"{'ITL p99':>10}{'E2E p99':>10}{'queue p99':>10}{'preempt':>7}{'KV peak':>9}{'goodput':>9}"
)


def plot(summaries: list[dict], path: Path) -> None:
    """TTFT and TPOT (median and p99) against the request rate, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [s["config"]["request_rate"] for s in summaries]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in ((axes[0], "ttft_ms", "TTFT (ms)"), (axes[1], "tpot_ms", "TPOT (ms)")):
        for stat in ("median", "p99"):
            ax.plot(rates, [s[metric][stat] for s in summaries], marker="o", label=stat)
        ax.set_xlabel("request rate (req/s)")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    s = summaries[0]
    fig.suptitle(f"{s['model_shape']['name']} {s['weights']} on {s['hardware']['name']}, {s['workload']} (simulated)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cluster.tools.simulate", description=__doc__.split("\n")[0])
    parser.add_argument("conf", help="run config YAML (as cluster.launch takes)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--model-shape", required=True, help="qwen2.5-vl-3b|7b|32b|72b or a checkpoint directory")
    parser.add_argument(
        "--weights", choices=cost_model.WEIGHTS, help="default: fp32 for a float32 config (cpu-here), else bf16"
    )
    parser.add_argument("--hardware", required=True, help="a3, 910b, a100-80g, h100, h200 or cpu-here")
    parser.add_argument(
        "--workload", required=True, help="chat, documents, multi-turn, vision-arena, random:IN:OUT or a file"
    )
    parser.add_argument("--rate", type=float, nargs="+", help="requests/s (inf: all at once); several make a sweep")
    parser.add_argument("--requests", type=int, help="requests to send (data_config.num_samples)")
    parser.add_argument("--policy", choices=("continuous", "static"))
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-concurrency", type=int, help="at most this many requests in flight")
    parser.add_argument("--goodput", nargs="+", metavar="KEY:MS", help="SLOs, e.g. ttft_ms:2000 tpot_ms:50")
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--plot", type=Path, help="draw TTFT and TPOT against --rate here (a PNG)")
    return parser


def plans(args: argparse.Namespace) -> list[Plan]:
    """One plan per rate, from the parsed arguments (ValueError/ConfigError name a bad value)."""
    overrides = list(args.overrides)
    if args.policy:
        overrides.append(f"scheduler.policy={args.policy}")
    if args.requests is not None:
        if args.requests < 1:
            raise ValueError(f"--requests={args.requests} must be >= 1")
        overrides.append(f"data_config.num_samples={args.requests}")
    if args.seed is not None:
        overrides.append(f"data_config.seed={args.seed}")
    if args.rate:
        overrides.append(f"data_config.request_rate={args.rate[0]}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency={args.max_concurrency} must be >= 1")
    cfg = load_config(args.conf, overrides)
    shape, hw = model_shape(args.model_shape), hardware(args.hardware)
    goodput = parse_goodput(args.goodput)
    weights = args.weights or ("fp32" if cfg.dtype == "float32" else "bf16")
    cfg.model_path = str(tokenizer_checkpoint())
    block_size = cfg.kv_cache.block_size or KV_BLOCK_SIZE[cfg.device]
    if cfg.kv_cache.num_blocks is None and cfg.kv_cache.memory_gb is not None:
        cfg.kv_cache.num_blocks = kv_blocks_for_memory(shape, cfg, block_size, weights)
    count = cfg.data_config.num_samples or cfg.data_config.batch_size * cfg.dp_size
    from model.processor import PromptBuilder

    builder = PromptBuilder.from_pretrained(cfg.model_path)
    ids = ModelConfig.from_pretrained(cfg.model_path)
    special = frozenset({ids.image_token_id, ids.video_token_id, ids.vision_start_token_id, *ids.eos_token_ids})
    reqs = workload(
        args.workload, count, cfg.data_config.seed, builder.image_token_id,
        lambda text: builder.tokenizer(text)["input_ids"], cfg.data_config.max_new_tokens, special,
    )  # fmt: skip
    rates = args.rate or [cfg.data_config.request_rate]
    for rate in rates:
        if not (rate > 0 or math.isinf(rate)):
            raise ValueError(f"--rate={rate} must be > 0 (inf: all at once)")
    return [Plan(cfg, shape, hw, weights, args.workload, reqs, rate, args.max_concurrency, goodput) for rate in rates]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--calibrate" in argv:  # fit cpu-here to this machine's kernels (cluster/tools/sim_calibrate.py)
        from cluster.tools import sim_calibrate

        return sim_calibrate.main(argv)
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    try:
        runs = plans(args)
    except (ValueError, ConfigError) as e:
        parser.error(str(e))
    note = memory_note(runs[0])
    if note:
        print(note)
    summaries = []
    for plan in runs:
        summary = simulate(plan)
        summaries.append(summary)
        print(format_summary(summary))
    first = runs[0]
    print(
        f"{first.shape.name} {first.weights} on {first.hw.name} x {first.cfg.world_size} (TP {first.cfg.tp_size} x "
        f"DP {first.cfg.dp_size}), {first.workload}, {len(first.requests)} requests, {first.cfg.scheduler.policy}"
    )
    print(HEADER)
    for summary in summaries:
        print(format_row(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        body = summaries[0] if len(summaries) == 1 else summaries
        args.json.write_text(json.dumps(body, indent=2, default=json_default) + "\n")
        print(f"summary: {args.json}")
    if args.plot:
        plot(summaries, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
