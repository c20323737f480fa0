"""What differs between backends (cpu, cuda, npu), kept in one table, and checks made before actors start.

The runtime side (importing torch_npu, the device index a worker binds) lives in `model.device`,
which workers use without this package; the facts shared by both come from there.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from model import device as runtime


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
    fused_ops: whether the backend's fused kernels run by default (model/npu_ops.py): in decode, and
        as the vision tower's varlen attention (npu_fusion_attention over TND windows and frames); the
        config key `fused_ops` overrides.
    graph_env_conflicts: variable -> value that makes graph capture fail on this backend.
    """

    name: str
    ray_resource: str
    visible_devices_env: str | None
    dist_backend: str
    graph_mode: str
    interface_envs: tuple[str, ...]
    fused_ops: bool = False
    graph_env_conflicts: tuple[tuple[str, str, str], ...] = ()  # (variable, bad value, why)


_SPECS: dict[str, DeviceSpec] = {
    "cpu": DeviceSpec(
        name="cpu",
        ray_resource="CPU",
        visible_devices_env=None,
        dist_backend=runtime.dist_backend("cpu"),
        graph_mode="torch.compile",
        interface_envs=("GLOO_SOCKET_IFNAME",),
    ),
    "cuda": DeviceSpec(
        name="cuda",
        ray_resource="GPU",
        visible_devices_env=runtime.VISIBLE_DEVICES_ENV["cuda"],
        dist_backend=runtime.dist_backend("cuda"),
        graph_mode="cuda_graph",
        interface_envs=("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_IB_DISABLE"),
    ),
    "npu": DeviceSpec(
        name="npu",
        ray_resource="NPU",
        visible_devices_env=runtime.VISIBLE_DEVICES_ENV["npu"],
        dist_backend=runtime.dist_backend("npu"),
        graph_mode="acl_graph",
        interface_envs=(
            "HCCL_SOCKET_IFNAME",
            "HCCL_IF_IP",
            "HCCL_CONNECT_TIMEOUT",
            "HCCL_EXEC_TIMEOUT",
            "GLOO_SOCKET_IFNAME",
        ),
        fused_ops=True,
        graph_env_conflicts=(
            ("TASK_QUEUE_ENABLE", "2", "NPU graph capture raises with the level-2 task queue; use 0 or 1"),
            ("ASCEND_LAUNCH_BLOCKING", "1", "synchronous launches conflict with ACL graph capture"),
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
    runtime.import_backend(spec.name)


def torch_device(spec: DeviceSpec, local_index: int) -> torch.device:
    """The torch device for accelerator ``local_index`` among those visible to this process."""
    return runtime.torch_device(spec.name, local_index)


def resolve_fused_ops(spec: DeviceSpec, configured: bool | None) -> bool:
    """Whether decode uses fused kernels: the config's `fused_ops` when set, else the device default."""
    if configured is None:
        return spec.fused_ops
    if configured and spec.name != "npu":
        raise ValueError(f"fused_ops: the fused decode kernels exist only on npu, not on {spec.name}")
    return configured


def check_graph_env(
    device: str, exe_mode: str, environ: Mapping[str, str], dist_env: Mapping[str, str] | None = None
) -> None:
    """Fail before any actor starts when a variable would break graph capture on `device`.

    Checks the driver's environment (`environ`, which a local Ray cluster's workers inherit) and the
    config's `dist_env` (set on every worker, so it wins); ValueError names the variable and where
    it was found.
    """
    spec = get_device_spec(device)
    if exe_mode != "graph":
        return
    for name, bad, why in spec.graph_env_conflicts:
        for where, env in (("dist_env", dist_env or {}), ("the environment", environ)):
            if name in env:
                if str(env[name]).strip() == bad:
                    raise ValueError(f"{name}={bad} in {where} breaks exe_mode=graph on {device}: {why}")
                break  # dist_env overrides the environment for the workers


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
