"""Device index derivation, device binding (with a stand-in backend), the graph-env check, fused-ops default."""

from __future__ import annotations

import pytest
import torch

from cluster.devices import check_graph_env, get_device_spec, resolve_fused_ops
from model.device import bind_device, device_index, local_device_index


@pytest.mark.parametrize(
    ("ids", "visible", "index"),
    [
        (["3"], "3", 0),  # narrowed to this process's device (Ray's default)
        (["3"], "0,1,2,3", 3),  # NOSET: every device visible, in order
        (["6"], "4,5,6,7", 2),  # NOSET with a user-narrowed list: position in it, not the id
        (["2"], None, 2),  # nothing set: all devices visible, the id is the index
        (["2"], "", 2),
        ([], None, 0),  # no accelerator (cpu worker)
        ([5, 6], "4, 5, 6", 1),  # several ids: the first; ints and spaces tolerated
    ],
)
def test_local_device_index(ids: list, visible: str | None, index: int) -> None:
    assert local_device_index(ids, visible) == index


def test_local_device_index_errors() -> None:
    with pytest.raises(ValueError, match="'3' is not among the visible devices '0,1'"):
        local_device_index(["3"], "0,1")
    with pytest.raises(ValueError, match="not a device index"):
        local_device_index(["GPU-8f2a"], None)


def test_device_index_reads_the_backend_variable() -> None:
    ids = {"GPU": ["1"], "NPU": ["2"], "CPU": []}
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3"}
    assert device_index("cuda", ids, env) == 1
    assert device_index("npu", ids, env) == 2
    assert device_index("cpu", ids, env) == 0


class FakeBackend:
    def __init__(self) -> None:
        self.index: int | None = None

    def set_device(self, index: int) -> None:
        self.index = index


def test_bind_device_sets_the_derived_index() -> None:
    backend = FakeBackend()
    device = bind_device("cuda", {"GPU": ["3"]}, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, backend=backend)
    assert device == torch.device("cuda", 3) and backend.index == 3
    assert bind_device("cpu", {}, {}) == torch.device("cpu")


def test_check_graph_env() -> None:
    check_graph_env("npu", "graph", {"TASK_QUEUE_ENABLE": "1"}, {"HCCL_OP_EXPANSION_MODE": "AIV"})
    check_graph_env("npu", "eager", {"TASK_QUEUE_ENABLE": "2", "ASCEND_LAUNCH_BLOCKING": "1"})
    check_graph_env("cuda", "graph", {"TASK_QUEUE_ENABLE": "2"})
    with pytest.raises(ValueError, match="TASK_QUEUE_ENABLE=2 in the environment breaks exe_mode=graph on npu"):
        check_graph_env("npu", "graph", {"TASK_QUEUE_ENABLE": "2"})
    with pytest.raises(ValueError, match="ASCEND_LAUNCH_BLOCKING=1 in dist_env"):
        check_graph_env("npu", "graph", {}, {"ASCEND_LAUNCH_BLOCKING": "1"})
    # dist_env is what the workers get: it overrides the driver's environment, both ways.
    check_graph_env("npu", "graph", {"TASK_QUEUE_ENABLE": "2"}, {"TASK_QUEUE_ENABLE": "1"})
    with pytest.raises(ValueError, match="TASK_QUEUE_ENABLE=2 in dist_env"):
        check_graph_env("npu", "graph", {"TASK_QUEUE_ENABLE": "1"}, {"TASK_QUEUE_ENABLE": "2"})


def test_resolve_fused_ops() -> None:
    npu, cuda, cpu = (get_device_spec(d) for d in ("npu", "cuda", "cpu"))
    assert resolve_fused_ops(npu, None) and not resolve_fused_ops(cuda, None) and not resolve_fused_ops(cpu, None)
    assert not resolve_fused_ops(npu, False)
    with pytest.raises(ValueError, match="fused_ops: the fused decode kernels exist only on npu, not on cuda"):
        resolve_fused_ops(cuda, True)


def test_72b_preset_environment() -> None:
    """The 72B preset carries the variables a first run on an A3 node needs, and none that breaks graph mode."""
    from pathlib import Path

    from cluster.config import load_config

    cfg = load_config(Path(__file__).resolve().parent.parent / "conf" / "qwen2_5_vl_72b.yaml")
    env = cfg.dist_env
    assert env["HCCL_HOST_SOCKET_PORT_RANGE"] == env["HCCL_NPU_SOCKET_PORT_RANGE"] == "auto"
    assert env["PYTORCH_NPU_ALLOC_CONF"] == "expandable_segments:True"
    assert 0 < int(env["HCCL_EXEC_TIMEOUT"]) < cfg.ray.worker_timeout_s
    assert "HCCL_IF_IP" not in env  # one node's own address; dist_env reaches every node
    check_graph_env(cfg.device, cfg.exe_mode, {}, env)
