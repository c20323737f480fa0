"""A subscription's deliveries over one TCP connection: what `Deliveries` reads from each Coordinator.

A Ray streaming generator item costs about 0.5 ms of the producer's CPU and 0.7 ms of the reader's (two
async actors on the 2-core test host, docs/architecture.md "Deliveries"). At one token per step that is
most of what a token costs on its way to a server replica. So the Coordinator also serves its
`deliveries` stream over a socket:

- `DeliveryServer` listens on the Coordinator's node IP, from the first `Coordinator.delivery_address`
  call on (the Ray call that hands a subscriber the address and a token).
- A subscriber connects, writes the token and its name (an 8-byte big-endian length, then UTF-8); the
  server reads nothing else from the connection and unpickles nothing. A connection with a wrong token,
  or none within HANDSHAKE_S, is closed.
- Each batch `Coordinator.deliveries(subscriber)` yields goes out as one message (actors/call_socket.py's
  framing: length, then a pickle) of ("batch", [(tag, item), ...]); if that stream raises, one
  ("error", text) message, then the connection closes.
- The subscriber closing its end (its process went away, `Deliveries.close`) closes the stream, and the
  Coordinator aborts that subscriber's open requests, as when a Ray reader cancels its generator. Both
  ends keep TCP keepalive on (`tune`), so a peer whose whole node went away is noticed too, within
  about 25 s: the subscriber's streams raise, or the Coordinator aborts the requests.

`read_deliveries` is the subscriber's end. The Ray stream (`Coordinator.deliveries`) stays for callers
that read it through Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import pickle
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

from actors.call_socket import HANDSHAKE_S, HEADER, TOKEN_BYTES, pack

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30.0  # how long a subscriber waits for the connection to a Coordinator
MAX_NAME_BYTES = 1024  # a subscriber's name
# TCP keepalive on both ends: a peer whose node went away (no FIN ever comes) is found within about
# KEEPALIVE_IDLE_S + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL_S of silence (25 s), not the kernel's 2 hours;
# and data it never acknowledges fails the connection after UNACKED_TIMEOUT_S (TCP_USER_TIMEOUT).
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 10, 5, 3
UNACKED_TIMEOUT_S = 25


class DeliveryServer:
    """The Coordinator's end: `serve(subscriber)` is the async iterator of that subscriber's batches."""

    def __init__(self, host: str, serve: Callable[[str], AsyncIterator[list]]) -> None:
        self.host = host
        self.serve = serve
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.server: asyncio.Future | None = None  # of the asyncio.Server, started by the first `address` call
        self.writers: set[asyncio.StreamWriter] = set()

    async def address(self) -> tuple[str, int, bytes]:
        """(ip, port, token), listening from the first call on (calls at the same time share one server)."""
        if self.server is None:
            self.server = asyncio.ensure_future(asyncio.start_server(self._connection, self.host, 0))
        server = await asyncio.shield(self.server)
        return self.host, server.sockets[0].getsockname()[1], self.token

    def close(self) -> None:
        """Stop listening and close every connection (their subscribers' streams then raise)."""
        if self.server is not None:
            starting, self.server = self.server, None
            if starting.done() and starting.exception() is None:
                starting.result().close()
            else:
                starting.cancel()
        for writer in list(self.writers):
            writer.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            subscriber = await asyncio.wait_for(self._handshake(reader), HANDSHAKE_S)
            if subscriber is None:
                peer = writer.get_extra_info("peername")
                logger.warning("delivery socket: refused a connection from %s (wrong token)", peer)
                return
            tune(writer.get_extra_info("socket"))
            await self._stream(subscriber, reader, writer)
        except (asyncio.IncompleteReadError, TimeoutError, OSError, UnicodeDecodeError):
            pass  # a connection that broke off, or never said who it is
        finally:
            self.writers.discard(writer)
            writer.close()

    async def _handshake(self, reader: asyncio.StreamReader) -> str | None:
        token = await reader.readexactly(TOKEN_BYTES)
        if not hmac.compare_digest(token, self.token):
            return None
        (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
        if size > MAX_NAME_BYTES:
            return None
        return (await reader.readexactly(size)).decode()

    async def _stream(self, subscriber: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Write the subscriber's batches until it closes its end (or the stream ends or raises)."""
        batches = aiter(self.serve(subscriber))
        gone = asyncio.ensure_future(reader.read(1))  # the subscriber writes nothing more: EOF means it left
        try:
            while True:
                following = asyncio.ensure_future(anext(batches))
                await asyncio.wait({following, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not following.done():  # the subscriber left
                    following.cancel()
                    await asyncio.gather(following, return_exceptions=True)
                    return
                try:
                    batch = following.result()
                except StopAsyncIteration:
                    return
                except Exception as e:  # noqa: BLE001 -- the subscriber's streams raise it
                    await _send(writer, ("error", f"{type(e).__name__}: {e}"))
                    return
                try:
                    message = pack(("batch", batch))
                except Exception as e:  # noqa: BLE001 -- an item that cannot be pickled ends the subscription
                    await _send(writer, ("error", f"a batch could not be sent: {type(e).__name__}: {e}"))
                    return
                writer.write(message)
                await writer.drain()
        finally:
            gone.cancel()
            with contextlib.suppress(Exception):  # runs the stream's own clean-up (aborting what is open)
                await batches.aclose()


async def read_deliveries(
    address: tuple[str, int, bytes], subscriber: str, hand_out: Callable[[list[tuple[str, Any]]], None]
) -> None:
    """The subscriber's end: connect, name `subscriber`, and pass each batch to `hand_out` until the connection
    ends; then raise (an error message from the Coordinator, or the connection closing)."""
    host, port, token = address
    name = subscriber.encode()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
    except TimeoutError:
        raise ConnectionError(
            f"no connection to the Coordinator's delivery socket {host}:{port} within {CONNECT_TIMEOUT_S:g}s"
        ) from None
    try:
        tune(writer.get_extra_info("socket"))
        writer.write(token + HEADER.pack(len(name)) + name)
        while True:
            try:
                (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
                kind, body = pickle.loads(await reader.readexactly(size))
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                raise ConnectionError(
                    f"the Coordinator closed the delivery connection of subscription {subscriber!r}"
                ) from e
            if kind == "error":
                raise RuntimeError(f"the Coordinator's deliveries to {subscriber!r} failed: {body}")
            hand_out(body)
    finally:
        writer.close()


def tune(sock: Any) -> None:
    """A delivery connection's options: no Nagle delay (a batch goes out when written), TCP keepalive and a
    bound on unacknowledged data (a dead peer's node is noticed: the subscriber's streams raise, the
    Coordinator aborts its requests)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
        ("TCP_USER_TIMEOUT", UNACKED_TIMEOUT_S * 1000),
    ):
        if hasattr(socket, option):  # Linux; elsewhere the system's keepalive timing
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


async def _send(writer: asyncio.StreamWriter, message: tuple[str, Any]) -> None:
    writer.write(pack(message))
    await writer.drain()


def node_ip() -> str:
    """The IP a DeliveryServer listens on: this node's as Ray sees it; loopback without Ray (tests, the simulator)."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
