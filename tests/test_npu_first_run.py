"""The NPU first-run script (`python -m cluster.tools.npu_first_run`) against the cpu stand-ins.

Every case runs in its own (forked) process and prints one line: against tests/npu_stand_in.py, which
asserts the documented layouts, dtypes and limits, each passes. A case that does not answer in time is
killed and reported as TIMEOUT, and the next case still runs.
"""

from __future__ import annotations

import time

import pytest

import cluster.tools.npu_first_run as first_run
from cluster.tools.npu_first_run import CASES, main

STAND_IN = ["--stand-in", "tests.npu_stand_in"]


def _lines(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}


def test_every_case_passes_against_the_stand_ins(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*STAND_IN, "--timeout", "120"]) == 0
    out = capsys.readouterr().out
    lines = _lines(out)
    assert [line.split()[0] for line in out.splitlines()] == [*CASES, "npu"]  # one line per case, then the summary
    for name in CASES:
        assert lines[name][1] == "PASS", lines[name]
    assert out.splitlines()[-1] == f"npu first run: {len(CASES)}/{len(CASES)} cases passed"
    assert "3 call(s)" in " ".join(lines["fusion_attention_2049_sequences"])


def test_a_hung_case_is_killed_and_the_next_one_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def hangs(env: first_run.Env) -> str:
        time.sleep(60)  # an NPU op that never returns
        return "never"

    def fails(env: first_run.Env) -> str:
        raise RuntimeError("EZ1001: the kernel refused the shapes\nmore lines")

    monkeypatch.setitem(CASES, "hangs", hangs)
    monkeypatch.setitem(CASES, "fails", fails)
    started = time.perf_counter()
    assert main([*STAND_IN, "--timeout", "1", "--cases", "hangs,fails,paged_fia"]) == 1
    assert time.perf_counter() - started < 30
    out = capsys.readouterr().out
    lines = _lines(out)
    assert lines["hangs"][1] == "TIMEOUT" and "killed" in " ".join(lines["hangs"])
    assert (
        lines["fails"][1] == "FAIL"
        and " ".join(lines["fails"][3:]) == "RuntimeError: EZ1001: the kernel refused the shapes"
    )
    assert lines["paged_fia"][1] == "PASS"
    assert out.splitlines()[-1] == "npu first run: 1/3 cases passed"
