"""Failures inside a round and rebuilds of a group, against the fake worker group (no Ray, no model).

A failed vision encode must not lose the round's releases and preemptions (the workers and the
scheduler agree afterwards), and a rebuild asked for while a round is in flight, or while a rebuild
after a failure is starting, runs once: every request ends, one set of workers lives.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from actors.groups import GroupFailure
from actors.scheduler import Plan, Sequence
from cluster.tools.fake_workers import FakeWorkerGroup
from tests.test_group_loop import (
    Owner,
    all_queued,
    check_against_reference,
    coordinator,
    expected,
    make_seq,
    new_loop,
    requests,
)


def with_image(seq: Sequence, start: int, end: int) -> Sequence:
    """`seq` with one image whose tokens are prompt[start:end] (a 1 x 2 x 2 patch grid; the fake reads no pixels)."""
    seq.images = [(start, end, seq.request_id.encode())]
    prepared = seq.payload.prepared
    prepared.image_grid_thw = torch.tensor([[1, 2, 2]])
    prepared.pixel_values = torch.zeros(4, 8)
    return seq


def test_a_failed_encode_keeps_the_rounds_releases_and_preemptions_and_fails_only_its_request() -> None:
    loop = new_loop(num_blocks=8, max_running=3, budget=8)
    group: FakeWorkerGroup = loop.group
    text = [make_seq(name, n, m) for name, n, m in [("a", 6, 2), ("b", 6, 10), ("c", 6, 10)]]
    bad, good = with_image(make_seq("bad", 8, 5), 2, 6), with_image(make_seq("good", 8, 5), 2, 6)
    late = make_seq("t", 6, 5)
    group.encode_errors["bad"] = "the image of 'bad' cannot be decoded"
    failing_plans: list[Plan] = []
    schedule = loop.scheduler.schedule

    def watched() -> Plan:
        plan = schedule()
        if any(seq.request_id == "bad" for seq in plan.admit):
            failing_plans.append(plan)
        return plan

    loop.scheduler.schedule = watched

    async def main() -> Owner:
        await group.start()
        owner = Owner(loop)
        for seq in text:
            loop.scheduler.add(seq)
        await owner.round()  # all three prefill; "a" ends at its second token, in the next round
        for seq in (bad, good, late):
            loop.scheduler.add(seq)
        await owner.run()
        return owner

    owner = asyncio.run(main())
    plan = failing_plans[0]
    assert plan.releases and plan.decode, "the failing round must release and decode"
    assert set(owner.errors) == {"bad"} and "cannot be decoded" in owner.errors["bad"]
    check_against_reference(owner, text + [good, late])  # the round's others and the preempted ones complete
    assert loop.scheduler.preemptions > 0
    assert group.seqs == {} and not group.embeds  # no worker holds an ended request or its images
    assert loop.scheduler.pool.stats()["used"] == 0


class HeldStart(FakeWorkerGroup):
    """A fake group whose `start` after the first waits on `release` (a rebuild in progress)."""

    def __init__(self, dp_rank: int, cfg: object = None, strategies: list | None = None) -> None:
        super().__init__(dp_rank, cfg, strategies or [])
        self.starting = asyncio.Event()
        self.release = asyncio.Event()
        self.live_sets = 0  # sets of workers alive now (a start makes one, a kill ends it)

    async def start(self) -> None:
        if self.starts:
            self.starting.set()
            await self.release.wait()
        assert self.live_sets == 0, "a second set of workers started while one lives"
        await super().start()
        self.live_sets += 1

    async def kill(self) -> None:
        await super().kill()
        self.live_sets = 0


def test_rebuild_while_a_round_is_in_flight_runs_once_and_ends_every_request(tiny_checkpoint: Path) -> None:
    async def main() -> None:
        coord = coordinator(tiny_checkpoint, dp_size=1, max_batch_size=2, restarts=3)
        coord.engines[0].group = group = HeldStart(0)
        await coord.setup()
        hold = group.hold = asyncio.Event()
        group.entered = asyncio.Event()
        reqs = requests(4, 5)
        done = asyncio.create_task(coord.generate(reqs))
        await group.entered.wait()  # a round's call is in flight
        running = {s.payload.record["id"] for s in coord.engines[0].scheduler.running}
        group.hold = None  # the rebuilt group's calls run straight through
        group.release.set()
        rebuilt = await asyncio.wait_for(coord.rebuild_group(0), 30)
        hold.set()  # a call that outlived the rebuild would now find its workers gone
        records = {r["id"]: r for r in await asyncio.wait_for(done, 30)}
        assert group.starts == 2 and group.live_sets == 1, "exactly one rebuild, one set of workers"
        assert rebuilt[0]["alive"] and coord.engines[0].restarts == 0  # an asked-for rebuild uses no restart
        for request in reqs:
            record = records[request["id"]]
            if request["id"] in running:
                assert "being rebuilt" in record["error"]
            else:
                assert record["error"] is None, record["error"]
                assert record["output_token_ids"] == expected(coord, request)
        assert running and len(running) < len(reqs)
        again = await coord.generate(requests(2, 3))
        assert all(r["error"] is None for r in again) and group.starts == 2
        await coord.shutdown()

    asyncio.run(main())


def test_rebuild_asked_for_while_a_failure_rebuild_starts_waits_for_that_one(tiny_checkpoint: Path) -> None:
    async def main() -> None:
        coord = coordinator(tiny_checkpoint, dp_size=1, max_batch_size=2, restarts=3)
        coord.engines[0].group = group = HeldStart(0)
        await coord.setup()
        group.hold, group.entered = asyncio.Event(), asyncio.Event()
        reqs = requests(4, 5)
        done = asyncio.create_task(coord.generate(reqs))
        await group.entered.wait()
        running = {s.payload.record["id"] for s in coord.engines[0].scheduler.running}
        group.die(0)
        group.hold.set()  # the call in flight finds rank 0 dead: the group fails and its rebuild begins
        await asyncio.wait_for(group.starting.wait(), 30)  # that rebuild is starting the workers
        asked = asyncio.create_task(coord.rebuild_group(0))
        await asyncio.sleep(0)
        assert not asked.done()  # it waits for the rebuild under way
        group.release.set()
        await asyncio.wait_for(asked, 30)
        records = {r["id"]: r for r in await asyncio.wait_for(done, 30)}
        assert group.starts == 2 and group.live_sets == 1, "one rebuild, one set of workers"
        assert coord.engines[0].restarts == 1
        for request in reqs:
            record = records[request["id"]]
            if request["id"] in running:
                assert "died" in record["error"]
            else:
                assert record["error"] is None, record["error"]
                assert record["output_token_ids"] == expected(coord, request)
        await coord.shutdown()

    asyncio.run(main())


def test_a_rebuild_that_fails_ends_the_requests_that_waited_for_it(tiny_checkpoint: Path) -> None:
    async def main() -> None:
        coord = coordinator(tiny_checkpoint, dp_size=1, max_batch_size=1, restarts=0)
        await coord.setup()
        group = coord.engines[0].group
        group.hold, group.entered = asyncio.Event(), asyncio.Event()
        done = asyncio.create_task(coord.generate(requests(3, 5)))
        await group.entered.wait()  # r0 runs, r1 and r2 wait

        async def broken() -> None:
            raise RuntimeError("no device")

        group.start = broken
        with pytest.raises(GroupFailure, match="could not be rebuilt: no device"):
            await asyncio.wait_for(coord.rebuild_group(0), 30)
        records = await asyncio.wait_for(done, 30)  # every request ends: none waits for a group that is gone
        assert "being rebuilt" in records[0]["error"]
        assert all("no live DP group" in r["error"] for r in records[1:])
        await coord.shutdown()

    asyncio.run(main())


def test_a_request_that_arrives_while_the_only_group_is_rebuilt_waits_for_it(tiny_checkpoint: Path) -> None:
    """No group is alive while the only one restarts: a new request waits for that rebuild (as the group's own
    waiting requests do) and is served by it, instead of failing with "no live DP group"."""

    async def main() -> None:
        coord = coordinator(tiny_checkpoint, dp_size=1, max_batch_size=2, restarts=3)
        coord.engines[0].group = group = HeldStart(0)
        await coord.setup()
        rebuild = asyncio.create_task(coord.rebuild_group(0))
        await asyncio.wait_for(group.starting.wait(), 30)  # the old workers are gone, the new ones not started
        assert not group.alive
        (request,) = requests(1, 5)
        queued = all_queued(coord, 1)
        served = asyncio.create_task(coord.generate([request]))
        await asyncio.wait_for(queued.wait(), 30)  # on the rebuilding group's queue, not failed
        assert not served.done() and coord.engines[0].scheduler.waiting
        group.release.set()
        await asyncio.wait_for(rebuild, 30)
        (record,) = await asyncio.wait_for(served, 30)
        assert record["error"] is None and record["output_token_ids"] == expected(coord, request)
        await coord.shutdown()

    asyncio.run(main())
