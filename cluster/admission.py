"""How many chat requests the server takes at once: the engine's KV slots run, a bounded number
more wait, and the rest are turned away at once with 503 and Retry-After.

Serve's own `max_queued_requests` counts requests waiting for one of the replica's
`max_ongoing_requests`, on every route. To make it bound the engine's waiting queue,
`max_ongoing_requests` would have to equal the engine's slots, and then /health and /v1/models
would wait behind generations and a queued stream would get neither headers nor keep-alives. The
one replica counts its own chat requests instead, so the bound holds the same way under both
ingresses (HAProxy and Serve's proxy).
"""

from __future__ import annotations

import math

from cluster.openai_api import APIError


class Overloaded(APIError):
    """A 503 that tells the client when to try again (the Retry-After header)."""

    def __init__(self, message: str, retry_after_s: float, code: str) -> None:
        super().__init__(503, message, code=code)
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}


class Ticket:
    """One admitted request; `release` gives its place back (once, however often it is called)."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.admission.active -= 1


class Admission:
    """Admits a chat request while fewer than slots + max_queued are in the server.

    slots: requests the engine runs at once (batch_size per DP group); max_queued: how many more
    may wait for a slot; retry_after_s: the Retry-After sent with a refusal. Counted on the
    replica's event loop, so no lock is needed.
    """

    def __init__(self, slots: int, max_queued: int, retry_after_s: float) -> None:
        self.capacity = slots + max_queued
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self.active = 0

    def enter(self) -> Ticket:
        """A ticket for one more request, or Overloaded (503) when the queue is full."""
        if self.active >= self.capacity:
            raise Overloaded(
                f"the server is at capacity: {self.active} requests in progress, the waiting queue of "
                f"serve.max_queued_requests={self.max_queued} is full; retry later",
                self.retry_after_s,
                code="queue_full",
            )
        self.active += 1
        return Ticket(self)


def queue_timeout(timeout_s: float, retry_after_s: float) -> Overloaded:
    """The error for a request that got no token within serve.queue_timeout_s."""
    return Overloaded(
        f"no token within serve.queue_timeout_s={timeout_s} s: the request waited too long for a slot "
        "and was dropped; retry later",
        retry_after_s,
        code="queue_timeout",
    )
