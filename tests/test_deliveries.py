"""Multiplexed delivery (actors/deliveries.py): one subscription carries every request's items, in order.

The Coordinator runs in this process over fake DP groups; `LocalHandle` stands in for its Ray
handle, so the protocol (submit under a tag, batches of (tag, item), the caller's queues) is tested
without Ray. tests/test_serve.py covers the same path through Ray Serve.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from actors import clock
from actors.call_socket import HEADER
from actors.deliveries import OUTBOX_GRACE_S, Deliveries, Outbox, expire_outboxes
from actors.delivery_socket import (
    KEEPALIVE_COUNT,
    KEEPALIVE_IDLE_S,
    UNACKED_TIMEOUT_S,
    DeliveryServer,
    read_deliveries,
    tune,
)
from actors.errors import RequestError
from cluster.tools.fake_workers import LocalHandle
from tests.test_group_loop import coordinator, expected, requests


async def until(condition: Any, timeout_s: float = 60.0) -> None:
    """Yield to the loop until `condition()` holds (a TimeoutError after `timeout_s`, not a hang)."""

    async def wait() -> None:
        while not condition():
            await asyncio.sleep(0)

    await asyncio.wait_for(wait(), timeout_s)


async def read_all(stream) -> list[dict]:  # noqa: ANN001 (a RequestStream)
    items = []
    async for item in stream:
        items.append(item)
        if item.get("final"):
            return items
    raise AssertionError("the stream ended without a final record")


def test_every_request_gets_its_own_items_in_order_through_one_subscription(tiny_checkpoint: Path) -> None:
    async def main() -> None:
        coord = coordinator(tiny_checkpoint, dp_size=2, max_batch_size=4, restarts=0)
        await coord.setup()
        batches: list[int] = []
        subscribe = coord.deliveries

        async def counted(subscriber: str):  # noqa: ANN202
            async for batch in subscribe(subscriber):
                batches.append(len(batch))
                yield batch

        coord.deliveries = counted
        deliveries = Deliveries(LocalHandle(coord))
        reqs = requests(8, 6)
        streams = [deliveries.open(r, ack=i % 2 == 0) for i, r in enumerate(reqs)]
        results = await asyncio.gather(*(read_all(s) for s in streams))
        for i, (request, items) in enumerate(zip(reqs, results)):
            final = items[-1]
            assert final["id"] == request["id"] and final["error"] is None
            assert final["output_token_ids"] == expected(coord, request)
            if i % 2 == 0:
                assert items[0] == {"id": request["id"], "token_ids": [], "text": "", "accepted": True}
                items = items[1:]
            deltas = items[:-1]
            assert all(d["id"] == request["id"] for d in deltas)
            assert [t for d in deltas for t in d["token_ids"]] == final["output_token_ids"]
            assert "".join(d["text"] for d in deltas) == final["output_text"]
        assert sum(batches) == sum(len(items) for items in results) - 4  # acks come from submit, not the stream
        assert max(batches) > 1  # a round's items for its requests travel together
        assert not deliveries.queues and not any(o.keys for o in coord.outboxes.values())
        await deliveries.close()
        await until(lambda: not coord.outboxes)  # the Coordinator saw the connection close
        await coord.shutdown()

    asyncio.run(main())


def test_a_refused_request_raises_from_its_first_item(tiny_checkpoint: Path) -> None:
    async def main() -> None:
        coord = coordinator(tiny_checkpoint, dp_size=1, max_batch_size=2, restarts=0)
        await coord.setup()
        deliveries = Deliveries(LocalHandle(coord))
        stream = deliveries.open({"id": "bad", "prompt": "hello", "max_new_tokens": 0}, ack=True)
        with pytest.raises(RequestError, match="max_new_tokens") as raised:
            await stream.__anext__()
        assert raised.value.param == "max_new_tokens"
        assert not deliveries.queues
        good = requests(1, 3)[0]
        items = await read_all(deliveries.open(good))
        assert items[-1]["output_token_ids"] == expected(coord, good)
        await deliveries.close()
        await coord.shutdown()

    asyncio.run(main())


def test_a_subscriber_that_goes_away_has_its_requests_aborted(tiny_checkpoint: Path) -> None:
    async def main() -> None:
        coord = coordinator(tiny_checkpoint, dp_size=1, max_batch_size=2, restarts=0)
        await coord.setup()
        group = coord.engines[0].group
        group.hold, group.entered = asyncio.Event(), asyncio.Event()
        deliveries = Deliveries(LocalHandle(coord))
        streams = [deliveries.open(r, ack=True) for r in requests(3, 50)]
        for stream in streams:
            await stream.__anext__()  # queued
        await group.entered.wait()  # the first round is on the workers
        await until(lambda: coord.outboxes[deliveries.subscriber].subscribed)  # its delivery connection is open
        await deliveries.close()
        await until(lambda: not coord.requests)  # all three ended here: aborted when the connection closed
        assert coord.engines[0].scheduler.load == 0
        group.hold.set()
        assert coord.completed == 3
        await coord.shutdown()

    asyncio.run(main())


def test_a_broken_subscription_fails_every_open_stream(tiny_checkpoint: Path) -> None:
    async def main() -> None:
        coord = coordinator(tiny_checkpoint, dp_size=1, max_batch_size=2, restarts=0)
        await coord.setup()
        coord.engines[0].group.step_time_s = 0.001  # each call yields the loop: batches go out as rounds end
        delivered, broken = asyncio.Event(), asyncio.Event()
        subscribe = coord.deliveries

        async def dying(subscriber: str):  # noqa: ANN202
            async for batch in subscribe(subscriber):
                yield batch
                delivered.set()
                await broken.wait()
                raise RuntimeError("coordinator died")

        coord.deliveries = dying
        deliveries = Deliveries(LocalHandle(coord))
        streams = [deliveries.open(r) for r in requests(2, 50)]
        await delivered.wait()  # one batch went through
        broken.set()
        for stream in streams:
            with pytest.raises(RuntimeError, match="coordinator died"):
                while True:
                    assert not (await stream.__anext__()).get("final")
        assert not deliveries.queues
        await coord.shutdown()

    asyncio.run(main())


def test_a_request_aborted_while_it_is_prepared_ends_without_running(tiny_checkpoint: Path) -> None:
    async def main() -> None:
        coord = coordinator(tiny_checkpoint, dp_size=1, max_batch_size=2, restarts=0)
        await coord.setup()
        entered, release = threading.Event(), threading.Event()
        prepare = coord.preparation.build

        def held(request: dict):  # noqa: ANN202
            entered.set()
            assert release.wait(30), "the test never released the preparation"
            return prepare(request)

        coord.preparation.build = held
        deliveries = Deliveries(LocalHandle(coord))
        request = requests(1, 5)[0]
        stream = deliveries.open(request)
        assert await asyncio.to_thread(entered.wait, 30)
        assert coord.abort(request["id"]) is True  # the caller gave up (an HTTP client went away)
        release.set()
        final = (await read_all(stream))[-1]
        assert final["finish_reason"] == "abort" and final["output_token_ids"] == []
        assert coord.engines[0].scheduler.load == 0 and not coord.requests and not coord.preparation.preparing
        assert coord.progress() == (1, 1)
        coord.preparation.build = prepare
        again = await read_all(deliveries.open(request))  # the same id later runs as usual
        assert again[-1]["output_token_ids"] == expected(coord, request)
        await deliveries.close()
        await coord.shutdown()

    asyncio.run(main())


class FakeClock:
    """The request path's clock (actors/clock.py) at real speed plus what a test adds with `advance`."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.perf_counter() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def test_an_outbox_expires_after_its_grace_with_nothing_open_and_no_subscriber() -> None:
    now = [1000.0]
    with clock.use(lambda: now[0]):
        unread, read, busy = Outbox(), Outbox(), Outbox()
        outboxes = {"unread": unread, "read": read, "busy": busy}
        read.subscribe()
        for outbox in outboxes.values():
            outbox.expect("0")
        busy.expect("1")
        for outbox in outboxes.values():
            outbox.sink("0")({"id": "a", "final": True})  # request 0 ended everywhere; busy still has 1
        now[0] += OUTBOX_GRACE_S - 1
        assert expire_outboxes(outboxes, now[0]) == []
        now[0] += 1
        assert expire_outboxes(outboxes, now[0]) == ["unread"]
        assert set(outboxes) == {"read", "busy"}
        busy.drop("1")  # refused: nothing will come for it
        assert expire_outboxes(outboxes, now[0] + OUTBOX_GRACE_S) == ["busy"]
        assert expire_outboxes(outboxes, now[0] + 1e9) == [] and list(outboxes) == ["read"]


def test_an_outbox_no_subscriber_reads_is_dropped_after_the_grace(tiny_checkpoint: Path) -> None:
    fake = FakeClock()

    async def main() -> None:
        coord = coordinator(tiny_checkpoint, dp_size=1, max_batch_size=2, restarts=0)
        await coord.setup()
        first, second = requests(2, 3)
        await coord.submit(first, "never-reads", "0")  # a Ray caller that never opens `deliveries`
        outbox = coord.outboxes["never-reads"]
        while outbox.keys:  # until its request ended
            await asyncio.sleep(0.01)
        assert outbox.items[-1][1]["final"]
        fake.advance(OUTBOX_GRACE_S / 2)
        deliveries = Deliveries(LocalHandle(coord), subscriber="reads")
        items = await read_all(deliveries.open(first))
        assert items[-1]["output_token_ids"] == expected(coord, first)
        assert coord.outboxes["never-reads"] is outbox  # still within the grace
        fake.advance(OUTBOX_GRACE_S / 2)
        await read_all(deliveries.open(second))  # the next submit drops the unread outbox
        assert set(coord.outboxes) == {"reads"}  # the subscribed one stays, however long
        fake.advance(10 * OUTBOX_GRACE_S)
        await read_all(deliveries.open(first))
        assert set(coord.outboxes) == {"reads"}
        await deliveries.close()
        await until(lambda: not coord.outboxes)  # the Coordinator saw the connection close
        await coord.shutdown()

    with clock.use(fake):
        asyncio.run(main())


def test_the_delivery_socket_serves_only_the_token_holder_and_closes_on_shutdown() -> None:
    """actors/delivery_socket.py: a connection without the token gets nothing and is closed; the holder gets
    its batches; closing the server ends the holder's read with an error naming the subscription."""

    async def main() -> None:
        served: list[str] = []
        more = asyncio.Event()

        async def serve(subscriber: str):  # noqa: ANN202
            served.append(subscriber)
            yield [("0", {"token_ids": [1]})]
            await more.wait()

        server = DeliveryServer("127.0.0.1", serve)
        first, second = await asyncio.gather(server.address(), server.address())
        assert first == second  # one server for callers at the same time
        host, port, token = first
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(bytes(len(token)) + HEADER.pack(3) + b"bad")
        assert await asyncio.wait_for(reader.read(), 30) == b""  # closed, nothing sent
        writer.close()
        assert served == []

        got: list[list] = []
        reading = asyncio.ensure_future(read_deliveries((host, port, token), "caller-1", got.append))
        await until(lambda: got)
        assert served == ["caller-1"] and got == [[("0", {"token_ids": [1]})]]
        server.close()
        with pytest.raises(ConnectionError, match="closed the delivery connection of subscription 'caller-1'"):
            await asyncio.wait_for(reading, 30)

    asyncio.run(main())


def test_a_batch_that_cannot_be_sent_fails_the_subscription_with_its_reason() -> None:
    async def main() -> None:
        async def serve(subscriber: str):  # noqa: ANN202
            yield [("0", {"bad": lambda: None})]

        server = DeliveryServer("127.0.0.1", serve)
        with pytest.raises(RuntimeError, match="a batch could not be sent: .*pickle"):
            await asyncio.wait_for(read_deliveries(await server.address(), "caller", lambda batch: None), 30)
        server.close()

    asyncio.run(main())


def test_delivery_connections_notice_a_peer_whose_node_went_away() -> None:
    """Both ends of a delivery connection keep TCP keepalive and bound unacknowledged data (`tune`), so a
    peer that vanished without closing (its node down) ends the connection in about 25 s, not hours."""
    with socket.socket() as sock:
        tune(sock)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):  # Linux
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE_S
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == KEEPALIVE_COUNT
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == UNACKED_TIMEOUT_S * 1000
