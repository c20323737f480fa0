"""The group loop's lookahead (`scheduler.async_scheduling`): the next step call is planned and started while a
pure-decode call runs, its tokens counted as in flight (no Ray, no model).

The fake group (cluster/tools/fake_workers.py) runs its step calls one at a time in the order they came, as a
rank does; the tokens every request gets are checked against the toy model run on that request alone, and
a block-write log checks the rule that makes freeing blocks at once safe: a call planned after a block
was freed (and perhaps given to another request) runs after every call planned before that still writes it.
Overlap is arranged with events the fake's step call waits on, never with sleeps.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from actors import clock
from actors.group_loop import PLAN_LEAD, TIMER_SLACK_S, GroupLoop
from actors.scheduler import WAITING, GroupScheduler, Sequence
from cluster.tools import sim_loop
from cluster.tools.fake_workers import FakeWorkerGroup
from tests.test_group_loop import (
    EOS,
    Owner,
    all_queued,
    check_against_reference,
    coordinator,
    expected,
    make_seq,
    requests,
    serve_all,
)


class LoggedGroup(FakeWorkerGroup):
    """The fake group, logging which request writes which KV block in each step call as it runs, and how many
    step calls have arrived (started by the loop) against how many have run."""

    def __init__(self, dp_rank: int, block_size: int) -> None:
        super().__init__(dp_rank)
        self.block_size = block_size
        self.writes: list[tuple[int, int, str]] = []  # (call's plan index, block, request id), in the order run
        self.arrived = 0  # step calls started by the loop (their plan order)
        self.ran = 0
        self.plan_index: dict[int, int] = {}  # id of a call's block tables -> its plan index
        self.written: list[float] = []  # clock.perf() when each step call came from the loop, in plan order

    async def call(self, method: str, *args):
        if method == "step":
            self.plan_index[id(args[3])] = self.arrived
            self.arrived += 1
            self.written.append(clock.perf())
        return await super().call(method, *args)

    def _step(self, releases, preempted, admissions, tables, chunks, decode, steps, profile=False, forks=None) -> dict:
        bs, index = self.block_size, self.plan_index.pop(id(tables))
        self.ran += 1
        answer = super()._step(releases, preempted, admissions, tables, chunks, decode, steps, profile, forks)
        forked = set()
        for _, rid, _, copy in forks or ():  # a forked choice writes the copy of its partial block, after the forward
            forked.add(rid)
            if copy is not None and rid in self.seqs:
                self.writes.append((index, copy[1], rid))
        for rid, start, end in chunks:
            if rid not in answer["errors"]:
                self.writes.extend((index, self.seqs[rid].table[p // bs], rid) for p in range(start, end))
        for rid, out in answer["outputs"].items():
            seq = self.seqs[rid]
            if chunks:  # one decode token in a round with chunks: its position is the last computed
                written = [seq.num_computed - 1] if rid not in {c[0] for c in chunks} | forked else []
            else:
                written = list(range(seq.num_computed - len(out["tokens"]), seq.num_computed))
            self.writes.extend((index, seq.table[p // bs], rid) for p in written)
        return answer


def new_loop(num_blocks: int = 64, block_size: int = 4, max_running: int = 4, budget: int = 8, steps: int = 1):
    sched = GroupScheduler(max_running, num_blocks, block_size, "continuous", budget, steps)
    return GroupLoop(LoggedGroup(0, block_size), sched, sorted(EOS), lookahead=True)


def check_block_owners(writes: list[tuple[int, int, str]]) -> None:
    """One writer per block in each call, and each block's writers in the order their calls were planned: a
    request's writes to a block never land after those of a call planned later that gave it to another."""
    last: dict[int, tuple[int, str]] = {}  # block -> (plan index, request) of its latest write
    for index, block, rid in writes:
        if block in last:
            before, writer = last[block]
            if writer != rid:
                assert index > before, f"block {block}: {rid} (call {index}) writes after {writer} (call {before})"
        last[block] = (index, rid)


def test_lookahead_gives_every_request_its_own_tokens() -> None:
    """Chunked prompts, multi-step and one-step decode, EOS and length, preemption by a small pool: tokens as if
    served alone, everything released; the loop did start calls ahead."""
    for steps in (1, 3):
        loop = new_loop(num_blocks=14, steps=steps)
        specs = [("a", 13, 20), ("b", 9, 12), ("c", 5, 17), ("d", 21, 6), ("e", 3, 9)]
        seqs = [make_seq(name, n, m) for name, n, m in specs]
        owner = serve_all(loop, seqs, max_rounds=2000)
        assert not owner.errors
        check_against_reference(owner, seqs)
        assert loop.scheduler.preemptions > 0
        assert loop.group.seqs == {} and loop.scheduler.pool.stats()["used"] == 0
        assert all(s.in_flight == 0 for s in seqs)
        check_block_owners(loop.group.writes)


def test_the_next_call_starts_while_a_decode_call_runs() -> None:
    """With a decode call held on the workers, the loop plans and starts the next one (it arrives at the group)
    before the held one returns; the requests then get their own tokens."""
    loop = new_loop(budget=16)
    seqs = [make_seq(name, 6, 12) for name in "xy"]

    async def main() -> Owner:
        group = loop.group
        await group.start()
        owner = Owner(loop)
        for seq in seqs:
            loop.scheduler.add(seq)
        await owner.round()  # starts the prefill call
        await owner.round()  # its outcome (the next plan needs it): both decode, nothing in flight
        assert loop.in_flight is None and all(s.state.value == "decoding" for s in seqs)
        group.hold, group.entered = asyncio.Event(), asyncio.Event()
        ran = group.ran
        await owner.round()  # starts decode call N, held on the workers, and returns
        await group.entered.wait()
        ahead = asyncio.create_task(owner.round())  # plans and starts call N + 1, then waits for N
        for _ in range(100):  # the next call arrives within a few passes of the event loop
            if group.arrived == ran + 2:
                break
            await asyncio.sleep(0)
        assert group.arrived == ran + 2 and not ahead.done() and group.ran == ran  # N + 1 arrived behind held N
        assert all(s.in_flight >= 1 for s in seqs)
        group.hold.set()
        await ahead
        group.hold = group.entered = None
        await owner.run()
        return owner

    owner = asyncio.run(main())
    check_against_reference(owner, seqs)


def test_an_arrival_during_a_decode_step_starts_in_the_next_call() -> None:
    """The next call is planned just before the running one is expected to end, not as soon as it started: in
    simulated time (steps of 10 ms), a request that arrives 3 ms into a decode call is prefilled in the call
    right after it (planning at once would put a decode call between), and while requests decode each
    call starts as the one before it ends (the workers never wait for a plan)."""
    step_s, arrival_s = 0.010, 0.053
    loop = new_loop(budget=16)
    loop.group.step_time_s = step_s
    seqs = [make_seq(name, 6, 30) for name in "xy"]
    late = make_seq("z", 6, 4)

    async def main() -> Owner:
        group = loop.group
        await group.start()
        owner, begin = Owner(loop), clock.perf()
        for seq in seqs:
            loop.scheduler.add(seq)

        async def arrive() -> None:
            await asyncio.sleep(arrival_s)
            loop.scheduler.add(late)

        arrival = asyncio.create_task(arrive())
        await owner.run()
        await arrival
        return owner, begin

    owner, begin = sim_loop.run(main())
    check_against_reference(owner, [*seqs, late])
    calls = loop.group.calls
    running = next(i for i, (_, _, start, end) in enumerate(calls) if start <= begin + arrival_s < end)
    assert calls[running][0] == "decode" and calls[running + 1][0] == "prefill", calls[running : running + 3]
    # Once a decode step has been timed (after the first decode call), each decode call came from the loop
    # while the one before it ran, in that one's lead (its last PLAN_LEAD, and TIMER_SLACK_S; planning takes no
    # simulated time).
    first = next(i for i, c in enumerate(calls) if c[0] == "decode")
    written, wrote = loop.group.written, {index for index, _, _ in loop.group.writes}  # calls that ran rows
    pairs = [(i, i + 1) for i in range(first + 1, len(calls) - 1) if {i, i + 1} <= wrote and calls[i][0] == "decode"]
    assert len(pairs) > 20, calls
    for a, b in pairs:
        _, steps, start, end = calls[a]
        lead = PLAN_LEAD * steps * step_s + TIMER_SLACK_S
        assert end - lead - 1e-9 <= written[b] < end, (a, start, end, written[b])


async def serve_with_aborts(loop: GroupLoop, seqs: list[Sequence], rng: random.Random) -> tuple[Owner, set[str]]:
    """Serve `seqs`, aborting a random running request after some rounds (while the call started ahead runs)."""
    await loop.group.start()
    owner, aborted = Owner(loop), set()
    for seq in seqs:
        loop.scheduler.add(seq)
    for _ in range(2000):
        if loop.idle:
            break
        await owner.round()
        running = [s for s in loop.scheduler.running if s.request_id not in aborted]
        if running and rng.random() < 0.15:
            victim = rng.choice(running)
            aborted.add(victim.request_id)
            loop.scheduler.abort(victim.request_id)
    return owner, aborted


def test_aborts_and_preemptions_while_calls_run_ahead_keep_blocks_to_one_writer() -> None:
    """Random aborts between rounds (so while a call started ahead runs) and a pool small enough to preempt:
    every block's writers follow the plan order, the survivors get their own tokens, the pool ends empty."""
    rng = random.Random(7)
    preemptions = aborts = 0
    for trial in range(6):
        loop = new_loop(num_blocks=16, max_running=4, steps=1 + trial % 3)
        seqs = [make_seq(f"t{trial}-{i}", rng.randint(3, 14), rng.randint(4, 20)) for i in range(10)]
        owner, aborted = asyncio.run(serve_with_aborts(loop, seqs, rng))
        assert loop.idle
        check_block_owners(loop.group.writes)
        check_against_reference(owner, [s for s in seqs if s.request_id not in aborted])
        assert loop.group.seqs == {} and loop.scheduler.pool.stats()["used"] == 0
        preemptions += loop.scheduler.preemptions
        aborts += len(aborted)
    assert preemptions > 0 and aborts > 0


def test_out_of_order_calls_break_the_block_rule() -> None:
    """The block-write check catches what lookahead must not do: a call planned after a block was given to
    another request running before the call planned earlier that still writes it."""
    writes = [(0, 5, "a"), (2, 5, "b"), (1, 5, "a")]
    try:
        check_block_owners(writes)
    except AssertionError as e:
        assert "block 5: a (call 1) writes after b (call 2)" in str(e)
    else:
        raise AssertionError("the check let a stale write through")


def test_a_request_preempted_with_tokens_in_flight_waits_for_them() -> None:
    """Scheduler alone: a plan counts its decode step in flight; a preemption while it runs puts the request
    back to waiting; it is not admitted again until its in-flight tokens come back through `append`."""
    sched = GroupScheduler(2, 5, 4, "continuous", 16, 1)
    a, b = make_seq("a", 7, 9), make_seq("b", 7, 9)
    for seq in (a, b):
        sched.add(seq)
    plan = sched.schedule()  # both prefill whole (2 blocks each)
    for seq, _, end in plan.chunks:
        sched.prefilled(seq, end)
        sched.append(seq, [1])
    plan = sched.schedule()  # one decode step each, in flight: positions 7 (needs no new block)
    assert [s.request_id for s in plan.decode] == ["a", "b"] and a.in_flight == b.in_flight == 1
    plan = sched.schedule()  # planned ahead: positions 8 need a third block each, only one is free
    assert plan.preempted == ["b"] and b.state == WAITING and b.in_flight == 1
    assert [s.request_id for s in plan.decode] == ["a"] and a.in_flight == 2
    sched.append(a, [2])
    sched.append(b, [2])  # the first call's token for b comes back while it waits
    assert b.output_ids == [1, 2] and b.in_flight == 0 and a.in_flight == 1
    sched.append(a, [3])
    sched.finish(a, "stop")
    plan = sched.schedule()
    assert [s.request_id for s in plan.admit] == ["b"]
    ((seq, start, end),) = plan.chunks
    assert seq is b and end == len(b.tokens) == 9  # its prompt on resumption holds both tokens it made


# ----------------------------------------------------------------------------- through the Coordinator
def test_default_settings_deliver_each_token_alone_and_admit_an_arrival_after_the_running_call(
    tiny_checkpoint: Path,
) -> None:
    """The Coordinator as configured by default (async scheduling, `auto` steps): a stream gets one token per
    item, every decode call is one step, and a request that arrives while a decode call runs is prefilled
    in the call planned after that one's outcome (at most the one call already started ahead runs between)."""

    async def main() -> None:
        coord = coordinator(tiny_checkpoint, dp_size=1, max_batch_size=4, restarts=0)
        assert coord.cfg.async_scheduling and coord.cfg.decode_steps_per_call == "auto"
        await coord.setup()
        group = coord.engines[0].group
        first, second = requests(2, 24)
        items = []

        async def read() -> None:
            async for item in coord.stream(first):
                items.append(item)

        reader = asyncio.create_task(read())
        while len(items) < 4:  # decoding
            await asyncio.sleep(0)
        group.hold, group.entered = asyncio.Event(), asyncio.Event()
        await group.entered.wait()  # a decode call runs (held on the workers)
        held = len(group.calls)  # calls finished before the held one
        queued = all_queued(coord, 1)
        done = asyncio.create_task(coord.generate([second]))
        await queued.wait()  # on the group's queue while the call is held
        group.hold.set()
        group.hold = group.entered = None
        (record,) = await done
        await reader
        assert record["error"] is None and record["output_token_ids"] == expected(coord, second)
        kinds = [kind for kind, _, _, _ in group.calls]
        # held (index `held`), perhaps the one started ahead of its outcome, then the arrival's prefill
        assert "prefill" in kinds[held + 1 : held + 3], kinds[held : held + 4]
        tokens = [item["token_ids"] for item in items if not item.get("final")]
        assert all(len(t) == 1 for t in tokens) and len(tokens) == first["max_new_tokens"]
        decode_steps = [steps for kind, steps, _, _ in group.calls if kind == "decode" and steps]  # 0: releases only
        assert decode_steps == [1] * len(decode_steps)
        await coord.shutdown()

    asyncio.run(main())
