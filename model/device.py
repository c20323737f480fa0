"""Device runtime helpers for a worker process, free of Ray: backend import, device index, binding.

A scheduler (Ray) hands a worker the ids of the accelerators it holds and may or may not narrow the
visible-devices variable to them. With ``RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES=1`` (or its
CUDA twin) every device of the node stays visible, so index 0 is wrong for all workers but one:
:func:`device_index` derives the index from the ids and the variable, whichever way it was set.

``torch_npu`` is imported only by :func:`import_torch_npu`: on a machine without CANN its mere
presence breaks ``import torch``, so nothing else may import it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import torch

# Per accelerator backend: the variable that lists the visible devices, and the key under which a
# scheduler reports the accelerator ids a process holds (Ray's resource names).
VISIBLE_DEVICES_ENV = {"cuda": "CUDA_VISIBLE_DEVICES", "npu": "ASCEND_RT_VISIBLE_DEVICES"}
ACCELERATOR_KEY = {"cuda": "GPU", "npu": "NPU"}
DIST_BACKEND = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
# Tokens per KV block by default. npu: 128, what npu_fused_infer_attention_score's paged mode is used with
# (vllm-ascend's default; the kernel wants the block size a multiple of 16 for bf16/fp16 and at most 512);
# cuda and cpu: 16 (vLLM's default), a fine grain for prefix-cache hits.
KV_BLOCK_SIZE = {"cpu": 16, "cuda": 16, "npu": 128}
# Config dtype names -> torch dtypes.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def import_torch_npu() -> ModuleType:
    """Import torch_npu (registers the npu device with torch); a clear error where it is missing."""
    try:
        return importlib.import_module("torch_npu")
    except ImportError as e:
        raise RuntimeError(
            f"device 'npu' needs the torch_npu package (install the 'npu' extra on a machine with CANN): {e}"
        ) from e


def import_backend(device: str) -> None:
    """Make backend `device` usable by torch: imports torch_npu for npu, nothing otherwise."""
    if device == "npu":
        import_torch_npu()


def dist_backend(device: str) -> str:
    """The torch.distributed backend of `device` (gloo, nccl, hccl)."""
    try:
        return DIST_BACKEND[device]
    except KeyError:
        raise ValueError(f"unknown device {device!r}; expected one of {', '.join(DIST_BACKEND)}") from None


def torch_device(device: str, index: int = 0) -> torch.device:
    """The torch device for accelerator `index` among those visible to this process (cpu: index ignored)."""
    if device == "cpu":
        return torch.device("cpu")
    import_backend(device)
    return torch.device(device, index)


def local_device_index(accelerator_ids: Sequence[str | int], visible_devices: str | None) -> int:
    """Index, among the devices this process sees, of the first accelerator it was given.

    accelerator_ids: the ids the scheduler gave this process (Ray: get_accelerator_ids()[resource]);
    they name devices as the node's visible-devices list named them when the scheduler started.
    visible_devices: this process's visible-devices variable (None or "" when unset).
    Narrowed to one device (the scheduler's default): 0. Set to a list (left as is under the NOSET
    variables): the position of the id in the list. Unset: every device is visible, the id is the index.
    """
    if not accelerator_ids:
        return 0
    mine = str(accelerator_ids[0]).strip()
    visible = [v.strip() for v in (visible_devices or "").split(",") if v.strip()]
    if len(visible) == 1:
        return 0
    if visible:
        if mine not in visible:
            raise ValueError(f"accelerator id {mine!r} is not among the visible devices {','.join(visible)!r}")
        return visible.index(mine)
    try:
        return int(mine)
    except ValueError:
        raise ValueError(
            f"accelerator id {mine!r} is not a device index and no visible-devices list is set to find it in"
        ) from None


def device_index(device: str, accelerator_ids: Mapping[str, Sequence[str | int]], environ: Mapping[str, str]) -> int:
    """The index this worker binds: `accelerator_ids` as Ray's get_accelerator_ids() returns them, the
    process environment as `environ`. 0 on cpu."""
    if device == "cpu":
        return 0
    ids = list(accelerator_ids.get(ACCELERATOR_KEY[device], []))
    return local_device_index(ids, environ.get(VISIBLE_DEVICES_ENV[device]))


def bind_device(
    device: str, accelerator_ids: Mapping[str, Sequence[str | int]], environ: Mapping[str, str], backend: Any = None
) -> torch.device:
    """Import the backend, set this process's current device and return it.

    `backend` is torch.cuda / torch.npu by default (tests pass a stand-in with `set_device`).
    """
    if device == "cpu":
        return torch.device("cpu")
    index = device_index(device, accelerator_ids, environ)
    import_backend(device)
    (getattr(torch, device) if backend is None else backend).set_device(index)
    return torch.device(device, index)
