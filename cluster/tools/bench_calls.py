"""Per-call cost of a DP group's phase calls: ordinary Ray actor calls, a compiled graph, a socket per worker.

`python -m cluster.tools.bench_calls [--tp 1 2] [--calls 100] [--repeats 5] [--where actor|driver]`

For each TP size, blocks of calls rotate between the three paths of `ray.phase_calls` (`--repeats` of each,
which goes first rotating too), each block on a group of its own of real ShardWorkers on the tiny
checkpoint (CPU, float32, eager, as conf/tiny_cpu.yaml runs it; built into the cache when missing):
ordinary actor calls (`actors/groups.WorkerGroup`: one call per rank), one compiled graph
(`actors/compiled_group.py`) or a socket per rank (`actors/socket_group.py`).
A block admits and prefills one request, then times `--calls` decode-only `step` calls (one decode step
each) and as many `health` calls (which do nothing: the floor of each path). A call's cost is its round
trip where the caller receives the answers minus the slowest rank's own time in `step` (the `seconds` it
reports): what the call path adds to every decode call. Medians over every call of a kind. The caller is an
async Ray actor, as the Coordinator is (`--where driver`: this process instead); its CPU time per call and
the share of a core it uses over an idle second after the calls are reported too (a compiled graph's
channel reader polls).

Prints a table and each path's cost against the ordinary calls'; `--json` prints one JSON line instead.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import ray

from actors.config import EngineConfig, WorkerConfig
from actors.group_factory import make_worker_group
from cluster.tools.bench import CACHE_DIR, CHECKPOINTS, log
from cluster.tools.tiny_checkpoint import build_tiny_checkpoint
from model.kv_cache import blocks_for
from model.processor import PreparedRequest, PromptBuilder
from model.sampling import SamplingParams

PROMPT = "Describe the weather today and tomorrow, then summarize the report in three sentences."
PROMPT_ROOM = 128  # prompt tokens a request may have
PATHS = ("ordinary", "compiled", "socket")  # values of `ray.phase_calls`
KINDS = ("step", "health")  # a decode step, and a call that does nothing (the floor of each path)
GOAL_MS = {1: 0.3, 2: 0.6}  # cost per call a fast path is meant to stay under, by TP size


# --------------------------------------------------------------------------------- plans
def admit_args(prepared: PreparedRequest, request_id: str, max_new_tokens: int, block_size: int, release: list[str]):
    """`step` arguments that forget `release`, then admit and prefill one greedy request (EOS ignored) in
    blocks 1..n."""
    table = list(range(1, 1 + blocks_for(len(prepared.input_ids) + max_new_tokens, block_size)))
    request = dataclasses.replace(prepared, request_id=request_id, pixel_values=None)
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    chunks = [(request_id, 0, len(prepared.input_ids))]
    return (release, [], [(request, params, [], 0)], {request_id: (0, table)}, chunks, [], 1)


def decode_args(request_id: str) -> tuple:
    """`step` arguments of one pure-decode step of `request_id`."""
    return ([], [], [], {}, [], [request_id], 1)


def bench_config(model_path: Path, tp: int, calls: int) -> EngineConfig:
    """A group of `tp` CPU workers on the tiny checkpoint, as conf/tiny_cpu.yaml runs it, with room for one
    request of `calls` decode steps."""
    worker = WorkerConfig(str(model_path), "cpu", "float32", "eager", "dp", 1, PROMPT_ROOM + calls + 1)
    return EngineConfig(worker, tp, 1, {"num_cpus": 1}, "bench-calls", PROMPT_ROOM, 1)


# --------------------------------------------------------------------------------- measurement
async def measure(cfg: EngineConfig, prepared: PreparedRequest, calls: int, repeats: int) -> dict[str, Any]:
    """Blocks of calls of each path, rotating, each on a group of its own (only one alive at a time: a compiled
    graph's channel readers poll, which would slow another path's calls on a small host).

    Per (call kind, path): each call's (round trip, slowest rank's own seconds), and per block the caller's
    CPU seconds per call; per path, the caller's CPU seconds per second of an idle second after the calls."""
    size = cfg.worker.kv_pool()[1]
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {(k, p): [] for k in KINDS for p in PATHS}
    cpu: dict[tuple[str, str], list[float]] = {(k, p): [] for k in KINDS for p in PATHS}
    idle: dict[str, list[float]] = {p: [] for p in PATHS}
    for block in range(len(PATHS) * repeats):
        path = PATHS[(block + block // len(PATHS)) % len(PATHS)]  # which path goes first rotates too
        group = make_worker_group(0, dataclasses.replace(cfg, phase_calls=path), [None] * cfg.tp_size)
        await group.start()
        try:
            admitted = (await group.call("step", *admit_args(prepared, "bench", calls + 1, size, [])))[0]
            if admitted["errors"]:
                raise RuntimeError(f"the benchmark's request was refused: {admitted['errors']}")
            for kind, args in (("step", decode_args("bench")), ("health", ())):
                used = time.process_time()
                for _ in range(calls):
                    start = time.perf_counter()
                    out = await group.call(kind, *args)
                    round_trip = time.perf_counter() - start
                    rows[kind, path].append((round_trip, max(r["seconds"] for r in out) if kind == "step" else 0.0))
                cpu[kind, path].append((time.process_time() - used) / calls)
            used = time.process_time()
            await asyncio.sleep(1.0)
            idle[path].append(time.process_time() - used)
        finally:
            await group.kill()
    return {"rows": rows, "cpu": cpu, "idle": idle}


@ray.remote(num_cpus=0)
class Caller:
    """An async actor that owns the group, as the Coordinator does."""

    async def measure(self, cfg: EngineConfig, prepared: PreparedRequest, calls: int, repeats: int) -> dict:
        return await measure(cfg, prepared, calls, repeats)


def summarize(measured: dict[str, Any]) -> dict[str, Any]:
    """Medians in ms per call kind and path: round trip, workers' time, their difference per call (the cost)
    and the caller's CPU time per call; per path, the share of a core the idle caller uses."""
    out: dict[str, Any] = {"idle_core_share": {p: statistics.median(v) for p, v in measured["idle"].items()}}
    for (kind, path), r in measured["rows"].items():
        out.setdefault(kind, {})[path] = {
            "calls": len(r),
            "round_trip_ms": statistics.median(t for t, _ in r) * 1e3,
            "workers_ms": statistics.median(w for _, w in r) * 1e3,
            "cost_ms": statistics.median(t - w for t, w in r) * 1e3,
            "caller_cpu_ms": statistics.median(measured["cpu"][kind, path]) * 1e3,
        }
    return out


def table(results: dict[int, dict[str, Any]]) -> str:
    head = (
        f"{'tp':>3} {'call':<7} {'path':<9} {'calls':>6} {'round trip ms':>14} {'workers ms':>11} {'cost ms':>8} "
        f"{'caller CPU ms':>14}"
    )
    lines = [head]
    for tp, kinds in results.items():
        for kind in KINDS:
            for path, s in kinds[kind].items():
                lines.append(
                    f"{tp:>3} {kind:<7} {path:<9} {s['calls']:>6} {s['round_trip_ms']:>14.3f} "
                    f"{s['workers_ms']:>11.3f} {s['cost_ms']:>8.3f} {s['caller_cpu_ms']:>14.3f}"
                )
    for tp, kinds in results.items():
        for kind in KINDS:
            paths = kinds[kind]
            goal = GOAL_MS.get(tp) if kind == "step" else None
            for path in PATHS[1:]:
                cost = paths[path]["cost_ms"]
                verdict = f"; goal <= {goal} ms: {'met' if cost <= goal else 'missed'}" if goal else ""
                ratio = paths["ordinary"]["cost_ms"] / cost
                lines.append(f"tp {tp} {kind}: ordinary / {path} cost = {ratio:.1f}x{verdict}")
        share = kinds["idle_core_share"]
        lines.append(f"tp {tp} idle caller, share of a core: " + ", ".join(f"{p} {share[p]:.0%}" for p in PATHS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.tools.bench_calls", description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="TP sizes, one group each")
    parser.add_argument("--calls", type=int, default=100, help="decode calls per block")
    parser.add_argument("--repeats", type=int, default=5, help="blocks of each path")
    parser.add_argument("--where", choices=("actor", "driver"), default="actor", help="the caller's process")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = parser.parse_args(argv)
    directory, spec = CHECKPOINTS["tiny"]
    model_path = build_tiny_checkpoint(CACHE_DIR / directory, spec)
    prepared = PromptBuilder.from_pretrained(model_path).build({"id": "bench", "prompt": PROMPT, "images": []})
    ray.init(address="local", num_cpus=max(args.tp) + 1, include_dashboard=False, log_to_driver=False)
    results = {}
    try:
        for tp in args.tp:
            cfg = bench_config(model_path, tp, args.calls)
            log(f"tp {tp}: {args.repeats} blocks of {args.calls} decode calls per path, caller in the {args.where}")
            if args.where == "actor":
                measured = ray.get(Caller.remote().measure.remote(cfg, prepared, args.calls, args.repeats))
            else:
                measured = asyncio.run(measure(cfg, prepared, args.calls, args.repeats))
            results[tp] = summarize(measured)
    finally:
        ray.shutdown()
    if args.json:
        print(json.dumps({"where": args.where, "tp": results}))
    else:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
