"""Tried as a new user would: `python -m model.quantize` on the tiny checkpoint, then `cluster.launch` on it (tp 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.ray_helpers import REPO, TINY_CONF, tiny_model


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_quantize_then_launch_serves_every_request(tmp_path: Path) -> None:
    quantized = tmp_path / "tiny-w8a8"
    proc = _run("model.quantize", str(tiny_model()), str(quantized), "--scheme", "w8a8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "quantized tensors (W8A8)" in proc.stdout
    out = tmp_path / "results.jsonl"
    common = [
        str(TINY_CONF),
        f"model_path={quantized}",
        f"output_path={out}",
        "ray.address=local",  # a private cluster, never one that happens to be running
        "ray.namespace=test-quant-launch",
        "ray.log_to_driver=false",
    ]
    refused = _run("cluster.launch", *common, "quantization=none")
    assert refused.returncode != 0 and "quantization='none'" in refused.stdout + refused.stderr
    proc = _run("cluster.launch", *common, "data_config.num_samples=4", "data_config.max_new_tokens=4", timeout=420)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4
    assert all(r["error"] is None and len(r["output_token_ids"]) == 4 for r in records), records
