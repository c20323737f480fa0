"""cluster/tools/bench_vision.py end to end on a small image and one block: both engines run in subprocesses,
agree with each other, and the JSON line carries the figures docs/benchmarks.md quotes."""

from __future__ import annotations

import json

import pytest

from cluster import bench_vision


def test_bench_runs_both_engines_and_prints_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        bench_vision.main(["--image", "56", "--depth", "1", "--fullatt", "0", "--out-hidden", "64", "--threads", "1"])
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["patches"] == 16 and result["device"] == "cpu"
    for engine in ("ours", "transformers"):
        assert result[f"{engine}_s"] > 0 and result[f"{engine}_cpu_s"] > 0
        assert result[f"{engine}_peak_mb"] > 0 and result[f"{engine}_peak_rise_mb"] >= 0
    assert result["max_abs_diff"] <= 1e-4 * max(1.0, result["max_abs_ref"])
    assert result["time_ratio"] > 0
