"""What differs between backends (cpu, cuda, npu), kept in one table.

``torch_npu`` is imported only by :func:`import_backend` for the npu backend: on a machine without
CANN its mere presence breaks ``import torch``, so nothing else may import it.
"""

import importlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceSpec:
    """Facts about one backend.

    name: "cpu", "cuda" or "npu".
    ray_resource: the Ray resource a worker holds ("CPU", "GPU", "NPU").
    visible_devices_env: the variable Ray sets to the accelerator ids an actor holds (None on cpu).
    dist_backend: the torch.distributed backend ("gloo", "nccl", "hccl").
    graph_mode: how exe_mode=graph runs decode ("torch.compile", "cuda_graph", "acl_graph").
    interface_envs: the network-interface and timeout variables that matter to this backend's
        collectives; users pin them through the config's dist_env.
    """

    name: str
    ray_resource: str
    visible_devices_env: str | None
    dist_backend: str
    graph_mode: str
    interface_envs: tuple[str, ...]


_SPECS: dict[str, DeviceSpec] = {
    "cpu": DeviceSpec(
        name="cpu",
        ray_resource="CPU",
        visible_devices_env=None,
        dist_backend="gloo",
        graph_mode="torch.compile",
        interface_envs=("GLOO_SOCKET_IFNAME",),
    ),
    "cuda": DeviceSpec(
        name="cuda",
        ray_resource="GPU",
        visible_devices_env="CUDA_VISIBLE_DEVICES",
        dist_backend="nccl",
        graph_mode="cuda_graph",
        interface_envs=("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_IB_DISABLE"),
    ),
    "npu": DeviceSpec(
        name="npu",
        ray_resource="NPU",
        visible_devices_env="ASCEND_RT_VISIBLE_DEVICES",
        dist_backend="hccl",
        graph_mode="acl_graph",
        interface_envs=(
            "HCCL_SOCKET_IFNAME",
            "HCCL_IF_IP",
            "HCCL_CONNECT_TIMEOUT",
            "HCCL_EXEC_TIMEOUT",
            "GLOO_SOCKET_IFNAME",
        ),
    ),
}


def get_device_spec(name: str) -> DeviceSpec:
    """The spec for backend ``name`` (cpu, cuda or npu); ValueError for anything else."""
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown device {name!r}; expected one of {', '.join(_SPECS)}") from None


def import_backend(spec: DeviceSpec) -> None:
    """Make the backend usable by torch: imports torch_npu for npu, does nothing otherwise."""
    if spec.name != "npu":
        return
    try:
        importlib.import_module("torch_npu")
    except ImportError as e:
        raise RuntimeError(
            f"device 'npu' needs the torch_npu package (install the 'npu' extra on a machine with CANN): {e}"
        ) from e


def torch_device(spec: DeviceSpec, local_index: int) -> torch.device:
    """The torch device for accelerator ``local_index`` among those visible to this process."""
    if spec.name == "cpu":
        return torch.device("cpu")
    import_backend(spec)
    return torch.device(spec.name, local_index)


def worker_resources(spec: DeviceSpec, num_cpus_per_worker: float) -> dict[str, float]:
    """Everything one worker asks Ray for, i.e. one placement-group bundle."""
    if spec.name == "cpu":
        return {"CPU": float(num_cpus_per_worker)}
    resources = {spec.ray_resource: 1.0}
    if num_cpus_per_worker > 0:
        resources["CPU"] = float(num_cpus_per_worker)
    return resources


def actor_resource_options(spec: DeviceSpec, num_cpus_per_worker: float) -> dict[str, object]:
    """``actor.options(...)`` keywords asking for exactly :func:`worker_resources` (fits one bundle)."""
    options: dict[str, object] = {"num_cpus": float(num_cpus_per_worker)}
    if spec.name == "cuda":
        options["num_gpus"] = 1
    elif spec.name == "npu":
        options["resources"] = {"NPU": 1.0}
    return options
