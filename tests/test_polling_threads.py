"""lower_polling_threads: the threads Ray's asyncio graph polls in go to SCHED_IDLE; no other thread does."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from actors.compiled_group import POLLING_THREADS, lower_polling_threads

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="Linux scheduling policies")


@contextmanager
def waiting_thread(name: str) -> Iterator[threading.Thread]:
    stop, started = threading.Event(), threading.Event()

    def run() -> None:
        started.set()
        stop.wait()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    started.wait()
    try:
        yield thread
    finally:
        stop.set()
        thread.join()


def test_only_the_polling_threads_go_idle() -> None:
    with (
        waiting_thread(f"{POLLING_THREADS[0]}_7") as reader,
        waiting_thread(f"{POLLING_THREADS[1]}_7") as writer,
        waiting_thread("ThreadPoolExecutor-3_0") as other,
    ):
        assert lower_polling_threads([reader, writer, other])
        assert os.sched_getscheduler(reader.native_id) == os.SCHED_IDLE
        assert os.sched_getscheduler(writer.native_id) == os.SCHED_IDLE
        assert os.sched_getscheduler(other.native_id) == os.SCHED_OTHER
        assert os.sched_getscheduler(threading.main_thread().native_id) == os.SCHED_OTHER


def test_a_writer_alone_is_not_the_reader_looked_for() -> None:
    with waiting_thread(f"{POLLING_THREADS[1]}_8") as writer:
        assert not lower_polling_threads([writer])  # the group looks again at its next call
        assert os.sched_getscheduler(writer.native_id) == os.SCHED_IDLE
