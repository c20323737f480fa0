"""A DP group whose phase calls go over one TCP connection per worker (`ray.phase_calls: socket`, the default).

Start-up begins as ordinary Ray calls (node_info, rendezvous: `WorkerGroup.start`); then each worker opens
a call socket (`ShardWorker.open_call_socket`: its node's IP, a port, a token, handed over by that
ordinary call), the Coordinator connects to it (actors/call_socket.py), and every call from `load` on
goes over the sockets. So all of a worker's torch work runs on its call thread: another thread that ran
torch's parallel ops (the actor's main thread, where Ray runs an ordinary `load`) keeps an OpenMP thread
team of its own, and on a CPU worker that made every later step 4-10% slower (0.5B shape, in process).
A call is pickled once, written to every rank's connection, and each rank's answer is read back in the
order of the calls, so the group loop may write the next step while one runs. Rules this class keeps:

- A call waits at most `ray.worker_timeout_s` (counted from when it was written: a call written behind
  another shares its time), and once it takes longer than PROBE_S the ranks are checked on every PROBE_S
  (an ordinary `health` call), so that a dead rank whose connection did not close fails the call at once.
- A rank whose connection closes (its process died) fails the call naming it; so does a rank that raised
  while a peer has still not answered PROBE_S later (the peer waits for it in a collective).
- After a failure the connections are closed and the group refuses calls until `kill` and `start`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from actors.call_socket import CallClient, pack
from actors.config import EngineConfig
from actors.groups import CallError, GroupFailure, WorkerGroup, rank_names, retrieve_exception
from actors.shard_worker import Raised

logger = logging.getLogger(__name__)

# A call taking longer than this is checked on (dead rank) every PROBE_S; a rank that raised fails the group
# when a peer has not answered this long after it.
PROBE_S = 1.0


class SocketWorkerGroup(WorkerGroup):
    """`WorkerGroup` whose calls after start go over a socket per rank; same interface and failures."""

    def __init__(self, dp_rank: int, cfg: EngineConfig, strategies: list[Any]) -> None:
        super().__init__(dp_rank, cfg, strategies)
        self.clients: list[CallClient] = []
        self.failure: str | None = None  # why the connections were closed; calls refuse until kill + start

    # ----------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Start the workers as `WorkerGroup` does; `load` and `warmup` already go over the call sockets."""
        self.clients, self.failure = [], None
        await super().start()

    async def _connect(self) -> None:
        """Connect to each worker's call socket (after the rendezvous, before `load`)."""
        timeout = self.cfg.worker_timeout_s
        try:
            refs = [w.open_call_socket.remote(timeout) for w in self.workers]
            addresses = await self._gather(refs, timeout, "open call socket")
            for host, port, token in addresses:
                self.clients.append(await CallClient.connect(host, port, token, timeout))
        except Exception as e:
            raise GroupFailure(
                f"dp group {self.dp_rank} could not connect to its workers' call sockets: {type(e).__name__}: {e}"
            ) from e

    async def kill(self, timeout_s: float = 30.0) -> None:
        """Close the connections, kill the workers and wait (bounded) until their names are free."""
        self._close()
        self.failure = self.failure or "killed"
        await super().kill(timeout_s)

    def _close(self) -> None:
        for client in self.clients:
            client.close()
        self.clients = []

    # ----------------------------------------------------------------------------- calls
    async def call(self, method: str, *args: Any, timeout_s: float | None = None, what: str | None = None) -> list:
        """Call `method` on every rank with the same arguments; every rank's result, in rank order.

        Before the connections exist (start-up) this is an ordinary call. Raises GroupFailure (naming the
        rank) when a rank died or did not answer within the timeout, CallError when a live rank raised.
        """
        if not self.clients and self.failure is None:
            return await super().call(method, *args, timeout_s=timeout_s, what=what)
        what = what or method
        if self.failure is not None:
            raise GroupFailure(f"dp group {self.dp_rank} cannot run '{what}': {self.failure}")
        timeout_s = timeout_s or self.cfg.worker_timeout_s
        deadline = time.monotonic() + timeout_s
        data = pack((method, args))
        answers = [client.send(data) for client in self.clients]  # written now, in the order of the calls
        for answer in answers:
            answer.add_done_callback(retrieve_exception)
        results = await self._wait(answers, deadline, timeout_s, what)
        raised = [(rank, r) for rank, r in zip(self.ranks, results) if isinstance(r, Raised)]
        if raised:
            rank, error = raised[0]
            raise CallError(f"{rank_names([rank])} of dp group {self.dp_rank} failed in '{what}': {error.error}")
        return results

    async def _wait(self, answers: list[asyncio.Future], deadline: float, timeout_s: float, what: str) -> list:
        """Every rank's answer by `deadline`, checking on the ranks every PROBE_S while it takes long."""
        raised_at: float | None = None  # when a rank's answer was `Raised` while a peer had none yet
        while True:
            if self.failure is not None:  # an earlier call found the group failed
                raise GroupFailure(f"dp group {self.dp_rank} failed: {self.failure}")
            pending = [a for a in answers if not a.done()]
            lost = [rank for rank, a in zip(self.ranks, answers) if a.done() and a.exception() is not None]
            if lost:
                dead = await self.dead_ranks()
                reason = "died (RayActorError)" if dead else "closed its call connection"
                raise self._fail(f"{rank_names(dead or lost)} of dp group {self.dp_rank} {reason}")
            if not pending:
                return [a.result() for a in answers]
            raised = [(rank, a.result()) for rank, a in zip(self.ranks, answers) if a.done() and _raised(a)]
            now = time.monotonic()
            if raised and raised_at is None:
                raised_at = now
            if raised and now - raised_at >= PROBE_S:  # its peers wait for it in a collective: the group is stuck
                rank, error = raised[0]
                raise self._fail(f"{rank_names([rank])} of dp group {self.dp_rank} failed in '{what}': {error.error}")
            if now >= deadline:
                late = [rank for rank, a in zip(self.ranks, answers) if not a.done()]
                raise self._fail(
                    f"dp group {self.dp_rank} did not finish '{what}' within {timeout_s:g}s "
                    f"(ray.worker_timeout_s); rank(s) {late} still running"
                )
            done, _ = await asyncio.wait(
                pending, timeout=min(PROBE_S, deadline - now), return_when=asyncio.FIRST_COMPLETED
            )
            if not done and self.failure is None:
                dead = await self.dead_ranks()
                if dead:
                    raise self._fail(f"{rank_names(dead)} of dp group {self.dp_rank} died (RayActorError)")

    def _fail(self, message: str) -> GroupFailure:
        """Stop using the connections (calls refuse until kill + start), and the failure to raise."""
        self.failure = message
        self._close()
        return GroupFailure(message)


def _raised(answer: asyncio.Future) -> bool:
    return answer.exception() is None and isinstance(answer.result(), Raised)
