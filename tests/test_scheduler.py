"""The per-group scheduler as a pure state machine, driven by a fake executor (no Ray, no model).

The fake executor plays the workers' part: it keeps each slot's fill length, turns a plan's chunks
into prefilled prompts (a first token when a prompt completes) and gives every decoding request one
token per decode step until its output length is reached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from actors.scheduler import DECODING, FINISHED, PREFILLING, WAITING, GroupScheduler, Sequence


@dataclass
class FakeExecutor:
    """Workers that produce `lengths[id]` tokens per request; logs what each round ran."""

    lengths: dict[str, int]
    slots: dict[int, str] = field(default_factory=dict)
    produced: dict[str, int] = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)

    def round(self, sched: GroupScheduler) -> None:
        plan = sched.schedule()
        for slot in plan.releases:
            self.slots.pop(slot, None)
        for seq in plan.admit:
            assert seq.slot not in self.slots, "a slot was given twice"
            self.slots[seq.slot] = seq.request_id
        log = {
            "admit": [s.request_id for s in plan.admit],
            "releases": list(plan.releases),
            "chunks": [(s.request_id, a, b) for s, a, b in plan.chunks],
            "decoded": [],
        }
        for seq, _, end in plan.chunks:
            sched.prefilled(seq, end)
            if end == seq.prompt_len:
                self._token(sched, seq)
        for _ in range(sched.decode_steps()):
            for seq in [s for s in sched.running if s.state == DECODING]:
                log["decoded"].append(seq.request_id)
                self._token(sched, seq)
        self.rounds.append(log)

    def _token(self, sched: GroupScheduler, seq: Sequence) -> None:
        self.produced[seq.request_id] = self.produced.get(seq.request_id, 0) + 1
        if self.produced[seq.request_id] >= self.lengths[seq.request_id]:
            self.slots.pop(seq.slot, None)
            sched.finish(seq, "length")
            self.finished.append(seq.request_id)

    def run(self, sched: GroupScheduler, max_rounds: int = 1000) -> None:
        for _ in range(max_rounds):
            if sched.idle:
                return
            self.round(sched)
        raise AssertionError("the scheduler did not drain")


def _sched(slots: int = 2, policy: str = "continuous", chunk: int = 100, steps: int = 1) -> GroupScheduler:
    return GroupScheduler(slots, policy, chunk, steps)


def test_fcfs_admission_into_lowest_free_slot_and_slot_freed_at_once():
    sched = _sched(slots=2)
    ex = FakeExecutor({"a": 1, "b": 5, "c": 3})
    for rid in "abc":
        sched.add(Sequence(rid, prompt_len=4))
    ex.round(sched)
    assert ex.rounds[0]["admit"] == ["a", "b"]
    assert [s.slot for s in (sched.by_id.get("b"),)] == [1]
    assert "a" in ex.finished  # one token: done at its prefill, slot 0 free at once
    ex.round(sched)
    assert ex.rounds[1]["admit"] == ["c"]
    assert sched.by_id["c"].slot == 0  # the lowest free slot
    ex.run(sched)
    assert sorted(ex.finished) == ["a", "b", "c"] and sched.idle


def test_every_request_finishes_in_arrival_order_of_admission():
    sched = _sched(slots=3, steps=2)
    lengths = {f"r{i}": 1 + (i * 7) % 11 for i in range(20)}
    ex = FakeExecutor(lengths)
    for rid in lengths:
        sched.add(Sequence(rid, prompt_len=5 + int(rid[1:])))
    ex.run(sched)
    admitted = [rid for r in ex.rounds for rid in r["admit"]]
    assert admitted == list(lengths)  # first come, first served: no request starves
    assert sorted(ex.finished) == sorted(lengths)
    assert all(ex.produced[rid] == n for rid, n in lengths.items())


def test_long_prompt_is_chunked_and_running_requests_decode_between_chunks():
    sched = _sched(slots=2, chunk=16)
    ex = FakeExecutor({"short": 50, "long": 2})
    sched.add(Sequence("short", prompt_len=8))
    ex.round(sched)  # short prefilled whole, decodes
    sched.add(Sequence("long", prompt_len=40))
    for _ in range(3):
        ex.round(sched)
    chunks = [c for r in ex.rounds[1:] for c in r["chunks"]]
    assert chunks == [("long", 0, 16), ("long", 16, 32), ("long", 32, 40)]
    # The running request decoded in every round while the long prompt was being prefilled.
    assert all("short" in r["decoded"] for r in ex.rounds[1:4])


def test_one_admission_is_prefilled_together_within_the_budget():
    sched = _sched(slots=4, chunk=20)
    ex = FakeExecutor(dict.fromkeys("abcd", 3))
    for rid, n in zip("abcd", (5, 6, 7, 30)):
        sched.add(Sequence(rid, prompt_len=n))
    ex.round(sched)
    assert ex.rounds[0]["chunks"] == [("a", 0, 5), ("b", 0, 6), ("c", 0, 7), ("d", 0, 2)]
    assert sched.by_id["d"].state == PREFILLING and sched.by_id["d"].filled == 2


def test_static_policy_admits_only_into_an_empty_group():
    sched = _sched(slots=2, policy="static")
    ex = FakeExecutor({"a": 1, "b": 6, "c": 1})
    for rid in "abc":
        sched.add(Sequence(rid, prompt_len=300))  # no chunking under static
    ex.round(sched)
    assert ex.rounds[0]["chunks"] == [("a", 0, 300), ("b", 0, 300)]
    while "b" not in ex.finished:
        ex.round(sched)
        assert "c" not in [rid for r in ex.rounds for rid in r["admit"]], "c admitted while b ran"
    ex.run(sched)
    assert ex.finished == ["a", "b", "c"]


def test_abort_waiting_and_running():
    sched = _sched(slots=1)
    ex = FakeExecutor({"a": 100, "b": 100, "c": 1})
    for rid in "abc":
        sched.add(Sequence(rid, prompt_len=3))
    ex.round(sched)
    waiting = sched.abort("b")
    assert waiting is not None and waiting.state == FINISHED and waiting.finish_reason == "abort"
    running = sched.abort("a", reason="stop")
    assert running is not None and running.finish_reason == "stop" and sched.slots == [None]
    plan = sched.schedule()
    assert plan.releases == [0] and [s.request_id for s in plan.admit] == ["c"]
    assert sched.abort("nope") is None


def test_take_all_returns_waiting_then_running_and_empties_the_group():
    sched = _sched(slots=1)
    for rid in "ab":
        sched.add(Sequence(rid, prompt_len=3))
    sched.schedule()
    taken = sched.take_all()
    assert [(s.request_id, s.state) for s in taken] == [("b", WAITING), ("a", PREFILLING)]
    assert sched.idle and sched.load == 0
    sched.add(taken[1])  # moved to another group: starts over there
    assert taken[1].state == WAITING and taken[1].filled == 0


def test_load_counts_waiting_and_running_and_duplicate_ids_fail():
    sched = _sched(slots=1)
    sched.add(Sequence("a", 3))
    sched.add(Sequence("b", 3))
    sched.schedule()
    assert sched.load == 2
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add(Sequence("a", 3))


@pytest.mark.parametrize("kwargs", [{"policy": "fifo"}, {"chunk": 0}, {"steps": 0}, {"slots": 0}])
def test_bad_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        _sched(**kwargs)
