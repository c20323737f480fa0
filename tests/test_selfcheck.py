"""`python -m cluster.tools.selfcheck --device cpu`: tp 2 through Ray (eager and graph) against a cpu reference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cluster.tools.selfcheck import ROWS


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
