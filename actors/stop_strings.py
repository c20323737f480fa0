"""Stop strings: the one definition of their limit and validation, and the matcher that cuts a request's text.

The matcher sees the text once, delivery by delivery: each new piece is searched together with the
held-back tail only (the longest end of the text so far that is the start of a stop string), so a
delivery costs what its text and the stop strings' lengths cost, not what the whole output costs.

The stop string that is complete first wins: the one whose last character comes first in the text, and
of those ending at the same character, the longest. Completion is the one order that does not depend
on how the text was split into deliveries, so the cut is the same whatever a call delivered.
"""

from __future__ import annotations

from typing import Any

from actors.errors import RequestError

MAX_STOP_STRINGS = 4


def check_stop_strings(stop: Any) -> list[str]:
    """A request's `stop` value (None, a string or a list of strings) as a list (RequestError names 'stop')."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError(f"'stop' must be a string or a list of strings, got {stop!r}", "stop")
    if not all(stop):
        raise RequestError(f"stop strings must not be empty, got 'stop'={stop!r}", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise RequestError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, 'stop' has {len(stop)}", "stop")
    return list(stop)


class StopMatcher:
    """Releases text that can no longer be part of a stop string; cuts the text at the first stop string
    to be complete."""

    def __init__(self, stop: list[str]) -> None:
        self.stop = list(stop)
        self.held = ""  # the end of the text that may still become a stop string
        self.stopped = False
        self.end = 0  # once stopped: characters of the last fed text up to the stop string's last one

    def feed(self, text: str) -> str:
        """The text now safe to show after `text` came; at a stop string, sets `stopped` and `end` and drops
        the stop string and the rest."""
        if self.stopped or not self.stop:
            return "" if self.stopped else text
        window = self.held + text
        # (end, -length) of each stop string's first occurrence: the least is the first complete one.
        hits = [(at + len(s), -len(s)) for s in self.stop if (at := window.find(s)) >= 0]
        if hits:
            end, minus_length = min(hits)
            self.end = end - len(self.held)
            self.held, self.stopped = "", True
            return window[: end + minus_length]
        keep = max(_partial_match(window, s) for s in self.stop)
        self.held = window[len(window) - keep :]
        return window[: len(window) - keep]

    def release(self) -> str:
        """The held-back tail, once the text has ended without a stop string."""
        held, self.held = self.held, ""
        return held


def _partial_match(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper start of `stop`."""
    i = text.find(stop[0], max(0, len(text) - len(stop) + 1))
    while i != -1:
        if stop.startswith(text[i:]):
            return len(text) - i
        i = text.find(stop[0], i + 1)
    return 0
