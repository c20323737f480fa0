"""Config, devices, placement and the entry points that turn a config into placed, connected actors.

`from cluster import load_config, start, stop` is the API for interactive drivers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_config", "start", "stop"]


def __getattr__(name: str) -> Any:
    # Imported on first use so that `import cluster.config` stays light and free of import cycles.
    if name == "load_config":
        from cluster.config import load_config

        return load_config
    if name in ("start", "stop"):
        from cluster import launch

        return getattr(launch, name)
    raise AttributeError(f"module 'cluster' has no attribute {name!r}")
