"""The per-DP-group scheduler: a pure state machine over requests and KV slots (no Ray, no torch).

A request moves waiting -> prefilling -> decoding -> finished (or aborted at any point). Each call
to `schedule()` returns one `Plan` for the group's workers:

- `releases`: slots of aborted requests, freed before anything else runs;
- `admit`: waiting requests given a free slot (lowest index first, so the decode batch stays a
  short prefix of the slots), first come first served;
- `chunks`: prompt pieces to prefill, at most `prefill_chunk_tokens` tokens in all, oldest
  admission first, so a long prompt is split and the running requests decode between its chunks;

after which `decode_steps()` says how many decode steps the decoding requests take before the
next plan (asked after the chunks' results are applied, so a request whose prompt just finished
decodes in the same round).

Policy "continuous" admits whenever a slot is free. Policy "static" admits only into an empty
group and fills it, then runs that batch to completion: the batch engine's behaviour, kept for
comparison.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

WAITING, PREFILLING, DECODING, FINISHED = "waiting", "prefilling", "decoding", "finished"


@dataclass
class Sequence:
    """One request as the scheduler sees it; `payload` is the caller's (never read here)."""

    request_id: str
    prompt_len: int
    payload: Any = None
    state: str = WAITING
    slot: int | None = None
    filled: int = 0  # prompt tokens prefilled so far
    finish_reason: str | None = None


@dataclass
class Plan:
    releases: list[int] = field(default_factory=list)
    admit: list[Sequence] = field(default_factory=list)
    chunks: list[tuple[Sequence, int, int]] = field(default_factory=list)  # (sequence, start, end)


class GroupScheduler:
    """Slots, waiting queue and budgets of one DP group."""

    def __init__(
        self,
        num_slots: int,
        policy: str = "continuous",
        prefill_chunk_tokens: int = 2048,
        decode_steps_per_call: int = 1,
    ) -> None:
        if policy not in ("continuous", "static"):
            raise ValueError(f"policy={policy!r} must be 'continuous' or 'static'")
        if num_slots < 1 or prefill_chunk_tokens < 1 or decode_steps_per_call < 1:
            raise ValueError("num_slots, prefill_chunk_tokens and decode_steps_per_call must be >= 1")
        self.policy = policy
        self.chunk_tokens = prefill_chunk_tokens
        self.steps_per_call = decode_steps_per_call
        self.slots: list[Sequence | None] = [None] * num_slots
        self.waiting: deque[Sequence] = deque()
        self.pending_releases: list[int] = []
        self.by_id: dict[str, Sequence] = {}

    # ----------------------------------------------------------------------------- queries
    @property
    def running(self) -> list[Sequence]:
        """Requests holding a slot, in slot order."""
        return [s for s in self.slots if s is not None]

    @property
    def load(self) -> int:
        """Waiting plus running requests: what 'least loaded' compares."""
        return len(self.waiting) + len(self.running)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running and not self.pending_releases

    # ----------------------------------------------------------------------------- events
    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.by_id:
            raise ValueError(f"request id {seq.request_id!r} is already scheduled")
        seq.state, seq.slot, seq.filled, seq.finish_reason = WAITING, None, 0, None
        self.waiting.append(seq)
        self.by_id[seq.request_id] = seq

    def abort(self, request_id: str, reason: str = "abort") -> Sequence | None:
        """End a request wherever it is; a slot it held is released with the next plan."""
        seq = self.by_id.pop(request_id, None)
        if seq is None:
            return None
        if seq.state == WAITING:
            self.waiting.remove(seq)
        elif seq.slot is not None:
            self.slots[seq.slot] = None
            self.pending_releases.append(seq.slot)
        seq.state, seq.finish_reason, seq.slot = FINISHED, reason, None
        return seq

    def take_all(self) -> list[Sequence]:
        """Remove and return every request (waiting first, then running): the group has failed."""
        out = list(self.waiting) + self.running
        self.waiting.clear()
        self.slots = [None] * len(self.slots)
        self.pending_releases.clear()
        self.by_id.clear()
        return out

    def prefilled(self, seq: Sequence, end: int) -> None:
        """A chunk ending at prompt position `end` was prefilled; the last one yields the first token."""
        seq.filled = end
        if end >= seq.prompt_len:
            seq.state = DECODING

    def finish(self, seq: Sequence, reason: str) -> None:
        """The workers ended this request (EOS or length): its slot is free at once."""
        if self.by_id.pop(seq.request_id, None) is None:
            return
        if seq.slot is not None:
            self.slots[seq.slot] = None
        seq.state, seq.finish_reason, seq.slot = FINISHED, reason, None

    # ----------------------------------------------------------------------------- planning
    def schedule(self) -> Plan:
        plan = Plan(releases=self.pending_releases)
        self.pending_releases = []
        free = [i for i, s in enumerate(self.slots) if s is None]
        may_admit = self.policy == "continuous" or not self.running
        while may_admit and free and self.waiting:
            seq = self.waiting.popleft()
            seq.slot, seq.state, seq.filled = free.pop(0), PREFILLING, 0
            self.slots[seq.slot] = seq
            plan.admit.append(seq)
        budget = self.chunk_tokens if self.policy == "continuous" else float("inf")
        prefilling = sorted((s for s in self.running if s.state == PREFILLING), key=self._admission_order)
        for seq in prefilling:
            if budget <= 0:
                break
            end = int(min(seq.prompt_len, seq.filled + budget))
            plan.chunks.append((seq, seq.filled, end))
            budget -= end - seq.filled
        return plan

    def decode_steps(self) -> int:
        """Decode steps to run now: the configured count while any request decodes, else 0."""
        return self.steps_per_call if any(s.state == DECODING for s in self.running) else 0

    def _admission_order(self, seq: Sequence) -> int:
        return list(self.by_id).index(seq.request_id)
