"""Long runs lose nothing: `python -m cluster.launch` killed, interrupted, resumed, or pointed at old results.

Every run joins the module's private Ray cluster, each in its own namespace, so that what a run leaves
behind (named actors, placement groups) can be read from the cluster afterwards. The killed driver is a
subprocess; Ray ends the actors and placement groups of a driver that dies. The interrupted runs are
`cluster.launch.main` in this process, sent SIGINT or SIGTERM by a helper thread, as a terminal or
`ray job stop` would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray

from cluster import launch
from cluster.results import read_records
from tests.ray_helpers import REPO, TINY_CONF, released, wait_for

pytestmark = pytest.mark.integration

RAY_NUM_CPUS = 2
MAX_NEW_TOKENS = 8


def _dataset(path: Path, count: int) -> Path:
    lines = [json.dumps({"id": f"q{i:02d}", "prompt": f"Tell me about the number {i}."}) for i in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _args(model: Path, dataset: Path, output: Path, namespace: str, *overrides: str) -> list[str]:
    """`python -m cluster.launch` arguments: the tiny checkpoint at TP 1 on this module's Ray cluster."""
    return [
        str(TINY_CONF),
        f"model_path={model}",
        "world_size=1",
        "parallel_config.tp_size=1",
        f"data_config.dataset={dataset}",
        "data_config.batch_size=2",
        f"data_config.max_new_tokens={MAX_NEW_TOKENS}",
        "data_config.ignore_eos=true",
        f"output_path={output}",
        f"ray.address={ray.get_runtime_context().gcs_address}",
        f"ray.namespace={namespace}",
        "ray.log_to_driver=false",
        "ray.placement_timeout_s=60",
        "ray.rendezvous_timeout_s=60",
        "ray.worker_timeout_s=120",
        *overrides,
    ]


def _complete_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _assert_released(namespace: str) -> None:
    actors, groups = released(namespace, timeout_s=60)
    assert actors == [] and groups == [], (actors, groups)


def test_a_killed_driver_keeps_its_records_and_a_resume_completes_them(
    local_ray, tiny_checkpoint: Path, tmp_path: Path, capsys
):
    count, namespace = 10, "test-results-killed"
    dataset = _dataset(tmp_path / "prompts.jsonl", count)
    output = tmp_path / "results.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="disabled")
    argv = [
        sys.executable,
        "-m",
        "cluster.launch",
        *_args(tiny_checkpoint, dataset, output, namespace, "data_config.request_rate=2"),
    ]
    log = tmp_path / "killed.log"
    with log.open("wb") as out:
        driver = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_for(lambda: _complete_lines(output) >= 1 or driver.poll() is not None, 180)
        assert driver.poll() is None, log.read_text()[-3000:]
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver, and anything it started outside Ray
        driver.wait(timeout=30)
    _assert_released(namespace)

    *lines, tail = output.read_bytes().split(b"\n")
    first = [json.loads(line) for line in lines]  # every complete line is a record ...
    if tail:  # ... and at most one partial line follows them
        with pytest.raises(json.JSONDecodeError):
            json.loads(tail)
    ids = [r["id"] for r in first]
    assert 1 <= len(first) < count and len(set(ids)) == len(ids)
    assert all(r["error"] is None and r["finish_reason"] == "length" for r in first)

    rc = launch.main(_args(tiny_checkpoint, dataset, output, namespace, "resume=true"))
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    assert f"{len(first)} record(s) from an earlier run" in out
    records, skipped = read_records(output)
    assert skipped == []
    assert sorted(r["id"] for r in records) == [f"q{i:02d}" for i in range(count)]  # each id exactly once
    assert records[: len(first)] == first  # the earlier records are untouched
    assert all(r["error"] is None and len(r["output_token_ids"]) == MAX_NEW_TOKENS for r in records)
    summary = json.loads((tmp_path / "results.summary.json").read_text())
    assert summary["requests_total"] == count and summary["requests_ok"] == count
    assert summary["resumed_records"] == len(first)
    assert summary["output_tokens"] == count * MAX_NEW_TOKENS
    _assert_released(namespace)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_records_every_request_and_says_how_to_resume(
    local_ray, tiny_checkpoint: Path, tmp_path: Path, capsys, signum: int
):
    count, max_new_tokens, namespace = 8, 400, f"test-results-{signal.Signals(signum).name.lower()}"
    dataset = _dataset(tmp_path / "prompts.jsonl", count)
    output = tmp_path / "results.jsonl"
    args = _args(
        tiny_checkpoint,
        dataset,
        output,
        namespace,
        "data_config.request_rate=4",
        f"data_config.max_new_tokens={max_new_tokens}",
        "interrupt_grace_s=0.5",
    )
    sent_at: list[float] = []

    def interrupt() -> None:  # once the first record is on disk, like a user watching the file
        if wait_for(lambda: _complete_lines(output) >= 1, 180):
            sent_at.append(time.monotonic())
            os.kill(os.getpid(), signum)

    sender = threading.Thread(target=interrupt, daemon=True)
    sender.start()
    rc = launch.main(args)
    stopped_s = time.monotonic() - sent_at[0] if sent_at else None
    sender.join(timeout=5)
    out, err = capsys.readouterr()
    assert sent_at, f"no record appeared: {err[-3000:]}"
    assert rc == 128 + signum, err[-3000:]
    assert stopped_s < 45, stopped_s  # grace 0.5 s, then abort, summarize and release
    _assert_released(namespace)

    records, skipped = read_records(output)
    assert skipped == []
    assert sorted(r["id"] for r in records) == [f"q{i:02d}" for i in range(count)]  # every request, once
    done = [r for r in records if r["finish_reason"] == "length"]
    aborted = [r for r in records if r["finish_reason"] == "abort"]
    assert len(done) >= 1 and len(aborted) >= 1 and len(done) + len(aborted) == count
    assert all(len(r["output_token_ids"]) == max_new_tokens and r["error"] is None for r in done)
    assert all(len(r["output_token_ids"]) < max_new_tokens and r["error"] is None for r in aborted)
    summary = json.loads((tmp_path / "results.summary.json").read_text())
    assert summary["requests_total"] == len(done) and summary["aborted_requests"] == len(aborted)
    [resume_line] = [line for line in err.splitlines() if "resume=true" in line]
    assert f"interrupted by {signal.Signals(signum).name}" in resume_line
    assert f"python -m cluster.launch {TINY_CONF}" in resume_line and f"output_path={output}" in resume_line


def test_a_second_run_into_the_same_output_path_fails_and_keeps_the_file(
    local_ray, tiny_checkpoint: Path, tmp_path: Path, capsys, monkeypatch
):
    dataset = _dataset(tmp_path / "prompts.jsonl", 2)
    output = tmp_path / "results.jsonl"
    output.write_text(json.dumps({"id": "q00", "output_token_ids": [1], "error": None}) + "\n")
    before = output.read_bytes()

    def no_start(cfg):
        raise AssertionError("started actors")

    monkeypatch.setattr(launch, "start", no_start)
    rc = launch.main(_args(tiny_checkpoint, dataset, output, "test-results-second"))
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    assert f"output_path={str(output)!r} already holds 1 record(s)" in err
    assert "another output_path" in err and "resume=true" in err and "remove the file" in err
    assert output.read_bytes() == before
