"""One DP group's rounds: ask the scheduler for a plan, run it on the group's workers, report what came back.

A round is one plan of the group's `GroupScheduler`: vision encode of the plan's items (images, or
slices of a video, of admitted requests, within the round's encoder budget; the workers keep the
embeddings until the request starts), then one `step` call on every rank (releases, preemptions,
admissions, the choices forked from a prompt's last chunk, block tables, then a packed forward of
prompt chunks and decode tokens, or a few pure-decode steps). The loop applies the forward's
progress to the scheduler (`prefilled`) and hands the new tokens and the failures to its owner,
which decides how each request goes on: the end of a request (EOS, length, a stop string, an abort)
is decided there, once, and comes back through `GroupScheduler.finish`/`abort`, whose releases reach
the workers at the start of the next round.
Each step call's times also update the group's step-cost estimates (actors/step_costs.py), which size
the scheduler's prompt tokens per round and the steps of the next pure-decode call (actors/steps_per_call.py).

The worker group is anything with `dp_rank` and `async call(method, *args)` returning rank 0's answer
first (actors/groups.WorkerGroup through Ray; tests pass a fake). Each sequence's payload must carry
`prepared` (a PreparedRequest) and `params` (SamplingParams).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from actors import clock
from actors.groups import CallError, retrieve_exception
from actors.scheduler import DECODING, GroupScheduler, Plan, Sequence
from actors.spec_gate import SpecGate
from actors.step_costs import StepCosts
from actors.steps_per_call import StepsPerCall
from actors.table_updates import TableUpdates
from actors.vision_items import VisionItem
from model.processor import PreparedRequest


def items_request(prepared: PreparedRequest, items: list[VisionItem]) -> PreparedRequest:
    """The request holding only the pixels of `items`, consecutive items of its own: an image whole, a run of
    slices of a video as one input of that many temporal slices (its patches come slice by slice)."""
    grids, pixels = prepared.image_grid_thw, prepared.pixel_values
    if grids is None or pixels is None or not items:
        raise ValueError(f"request {prepared.request_id!r}: no pixels for vision items {items}")
    sizes = [int(g.prod()) for g in grids]
    starts = list(itertools.accumulate(sizes, initial=0))

    def row(image: int, slice_: int) -> int:  # the first patch of a slice
        return starts[image] + slice_ * sizes[image] // int(grids[image][0])

    last = items[-1]
    parts = []
    for image, run in itertools.groupby(items, key=lambda item: item.image):
        slices = [item.slice for item in run]
        parts.append([slices[-1] + 1 - slices[0], int(grids[image][1]), int(grids[image][2])])
    return dataclasses.replace(
        prepared,
        pixel_values=pixels[row(items[0].image, items[0].slice) : row(last.image, last.slice + 1)],
        image_grid_thw=torch.tensor(parts, dtype=grids.dtype),
        second_per_grid_ts=None,  # the tower has no time axis
    )


@dataclass
class Round:
    """What one round did: the plan it started, and the outcome of the call that returned in it (the same
    plan's, or with lookahead the previous one's): new tokens, failures, phase times."""

    plan: Plan
    outputs: list[tuple[Sequence, dict]] = field(default_factory=list)  # (sequence, {"tokens", "times", ...})
    failed: list[tuple[Sequence, str]] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # vision_encode_s / prefill_s / decode_s
    vision_cache: dict | None = None


@dataclass
class _Call:
    """A step call started and not yet returned."""

    plan: Plan
    chunks: list[tuple[Sequence, int, int]]  # the plan's chunks less those of requests whose encode failed
    involved: list[Sequence]
    answer: asyncio.Future  # rank 0's answer
    started: float  # clock.perf() when it was started


# With lookahead, the next call is planned once the running one is expected to end within this share of its
# length (plus twice the planning time): late enough that a request arriving during most of a step joins the
# next call, early enough that step-time noise rarely leaves the workers waiting for it.
PLAN_LEAD = 0.1
# And this much earlier again: an event loop's timer may fire up to a millisecond late (epoll's timeout is in
# whole milliseconds), and the loop learns that a call began only when the answer before it arrives. So calls
# shorter than about this never wait (a tiny model's steps of a millisecond are planned at once).
TIMER_SLACK_S = 0.001


class GroupLoop:
    """A DP group's workers and scheduler, and the state of its serving task.

    With `lookahead`, a round plans and starts the next step call while the previous one still runs, as
    long as that one is pure decode (GroupScheduler counts its tokens as in flight), and then returns the
    previous call's outcome: the workers go from one call to the next without waiting for the
    Coordinator, whose round (planning, the call, delivering tokens) overlaps the device step. The plan
    is made just before the running call is expected to end (`_until_due`), not as soon as it started,
    so that a request that arrives during a step starts in the next call rather than the one after. A
    call with prompt chunks returns before the next plan, which needs to know where each chunk got to.
    """

    def __init__(
        self,
        group: Any,
        scheduler: GroupScheduler,
        eos_token_ids: list[int],
        steps_per_call: StepsPerCall | None = None,
        lookahead: bool = False,
        spec_gate: SpecGate | None = None,
    ) -> None:
        self.group = group
        self.scheduler = scheduler
        # Pure-decode steps per call; None keeps the scheduler's own decode_steps_per_call.
        self.steps_per_call = steps_per_call
        self.lookahead = lookahead
        self.eos = list(eos_token_ids)
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.restarts = 0
        self.rebuild: asyncio.Task | None = None  # the one rebuild of this group in progress, if any
        self.in_round = False
        self.in_flight: _Call | None = None  # the step call started ahead of its outcome
        self.tables = TableUpdates()  # the block-table entries the workers hold
        self.costs = StepCosts()  # what sizes a round's prompt tokens and a pure-decode call's steps
        self.spec_gate = spec_gate  # whether a pure-decode call speculates (None: speculation is off)
        self.returned_at = 0.0  # clock.perf() when the last call's outcome came back (the next one began then)
        self.plan_s = 0.0  # moving average of a round's planning: from its start to its call written

    @property
    def dp_rank(self) -> int:
        return self.group.dp_rank

    @property
    def idle(self) -> bool:
        """Nothing to schedule and no call in flight."""
        return self.scheduler.idle and self.in_flight is None

    def drop_in_flight(self) -> None:
        """The group failed or is being rebuilt: forget the call in flight (its requests ended with the group's
        scheduler) and the block tables its workers held (fresh workers hold none)."""
        self.tables.forget()
        call, self.in_flight = self.in_flight, None
        if call is not None:
            call.answer.cancel()

    async def round(self, profile: bool = False) -> Round:
        """Plan and start one step call, and return the outcome of the call that returned. GroupFailure (a dead
        or hung rank) propagates; a rank that raised fails the requests of that call (in `Round.failed`)
        and the group goes on.

        Once `schedule()` has returned, the plan's releases and preemptions have happened in the scheduler,
        so the step call that tells the workers must run whatever else fails: a request whose images
        could not be encoded is failed alone and left out of the step, and the rest of the round runs.
        """
        assert not self.in_round, f"dp group {self.dp_rank}: a round started while another one runs"
        self.in_round = True
        try:
            return await self._round(profile)
        finally:
            self.in_round = False

    async def _round(self, profile: bool) -> Round:
        before = self.in_flight
        if before is not None and before.chunks:  # the next plan needs to know where its chunks got to
            self.in_flight = None
            return await self._returned(before, Round(Plan()))
        if before is not None:
            await self._until_due(before)
        planning = clock.perf()
        sched = self.scheduler
        if self.steps_per_call is not None:
            sched.decode_steps_per_call = self.steps_per_call.steps(self.costs)
        if self.spec_gate is not None:
            sched.spec_tokens = self.spec_gate.tokens(sum(s.state == DECODING for s in sched.running))
        result = Round(sched.schedule())
        call = await self._start(result, profile)
        if call is not None and not call.chunks:
            self.plan_s += 0.2 * (call.started - planning - self.plan_s)
        self.in_flight = call if self.lookahead else None
        if before is not None:
            return await self._returned(before, result)
        if call is not None and not self.lookahead:
            return await self._returned(call, result)
        return result  # with lookahead, the call's outcome comes with the next round

    async def _until_due(self, call: _Call) -> None:
        """Wait until `call` (a pure-decode call in flight) is expected to end within its lead, or until it
        returns if that comes first. It began on the workers when the call before it returned (or when it
        was started, if later), and runs its steps at the estimated decode step; the lead is PLAN_LEAD of
        that, twice the planning time and TIMER_SLACK_S. Without an estimate there is no wait. A wrong
        estimate costs little: too long, and the next call is planned after this one returned (the workers
        wait for one plan, as without lookahead); too short, and it is planned early (an arrival then waits
        one more step, as when planning at once)."""
        step = self.costs.decode_step_s
        if step is None or call.answer.done():
            return
        length = call.plan.decode_steps * step
        due = max(call.started, self.returned_at) + length - PLAN_LEAD * length - 2 * self.plan_s - TIMER_SLACK_S
        wait = due - clock.perf()
        if wait > 0:
            await asyncio.wait({call.answer}, timeout=wait)

    async def _start(self, result: Round, profile: bool) -> _Call | None:
        """Encode the plan's vision items, then start its step call (None: nothing to run)."""
        plan = result.plan
        encode = []
        for seq, first, end in plan.encode:
            prepared = dataclasses.replace(seq.payload.prepared, request_id=seq.request_id)
            encode.append((seq, items_request(prepared, seq.vision_items[first:end])))
        unencoded = await self._encode(result, encode, profile) if encode else set()
        admit = [seq for seq in plan.admit if seq.request_id not in unencoded]
        plan_chunks = [c for c in plan.chunks if c[0].request_id not in unencoded]
        forked = [(parent, child, copy) for parent, child, copy in plan.forks if parent.request_id not in unencoded]
        skip = unencoded | {child.request_id for parent, child, _ in plan.forks if parent.request_id in unencoded}
        if not (plan.releases or plan.preempted or admit or plan_chunks or plan.decode):
            return None
        admissions = [
            (
                dataclasses.replace(seq.payload.prepared, request_id=seq.request_id, pixel_values=None),
                seq.payload.params,
                self.eos,
                seq.num_cached,
            )
            for seq in admit
        ]
        chunks = [(seq.request_id, start, end) for seq, start, end in plan_chunks]
        decode = [seq.request_id for seq in plan.decode]
        tables = self.tables.updates(plan, skip)
        forks = [(parent.request_id, child.request_id, child.payload.params, copy) for parent, child, copy in forked]
        args = (plan.releases, plan.preempted, admissions, tables, chunks, decode, plan.decode_steps, profile, forks)
        if plan.spec_tokens:
            args += (plan.spec_tokens,)
        answer = asyncio.ensure_future(self._rank0("step", *args))  # starts the call before this returns
        answer.add_done_callback(retrieve_exception)
        involved = admit + [seq for seq, _, _ in plan_chunks] + plan.decode + [child for _, child, _ in forked]
        await asyncio.sleep(0)  # let the call start: the workers run calls in the order they started
        return _Call(plan, plan_chunks, involved, answer, clock.perf())

    async def _returned(self, call: _Call, result: Round) -> Round:
        """Wait for `call` and add its outcome to `result`: progress to the scheduler, tokens and failures."""
        sched = self.scheduler
        try:
            out = await call.answer
        except CallError as e:
            seen = set()
            for seq in call.involved:
                if seq.request_id not in seen:
                    seen.add(seq.request_id)
                    result.failed.append((seq, str(e)))
            return result
        returned = self.returned_at = clock.perf()
        plan, chunks = call.plan, call.chunks
        result.phases["prefill_s" if chunks else "decode_s"] = out["seconds"]
        ran = max((len(o["tokens"]) for o in out["outputs"].values()), default=0) if plan.decode else 0
        if plan.decode and not chunks and self.spec_gate is not None:
            made = sum(len(o["tokens"]) for o in out["outputs"].values())
            self.spec_gate.observe(len(plan.decode), bool(plan.spec_tokens), out["seconds"], made)
        if plan.spec_tokens:  # a step of the costs is a verification round
            ran = min(ran, plan.decode_steps)
        prompt_tokens = sum(end - start for _, start, end in chunks)
        # A call's round trip beyond the workers' time is its overhead, which sizes multi-step calls; with
        # lookahead a call waits behind the one before it, has no round trip of its own, and runs one step.
        self.costs.observe(out["seconds"], ran, prompt_tokens, None if self.lookahead else returned - call.started)
        sched.set_step_costs(self.costs.decode_step_s, self.costs.prompt_token_s)
        failed = set(out["errors"])
        for seq in call.involved:
            if seq.request_id in failed:
                result.failed.append((seq, out["errors"][seq.request_id]))
        for seq, _, end in chunks:
            if seq.request_id not in failed and seq.request_id in sched.by_id:
                sched.prefilled(seq, end)
        for request_id, tokens in out["outputs"].items():
            seq = sched.by_id.get(request_id)
            if seq is not None:  # else it ended while the call ran
                result.outputs.append((seq, tokens))
        sched.returned(plan, {r: len(o["tokens"]) for r, o in out["outputs"].items()})
        return result

    async def _encode(self, result: Round, encode: list[tuple[Sequence, PreparedRequest]], profile: bool) -> set[str]:
        """Vision encode of the plan's items; the ids of the requests whose items failed (each failed in
        `result.failed`, whether the workers would start it in this round or a later one). When the call for
        all of them raises, each request's items are encoded alone (a call that raises keeps nothing), so
        that one bad input fails its own request only. GroupFailure propagates."""
        outs, failed = [], []
        try:
            outs.append(await self._rank0("encode", [sub for _, sub in encode], profile))
        except CallError as e:
            if len(encode) == 1:
                failed.append((encode[0][0], str(e)))
            else:
                for seq, sub in encode:  # each alone, so that one bad input fails its own request only
                    try:
                        outs.append(await self._rank0("encode", [sub], profile))
                    except CallError as alone:
                        failed.append((seq, str(alone)))
        result.failed.extend(failed)
        if outs:
            result.phases["vision_encode_s"] = sum(out["seconds"] for out in outs)
            result.vision_cache = outs[-1].get("cache") or None  # the worker's running totals
        return {seq.request_id for seq, _ in failed}

    async def _rank0(self, method: str, *args: Any) -> dict:
        """Rank 0's answer to a call on every rank (CallError and GroupFailure propagate)."""
        return (await self.group.call(method, *args))[0]
