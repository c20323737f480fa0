"""Rank layout and Ray placement groups: one STRICT_PACK placement group per tensor-parallel group.

The layout is rank = dp_rank * tp_size + tp_rank, so each TP group is a run of contiguous ranks, and
each TP group is one placement group, so it stays inside one node. Ray does not order groups by
node; after the workers start, :func:`order_groups_by_node` gives an order that keeps the groups on
one node adjacent, so that ranks are contiguous per node.
"""

import math
import time
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.devices import DeviceSpec, worker_resources

COORDINATOR_NAME = "coordinator"

_EPS = 1e-9


class PlacementError(RuntimeError):
    """The cluster cannot (or did not in time) provide the requested placement groups."""


@dataclass(frozen=True)
class RankInfo:
    """Where one rank sits in the TP x DP grid."""

    rank: int
    tp_rank: int
    dp_rank: int
    tp_size: int
    dp_size: int
    world_size: int


def rank_layout(world_size: int, tp_size: int) -> list[RankInfo]:
    """All ranks in order; rank = dp_rank * tp_size + tp_rank (TP groups are contiguous ranks)."""
    if world_size < 1 or tp_size < 1 or world_size % tp_size:
        raise ValueError(f"tp_size={tp_size} must be >= 1 and divide world_size={world_size}")
    dp_size = world_size // tp_size
    return [
        RankInfo(
            rank=rank,
            tp_rank=rank % tp_size,
            dp_rank=rank // tp_size,
            tp_size=tp_size,
            dp_size=dp_size,
            world_size=world_size,
        )
        for rank in range(world_size)
    ]


def _group_demand(bundles_per_group: int, per_bundle_resources: dict[str, float]) -> dict[str, float]:
    return {k: v * bundles_per_group for k, v in per_bundle_resources.items() if v > 0}


def _groups_that_fit(resources: dict[str, float], demand: dict[str, float]) -> int:
    if not demand:
        return 0
    return min(math.floor(resources.get(k, 0.0) / v + _EPS) for k, v in demand.items())


def _format_resources(resources: dict[str, float], keys: list[str]) -> str:
    return "{" + ", ".join(f"{k}: {resources.get(k, 0.0):g}" for k in keys) + "}"


def _ask(num_groups: int, bundles_per_group: int, per_bundle_resources: dict[str, float]) -> str:
    bundle = "{" + ", ".join(f"{k}: {v:g}" for k, v in per_bundle_resources.items()) + "}"
    return f"{num_groups} group(s) x {bundles_per_group} bundle(s) x {bundle}, each group on one node"


def check_capacity(
    nodes: list[dict],
    bundles_per_group: int,
    per_bundle_resources: dict[str, float],
    num_groups: int,
) -> str | None:
    """Whether ``num_groups`` groups, each packed inside one node, fit on ``nodes``.

    ``nodes`` are entries as ``ray.nodes()`` reports them ("NodeID", "Alive", "Resources", and
    optionally "NodeManagerAddress"); "Resources" may be totals or what is available now. Several
    groups may share a node. Returns None when they fit, else a message with what was asked and
    what each node has.
    """
    demand = _group_demand(bundles_per_group, per_bundle_resources)
    alive = [n for n in nodes if n.get("Alive", True)]
    if num_groups <= 0 or not demand:
        return None
    fits = sum(_groups_that_fit(n.get("Resources", {}), demand) for n in alive)
    if fits >= num_groups:
        return None

    keys = list(demand)
    lines = [f"cannot place {_ask(num_groups, bundles_per_group, per_bundle_resources)}."]
    absent = [k for k in keys if not any(n.get("Resources", {}).get(k, 0.0) > 0 for n in alive)]
    if absent:
        lines.append(f"Resource(s) {', '.join(absent)} absent on every node.")
    lines.append(f"One group needs {_format_resources(demand, keys)}; nodes hold {fits} group(s) in all:")
    for n in alive:
        where = n.get("NodeManagerAddress", "?")
        resources = n.get("Resources", {})
        lines.append(
            f"  node {str(n.get('NodeID', '?'))[:12]} ({where}): {_format_resources(resources, keys)}"
            f" -> {_groups_that_fit(resources, demand)} group(s)"
        )
    if not alive:
        lines.append("  (no alive nodes)")
    return "\n".join(lines)


def order_groups_by_node(group_node_ids: list[str]) -> list[int]:
    """A stable order of group indices in which groups on the same node are adjacent.

    Nodes come in the order of their first group; within a node, groups keep their order.
    """
    first_seen: dict[str, int] = {}
    for node in group_node_ids:
        first_seen.setdefault(node, len(first_seen))
    return sorted(range(len(group_node_ids)), key=lambda g: (first_seen[group_node_ids[g]], g))


@dataclass
class Placement:
    """Reserved placement groups, one per TP group; bundle ``tp_rank`` of group ``g`` holds a worker."""

    groups: list[PlacementGroup]
    tp_size: int
    bundle_resources: dict[str, float]
    _removed: bool = field(default=False, repr=False)

    @property
    def world_size(self) -> int:
        """Number of bundles (= workers) over all groups."""
        return len(self.groups) * self.tp_size

    def strategy(self, rank: int) -> PlacementGroupSchedulingStrategy:
        """The scheduling strategy for the worker of ``rank`` (group rank // tp, bundle rank % tp)."""
        if not 0 <= rank < self.world_size:
            raise IndexError(f"rank {rank} out of range for world_size {self.world_size}")
        return PlacementGroupSchedulingStrategy(
            placement_group=self.groups[rank // self.tp_size],
            placement_group_bundle_index=rank % self.tp_size,
        )

    def remove(self) -> None:
        """Remove every placement group; safe to call more than once."""
        if self._removed:
            return
        self._removed = True
        for pg in self.groups:
            try:
                remove_placement_group(pg)
            except Exception:  # already gone, or Ray shut down
                pass


def _cluster_report(keys: list[str]) -> str:
    available: dict[str, dict[str, float]] = {}
    try:
        from ray._private.state import available_resources_per_node

        available = available_resources_per_node()
    except Exception:  # developer API; the per-node totals below still help
        pass
    lines = [f"cluster totals: {_format_resources(ray.cluster_resources(), keys)}"]
    for n in ray.nodes():
        if not n.get("Alive", False):
            continue
        node_id = n["NodeID"]
        free = available.get(node_id)
        free_text = _format_resources(free, keys) if free is not None else "unknown"
        lines.append(
            f"  node {node_id[:12]} ({n.get('NodeManagerAddress', '?')}): "
            f"total {_format_resources(n.get('Resources', {}), keys)}, available {free_text}"
        )
    return "\n".join(lines)


def reserve(
    spec: DeviceSpec,
    world_size: int,
    tp_size: int,
    num_cpus_per_worker: float,
    timeout_s: float,
    name_prefix: str = "qwen2_5_vl",
) -> Placement:
    """Reserve one STRICT_PACK placement group per TP group (``world_size // tp_size`` of them).

    Each group has ``tp_size`` bundles of :func:`worker_resources`. Fails at once with
    :class:`PlacementError` when the cluster's totals can never hold the request, and after
    ``timeout_s`` when the groups are not ready (they are removed before raising).
    """
    layout = rank_layout(world_size, tp_size)
    num_groups = layout[-1].dp_size
    bundle = worker_resources(spec, num_cpus_per_worker)
    problem = check_capacity(ray.nodes(), tp_size, bundle, num_groups)
    if problem is not None:
        raise PlacementError(problem)

    groups = [
        placement_group(
            [dict(bundle) for _ in range(tp_size)], strategy="STRICT_PACK", name=f"{name_prefix}-tp-group-{g}"
        )
        for g in range(num_groups)
    ]
    placement = Placement(groups=groups, tp_size=tp_size, bundle_resources=bundle)
    start = time.monotonic()
    try:
        ready, _ = ray.wait([pg.ready() for pg in groups], num_returns=num_groups, timeout=timeout_s)
    except BaseException:
        placement.remove()
        raise
    if len(ready) < num_groups:
        placement.remove()
        waited = time.monotonic() - start
        raise PlacementError(
            f"placement groups not ready after {waited:.1f}s (timeout {timeout_s:g}s): asked for "
            f"{_ask(num_groups, tp_size, bundle)}; {len(ready)} of {num_groups} group(s) ready. The cluster "
            "could hold them, but other work (actors, tasks, placement groups) holds the resources now.\n"
            f"{_cluster_report(list(bundle))}"
        )
    return placement
