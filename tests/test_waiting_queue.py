"""The waiting queue (actors/waiting_queue.py): FIFO order, removal by id without a scan, and the aborts that use it."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from actors.scheduler import WAITING, GroupScheduler, Sequence
from actors.waiting_queue import WaitingQueue
from tests.test_group_loop import all_queued, coordinator, requests


def _seq(rid: str) -> Sequence:
    return Sequence(rid, [100, 101, 102], 4)


def _ids(seqs) -> list[str]:  # noqa: ANN001 (any iterable of Sequence)
    return [s.request_id for s in seqs]


def test_the_queue_keeps_fifo_order_through_removals_and_put_backs() -> None:
    queue: WaitingQueue[Sequence] = WaitingQueue()
    a, b, c, d = (_seq(r) for r in "abcd")
    for seq in (a, b, c):
        queue.append(seq)
    queue.remove(b)
    queue.appendleft(d)  # a preempted request goes first
    assert _ids(queue) == ["d", "a", "c"] and len(queue) == 3 and queue.head() is d
    assert queue.popleft() is d and _ids(queue) == ["a", "c"]
    assert b not in queue and a in queue and _seq("a") not in queue  # the same id, another request
    with pytest.raises(ValueError, match="request 'b' is not waiting"):
        queue.remove(b)
    with pytest.raises(ValueError, match="request 'a' is already waiting"):
        queue.append(_seq("a"))
    queue.clear()
    assert not queue
    with pytest.raises(IndexError):
        queue.head()
    with pytest.raises(IndexError):
        queue.popleft()


def test_aborting_a_waiting_request_removes_it_and_keeps_the_others_order() -> None:
    sched = GroupScheduler(max_running=1, num_blocks=64, block_size=4)
    for rid in ("a", "b", "c", "d", "e"):
        sched.add(_seq(rid))
    plan = sched.schedule()
    assert _ids(plan.admit) == ["a"] and _ids(sched.waiting) == ["b", "c", "d", "e"]
    aborted = sched.abort("c")
    assert aborted is not None and aborted.finish_reason == "abort"
    assert _ids(sched.waiting) == ["b", "d", "e"] and "c" not in sched.by_id
    sched.abort("a")  # the running one: the next admitted is the head of what is left
    assert _ids(sched.schedule().admit) == ["b"] and _ids(sched.waiting) == ["d", "e"]


def test_aborting_10000_waiting_requests_compares_no_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deque's remove compares the aborted request with every one ahead of it (n^2 / 2 comparisons for n
    aborts from the back): the queue takes it out by id, comparing none."""
    n = 10_000
    sched = GroupScheduler(max_running=1, num_blocks=64, block_size=4)
    for i in range(n):
        sched.add(_seq(f"r{i}"))
    comparisons = [0]
    equal = Sequence.__eq__

    def counted(self: Sequence, other: object) -> bool:
        comparisons[0] += 1
        return equal(self, other)

    monkeypatch.setattr(Sequence, "__eq__", counted)
    order = list(range(n))
    random.Random(0).shuffle(order)
    kept = set(order[: n // 10])
    for i in reversed(range(n)):
        if i not in kept:
            assert sched.abort(f"r{i}").state != WAITING
    assert comparisons[0] == 0
    assert _ids(sched.waiting) == [f"r{i}" for i in sorted(kept)]


def test_coordinator_abort_of_a_waiting_request_keeps_the_queue_order(tiny_checkpoint: Path) -> None:
    async def main() -> None:
        coord = coordinator(tiny_checkpoint, dp_size=1, max_batch_size=1, restarts=0)
        await coord.setup()
        group = coord.engines[0].group
        group.hold, group.entered = asyncio.Event(), asyncio.Event()
        reqs = requests(5, 4)
        queued = all_queued(coord, len(reqs))
        served = asyncio.ensure_future(coord.generate(reqs))
        await queued.wait()
        await group.entered.wait()  # r0 runs; r1..r4 wait
        scheduler = coord.engines[0].scheduler
        assert [s.payload.record["id"] for s in scheduler.waiting] == ["r1", "r2", "r3", "r4"]
        assert coord.abort("r2") is True
        assert [s.payload.record["id"] for s in scheduler.waiting] == ["r1", "r3", "r4"]
        group.hold.set()
        records = await served
        assert [r["finish_reason"] for r in records] == ["length", "length", "abort", "length", "length"]
        assert coord.status()["waiting"] == 0
        await coord.shutdown()

    asyncio.run(main())
