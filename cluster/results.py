"""Results on disk: one JSONL record per request, appended as it completes, and resume from that file.

A record is written as one line with its newline, then flushed and fsynced, so after a crash the
file holds every record completed before it, plus at most one partial last line. `read_records`
skips (and reports) a line that is not a JSON object; `RecordWriter` cuts such a tail off before it
appends, so a resumed file is valid JSONL again.

A request counts as done when its latest record succeeded (`error` is None and it was not aborted).
`pending_requests` picks what a resumed run still has to do; `latest_per_id` gives the records that
the summary covers, one per id.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from actors.records import RECORD_FIELDS
from cluster.config import ConfigError

logger = logging.getLogger("cluster.results")

Record = dict[str, Any]


def is_success(record: Record) -> bool:
    """True when the request produced its answer: no error and not aborted."""
    return record.get("error") is None and record.get("finish_reason") != "abort"


def is_failure(record: Record) -> bool:
    """True when the request failed with an error (an aborted request is not a failure: it never ended)."""
    return record.get("error") is not None


def record_line(record: Record) -> str:
    """One JSONL line (newline included): the record's fields in RECORD_FIELDS order, then any others sorted."""
    known = {k: record[k] for k in RECORD_FIELDS if k in record}
    rest = {k: record[k] for k in sorted(record) if k not in known}
    return json.dumps({**known, **rest}, ensure_ascii=False, default=json_default) + "\n"


def read_records(path: str | os.PathLike[str]) -> tuple[list[Record], list[int]]:
    """The records of a results file, in file order, and the 1-based numbers of the lines skipped.

    A missing file holds no records. Blank lines are ignored; a line that is not a JSON object with
    an `id` (a partial line left by a crash, or anything else) is skipped with a warning naming it.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], []
    records: list[Record] = []
    skipped: list[int] = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        record = _parse(raw)
        if record is None:
            skipped.append(lineno)
            logger.warning("%s line %d: not a complete JSON record, skipped", path, lineno)
        else:
            records.append(record)
    return records, skipped


def _parse(raw: bytes) -> Record | None:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) and value.get("id") is not None else None


def latest_per_id(records: Iterable[Record]) -> list[Record]:
    """One record per id, the last one written; ids in the order they first appear."""
    latest: dict[str, Record] = {}
    for record in records:
        latest[str(record["id"])] = record  # reassigning keeps the first insertion's position
    return list(latest.values())


def check_output_path(path: str | os.PathLike[str], resume: bool) -> int:
    """Fail (ConfigError) unless `path` can take this run's records; returns the number of records it holds.

    Without `resume`, a file that already holds records is never overwritten nor appended to.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"output_path={str(path)!r} is a directory; expected a .jsonl file path")
    if not path.exists():
        return 0
    records, skipped = read_records(path)
    if (records or skipped) and not resume:
        raise ConfigError(
            f"output_path={str(path)!r} already holds {len(records)} record(s) of an earlier run: choose another "
            "output_path, set resume=true to run only the requests it lacks, or remove the file"
        )
    return len(records)


def pending_requests(
    requests: Sequence[Record], existing: Iterable[Record], resume_failed: bool = True
) -> tuple[list[Record], list[Record]]:
    """Split a run's requests against the records of an earlier run: `(to_run, reused)`.

    A request is reused when the latest record of its id succeeded, or failed with an error and
    `resume_failed` is False; it runs again when it has no record, was aborted, or failed and
    `resume_failed` is True. `reused` holds the kept records, in request order.
    """
    latest = {str(r["id"]): r for r in existing}
    to_run: list[Record] = []
    reused: list[Record] = []
    for request in requests:
        record = latest.get(str(request["id"]))
        if record is not None and (is_success(record) or (is_failure(record) and not resume_failed)):
            reused.append(record)
        else:
            to_run.append(request)
    return to_run, reused


def busy_seconds(records: Iterable[Record]) -> float:
    """Length of the union of the records' [arrival_time, end_time] intervals: the time some request was in flight.

    Stands in for the wall time of earlier runs, whose own wall clock was not kept (a killed run
    writes no summary) and whose gap to this run is not engine time.
    """
    spans = sorted(
        (r["arrival_time"], r["end_time"])
        for r in records
        if r.get("arrival_time") is not None and r.get("end_time") is not None and r["end_time"] >= r["arrival_time"]
    )
    total = 0.0
    current_start = current_end = None
    for start, end in spans:
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def resume_command(config_path: str, overrides: Sequence[str]) -> str:
    """The shell command that resumes a run of `python -m cluster.launch config_path overrides...`."""
    kept = [o for o in overrides if o.split("=", 1)[0].strip() != "resume"]
    return shlex.join(["python", "-m", "cluster.launch", config_path, *kept, "resume=true"])


class RecordWriter:
    """Appends records to a JSONL file, one line each, flushed and fsynced before `write` returns.

    Opening cuts off a partial last line (what a crash mid-write leaves), so every line of the file
    stays a complete record. Use as a context manager, or call `close()`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")
        try:
            self._repair_tail()
        except BaseException:
            self._file.close()
            raise
        self.written = 0

    def _repair_tail(self) -> None:
        size = self._file.seek(0, os.SEEK_END)
        if size == 0:
            return
        with open(self.path, "rb") as f:
            data = f.read()
        if data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        if _parse(data[cut:]) is not None:  # a whole record whose newline did not reach the disk
            self._file.write(b"\n")
        else:
            lineno = data.count(b"\n") + 1
            logger.warning("%s line %d: partial record from an interrupted run, removed", self.path, lineno)
            self._file.truncate(cut)
        self._file.flush()
        os.fsync(self._file.fileno())

    def write(self, record: Record) -> None:
        """Append one record; it is on disk when this returns."""
        self._file.write(record_line(record).encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.written += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def json_default(value: Any) -> Any:
    """json.dumps's `default` for what records and summaries may hold: numpy scalars and arrays, paths."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all (a temporary file beside it, fsynced, then renamed over it)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
