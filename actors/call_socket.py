"""Phase calls over one TCP connection per worker (`ray.phase_calls: socket`), Ray-free.

A worker's `CallServer` listens on its node's IP, accepts the one connection that presents the token
it handed out (through an ordinary Ray call, `ShardWorker.open_call_socket`), then runs each message
it reads, in order, on a thread of its own and writes each answer back. The Coordinator's
`CallClient` writes calls and matches answers to them in order (one connection carries one rank's
calls, first in first out). A message is an 8-byte big-endian length, then a pickle.

Why a socket: a blocked `recv` costs no CPU while a group is idle and wakes within tens of
microseconds, against about 1 ms per rank for an ordinary actor call and Ray channels that poll a
core for as long as a compiled graph lives (docs/architecture.md, "Phase calls").
The token keeps anyone else who reaches the port from having pickles run by the worker: the listener
accepts nothing else, and closes once the Coordinator is connected.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import pickle
import secrets
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

HEADER = struct.Struct("!Q")  # a message's length in bytes
TOKEN_BYTES = 32
HANDSHAKE_S = 5.0  # how long an accepted connection has to present the token


def pack(message: Any) -> bytes:
    """One message as it travels: its length, then its pickle."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("the connection was closed")
        got += n
    return bytes(buf)


def recv_message(sock: socket.socket) -> Any:
    """The next message on a blocking socket; EOFError when the peer closed it."""
    (size,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
    return pickle.loads(_recv_exact(sock, size))


class CallServer:
    """Worker side: `handler(message)` for each message of the one authenticated connection, answers in order.

    `accept_timeout_s` bounds the wait for that connection; the listener is closed once it came (or not).
    `handler` must not raise (`ShardWorker.dispatch` answers `Raised` instead); an answer that cannot be
    pickled is answered with `unpicklable(error)`.
    """

    def __init__(
        self,
        host: str,
        handler: Callable[[Any], Any],
        unpicklable: Callable[[Exception], Any],
        accept_timeout_s: float,
        name: str = "call-socket",
    ) -> None:
        self.handler, self.unpicklable = handler, unpicklable
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.listener = socket.create_server((host, 0))
        self.address: tuple[str, int] = (host, self.listener.getsockname()[1])
        self.deadline = time.monotonic() + accept_timeout_s
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.thread.start()

    def close(self) -> None:
        for sock in (self.listener, self.conn):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass

    def _accept(self) -> socket.socket | None:
        """The first connection that presents the token before the deadline; None when none did."""
        try:
            while (left := self.deadline - time.monotonic()) > 0:
                self.listener.settimeout(left)
                try:
                    conn, peer = self.listener.accept()
                except (TimeoutError, OSError):
                    return None
                conn.settimeout(HANDSHAKE_S)
                try:
                    token = _recv_exact(conn, TOKEN_BYTES)
                except (EOFError, OSError):
                    token = b""
                if hmac.compare_digest(token, self.token):
                    conn.settimeout(None)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    return conn
                logger.warning("call socket %s:%d: refused a connection from %s (wrong token)", *self.address, peer)
                conn.close()
            return None
        finally:
            self.listener.close()

    def _serve(self) -> None:
        conn = self.conn = self._accept()
        if conn is None:
            logger.warning("call socket %s:%d: no connection came before its deadline", *self.address)
            return
        with conn:
            while True:
                try:
                    message = recv_message(conn)
                except (EOFError, OSError):  # the Coordinator closed the connection (kill, shutdown)
                    return
                answer = self.handler(message)
                try:
                    data = pack(answer)
                except Exception as e:  # noqa: BLE001 -- any pickling failure is the call's, not the socket's
                    data = pack(self.unpicklable(e))
                try:
                    conn.sendall(data)
                except OSError:
                    return


class ConnectionLost(ConnectionError):
    """The worker's end of a call connection closed (its process died, or the connection was closed here)."""


class CallClient:
    """Coordinator side: one worker's connection; `send` returns the future of that call's answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.waiting: deque[asyncio.Future] = deque()  # answers not yet read, in the order of the calls
        self.lost: ConnectionLost | None = None
        self.task = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, host: str, port: int, token: bytes, timeout_s: float) -> CallClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(token)
        return cls(reader, writer)

    def send(self, data: bytes) -> asyncio.Future:
        """Write one packed call (`pack`); the future of its answer (ConnectionLost if the connection ends first)."""
        answer = asyncio.get_running_loop().create_future()
        if self.lost is not None:
            answer.set_exception(self.lost)
            return answer
        self.waiting.append(answer)
        self.writer.write(data)
        return answer

    def close(self) -> None:
        self.task.cancel()
        self.writer.close()
        self._lose(ConnectionLost("the connection was closed"))

    async def _read(self) -> None:
        try:
            while True:
                (size,) = HEADER.unpack(await self.reader.readexactly(HEADER.size))
                answer = pickle.loads(await self.reader.readexactly(size))
                if self.waiting:
                    future = self.waiting.popleft()
                    if not future.done():
                        future.set_result(answer)
        except (asyncio.IncompleteReadError, OSError) as e:
            self._lose(ConnectionLost(f"the worker closed its call connection ({type(e).__name__})"))
        except Exception as e:  # noqa: BLE001 -- an answer that cannot be read ends the connection's use
            self._lose(ConnectionLost(f"an answer could not be read: {type(e).__name__}: {e}"))

    def _lose(self, error: ConnectionLost) -> None:
        self.lost = self.lost or error
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(self.lost)
