"""Entry points: `python -m cluster.launch CONF [key=value ...]` and the `start()` Python API.

The driver checks the config and the checkpoint before anything starts, connects to Ray (an
existing cluster or a new local one), reserves one placement group per TP group, starts the
Coordinator (which starts the ShardWorkers), sends the dataset's requests (all at once, or as
Poisson arrivals at `data_config.request_rate`), and writes one JSONL record per request plus a
summary and a latency plot beside it.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayTaskError
from ray.util.placement_group import placement_group_table
from tqdm import tqdm

from actors.config import EngineConfig, SamplingDefaults, WorkerConfig
from actors.coordinator import Coordinator
from actors.records import failed_record
from cluster.config import ConfigError, RunConfig, load_config
from cluster.datasets import DatasetError, load_requests
from cluster.devices import actor_resource_options, check_graph_env, get_device_spec, resolve_fused_ops
from cluster.placement import COORDINATOR_NAME, PlacementError, order_groups_by_node, reserve
from cluster.report import format_summary, summarize, write_records, write_report
from model.config import ModelConfig, ModelConfigError
from model.loader import CheckpointError, checkpoint_files

logger = logging.getLogger("cluster.launch")

# Errors a user can fix; the launch prints their message alone, without a traceback.
USER_ERRORS = (ConfigError, ModelConfigError, CheckpointError, DatasetError, PlacementError, TimeoutError)


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


def engine_config(cfg: RunConfig) -> EngineConfig:
    """What the Coordinator and its workers need of the run config."""
    spec = get_device_spec(cfg.device)
    data, sched = cfg.data_config, cfg.scheduler
    worker = WorkerConfig(
        model_path=cfg.model_path, device=cfg.device, dtype=cfg.dtype, exe_mode=cfg.exe_mode,
        vision_mode=cfg.parallel_config.vision_mode, max_batch_size=data.batch_size,
        max_seq_len=data.input_max_len + data.max_new_tokens, vision_cache_bytes=cfg.vision_cache_mb << 20,
        fused_ops=resolve_fused_ops(spec, cfg.fused_ops), profile_dir=cfg.profile_dir if cfg.profile else None)
    return EngineConfig(
        worker=worker, tp_size=cfg.tp_size, dp_size=cfg.dp_size,
        worker_options=actor_resource_options(spec, cfg.ray.num_cpus_per_worker), namespace=cfg.ray.namespace,
        input_max_len=data.input_max_len, max_images_per_prompt=data.max_images_per_prompt,
        sampling=SamplingDefaults(max_new_tokens=data.max_new_tokens, temperature=data.temperature,
                                  top_p=data.top_p, seed=data.seed, ignore_eos=data.ignore_eos),
        policy=sched.policy, prefill_chunk_tokens=sched.prefill_chunk_tokens,
        decode_steps_per_call=sched.decode_steps_per_call, worker_timeout_s=cfg.ray.worker_timeout_s,
        rendezvous_timeout_s=cfg.ray.rendezvous_timeout_s, max_group_restarts=cfg.ray.max_group_restarts,
        dist_env=dict(cfg.dist_env), profile=cfg.profile)


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
    """Reserve devices, start the Coordinator and its workers; returns the Coordinator's handle.

    Uses the driver's Ray connection when it already has one. `ray.get(handle.generate.remote(requests))`
    then serves requests; `stop(handle)` releases everything.
    """
    preflight(cfg)
    connect(cfg)
    try:
        ray.get_actor(COORDINATOR_NAME, namespace=cfg.ray.namespace)
        raise RuntimeError(f"an actor named {COORDINATOR_NAME!r} already exists in Ray namespace "
                           f"{cfg.ray.namespace!r}: another run is active (stop it, or set ray.namespace)")
    except ValueError:
        pass
    spec = get_device_spec(cfg.device)
    placement = reserve(spec, cfg.world_size, cfg.tp_size, cfg.ray.num_cpus_per_worker,
                        cfg.ray.placement_timeout_s, name_prefix=cfg.ray.namespace)
    coordinator = None
    try:
        nodes = [str(placement_group_table(pg).get("bundles_to_node_id", {}).get(0, "")) for pg in placement.groups]
        coordinator = ray.remote(Coordinator).options(
            name=COORDINATOR_NAME, namespace=cfg.ray.namespace, num_cpus=0, max_concurrency=1000,
            max_restarts=0).remote(engine_config(cfg), placement, order_groups_by_node(nodes))
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


def unwrap(error: BaseException) -> BaseException:
    """The user-facing cause inside a Ray task error."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


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


def serve_requests(coordinator: Any, requests: list[dict], rate: float, seed: int,
                   on_record: Any = None) -> list[dict]:
    """Send requests at their arrival times; records in request order.

    `on_record(record)` sees each record as soon as its request completes.
    """
    offsets = arrival_offsets(len(requests), rate, seed)
    start = time.monotonic()
    pending: dict[Any, int] = {}
    records: list[dict | None] = [None] * len(requests)
    sent = 0
    with tqdm(total=len(requests), desc="requests", unit="req", file=sys.stderr) as bar:
        while sent < len(requests) or pending:
            now = time.monotonic() - start
            while sent < len(requests) and offsets[sent] <= now:
                pending[coordinator.generate.remote([requests[sent]])] = sent
                sent += 1
            wait_s = max(0.0, offsets[sent] - now) if sent < len(requests) else 1.0
            if not pending:
                time.sleep(wait_s)
                continue
            done, _ = ray.wait(list(pending), num_returns=1, timeout=min(wait_s, 1.0))
            for ref in done:
                i = pending.pop(ref)
                try:
                    records[i] = ray.get(ref)[0]
                except Exception as e:  # the coordinator died: the request still gets a record
                    records[i] = failed_record(requests[i], f"run failed: {unwrap(e)}")
                if on_record is not None:
                    on_record(records[i])
                bar.update(1)
    return [r for r in records if r is not None]


def run(cfg: RunConfig) -> int:
    """The whole job: returns the process exit status (0 when every request succeeded)."""
    data = cfg.data_config
    requests = load_requests(data.dataset, data.dataset_dir, data.batch_size, cfg.dp_size, data.num_samples,
                             base_dir=Path.cwd())
    coordinator = start(cfg)
    try:
        start_time = time.perf_counter()
        records = serve_requests(coordinator, requests, data.request_rate, data.seed)
        wall = time.perf_counter() - start_time
        try:
            phases = ray.get(coordinator.stats.remote(), timeout=30)["phases"]
        except Exception:
            phases = {}
    finally:
        stop(coordinator)
    output = Path(cfg.output_path)
    write_records(records, output)
    summary = summarize(records, wall, phases=phases, extra={"config": {
        "model_path": cfg.model_path, "device": cfg.device, "dtype": cfg.dtype, "world_size": cfg.world_size,
        "tp_size": cfg.tp_size, "dp_size": cfg.dp_size, "exe_mode": cfg.exe_mode,
        "vision_mode": cfg.parallel_config.vision_mode, "batch_size": data.batch_size,
        "policy": cfg.scheduler.policy, "request_rate": data.request_rate}})
    paths = write_report(records, summary, output)
    print(format_summary(summary))
    print(f"results: {output}\nsummary: {paths['summary']}\nplot:    {paths['plot']}")
    failed = [r for r in records if r.get("error")]
    for r in failed[:10]:
        print(f"request {r['id']} failed: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.launch", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML run config, e.g. conf/tiny_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data_config.batch_size=8")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return run(load_config(args.config, args.overrides))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: workers and placement groups released", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
