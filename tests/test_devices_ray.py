"""The device index a Ray actor derives, with and without Ray narrowing the visible devices.

One private Ray cluster declares 4 fake GPUs and 4 NPUs (no device is touched: the actors only
read their real accelerator ids and environment). Under RAY_EXPERIMENTAL_NOSET_* every device stays
visible and each actor must bind its own id; by default Ray narrows the variable and index 0 is right.
"""

from __future__ import annotations

import os

import pytest
import ray

from model.device import ACCELERATOR_KEY, VISIBLE_DEVICES_ENV, device_index
from tests.ray_helpers import init_local_ray

NOSET = {
    "cuda": "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES",
    "npu": "RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES",
}


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    init_local_ray(num_cpus=1, num_gpus=4, resources={"NPU": 4})
    yield
    ray.shutdown()


@ray.remote(num_cpus=0)
class Probe:
    def report(self, device: str) -> tuple[list[str], str | None, int]:
        ids = ray.get_runtime_context().get_accelerator_ids()
        return (
            [str(i) for i in ids[ACCELERATOR_KEY[device]]],
            os.environ.get(VISIBLE_DEVICES_ENV[device]),
            device_index(device, ids, os.environ),
        )


@pytest.mark.parametrize("noset", [False, True], ids=["narrowed", "noset"])
@pytest.mark.parametrize("device", ["npu", "cuda"])
def test_actor_device_index(device: str, noset: bool) -> None:
    resources = {"num_gpus": 1} if device == "cuda" else {"resources": {"NPU": 1}}
    env = {NOSET[device]: "1"} if noset else {}
    probes = [Probe.options(runtime_env={"env_vars": env}, **resources).remote() for _ in range(2)]
    try:
        reports = ray.get([p.report.remote(device) for p in probes], timeout=120)
    finally:
        for p in probes:
            ray.kill(p)
    ids = [r[0] for r in reports]
    assert all(len(i) == 1 for i in ids) and ids[0] != ids[1]
    for mine, visible, index in reports:
        if noset:
            assert visible is None  # nothing narrowed: every device visible, the id is the index
            assert index == int(mine[0])
        else:
            assert visible == mine[0] and index == 0
    if noset:
        assert reports[0][2] != reports[1][2]  # two workers, two devices
