"""Results on disk without Ray: partial lines after a crash, resume selection, the output-path check."""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

import pytest

from actors.records import RECORD_FIELDS, failed_record, new_record
from cluster.config import ConfigError
from cluster.results import (
    RecordWriter,
    busy_seconds,
    check_output_path,
    latest_per_id,
    pending_requests,
    read_records,
    resume_command,
)


def ok(request_id: str, tokens: int = 3, arrival: float = 100.0, end: float = 101.0) -> dict:
    record = new_record(request_id, arrival)
    record.update(output_token_ids=list(range(tokens)), finish_reason="length", end_time=end)
    return record


def aborted(request_id: str) -> dict:
    record = new_record(request_id, 100.0)
    record.update(output_token_ids=[1], finish_reason="abort", end_time=100.5)
    return record


def failed(request_id: str) -> dict:
    return failed_record({"id": request_id}, "image not found")


def requests(*ids: str) -> list[dict]:
    return [{"id": i, "prompt": f"prompt {i}"} for i in ids]


def test_writer_appends_one_complete_line_per_record(tmp_path: Path):
    path = tmp_path / "out" / "results.jsonl"
    with RecordWriter(path) as writer:
        writer.write(ok("a"))
        # on disk before the next record exists: another reader sees it now
        assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a"]
        writer.write(failed("b"))
    text = path.read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 2
    first = json.loads(text.splitlines()[0])
    assert list(first) == list(RECORD_FIELDS)  # every field, in the record's own order
    with RecordWriter(path) as writer:
        writer.write(ok("c"))
    records, skipped = read_records(path)
    assert [r["id"] for r in records] == ["a", "b", "c"] and skipped == []
    assert records[1]["error"] == "image not found"


def test_a_partial_last_line_is_skipped_and_named(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    path = tmp_path / "results.jsonl"
    line = json.dumps(ok("b"))
    path.write_text(json.dumps(ok("a")) + "\n" + line[: len(line) // 2])  # killed mid-write
    with caplog.at_level(logging.WARNING, logger="cluster.results"):
        records, skipped = read_records(path)
    assert [r["id"] for r in records] == ["a"] and skipped == [2]
    assert "line 2" in caplog.text


def test_the_writer_cuts_a_partial_tail_before_appending(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    path = tmp_path / "results.jsonl"
    line = json.dumps(ok("b"))
    path.write_text(json.dumps(ok("a")) + "\n" + line[:10])
    with caplog.at_level(logging.WARNING, logger="cluster.results"), RecordWriter(path) as writer:
        writer.write(ok("c"))
    assert "line 2" in caplog.text
    lines = path.read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["a", "c"]


def test_a_whole_record_missing_only_its_newline_is_kept(tmp_path: Path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(ok("a")) + "\n" + json.dumps(ok("b")))
    assert [r["id"] for r in read_records(path)[0]] == ["a", "b"]
    with RecordWriter(path) as writer:
        writer.write(ok("c"))
    assert [r["id"] for r in read_records(path)[0]] == ["a", "b", "c"]
    assert read_records(path)[1] == []


def test_a_garbled_middle_line_is_skipped(tmp_path: Path):
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join([json.dumps(ok("a")), "{not json", "[1, 2]", "", json.dumps(ok("b"))]) + "\n")
    records, skipped = read_records(path)
    assert [r["id"] for r in records] == ["a", "b"] and skipped == [2, 3]
    assert read_records(tmp_path / "missing.jsonl") == ([], [])


def test_latest_record_per_id_keeps_first_order():
    records = [failed("a"), ok("b"), aborted("c"), ok("a"), ok("c")]
    latest = latest_per_id(records)
    assert [r["id"] for r in latest] == ["a", "b", "c"]
    assert all(r["error"] is None and r["finish_reason"] == "length" for r in latest)


def test_resume_reruns_missing_failed_and_aborted_requests():
    existing = [ok("a"), failed("b"), aborted("c"), ok("x-not-in-dataset")]
    to_run, reused = pending_requests(requests("a", "b", "c", "d"), existing, resume_failed=True)
    assert [r["id"] for r in to_run] == ["b", "c", "d"]
    assert [r["id"] for r in reused] == ["a"]


def test_resume_without_retrying_failures_keeps_failed_records():
    existing = [ok("a"), failed("b"), aborted("c")]
    to_run, reused = pending_requests(requests("a", "b", "c", "d"), existing, resume_failed=False)
    assert [r["id"] for r in to_run] == ["c", "d"]  # an aborted request never finished: it runs again
    assert [r["id"] for r in reused] == ["a", "b"] and reused[1]["error"] == "image not found"


def test_resume_follows_the_latest_record_of_an_id():
    # b failed, then succeeded on a resume; a's latest record is a failure, whatever came before
    existing = [failed("b"), ok("b"), ok("a"), failed("a")]
    to_run, reused = pending_requests(requests("a", "b"), existing, resume_failed=True)
    assert [r["id"] for r in to_run] == ["a"] and [r["id"] for r in reused] == ["b"]


def test_resume_then_complete_leaves_every_id_once(tmp_path: Path):
    """A killed run, then a resume: the latest record per id covers every request once, all successful."""
    path = tmp_path / "results.jsonl"
    dataset = requests(*"abcdef")
    with RecordWriter(path) as writer:
        for record in (ok("a"), failed("b"), ok("c")):
            writer.write(record)
    with path.open("a") as f:
        f.write(json.dumps(ok("d"))[:7])  # the kill
    existing, skipped = read_records(path)
    assert skipped == [4]
    to_run, reused = pending_requests(dataset, existing, resume_failed=True)
    assert [r["id"] for r in to_run] == ["b", "d", "e", "f"]
    with RecordWriter(path) as writer:
        for request in to_run:
            writer.write(ok(request["id"]))
    final, skipped = read_records(path)
    latest = latest_per_id(final)
    assert skipped == []
    assert sorted(r["id"] for r in latest) == list("abcdef")
    assert all(r["error"] is None for r in latest)
    assert sum(1 for r in latest if r["id"] in {q["id"] for q in reused}) == 2


def test_output_path_with_results_needs_resume(tmp_path: Path):
    path = tmp_path / "results.jsonl"
    assert check_output_path(path, resume=False) == 0
    path.write_text("")
    assert check_output_path(path, resume=False) == 0  # an empty file holds nothing to lose
    path.write_text(json.dumps(ok("a")) + "\n" + json.dumps(failed("b")) + "\n")
    before = path.read_bytes()
    with pytest.raises(ConfigError) as e:
        check_output_path(path, resume=False)
    message = str(e.value)
    assert f"output_path={str(path)!r}" in message and "2 record(s)" in message
    assert "another output_path" in message and "resume=true" in message and "remove the file" in message
    assert path.read_bytes() == before
    assert check_output_path(path, resume=True) == 2
    with pytest.raises(ConfigError, match="is a directory"):
        check_output_path(tmp_path, resume=True)


def test_a_file_holding_only_a_partial_line_still_needs_resume(tmp_path: Path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"id": "a", "output_tok')
    with pytest.raises(ConfigError, match="resume=true"):
        check_output_path(path, resume=False)


def test_busy_seconds_is_the_union_of_request_spans():
    records = [
        ok("a", arrival=0.0, end=2.0),
        ok("b", arrival=1.0, end=3.0),
        ok("c", arrival=10.0, end=11.5),
        failed("d"),
    ]  # d has no times
    assert busy_seconds(records) == pytest.approx(4.5)
    assert busy_seconds([]) == 0.0


def test_resume_command_sets_resume_once():
    overrides = ["output_path=/tmp/my results.jsonl", "resume=false", "world_size=1"]
    command = resume_command("conf/tiny_cpu.yaml", overrides)
    assert shlex.split(command) == [
        "python",
        "-m",
        "cluster.launch",
        "conf/tiny_cpu.yaml",
        "output_path=/tmp/my results.jsonl",
        "world_size=1",
        "resume=true",
    ]
