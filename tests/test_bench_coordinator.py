"""The Coordinator benchmark's own run, in process (no Ray), in both ways of reading the streams."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.tools import bench_coordinator


@pytest.mark.parametrize("streams", ["multiplexed", "per-request"])
def test_every_token_reaches_its_consumer(tmp_path: Path, streams: str) -> None:
    argv = ["--in-process", "--streams", streams, "--groups", "1", "2", "--running", "4", "--max-tokens", "6"]
    assert bench_coordinator.main([*argv, "--step-ms", "1", "--out", str(tmp_path)]) == 0
    suffix = "" if streams == "multiplexed" else "_per_request"
    rows = json.loads((tmp_path / f"bench_coordinator_in_process{suffix}.json").read_text())
    assert [r["groups"] for r in rows] == [1, 2]
    for row in rows:
        assert row["all_delivered"] and row["streams"] == streams and not row["errors"]
        assert row["tokens_delivered"] == row["groups"] * 4 * 6
