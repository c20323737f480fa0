"""Entry points: `python -m cluster.launch CONF [key=value ...]` and the `start()` Python API.

The driver checks the config and the checkpoint before anything starts, connects to Ray (an
existing cluster or a new local one), reserves one placement group per TP group, starts the
Coordinator (which starts the ShardWorkers), runs the dataset, and writes one JSONL record per
request plus a summary and a latency plot beside it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayTaskError
from tqdm import tqdm

from actors.coordinator import Coordinator, failed_record
from cluster.config import ConfigError, RunConfig, load_config
from cluster.datasets import DatasetError, load_requests
from cluster.devices import get_device_spec
from cluster.placement import COORDINATOR_NAME, PlacementError, reserve
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
    return model_config


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
        coordinator = ray.remote(Coordinator).options(
            name=COORDINATOR_NAME, namespace=cfg.ray.namespace, num_cpus=0, max_concurrency=8,
            max_restarts=0).remote(cfg, placement)
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


def run(cfg: RunConfig) -> int:
    """The whole job: returns the process exit status (0 when every request succeeded)."""
    requests = load_requests(cfg.data_config.dataset, cfg.data_config.dataset_dir, cfg.data_config.batch_size,
                             cfg.dp_size, cfg.data_config.num_samples, base_dir=Path.cwd())
    coordinator = start(cfg)
    try:
        start_time = time.perf_counter()
        ref = coordinator.generate.remote(requests)
        stop_progress = threading.Event()
        watcher = threading.Thread(target=_progress, args=(coordinator, len(requests), stop_progress), daemon=True)
        watcher.start()
        try:
            records = ray.get(ref)
        except Exception as e:  # the coordinator died: every request still gets a record
            records = [failed_record(r, f"run failed: {unwrap(e)}") for r in requests]
        finally:
            stop_progress.set()
            watcher.join(timeout=5)
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
        "vision_mode": cfg.parallel_config.vision_mode, "batch_size": cfg.data_config.batch_size}})
    paths = write_report(records, summary, output)
    print(format_summary(summary))
    print(f"results: {output}\nsummary: {paths['summary']}\nplot:    {paths['plot']}")
    failed = [r for r in records if r.get("error")]
    for r in failed[:10]:
        print(f"request {r['id']} failed: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def _progress(coordinator: Any, total: int, done_event: threading.Event) -> None:
    """Poll the Coordinator's progress until `done_event`; the bar ends full, since generate returned them all."""
    with tqdm(total=total, desc="requests", unit="req", file=sys.stderr) as bar:
        while not done_event.wait(0.5):
            try:
                done, _ = ray.get(coordinator.progress.remote(), timeout=5)
            except Exception:
                break
            bar.update(done - bar.n)
        done_event.wait()
        bar.update(total - bar.n)


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
