"""The group loop and the Coordinator's handling of its rounds, against a fake worker group (no Ray, no model).

The fake group (cluster/tools/fake_workers.py) answers `encode` and `step` like ShardWorker over
RunningBatch, with a toy next token per request; the tokens every request gets are checked against
the same toy model run on that request alone. Overlap (a request aborted while its call runs, a rank
dying inside a call) is arranged with events the fake's `step` call waits on, never with sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from actors.config import EngineConfig, WorkerConfig
from actors.coordinator import Coordinator
from actors.group_loop import GroupLoop
from actors.groups import GroupFailure
from actors.scheduler import GroupScheduler, Sequence
from actors.step_costs import StepCosts
from actors.steps_per_call import StepsPerCall
from cluster.tools.fake_workers import FakeWorkerGroup, prompt_seed, toy_token
from model.processor import PreparedRequest
from model.sampling import SamplingParams


@dataclass
class Payload:
    prepared: PreparedRequest
    params: SamplingParams


def reference(prompt: list[int], max_new_tokens: int, eos: set[int]) -> tuple[list[int], str]:
    """The toy model's tokens and finish reason for a prompt served alone."""
    out: list[int] = []
    while len(out) < max_new_tokens:
        out.append(toy_token(prompt_seed(prompt), len(out)))
        if out[-1] in eos:
            return out, "stop"
    return out, "length"


def make_seq(name: str, prompt_len: int, max_new_tokens: int) -> Sequence:
    prompt = [10 + (zlib.crc32(name.encode()) + i) % 200 for i in range(prompt_len)]  # the same in every process
    prepared = PreparedRequest(name, prompt, None, None)
    seq = Sequence(name, prompt, max_new_tokens)
    seq.payload = Payload(prepared, SamplingParams(max_new_tokens=max_new_tokens))
    return seq


class Owner:
    """The Coordinator's part in miniature: applies each round's tokens and failures to the scheduler."""

    def __init__(self, loop: GroupLoop) -> None:
        self.loop = loop
        self.tokens: dict[str, list[int]] = {}
        self.reasons: dict[str, str] = {}
        self.errors: dict[str, str] = {}

    async def round(self) -> None:
        sched = self.loop.scheduler
        result = await self.loop.round()
        for seq, message in result.failed:
            self.errors[seq.request_id] = message
            sched.abort(seq.request_id, "error")
        for seq, out in result.outputs:
            sched.append(seq, out["tokens"])
            self.tokens.setdefault(seq.request_id, []).extend(out["tokens"])
            if out["finish_reason"] is not None:
                self.reasons[seq.request_id] = out["finish_reason"]
                sched.finish(seq, out["finish_reason"])
        sched.pool.check()

    async def run(self, max_rounds: int = 500) -> None:
        for _ in range(max_rounds):
            if self.loop.idle:  # nothing to schedule, no call in flight
                return
            await self.round()
        raise AssertionError(f"not idle after {max_rounds} rounds")


def serve_all(loop: GroupLoop, seqs: list[Sequence], max_rounds: int = 500) -> Owner:
    """Start the fake group, queue `seqs` and run rounds (at most `max_rounds`) until the group is idle."""

    async def main() -> Owner:
        await loop.group.start()
        owner = Owner(loop)
        for seq in seqs:
            loop.scheduler.add(seq)
        await owner.run(max_rounds)
        return owner

    return asyncio.run(main())


EOS = {toy_token(prompt_seed(make_seq("b", 9, 1).prompt_ids), 3)}  # request "b" ends at its 4th token


def new_loop(num_blocks: int = 64, block_size: int = 4, max_running: int = 4, budget: int = 8) -> GroupLoop:
    return GroupLoop(
        FakeWorkerGroup(0), GroupScheduler(max_running, num_blocks, block_size, "continuous", budget, 4), sorted(EOS)
    )


def check_against_reference(owner: Owner, seqs: list[Sequence]) -> None:
    for seq in seqs:
        if seq.request_id in owner.errors:
            continue
        want, reason = reference(seq.prompt_ids, seq.max_new_tokens, EOS)
        assert owner.tokens[seq.request_id] == want, seq.request_id
        assert owner.reasons[seq.request_id] == reason, seq.request_id


def test_rounds_give_every_request_its_own_tokens_and_release_it() -> None:
    """Chunked prompts, multi-step decode, EOS and length, preemption by a small pool: tokens as if served alone."""
    loop = new_loop(num_blocks=14)
    seqs = [
        make_seq(name, n, m) for name, n, m in [("a", 13, 20), ("b", 9, 12), ("c", 5, 17), ("d", 21, 6), ("e", 3, 9)]
    ]

    owner = serve_all(loop, seqs)
    assert not owner.errors
    check_against_reference(owner, seqs)
    assert owner.reasons["b"] == "stop" and len(owner.tokens["b"]) == 4
    assert loop.scheduler.preemptions > 0
    assert loop.group.seqs == {}  # every ended request was released on the workers
    assert loop.scheduler.pool.stats()["used"] == 0


class TimedGroup(FakeWorkerGroup):
    """The fake group, its step calls timed by a linear model instead of the clock; records each step call's
    (prompt tokens, decode rows)."""

    decode_s = 0.2
    token_s = 0.01

    def __init__(self, dp_rank: int) -> None:
        super().__init__(dp_rank)
        self.rounds: list[tuple[int, int]] = []

    async def call(self, method: str, *args):
        answers = await super().call(method, *args)
        if method == "step":
            tokens, decode, steps = sum(end - start for _, start, end in args[4]), args[5], args[6]
            answers[0]["seconds"] = self.decode_s * max(steps, 1 if tokens else 0) + self.token_s * tokens
            self.rounds.append((tokens, len(decode)))
        return answers


def test_the_loop_times_its_rounds_and_caps_the_prompt_tokens_that_stall_decoding() -> None:
    """A long prompt arriving while another request decodes rides in chunks of at most what 0.5 x a decode step
    allows (the cost model's 10 tokens), once the loop has measured both costs; tokens as if served alone."""
    group = TimedGroup(0)
    loop = GroupLoop(group, GroupScheduler(4, 80, 4, "continuous", 64, 4, max_decode_stall=0.5), sorted(EOS))
    short, long = make_seq("short", 6, 40), make_seq("long", 200, 3)

    async def main() -> Owner:
        await group.start()
        owner = Owner(loop)
        loop.scheduler.add(short)
        for _ in range(3):  # a prefill, then pure-decode calls
            await owner.round()
        loop.scheduler.add(long)
        await owner.run()
        return owner

    owner = asyncio.run(main())
    assert not owner.errors
    check_against_reference(owner, [short, long])
    assert loop.costs.decode_step_s == pytest.approx(TimedGroup.decode_s)
    assert loop.costs.prompt_token_s == pytest.approx(TimedGroup.token_s, rel=0.02)
    mixed = [tokens for tokens, decode in group.rounds if tokens and decode]
    # The first prefill's sample counts the fixed cost as tokens: smaller chunks first, growing to the model's 10
    # (the estimate approaches the true cost from above, so the cap approaches 10 from below).
    assert sum(mixed) == 200 and max(mixed) in (9, 10) and mixed[:-1] == sorted(mixed[:-1])


def test_admission_error_fails_that_request_only() -> None:
    loop = new_loop()
    seqs = [make_seq(name, 6, 7) for name in "pqr"]
    loop.group.reject["q"] = "request 'q' does not fit this rank"

    owner = serve_all(loop, seqs)
    assert owner.errors == {"q": "request 'q' does not fit this rank"}
    assert "q" not in owner.tokens
    check_against_reference(owner, seqs)
    assert set(owner.tokens) == {"p", "r"}
    assert loop.group.seqs == {} and loop.scheduler.pool.stats()["used"] == 0


def test_abort_while_its_call_runs_drops_its_tokens_and_releases_it_next() -> None:
    loop = new_loop()
    seqs = [make_seq(name, 6, 30) for name in "xy"]

    async def main() -> Owner:
        group = loop.group
        await group.start()
        owner = Owner(loop)
        for seq in seqs:
            loop.scheduler.add(seq)
        await owner.round()  # prefill: both decode from now on
        group.hold, group.entered = asyncio.Event(), asyncio.Event()
        call = asyncio.create_task(owner.round())
        await group.entered.wait()  # the decode call is in flight
        assert loop.scheduler.abort("x") is seqs[0]
        assert loop.scheduler.pool.held("x") == 0  # its blocks are free at once
        group.hold.set()
        await call
        assert len(owner.tokens["x"]) == 1  # the in-flight call's tokens for it were dropped
        group.hold = group.entered = None
        plan_releases = []
        original = loop.scheduler.schedule

        def schedule():
            plan = original()
            plan_releases.extend(plan.releases)
            return plan

        loop.scheduler.schedule = schedule
        await owner.round()
        assert plan_releases == ["x"] and "x" not in group.seqs
        await owner.run()
        return owner

    owner = asyncio.run(main())
    check_against_reference(owner, seqs[1:])
    assert loop.group.seqs == {}


def test_dead_rank_propagates_as_group_failure() -> None:
    loop = new_loop(max_running=2, budget=16)
    loop.group.strategies = [None, None]  # tp 2
    seqs = [make_seq(name, 5, 8) for name in "ijk"]

    async def main() -> None:
        await loop.group.start()
        owner = Owner(loop)
        for seq in seqs:
            loop.scheduler.add(seq)
        await owner.round()
        loop.group.die(1)
        with pytest.raises(GroupFailure, match=r"shard-worker-1 \(rank 1\) of dp group 0 died"):
            await owner.round()
        out = loop.scheduler.take_all()
        assert [s.request_id for s in out] == ["k", "i", "j"]  # waiting first, then running
        assert [s.state.value for s in out] == ["waiting", "decoding", "decoding"]

    asyncio.run(main())


# ----------------------------------------------------------------------------- through the Coordinator
class NoPlacement:
    def strategy(self, index: int) -> None:
        return None

    def remove(self) -> None:
        pass


def coordinator(model_path: Path, dp_size: int, max_batch_size: int, restarts: int) -> Coordinator:
    worker = WorkerConfig(str(model_path), "cpu", "float32", "eager", "tp", max_batch_size, 256)
    cfg = EngineConfig(
        worker, tp_size=1, dp_size=dp_size, worker_options={}, namespace="test", input_max_len=200,
        max_images_per_prompt=1, max_group_restarts=restarts,
    )  # fmt: skip
    return Coordinator(cfg, NoPlacement(), list(range(dp_size)), group_factory=FakeWorkerGroup)


def requests(n: int, max_new_tokens: int) -> list[dict]:
    return [
        {"id": f"r{i}", "prompt": f"request {i}", "max_new_tokens": max_new_tokens, "ignore_eos": True}
        for i in range(n)
    ]


def all_queued(coord: Coordinator, n: int) -> asyncio.Event:
    """An event set once `n` requests have been queued on groups."""
    event, enqueue, count = asyncio.Event(), coord.enqueue, [0]

    def counting(seq: Sequence) -> None:
        enqueue(seq)
        count[0] += 1
        if count[0] == n:
            event.set()

    coord.enqueue = counting
    return event


def expected(coord: Coordinator, request: dict) -> list[int]:
    prompt = coord.builder.build(request).input_ids
    return reference(list(prompt), request["max_new_tokens"], set())[0]


def test_dead_group_fails_running_requests_and_moves_waiting_ones(tiny_checkpoint: Path) -> None:
    async def main() -> None:
        coord = coordinator(tiny_checkpoint, dp_size=2, max_batch_size=2, restarts=0)
        await coord.setup()
        dying, other = coord.engines[0].group, coord.engines[1].group
        for group in (dying, other):
            group.hold, group.entered = asyncio.Event(), asyncio.Event()
        reqs = requests(8, 6)
        queued = all_queued(coord, len(reqs))
        done = asyncio.create_task(coord.generate(reqs))
        await queued.wait()
        await dying.entered.wait()  # its first call is in flight
        running = {s.payload.record["id"] for s in coord.engines[0].scheduler.running}
        waiting = {s.payload.record["id"] for s in coord.engines[0].scheduler.waiting}
        assert running and waiting
        dying.die(0)
        dying.hold.set()
        other.hold.set()
        records = {r["id"]: r for r in await done}
        for rid in running:
            assert "shard-worker-0 (rank 0) of dp group 0 died" in records[rid]["error"]
        for request in reqs:
            if request["id"] not in running:  # waiting ones moved to group 1 and ran there
                record = records[request["id"]]
                assert record["error"] is None and record["dp_rank"] == 1
                assert record["output_token_ids"] == expected(coord, request)
        assert coord.status()["live_groups"] == 1
        await coord.shutdown()

    asyncio.run(main())


def test_rebuilt_group_serves_the_requests_that_waited_for_it(tiny_checkpoint: Path) -> None:
    async def main() -> None:
        coord = coordinator(tiny_checkpoint, dp_size=1, max_batch_size=2, restarts=1)
        await coord.setup()
        group = coord.engines[0].group
        hold = group.hold = asyncio.Event()
        group.entered = asyncio.Event()
        reqs = requests(5, 5)
        queued = all_queued(coord, len(reqs))
        done = asyncio.create_task(coord.generate(reqs))
        await queued.wait()
        await group.entered.wait()  # the first call is in flight
        running = {s.payload.record["id"] for s in coord.engines[0].scheduler.running}
        assert running == {"r0"} and coord.status()["waiting"] == 4
        group.hold = None  # the rebuilt group's calls run straight through
        group.die(0)
        hold.set()
        records = {r["id"]: r for r in await asyncio.wait_for(done, 60)}
        assert group.starts == 2  # rebuilt once
        for request in reqs:
            record = records[request["id"]]
            if request["id"] in running:
                assert "died" in record["error"]
            else:
                assert record["error"] is None, record["error"]
                assert record["output_token_ids"] == expected(coord, request)
        assert coord.status() == {"live_groups": 1, "dp_size": 1, "waiting": 0, "running": 0}
        await coord.shutdown()

    asyncio.run(main())


class ScriptedSteps(StepsPerCall):
    """Auto steps per call whose answers follow a script; remembers the estimates it was asked with."""

    def __init__(self, script: list[int]) -> None:
        super().__init__("auto", max_call_ms=1000)
        self.script = list(script)
        self.asked: list[StepCosts] = []

    def steps(self, costs: StepCosts) -> int:
        self.asked.append(dataclasses.replace(costs))
        return self.script[min(len(self.asked) - 1, len(self.script) - 1)]


class SlowCallGroup(FakeWorkerGroup):
    """Fake workers behind a slow transport: each call costs 10 ms beyond the workers' own time."""

    async def call(self, method: str, *args: Any, **kw: Any) -> list:
        await asyncio.sleep(0.01)
        return await super().call(method, *args, **kw)


def test_steps_per_call_sets_each_pure_decode_call_from_the_measured_costs() -> None:
    """Before each round the loop asks its StepsPerCall, with the step costs its calls measured so far."""
    steps = ScriptedSteps([3, 3, 7, 50])  # asked before every round: the first is the prefill round's
    scheduler = GroupScheduler(2, 64, 4, "continuous", 64, 1)
    loop = GroupLoop(SlowCallGroup(0, step_time_s=0.001), scheduler, sorted(EOS), steps)
    seqs = [make_seq("a", 5, 40), make_seq("c", 7, 40)]
    owner = serve_all(loop, seqs)
    check_against_reference(owner, seqs)
    decode_calls = [n for kind, n, _, _ in loop.group.calls if kind == "decode" and n]  # (0: a release-only call)
    # The first token comes from the prefill round; then 3, 7, and the rest (50 is more than the 29 left).
    assert decode_calls == [3, 7, 40 - 1 - 3 - 7]
    first, after = steps.asked[1], steps.asked[2]  # before and after the first pure-decode call
    assert first.decode_step_s is None and first.overhead_s is None
    assert after.decode_step_s >= 0.001 and after.overhead_s >= 0.009  # the transport's 10 ms is overhead


class EagerRoundGroup(TimedGroup):
    """TimedGroup as on an accelerator: a step call with prompt chunks runs the eager packed forward, whose fixed
    cost is twice a captured decode step's, plus its prompt tokens."""

    round_s = 0.4
    token_s = 0.002

    async def call(self, method: str, *args):
        answers = await super().call(method, *args)
        if method == "step" and args[4]:
            answers[0]["seconds"] = self.round_s + self.token_s * sum(end - start for _, start, end in args[4])
        return answers


def test_a_round_costing_more_than_a_decode_step_keeps_the_cap_at_what_the_stall_allows() -> None:
    """A long prompt beside a decoding request rides, round after round, in chunks of what 0.5 x a decode step of
    prompt tokens costs (50 tokens), though every round with a chunk also pays a fixed cost above a decode step."""
    group = EagerRoundGroup(0)
    loop = GroupLoop(group, GroupScheduler(4, 400, 4, "continuous", 64, 4, max_decode_stall=0.5), sorted(EOS))
    short, long = make_seq("short", 6, 300), make_seq("long", 1000, 3)

    async def main() -> Owner:
        await group.start()
        owner = Owner(loop)
        loop.scheduler.add(short)
        for _ in range(3):  # a prefill, then pure-decode calls
            await owner.round()
        loop.scheduler.add(long)
        await owner.run()
        return owner

    owner = asyncio.run(main())
    assert not owner.errors
    check_against_reference(owner, [short, long])
    allowance = 0.5 * EagerRoundGroup.decode_s / EagerRoundGroup.token_s
    mixed = [tokens for tokens, decode in group.rounds if tokens and decode]
    assert sum(mixed) == 1000 and len(mixed) <= 1000 / allowance + 2, mixed
    assert all(tokens >= 0.9 * allowance for tokens in mixed[1:-1]), mixed  # the first: from the prefill's estimate
    assert loop.costs.prompt_token_s == pytest.approx(EagerRoundGroup.token_s)
    assert 0.9 * allowance <= loop.scheduler.prefill_cap <= allowance
