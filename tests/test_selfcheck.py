"""`python -m cluster.tools.selfcheck --device cpu`: tp 2 through Ray (eager and graph) against a cpu reference;
`--device npu` on a node without torch_npu stops at the node preflight, before Ray and the first-run cases."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import ray

import cluster.tools.selfcheck
from cluster.preflight import CANN_ENV
from cluster.tools.selfcheck import ROWS, main


def test_selfcheck_cpu_passes(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.tools.selfcheck",
            "--device",
            "cpu",
            "--new-tokens",
            "4",
            "--cache-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for row in ROWS:
        [line] = [line for line in lines if line.startswith(row)]
        assert line[len(row) :].split()[0] == "PASS", line
    assert "selfcheck PASSED on cpu" in proc.stdout


def test_npu_selfcheck_stops_at_the_preflight_without_torch_npu(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("started past the preflight")

    for name in CANN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ray, "init", never)
    monkeypatch.setattr(cluster.tools.selfcheck, "check_first_run", never)
    assert main(["--device", "npu"]) == 1
    out = capsys.readouterr().out
    assert "selfcheck: preflight for device npu failed on this node: CANN's environment is missing" in out
    assert "torch_npu does not import" in out and "pip install '.[npu]'" in out
    assert out.splitlines()[-1] == "selfcheck FAILED on npu: stopped at the preflight"
