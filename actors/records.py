"""The request record: one dict per request, the same for the Coordinator, the report and the tests.

Latencies are seconds from the request's arrival at the Coordinator. The `*_time` fields are Unix
timestamps (seconds), so that records from several processes line up on one wall clock: the report
draws its request timeline from them.
"""

from __future__ import annotations

from typing import Any

# Field -> meaning. Every record has every field; fields that do not apply are None (or empty).
RECORD_FIELDS: dict[str, str] = {
    "id": "request id (str)",
    "output_token_ids": "generated token ids, EOS included when it ended the request",
    "output_text": "the generated text (a stop string that ended the request is cut off)",
    "prompt_tokens": "prompt length in tokens, image tokens included",
    "video_frames": "frames sampled from each of its videos, in order (empty without videos)",
    "video_decode_s": "seconds spent decoding and sampling its videos (None without videos)",
    "video_tokens": "prompt tokens that stand for its videos' frames",
    "ttft_s": "arrival to first token",
    "tpot_s": "(e2e - ttft) / (output tokens - 1)",
    "e2e_s": "arrival to last token",
    "queue_s": "arrival to first scheduling on a DP group",
    "itl_s": "gaps between successive tokens as delivered by the Coordinator (tokens of one delivery: 0)",
    "device_itl_s": "gaps between successive tokens as sampled on the workers (their step clock)",
    "error": "why the request failed, or None",
    "finish_reason": "'stop' (EOS or a stop string), 'tool_calls' (it ended with parsed tool_calls), 'length', "
    "'abort', or None on error",
    "tool_calls": "with tools: the calls parsed from the output (OpenAI's tool_calls, arguments as JSON text)",
    "dp_rank": "the DP group that served it",
    "cached_tokens": "prompt tokens whose KV came from the prefix cache (at its first scheduling)",
    "preemptions": "times it was preempted (its KV freed, recomputed later) for lack of KV blocks",
    "logprobs": "per output token {token, logprob, bytes, top_logprobs}, when the request asked; else None",
    "spec_proposed_tokens": "tokens proposed for it by speculative decoding (0 when off, or for rows that do not "
    "speculate: grammar, penalties, logprobs)",
    "spec_accepted_tokens": "of those, the ones the target accepted",
    "spec_rounds": "speculative rounds with proposals (mean acceptance length = 1 + accepted / rounds)",
    "spec_by_position": "[proposed, accepted] at each position 1..k of its rounds",
    "arrival_time": "Unix time the Coordinator received it",
    "scheduled_time": "Unix time it was first scheduled (vision encode / prefill began)",
    "first_token_time": "Unix time of its first token",
    "end_time": "Unix time it finished (last token, abort or failure)",
}


# A record of a request with n > 1 has one more field, "choices": one entry per choice, in index order,
# with these fields; its other fields are choice 0's (actors/choices.py). Records with n = 1 have no "choices".
CHOICE_FIELDS: dict[str, str] = {
    "index": "the choice's index, 0..n-1 (it was sampled with seed + index)",
    "text": "its generated text (a stop string that ended it is cut off)",
    "token_ids": "its generated token ids",
    "finish_reason": "as the record's: 'stop', 'tool_calls', 'length', 'abort', or None on error",
    "logprobs": "per output token, when the request asked; else None",
    "tool_calls": "with tools only: the calls parsed from its text",
}


def new_record(request_id: str | None, arrival_time: float | None = None) -> dict[str, Any]:
    """A record with every field present and nothing measured yet."""
    record: dict[str, Any] = dict.fromkeys(RECORD_FIELDS)
    record.update(
        id=request_id,
        output_token_ids=[],
        output_text="",
        prompt_tokens=0,
        video_frames=[],
        video_tokens=0,
        itl_s=[],
        device_itl_s=[],
        arrival_time=arrival_time,
        cached_tokens=0,
        preemptions=0,
        spec_proposed_tokens=0,
        spec_accepted_tokens=0,
        spec_rounds=0,
        spec_by_position=[],
    )
    return record


def add_speculation(record: dict[str, Any], rounds: list[tuple[int, int]]) -> None:
    """Count a call's speculative rounds of one request, (proposed, accepted) each, into its record."""
    by_position = record["spec_by_position"]
    for proposed, accepted in rounds:
        record["spec_proposed_tokens"] += proposed
        record["spec_accepted_tokens"] += accepted
        record["spec_rounds"] += 1
        while len(by_position) < proposed:
            by_position.append([0, 0])
        for i in range(proposed):
            by_position[i][0] += 1
            by_position[i][1] += i < accepted


def failed_record(
    request: Any,
    error: str,
    dp_rank: int | None = None,
    arrival_time: float | None = None,
    end_time: float | None = None,
) -> dict[str, Any]:
    """The record of a request that produced no tokens: every result field empty, `error` set."""
    request_id = request.get("id") if isinstance(request, dict) else request if isinstance(request, str) else None
    record = new_record(None if request_id is None else str(request_id), arrival_time)
    record.update(error=error, dp_rank=dp_rank, end_time=end_time)
    return record


def fill_latencies(
    record: dict[str, Any], token_times: list[float], device_times: list[float] | None = None
) -> dict[str, Any]:
    """Set ttft/tpot/e2e/itl/queue from the record's timestamps and its tokens' Unix times as delivered, and
    device_itl from their times on the workers (when given)."""
    arrival = record["arrival_time"]
    if record.get("scheduled_time") is not None and arrival is not None:
        record["queue_s"] = record["scheduled_time"] - arrival
    if token_times and arrival is not None:
        record["first_token_time"] = token_times[0]
        record["ttft_s"] = token_times[0] - arrival
        record["e2e_s"] = token_times[-1] - arrival
        n = len(token_times)
        record["tpot_s"] = (token_times[-1] - token_times[0]) / (n - 1) if n > 1 else None
        record["itl_s"] = [b - a for a, b in zip(token_times, token_times[1:])]
    if device_times:
        record["device_itl_s"] = [b - a for a, b in zip(device_times, device_times[1:])]
    return record
