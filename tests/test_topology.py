"""A simulated two-node cluster (ray.cluster_utils.Cluster): TP groups stay on one node, ranks are
contiguous per node, and each group's rendezvous address is its rank-0 worker's node IP."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster import start, stop
from tests.ray_helpers import released, tiny_config, tiny_model

NAMESPACE = "test-topology"


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _check_layout(topology: list[dict], tp: int) -> None:
    assert [t["rank"] for t in topology] == list(range(len(topology)))
    for t in topology:
        assert t["tp_rank"] == t["rank"] % tp and t["dp_rank"] == t["rank"] // tp
    groups: dict[int, list[dict]] = {}
    for t in topology:
        groups.setdefault(t["dp_rank"], []).append(t)
    for members in groups.values():
        assert len({m["node_id"] for m in members}) == 1, members  # a TP group inside one node
        leader = next(m for m in members if m["tp_rank"] == 0)
        for m in members:  # the whole group meets at its rank-0 worker's node IP
            assert m["rendezvous"].startswith(f"tcp://{leader['node_ip']}:"), m
    # Ranks contiguous per node: the node sequence by rank changes node at most once per node.
    nodes = [t["node_id"] for t in topology]
    runs = [n for i, n in enumerate(nodes) if i == 0 or nodes[i - 1] != n]
    assert len(runs) == len(set(runs)), nodes


def test_groups_on_one_node_and_ranks_contiguous(two_nodes):
    tp = 2
    # The default call path: the Coordinator connects to each worker's call socket at the IP of its node.
    placement = ("world_size=4", f"parallel_config.tp_size={tp}", f"ray.namespace={NAMESPACE}")
    cfg = tiny_config(tiny_model(), *placement)
    coordinator = start(cfg)
    try:
        topology = ray.get(coordinator.topology.remote(), timeout=60)
        _check_layout(topology, tp)
        assert len({t["node_id"] for t in topology}) == 2  # 2 CPUs a node: the workers fill both nodes
        assert {t["node_ip"] for t in topology} <= {n["NodeManagerAddress"] for n in ray.nodes()}
        records = ray.get(
            coordinator.generate.remote(
                [{"id": str(i), "prompt": f"Count to {i}.", "max_new_tokens": 3} for i in range(4)]
            ),
            timeout=120,
        )
        assert all(r["error"] is None for r in records)
    finally:
        stop(coordinator)
    assert released(NAMESPACE) == ([], [])
