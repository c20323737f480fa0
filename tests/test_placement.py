"""Rank layout, capacity checks and placement groups (cluster/placement.py, cluster/devices.py)."""

import os
from collections.abc import Iterator

import pytest
import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

from actors.shard_worker import worker_actor_name
from cluster.devices import actor_resource_options, get_device_spec, worker_resources
from cluster.placement import (
    COORDINATOR_NAME,
    Placement,
    PlacementError,
    check_capacity,
    order_groups_by_node,
    rank_layout,
    reserve,
)

CPU = get_device_spec("cpu")


def _node(node_id: str, **resources: float) -> dict:
    return {"NodeID": node_id, "Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": resources}


# ---- pure functions -------------------------------------------------------------------------------


def test_rank_layout_72b() -> None:
    layout = rank_layout(16, 8)
    assert [r.rank for r in layout] == list(range(16))
    assert [r.tp_rank for r in layout] == list(range(8)) * 2
    assert [r.dp_rank for r in layout] == [0] * 8 + [1] * 8
    assert all((r.tp_size, r.dp_size, r.world_size) == (8, 2, 16) for r in layout)


def test_rank_layout_small() -> None:
    assert [(r.tp_rank, r.dp_rank) for r in rank_layout(4, 2)] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    (only,) = rank_layout(1, 1)
    assert (only.rank, only.tp_rank, only.dp_rank, only.tp_size, only.dp_size, only.world_size) == (
        0,
        0,
        0,
        1,
        1,
        1,
    )
    with pytest.raises(ValueError):
        rank_layout(6, 4)


def test_check_capacity_fits_across_nodes() -> None:
    nodes = [_node("a" * 40, CPU=8.0, NPU=8.0), _node("b" * 40, CPU=8.0, NPU=8.0)]
    assert check_capacity(nodes, 8, {"NPU": 1.0, "CPU": 1.0}, 2) is None
    # Groups share a node when it is big enough.
    assert check_capacity([_node("a", CPU=4.0)], 2, {"CPU": 1.0}, 2) is None


def test_check_capacity_one_node_too_small() -> None:
    nodes = [_node("a" * 40, CPU=8.0, NPU=8.0), _node("b" * 40, CPU=8.0, NPU=6.0)]
    message = check_capacity(nodes, 8, {"NPU": 1.0, "CPU": 1.0}, 2)
    assert message is not None
    assert "2 group(s) x 8 bundle(s) x {NPU: 1, CPU: 1}" in message
    assert "{NPU: 6, CPU: 8} -> 0 group(s)" in message
    assert "{NPU: 8, CPU: 8} -> 1 group(s)" in message
    # 3 CPUs per group never fit on nodes of 2, even though the cluster has 4 in all.
    assert check_capacity([_node("a", CPU=2.0), _node("b", CPU=2.0)], 3, {"CPU": 1.0}, 1) is not None


def test_check_capacity_resource_absent_and_dead_nodes() -> None:
    message = check_capacity([_node("a", CPU=4.0)], 1, {"GPU": 1.0, "CPU": 1.0}, 1)
    assert message is not None and "GPU absent on every node" in message
    dead = {**_node("b", CPU=64.0), "Alive": False}
    assert check_capacity([_node("a", CPU=1.0), dead], 2, {"CPU": 1.0}, 1) is not None


def test_order_groups_by_node() -> None:
    assert order_groups_by_node(["n2", "n1", "n2", "n1", "n3"]) == [0, 2, 1, 3, 4]
    assert order_groups_by_node(["a", "a", "b"]) == [0, 1, 2]
    assert order_groups_by_node([]) == []


def test_names_and_resources() -> None:
    assert worker_actor_name(3) == "shard-worker-3"
    assert COORDINATOR_NAME == "coordinator"
    assert worker_resources(CPU, 2) == {"CPU": 2.0}
    assert worker_resources(get_device_spec("cuda"), 1) == {"GPU": 1.0, "CPU": 1.0}
    assert worker_resources(get_device_spec("npu"), 4) == {"NPU": 1.0, "CPU": 4.0}
    npu = get_device_spec("npu")
    assert (npu.dist_backend, npu.visible_devices_env, npu.graph_mode) == (
        "hccl",
        "ASCEND_RT_VISIBLE_DEVICES",
        "acl_graph",
    )
    assert "HCCL_SOCKET_IFNAME" in npu.interface_envs
    with pytest.raises(ValueError, match="tpu"):
        get_device_spec("tpu")


# ---- with Ray -------------------------------------------------------------------------------------


@ray.remote
class _NodeProbe:
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def _place_probes(placement: Placement, world_size: int) -> list[str]:
    options = actor_resource_options(CPU, placement.bundle_resources["CPU"])
    probes = [
        _NodeProbe.options(scheduling_strategy=placement.strategy(r), **options).remote() for r in range(world_size)
    ]
    node_ids = ray.get([p.node_id.remote() for p in probes], timeout=60)
    for probe in probes:
        ray.kill(probe)
    return node_ids


def _group_states(prefix: str) -> list[str]:
    """States of the placement groups (removed ones included) whose name starts with `prefix`."""
    return sorted(pg["state"] for pg in placement_group_table().values() if str(pg.get("name")).startswith(prefix))


def _bundle_nodes(placement: Placement) -> list[list[str]]:
    tables = [placement_group_table(pg)["bundles_to_node_id"] for pg in placement.groups]
    return [[table[i] for i in range(placement.tp_size)] for table in tables]


@pytest.fixture
def no_ray_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="class")
def local_ray() -> Iterator[None]:
    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous


@pytest.mark.usefixtures("local_ray")
class TestLocalRay:
    def test_reserve_and_place_one_actor_per_rank(self) -> None:
        placement = reserve(CPU, world_size=4, tp_size=2, num_cpus_per_worker=1, timeout_s=30, name_prefix="t-ok")
        try:
            assert len(placement.groups) == 2 and placement.world_size == 4
            node_ids = _place_probes(placement, 4)
            bundles = _bundle_nodes(placement)
            for rank, node_id in enumerate(node_ids):
                assert node_id == bundles[rank // 2][rank % 2]
            with pytest.raises(IndexError):
                placement.strategy(4)
        finally:
            placement.remove()
            placement.remove()
        assert all(placement_group_table(pg)["state"] == "REMOVED" for pg in placement.groups)

    def test_unsatisfiable_fails_fast(self) -> None:
        """The capacity check refuses before any placement group exists, so nothing waits for the timeout."""
        for spec, cpus, prefix, missing in ((get_device_spec("cuda"), 1, "t-gpu", "GPU"), (CPU, 3, "t-big", "CPU")):
            with pytest.raises(PlacementError, match=missing) as info:
                reserve(spec, 2, 2, cpus, timeout_s=60, name_prefix=prefix)
            assert "not ready after" not in str(info.value)
            assert not _group_states(prefix), _group_states(prefix)

    def test_busy_cluster_times_out(self) -> None:
        holder = placement_group([{"CPU": 1.0}] * 3, strategy="PACK")
        ray.get(holder.ready(), timeout=30)
        try:
            with pytest.raises(PlacementError, match="not ready after") as info:
                reserve(CPU, 4, 2, 1, timeout_s=2, name_prefix="t-busy")
            # It gave up at its own timeout, with nothing placed, and took back what it had asked for.
            assert "(timeout 2s)" in str(info.value) and "0 of 2 group(s) ready" in str(info.value)
            assert "2 group(s) x 2 bundle(s) x {CPU: 1}" in str(info.value)
            assert "available {CPU: 1}" in str(info.value)
            assert _group_states("t-busy") == ["REMOVED", "REMOVED"]
        finally:
            remove_placement_group(holder)
        # The timed-out groups were removed, so the whole cluster is free again.
        placement = reserve(CPU, 4, 2, 1, timeout_s=30, name_prefix="t-after")
        placement.remove()


def test_two_node_cluster_keeps_tp_groups_on_one_node(no_ray_auth: None) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        placement = reserve(CPU, world_size=4, tp_size=2, num_cpus_per_worker=1, timeout_s=30, name_prefix="t-2n")
        try:
            node_ids = _place_probes(placement, 4)
            assert node_ids[0] == node_ids[1] and node_ids[2] == node_ids[3]
            assert node_ids[0] != node_ids[2]
            assert _bundle_nodes(placement) == [node_ids[:2], node_ids[2:]]
            assert order_groups_by_node([node_ids[0], node_ids[2]]) == [0, 1]
        finally:
            placement.remove()
    finally:
        ray.shutdown()
        cluster.shutdown()
