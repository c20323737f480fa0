"""Helpers for tests that start Ray: a private local cluster, the tiny run config, bounded waits.

Every cluster these tests start is private (address="local", or an explicit address), so that they
never join a cluster another process on this machine has started, and token authentication is off:
Ray 2.60 turns on token authentication for a local cluster (a token file under the home directory),
and RAY_AUTH_MODE=disabled turns it off for these private loopback clusters.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import ray

from cluster.config import RunConfig, load_config
from model.parallel import free_port as free_port  # one definition, re-exported for the tests

os.environ["RAY_AUTH_MODE"] = "disabled"

REPO = Path(__file__).resolve().parent.parent
TINY_CONF = REPO / "conf" / "tiny_cpu.yaml"
CONTRACT_FIELDS = ("id", "output_token_ids", "output_text", "prompt_tokens", "ttft_s", "tpot_s", "e2e_s", "error")

T = TypeVar("T")


def init_local_ray(num_cpus: int, **kwargs: Any) -> None:
    """Start a private local Ray cluster for this test module (never joins an existing one)."""
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        **kwargs,
    )


def tiny_config(model_path: str | Path, *overrides: str) -> RunConfig:
    """conf/tiny_cpu.yaml on `model_path` with short timeouts, a private namespace and `overrides`."""
    base = [
        f"model_path={model_path}",
        "ray.placement_timeout_s=60",
        "ray.rendezvous_timeout_s=60",
        "ray.worker_timeout_s=120",
        "ray.log_to_driver=false",
    ]
    return load_config(TINY_CONF, base + list(overrides))


def wait_for(predicate: Callable[[], T], timeout_s: float, interval_s: float = 0.2) -> T:
    """Poll `predicate` until it returns something truthy; that value, or the last one at the timeout."""
    deadline = time.monotonic() + timeout_s
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval_s)
        value = predicate()
    return value


def named_actors(namespace: str | None = None) -> list[str]:
    """Names of the live named actors (in `namespace`, or in every namespace)."""
    actors = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in actors if namespace is None or a["namespace"] == namespace)


def live_placement_groups(prefix: str = "") -> list[str]:
    """Names of the placement groups (whose name starts with `prefix`) that are not removed."""
    table = ray.util.placement_group_table()
    names = (str(pg.get("name")) for pg in table.values() if pg.get("state") != "REMOVED")
    return sorted(n for n in names if n.startswith(prefix))


def released(namespace: str, timeout_s: float = 30.0) -> tuple[list[str], list[str]]:
    """Wait until `namespace` has no named actors and no live placement groups; what remains of each."""
    wait_for(lambda: not named_actors(namespace) and not live_placement_groups(namespace), timeout_s)
    return named_actors(namespace), live_placement_groups(namespace)


def tiny_model() -> Path:
    """The default tiny checkpoint, built once into the system temp dir and reused while its spec matches."""
    import tempfile

    from cluster.tools.tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(Path(tempfile.gettempdir()) / "qwen2_5_vl_ray-tests" / "tiny-qwen2.5-vl")
