"""Multiplexed delivery: one stream per caller process carries the items of all of its requests.

`Coordinator.stream` is one Ray streaming generator per request: every delivery of every request is
one Ray object, which at 64 running requests per DP group costs the Coordinator more than the rest
of its work together. A caller that serves many requests at once (an HTTP server replica, a
benchmark driver) instead opens one subscription and submits each request under a tag of its
choosing:

- the Coordinator keeps an `Outbox` per subscriber; a request submitted with `submit(request,
  subscriber, tag)` puts its items there (the same items `stream` yields), and the subscriber's
  `deliveries` stream yields whatever has gathered as one list of (tag, item), so a round of a
  DP group with 64 requests is one message, not 64;
- `Deliveries` is the caller's end: one task reads the subscription and hands each item to its
  request's queue, and `Deliveries.open` returns a `RequestStream` whose `__anext__` yields the
  same items, in the same order, as `Coordinator.stream`'s generator would (the acknowledgement
  first with `ack`, then token deltas, then the final record); a refused request raises its error
  from the first `__anext__`, as `stream` does.

`Deliveries` reads each Coordinator's `deliveries` stream over that Coordinator's delivery socket
(actors/delivery_socket.py: one TCP connection per subscriber, a fraction of a Ray stream item's cost);
`Coordinator.deliveries` is also a Ray streaming generator, for callers that read it through Ray.

The final record always comes (an abort ends a request with one), and the caller's queue goes with
it. With one Coordinator actor per DP group (actors/router.py), the router's `delivery_sources`
names them, and the caller reads each one's `deliveries` stream: the items never pass through the
router. When a subscription ends with an error (a Coordinator died, its connection closed), every open
stream raises that error; the next `open` subscribes again. When the subscriber goes away (its
connection closes, or its Ray generator is cancelled), the Coordinator aborts the requests it still had.

A caller may `submit` and never read `deliveries` (a Ray caller that does not use `Deliveries`, or
one that died before subscribing). Its outbox is dropped once it has had no open request and no
subscriber for `OUTBOX_GRACE_S` seconds of the request path's clock (actors/clock.py), at the
Coordinator's next `submit`; the items it held are lost. A subscriber opens its stream right after
its first `submit` (`Deliveries.open`), well within that time.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from actors import clock
from actors.delivery_socket import read_deliveries

# Seconds an outbox with no open request and no subscriber is kept before `expire_outboxes` drops it.
OUTBOX_GRACE_S = 60.0


class Outbox:
    """The Coordinator's side: items of one subscriber's requests, waiting for its `deliveries` stream."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict]] = []
        self.ready = asyncio.Event()
        # tag -> the Coordinator's key of a request not finished yet (None while it is prepared)
        self.keys: dict[str, str | None] = {}
        self.subscribed = False  # a `deliveries` stream reads it
        self.idle_since: float | None = clock.perf()  # since when nothing is open and no one reads (None: busy)

    def subscribe(self) -> None:
        self.subscribed, self.idle_since = True, None

    def expect(self, tag: str) -> None:
        """A request under `tag` is being prepared: the outbox is in use until it ends or is refused."""
        self.keys[tag] = None
        self.idle_since = None

    def drop(self, tag: str) -> None:
        """The request under `tag` is over (its final item sent, or refused before it had one)."""
        self.keys.pop(tag, None)
        if not self.keys and not self.subscribed and self.idle_since is None:
            self.idle_since = clock.perf()

    def expired(self, now: float, grace_s: float) -> bool:
        """Nothing open and no subscriber for at least `grace_s` seconds."""
        return self.idle_since is not None and now - self.idle_since >= grace_s

    def sink(self, tag: str) -> Callable[[dict], None]:
        """What a request submitted under `tag` calls with each of its items."""

        def put(item: dict) -> None:
            self.items.append((tag, item))
            if item.get("final"):
                self.drop(tag)
            self.ready.set()

        return put

    async def batches(self) -> AsyncIterator[list[tuple[str, dict]]]:
        """Whatever gathered since the last batch, as soon as there is any."""
        while True:
            await self.ready.wait()
            self.ready.clear()
            if self.items:
                batch, self.items = self.items, []
                yield batch


def expire_outboxes(outboxes: dict[str, Outbox], now: float, grace_s: float = OUTBOX_GRACE_S) -> list[str]:
    """Drop the outboxes that had no open request and no subscriber for `grace_s` seconds; their subscribers."""
    gone = [subscriber for subscriber, outbox in outboxes.items() if outbox.expired(now, grace_s)]
    for subscriber in gone:
        del outboxes[subscriber]
    return gone


class RequestStream:
    """One request's items at the caller, read with `await stream.__anext__()` (or `async for`)."""

    def __init__(self, deliveries: Deliveries, tag: str, queue: asyncio.Queue, submitted: Any, ack: bool) -> None:
        self._deliveries = deliveries
        self.tag = tag
        self._queue = queue
        self._submitted = submitted  # the `submit` call's ObjectRef until it is awaited
        self._ack = ack
        self._held: BaseException | None = None  # an error `ready` took from the queue, for `__anext__` to raise

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> dict:
        if self._submitted is not None:
            submitted, self._submitted = self._submitted, None
            try:
                accepted = await submitted
            except BaseException:
                self._deliveries.forget(self.tag)
                raise
            if self._ack:
                return accepted
        if self._held is not None:
            item, self._held = self._held, None
        else:
            item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def ready(self) -> dict | None:
        """The next item if it has already arrived, without waiting; None when none has, or when the next is
        an error (which the next `__anext__` raises). A caller that falls behind takes what gathered at once."""
        if self._submitted is not None or self._held is not None or self._queue.empty():
            return None
        item = self._queue.get_nowait()
        if isinstance(item, BaseException):
            self._held = item
            return None
        return item


class Deliveries:
    """The caller's end of one subscription to a Coordinator (a Ray actor handle)."""

    def __init__(self, coordinator: Any, subscriber: str | None = None) -> None:
        self.coordinator = coordinator
        self.subscriber = subscriber or f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.queues: dict[str, asyncio.Queue] = {}
        self._tags = itertools.count()
        self._task: asyncio.Task | None = None

    def open(self, request: dict, ack: bool = False) -> RequestStream:
        """Submit `request` and return its stream (errors surface from its first `__anext__`)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._pump())
        tag = str(next(self._tags))
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[tag] = queue
        submitted = self.coordinator.submit.remote(request, self.subscriber, tag)
        return RequestStream(self, tag, queue, submitted, ack)

    def forget(self, tag: str) -> None:
        self.queues.pop(tag, None)

    async def close(self) -> None:
        """Stop reading (the Coordinator then aborts what this subscriber still had)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _pump(self) -> None:
        # A router (actors/router.py) names the group Coordinators that deliver; a Coordinator, none but itself.
        readers: list[asyncio.Future] = []
        try:
            sources = await self.coordinator.delivery_sources.remote() or [self.coordinator]
            readers = [asyncio.ensure_future(self._read(source)) for source in sources]
            done, _ = await asyncio.wait(readers, return_when=asyncio.FIRST_COMPLETED)
            error = next(iter(done)).exception()  # a reader only ends by raising
            raise error if error is not None else RuntimeError(f"subscription {self.subscriber!r} ended")
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a Coordinator died: every open stream raises its error
            queues, self.queues = self.queues, {}
            for queue in queues.values():
                queue.put_nowait(e)
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

    async def _read(self, source: Any) -> None:
        """Hand each item of `source`'s `deliveries` stream, read over its delivery socket, to its request's
        queue (actors/delivery_socket.py); raises when the connection ends."""
        await read_deliveries(await source.delivery_address.remote(), self.subscriber, self._hand_out)

    def _hand_out(self, batch: list[tuple[str, dict]]) -> None:
        for tag, item in batch:
            queue = self.queues.get(tag)
            if queue is not None:
                queue.put_nowait(item)
                if item.get("final"):
                    del self.queues[tag]
