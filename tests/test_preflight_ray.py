"""Tried as a new user would: the 72B preset on a Ray cluster that advertises NPUs but has no torch_npu.

A private local Ray cluster declares {"NPU": 2} on a machine without CANN or torch_npu.
`python -m cluster.launch conf/qwen2_5_vl_72b.yaml` with the tiny checkpoint at world_size 2 must end
with the node preflight's message (naming torch_npu and the fix) as its last error line, before any
ShardWorker exists.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ray

from tests.ray_helpers import REPO, init_local_ray, live_placement_groups, named_actors, tiny_model

NAMESPACE = "test-preflight"
PRESET = REPO / "conf" / "qwen2_5_vl_72b.yaml"


def test_72b_preset_without_torch_npu_stops_at_the_preflight(tmp_path: Path) -> None:
    init_local_ray(num_cpus=2, resources={"NPU": 2})
    try:
        address = ray.get_runtime_context().gcs_address
        overrides = [
            f"model_path={tiny_model()}",
            "world_size=2",
            "parallel_config.tp_size=2",
            "data_config.dataset=dataset/sample_vl.jsonl",
            "data_config.input_max_len=512",
            "data_config.max_new_tokens=4",
            "data_config.batch_size=2",
            f"output_path={tmp_path / 'results.jsonl'}",
            f"ray.address={address}",
            f"ray.namespace={NAMESPACE}",
            "ray.placement_timeout_s=30",
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
        done = subprocess.run(
            [sys.executable, "-m", "cluster.launch", str(PRESET), *overrides],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,  # the bound: the launch ends within a minute instead of failing deep in an actor
        )
        errors = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2, done.stderr
        last = errors[-1]
        assert last.startswith("error: preflight for device npu failed on 1 of 1 node(s): node "), done.stderr
        assert "torch_npu does not import" in last and "pip install '.[npu]'" in last, last
        assert "CANN's environment is missing" in last and "set_env.sh" in last, last
        assert "unexpected internal error" not in done.stderr
        # Neither a Coordinator nor a ShardWorker (named actors of the run's namespace) was left, nor a reservation.
        assert named_actors(NAMESPACE) == [] and live_placement_groups(NAMESPACE) == []
    finally:
        ray.shutdown()
