"""One request inside the Coordinator: its sampling settings, its tokens, its text so far, its record.

`RequestState.add_tokens` is the one place a request's tokens become text: an incremental
detokenizer turns the new ids into text that never ends in a broken UTF-8 character, and a stop
matcher cuts it at the first stop string to be complete and holds back an end that may still become
one. The Coordinator streams those deltas as they are; put together they are the record's output_text.
A request keeps its tokens up to the one that completed the stop string: those after it, generated in
the same call, are dropped from its token ids, its counts and its times, as from its text.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from actors import clock
from actors.detokenizer import IncrementalDetokenizer
from actors.errors import RequestError
from actors.records import fill_latencies, new_record
from actors.request_fields import SAMPLING_FIELDS, check_field
from actors.stop_strings import MAX_STOP_STRINGS, StopMatcher, check_stop_strings
from actors.tools_format import parse_calls
from model.processor import PreparedRequest
from model.sampling import SamplingParams

__all__ = ["MAX_STOP_STRINGS", "RequestState", "sampling_params", "stop_strings"]


def sampling_params(request: dict, defaults: SamplingParams) -> SamplingParams:
    """The request's SamplingParams: its own overrides on top of the run's defaults (RequestError names the key).

    Each override is checked by its field's rule (actors.request_fields), which holds SamplingParams' ranges.
    """
    overrides = {key: request[key] for key in SAMPLING_FIELDS if request.get(key) is not None}
    for key, value in overrides.items():
        check_field(key, value)
    if overrides.get("top_logprobs") and not overrides.get("logprobs"):
        raise RequestError(f"'top_logprobs'={overrides['top_logprobs']} needs 'logprobs': true", "top_logprobs")
    if "logit_bias" in overrides:
        overrides["logit_bias"] = tuple(sorted((int(t), float(b)) for t, b in overrides["logit_bias"].items()))
    try:
        return dataclasses.replace(defaults, **overrides)
    except ValueError as e:  # a range that depends on two fields (min_tokens <= max_new_tokens)
        raise RequestError(str(e), str(e).split("=", 1)[0]) from None


def stop_strings(request: dict) -> list[str]:
    """The request's stop strings (RequestError names 'stop')."""
    return check_stop_strings(request.get("stop"))


@dataclass
class RequestState:
    """A request from submission to its record."""

    key: str  # unique inside the Coordinator (ids given by users may repeat)
    prepared: PreparedRequest
    params: SamplingParams
    stop: list[str]
    record: dict[str, Any]
    decode_text: Any  # token ids -> text
    token_times: list[float] = field(default_factory=list)  # Unix time each token was delivered here
    device_times: list[float] = field(default_factory=list)  # Unix time each token was sampled on the workers
    parts: list[str] = field(default_factory=list)  # the text delivered so far, delta by delta
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    done: asyncio.Future | None = None
    emit: Callable[[dict], None] | None = None  # where its stream items go (default: `queue`)
    token_bytes: Callable[[int], tuple[str, list[int]]] | None = None  # logprobs' token text (model.logprobs)
    tools: dict[str, dict] | None = None  # functions whose <tool_call> blocks the record parses (tools_format)
    parent: Any = None  # the actors.choices.Choices of a request with n > 1 whose choice this is

    def __post_init__(self) -> None:
        if self.emit is None:
            self.emit = self.queue.put_nowait
        self.detokenizer = IncrementalDetokenizer(self.decode_text)
        self.matcher = StopMatcher(self.stop)

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
        emit: Callable[[dict], None] | None = None,
        token_bytes: Callable[[int], tuple[str, list[int]]] | None = None,
    ) -> RequestState:
        record = new_record(request_id, arrival_time)
        record["prompt_tokens"] = len(prepared.input_ids)
        if prepared.video_frames:
            record.update(
                video_frames=list(prepared.video_frames),
                video_decode_s=prepared.video_decode_s,
                video_tokens=prepared.video_tokens,
            )
        if params.logprobs:
            record["logprobs"] = []
        done = asyncio.get_running_loop().create_future()
        return cls(key, prepared, params, stop, record, decode_text, done=done, emit=emit, token_bytes=token_bytes)

    def acknowledgement(self) -> dict:
        """The item that says the request is queued (a stream's first with `ack`; `submit`'s answer)."""
        return {"id": self.record["id"], "token_ids": [], "text": "", "accepted": True}

    @property
    def finished(self) -> bool:
        return self.done is not None and self.done.done()

    def add_tokens(self, tokens: list[int], times: list[float], logprobs: list | None = None) -> tuple[dict, bool]:
        """Take a call's new tokens (their times, their logprobs entries) -> (stream item, whether a stop
        string ended the request).

        The item's `token_ids` are the tokens the request keeps: all of `tokens`, or when a stop string
        completed, those up to the one that completed it; the record's token ids, times and logprobs take
        the same, and the caller hands the scheduler the same. `text` is the delta of text now safe to show.
        A request that asked for logprobs has them in the item as in the record, one per kept token
        (model.logprobs.TokenBytes.record).
        """
        delivered = clock.wall()  # when the caller gets them: every token of a delivery counts at its time
        delta = self.matcher.feed(self.detokenizer.add(tokens))
        if self.matcher.stopped:
            kept = self.detokenizer.ids_for(self.matcher.end)
            tokens, times = tokens[:kept], times[:kept]
        self.record["output_token_ids"].extend(tokens)
        self.token_times.extend([delivered] * len(tokens))
        self.device_times.extend(times)
        if delta:
            self.parts.append(delta)
        item = {"id": self.record["id"], "token_ids": list(tokens), "text": delta}
        if self.params.logprobs:
            entries = [self.token_bytes.record(t, e) for t, e in zip(tokens, logprobs or [])]
            self.record["logprobs"].extend(entries)
            item["logprobs"] = entries
        return item, self.matcher.stopped

    def tail(self) -> dict | None:
        """The text still held back (an incomplete character, the start of a stop string) once the request
        ended without a stop string; None when there is none. A stop string completed by it still cuts it."""
        if self.matcher.stopped:
            return None
        text = self.matcher.feed(self.detokenizer.flush())
        if not self.matcher.stopped:
            text += self.matcher.release()
        if not text:
            return None
        self.parts.append(text)
        return {"id": self.record["id"], "token_ids": [], "text": text}

    def finish(self, finish_reason: str | None, error: str | BaseException | None = None) -> dict:
        """Close the record (latencies, text, reason) and hand it to whoever waits; returns it.

        Without an error, text still held back is streamed first (`tail`), so the stream's deltas put
        together are the record's output_text; a stop string completed by it makes a 'length' finish
        a 'stop'. `error` is a message or an exception (RequestError and its kin carry an HTTP
        `status`): the record's `error` is its message, and the stream's final item, and only it,
        carries `error_status` (the HTTP status for that error, 500 when the error has none).
        """
        record = self.record
        status = None
        if error is None:
            tail = self.tail()
            if tail is not None:
                self.emit(tail)
            if finish_reason == "length" and self.matcher.stopped:
                finish_reason = "stop"
        else:
            status = getattr(error, "status", 500)
        record["end_time"] = clock.wall()
        record["finish_reason"] = None if error is not None else finish_reason
        record["error"] = None if error is None else str(error)
        fill_latencies(record, self.token_times, self.device_times)
        record["output_text"] = "".join(self.parts) if error is None else ""
        if self.tools is not None and error is None:
            _, calls = parse_calls(record["output_text"], self.tools)
            record["tool_calls"] = calls
            if calls and finish_reason == "stop":
                record["finish_reason"] = "tool_calls"
        if self.done is not None and not self.done.done():
            self.done.set_result(record)
        final = {**record, "final": True}
        if status is not None:
            final["error_status"] = status
        self.emit(final)
        return record
