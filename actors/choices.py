"""The choices of a request with n > 1: one RequestState per choice, one stream and one record for the request.

Choice i is a sequence of its own in the scheduler, id f"{key}/{i}" (`key` the request's key inside
the Coordinator): choice 0 prefills the prompt and the others fork from it (actors/scheduler.py).
Each has its own SamplingParams, seed + i as vLLM derives them, its own detokenizer and stop
strings, its own RequestState. Its stream items go out with "index": i; its final record is kept
here, and once every choice has ended the request's record goes out (`combined_record`). A choice
that fails or is aborted ends the others with it (the Coordinator's `end`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from actors.requests import RequestState


def choice_key(key: str, index: int) -> str:
    """The scheduler id of choice `index` of the request whose key is `key`."""
    return f"{key}/{index}"


def combined_record(finals: list[dict]) -> dict:
    """The record of a request from its choices' records, in index order: choice 0's fields (its text, token
    ids, finish_reason, latencies) with `choices` (actors.records.CHOICE_FIELDS per choice), `preemptions`
    summed over the choices and the first error of any choice (then no text)."""
    record = {k: v for k, v in finals[0].items() if k not in ("final", "error_status")}
    record["choices"] = [
        {
            "index": i,
            "text": f["output_text"],
            "token_ids": list(f["output_token_ids"]),
            "finish_reason": f["finish_reason"],
            "logprobs": f.get("logprobs"),
            **({"tool_calls": f["tool_calls"]} if f.get("tool_calls") is not None else {}),
        }
        for i, f in enumerate(finals)
    ]
    record["preemptions"] = sum(f.get("preemptions") or 0 for f in finals)
    failed = next((f for f in finals if f.get("error") is not None), None)
    if failed is not None:
        record.update(error=failed["error"], finish_reason=None, output_text="")
    return record


@dataclass
class Choices:
    """A request with n > 1 choices, as the Coordinator's callers see it: the same `key`, `queue`, `done`,
    `finished` and `acknowledgement` as a RequestState, its items those of its choices."""

    key: str
    request_id: str
    done: asyncio.Future
    emit: Callable[[dict], None] | None = None  # where the request's items go (default: `queue`)
    states: list[RequestState] = field(default_factory=list)  # one per choice, in index order
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    record: dict[str, Any] | None = None  # the request's record, once every choice has ended
    _finals: dict[int, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.emit is None:
            self.emit = self.queue.put_nowait

    @property
    def finished(self) -> bool:
        return self.done.done()

    def acknowledgement(self) -> dict:
        return {"id": self.request_id, "token_ids": [], "text": "", "accepted": True}

    def sink(self, index: int) -> Callable[[dict], None]:
        """Where choice `index`'s items go: its deltas out with their index, its final record kept."""

        def put(item: dict) -> None:
            if item.get("final"):
                self._ended(index, item)
            else:
                self.emit({**item, "index": index})

        return put

    def finish(self, finish_reason: str | None, error: str | BaseException | None = None) -> dict:
        """End every choice still open (an abort before the request was queued); the request's record."""
        for state in self.states:
            if not state.finished:
                state.finish(finish_reason, error)
        assert self.record is not None, f"request {self.key!r}: its choices ended without a record"
        return self.record

    def _ended(self, index: int, final: dict) -> None:
        self._finals[index] = final
        if len(self._finals) < len(self.states):
            return
        finals = [self._finals[i] for i in range(len(self.states))]
        self.record = combined_record(finals)
        self.done.set_result(self.record)
        status = next((f["error_status"] for f in finals if "error_status" in f), None)
        self.emit({**self.record, "final": True, **({} if status is None else {"error_status": status})})
