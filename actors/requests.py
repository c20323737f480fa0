"""One request inside the Coordinator: its sampling settings, its tokens, its text so far, its record.

`RequestState.add_tokens` turns new token ids into a text delta that never ends in a broken UTF-8
character and never shows a stop string (nor a prefix of one that may still complete); the
Coordinator streams those deltas and ends the request when a stop string appears.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any

from actors.records import fill_latencies, new_record
from model.processor import PreparedRequest
from model.sampling import SamplingParams

REQUEST_OVERRIDES = ("max_new_tokens", "temperature", "top_p", "seed", "ignore_eos")
MAX_STOP_STRINGS = 4
_MAX_SEED = 2**63 - 1


def sampling_params(request: dict, defaults: SamplingParams) -> SamplingParams:
    """The request's SamplingParams: its own overrides on top of the run's defaults (ValueError names the key)."""
    values = {key: getattr(defaults, key) for key in REQUEST_OVERRIDES}
    for key in REQUEST_OVERRIDES:
        value = request.get(key)
        if value is None:
            continue
        if key == "ignore_eos":
            if not isinstance(value, bool):
                raise ValueError(f"'ignore_eos' must be true or false, got {value!r}")
        elif key in ("max_new_tokens", "seed"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"'{key}' must be an integer, got {value!r}")
            if not (1 if key == "max_new_tokens" else 0) <= value <= _MAX_SEED:
                raise ValueError(f"'{key}'={value!r} must be >= {1 if key == 'max_new_tokens' else 0}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"'{key}' must be a finite number, got {value!r}")
        values[key] = value
    return SamplingParams(**values)  # checks the ranges


def stop_strings(request: dict) -> list[str]:
    stop = request.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"'stop' must be a non-empty string or a list of them, got {stop!r}")
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"'stop' has {len(stop)} strings, at most {MAX_STOP_STRINGS} are allowed")
    return stop


@dataclass
class RequestState:
    """A request from submission to its record."""

    key: str  # unique inside the Coordinator (ids given by users may repeat)
    prepared: PreparedRequest
    params: SamplingParams
    stop: list[str]
    record: dict[str, Any]
    decode_text: Any  # token ids -> text
    token_times: list[float] = field(default_factory=list)
    text: str = ""  # decoded so far
    sent: int = 0  # characters of `text` already streamed
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    done: asyncio.Future | None = None

    @classmethod
    def create(
        cls,
        key: str,
        request_id: str,
        prepared: PreparedRequest,
        params: SamplingParams,
        stop: list[str],
        decode_text: Any,
        arrival_time: float,
    ) -> RequestState:
        record = new_record(request_id, arrival_time)
        record["prompt_tokens"] = len(prepared.input_ids)
        return cls(key, prepared, params, stop, record, decode_text, done=asyncio.get_running_loop().create_future())

    @property
    def finished(self) -> bool:
        return self.done is not None and self.done.done()

    def add_tokens(self, tokens: list[int], times: list[float]) -> tuple[dict | None, bool]:
        """Take new tokens -> (stream item or None, whether a stop string ended the request)."""
        ids = self.record["output_token_ids"]
        ids.extend(tokens)
        self.token_times.extend(times)
        self.text = self.decode_text(ids)
        stopped = False
        visible = len(self.text)
        for s in self.stop:
            at = self.text.find(s)
            if at != -1 and at < visible:
                visible, stopped = at, True
        if stopped:
            self.text = self.text[:visible]
        else:
            while visible > self.sent and self.text[visible - 1] == "\ufffd":  # an incomplete UTF-8 character
                visible -= 1
            for s in self.stop:  # hold back a tail that may still become a stop string
                for n in range(min(len(s) - 1, visible - self.sent), 0, -1):
                    if self.text[visible - n : visible] == s[:n]:
                        visible -= n
                        break
        delta = self.text[self.sent : visible]
        self.sent = max(self.sent, visible)
        item = {"id": self.record["id"], "token_ids": list(tokens), "text": delta}
        return item, stopped

    def finish(self, finish_reason: str | None, error: str | None = None) -> dict:
        """Close the record (latencies, text, reason) and hand it to whoever waits; returns it."""
        record = self.record
        record["end_time"] = time.time()
        record["finish_reason"] = None if error is not None else finish_reason
        record["error"] = error
        fill_latencies(record, self.token_times)
        record["output_text"] = self.text if error is None else ""
        if self.done is not None and not self.done.done():
            self.done.set_result(record)
        self.queue.put_nowait({**record, "final": True})
        return record

    def tail(self) -> dict | None:
        """The text still held back (a partial stop-string prefix) once the request ended without a stop."""
        if self.sent >= len(self.text):
            return None
        item = {"id": self.record["id"], "token_ids": [], "text": self.text[self.sent :]}
        self.sent = len(self.text)
        return item
