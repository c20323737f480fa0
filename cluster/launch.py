"""Entry points: `python -m cluster.launch CONF [key=value ...]` and the `start()` Python API.

The driver checks the config and the checkpoint before anything starts, connects to Ray (an
existing cluster or a new local one), reserves one placement group per TP group, starts the
Coordinator (which starts the ShardWorkers), sends the dataset's requests (all at once, or as
Poisson arrivals at `data_config.request_rate`), appends each request's JSONL record to
`output_path` as it completes, and writes a summary and plots beside it at the end. A killed run
loses only its running requests: `resume=true` runs what the file lacks.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayTaskError
from ray.util.placement_group import placement_group_table
from tqdm import tqdm

from actors.config import EngineConfig, WorkerConfig
from actors.coordinator import Coordinator
from actors.errors import unwrap
from actors.records import failed_record, new_record
from actors.router import Router
from cluster.config import ConfigError, RunConfig, load_config, phase_calls
from cluster.datasets import DatasetError, load_requests
from cluster.devices import actor_resource_options, check_graph_env, get_device_spec, resolve_fused_ops
from cluster.placement import COORDINATOR_NAME, PlacementError, order_groups_by_node, reserve
from cluster.preflight import PreflightError, check_nodes
from cluster.report import format_summary, summarize, write_report
from cluster.results import (
    RecordWriter,
    busy_seconds,
    check_output_path,
    latest_per_id,
    pending_requests,
    read_records,
    resume_command,
)
from cluster.speculative_config import speculative_config
from model.config import ModelConfig, ModelConfigError
from model.device import DTYPES as TORCH_DTYPES
from model.device import KV_BLOCK_SIZE
from model.kv_cache import PagedKVCache
from model.loader import CheckpointError, checkpoint_files
from model.quant import QuantizationError, check_mode
from model.sampling import SamplingParams

logger = logging.getLogger("cluster.launch")

# Errors a user can fix; the launch prints their message alone, without a traceback.
USER_ERRORS = (
    ConfigError,
    ModelConfigError,
    CheckpointError,
    DatasetError,
    PlacementError,
    PreflightError,
    TimeoutError,
)
# After interrupt_grace_s, how long the aborted requests' records may take to come back.
ABORT_WAIT_S = 10.0


def preflight(cfg: RunConfig) -> ModelConfig:
    """Check the checkpoint against the config before any actor starts; errors name key and value."""
    path = Path(cfg.model_path)
    if not path.is_dir():
        raise ConfigError(f"model_path={cfg.model_path!r}: no such directory")
    model_config = ModelConfig.from_pretrained(path)
    try:
        model_config.validate_tp(cfg.tp_size)
    except ModelConfigError as e:
        raise ConfigError(f"{e} (model {cfg.model_path})") from e
    checkpoint_files(path)
    try:
        check_mode(cfg.quantization, path)
    except QuantizationError as e:
        raise ConfigError(str(e)) from e
    if not ((path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()):
        raise CheckpointError(f"model_path={cfg.model_path!r} has no tokenizer (tokenizer.json or vocab.json)")
    if not (path / "preprocessor_config.json").is_file():
        raise CheckpointError(f"model_path={cfg.model_path!r} has no preprocessor_config.json (image processor)")
    try:
        check_graph_env(cfg.device, cfg.exe_mode, os.environ, cfg.dist_env)
        resolve_fused_ops(get_device_spec(cfg.device), cfg.fused_ops)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return model_config


def kv_pool_blocks(cfg: RunConfig, block_size: int) -> int | None:
    """Blocks of each rank's KV pool from kv_cache.num_blocks or kv_cache.memory_gb (None: the default)."""
    kv = cfg.kv_cache
    if kv.num_blocks is not None:
        return kv.num_blocks
    if kv.memory_gb is None:
        return None
    text = ModelConfig.from_pretrained(cfg.model_path).text
    kv_heads = max(1, text.num_key_value_heads // cfg.tp_size)  # replicated when tp > kv heads
    per_block = PagedKVCache.bytes_per_block(
        text.num_hidden_layers, block_size, kv_heads, text.head_dim, TORCH_DTYPES[cfg.dtype]
    )
    blocks = int(kv.memory_gb * (1 << 30)) // per_block
    if blocks < 2:
        raise ConfigError(
            f"kv_cache.memory_gb={kv.memory_gb!r}: holds {blocks} KV blocks of {per_block} bytes; at least 2 needed"
        )
    return blocks


def engine_config(cfg: RunConfig) -> EngineConfig:
    """What the Coordinator and its workers need of the run config."""
    spec = get_device_spec(cfg.device)
    data, sched = cfg.data_config, cfg.scheduler
    block_size = cfg.kv_cache.block_size or KV_BLOCK_SIZE[cfg.device]
    worker = WorkerConfig(
        model_path=cfg.model_path,
        device=cfg.device,
        dtype=cfg.dtype,
        exe_mode=cfg.exe_mode,
        vision_mode=cfg.parallel_config.vision_mode,
        max_batch_size=data.batch_size,
        max_seq_len=data.input_max_len + data.max_new_tokens,
        vision_cache_bytes=cfg.vision_cache_mb << 20,
        fused_ops=resolve_fused_ops(spec, cfg.fused_ops),
        decode_attention=cfg.decode_attention,
        quantization=cfg.quantization,
        profile_dir=cfg.profile_dir if cfg.profile else None,
        num_kv_blocks=kv_pool_blocks(cfg, block_size),
        kv_block_size=block_size,
        speculative=speculative_config(cfg.speculative, cfg.model_path, cfg.tp_size),
    )
    return EngineConfig(
        worker=worker,
        tp_size=cfg.tp_size,
        dp_size=cfg.dp_size,
        worker_options=actor_resource_options(spec, cfg.ray.num_cpus_per_worker),
        namespace=cfg.ray.namespace,
        input_max_len=data.input_max_len,
        max_images_per_prompt=data.max_images_per_prompt,
        max_videos_per_prompt=data.max_videos_per_prompt,
        max_video_seconds=cfg.serve.max_video_seconds,
        max_video_bytes=cfg.serve.max_video_bytes,
        sampling=SamplingParams(
            max_new_tokens=data.max_new_tokens,
            temperature=data.temperature,
            top_p=data.top_p,
            top_k=data.top_k,
            repetition_penalty=data.repetition_penalty,
            seed=data.seed,
            ignore_eos=data.ignore_eos,
        ),
        policy=sched.policy,
        grammar_cache_size=cfg.serve.grammar_cache_size,
        grammar_compile_timeout_s=cfg.serve.grammar_compile_timeout_s,
        prefix_caching=cfg.prefix_caching,
        prefill_chunk_tokens=sched.prefill_chunk_tokens,
        decode_steps_per_call=sched.decode_steps_per_call,
        max_decode_call_ms=sched.max_decode_call_ms,
        async_scheduling=sched.async_scheduling,
        max_decode_stall=sched.max_decode_stall,
        encoder_budget_tokens=sched.encoder_budget_tokens,
        worker_timeout_s=cfg.ray.worker_timeout_s,
        rendezvous_timeout_s=cfg.ray.rendezvous_timeout_s,
        max_group_restarts=cfg.ray.max_group_restarts,
        phase_calls=phase_calls(cfg),
        dist_env=dict(cfg.dist_env),
        profile=cfg.profile,
    )


def connect(cfg: RunConfig) -> None:
    """Use the driver's Ray connection if it has one; else connect or start one per `ray.address`."""
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"namespace": cfg.ray.namespace, "log_to_driver": cfg.ray.log_to_driver}
    address = cfg.ray.address
    if address is None:
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
            return
        try:
            ray.init(address="auto", **kwargs)
        except ConnectionError:
            ray.init(address="local", **kwargs)
        return
    ray.init(address=address, **kwargs)


def start(cfg: RunConfig) -> Any:
    """Reserve devices, check each node that will host workers, start the Coordinator and its workers.

    Returns the Coordinator's handle. On npu and cuda the node checks (cluster/preflight.py) run before
    any worker exists; a failing node ends the start with a PreflightError naming it and the fix.

    Uses the driver's Ray connection when it already has one. `ray.get(handle.generate.remote(requests))`
    then serves requests; `stop(handle)` releases everything.
    """
    preflight(cfg)
    connect(cfg)
    try:
        ray.get_actor(COORDINATOR_NAME, namespace=cfg.ray.namespace)
        raise RuntimeError(
            f"an actor named {COORDINATOR_NAME!r} already exists in Ray namespace "
            f"{cfg.ray.namespace!r}: another run is active (stop it, or set ray.namespace)"
        )
    except ValueError:
        pass
    spec = get_device_spec(cfg.device)
    placement = reserve(
        spec,
        cfg.world_size,
        cfg.tp_size,
        cfg.ray.num_cpus_per_worker,
        cfg.ray.placement_timeout_s,
        name_prefix=cfg.ray.namespace,
    )
    coordinator = None
    try:
        nodes = [str(placement_group_table(pg).get("bundles_to_node_id", {}).get(0, "")) for pg in placement.groups]
        if spec.name != "cpu":  # a cpu worker needs nothing the driver's checks did not cover
            # One preflight task per node that will host workers, in its first worker bundle, before any worker.
            first_group = {node: g for g, node in reversed(list(enumerate(nodes)))}
            check_nodes(
                cfg.device,
                cfg.exe_mode,
                cfg.dist_env,
                [placement.strategy(g * cfg.tp_size) for g in sorted(first_group.values())],
                actor_resource_options(spec, cfg.ray.num_cpus_per_worker),
                cfg.ray.worker_timeout_s,
            )
        coordinator = (
            ray.remote(Router if cfg.ray.group_coordinators else Coordinator)
            .options(
                name=COORDINATOR_NAME, namespace=cfg.ray.namespace, num_cpus=0, max_concurrency=1000, max_restarts=0
            )
            .remote(engine_config(cfg), placement, order_groups_by_node(nodes))
        )
        setup_timeout = cfg.ray.rendezvous_timeout_s + 3 * cfg.ray.worker_timeout_s
        try:
            ray.get(coordinator.setup.remote(), timeout=setup_timeout)
        except RayTaskError as e:
            raise unwrap(e) from None
    except BaseException:
        if coordinator is not None:
            _shutdown(coordinator)
        placement.remove()
        raise
    return coordinator


def stop(coordinator: Any, timeout_s: float = 60.0) -> None:
    """Kill the workers and the Coordinator and release the placement groups."""
    _shutdown(coordinator, timeout_s)


def _shutdown(coordinator: Any, timeout_s: float = 60.0) -> None:
    try:
        ray.get(coordinator.shutdown.remote(), timeout=timeout_s)
    except Exception as e:  # the coordinator may already be gone
        logger.warning("coordinator shutdown: %s", e)
    try:
        ray.kill(coordinator, no_restart=True)
    except Exception:
        pass


def eager_decode_buckets(workers: list[dict]) -> list[dict]:
    """Per worker stats (as the Coordinator's stats() lists them) -> the decode buckets that run eager.

    One {"rank", "batch", "length", "error"} per (rank, bucket) whose graph capture failed; empty in eager
    mode, on cpu, and where every capture succeeded.
    """
    return [{"rank": w.get("rank"), **b} for w in workers for b in w.get("eager_buckets") or []]


def format_eager(eager: list[dict]) -> str:
    """'rank 0: batch 8 x 4224 (RuntimeError: ...); ...' for the log and the self-check."""
    return "; ".join(f"rank {e['rank']}: batch {e['batch']} x {e['length']} ({e['error']})" for e in eager)


def arrival_offsets(count: int, rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each request is sent: Poisson arrivals at `rate`/s (all 0 for inf)."""
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(count):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM where the run cannot wind down gently: during startup, or a second signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGINT and SIGTERM handlers for the driver's main thread, restored on exit.

    While `serving`, the first signal only sets `requested`: the run stops sending requests, lets the
    running ones finish for interrupt_grace_s, aborts the rest and writes every record. Before that
    (startup: nothing to save) and at a second signal, the handler raises Interrupted at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.signum: int | None = None
        self.serving = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if first and self.serving:
            self.requested.set()
            return
        raise Interrupted(signum)


def serve_requests(
    coordinator: Any,
    requests: list[dict],
    rate: float,
    seed: int,
    on_record: Any = None,
    stop: StopSignals | None = None,
    grace_s: float = 0.0,
) -> list[dict]:
    """Send requests at their arrival times; records in request order.

    `on_record(record)` sees each record as soon as its request completes. Once `stop` is requested
    no request is sent any more; the running ones get `grace_s` seconds to finish, then are aborted.
    Every request still gets a record: finish_reason 'abort' for the aborted and the never sent.
    """
    offsets = arrival_offsets(len(requests), rate, seed)
    start = time.monotonic()
    pending: dict[Any, int] = {}
    records: list[dict | None] = [None] * len(requests)
    sent = 0
    stopping = stop.requested if stop is not None else threading.Event()
    with tqdm(total=len(requests), desc="requests", unit="req", file=sys.stderr) as bar:

        def finish(i: int, record: dict) -> None:
            records[i] = record
            if on_record is not None:
                on_record(record)
            bar.update(1)

        def collect(timeout_s: float) -> None:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=timeout_s)
            for ref in done:
                i = pending.pop(ref)
                try:
                    record = ray.get(ref)[0]
                except Exception as e:  # the coordinator died: the request still gets a record
                    record = failed_record(requests[i], f"run failed: {unwrap(e)}")
                finish(i, record)

        while (sent < len(requests) or pending) and not stopping.is_set():
            now = time.monotonic() - start
            while sent < len(requests) and offsets[sent] <= now:
                pending[coordinator.generate.remote([requests[sent]])] = sent
                sent += 1
            wait_s = max(0.0, offsets[sent] - now) if sent < len(requests) else 1.0
            if not pending:
                stopping.wait(wait_s)
                continue
            collect(min(wait_s, 0.5))
        if not stopping.is_set():
            return [r for r in records if r is not None]

        tqdm.write(
            f"stopping: {len(requests) - sent} request(s) not sent; {len(pending)} running get "
            f"{grace_s:g} s to finish, then are aborted (signal again to stop at once)",
            file=sys.stderr,
        )
        for i in range(sent, len(requests)):
            finish(i, aborted_record(requests[i]))
        deadline = time.monotonic() + grace_s
        while pending and deadline > time.monotonic():
            collect(min(deadline - time.monotonic(), 0.5))
        for i in pending.values():
            coordinator.abort.remote(str(requests[i]["id"]))
        deadline = time.monotonic() + ABORT_WAIT_S
        while pending and deadline > time.monotonic():
            collect(min(deadline - time.monotonic(), 0.5))
        for ref, i in list(pending.items()):  # the Coordinator did not answer the abort in time
            del pending[ref]
            finish(i, aborted_record(requests[i]))
    return [r for r in records if r is not None]


def aborted_record(request: dict) -> dict:
    """The record of a request ended before it produced its answer, without an error of its own."""
    record = new_record(str(request["id"]))
    record.update(finish_reason="abort", end_time=time.time())
    return record


@dataclass
class Served:
    """What serving on the engine left for the summary: ids written this run, serving wall time, phase
    totals and the decode buckets that run eager."""

    written: set[str] = field(default_factory=set)
    wall_s: float = 0.0
    phases: dict = field(default_factory=dict)
    eager: list[dict] = field(default_factory=list)


def run(cfg: RunConfig, resume_hint: str | None = None) -> int:
    """The whole job: returns the process exit status (0 when every request succeeded).

    Each record is appended to `output_path` as its request completes. With `resume`, requests whose
    ids already have a successful record there are skipped (failed ones too unless `resume_failed`);
    without it, an output_path that holds records fails the run before Ray starts. On Ctrl-C or
    SIGTERM the run winds down (see StopSignals), writes the summary of what completed and returns
    128 + the signal number; `resume_hint` is the command printed to finish the run.
    """
    output = Path(cfg.output_path)
    to_run = requests_to_run(cfg, output)
    signals = StopSignals()
    served = serve_on_engine(cfg, to_run, output, signals) if to_run else Served()
    final = latest_per_id(read_records(output)[0])
    completed = [r for r in final if r.get("finish_reason") != "abort"]
    resumed = [r for r in completed if str(r["id"]) not in served.written]
    summary = run_summary(cfg, completed, resumed, len(final) - len(completed), served)
    print_report(output, completed, resumed, summary, served.eager)
    if signals.signum is not None:
        return report_interrupt(signals.signum, len(served.written), len(final) - len(completed), resume_hint)
    return exit_status(completed)


def requests_to_run(cfg: RunConfig, output: Path) -> list[dict]:
    """The run's requests less those `resume` finds done in `output`; checks the config and the output
    path before Ray starts (earlier results are never overwritten)."""
    data = cfg.data_config
    requests = load_requests(
        data.dataset, data.dataset_dir, data.batch_size, cfg.dp_size, data.num_samples, base_dir=Path.cwd()
    )
    preflight(cfg)
    check_output_path(output, cfg.resume)
    earlier = read_records(output)[0] if cfg.resume else []
    to_run, reused = pending_requests(requests, earlier, cfg.resume_failed)
    if cfg.resume:
        print(
            f"resume: {len(reused)} of {len(requests)} request(s) already done in {output}; running {len(to_run)}",
            file=sys.stderr,
        )
    return to_run


def serve_on_engine(cfg: RunConfig, to_run: list[dict], output: Path, signals: StopSignals) -> Served:
    """Start the engine, serve `to_run` writing each record to `output` as it completes, read the engine's
    stats and stop it (also on errors and signals)."""
    served = Served()
    connect(cfg)  # before the handlers: ray.init installs its own SIGTERM handler
    with signals:
        coordinator = start(cfg)
        try:
            with RecordWriter(output) as writer:

                def keep(record: dict) -> None:
                    writer.write(record)
                    served.written.add(str(record["id"]))

                signals.serving = True
                start_time = time.perf_counter()
                data = cfg.data_config
                serve_requests(
                    coordinator,
                    to_run,
                    data.request_rate,
                    data.seed,
                    on_record=keep,
                    stop=signals,
                    grace_s=cfg.interrupt_grace_s,
                )
                served.wall_s = time.perf_counter() - start_time
            try:
                stats = ray.get(coordinator.stats.remote(), timeout=30)
                served.phases, served.eager = stats["phases"], eager_decode_buckets(stats["workers"])
            except Exception:
                served.phases = {}
        finally:
            stop(coordinator)
    return served


def run_summary(cfg: RunConfig, completed: list[dict], resumed: list[dict], aborted: int, served: Served) -> dict:
    """The run's summary: latencies and throughput of the completed records (earlier runs' busy time counted
    for those resumed), phase totals and the config that shaped them."""
    data = cfg.data_config
    return summarize(
        completed,
        served.wall_s + busy_seconds(resumed),
        phases=served.phases,
        extra={
            "config": {
                "model_path": cfg.model_path,
                "device": cfg.device,
                "dtype": cfg.dtype,
                "world_size": cfg.world_size,
                "tp_size": cfg.tp_size,
                "dp_size": cfg.dp_size,
                "exe_mode": cfg.exe_mode,
                "vision_mode": cfg.parallel_config.vision_mode,
                "batch_size": data.batch_size,
                "policy": cfg.scheduler.policy,
                "request_rate": data.request_rate,
            },
            "resumed_records": len(resumed),
            "aborted_requests": aborted,
            "eager_decode_buckets": served.eager,
        },
    )


def print_report(output: Path, completed: list[dict], resumed: list[dict], summary: dict, eager: list[dict]) -> None:
    """Write the summary, plot and timeline beside `output` and print the summary and where they are."""
    paths = write_report(completed, summary, output)
    print(format_summary(summary))
    if eager:
        print(f"decode graph capture failed, these run eager: {format_eager(eager)}", file=sys.stderr)
    if resumed:
        print(
            f"the summary covers {len(resumed)} record(s) from an earlier run and "
            f"{len(completed) - len(resumed)} from this one"
        )
    print(f"results: {output}\nsummary: {paths['summary']}\nplot:    {paths['plot']}")
    if paths.get("timeline"):
        print(f"timeline: {paths['timeline']}")


def report_interrupt(signum: int, written: int, unfinished: int, resume_hint: str | None) -> int:
    """Say how far an interrupted run got and how to finish it; the exit status 128 + the signal number."""
    print(
        f"interrupted by {signal.Signals(signum).name}: {written} record(s) written, {unfinished} request(s) "
        f"aborted or not started; to finish the run: {resume_hint or 'run again with resume=true'}",
        file=sys.stderr,
    )
    return 128 + signum


def exit_status(completed: list[dict]) -> int:
    """1 when a request failed (the first ten errors printed), else 0."""
    failed = [r for r in completed if r.get("error")]
    for r in failed[:10]:
        print(f"request {r['id']} failed: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.launch", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML run config, e.g. conf/tiny_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data_config.batch_size=8")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hint = resume_command(args.config, args.overrides)
    try:
        return run(load_config(args.config, args.overrides), resume_hint=hint)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(
            f"interrupted by {signal.Signals(signum).name}: workers and placement groups released; "
            f"to finish the run: {hint}",
            file=sys.stderr,
        )
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
