"""The call socket, Ray-free: only the connection that presents the worker's token is served, answers come back
in the order of the calls (several written before the first answer), an answer that cannot be pickled is
answered with the fallback, and a closed connection fails every call still waiting."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from actors.call_socket import TOKEN_BYTES, CallClient, CallServer, ConnectionLost, pack, recv_message


def _server(handler=None, accept_timeout_s: float = 30.0) -> CallServer:
    return CallServer(
        "127.0.0.1", handler or (lambda m: m), lambda e: f"unpicklable: {type(e).__name__}", accept_timeout_s
    )


def _closed(sock: socket.socket) -> bool:
    """Whether the peer closed `sock` (an orderly close, or a reset: it closed with our message unread)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_wrong_token_is_refused_and_the_right_one_served() -> None:
    server = _server(lambda m: ("echo", m))
    with socket.create_connection(server.address) as intruder:
        intruder.sendall(b"x" * TOKEN_BYTES)
        intruder.sendall(pack("run this"))
        assert _closed(intruder)  # without an answer
    with socket.create_connection(server.address) as conn:
        conn.sendall(server.token)
        conn.sendall(pack({"a": 1}))
        assert recv_message(conn) == ("echo", {"a": 1})
    server.thread.join(10)
    assert not server.thread.is_alive()  # the connection closed: the thread ended


def test_no_connection_before_the_deadline_closes_the_listener() -> None:
    server = _server(accept_timeout_s=0.2)
    server.thread.join(10)
    assert not server.thread.is_alive() and server.conn is None
    with pytest.raises(OSError):
        socket.create_connection(server.address, timeout=5).close()


def test_calls_written_ahead_come_back_in_order_and_a_bad_answer_is_answered() -> None:
    release = threading.Event()

    def handler(message):
        if message == "wait":
            release.wait(30)
        return threading.Lock() if message == "lock" else message * 2

    server = _server(handler)

    async def run() -> list:
        client = await CallClient.connect(*server.address, server.token, 10)
        answers = [client.send(pack(m)) for m in ("wait", 1, "lock", "ab", 3)]
        await asyncio.sleep(0)
        assert not any(a.done() for a in answers)
        release.set()
        out = await asyncio.gather(*answers)
        client.close()
        return out

    assert asyncio.run(run()) == ["waitwait", 2, "unpicklable: TypeError", "abab", 6]


def test_a_closed_connection_fails_every_waiting_call() -> None:
    entered = threading.Event()

    def handler(message):  # never answers
        entered.set()
        threading.Event().wait(60)

    server = _server(handler)

    async def run() -> None:
        client = await CallClient.connect(*server.address, server.token, 10)
        answers = [client.send(pack(i)) for i in range(3)]
        # The server holds the connection and runs the first call: closing now closes that connection.
        assert await asyncio.get_running_loop().run_in_executor(None, entered.wait, 30)
        server.close()  # as the worker's process ending closes its end
        for answer in answers:
            with pytest.raises(ConnectionLost):
                await asyncio.wait_for(answer, 10)
        with pytest.raises(ConnectionLost):  # a call after the loss fails at once
            await client.send(pack("late"))
        client.close()

    asyncio.run(run())
