"""How each DP group's phase calls reach its workers (`ray.phase_calls`): the group class per setting."""

from __future__ import annotations

from typing import Any

from actors.compiled_group import CompiledWorkerGroup
from actors.config import PHASE_CALLS, EngineConfig
from actors.groups import WorkerGroup
from actors.socket_group import SocketWorkerGroup

GROUP_CLASSES: dict[str, type[WorkerGroup]] = {
    "socket": SocketWorkerGroup,  # a TCP connection per worker (actors/socket_group.py)
    "compiled": CompiledWorkerGroup,  # one Ray Compiled Graph per group (actors/compiled_group.py)
    "ordinary": WorkerGroup,  # an ordinary Ray actor call per worker (actors/groups.py)
}
assert tuple(GROUP_CLASSES) == PHASE_CALLS


def make_worker_group(dp_rank: int, cfg: EngineConfig, strategies: list[Any]) -> WorkerGroup:
    """The group of DP rank `dp_rank`, its calls as `cfg.phase_calls` says."""
    if cfg.phase_calls not in GROUP_CLASSES:
        raise ValueError(f"phase_calls={cfg.phase_calls!r}: must be one of {', '.join(PHASE_CALLS)}")
    return GROUP_CLASSES[cfg.phase_calls](dp_rank, cfg, strategies)
